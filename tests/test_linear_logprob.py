"""qlfast.ops.linear_logprob: triton (interpreter on CPU) and torch backends against a float64 reference.

Each error is bounded by a small multiple of the error of naive eager torch (full logits, autograd) in the same dtype.
"""

import pytest
import torch

from qlfast.kernels import linear_logprob as tri
from qlfast.ops.linear_logprob import IGNORE_INDEX, linear_logprob, linear_logprob_with_lse
from qlfast.ref import linear_logprob as ref
from qlfast.ref.linear_logprob import naive_linear_logprob
from qlfast.testing import assert_close_vs_ref, one_triton_config, poison_

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

N, H = 97, 72


@pytest.fixture
def poison_alloc(monkeypatch):
    """Every torch.empty / empty_like during the test returns poisoned memory, so an unwritten element fails."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))


def _inputs(n, h, v, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (1.5 / h**0.5)  # logits with a spread like a trained LM head
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::9] = IGNORE_INDEX
    targets[1] = v - 1  # the ragged last vocab tile holds a target
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    to = lambda x: x.to(device)
    return to(hidden.to(dtype)), to(weight.to(dtype)), to(targets), to(g_lp), to(g_ent)


def _run(fn, hidden, weight, targets, g_lp, g_ent, temperature, with_entropy):
    """-> (logprob, entropy|None, dhidden, dweight) for a loss sum(g_lp * logprob) + sum(g_ent * entropy)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = fn(h, w, targets, temperature, with_entropy)
    lp, ent = out if with_entropy else (out, None)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
    loss.backward()
    return lp.detach(), (ent.detach() if with_entropy else None), h.grad, w.grad


def _check(backend, v, dtype, temperature, with_entropy, device="cpu", n=N, h=H, mult=4.0):
    hidden, weight, targets, g_lp, g_ent = _inputs(n, h, v, dtype, device)
    api = lambda a, b, t, temp, e: linear_logprob(a, b, t, temperature=temp, return_entropy=e, backend=backend)
    naive = lambda a, b, t, temp, e: naive_linear_logprob(a, b, t, temp, e)
    got = _run(api, hidden, weight, targets, g_lp, g_ent, temperature, with_entropy)
    ref = _run(naive, hidden.double(), weight.double(), targets, g_lp.double(), g_ent.double(), temperature,
               with_entropy)
    eager = _run(naive, hidden, weight, targets, g_lp, g_ent, temperature, with_entropy)
    assert got[0].dtype == torch.float32 and got[0].shape == (n,)
    for name, x, r, e in zip(("logprob", "entropy", "dhidden", "dweight"), got, ref, eager):
        if r is None:
            assert x is None
            continue
        if name in ("dhidden", "dweight"):
            assert x.dtype == dtype
        assert_close_vs_ref(f"{backend} {dtype} V={v} T={temperature} {name}", x, r, e, mult=mult)
    ignored = targets == IGNORE_INDEX
    assert (got[0][ignored] == 0).all() and (got[2][ignored] == 0).all()
    if with_entropy:
        assert (got[1][ignored] == 0).all()


CASES = [  # (V, dtype, temperature, entropy): awkward vocab sizes, both dtypes, T != 1, entropy on and off
    (1000, torch.float32, 0.7, True),
    (1003, torch.float32, 1.0, False),
    (1003, torch.float16, 0.7, True),
    (1000, torch.float16, 1.0, False),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("v,dtype,temperature,with_entropy", CASES)
def test_matches_float64_reference(backend, v, dtype, temperature, with_entropy, poison_alloc):
    _check(backend, v, dtype, temperature, with_entropy)


def test_triton_backward_over_several_vocab_chunks():
    # a small chunk budget forces several backward chunks and a ragged last one
    hidden, weight, targets, g_lp, g_ent = _inputs(N, H, 1003, torch.float32)
    lp, ent, lse = tri.linear_logprob_fwd(hidden, weight, targets, 1 / 0.7, True)
    dh, dw = tri.linear_logprob_bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, 1 / 0.7, chunk_bytes=N * 256 * 4)
    assert tri.dz_chunk_cols(N, 1003, 4, N * 256 * 4) == 256
    lp64, ent64, lse64 = ref.forward(hidden.double(), weight.double(), targets, 1 / 0.7, True)
    dh64, dw64 = ref.backward(hidden.double(), weight.double(), targets, lse64, ent64, g_lp.double(), g_ent.double(),
                              1 / 0.7)
    for name, x, r in (("lse", lse, lse64), ("dh", dh, dh64), ("dw", dw, dw64)):
        err = ((x.double() - r).norm() / r.norm()).item()
        assert err < 1e-5, f"{name}: {err}"


def test_entropy_only_gradient_and_lse():
    # only entropy receives a gradient (grad_logprob is None inside backward); lse equals the float64 logsumexp
    hidden, weight, targets, _, g_ent = _inputs(N, H, 1003, torch.float32)
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_(True)
        lp, ent, lse = linear_logprob_with_lse(h, weight, targets, temperature=0.7, return_entropy=True,
                                               backend=backend)
        (ent * g_ent).sum().backward()
        z64 = hidden.double() @ weight.double().T / 0.7
        assert torch.allclose(lse.double(), torch.logsumexp(z64, -1), atol=1e-5, rtol=0)
        h64 = hidden.double().requires_grad_(True)
        _, ent64 = naive_linear_logprob(h64, weight.double(), targets, 0.7, True)
        (ent64 * g_ent.double()).sum().backward()
        err = ((h.grad.double() - h64.grad).norm() / h64.grad.norm()).item()
        assert err < 1e-5, f"{backend}: dhidden from entropy only, rel err {err}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    hidden = torch.randn(0, H, requires_grad=True)
    weight = torch.randn(50, H, requires_grad=True)
    lp, ent = linear_logprob(hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True, backend=backend)
    assert lp.shape == (0,) and ent.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, H) and (weight.grad == 0).all()


@pytest.mark.parametrize(
    "hidden_shape,weight_shape,targets,match",
    [
        ((5, 8), (11, 9), torch.zeros(5, dtype=torch.long), r"weight must be \(V, H\) = \(V, 8\)"),
        ((5, 8), (11, 8), torch.zeros(5), "targets must be int64"),
        ((5, 8), (11, 8), torch.tensor([0, 1, 11, 2, 3]), r"targets\[2\] = 11 is outside \[0, V=11\)"),
        ((5, 8), (11, 8), torch.tensor([0, 1, -1, 2, 3]), r"targets\[2\] = -1"),
        ((5, 8), (11, 8), torch.zeros(4, dtype=torch.long), r"targets must be \(N,\) = \(5,\)"),
        ((5, 8), (11, 8), torch.zeros(5, 1, dtype=torch.long), r"targets must be \(N,\) = \(5,\)"),
        ((2, 5, 8), (11, 8), torch.zeros(5, dtype=torch.long), r"hidden must be \(N, H\)"),
    ],
)
def test_bad_input_raises(hidden_shape, weight_shape, targets, match):
    with pytest.raises(ValueError, match=match):
        linear_logprob(torch.randn(hidden_shape), torch.randn(weight_shape), targets, backend="torch")


def test_bad_dtype_temperature_backend():
    h, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="share a floating dtype"):
        linear_logprob(h, w.double(), t)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        linear_logprob(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_logprob(h, w, t, backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_logprob(h, w, t, backend="cuda")


def test_auto_rule_prefers_measured_triton_over_unmeasured_cuda(monkeypatch):
    """auto on CUDA tensors is triton even when qlfast._C is built: the cuda backend goes ahead only once a GPU row
    shows it faster (qlfast.ops._dispatch); on CPU it is the torch reference; an explicit backend says why it cannot
    run."""
    from qlfast.ops import _dispatch
    from qlfast.ops.linear_logprob import TABLE

    monkeypatch.setattr(_dispatch, "has_cuda_op", lambda name: True)
    assert TABLE.resolve("auto", torch.device("cuda")) == "triton"
    assert TABLE.resolve("cuda", torch.device("cuda")) == "cuda"
    assert TABLE.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(_dispatch, "has_cuda_op", lambda name: False)
    with pytest.raises(ValueError, match="qlfast._C extension"):
        TABLE.resolve("cuda", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("v,temperature,with_entropy", [(5003, 0.7, True), (32003, 1.0, False)])
def test_gpu_bf16_matches_float64_reference(backend, v, temperature, with_entropy, poison_alloc):
    _check(backend, v, torch.bfloat16, temperature, with_entropy, device="cuda", n=1000, h=512)


@pytest.mark.gpu
def test_gpu_fp32_multi_chunk_matches_float64_reference():
    _check("triton", 3001, torch.float32, 0.7, True, device="cuda", n=777, h=264)
