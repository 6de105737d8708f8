"""The KL penalty against a frozen reference policy (qlfast/trainer/reference.py) through the trainer's policy update:
its loss and gradient equal a float64 reference of the KL-penalised objective written from the full logits; no
reference pass runs at kl_coef 0; the reference is the policy as RL starts, also after a resume."""

import random

import pytest
import torch

from qlfast.config import Config, RLConfig
from qlfast.model import QwenForCausalLM
from qlfast.ops.policy_loss import PolicyLossConfig
from qlfast.ref.policy_loss import policy_loss_reference
from qlfast.testing import rel_err
from qlfast.trainer import optim, reference
from qlfast.trainer.comm import Env
from qlfast.trainer.rl_step import Group, policy_update

CFG = dict(model_type="qwen2", vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)
ENV = Env(0, 1, 0, torch.device("cpu"))


def _model(seed=0, dtype=torch.float64, noise=0.0):
    m = QwenForCausalLM.from_config(CFG, seed=0).to(dtype)
    if noise:  # the reference: the policy moved a little, so that the KL and its gradient are not zero
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen, dtype=dtype))
    return m.set_options(attn_backend="sdpa")


def _groups(n=3, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 97) for _ in range(rng.randint(6, 15))]
        resps = [[rng.randrange(1, 97) for _ in range(rng.randint(1, 9))] for _ in range(3)]
        out.append(Group(index=i, uid=str(i), source="s", prompt_ids=prompt, responses=resps,
                         rollout_logprobs=[[-4.6 + 0.3 * rng.random() for _ in r] for r in resps], rewards=[0.0] * 3,
                         shaped=[0.0] * 3, finish=["stop"] * 3, weight_version=0,
                         advantages=[rng.gauss(0, 1) for _ in range(3)]))
    return out


def _update(policy, ref, groups, rl):
    """One policy_update with SGD: returns (metrics, the gradient the optimizer saw by parameter name)."""
    names = [n for n, _ in policy.named_parameters()]
    opt = torch.optim.SGD(list(policy.parameters()), lr=0.0)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update({n: p.grad.clone() for n, p in zip(names, o.param_groups[0]
                                                                                                ["params"])}))
    m = policy_update(policy, opt, optim.schedule(opt, 0), groups, ENV, rl=rl, mini_batches=1,
                      max_response_tokens=16, backend="torch", reference=ref)
    return m, seen


def _objective(policy, ref, groups, rl):
    """The KL-penalised objective from the equations (qlfast.ref.policy_loss, full logits), sequence by sequence,
    in float64: -> (loss, metrics)."""
    hiddens, tgts, advs, rlps, refs, bounds = [], [], [], [], [], [0]
    for g in groups:
        for r, a, lp in zip(g.responses, g.advantages, g.rollout_logprobs):
            ids = torch.tensor(g.prompt_ids + r)
            rows = torch.arange(len(g.prompt_ids) - 1, len(ids) - 1)  # the rows that predict the response
            hiddens.append(policy(ids)[rows])
            with torch.no_grad():
                z = ref(ids)[rows] @ ref.lm_head_weight.T / rl.temperature  # (n, V) full logits
                refs.append(torch.log_softmax(z, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1))
            tgts.append(torch.tensor(r))
            # the trainer packs advantages and rollout log-probs as fp32 inputs: the same values here
            advs.append(torch.full((len(r),), a, dtype=torch.float32).double())
            rlps.append(torch.tensor(lp, dtype=torch.float32).double())
            bounds.append(bounds[-1] + len(r))
    n = bounds[-1]
    cfg = PolicyLossConfig(clip_low=rl.clip_low, clip_high=rl.clip_high, loss_agg=rl.loss_agg, kl_coef=rl.kl_coef,
                           kl_type=rl.kl_type, entropy_coef=rl.entropy_coef, temperature=rl.temperature,
                           tis_cap=rl.tis_cap, global_tokens=float(n))
    return policy_loss_reference(torch.cat(hiddens), policy.lm_head_weight, torch.cat(tgts), torch.cat(advs),
                                 torch.ones(n), cu_seqlens=torch.tensor(bounds), ref_logprob=torch.cat(refs),
                                 rollout_logprob=torch.cat(rlps), config=cfg)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_penalised_loss_and_gradient_equal_a_float64_reference(kl_type):
    groups = _groups()
    # small micro-batches: several reference passes, each on its own micro-batch; packed one by one, because the
    # prompt-shared attention is not float64-exact (5.6e-8 here, kl_coef 0 alike) and would hide a 1e-9 comparison
    rl = RLConfig(kl_coef=0.5, kl_type=kl_type, micro_batch_tokens=40, max_grad_norm=1e9, entropy_coef=0.01,
                  share_prompts=False)
    policy, ref = _model(), _model(seed=1, noise=0.02)
    got, grads = _update(policy, ref, groups, rl)
    loss, want = _objective(_model(), ref, groups, rl)
    loss.backward()
    assert want["kl_loss"].abs() > 1e-4, "the reference equals the policy: the KL term is not tested"
    # metrics come back as fp32 numbers (qlfast.ops.policy_loss rounds them): equal to that precision
    eps = torch.finfo(torch.float32).eps
    for key in ("policy_loss", "kl_loss", "entropy_loss"):
        assert got[key] == pytest.approx(float(want[key]), rel=4 * eps), key
    total = got["policy_loss"] + rl.kl_coef * got["kl_loss"] - rl.entropy_coef * got["entropy_loss"]
    assert total == pytest.approx(loss.item(), rel=8 * eps)
    ref_model = _model()  # the float64 reference objective's gradient
    loss, _ = _objective(ref_model, ref, groups, rl)
    loss.backward()
    ref_grads = dict((n, p.grad) for n, p in ref_model.named_parameters())
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-9, (name, rel_err(g, ref_grads[name]))
    # the KL term matters: without it the gradient is another one
    _, plain = _update(_model(), ref, groups, RLConfig(kl_coef=0.0, micro_batch_tokens=40, max_grad_norm=1e9,
                                                       entropy_coef=0.01, share_prompts=False))
    assert max(rel_err(plain[n], ref_grads[n]) for n in plain) > 1e-3


def _counting(model):
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls


def test_reference_runs_once_per_micro_batch_and_never_at_kl_zero():
    groups = _groups()
    for kl, want_ref in ((0.0, 0), (0.1, None)):
        policy, ref = _model(), _model(seed=1, noise=0.02)
        n_policy, n_ref = _counting(policy), _counting(ref)
        rl = RLConfig(kl_coef=kl, micro_batch_tokens=40)
        _update(policy, ref, groups, rl)
        assert len(n_policy) >= 3  # several micro-batches
        assert len(n_ref) == (len(n_policy) if want_ref is None else want_ref), (kl, len(n_ref), len(n_policy))
    with pytest.raises(ValueError, match="reference"):
        _update(_model(), None, groups, RLConfig(kl_coef=0.1))


def test_reference_is_the_policy_as_rl_started(tmp_path):
    cfg = Config()
    cfg.rl.kl_coef = 0.0
    policy = _model(dtype=torch.float32)
    assert reference.build(policy, cfg, ENV, tmp_path, None, rl_step=0) is None
    assert not (tmp_path / "reference").exists()  # kl_coef 0: nothing written, nothing loaded

    cfg.rl.kl_coef = 0.1
    ref = reference.build(policy, cfg, ENV, tmp_path, None, rl_step=0)
    assert (tmp_path / "reference" / "config.json").exists()
    for (n, p), (_, q) in zip(policy.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q) and not q.requires_grad, n
    with torch.no_grad():  # RL moves the policy; a resumed run must load the reference as it was
        for p in policy.parameters():
            p.add_(0.01)
    again = reference.build(policy, cfg, ENV, tmp_path, None, rl_step=5)
    for (n, p), (_, q) in zip(ref.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(SystemExit, match="missing"):
        reference.build(policy, cfg, ENV, tmp_path / "other", None, rl_step=5)

    cfg.model.path, cfg.sft.steps = str(tmp_path / "reference"), 0  # no SFT: --model.path is the reference
    reference.build(policy, cfg, ENV, tmp_path / "third", None, rl_step=0)
    assert not (tmp_path / "third" / "reference").exists()


def test_reference_is_built_in_the_compute_dtype(tmp_path):
    from qlfast.trainer import precision

    cfg = Config()
    cfg.rl.kl_coef, cfg.model.dtype = 0.1, "bfloat16"
    policy = _model(dtype=torch.float32)
    precision.attach(policy, torch.bfloat16)
    ref = reference.build(policy, cfg, ENV, tmp_path, None, rl_step=0)
    for (n, p), (_, q) in zip(policy.named_parameters(), ref.named_parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(p, q), n
