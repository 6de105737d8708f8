"""Every Triton kernel compiles for the GPU (sm_90a, Triton's whole pipeline down to a cubin) on this CPU machine, and
its index arithmetic is 64-bit where a product can pass 2^31.

The compile runs in a subprocess with TRITON_INTERPRET=0 (the kernels must be JIT functions, not the interpreter's)
under qlfast.testing.offline_cuda_target(), through kernels/warmup.py: the same launch-argument helpers as the real
calls, at the real shapes (bf16, 60K tokens, the 32B model's heads and LM head), one config per kernel.

A third check: Triton's binder specialises the warm-up's shape-only stand-in tensors exactly as real tensors (so the
GPU proof's parallel warm-up fills the cache entries the timed calls look up).

The int64 check reads each kernel's TTIR: every use of a row-stride argument (stride_qt, stride_h, ...) must be its
sign extension to i64, so no (row offset) x (row stride) product is computed in i32. In i32, the flash-attention
backward's start_m * stride_qt passed 2^31 above ~419K tokens at 40 heads x 128 (the interpreter cannot show this:
it computes loop indices in Python integers).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

T, HQ, HKV, D = 61440, 40, 8, 128
N, H, V = 60000, 5120, 152064
ROW_STRIDES = {
    "_flash_fwd_kernel": ("stride_qt", "stride_kt", "stride_ot", "stride_lh"),
    "_dkdv_kernel": ("stride_qt", "stride_kt", "stride_dt", "stride_lh"),
    "_dq_kernel": ("stride_qt", "stride_kt", "stride_dt", "stride_lh"),
    "_delta_kernel": ("stride_ot", "stride_dt", "stride_delta_h"),
    "_fwd_kernel": ("stride_h", "stride_w"),
    "_dz_kernel": ("stride_h", "stride_w", "stride_dz"),
    "_attn_merge_kernel": ("stride_ot", "stride_oh", "stride_lh", "stride_bt", "stride_bh", "stride_blh"),
}
FLASH = dict(tq=T, tk=T, hq=HQ, hkv=HKV, d=D, dtype="bfloat16", causal=True, nseq=1)
JOBS = [("flash_fwd", dict(FLASH, max_q=T)), ("flash_bwd", dict(FLASH, max_q=T, max_k=T)),
        ("linear_fwd", dict(n=N, h=H, v=V, dtype="bfloat16", with_entropy=True)),
        ("linear_dz", dict(n=N, h=H, v=V, dtype="bfloat16", has_glp=True, has_gent=True)),
        ("attn_merge", dict(t=T, h=HQ, d=D, n=T // 2, block_dtype="bfloat16", rows=True))]


def _same_key_as_real_tensors(job) -> bool:
    """Triton's binder gives the warm-up's shape-only stand-ins the specialisation (and options) it gives real
    tensors of the same shapes: the warm-up fills exactly the cache entries the real call looks up."""
    import torch

    from qlfast.kernels import warmup

    family, params, ki, ci = job
    fn, args, consts, space = warmup.FAMILIES[family](**params)[ki]
    jit = getattr(fn, "fn", fn) if hasattr(fn, "values") else fn  # under a heuristics wrapper
    real = [torch.empty(a.shape, dtype=a.dtype) if isinstance(a, warmup.Shaped) else a for a in args]
    keys = []
    for a in (args, real):
        kw = {**consts, **space[ci].all_kwargs()}
        for name, heur in getattr(fn, "values", {}).items():
            kw[name] = heur({**dict(zip(fn.arg_names, a)), **kw})
        _, spec, options = jit.device_caches[0][4](*a, **kw)
        keys.append((str(spec), str(sorted(options.items())) if isinstance(options, dict) else options.hash()))
    return keys[0] == keys[1]


def _worker() -> list[dict]:
    from qlfast.kernels import warmup
    from qlfast.testing import offline_cuda_target

    out, seen = [], set()
    with offline_cuda_target():
        for family, params in JOBS:
            for job in warmup.jobs(family, first_config_only=True, **params):
                res = warmup.compile_job(job, ttir=True)
                if res["kernel"] in seen:  # linear_dz's last-chunk specialisation: same source, same check
                    continue
                seen.add(res["kernel"])
                res["same_key"] = _same_key_as_real_tensors(job)
                out.append(res)
    return out


def _uses(ttir: str, arg: str) -> list[str]:
    """The body lines that use %arg (the signature line declares it)."""
    body = ttir[ttir.index("\n", ttir.index("tt.func public")):]
    return [ln.strip() for ln in body.splitlines() if re.search(rf"%{arg}\b", ln)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton"))}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"offline compile failed:\n{proc.stderr[-6000:]}"
    return {r["kernel"]: r for r in json.loads(proc.stdout.splitlines()[-1])}


def test_every_kernel_compiles_for_sm90(compiled):
    assert set(compiled) == set(ROW_STRIDES), sorted(compiled)
    for name, res in compiled.items():
        assert "error" not in res, f"{name}: {res['error']}"
        assert "tt.func public @" + name in res["ttir"]


def test_warmup_stand_ins_specialise_like_real_tensors(compiled):
    for name, res in compiled.items():
        assert res["same_key"], f"{name}: the warm-up's stand-in tensors give another cache key than real tensors"


@pytest.mark.parametrize("kernel", sorted(ROW_STRIDES))
def test_row_strides_are_int64(compiled, kernel):
    ttir = compiled[kernel]["ttir"]
    for arg in ROW_STRIDES[kernel]:
        uses = _uses(ttir, arg)
        assert uses, f"{kernel}: %{arg} is never used (renamed?)"
        bad = [u for u in uses if not re.match(rf"%\S+ = arith\.extsi %{arg} : i32 to i64", u)]
        assert not bad, f"{kernel}: %{arg} is used in 32-bit arithmetic:\n" + "\n".join(bad[:5])


if __name__ == "__main__":
    print(json.dumps(_worker()))
