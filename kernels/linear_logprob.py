"""Triton kernels for the fused linear log-prob (the `triton` backend of qlfast.ops.linear_logprob).

z = (h @ W^T) * inv_temp, p = softmax(z), t = target; per row: lse, logprob = z_t - lse, entropy = lse - sum_j p_j z_j.

Forward (Cut Cross-Entropy style, Wijmans et al. 2024, arXiv:2411.09009): one program owns BLOCK_N rows and one
segment of SEG_V vocab columns. It walks the segment in BLOCK_V tiles; each logit tile is a tl.dot over H in BLOCK_K
steps with fp32 accumulation, consumed in registers by an online max / sum-exp (Milakov & Gimelshein 2018) and an
online sum of exp(z - m) * z for the entropy, then dropped. The target logit is written by the one tile that holds
it. Segments are merged afterwards in fp32 (log-sum-exp of the partial (max, sum) pairs).
    Memory contract: extra memory O(N x ceil(V / SEG_V)) fp32 partials (SEG_V = 8192: ~19 floats per row at
    V=152064), plus the O(N) outputs. The (N, V) logits never exist.

Backward: the vocab is walked in chunks of Vc columns. `_dz_kernel` recomputes the (N, Vc) logit chunk tile by tile
from the saved fp32 lse and writes
    dz = inv_temp * (g_lp * ([j = t] - p_j) - g_ent * p_j * (z_j - lse + entropy))
in the input dtype; then dW[chunk] = dz^T @ h is one GEMM over all N rows (fp32 accumulation inside the GEMM, written
once: no low-precision accumulation of dW across chunks, unlike Liger's bf16 dW), and dh_fp32 += dz @ W[chunk].
    Memory contract: extra memory = one dz chunk (<= min(DZ_CHUNK_BYTES = 256 MiB, 1/8 of the (N, V) array in the
    input dtype), >= 256 columns) + the fp32 dh accumulator (N x H x 4)
    + one fp32 dW chunk (Vc x H x 4) for 16-bit inputs. At N=60000, H=5120 that is 0.25 + 1.23 + 0.04 GiB.
The dW / dh GEMMs are cuBLAS (torch.mm) on GPU: they are plain GEMMs with no epilogue, where cuBLAS is at its best.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import INTERPRET

IGNORE_INDEX = -100
SEG_V = 8192  # vocab columns per forward program (a multiple of every BLOCK_V below)
DZ_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _grouped(pid, num_n, num_v, GROUP_N: tl.constexpr):
    """Map a 1-D program id to (row block, column block), GROUP_N row blocks at a time (L2 reuse of W tiles)."""
    per_group = GROUP_N * num_v
    group = pid // per_group
    first_n = group * GROUP_N
    size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    return pid_n, pid_v


@triton.jit
def _logit_tile(H, W, rows_c, cols_c, K, stride_h, stride_w, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h[rows] @ W[cols]^T; rows_c / cols_c are clamped in-range int64 indices."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = H + rows_c[:, None] * stride_h + ks[None, :]  # (BLOCK_N, BLOCK_K)
    b_ptrs = W + cols_c[None, :] * stride_w + ks[:, None]  # (BLOCK_K, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks)[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + ks)[:, None] < K, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


def _config(n, v, k, w, s):
    return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, "GROUP_N": 8}, num_warps=w, num_stages=s)


# 16-bit inputs: H100 bf16 GEMM-shaped tiles (Triton's matmul tutorial: 128x256x64, 8 warps, 3 stages is the best
# Hopper config; it was the autotuner's pick for both kernels on the H100 run of docs/perf/linear_logprob.md).
CONFIGS = [_config(128, 256, 64, 8, 3), _config(128, 256, 64, 8, 4), _config(256, 128, 64, 8, 3),
           _config(256, 128, 64, 8, 4), _config(128, 256, 128, 8, 2), _config(128, 128, 64, 8, 4),
           _config(128, 128, 64, 4, 4)]
# fp32 inputs (ieee dots, a test path): small tiles of their own; at the tiles above Triton 3.6 spills and spends
# 4-57 s compiling each config (ENVIRONMENT.md).
CONFIGS_FP32 = [_config(64, 64, 32, 4, 2)]
# The interpreter runs one fixed small config (autotuning there would take minutes); block dims >= 16 for tl.dot.
_INTERP_META = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 4}
_EVEN_K = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}
LAST_CONFIG: dict[str, dict] = {}
"""kernel name -> the config of its last launch (the autotuner's pick, or the fixed one), for benchmark rows."""


def autotuning() -> bool:
    """QLFAST_TRITON_AUTOTUNE=0 launches the first config of the list instead of autotuning (correctness tests)."""
    return os.environ.get("QLFAST_TRITON_AUTOTUNE", "1") != "0"


def config_dict(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def configs_for(dtype: torch.dtype) -> list[triton.Config]:
    return CONFIGS_FP32 if dtype == torch.float32 else CONFIGS


class _Kernel:
    """One @triton.jit kernel with EVEN_K by heuristic, autotuned per dtype family on a GPU."""

    def __init__(self, name, fn, key):
        self.name, self.fn, self.key = name, triton.heuristics(_EVEN_K)(fn), key
        self._tuned = {}

    def tuned(self, fp32: bool):
        if fp32 not in self._tuned:
            self._tuned[fp32] = triton.autotune(configs=CONFIGS_FP32 if fp32 else CONFIGS, key=self.key)(self.fn)
        return self._tuned[fp32]

    def launch(self, grid, args, consts, dtype, config: dict | None):
        """grid(meta) -> grid; config forces one {BLOCK_N, BLOCK_V, BLOCK_K, GROUP_N, num_warps, num_stages}."""
        if config is None and INTERPRET:
            config = dict(_INTERP_META)
        elif config is None and autotuning():
            kernel = self.tuned(dtype == torch.float32)
            kernel[grid](*args, **consts)
            LAST_CONFIG[self.name] = config_dict(kernel.best_config)
            return
        elif config is None:
            config = config_dict(configs_for(dtype)[0])
        self.fn[grid(config)](*args, **consts, **config)
        LAST_CONFIG[self.name] = dict(config)


# ---------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(H, W, T, PM, PS, PZ, ZT, N, V, K, stride_h, stride_w, inv_temp, n_seg, SEG: tl.constexpr,
                WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    stride_h, stride_w = tl.cast(stride_h, tl.int64), tl.cast(stride_w, tl.int64)  # row x stride in int64
    pid_n, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_seg, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)  # clamped loads stay unmasked; stores are masked
    tgt = tl.load(T + rows_c)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    pz = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_s * SEG
    v_hi = tl.minimum(v_lo + SEG, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols_c = tl.minimum(cols, V - 1).to(tl.int64)
        z = _logit_tile(H, W, rows_c, cols_c, K, stride_h, stride_w, IEEE, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_ok[None, :], z * inv_temp, float("-inf"))  # (BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has >= 1 valid column
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        if WITH_ENTROPY:
            pz = pz * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1)
        m = m_new
        hit = cols[None, :] == tgt[:, None]
        zt = tl.sum(tl.where(hit, z, 0.0), 1)
        tl.store(ZT + rows, zt, mask=row_ok & (tgt >= v0) & (tgt < v0 + BLOCK_V))
    off = pid_s * N + rows
    tl.store(PM + off, m, mask=row_ok)
    tl.store(PS + off, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(PZ + off, pz, mask=row_ok)


FWD = _Kernel("linear_logprob_fwd", _fwd_kernel, key=["K", "V", "WITH_ENTROPY"])


def fwd_launch_args(hidden, weight, targets, pm, ps, pz, zt, inv_temp: float, with_entropy: bool):
    """(args, constexprs, grid) of the forward kernel; tensors may be shape-only stand-ins (warm-up)."""
    n, k = hidden.shape
    vocab = weight.shape[0]
    n_seg = triton.cdiv(vocab, SEG_V)
    args = (hidden, weight, targets, pm, ps, pz, zt, n, vocab, k, hidden.stride(0), weight.stride(0), float(inv_temp),
            n_seg)
    consts = dict(SEG=SEG_V, WITH_ENTROPY=with_entropy, IEEE=hidden.dtype == torch.float32)
    return args, consts, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_seg,)


def linear_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
                       with_entropy: bool, config: dict | None = None):
    """hidden (N, H), weight (V, H) contiguous, same dtype; targets (N,) int64 -> logprob, entropy|None, lse (N,)
    in fp32. config forces one tile config (default: autotuned over configs_for(dtype) on a GPU)."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    n_seg = triton.cdiv(vocab, SEG_V)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    pm, ps = torch.empty(n_seg, n, **f32), torch.empty(n_seg, n, **f32)  # (segments, N) partial max / sum-exp
    pz = torch.empty(n_seg, n, **f32) if with_entropy else ps
    zt = torch.empty(n, **f32)
    args, consts, grid = fwd_launch_args(hidden, weight, targets, pm, ps, pz, zt, inv_temp, with_entropy)
    FWD.launch(grid, args, consts, hidden.dtype, config)
    # merge the segments: lse = M + log sum_s S_s exp(m_s - M); sum p z = sum_s PZ_s exp(m_s - M) / sum-exp
    mx = pm.max(0).values
    scale = torch.exp(pm - mx)
    sumexp = (ps * scale).sum(0)
    lse = mx + torch.log(sumexp)
    valid = targets != IGNORE_INDEX
    logprob = torch.where(valid, zt - lse, 0.0)
    entropy = None
    if with_entropy:
        entropy = torch.where(valid, lse - (pz * scale).sum(0) / sumexp, 0.0)
    return logprob, entropy, lse


# ---------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dz_kernel(H, W, T, LSE, ENT, GLP, GENT, DZ, N, V, K, v_start, vc, stride_h, stride_w, stride_dz, inv_temp,
               HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    stride_h, stride_w, stride_dz = tl.cast(stride_h, tl.int64), tl.cast(stride_w, tl.int64), tl.cast(stride_dz,
                                                                                                      tl.int64)
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(vc, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    lcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # columns within the chunk
    col_ok = lcols < vc
    cols = v_start + lcols
    cols_c = tl.minimum(cols, V - 1).to(tl.int64)
    z = _logit_tile(H, W, rows_c, cols_c, K, stride_h, stride_w, IEEE, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K)
    z = z * inv_temp
    tgt = tl.load(T + rows_c)
    valid = tgt != -100
    lse = tl.load(LSE + rows_c)
    p = tl.exp(z - lse[:, None])  # (BLOCK_N, BLOCK_V)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_GLP:
        g = tl.where(valid, tl.load(GLP + rows_c), 0.0)
        dz += g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        ge = tl.where(valid, tl.load(GENT + rows_c), 0.0)
        ent = tl.load(ENT + rows_c)
        dz -= ge[:, None] * p * (z - lse[:, None] + ent[:, None])
    dz = dz * inv_temp
    ptrs = DZ + rows_c[:, None] * stride_dz + lcols[None, :]
    tl.store(ptrs, dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


DZ = _Kernel("linear_logprob_dz", _dz_kernel, key=["K", "HAS_GLP", "HAS_GENT"])


def dz_launch_args(hidden, weight, targets, lse, ent, glp, gent, dz_buf, v0: int, width: int, inv_temp: float,
                   has_glp: bool, has_gent: bool):
    """(args, constexprs, grid) of the dz kernel for one chunk; tensors may be shape-only stand-ins (warm-up)."""
    n, k = hidden.shape
    args = (hidden, weight, targets, lse, ent, glp, gent, dz_buf, n, weight.shape[0], k, v0, width, hidden.stride(0),
            weight.stride(0), dz_buf.stride(0), float(inv_temp))
    consts = dict(HAS_GLP=has_glp, HAS_GENT=has_gent, IEEE=hidden.dtype == torch.float32)
    return args, consts, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (cuBLAS out_dtype on GPU for 16-bit inputs)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, accumulating in fp32 without a second pass over acc where cuBLAS allows it."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def dz_chunk_cols(n: int, vocab: int, elem_bytes: int, chunk_bytes: int = DZ_CHUNK_BYTES) -> int:
    """Vocab columns per backward chunk: the (N, Vc) dz chunk stays under chunk_bytes and under 1/8 of the full
    (N, V) array, so extra memory stays a small fraction of the logits at every size (Vc a multiple of 256)."""
    chunk_bytes = min(chunk_bytes, n * vocab * elem_bytes // 8)
    cols = chunk_bytes // max(1, n * elem_bytes)
    return max(256, min(triton.cdiv(vocab, 256) * 256, cols // 256 * 256))


def linear_logprob_bwd(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp: float,
                       chunk_bytes: int = DZ_CHUNK_BYTES, config: dict | None = None):
    """-> dhidden (N, H) in hidden's dtype, dweight (V, H) in weight's dtype; both accumulated in fp32. config forces
    one tile config of the dz kernel (default: autotuned over configs_for(dtype) on a GPU)."""
    n, k = hidden.shape
    vocab = weight.shape[0]
    dweight = torch.empty_like(weight)
    if grad_logprob is None and grad_entropy is None:
        return torch.zeros_like(hidden), dweight.zero_()
    glp = grad_logprob.float().contiguous() if grad_logprob is not None else lse
    gent = grad_entropy.float().contiguous() if grad_entropy is not None else lse
    ent = entropy if entropy is not None else lse
    vc = dz_chunk_cols(n, vocab, hidden.element_size(), chunk_bytes)
    dz_buf = torch.empty(n, vc, dtype=hidden.dtype, device=hidden.device)  # (N, Vc)
    dh = torch.zeros(n, k, dtype=torch.float32, device=hidden.device)  # (N, H) fp32 accumulator
    for v0 in range(0, vocab, vc):
        width = min(vc, vocab - v0)
        args, consts, grid = dz_launch_args(hidden, weight, targets, lse, ent, glp, gent, dz_buf, v0, width, inv_temp,
                                            grad_logprob is not None, grad_entropy is not None)
        DZ.launch(grid, args, consts, hidden.dtype, config)
        dz = dz_buf[:, :width]  # (N, width)
        w_chunk = weight[v0:v0 + width]  # (width, H)
        # dW[chunk] = dz^T @ h: the sum over all N rows happens inside one fp32-accumulating GEMM, written once.
        if weight.dtype == torch.float32:
            torch.mm(dz.T, hidden, out=dweight[v0:v0 + width])
        else:
            dweight[v0:v0 + width].copy_(_mm_f32(dz.T, hidden))
        _addmm_f32_(dh, dz, w_chunk)
    return dh.to(hidden.dtype), dweight
