"""Triton varlen flash-attention backward with GQA (FlashAttention-2, Dao 2023, Alg. 2), no atomics.

Memory contract: scores are recomputed tile by tile from the saved lse; extra memory is delta (Hq, Tq) fp32 only.
out and lse may be the final merged ones of a ring (then P = exp(S - lse) is this block's share of the final
softmax, and delta = rowsum(dO * O_final) is the correct correction term for every block).

Three launches:
  1. delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]                              (fp32)
  2. dK/dV: one program per (BLOCK_N keys, sequence, kv head); it loops over the GROUP query heads that read this
     kv head and over their query tiles, so the GQA reduction happens in registers (no atomics):
        P^T = exp2(K Q^T * scale*log2e - lse*log2e),  dV += P^T dO,  dS^T = P^T * (V dO^T - delta),  dK += dS^T Q
  3. dQ: one program per (BLOCK_M queries, sequence, query head), looping over the key tiles it sees:
        dQ += (P * (dO V^T - delta)) K
Causal masks are bottom-right aligned (query i sees key j iff j <= i + Lk - Lq). Rows with lse = -inf (no key
seen) get P = 0 by treating their lse as +inf.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qlfast.kernels.flash_attention import (
    LAST_CONFIG,
    LOG2E,
    autotuning,
    config_dict,
    configs,
    dot_precision,
    interpreting,
    seq_bucket,
)


@triton.jit
def _delta_kernel(Out, dOut, Delta, T, stride_ot, stride_oh, stride_dt, stride_dh, stride_delta_h,
                  D: tl.constexpr, BLOCK: tl.constexpr):
    stride_ot, stride_dt, stride_delta_h = (tl.cast(stride_ot, tl.int64), tl.cast(stride_dt, tl.int64),
                                            tl.cast(stride_delta_h, tl.int64))
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = rows[:, None] < T
    o = tl.load(Out + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(dOut + rows[:, None].to(tl.int64) * stride_dt + h * stride_dh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h * stride_delta_h + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, Lse, Delta, offs_m, offs_n, start_m, Lq, diag, stride_qt, stride_dt,
               qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    rows = start_m + offs_m
    ok = rows < Lq
    qT = tl.load(q_ptrs + start_m * stride_qt, mask=ok[None, :], other=0.0)  # (D, BLOCK_M)
    do = tl.load(do_ptrs + start_m * stride_dt, mask=ok[:, None], other=0.0)  # (BLOCK_M, D)
    lse = tl.load(Lse + rows, mask=ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + rows, mask=ok, other=0.0)
    pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M)
    if MASKED:
        pT = tl.where(offs_n[:, None] <= rows[None, :] + diag, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, cu_q, cu_k, qk_scale, softmax_scale, SEQ_BUCKET,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh, stride_lh,
                 HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    # row strides in int64: start_m * stride_qt passes 2^31 at 419K tokens x 40 heads x 128 (it was int32)
    stride_qt, stride_kt, stride_dt = tl.cast(stride_qt, tl.int64), tl.cast(stride_kt, tl.int64), tl.cast(stride_dt,
                                                                                                         tl.int64)
    stride_lh = tl.cast(stride_lh, tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    pid_sh = tl.program_id(1)
    seq = pid_sh // HKV
    hk = pid_sh % HKV
    k0 = tl.load(cu_k + seq)
    Lk = tl.load(cu_k + seq + 1) - k0
    if start_n >= Lk:
        return
    q0 = tl.load(cu_q + seq)
    Lq = tl.load(cu_q + seq + 1) - q0
    diag = Lk - Lq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = offs_n[:, None] < Lk
    kv_off = (k0 + offs_n[:, None]).to(tl.int64) * stride_kt + hk * stride_kh + offs_d[None, :]
    k = tl.load(K + kv_off, mask=col_ok, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + kv_off, mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    if CAUSAL:
        # first query row that sees key start_n, and the first one that sees every key of this tile
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full_from = tl.maximum(start_n + BLOCK_N - 1 - diag, 0)
        mask_end = tl.minimum(lo + tl.cdiv(tl.maximum(full_from - lo, 0), BLOCK_M) * BLOCK_M, Lq)
        full_lo = tl.maximum(mask_end, lo)
    else:
        lo = 0
        mask_end = 0
        full_lo = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptrs = Q + q0.to(tl.int64) * stride_qt + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None]
        do_ptrs = dOut + q0.to(tl.int64) * stride_dt + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :]
        lse_h = Lse + h * stride_lh + q0
        delta_h = Delta + h * stride_lh + q0
        for start_m in range(lo, mask_end, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_h, delta_h, offs_m, offs_n, start_m, Lq, diag,
                                stride_qt, stride_dt, qk_scale, True, PREC)
        for start_m in range(full_lo, Lq, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_h, delta_h, offs_m, offs_n, start_m, Lq, diag,
                                stride_qt, stride_dt, qk_scale, False, PREC)

    tl.store(dK + kv_off, (dk * softmax_scale).to(dK.dtype.element_ty), mask=col_ok)
    tl.store(dV + kv_off, dv.to(dV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, offs_m, offs_n, start_n, Lk, diag, stride_kt, qk_scale,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    cols = start_n + offs_n
    if MASKED:
        kT = tl.load(k_ptrs + start_n * stride_kt, mask=cols[None, :] < Lk, other=0.0)  # (D, BLOCK_N)
        vT = tl.load(v_ptrs + start_n * stride_kt, mask=cols[None, :] < Lk, other=0.0)
    else:
        kT = tl.load(k_ptrs + start_n * stride_kt)
        vT = tl.load(v_ptrs + start_n * stride_kt)
    p = tl.math.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - lse2[:, None])  # (BLOCK_M, BLOCK_N)
    if MASKED:
        keep = cols[None, :] < Lk
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, dOut, Lse, Delta, dQ, cu_q, cu_k, qk_scale, softmax_scale, SEQ_BUCKET,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_dt, stride_dh, stride_lh,
               HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    stride_qt, stride_kt, stride_dt = tl.cast(stride_qt, tl.int64), tl.cast(stride_kt, tl.int64), tl.cast(stride_dt,
                                                                                                         tl.int64)
    stride_lh = tl.cast(stride_lh, tl.int64)
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal tiles first
    pid_sh = tl.program_id(1)
    seq = pid_sh // HQ
    h = pid_sh % HQ
    q0 = tl.load(cu_q + seq)
    Lq = tl.load(cu_q + seq + 1) - q0
    if start_m * BLOCK_M >= Lq:
        return
    k0 = tl.load(cu_k + seq)
    Lk = tl.load(cu_k + seq + 1) - k0
    diag = Lk - Lq
    hk = h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    q_off = (q0 + offs_m[:, None]).to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do_off = (q0 + offs_m[:, None]).to(tl.int64) * stride_dt + h * stride_dh + offs_d[None, :]
    do = tl.load(dOut + do_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + h * stride_lh + q0 + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + h * stride_lh + q0 + offs_m, mask=row_ok, other=0.0)
    kv_base = k0.to(tl.int64) * stride_kt + hk * stride_kh
    k_ptrs = K + kv_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
    v_ptrs = V + kv_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, D], tl.float32)

    if CAUSAL:
        first_row_sees = tl.maximum(start_m * BLOCK_M + diag + 1, 0)
        full_end = tl.minimum(first_row_sees, Lk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum((start_m + 1) * BLOCK_M + diag, 0), Lk)
    else:
        full_end = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, offs_m, offs_n, start_n, Lk, diag, stride_kt,
                      qk_scale, False, CAUSAL, PREC)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, offs_m, offs_n, start_n, Lk, diag, stride_kt,
                      qk_scale, True, CAUSAL, PREC)
    tl.store(dQ + q_off, (dq * softmax_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs. dK/dV holds BLOCK_N keys (two fp32 (BLOCK_N, D)
# accumulators) and streams BLOCK_M queries; dQ holds BLOCK_M queries and streams BLOCK_N keys. Over-large configs are
# skipped by the autotuner. fp32 gets small tiles of its own (see kernels/flash_attention.py).
DKDV_SPACE = [(32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3), (16, 64, 4, 3)]
DQ_SPACE = [(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
DKDV_SPACE_FP32 = [(16, 32, 4, 1)]  # 6 s to compile here; 32x32 with 2 stages took 49 s
DQ_SPACE_FP32 = [(32, 32, 4, 1)]  # 7 s; 64x32 with 2 stages took 82 s
INTERPRET_BWD = {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
                 "dq": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}}
_KEY = ["SEQ_BUCKET", "GROUP", "D", "CAUSAL"]


def bwd_spaces(dtype: torch.dtype):
    """(dK/dV space, dQ space) for inputs of this dtype."""
    return (DKDV_SPACE_FP32, DQ_SPACE_FP32) if dtype == torch.float32 else (DKDV_SPACE, DQ_SPACE)


@functools.cache
def bwd_tuned(fp32: bool):
    dkdv, dq = bwd_spaces(torch.float32 if fp32 else torch.bfloat16)
    return (triton.autotune(configs(dkdv), key=_KEY)(_dkdv_kernel), triton.autotune(configs(dq), key=_KEY)(_dq_kernel))


def bwd_launch_args(dout, q, k, v, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                    max_seqlen_k: int, causal: bool, softmax_scale: float):
    """(dK/dV args, dQ args, constexprs) of the two kernels; tensors may be shape-only stand-ins (warm-up)."""
    group, d = q.shape[1] // k.shape[1], q.shape[2]
    common = (softmax_scale * LOG2E, softmax_scale, seq_bucket(max(max_seqlen_q, max_seqlen_k)), q.stride(0),
              q.stride(1), k.stride(0), k.stride(1), dout.stride(0), dout.stride(1), lse.stride(0))
    consts = dict(GROUP=group, D=d, CAUSAL=causal, PREC=dot_precision(q.dtype))
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, *common)
    dq_args = (q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *common)
    return dkdv_args, dq_args, consts


def flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                   causal: bool, softmax_scale: float, config: dict | None = None):
    """All contiguous: dout/out/q (Tq, Hq, D), k/v (Tk, Hkv, D), lse (Hq, Tq) fp32 -> dq, dk, dv (input dtypes).

    config: {"dkdv": {...}, "dq": {...}} tile settings; default autotuned over bwd_spaces(dtype) on a GPU (their first
    configs when QLFAST_TRITON_AUTOTUNE=0), fixed small tiles when interpreting.
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    nseq = cu_seqlens_q.numel() - 1
    if tq == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # every row of every sequence is written by some program (cu_seqlens cover the tokens): no zero fill
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.float().contiguous()
    delta = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    blk = 16 if interpreting() else 64
    _delta_kernel[(triton.cdiv(tq, blk), hq)](out, dout, delta, tq, out.stride(0), out.stride(1), dout.stride(0),
                                              dout.stride(1), delta.stride(0), D=d, BLOCK=blk)
    dkdv_args, dq_args, consts = bwd_launch_args(dout, q, k, v, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, causal, softmax_scale)
    dkdv_grid = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), nseq * hkv)  # noqa: E731
    dq_grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), nseq * hq)  # noqa: E731
    if config is None and not interpreting():
        if autotuning():
            dkdv_kernel, dq_kernel = bwd_tuned(q.dtype == torch.float32)
            dkdv_kernel[dkdv_grid](*dkdv_args, HKV=hkv, **consts)
            dq_kernel[dq_grid](*dq_args, HQ=hq, **consts)
            LAST_CONFIG["flash_bwd_dkdv"] = config_dict(dkdv_kernel.best_config)
            LAST_CONFIG["flash_bwd_dq"] = config_dict(dq_kernel.best_config)
            return dq, dk, dv
        s_dkdv, s_dq = bwd_spaces(q.dtype)
        config = {"dkdv": config_dict(configs(s_dkdv)[0]), "dq": config_dict(configs(s_dq)[0])}
    cfg = config or INTERPRET_BWD
    _dkdv_kernel[dkdv_grid(cfg["dkdv"])](*dkdv_args, HKV=hkv, **consts, **cfg["dkdv"])
    _dq_kernel[dq_grid(cfg["dq"])](*dq_args, HQ=hq, **consts, **cfg["dq"])
    LAST_CONFIG["flash_bwd_dkdv"], LAST_CONFIG["flash_bwd_dq"] = dict(cfg["dkdv"]), dict(cfg["dq"])
    return dq, dk, dv
