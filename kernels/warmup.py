"""Compile-ahead for the Triton kernels: the binaries that a call at a given shape will look up, without the call.

    jobs = warmup.jobs("flash_fwd", tq=61440, tk=61440, hq=40, hkv=8, d=128, dtype="bfloat16", max_q=61440,
                       causal=True, nseq=1)
    for job in jobs:
        warmup.compile_job(job)      # one (kernel, config): fills Triton's cache (TRITON_CACHE_DIR)

A job is a picklable (family, shape parameters, config index), so a pool of processes can compile a list in
parallel (bench/warm.py). Each family builds its kernel's arguments with the same launch-argument helper the real
call uses, from shape-only stand-in tensors (`Shaped`: dtype, shape, strides, a 16-byte aligned pointer), so the
specialisation (dtypes, the divisibility of every integer argument, the constexprs and the config) and therefore
Triton's cache key are those of the real call: the timed run then finds every binary compiled. Nothing is launched.

TRITON_INTERPRET must be 0 when this module is imported (the kernels must be JIT functions). On a machine without
a GPU, compile under qlfast.testing.offline_cuda_target() (a stand-in driver that names sm_90).
"""

from __future__ import annotations

import time

import torch
import triton

from qlfast.kernels import attn_merge as _merge
from qlfast.kernels import flash_attention as _fwd
from qlfast.kernels import flash_attention_bwd as _bwd
from qlfast.kernels import linear_logprob as _ll

F32 = torch.float32


class Shaped:
    """A contiguous tensor's metadata without its memory: what a launch-argument helper and Triton's binder read."""

    def __init__(self, shape, dtype: torch.dtype):
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype

    def stride(self, dim: int | None = None):
        st = [1]
        for n in reversed(self.shape[1:]):
            st.insert(0, st[0] * n)
        return tuple(st) if dim is None else st[dim]

    def element_size(self) -> int:
        return self.dtype.itemsize

    @staticmethod
    def data_ptr() -> int:
        return 0  # 16-byte aligned, as the caching allocator's blocks are

    @staticmethod
    def ptr_range() -> int:
        return 0


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _linear_fwd(n, h, v, dtype, with_entropy):
    dt = _dtype(dtype)
    hid, w, t = Shaped((n, h), dt), Shaped((v, h), dt), Shaped((n,), torch.int64)
    part = Shaped((triton.cdiv(v, _ll.SEG_V), n), F32)
    args, consts, _ = _ll.fwd_launch_args(hid, w, t, part, part, part, Shaped((n,), F32), 1.0, with_entropy)
    return [(_ll.FWD.fn, args, consts, _ll.configs_for(dt))]


def _linear_dz(n, h, v, dtype, has_glp, has_gent, chunk_bytes=_ll.DZ_CHUNK_BYTES):
    """The first chunk's specialisation and, when the vocabulary ends in a narrower chunk, the last one's."""
    dt = _dtype(dtype)
    hid, w, t, row = Shaped((n, h), dt), Shaped((v, h), dt), Shaped((n,), torch.int64), Shaped((n,), F32)
    vc = _ll.dz_chunk_cols(n, v, dt.itemsize, chunk_bytes)
    dz = Shaped((n, vc), dt)
    out = []
    for v0 in sorted({0, (v - 1) // vc * vc}):
        args, consts, _ = _ll.dz_launch_args(hid, w, t, row, row, row, row, dz, v0, min(vc, v - v0), 1.0, has_glp,
                                             has_gent)
        out.append((_ll.DZ.fn, args, consts, _ll.configs_for(dt)))
    return out


def _flash_fwd(tq, tk, hq, hkv, d, dtype, max_q, causal, nseq):
    dt = _dtype(dtype)
    q, k, cu = Shaped((tq, hq, d), dt), Shaped((tk, hkv, d), dt), Shaped((nseq + 1,), torch.int32)
    args, consts = _fwd.fwd_launch_args(q, k, k, q, Shaped((hq, tq), F32), cu, cu, max_q, causal, d ** -0.5)
    return [(_fwd._flash_fwd_kernel, args, consts, _fwd.configs(_fwd.fwd_space(dt)))]


def _flash_bwd(tq, tk, hq, hkv, d, dtype, max_q, max_k, causal, nseq):
    dt = _dtype(dtype)
    q, k, cu = Shaped((tq, hq, d), dt), Shaped((tk, hkv, d), dt), Shaped((nseq + 1,), torch.int32)
    lse = Shaped((hq, tq), F32)
    dkdv, dq, consts = _bwd.bwd_launch_args(q, q, k, k, lse, lse, q, k, k, cu, cu, max_q, max_k, causal, d ** -0.5)
    s_dkdv, s_dq = _bwd.bwd_spaces(dt)
    delta_args = (q, q, lse, tq, q.stride(0), q.stride(1), q.stride(0), q.stride(1), lse.stride(0))
    delta_cfg = [triton.Config({}, num_warps=4, num_stages=3)]  # the launch's defaults
    return [(_bwd._dkdv_kernel, dkdv, {**consts, "HKV": hkv}, _fwd.configs(s_dkdv)),
            (_bwd._dq_kernel, dq, {**consts, "HQ": hq}, _fwd.configs(s_dq)),
            (_bwd._delta_kernel, delta_args, {"D": d, "BLOCK": 64}, delta_cfg)]


def _attn_merge(t, h, d, n, block_dtype, rows):
    bt = _dtype(block_dtype)
    out, lse = Shaped((t, h, d), F32), Shaped((h, t), F32)
    bo, bl = Shaped((n, h, d), bt), Shaped((h, n), F32)
    args, consts = _merge.launch_args(out, lse, bo, bl, Shaped((n,), torch.int64) if rows else None)
    return [(_merge._attn_merge_kernel, args, consts, [triton.Config({}, num_warps=4, num_stages=3)])]


FAMILIES = {"linear_fwd": _linear_fwd, "linear_dz": _linear_dz, "flash_fwd": _flash_fwd, "flash_bwd": _flash_bwd,
            "attn_merge": _attn_merge}


def jobs(family: str, *, first_config_only: bool = False, **params) -> list[tuple[str, dict, int, int]]:
    """(family, params, kernel index, config index) for every kernel of the family and every config of its list."""
    out = []
    for ki, (_, _, _, space) in enumerate(FAMILIES[family](**params)):
        out += [(family, params, ki, ci) for ci in range(1 if first_config_only else len(space))]
    return out


def compile_job(job, *, ttir: bool = False) -> dict:
    """Compile one job -> {kernel, config, seconds, error?, n_regs/n_spills (on a GPU), ttir (if asked)}."""
    family, params, ki, ci = job
    fn, args, consts, space = FAMILIES[family](**params)[ki]
    cfg = space[ci]
    kernel = getattr(fn, "fn", fn)  # the JIT function under a heuristics wrapper
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    out = {"family": family, "kernel": name, "config": {**cfg.kwargs, "num_warps": cfg.num_warps,
                                                        "num_stages": cfg.num_stages}}
    t0 = time.perf_counter()
    try:
        compiled = fn.warmup(*args, grid=(1,), **consts, **cfg.all_kwargs())
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a crash
        out.update(seconds=round(time.perf_counter() - t0, 3), error=f"{type(e).__name__}: {str(e)[:300]}")
        return out
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if torch.cuda.is_available():  # loading the binary gives ptxas's register and spill counts
        try:
            compiled._init_handles()
            out.update(n_regs=compiled.n_regs, n_spills=compiled.n_spills)
        except Exception as e:  # noqa: BLE001
            out["load_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if ttir:
        out["ttir"] = compiled.asm["ttir"]
    return out
