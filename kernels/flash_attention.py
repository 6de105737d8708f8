"""Triton varlen flash-attention forward with GQA, returning the log-sum-exp (FlashAttention-2, Dao 2023, Alg. 1).

Memory contract: one program owns a (BLOCK_M, D) query tile of one sequence and one query head; it streams the
(BLOCK_N, D) key/value tiles of that sequence through SRAM with an online softmax, so the (L, L) scores never
exist. Outputs: out (Tq, Hq, D) in q's dtype and lse (Hq, Tq) fp32 (natural log): O(T) extra memory.

Layout: q (Tq, Hq, D), k/v (Tk, Hkv, D) packed, sequence s = rows cu_q[s]:cu_q[s+1] of q against rows
cu_k[s]:cu_k[s+1] of k/v (separate ranges for ring attention). Query head h reads kv head h // GROUP.
Causal masks are bottom-right aligned (query i sees key j iff j <= i + Lk - Lq); a row that sees no key writes
out 0 and lse -inf.

Online softmax in base 2: scores are scaled by softmax_scale * log2(e) so each tile costs one exp2 per element;
the running max m and sum l give lse = (m + log2 l) * ln 2. Key tiles split in two loops: those every row of
the query tile sees in full (no mask arithmetic) and the diagonal/ragged ones (masked).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, start_n, Lk, diag, stride_kt, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One key/value tile of the online softmax; MASKED tiles apply the sequence end and the causal diagonal."""
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[None, :] < Lk, other=0.0)  # (D, BLOCK_N)
    else:
        k = tl.load(k_ptrs + start_n * stride_kt)
    qk = tl.dot(q, k, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2-scaled
    if MASKED:
        keep = cols[None, :] < Lk
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # a row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs + start_n * stride_kt, mask=cols[:, None] < Lk, other=0.0)  # (BLOCK_N, D)
    else:
        v = tl.load(v_ptrs + start_n * stride_kt)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _flash_fwd_kernel(Q, K, V, Out, Lse, cu_q, cu_k, qk_scale, SEQ_BUCKET,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_lh,
                      HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    # row strides in int64, so every (row offset) x (row stride) is: at 2M tokens x 8 kv heads x 128 it passes 2^31
    stride_qt, stride_kt, stride_ot = tl.cast(stride_qt, tl.int64), tl.cast(stride_kt, tl.int64), tl.cast(stride_ot,
                                                                                                         tl.int64)
    stride_lh = tl.cast(stride_lh, tl.int64)
    # the longest (causal) tiles first: reversed tile order keeps the tail of the grid short
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_sh = tl.program_id(1)
    seq = pid_sh // HQ
    h = pid_sh % HQ
    q0 = tl.load(cu_q + seq)
    Lq = tl.load(cu_q + seq + 1) - q0
    if start_m * BLOCK_M >= Lq:
        return
    k0 = tl.load(cu_k + seq)
    Lk = tl.load(cu_k + seq + 1) - k0
    diag = Lk - Lq  # bottom-right alignment
    hk = h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    q_ptrs = Q + (q0 + offs_m[:, None]).to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    kv_base = k0.to(tl.int64) * stride_kt + hk * stride_kh
    k_ptrs = K + kv_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
    v_ptrs = V + kv_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]  # (BLOCK_N, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # key tiles [0, full_end) are visible to every row of this tile and lie inside the sequence
    if CAUSAL:
        first_row_sees = tl.maximum(start_m * BLOCK_M + diag + 1, 0)  # keys 0..first_row_sees-1 seen by all rows
        full_end = tl.minimum(first_row_sees, Lk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum((start_m + 1) * BLOCK_M + diag, 0), Lk)
    else:
        full_end = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, start_n, Lk, diag, stride_kt,
                                  qk_scale, False, CAUSAL, PREC)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, start_n, Lk, diag, stride_kt,
                                  qk_scale, True, CAUSAL, PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2
    o_ptrs = Out + (q0 + offs_m[:, None]).to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + h * stride_lh + q0 + offs_m, lse, mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs get exact fp32 products (ieee), not TF32, so they match an fp32 eager reference; None = default
    return "ieee" if dtype == torch.float32 else None


def seq_bucket(n: int) -> int:
    """Power-of-two bucket of a max sequence length: the autotuning key, so 8K and 60K tokens tune separately."""
    return max(256, triton.next_power_of_2(max(int(n), 1)))


def configs(space: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in space]


def autotuning() -> bool:
    """QLFAST_TRITON_AUTOTUNE=0 launches the first config of each list instead of autotuning (correctness tests: one
    compile per kernel instead of one per config)."""
    return os.environ.get("QLFAST_TRITON_AUTOTUNE", "1") != "0"


def config_dict(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs; configs that do not fit in shared memory are skipped by
# the autotuner. fp32 (ieee dots) has its own small, unpipelined tiles: at the 16-bit tiles Triton 3.6 spills and
# takes 4-57 s per config (ENVIRONMENT.md), and even 64x32 with 2 stages took 23 s here against 5 s for 32x32 with
# 1 stage (docs/perf/proof.md); fp32 attention is a test path, not a training one.
FWD_SPACE = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2),
             (64, 32, 4, 2)]
FWD_SPACE_FP32 = [(32, 32, 4, 1)]
# small unequal tiles in the interpreter: fast there, and they exercise the diagonal and ragged-end logic
INTERPRET_FWD = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
LAST_CONFIG: dict[str, dict] = {}
"""kernel name -> the config of its last launch (the autotuner's pick, or the fixed one), for benchmark rows."""


def fwd_space(dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    return FWD_SPACE_FP32 if dtype == torch.float32 else FWD_SPACE


@functools.cache
def fwd_tuned(fp32: bool):
    space = FWD_SPACE_FP32 if fp32 else FWD_SPACE
    return triton.autotune(configs(space), key=["SEQ_BUCKET", "GROUP", "D", "CAUSAL"])(_flash_fwd_kernel)


def fwd_launch_args(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, causal: bool,
                    softmax_scale: float):
    """(positional args, constexpr kwargs) of _flash_fwd_kernel; q/k/v/out/lse may be shape-only stand-ins (warm-up)."""
    hq, d = q.shape[1], q.shape[2]
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale * LOG2E, seq_bucket(max_seqlen_q),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0))
    consts = dict(HQ=hq, GROUP=hq // k.shape[1], D=d, CAUSAL=causal, PREC=dot_precision(q.dtype))
    return args, consts


def flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                   softmax_scale: float, config: dict | None = None):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D) contiguous -> out (Tq, Hq, D) q's dtype, lse (Hq, Tq) fp32.

    config: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} to force one; default: autotuned over fwd_space(dtype)
    on a GPU (the first of it when QLFAST_TRITON_AUTOTUNE=0), INTERPRET_FWD in the interpreter."""
    tq, hq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    nseq = cu_seqlens_q.numel() - 1
    if tq == 0 or max_seqlen_q == 0:
        return out, lse
    args, consts = fwd_launch_args(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal,
                                   softmax_scale)
    if config is None and not interpreting():
        if autotuning():
            kernel = fwd_tuned(q.dtype == torch.float32)
            grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), nseq * hq)  # noqa: E731
            kernel[grid](*args, **consts)
            LAST_CONFIG["flash_fwd"] = config_dict(kernel.best_config)
            return out, lse
        config = config_dict(configs(fwd_space(q.dtype))[0])
    cfg = dict(config or INTERPRET_FWD)
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), nseq * hq)
    _flash_fwd_kernel[grid](*args, **consts, **cfg)
    LAST_CONFIG["flash_fwd"] = cfg
    return out, lse
