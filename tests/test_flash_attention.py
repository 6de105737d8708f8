"""Varlen flash attention (GQA, lse): the Triton kernels (interpreted on CPU) and the torch backend against a float64
reference; the kernel's error must stay within a small multiple of same-dtype eager attention's error."""

from __future__ import annotations

import pytest
import torch

from qlfast.ops.flash_attention import flash_attention, flash_attn_varlen_bwd, flash_attn_varlen_fwd
from qlfast.ref.attention import naive_attention
from qlfast.testing import assert_close_vs_ref, one_triton_config, poison_

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def _inputs(lens_q, lens_k, hq, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda t, h: torch.randn(t, h, d, generator=g).to(DEV, dtype)  # noqa: E731
    return mk(sum(lens_q), hq), mk(sum(lens_k), hkv), mk(sum(lens_k), hkv), mk(sum(lens_q), hq)


@pytest.fixture
def poisoned_allocs(monkeypatch):
    """Every tensor the kernels allocate starts as NaN, so an element they forget to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison_(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison_(empty_like(*a, **kw)))


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


def _check_vs_reference(lens_q, lens_k, hq, hkv, d, causal, dtype, run, *, mult=4.0):
    """run(q, k, v, dout, cu_q, cu_k) -> (out, lse, dq, dk, dv); checked against float64 and same-dtype eager."""
    q, k, v, dout = _inputs(lens_q, lens_k, hq, hkv, d, dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    got = run(q, k, v, dout, cu_q, cu_k)

    def ref(dt, upcast):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, lse = naive_attention(*leaves, cu_q, cu_k, causal=causal, upcast=upcast)
        return (o, lse, *_grads(o, leaves, dout.to(dt)))

    ref64, eager = ref(torch.float64, True), ref(dtype, False)
    finite = torch.isfinite(ref64[1])
    assert torch.equal(torch.isfinite(got[1]), finite), "lse must be -inf exactly on rows that see no key"
    assert bool((got[1][~finite] == float("-inf")).all())
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, r, e in zip(names, got, ref64, eager):
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert g.dtype == (lse_dtype if name == "lse" else dtype), f"{name} dtype {g.dtype}"
        if name == "lse":
            g, r, e = g[finite], r[finite], e[finite].to(dtype)
        assert_close_vs_ref(name, g, r, e, mult=mult)


def _run_public(backend, causal):
    def run(q, k, v, dout, cu_q, cu_k):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = flash_attention(*leaves, cu_q, causal=causal, backend=backend)
        return (out, lse, *_grads(out, leaves, dout))

    return run


def _run_lowlevel(backend, causal, lens_q, lens_k):
    def run(q, k, v, dout, cu_q, cu_k):
        args = (cu_q, cu_k, max(lens_q), max(lens_k), causal, None)
        out, lse = flash_attn_varlen_fwd(q, k, v, *args, backend=backend)
        return (out, lse, *flash_attn_varlen_bwd(dout, q, k, v, out, lse, *args, backend=backend))

    return run


# ---------------------------------------------------------------- triton kernels (interpreter on CPU)

SMALL = (1, 37, 130)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (7, 1)])
def test_triton_fp16_gqa_grid(poisoned_allocs, hq, hkv, d, causal):
    _check_vs_reference(SMALL, SMALL, hq, hkv, d, causal, torch.float16, _run_public("triton", causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 128), (7, 1, 64)])
def test_triton_fp32(poisoned_allocs, hq, hkv, d, causal):
    _check_vs_reference(SMALL, SMALL, hq, hkv, d, causal, torch.float32, _run_public("triton", causal))


def test_triton_fp32_long_pack(poisoned_allocs):
    """The issue's awkward pack: lengths 1, 97 and 1025 in one batch (small head count: the interpreter is slow)."""
    _check_vs_reference((1, 97, 1025), (1, 97, 1025), 2, 1, 64, True, torch.float32, _run_public("triton", True))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_separate_q_kv_ranges(poisoned_allocs, dtype, causal):
    """Ring-attention blocks: q and kv ranges of different lengths, including Lk < Lq (causal rows that see no key:
    out 0, lse -inf), an empty kv range and an empty q range."""
    lens_q, lens_k = (5, 40, 3, 0, 33), (3, 70, 0, 9, 17)
    _check_vs_reference(lens_q, lens_k, 4, 2, 64, causal, dtype, _run_lowlevel("triton", causal, lens_q, lens_k))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_with_ring_merged_out_and_lse(backend):
    """Split kv in two blocks, merge the partial outputs by their lse, then run each block's backward with the FINAL
    out and lse (what ring attention does): summed dq and concatenated dk, dv equal the full attention's."""
    L, hq, hkv, d, split = 70, 4, 2, 64, 29
    q, k, v, dout = _inputs((L,), (L,), hq, hkv, d, torch.float32, seed=3)
    cu = _cu((L,))
    full = flash_attn_varlen_fwd(q, k, v, cu, cu, L, L, True, None, backend="torch")
    full_grads = flash_attn_varlen_bwd(dout, q, k, v, *full, cu, cu, L, L, True, None, backend="torch")
    s, r = split, L - split
    cu_s, cu_r = _cu((s,)), _cu((r,))
    # three blocks of the causal problem: A = q[:s] x k[:s] causal, B = q[s:] x k[:s] full, C = q[s:] x k[s:] causal
    blocks = {"A": (slice(0, s), slice(0, s), cu_s, cu_s, s, s, True),
              "B": (slice(s, L), slice(0, s), cu_r, cu_s, r, s, False),
              "C": (slice(s, L), slice(s, L), cu_r, cu_r, r, r, True)}
    part = {n: flash_attn_varlen_fwd(q[qs], k[ks], v[ks], cq, ck, mq, mk, c, None, backend=backend)
            for n, (qs, ks, cq, ck, mq, mk, c) in blocks.items()}
    (o_a, l_a), (o_b, l_b), (o_c, l_c) = part["A"], part["B"], part["C"]
    lse_hi = torch.logaddexp(l_b, l_c)  # (Hq, r): the merged log-sum-exp of rows s..L-1
    w_b, w_c = torch.exp(l_b - lse_hi).T[..., None], torch.exp(l_c - lse_hi).T[..., None]
    out = torch.cat([o_a, (o_b.float() * w_b + o_c.float() * w_c).to(q.dtype)])
    lse = torch.cat([l_a, lse_hi], 1)
    assert_close_vs_ref("merged out", out, full[0].double(), full[0], mult=4.0)
    assert_close_vs_ref("merged lse", lse, full[1].double(), full[1], mult=4.0)
    # each block's backward with the FINAL out/lse, then assemble
    grads = {n: flash_attn_varlen_bwd(dout[qs], q[qs], k[ks], v[ks], out[qs], lse[:, qs], cq, ck, mq, mk, c, None,
                                      backend=backend)
             for n, (qs, ks, cq, ck, mq, mk, c) in blocks.items()}
    (dq_a, dk_a, dv_a), (dq_b, dk_b, dv_b), (dq_c, dk_c, dv_c) = grads["A"], grads["B"], grads["C"]
    dq = torch.cat([dq_a, dq_b + dq_c])
    dk = torch.cat([dk_a + dk_b, dk_c])
    dv = torch.cat([dv_a + dv_b, dv_c])
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), full_grads):
        assert_close_vs_ref(name, g, r.double(), r, mult=8.0)


# ---------------------------------------------------------------- torch backend, dispatch, errors

@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_fp32(causal):
    _check_vs_reference((1, 97, 300), (1, 97, 300), 6, 2, 64, causal, torch.float32, _run_public("torch", causal))


def test_torch_backend_separate_ranges_fp64():
    lens_q, lens_k = (5, 40, 3, 0), (3, 70, 0, 9)
    _check_vs_reference(lens_q, lens_k, 4, 1, 128, True, torch.float64, _run_lowlevel("torch", True, lens_q, lens_k))


def test_auto_backend_on_cpu_is_sdpa():
    """On CPU auto is ATen's CPU flash kernel (sdpa) for any head dim, and the reference where sdpa cannot take the
    q/kv ranges (causal with Lq != Lk); both agree with the torch reference."""
    if DEV != "cpu":
        pytest.skip("CPU dispatch")
    for d in (64, 48):
        q, k, v, _ = _inputs((20, 11), (20, 11), 4, 2, d, torch.float32)
        cu = _cu((20, 11))
        auto, sdpa, ref = (flash_attention(q, k, v, cu, backend=b) for b in ("auto", "sdpa", "torch"))
        for a, b, r in zip(auto, sdpa, ref):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    from qlfast.ops.flash_attention import TABLE

    cu_q, cu_k = _cu((5, 9)), _cu((7, 9))
    assert TABLE.resolve("auto", torch.device("cpu"), d=64, cu_q=cu_q, cu_k=cu_k, causal=True) == "torch"
    assert TABLE.resolve("auto", torch.device("cpu"), d=64, cu_q=cu_q, cu_k=cu_k, causal=False) == "sdpa"
    assert TABLE.resolve("auto", torch.device("cuda"), d=64, dtype=torch.bfloat16) in ("triton", "flash_attn")
    assert TABLE.resolve("auto", torch.device("cuda"), d=48, dtype=torch.float32) == "torch"


def test_bad_inputs():
    q, k, v, _ = _inputs((20, 11), (20, 11), 6, 2, 64, torch.float32)
    cu = _cu((20, 11))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        flash_attention(q[:, :5], k, v, cu)
    with pytest.raises(ValueError, match="head dim"):  # the triton kernels' D; auto takes any D (test above)
        flash_attention(q[..., :48], k[..., :48], v[..., :48], cu, backend="triton")
    with pytest.raises(ValueError, match="int32"):
        flash_attention(q, k, v, cu.long())
    with pytest.raises(ValueError, match="from 0 to T=31"):
        flash_attention(q, k, v, _cu((20, 10)))
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attention(q, k, v, torch.tensor([0, 25, 20, 31], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match=r"\(Tk, Hkv, D"):
        flash_attention(q, k, v[:, :1], cu)
    with pytest.raises(ValueError, match="share a floating dtype"):
        flash_attention(q, k.double(), v, cu)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, cu, backend="bogus")
    with pytest.raises(ValueError, match="same number of sequences"):
        flash_attn_varlen_fwd(q, k, v, cu, _cu((31,)), 20, 31, True, None)
    with pytest.raises(ValueError, match=r"lse \(Hq, Tq\)"):
        flash_attn_varlen_bwd(q, q, k, v, q, torch.zeros(31, 6), cu, cu, 20, 20, True, None)


# ---------------------------------------------------------------- GPU: bf16 at longer lengths

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (7, 1, 64), (4, 4, 128)])
def test_gpu_bf16(hq, hkv, d, causal):
    lens = (1, 97, 1025, 3001, 130)
    # bf16 eager rounds scores and probabilities to 8 bits; the kernel keeps them fp32 (3x leaves margin)
    _check_vs_reference(lens, lens, hq, hkv, d, causal, torch.bfloat16, _run_public("triton", causal), mult=3.0)


@pytest.mark.gpu
def test_gpu_bf16_separate_ranges():
    lens_q, lens_k = (500, 4000, 3, 0, 1000), (3000, 700, 0, 9, 1000)
    _check_vs_reference(lens_q, lens_k, 8, 2, 128, True, torch.bfloat16,
                        _run_lowlevel("triton", True, lens_q, lens_k), mult=3.0)


@pytest.mark.gpu
def test_gpu_fp32_matches_fp32_eager():
    lens = (1, 97, 1025)
    _check_vs_reference(lens, lens, 4, 2, 64, True, torch.float32, _run_public("triton", True))
