"""Benchmark: varlen flash attention fwd, bwd and fwd+bwd TFLOP/s (causal half counted), qlfast triton vs SDPA.

GPU (real sizes): one sequence of 8K, 32K, 60K tokens, Hq/Hkv = 40/8 (Qwen 32B) and 28/4 (Qwen 7B), D=128, bf16.
Providers: qlfast-triton, torch SDPA restricted to its flash / cudnn / efficient backend (kv heads repeated beforehand,
outside the timed region, which favours SDPA slightly), flash-attn if installed. CPU: tiny sizes, SDPA math only
next to the interpreted kernel.

FLOPs (FlashAttention's convention): fwd = 4 * sum(L^2) * Hq * D, halved when causal; bwd = 2.5 x fwd (five
matmuls against two); fwd+bwd = 3.5 x fwd.

    pytest bench/test_bench_flash_attention.py                       # harness rows to bench/results/
    python bench/test_bench_flash_attention.py --sweep               # GPU: time tile configs of the kernels
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import pytest
import torch
from harness import bench, real_sizes

from qlfast.ops.flash_attention import flash_attention

ON_GPU = torch.cuda.is_available()
if real_sizes():
    SHAPES = [dict(L=L, Hq=hq, Hkv=hkv, D=128) for L in (8192, 32768, 61440) for hq, hkv in ((40, 8), (28, 4))]
    DTYPE = torch.bfloat16
    PROVIDERS = ["qlfast-triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn"]
else:
    SHAPES = [dict(L=96, Hq=4, Hkv=2, D=64)]
    DTYPE = torch.float16 if ON_GPU else torch.float32
    PROVIDERS = ["qlfast-triton", "sdpa-math"]
MODES = ["fwd", "bwd", "fwd+bwd"]


def fwd_flops(L: int, hq: int, d: int, causal: bool = True) -> float:
    return 4.0 * L * L * hq * d / (2 if causal else 1)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]


def _make_fn(provider: str, q, k, v, cu, L: int):
    """-> a callable computing out (differentiable w.r.t. the leaves q, k, v it closes over) and the leaves."""
    group = q.shape[1] // k.shape[1]
    if provider == "qlfast-triton":
        return (lambda: flash_attention(q, k, v, cu, max_seqlen=L, backend="triton")[0]), (q, k, v)
    if provider == "flash-attn":
        if importlib.util.find_spec("flash_attn") is None or not ON_GPU:
            pytest.skip("flash_attn not installed")
        from flash_attn import flash_attn_varlen_func

        return (lambda: flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)), (q, k, v)
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    # (1, H, L, D) views; kv heads repeated once here, outside the timed region
    qs = q.detach().transpose(0, 1).unsqueeze(0).requires_grad_()
    ks = k.detach().repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).requires_grad_()
    vs = v.detach().repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).requires_grad_()
    backend = _sdpa_backend(provider)

    def fn():
        with sdpa_kernel([backend]):
            return sdpa(qs, ks, vs, is_causal=True)

    return fn, (qs, ks, vs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s['L']}-h{s['Hq']}-{s['Hkv']}-d{s['D']}")
def test_bench_flash_attention(benchmark, shape, provider, mode):
    device = "cuda" if ON_GPU else "cpu"
    L, hq, hkv, d = shape["L"], shape["Hq"], shape["Hkv"], shape["D"]
    torch.manual_seed(0)
    q = torch.randn(L, hq, d, device=device, dtype=DTYPE, requires_grad=True)
    k = torch.randn(L, hkv, d, device=device, dtype=DTYPE, requires_grad=True)
    v = torch.randn(L, hkv, d, device=device, dtype=DTYPE, requires_grad=True)
    cu = torch.tensor([0, L], dtype=torch.int32, device=device)
    fn, leaves = _make_fn(provider, q, k, v, cu, L)
    try:
        out = fn()
    except RuntimeError as e:  # an SDPA backend that does not take this shape/dtype/GPU
        pytest.skip(f"{provider}: {str(e).splitlines()[0][:200]}")
    dout = torch.randn_like(out)
    flops = fwd_flops(L, hq, d)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
    elif mode == "bwd":
        flops *= 2.5

        def run():
            torch.autograd.grad(out, leaves, dout, retain_graph=True)
    else:
        flops *= 3.5

        def run():
            torch.autograd.grad(fn(), leaves, dout)
    bench(benchmark, "flash_attention", provider, {**shape, "dtype": str(DTYPE).split(".")[-1], "causal": True},
          mode, run, flops=flops, warmup=3 if ON_GPU else 1, rep=10 if ON_GPU else 2)


def _sweep():
    """Time tile configs of the forward and backward kernels at one real shape (GPU only); prints TFLOP/s."""
    import triton

    from qlfast.kernels import flash_attention as fk
    from qlfast.kernels import flash_attention_bwd as bk

    L, hq, hkv, d = (int(x) for x in (sys.argv[2:6] if len(sys.argv) >= 6 else (32768, 40, 8, 128)))
    q = torch.randn(L, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(L, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    f = fwd_flops(L, hq, d)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                         (128, 64, 8, 4), (128, 128, 8, 2)]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        with contextlib.suppress(Exception):
            ms = triton.testing.do_bench(lambda cfg=cfg: fk.flash_attn_fwd(q, k, v, cu, cu, L, L, True, scale, cfg))
            print(f"fwd {cfg}: {ms:.3f} ms {f / ms / 1e9:.1f} TFLOP/s", flush=True)
    out, lse = fk.flash_attn_fwd(q, k, v, cu, cu, L, L, True, scale)
    do = torch.randn_like(out)
    for c1, c2 in [((64, 128, 8, 2), (128, 64, 8, 2)), ((32, 128, 4, 3), (128, 32, 4, 3)),
                   ((64, 64, 4, 3), (64, 64, 4, 3)), ((64, 128, 8, 3), (128, 64, 8, 3)),
                   ((32, 64, 4, 3), (64, 32, 4, 3)), ((64, 128, 4, 2), (128, 64, 4, 2))]:
        cfg = {"dkdv": dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c1)),
               "dq": dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c2))}
        try:
            ms = triton.testing.do_bench(
                lambda cfg=cfg: bk.flash_attn_bwd(do, q, k, v, out, lse, cu, cu, L, L, True, scale, cfg))
            print(f"bwd {c1} {c2}: {ms:.3f} ms {2.5 * f / ms / 1e9:.1f} TFLOP/s", flush=True)
        except Exception as e:  # a config that does not fit in shared memory
            print(f"bwd {c1} {c2}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__" and "--sweep" in sys.argv:
    _sweep()
