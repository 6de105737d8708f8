"""One RL step's two halves: collecting scored groups (rollouts -> rewards -> DAPO dynamic sampling -> GRPO
advantages) and the policy update over mini-batches with the fused policy loss.

    prompts = PromptSource.build(cfg, ds)                                # curriculum bins + retrospective hard examples
    kept, generated, rounds = collect(ctx, prompts, phase, step, max_tokens)
    add_advantages(kept, group_size, norm_by_std)
    metrics = policy_update(model, optimizer, scheduler, kept, env, rl=..., mini_batches=..., ...)

Prompts of a global batch are dealt to ranks round-robin; every rank generates its share on its own colocated engine.
Decisions that must agree across ranks (how many generation rounds, the difficulty table) use collectives. Under
sequence parallel (qlfast/trainer/sp.py) an sp group trains on the union of its ranks' groups, each rank on 1/sp of
every micro-batch's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlfast.ops.policy_loss import METRIC_REDUCE, PolicyLossConfig, policy_loss
from qlfast.rl.advantages import group_advantages
from qlfast.rl.curriculum import Curriculum
from qlfast.rl.dynamic_sampling import dynamic_sample
from qlfast.rl.overlong import apply_overlong_shaping
from qlfast.rl.retrospective import DifficultyTable, RetrospectiveConfig, RetrospectiveSampler
from qlfast.rollout.engine import SamplingConfig
from qlfast.trainer import comm, sp
from qlfast.trainer.optim import clip_and_step
from qlfast.trainer.packing import empty_batch, pack, split_by_tokens
from qlfast.trainer.reference import logprobs as reference_logprobs


@dataclass
class Group:
    index: int  # dataset index of the prompt
    uid: str
    source: str
    prompt_ids: list[int]
    responses: list[list[int]]
    rollout_logprobs: list[list[float]]
    rewards: list[float]  # answer rewards in [0, 1] (rule, judge when the rule says no, max of the two)
    shaped: list[float]  # rewards + overlong penalty: what the advantages see
    finish: list[str]
    weight_version: int
    advantages: list[float] = field(default_factory=list)


@dataclass
class PromptSource:
    """Which prompts an RL step draws (QwenLong-L1 sections 3.2-3.3): the phase's length bin through the curriculum's
    seeded samplers, and from the second phase on a share of retrospective hard examples, drawn by difficulty from
    the table that every generated group's answer rewards feed. Checkpoints hold `curriculum` and `difficulty`."""

    curriculum: Curriculum
    difficulty: DifficultyTable
    uid_index: dict[str, int]  # uid -> index into the training examples
    retro: RetrospectiveSampler = field(init=False)

    def __post_init__(self):
        self.retro = RetrospectiveSampler(self.difficulty)

    @classmethod
    def build(cls, cfg, ds) -> PromptSource:
        """The curriculum over the datasets' length bins and an empty difficulty table, both seeded by cfg.data.seed."""
        rl = cfg.rl
        curriculum = Curriculum(list(rl.phases), ds.bins, rl.batch_size, seed=cfg.data.seed)
        table = DifficultyTable(RetrospectiveConfig(fraction=rl.retro_fraction, mode=rl.difficulty,
                                                    cap=rl.difficulty_cap, seed=cfg.data.seed))
        return cls(curriculum, table, {ex.uid: i for i, ex in enumerate(ds.train)})

    def batch(self, phase: int, step: int, size: int, round_: int) -> list[int]:
        """Dataset indices of one global batch: round 0 composes fresh and retrospective prompts, later dynamic
        sampling rounds draw fresh ones only."""
        if round_ > 0:
            return self.curriculum.next_batch(phase, size)
        fresh, retro_uids = self.retro.compose(phase, step, size, lambda n: self.curriculum.next_batch(phase, n))
        return list(fresh) + [self.uid_index[u] for u in retro_uids]


def generate_groups(ctx, indices: list[int], *, max_tokens: int, seed: int) -> list[Group]:
    """G = rl.group_size rollouts of each training prompt in `indices` on ctx.engine, scored by ctx.reward; the shaped
    rewards add DAPO's overlong penalty (rl.overlong_window > 0)."""
    rl, tokenizer, ds, group_size = ctx.cfg.rl, ctx.tokenizer, ctx.ds, ctx.cfg.rl.group_size
    sampling = SamplingConfig(temperature=rl.temperature, top_p=rl.top_p, max_tokens=max_tokens, seed=seed,
                              stop_token_ids=(tokenizer.eos_token_id,))
    if not indices:
        ctx.engine.generate([], n=group_size, sampling=sampling)  # a collective under TP: join the group's call
        return []
    outs = ctx.engine.generate([ds.prompt_ids[i] for i in indices], n=group_size, sampling=sampling)
    samples = [s for g in outs for s in g]
    texts = tokenizer.batch_decode([list(s.token_ids) for s in samples], skip_special_tokens=True)
    # data_source, parsed gold, question and "the prompt opened <think>" come from the example and its prompt
    details = ctx.reward.score_examples(texts, [ds.train[i] for i in indices for _ in range(group_size)],
                                        [ds.prompt_ids[i] for i in indices for _ in range(group_size)], tokenizer)
    rewards = torch.tensor([d.reward for d in details], dtype=torch.float32)
    lengths = torch.tensor([s.length for s in samples], dtype=torch.float32)
    shaped = rewards
    if rl.overlong_window > 0:
        shaped = apply_overlong_shaping(rewards, lengths, max_tokens, rl.overlong_window, rl.overlong_penalty)
    groups = []
    for j, i in enumerate(indices):
        sl = slice(j * group_size, (j + 1) * group_size)
        grp = samples[sl]
        groups.append(Group(index=i, uid=ds.train[i].uid, source=ds.train[i].source, prompt_ids=ds.prompt_ids[i],
                            responses=[list(s.token_ids) for s in grp],
                            rollout_logprobs=[list(s.logprobs) for s in grp],
                            rewards=rewards[sl].tolist(), shaped=shaped[sl].tolist(),
                            finish=[s.finish_reason for s in grp], weight_version=grp[0].weight_version))
    return groups


def add_advantages(groups: list[Group], group_size: int, norm_by_std: bool) -> None:
    if not groups:
        return
    shaped = torch.tensor([g.shaped for g in groups], dtype=torch.float32)
    adv = group_advantages(shaped, group_size, normalize_std=norm_by_std)
    for g, a in zip(groups, adv.tolist()):
        g.advantages = a


# ------------------------------------------------------------------------------------------------- policy update


def _sequences(groups: list[Group]):
    prompts, responses, adv, lps = [], [], [], []
    for g in groups:
        for r, a, lp in zip(g.responses, g.advantages, g.rollout_logprobs):
            if not r:
                continue
            prompts.append(g.prompt_ids)
            responses.append(r)
            adv.append(a)
            lps.append(lp)
    return prompts, responses, adv, lps


def policy_update(model, optimizer, scheduler, groups: list[Group], env, *, rl, mini_batches: int,
                  max_response_tokens: int, backend: str = "auto", reference=None) -> dict:
    """Mini-batch policy-gradient updates over this rank's groups (its sp group's, under sp). Returns reduced metrics
    and whether every optimizer step had finite gradients. reference: the frozen reference policy, needed (and run,
    once per micro-batch) only when rl.kl_coef > 0 (qlfast/trainer/reference.py)."""
    (n_global,) = comm.sum_floats(sum(len(g.responses) for g in groups))
    if n_global == 0:  # every group was dropped (no reward variance anywhere): nothing to learn from
        return {"finite": True, "skipped_update": 1.0}
    loss_cfg = dict(clip_low=rl.clip_low, clip_high=rl.clip_high, loss_agg=rl.loss_agg, kl_coef=rl.kl_coef,
                    kl_type=rl.kl_type, entropy_coef=rl.entropy_coef, temperature=rl.temperature, tis_cap=rl.tis_cap)
    # split this rank's groups into mini-batches (by group, so a group's sequences update together); under sp,
    # mini-batch k is the union of the sp ranks' k-th chunks: the same mini-batches as data parallel
    chunks = [groups[k::mini_batches] for k in range(mini_batches)]
    share = rl.share_prompts and sp.shares_prompts(env)  # alone or under Ulysses (qlfast/trainer/sp.py)
    plans = []
    for chunk in chunks:
        _, responses, _, _ = _sequences(chunk)
        n_tok, n_seq = sum(len(r) for r in responses), len(responses)  # this rank's own: once over all ranks
        prompts, responses, adv, lps = _sequences(sp.union(chunk, env))
        micro = [pack(prompts, responses, advantages=adv, rollout_logprobs=lps, indices=idx, share_prompts=share)
                 for idx in split_by_tokens(prompts, responses, rl.micro_batch_tokens, share_prompts=share)]
        if env.fsdp:  # the same number of passes on every rank
            micro += [empty_batch()] * (comm.max_int(len(micro)) - len(micro))
        plans.append((micro, n_tok, n_seq))
    # behaviour-policy log-probs before the first update (needed only when one step makes several updates)
    old = None
    if mini_batches > 1:
        with torch.no_grad():
            from qlfast.ops.linear_logprob import linear_logprob

            old = []
            for micro, _, _ in plans:
                old.append([])
                for b in micro:
                    with sp.sharded(model, b, env) as b:
                        h = model(b.input_ids, b.position_ids, b.cu_seqlens, prefix=b.prefix).index_select(0, b.rows)
                        old[-1].append(linear_logprob(h, model.lm_head_weight, b.targets,
                                                      temperature=rl.temperature, backend=backend))
    sums: dict[str, float] = {}
    ratio_max = 0.0
    norms, all_ok = [], True
    for k, (micro, n_tok, n_seq) in enumerate(plans):
        g_tok, g_seq = comm.sum_floats(n_tok, n_seq)
        # Dr. GRPO's normaliser is a constant, the generation budget: the same on every rank and micro-batch
        cfg = PolicyLossConfig(**loss_cfg, global_tokens=max(g_tok, 1.0), global_seqs=max(g_seq, 1.0),
                               loss_agg_norm=float(max_response_tokens))
        for j, b in enumerate(micro):
            ref_lp = None if rl.kl_coef == 0 else reference_logprobs(reference, b, env, temperature=rl.temperature,
                                                                     backend=backend)
            with sp.sharded(model, b, env) as b:
                # only the rows that predict response tokens go through the LM head
                hidden = model(b.input_ids, b.position_ids, b.cu_seqlens, prefix=b.prefix).index_select(0, b.rows)
                loss, m = policy_loss(hidden, model.lm_head_weight, b.targets, b.advantages,
                                      torch.ones_like(b.advantages), cu_seqlens=b.cu_rows,
                                      old_logprob=None if old is None else old[k][j], ref_logprob=ref_lp,
                                      rollout_logprob=b.rollout_logprob, seq_tokens=b.seq_tokens, config=cfg,
                                      backend=backend)
                (loss * env.loss_scale).backward()
            for name, v in m.items():
                if name == "num_tokens":  # a count: the step's total
                    sums[name] = sums.get(name, 0.0) + float(v)
                elif METRIC_REDUCE.get(name) == "sum":  # normalised per mini-batch: the mean over mini-batches
                    sums[name] = sums.get(name, 0.0) + float(v) / mini_batches
                elif name == "ratio_max":
                    ratio_max = max(ratio_max, float(v))
        comm.all_reduce_grads(model, env)
        norm, ok = clip_and_step(model, optimizer, scheduler, rl.max_grad_norm)
        norms.append(norm)
        all_ok &= ok
    # every rank reduces the same names, also a rank that had no sequences this step (collectives must match)
    names = sorted(set().union(*comm.all_gather_objects(sorted(sums))))
    reduced = dict(zip(names, comm.sum_floats(*[sums.get(n, 0.0) for n in names])))
    reduced["ratio_max"] = max(comm.all_gather_objects(ratio_max))
    reduced["grad_norm"] = max(norms) if norms else 0.0
    return {"finite": all_ok, **reduced}


def collect(ctx, prompts: PromptSource, phase: int, step: int, max_tokens: int):
    """One step's training groups, with DAPO dynamic sampling (qlfast/rl/dynamic_sampling.py decides what is kept).

    Round 0 draws the step's global batch (fresh prompts from the phase's bin plus retrospective hard examples);
    further rounds draw fresh prompts. Every rank generates its share of each global batch, and the rounds stop for all
    ranks together once the kept groups fill the global batch, or after rl.max_gen_rounds. Every generated group's
    answer rewards go into the difficulty table on every rank. Returns (kept, generated, rounds).
    """
    rl, env = ctx.cfg.rl, ctx.env
    seed = ctx.cfg.train.seed * 1_000_003 + step * 101
    generated: list[Group] = []

    def generate(round_: int) -> list[Group]:
        batch = prompts.batch(phase, step, rl.batch_size, round_)
        groups = generate_groups(ctx, batch[env.rank::env.world], max_tokens=max_tokens,
                                 seed=seed + round_ * 7919 + env.rank)
        generated.extend(groups)
        for part in comm.all_gather_objects([(g.uid, g.rewards) for g in groups]):
            for uid, rewards in part:
                prompts.difficulty.record(uid, phase, rewards)
        return groups

    if not rl.dynamic_sampling:
        return generate(0), generated, 1
    local_target = len(range(env.rank, rl.batch_size, env.world))  # this rank's share of the global batch

    def enough(kept: list[Group]) -> bool:  # a collective, once per round on every rank: the ranks stop together
        (global_kept,) = comm.sum_floats(min(len(kept), local_target))
        return global_kept >= rl.batch_size

    # on the answer rewards, as DAPO (see qlfast/rl/dynamic_sampling.py); a rank with no share of the batch
    # (batch_size < ranks) still joins every round's collectives and keeps nothing
    res = dynamic_sample(generate, max(local_target, 1), max(rl.max_gen_rounds, 1), enough=enough)
    return res.groups[:local_target], generated, res.rounds


def step_metrics(kept: list[Group], generated: list[Group], judge: dict | None = None) -> dict:
    """Rollout metrics summed over ranks: reward (shaped), accuracy (answer reward) overall and by source, and the
    judge's step counters (`judge`: HybridReward.step_stats(), summed over ranks as they are)."""
    by_src: dict[str, list[float]] = {}
    for g in generated:
        by_src.setdefault(g.source, [0.0, 0.0])
        by_src[g.source][0] += sum(g.rewards)
        by_src[g.source][1] += len(g.rewards)
    parts = comm.all_gather_objects({
        "acc": sum(sum(g.rewards) for g in generated), "shaped": sum(sum(g.shaped) for g in generated),
        "n": sum(len(g.rewards) for g in generated), "kept": len(kept), "gen": len(generated),
        "tokens": sum(len(r) for g in kept for r in g.responses),
        "len": sum(len(r) for g in generated for r in g.responses),
        "truncated": sum(f == "length" for g in generated for f in g.finish), "src": by_src, "judge": judge or {}})
    tot = {k: sum(p[k] for p in parts) for k in ("acc", "shaped", "n", "kept", "gen", "tokens", "len", "truncated")}
    src: dict[str, list[float]] = {}
    for p in parts:
        for s, (a, n) in p["src"].items():
            src.setdefault(s, [0.0, 0.0])
            src[s][0] += a
            src[s][1] += n
    n = max(tot["n"], 1)
    return {"reward_mean": tot["shaped"] / n, "accuracy": tot["acc"] / n, "groups_kept": tot["kept"],
            "groups_generated": tot["gen"], "dropped_groups": tot["gen"] - tot["kept"],
            "response_len_mean": tot["len"] / n, "truncated_frac": tot["truncated"] / n,
            "train_tokens": tot["tokens"], **{f"acc/{s}": a / max(c, 1) for s, (a, c) in sorted(src.items())},
            **{k: sum(p["judge"].get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p["judge"]})}}
