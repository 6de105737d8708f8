"""Every autotune config of every Triton kernel computes the right thing, not only the one the tests' fixed-config mode
runs: the autotuner may pick any of them at 60K tokens on the GPU.

The correctness tests elsewhere run one config per kernel (QLFAST_TRITON_AUTOTUNE=0 on the GPU: one compile per
kernel instead of one per config). Here each config of the 16-bit lists (and of the fp32 lists) is forced through the
kernels' `config=` argument at a small shape that still spans several tiles with ragged edges, against float64,
within a small multiple of same-dtype eager torch's error. GPU: bf16 (fp32 for the fp32 lists). CPU: the
interpreter runs every config in fp16 (bf16 dots are wrong there), at smaller sizes.
"""

from __future__ import annotations

import pytest
import torch

from qlfast.kernels import flash_attention as fk
from qlfast.kernels import flash_attention_bwd as bk
from qlfast.kernels import linear_logprob as lk
from qlfast.ref import linear_logprob as ref
from qlfast.ref.attention import naive_attention
from qlfast.testing import assert_close_vs_ref

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
HALF = torch.bfloat16 if GPU else torch.float16
# 16-bit and fp32 lists; on CPU the fp32 lists run in the interpreter too (its dots are exact)
LINEAR_CASES = [(i, HALF) for i in range(len(lk.CONFIGS))] + [(i, torch.float32) for i in range(len(lk.CONFIGS_FP32))]
FWD_CASES = [(i, HALF) for i in range(len(fk.FWD_SPACE))] + [(i, torch.float32) for i in range(len(fk.FWD_SPACE_FP32))]
BWD_CASES = ([(i, j, HALF) for i in range(len(bk.DKDV_SPACE)) for j in (i % len(bk.DQ_SPACE),)]
             + [(0, 0, torch.float32)])


def _cfg(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


@pytest.mark.parametrize("index,dtype", LINEAR_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_linear_logprob_every_config(index, dtype):
    n, h, v = (300, 136, 1300) if GPU else (97, 72, 600)
    cfg = _cfg((lk.CONFIGS if dtype != torch.float32 else lk.CONFIGS_FP32)[index])
    g = torch.Generator().manual_seed(index)
    hidden = torch.randn(n, h, generator=g).to(DEV, dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h ** 0.5).to(DEV, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(DEV)
    targets[::7] = ref.IGNORE_INDEX
    g_lp, g_ent = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    lp, ent, lse = lk.linear_logprob_fwd(hidden, weight, targets, 1 / 0.7, True, config=cfg)
    dh, dw = lk.linear_logprob_bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, 1 / 0.7, config=cfg,
                                   chunk_bytes=n * 512 * dtype.itemsize)  # several vocab chunks, a ragged last one
    h64, w64 = hidden.double(), weight.double()
    lp64, ent64, lse64 = ref.forward(h64, w64, targets, 1 / 0.7, True)
    dh64, dw64 = ref.backward(h64, w64, targets, lse64, ent64, g_lp.double(), g_ent.double(), 1 / 0.7)
    lp_e, ent_e, lse_e = ref.forward(hidden, weight, targets, 1 / 0.7, True)
    dh_e, dw_e = ref.backward(hidden, weight, targets, lse_e, ent_e, g_lp, g_ent, 1 / 0.7)
    floor = 4 * torch.finfo(torch.float32).eps
    for name, x, r, e, f in (("logprob", lp, lp64, lp_e, floor), ("entropy", ent, ent64, ent_e, floor),
                             ("lse", lse, lse64, lse_e, floor), ("dhidden", dh, dh64, dh_e, None),
                             ("dweight", dw, dw64, dw_e, None)):
        assert_close_vs_ref(f"{cfg} {name}", x, r, e, floor=f)


def _attn_inputs(lens, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    mk = lambda h: torch.randn(t, h, d, generator=g).to(DEV, dtype)  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return mk(hq), mk(hkv), mk(hkv), mk(hq), cu


LENS = (1, 200, 77, 300) if GPU else (1, 70, 33)


@pytest.mark.parametrize("index,dtype", FWD_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_flash_forward_every_config(index, dtype):
    space = fk.FWD_SPACE if dtype != torch.float32 else fk.FWD_SPACE_FP32
    cfg = _cfg(fk.configs(space)[index])
    q, k, v, _, cu = _attn_inputs(LENS, 4, 2, 64, dtype, index)
    m = max(LENS)
    out, lse = fk.flash_attn_fwd(q, k, v, cu, cu, m, m, True, 64 ** -0.5, config=cfg)
    o64, l64 = naive_attention(q.double(), k.double(), v.double(), cu, cu, causal=True)
    o_e, l_e = naive_attention(q, k, v, cu, cu, causal=True, upcast=False)
    assert_close_vs_ref(f"{cfg} out", out, o64, o_e)
    assert_close_vs_ref(f"{cfg} lse", lse, l64, l_e.float(), floor=4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("i,j,dtype", BWD_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_flash_backward_every_config(i, j, dtype):
    """dK/dV config i with dQ config j (every dK/dV config once, every dQ config at least once)."""
    dkdv, dq = bk.bwd_spaces(dtype)
    cfg = {"dkdv": _cfg(fk.configs(dkdv)[i]), "dq": _cfg(fk.configs(dq)[j])}
    q, k, v, dout, cu = _attn_inputs(LENS, 4, 2, 64, dtype, 10 + i)
    m = max(LENS)
    out, lse = fk.flash_attn_fwd(q, k, v, cu, cu, m, m, True, 64 ** -0.5)
    grads = bk.flash_attn_bwd(dout, q, k, v, out, lse, cu, cu, m, m, True, 64 ** -0.5, config=cfg)

    def ref_grads(dt, upcast):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, _ = naive_attention(*leaves, cu, cu, causal=True, upcast=upcast)
        return torch.autograd.grad(o, leaves, dout.to(dt))

    for name, g, r, e in zip(("dq", "dk", "dv"), grads, ref_grads(torch.float64, True), ref_grads(dtype, False)):
        assert_close_vs_ref(f"{cfg} {name}", g, r, e)


def test_every_config_is_listed_above():
    """The cases above cover every config of every list (a config added later is tested too)."""
    assert {i for i, d in LINEAR_CASES if d != torch.float32} == set(range(len(lk.CONFIGS)))
    assert {i for i, d in FWD_CASES if d != torch.float32} == set(range(len(fk.FWD_SPACE)))
    assert {i for i, _, d in BWD_CASES if d != torch.float32} == set(range(len(bk.DKDV_SPACE)))
    assert {j for _, j, d in BWD_CASES if d != torch.float32} == set(range(len(bk.DQ_SPACE)))
    assert len(bk.DKDV_SPACE_FP32) == len(bk.DQ_SPACE_FP32) == 1  # the (0, 0) fp32 case covers them
