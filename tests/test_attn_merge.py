"""LSE merge of partial attention (qlfast.ops.attn_merge, kernels/attn_merge.py): merging attention over two halves
of a key set equals attention over all keys (float64 reference); -inf rows; huge lse; subsets of rows."""

import pytest
import torch

from qlfast.ops.attn_merge import merge_attn_
from qlfast.ops.flash_attention import flash_attn_varlen_fwd
from qlfast.ref.attention import naive_attention
from qlfast.testing import assert_close_vs_ref, one_triton_config

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

BACKENDS = ["torch", "triton"]
# the interpreter evaluates both sides of tl.where in numpy: -inf - -inf on masked lanes warns, the result is discarded
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _cu(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _split_keys(lens, gen):
    """Random split point per sequence -> (cu of first parts, cu of second parts, index of first, of second)."""
    cuts = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lens]
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()[:-1]]
    i1 = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, cuts)])
    i2 = torch.cat([torch.arange(s + c, s + n) for s, c, n in zip(starts, cuts, lens)])
    return _cu(cuts), _cu([n - c for n, c in zip(lens, cuts)]), i1, i2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_two_halves_equals_full_attention(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    lens_q, lens_k, hq, hkv, d = [5, 33, 1], [7, 40, 19], 6, 2, 64
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    cu1, cu2, i1, i2 = _split_keys(lens_k, gen)
    mq = max(lens_q)
    o1, l1 = flash_attn_varlen_fwd(q, k[i1], v[i1], cu_q, cu1, mq, max(lens_k), False, None, backend="torch")
    o2, l2 = flash_attn_varlen_fwd(q, k[i2], v[i2], cu_q, cu2, mq, max(lens_k), False, None, backend="torch")
    out, lse = o1.float(), l1.clone()
    merge_attn_(out, lse, o2, l2, backend=backend)

    ref_out, ref_lse = naive_attention(q.double(), k.double(), v.double(), cu_q, cu_k, causal=False)
    eager_out, eager_lse = naive_attention(q, k, v, cu_q, cu_k, causal=False, upcast=False)
    assert_close_vs_ref("out", out.to(dtype), ref_out, eager_out)
    assert_close_vs_ref("lse", lse, ref_lse, eager_lse.float())


def _ref_merge(out, lse, bo, bl):
    """float64 merge by logaddexp (exact, no safety tricks needed in fp64 at these magnitudes)."""
    out, lse, bo, bl = out.double(), lse.double(), bo.double(), bl.double()
    new = torch.logaddexp(lse, bl)
    w_old = torch.where(torch.isneginf(new), 0.0, torch.exp(lse - new)).T[..., None]
    w_new = torch.where(torch.isneginf(new), 0.0, torch.exp(bl - new)).T[..., None]
    return w_old * out + w_new * bo, new


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_neg_inf_rows_and_huge_lse(backend):
    """Rows that saw no keys (-inf, out 0) on either side or both; lse near 3e3 where exp overflows fp32."""
    gen = torch.Generator().manual_seed(1)
    t, h, d = 11, 3, 72
    out = torch.randn(t, h, d, generator=gen)
    bo = torch.randn(t, h, d, generator=gen)
    lse = torch.randn(h, t, generator=gen) * 3 + 3000.0
    bl = torch.randn(h, t, generator=gen) * 3 + 3000.0
    lse[:, 0], out[0] = float("-inf"), 0.0  # accumulator empty
    bl[:, 1], bo[1] = float("-inf"), 0.0  # block empty
    lse[:, 2], out[2], bl[:, 2], bo[2] = float("-inf"), 0.0, float("-inf"), 0.0  # both empty
    lse[1, 3], bl[1, 3] = -5000.0, 5000.0  # one side negligible
    ref_out, ref_lse = _ref_merge(out, lse, bo, bl)
    o, l_ = out.clone(), lse.clone()
    merge_attn_(o, l_, bo, bl, backend=backend)
    assert torch.isfinite(o).all(), "merge produced NaN/inf in out"
    assert not torch.isnan(l_).any(), "merge produced NaN in lse"
    assert torch.isneginf(l_[:, 2]).all() and (o[2] == 0).all()
    torch.testing.assert_close(o[0], bo[0], rtol=0, atol=0)
    torch.testing.assert_close(o[1], out[1], rtol=0, atol=0)
    assert_close_vs_ref("out", o, ref_out, out)  # eager: no merge at all would be far off; bound is the eps floor
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(l_[fin].double(), ref_lse[fin], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_subset_rows(backend):
    """rows=: only the listed accumulator rows change (ring attention's second-half steps)."""
    gen = torch.Generator().manual_seed(2)
    t, h, d = 37, 2, 64
    out, lse = torch.randn(t, h, d, generator=gen), torch.randn(h, t, generator=gen)
    rows = torch.randperm(t, generator=gen)[:13]
    bo, bl = torch.randn(13, h, d, generator=gen).half(), torch.randn(h, 13, generator=gen)
    ref_out, ref_lse = out.double().clone(), lse.double().clone()
    ro, rl = _ref_merge(out[rows], lse[:, rows], bo, bl)
    ref_out[rows], ref_lse[:, rows] = ro, rl
    o, l_ = out.clone(), lse.clone()
    merge_attn_(o, l_, bo, bl, rows=rows, backend=backend)
    keep = torch.ones(t, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(o[keep], out[keep]) and torch.equal(l_[:, keep], lse[:, keep])
    torch.testing.assert_close(o.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_.double(), ref_lse, rtol=1e-6, atol=1e-6)


def test_merge_fp64_torch_backend():
    gen = torch.Generator().manual_seed(3)
    out, lse = torch.randn(9, 2, 64, dtype=torch.float64, generator=gen), torch.randn(2, 9, dtype=torch.float64,
                                                                                      generator=gen)
    bo, bl = torch.randn(9, 2, 64, dtype=torch.float64, generator=gen), torch.randn(2, 9, generator=gen)
    ref_out, ref_lse = _ref_merge(out, lse, bo, bl)
    merge_attn_(out, lse, bo, bl)
    torch.testing.assert_close(out, ref_out, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-13, atol=1e-13)


def test_merge_errors():
    out, lse = torch.zeros(4, 2, 8), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"lse \(H, T\)"):
        merge_attn_(out, torch.zeros(4, 2), out, lse)
    with pytest.raises(ValueError, match=r"block_out must be \(n, H, D\)"):
        merge_attn_(out, lse, torch.zeros(3, 2, 8), lse)
    with pytest.raises(ValueError, match="fp32"):
        merge_attn_(out.half(), lse.half(), out, lse)
    with pytest.raises(ValueError, match="fp32"):
        merge_attn_(out.double(), lse.double(), out, lse, backend="triton")


@pytest.mark.gpu
def test_merge_triton_bf16_gpu():
    gen = torch.Generator(device="cuda").manual_seed(4)
    t, hq, hkv, d = 1500, 8, 2, 128
    q = torch.randn(t, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(2 * t, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(2 * t, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    cu, cu_k = _cu([t], "cuda"), _cu([2 * t], "cuda")
    cu_half = _cu([t], "cuda")
    o1, l1 = flash_attn_varlen_fwd(q, k[:t], v[:t], cu, cu_half, t, t, False, None, backend="torch")
    o2, l2 = flash_attn_varlen_fwd(q, k[t:], v[t:], cu, cu_half, t, t, False, None, backend="torch")
    out, lse = o1.float(), l1.float().clone()
    merge_attn_(out, lse, o2, l2, backend="triton")
    ref_out, ref_lse = naive_attention(q.double(), k.double(), v.double(), cu, cu_k, causal=False)
    eager_out, eager_lse = naive_attention(q, k, v, cu, cu_k, causal=False, upcast=False)
    assert_close_vs_ref("out", out.bfloat16(), ref_out, eager_out)
    assert_close_vs_ref("lse", lse, ref_lse, eager_lse.float())
