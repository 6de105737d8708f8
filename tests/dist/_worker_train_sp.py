"""torchrun worker for tests/dist/test_train_sp.py (2 ranks, gloo, fp32 tiny Qwen2, no rollout engine): the trainer's
policy update (two mini-batches, so the behaviour log-probs pass runs too) and SFT step under sequence parallel
(sp=2: ring, Ulysses, ring + FSDP2) give the replicated data-parallel run's metrics and weight changes, in the
loss_agg modes whose normalisers sp must get right.

Each rank holds its own groups (rank 0 three, rank 1 two: uneven shares), as after its rollouts; the replicated run
trains each rank on its own with prompt-shared packing, the sp runs train both ranks on the union: under Ulysses
also prompt-shared (checked by counting the shared-prompt attention calls), under ring and hybrid packed one by
one. SGD with lr 1 makes the weight change the (clipped) gradient itself.

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_train_sp.py
    torchrun --standalone --nproc_per_node=4 tests/dist/_worker_train_sp.py [2|4]    # sp=2 x dp=2 (or sp=4)
    torchrun --standalone --nproc_per_node=4 tests/dist/_worker_train_sp.py 4 hybrid  # sp=4: Ulysses 2 x ring 2
"""

import sys

import torch
import torch.distributed as dist

from qlfast.config import RLConfig
from qlfast.model import ModelOptions, QwenForCausalLM
from qlfast.parallel.fsdp import full_state_dict
from qlfast.testing import rel_err
from qlfast.trainer import comm
from qlfast.trainer.rl_step import Group, policy_update
from qlfast.trainer.sft import sft_step

CFG = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
       "tie_word_embeddings": True}
SP = int(sys.argv[1]) if len(sys.argv) > 1 else 2
# name -> (sp, attention, fsdp); "replicated" is the reference
RUNS = {"replicated": (1, "ring", False), "sp2 ring": (SP, "ring", False), "sp2 ulysses": (SP, "ulysses", False),
        "sp2 ring fsdp": (SP, "ring", True), "sp2 hybrid": (SP, "hybrid", False)}
# (update, loss_agg, runs): every sp variant on the default loss; the other modes' sequence normalisers (GRPO's needs
# whole-response lengths on split responses) on ring, also with FSDP2; SFT's plain ring run is test_train_e2e's
CASES = [("rl", "token-mean", [name for name in RUNS if name != "sp2 hybrid"]),
         ("rl", "seq-mean-token-mean", ["replicated", "sp2 ring", "sp2 ulysses", "sp2 ring fsdp"]),
         ("rl", "seq-mean-token-sum-norm", ["replicated", "sp2 ring"]),
         ("sft", None, ["replicated", "sp2 ulysses", "sp2 ring fsdp"])]
if sys.argv[2:] == ["hybrid"]:  # Ulysses inside pairs of ranks, ring across the pairs (needs sp=4)
    CASES = [(what, agg, ["replicated", "sp2 hybrid"])
             for what, agg in (("rl", "token-mean"), ("rl", "seq-mean-token-mean"), ("sft", None))]


def _groups(rank: int) -> list[Group]:
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(3 - rank):
        prompt = torch.randint(1, 128, (int(torch.randint(9, 40, (1,), generator=gen)),), generator=gen).tolist()
        lens = [1, *torch.randint(2, 30, (3,), generator=gen).tolist()]  # a one-token response
        out.append(Group(index=i, uid=f"{rank}/{i}", source="s", prompt_ids=prompt,
                         responses=[torch.randint(1, 128, (n,), generator=gen).tolist() for n in lens],
                         rollout_logprobs=[(-3 - torch.rand(n, generator=gen)).tolist() for n in lens],
                         rewards=[0.0] * 4, shaped=[0.0] * 4, finish=["stop"] * 4, weight_version=0,
                         advantages=torch.randn(4, generator=gen).tolist()))
    return out


def _model(env, fsdp: bool):
    model = QwenForCausalLM.from_config(CFG, ModelOptions(attn_backend="sdpa", checkpoint=True), seed=0,
                                        dtype=torch.float64)
    if fsdp:
        comm.shard_model(model, env)
    return model


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in full_state_dict(model).items()}


def _update(env, fsdp: bool, what: str, loss_agg: str):
    model = _model(env, fsdp)
    before = _weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if what == "rl":
        rl = RLConfig(micro_batch_tokens=96, loss_agg=loss_agg, max_grad_norm=1e6)
        m = policy_update(model, opt, sched, _groups(env.rank), env, rl=rl, mini_batches=2, max_response_tokens=32,
                          backend="torch")
    else:
        gen = torch.Generator().manual_seed(7)
        prompts = [torch.randint(1, 128, (int(n),), generator=gen).tolist()
                   for n in torch.randint(3, 40, (9,), generator=gen)]
        responses = [torch.randint(1, 128, (int(n),), generator=gen).tolist()
                     for n in torch.randint(1, 30, (9,), generator=gen)]
        m = sft_step(model, opt, sched, prompts, responses, [4, 0, 7, 2, 8, 5, 1], env, micro_tokens=80,
                     max_grad_norm=1e6, backend="torch")
    after = _weights(model)
    return m, {k: after[k] - before[k] for k in before}


def _count_shared_prefix_calls() -> list:
    """Count calls of the shared-prompt attention (Ulysses runs RL groups packed with one copy of each prompt)."""
    import qlfast.ops.shared_prefix as sp_mod

    calls, original = [], sp_mod.shared_prefix_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sp_mod.shared_prefix_attention = counted
    return calls


def main():
    ref = None
    shared_calls = _count_shared_prefix_calls()
    for what, loss_agg, runs in CASES:
        for name in runs:
            sp, attention, fsdp = RUNS[name]
            env = comm.init("cpu", fsdp=fsdp, sp=sp, sp_attention=attention, sp_ulysses=2)
            shared_calls.clear()
            m, delta = _update(env, fsdp, what, loss_agg)
            # RL under Ulysses packs each group with one copy of its prompt; ring and hybrid pack one by one
            assert bool(shared_calls) == (what == "rl" and attention == "ulysses" and sp > 1), (name, len(shared_calls))
            tag = f"{what} {loss_agg or ''} {name.replace('sp2', f'sp{SP}')} x dp{env.world // sp}"
            if sp == 1:
                ref = (m, delta)
                assert m.get("policy_loss", m.get("sft_loss")) != 0, tag
                continue
            m_ref, d_ref = ref
            assert set(m) == set(m_ref), (tag, set(m) ^ set(m_ref))
            for k, v in m.items():  # the loss op returns fp32 metrics
                assert abs(float(v) - float(m_ref[k])) <= 1e-6 * abs(float(m_ref[k])) + 1e-9, (tag, k, v, m_ref[k])
            for k in d_ref:
                err = rel_err(delta[k], d_ref[k])
                # fp64 model; the residue is the fused log-prob op's fp32 LSE (measured <= 5e-7)
                assert err < 5e-6, f"{tag} {k}: weight change rel err {err:.2e}"
            if dist.get_rank() == 0:
                print("OK", tag, flush=True)


if __name__ == "__main__":
    main()
    dist.barrier()
    dist.destroy_process_group()
