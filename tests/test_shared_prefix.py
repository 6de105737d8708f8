"""Prompt-shared packing: the `sdpa` varlen backend, shared_prefix_attention against a float64 dense-mask
reference, the packed layout, and the model + policy loss with shared prompts equal to packing one by one."""

from __future__ import annotations

import pytest
import torch

from qlfast.model import QwenForCausalLM
from qlfast.ops import PolicyLossConfig, SharedPrefix, policy_loss, shared_prefix_attention
from qlfast.ops.flash_attention import flash_attn_varlen_bwd, flash_attn_varlen_fwd
from qlfast.ref.attention import naive_attention
from qlfast.testing import assert_close_vs_ref, one_triton_config, rel_err
from qlfast.trainer.packing import pack, split_by_tokens

_one_config = one_triton_config()  # one autotune config per kernel on a GPU


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _qkvd(t, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(t, h, d, generator=g).to(dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv), mk(hq)


# ------------------------------------------------------------------------- the sdpa backend of flash_attention


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_varlen_backend_against_reference(causal, dtype):
    """Buckets of very different lengths (1 .. 300), GQA 8/2, D=32 (a head dim only this backend takes); non-causal
    with kv lengths unlike the q lengths, so pad keys must be masked."""
    lens_q = (1, 97, 300, 40, 41)
    lens_k = lens_q if causal else (5, 3, 200, 41, 1)
    q, _, _, dout = _qkvd(sum(lens_q), 8, 2, 32, dtype)
    _, k, v, _ = _qkvd(sum(lens_k), 8, 2, 32, dtype, seed=1)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), causal, None)
    out, lse = flash_attn_varlen_fwd(q, k, v, *args, backend="sdpa")
    got = (out, lse, *flash_attn_varlen_bwd(dout, q, k, v, out, lse, *args, backend="sdpa"))

    def ref(dt, upcast):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, lse_ = naive_attention(*leaves, cu_q, cu_k, causal=causal, upcast=upcast)
        return (o, lse_, *torch.autograd.grad(o, leaves, dout.to(dt)))

    ref64, eager = ref(torch.float64, True), ref(dtype, False)
    for name, g, r, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, eager):
        assert_close_vs_ref(name, g, r, e.to(g.dtype), mult=4.0)


def test_sdpa_backend_rejects_what_it_cannot_do():
    q, k, v, _ = _qkvd(10, 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="Lq == Lk when causal"):
        flash_attn_varlen_fwd(q, k[:8], v[:8], _cu((10,)), _cu((8,)), 10, 8, True, None, backend="sdpa")
    with pytest.raises(ValueError, match="head dim"):  # the triton kernels' D (the torch reference takes any D)
        flash_attn_varlen_fwd(q, k, v, _cu((10,)), _cu((10,)), 10, 10, True, None, backend="triton")


# ------------------------------------------------------------------------------------ shared_prefix_attention

# two groups: prompt 13 with responses 5, 1, 7; prompt 20 with responses 3, 9, 1
SEGMENTS = (13, 5, 1, 7, 20, 3, 9, 1)
GROUPS, PROMPTS = (0, 26, 59), (13, 20)


def _dense_reference(q, k, v, cu, group_bounds, prefix_lens, scale):
    """Materialised (T, T) mask: causal within a segment, plus every response token sees its group's whole prompt."""
    t, dev = q.shape[0], q.device
    bounds = cu.tolist()
    seg = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff()).to(dev)
    grp = torch.zeros(t, dtype=torch.long, device=dev)
    is_prompt = torch.zeros(t, dtype=torch.bool, device=dev)
    for g, p in enumerate(prefix_lens):
        grp[group_bounds[g]:group_bounds[g + 1]] = g
        is_prompt[group_bounds[g]:group_bounds[g] + p] = True
    i = torch.arange(t, device=dev)
    allowed = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    allowed |= ~is_prompt[:, None] & is_prompt[None, :] & (grp[:, None] == grp[None, :])
    rep = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(rep, 1)) * scale
    p = torch.softmax(s.masked_fill(~allowed[None], float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v.repeat_interleave(rep, 1))


@pytest.mark.parametrize("backend,d,dtype", [("sdpa", 32, torch.float32), ("sdpa", 32, torch.float64),
                                             ("torch", 64, torch.float32), ("triton", 64, torch.float32),
                                             ("triton", 64, torch.float16)])
def test_shared_prefix_attention_against_dense_reference(backend, d, dtype):
    cu = _cu(SEGMENTS)
    layout = SharedPrefix.build(GROUPS, PROMPTS)
    q, k, v, dout = _qkvd(cu[-1].item(), 4, 2, d, dtype, seed=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = shared_prefix_attention(*leaves, cu, layout, softmax_scale=0.3, backend=backend)
    got = (out, *torch.autograd.grad(out, leaves, dout))

    def ref(dt):
        lv = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = _dense_reference(*lv, cu, GROUPS, PROMPTS, 0.3)
        return (o, *torch.autograd.grad(o, lv, dout.to(dt)))

    ref64, eager = ref(torch.float64), ref(dtype)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref64, eager):
        assert_close_vs_ref(name, g, r, e, mult=4.0)
    assert lse.shape == (4, q.shape[0]) and bool(torch.isfinite(lse).all())


def test_shared_prefix_layout_errors():
    with pytest.raises(ValueError, match="0 < prompt <= group"):
        SharedPrefix.build([0, 5], [6])
    q, k, v, _ = _qkvd(59, 2, 2, 32, torch.float32)
    layout = SharedPrefix.build(GROUPS, PROMPTS)
    with pytest.raises(ValueError, match="segment boundary"):  # the prompt end 13 is not a segment boundary
        shared_prefix_attention(q, k, v, _cu((18, 1, 7, 20, 3, 9, 1)), layout)


# ----------------------------------------------------------------------------------------------- the packing


def test_pack_one_by_one_layout():
    b = pack([[1, 2, 3], [4, 5]], [[6, 7], [8]], advantages=[0.5, -1.0], rollout_logprobs=[[-0.1, -0.2], [-0.3]])
    assert b.input_ids.tolist() == [1, 2, 3, 6, 7, 4, 5, 8]
    assert b.cu_seqlens.tolist() == [0, 5, 8] and b.cu_seqlens.dtype == torch.int32 and b.prefix is None
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # row t predicts token t+1: rows 2, 3 predict 6, 7; row 6 predicts 8
    assert b.rows.tolist() == [2, 3, 6] and b.targets.tolist() == [6, 7, 8]
    assert b.cu_rows.tolist() == [0, 2, 3]
    assert b.advantages.tolist() == [0.5, 0.5, -1.0]
    assert torch.allclose(b.rollout_logprob, torch.tensor([-0.1, -0.2, -0.3]))
    with pytest.raises(ValueError, match="rollout log-probs"):
        pack([[1, 2]], [[3, 4]], rollout_logprobs=[[-0.1]])
    with pytest.raises(ValueError, match="empty response"):
        pack([[1, 2]], [[]])


def test_pack_shared_layout():
    p, q = [1, 2, 3], [9, 8]
    b = pack([p, p, q], [[6, 7], [5], [4, 4, 4]], advantages=[0.5, -1.0, 2.0], share_prompts=True)
    assert b.input_ids.tolist() == [1, 2, 3, 6, 7, 5, 9, 8, 4, 4, 4]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 11]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]  # responses continue from their prompt
    # the prompt's last row (2) predicts the first token of both responses of group 0
    assert b.rows.tolist() == [2, 3, 2, 7, 8, 9] and b.targets.tolist() == [6, 7, 5, 4, 4, 4]
    assert b.cu_rows.tolist() == [0, 2, 3, 6] and b.advantages.tolist() == [0.5, 0.5, -1.0, 2, 2, 2]
    assert b.prefix.q_rows.tolist() == [3, 4, 5, 8, 9, 10] and b.prefix.kv_rows.tolist() == [0, 1, 2, 6, 7]


def test_split_by_tokens_keeps_order_and_budget():
    ps, rs = [[0] * 2, [0] * 2, [0] * 2, [0] * 8, [0]], [[1], [1], [1], [1, 1], [1]]
    assert split_by_tokens(ps, rs, 6) == [[0, 1], [2], [3], [4]]
    assert split_by_tokens([], [], 6) == []
    p = [7] * 4  # one prompt shared by four responses of 1 token: 4 + 1 + 1 + 1 + 1 = 8 tokens
    assert split_by_tokens([p] * 4, [[1]] * 4, 8, share_prompts=True) == [[0, 1, 2, 3]]
    assert split_by_tokens([p] * 4, [[1]] * 4, 7, share_prompts=True) == [[0, 1, 2], [3]]


# ------------------------------------------------------------------- the model and the loss, shared vs not


def _tiny_model():
    cfg = dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
               rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0)
    model = QwenForCausalLM.from_config(cfg, seed=0).double()
    model.set_options(attn_backend="sdpa")
    return model


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_shared_prompt_packing_equals_one_by_one(loss_agg):
    """Two GRPO groups (prompts 31 and 12 tokens, 3 and 2 responses): the policy loss, its metrics and every
    parameter gradient are the same packed one by one and packed with shared prompts (float64)."""
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    p0, p1 = ids(31), ids(12)
    prompts = [p0, p0, p0, p1, p1]
    responses = [ids(n) for n in (7, 1, 12, 5, 9)]
    adv = [0.7, -1.1, 0.4, 1.3, -1.3]
    lps = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    model = _tiny_model()
    cfg = PolicyLossConfig(loss_agg=loss_agg, tis_cap=2.0, global_tokens=34.0, global_seqs=5.0)

    def run(share):
        b = pack(prompts, responses, advantages=adv, rollout_logprobs=lps, share_prompts=share)
        model.zero_grad(set_to_none=True)
        h = model(b.input_ids, b.position_ids, b.cu_seqlens, prefix=b.prefix).index_select(0, b.rows)
        loss, m = policy_loss(h, model.lm_head_weight, b.targets, b.advantages.double(),
                              torch.ones_like(b.advantages), cu_seqlens=b.cu_rows,
                              rollout_logprob=b.rollout_logprob.double(), config=cfg, backend="torch")
        loss.backward()
        return b.num_tokens, loss.detach(), m, {n: p.grad.clone() for n, p in model.named_parameters()}

    n_one, loss_one, m_one, g_one = run(False)
    n_shared, loss_shared, m_shared, g_shared = run(True)
    assert n_shared == 31 + 12 + 34 < n_one == 3 * 31 + 2 * 12 + 34
    torch.testing.assert_close(loss_shared, loss_one, rtol=1e-12, atol=1e-14)
    for name in ("policy_loss", "ratio_mean", "rollout_logprob_diff", "clip_frac_high"):
        torch.testing.assert_close(m_shared[name].double(), m_one[name].double(), rtol=1e-6, atol=1e-9)
    for name, grad in g_one.items():
        assert grad.abs().sum() > 0, f"{name}: zero gradient"
        # 1e-6, not fp64 rounding: RMSNorm normalises in fp32 (as HF's does) even in a float64 model, so the gradient
        # of each of the G prompt copies is rounded to fp32 before they add up (shared: added, then rounded)
        assert rel_err(g_shared[name], grad) < 1e-6, f"{name}: rel err {rel_err(g_shared[name], grad):.2e}"


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_policy_update_same_with_and_without_shared_prompts(mini_batches):
    """The trainer's policy update (rl_step.policy_update, world of one) reports the same loss and grad norm and makes
    the same update with rl.share_prompts on and off; with 2 mini-batches the second update also uses old log-probs
    and the micro-batch budget splits a group."""
    import copy

    from qlfast.config import RLConfig
    from qlfast.trainer import comm, optim, rl_step

    g = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for i, plen in enumerate((23, 9, 17)):
        rs = [ids(n) for n in (4, 11, 1, 6)]
        groups.append(rl_step.Group(index=i, uid=str(i), source="s", prompt_ids=ids(plen), responses=rs,
                                    rollout_logprobs=[(-torch.rand(len(r), generator=g)).tolist() for r in rs],
                                    rewards=[0.0] * 4, shaped=[1.0, 0.0, 0.5, 0.0], finish=["stop"] * 4,
                                    weight_version=0))
    rl_step.add_advantages(groups, 4, True)
    env = comm.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    base = _tiny_model()
    results = {}
    for share in (False, True):
        model = copy.deepcopy(base)
        opt = optim.adamw(model, 1e-3, 0.0)
        sched = optim.schedule(opt, 0)
        rl = RLConfig(share_prompts=share, micro_batch_tokens=40, clip_high=0.28, tis_cap=2.0)
        m = rl_step.policy_update(model, opt, sched, groups, env, rl=rl, mini_batches=mini_batches,
                                  max_response_tokens=16, backend="torch")
        results[share] = (m, {n: p.detach().clone() for n, p in model.named_parameters()})
    (m0, p0), (m1, p1) = results[False], results[True]
    assert m0["finite"] and m1["finite"]
    assert m0["num_tokens"] == 3 * (4 + 11 + 1 + 6)  # the step's response tokens, whatever the mini-batches
    for key in ("policy_loss", "grad_norm", "num_tokens", "clip_frac_high"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-6, abs=1e-9), key
    start = base.state_dict()
    for n in p0:  # the updates themselves, not the parameters, must agree
        d0, d1 = p0[n] - start[n], p1[n] - start[n]
        assert d0.abs().sum() > 0, f"{n}: not updated, the comparison is vacuous"
        # the gradients agree to ~3e-8 (fp32 RMSNorm rounding, see above); AdamW's g / sqrt(v) enlarges that
        # relative difference on elements whose gradient is tiny, hence 1e-5 on the update
        assert rel_err(d1, d0) < 1e-5, f"{n}: update rel err {rel_err(d1, d0):.2e}"


@pytest.mark.parametrize("opts", [dict(checkpoint=True), dict(checkpoint=True, offload=True, tiled_mlp=True,
                                                               mlp_tile_tokens=7)])
def test_shared_prompt_packing_under_memory_options(opts):
    """Checkpointing, offload and the tiled MLP carry the shared-prompt layout through recomputation unchanged."""
    from qlfast.ops.linear_logprob import linear_logprob

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    p = ids(30)
    b = pack([p, p, p], [ids(5), ids(9), ids(2)], share_prompts=True)

    def grads(**options):
        model = _tiny_model().set_options(**options)
        h = model(b.input_ids, b.position_ids, b.cu_seqlens, prefix=b.prefix).index_select(0, b.rows)
        linear_logprob(h, model.lm_head_weight, b.targets).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    base, got = grads(), grads(**opts)
    assert rel_err(got, base) < 1e-6  # the tiled MLP sums weight gradients tile by tile (fp32 RMSNorm, see above)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_shared_prefix_attention_bf16(backend):
    """On a GPU at less toy sizes: two groups (prompts 1500 and 700 tokens, responses of 1 to 300), GQA 8/2, D=128,
    bf16 through the Triton kernels, against the float64 dense reference; error within 4x of bf16 eager."""
    segments = (1500, 300, 1, 129, 64, 700, 257, 33)
    groups, prompts = (0, 1994, 2984), (1500, 700)
    cu = _cu(segments).cuda()
    layout = SharedPrefix.build(groups, prompts)
    q, k, v, dout = (t.cuda() for t in _qkvd(int(cu[-1]), 8, 2, 128, torch.bfloat16, seed=4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = shared_prefix_attention(*leaves, cu, layout, backend=backend)
    got = (out, *torch.autograd.grad(out, leaves, dout))

    def ref(dt):
        lv = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = _dense_reference(*lv, cu, groups, prompts, 128 ** -0.5)
        return (o, *torch.autograd.grad(o, lv, dout.to(dt)))

    ref64, eager = ref(torch.float64), ref(torch.bfloat16)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref64, eager):
        assert_close_vs_ref(name, g, r, e, mult=4.0)
