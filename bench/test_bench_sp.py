"""Ring attention's step pieces on ONE device: a zigzag block's attention (fwd, bwd), its LSE merge, and a local copy
of the kv message, with the modelled link transfer time of that message alongside.

    pytest bench/test_bench_sp.py                      # small sizes on CPU (torch backend), real sizes on a GPU

On one GPU there is no ring to measure, so the overlap is shown as a MODEL: the measured compute time of one ring
step against bench/comm_model.py's transfer time of the bytes that step sends at assumed NVLink / InfiniBand
bandwidths (`extra` fields of each row: step_bytes, xfer_ms_<link>, compute_over_xfer_<link>; > 1 means the
transfer hides behind the compute). Real sizes: 8K tokens per GPU (the 8-GPU, 64K-token anchor), Hq=40, Hkv=8,
D=128, bf16.
"""

import pytest
import torch
from comm_model import LINKS_GBPS
from harness import bench, real_sizes

from qlfast.ops.attn_merge import merge_attn_
from qlfast.ops.flash_attention import flash_attn_varlen_bwd, flash_attn_varlen_fwd

if real_sizes():
    T_LOCAL, HQ, HKV, D, DTYPE = 8192, 40, 8, 128, torch.bfloat16
else:
    T_LOCAL, HQ, HKV, D, DTYPE = 256, 4, 1, 64, torch.float32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "auto"  # triton on CUDA, the torch reference on CPU
SHAPE = {"t_local": T_LOCAL, "hq": HQ, "hkv": HKV, "d": D, "dtype": str(DTYPE).removeprefix("torch.")}


def _inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    half = T_LOCAL // 2
    q = torch.randn(T_LOCAL, HQ, D, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(half, HKV, D, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(half, HKV, D, device=DEVICE, dtype=DTYPE, generator=gen)
    cu_q = torch.tensor([0, T_LOCAL], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, half], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu_q, cu_k


def _extra(compute_ms: float, step_bytes: float) -> dict:
    out = {"model": "transfer times are modelled from assumed link bandwidths, not measured", "step_bytes": step_bytes}
    for link, gbps in LINKS_GBPS.items():
        xfer_ms = step_bytes / (gbps * 1e9) * 1e3
        out[f"xfer_ms_{link}"] = round(xfer_ms, 4)
        out[f"compute_over_xfer_{link}"] = round(compute_ms / xfer_ms, 2)
    return out


def _kv_block_bytes(elem_bytes):
    return 2 * T_LOCAL * HKV * D * elem_bytes


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_ring_step_attention(benchmark, mode):
    """One zigzag step: all T_l local queries vs the T_l/2 keys of the first chunk, unmasked."""
    q, k, v, cu_q, cu_k = _inputs()
    flops = 4 * T_LOCAL * (T_LOCAL // 2) * HQ * D
    if mode == "fwd":
        fn = lambda: flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, T_LOCAL, T_LOCAL // 2, False, None, backend=BACKEND)
        step_bytes = _kv_block_bytes(q.element_size())
    else:
        out, lse = flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, T_LOCAL, T_LOCAL // 2, False, None, backend=BACKEND)
        dout = torch.randn_like(out)
        fn = lambda: flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, T_LOCAL, T_LOCAL // 2, False, None,
                                           backend=BACKEND)
        flops *= 2.5
        step_bytes = _kv_block_bytes(q.element_size()) + _kv_block_bytes(4)  # kv + fp32 dk/dv
    probe = bench(benchmark, "ring_step", BACKEND, SHAPE, mode, fn, flops=flops)
    benchmark.extra_info.update(_extra(probe["median_ms"], step_bytes))


def test_ring_step_merge(benchmark):
    """The LSE merge of a second-half step: T_l/2 rows of (Hq, D) into the fp32 accumulators, by row index."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    out = torch.randn(T_LOCAL, HQ, D, device=DEVICE, generator=gen)
    lse = torch.randn(HQ, T_LOCAL, device=DEVICE, generator=gen)
    rows = torch.arange(T_LOCAL // 2, T_LOCAL, device=DEVICE)
    bo = torch.randn(T_LOCAL // 2, HQ, D, device=DEVICE, generator=gen).to(DTYPE)
    bl = torch.randn(HQ, T_LOCAL // 2, device=DEVICE, generator=gen)
    provider = "triton" if DEVICE == "cuda" else "torch"
    moved = (T_LOCAL // 2) * HQ * (D * (8 + bo.element_size()) + 12)  # read+write out & lse, read the block
    row = bench(benchmark, "ring_step", provider, SHAPE, "merge",
                lambda: merge_attn_(out, lse, bo, bl, rows=rows, backend=provider))
    benchmark.extra_info["GBps"] = round(moved / (row["median_ms"] * 1e-3) / 1e9, 1)


def test_ring_step_kv_copy(benchmark):
    """A device-local copy of one kv message: the memory-traffic floor of posting it, not a link transfer."""
    kv = torch.randn(2, T_LOCAL, HKV, D, device=DEVICE).to(DTYPE)
    buf = torch.empty_like(kv)
    row = bench(benchmark, "ring_step", "torch", SHAPE, "kv_copy", lambda: buf.copy_(kv))
    benchmark.extra_info.update(_extra(row["median_ms"], kv.numel() * kv.element_size()))
