"""One RL step's two halves: collecting scored groups (rollouts -> rewards -> DAPO dynamic sampling -> GRPO
advantages) and the policy update over mini-batches with the fused policy loss.

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
from qlfast.rl.overlong import apply_overlong_shaping
from qlfast.rollout.engine import SamplingConfig
from qlfast.trainer import dist, sp
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


def generate_groups(engine, tokenizer, ds, indices, reward, *, group_size, max_tokens, temperature, top_p, seed,
                    overlong_window, overlong_penalty) -> list[Group]:
    if not indices:
        return []
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                              stop_token_ids=(tokenizer.eos_token_id,))
    outs = engine.generate([ds.prompt_ids[i] for i in indices], n=group_size, sampling=sampling)
    samples = [s for g in outs for s in g]
    texts = tokenizer.batch_decode([list(s.token_ids) for s in samples], skip_special_tokens=True)
    golds = [ds.train[i].answers for i in indices for _ in range(group_size)]
    questions = [ds.train[i].question or "" for i in indices for _ in range(group_size)]
    details = reward.score(texts, golds, questions)
    rewards = torch.tensor([d.reward for d in details], dtype=torch.float32)
    lengths = torch.tensor([s.length for s in samples], dtype=torch.float32)
    shaped = rewards
    if overlong_window > 0:
        shaped = apply_overlong_shaping(rewards, lengths, max_tokens, overlong_window, overlong_penalty)
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


def has_variance(g: Group) -> bool:
    return max(g.shaped) - min(g.shaped) > 1e-6


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
    (n_global,) = dist.sum_floats(sum(len(g.responses) for g in groups))
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
            micro += [empty_batch()] * (dist.max_int(len(micro)) - len(micro))
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
        g_tok, g_seq = dist.sum_floats(n_tok, n_seq)
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
        dist.all_reduce_grads(model, env)
        norm, ok = clip_and_step(model, optimizer, scheduler, rl.max_grad_norm)
        norms.append(norm)
        all_ok &= ok
    # every rank reduces the same names, also a rank that had no sequences this step (collectives must match)
    names = sorted(set().union(*dist.all_gather_objects(sorted(sums))))
    reduced = dict(zip(names, dist.sum_floats(*[sums.get(n, 0.0) for n in names])))
    reduced["ratio_max"] = max(dist.all_gather_objects(ratio_max))
    reduced["grad_norm"] = max(norms) if norms else 0.0
    return {"finite": all_ok, **reduced}


def collect(engine, tokenizer, ds, reward, env, rl, *, curriculum, retro, table, uid_index, phase_i: int, step: int,
            max_tokens: int, seed: int):
    """One step's training groups with DAPO dynamic sampling.

    Round 0 draws the step's global batch (fresh prompts from the phase's bin plus retrospective hard examples);
    further rounds draw fresh prompts. Every rank takes its share of each global batch, and the rounds stop for all
    ranks together once the kept groups (with reward variance) fill the global batch, or after rl.max_gen_rounds.
    Every generated group's rewards go into the difficulty table on every rank. Returns (kept, generated, rounds).
    """
    kept: list[Group] = []
    generated: list[Group] = []
    local_target = len(range(env.rank, rl.batch_size, env.world))
    rounds = 0
    while True:
        if rounds == 0:
            fresh, retro_uids = retro.compose(phase_i, step, rl.batch_size, lambda n: curriculum.next_batch(phase_i, n))
            batch = list(fresh) + [uid_index[u] for u in retro_uids]
        else:
            batch = curriculum.next_batch(phase_i, rl.batch_size)
        groups = generate_groups(engine, tokenizer, ds, batch[env.rank::env.world], reward, group_size=rl.group_size,
                                 max_tokens=max_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                 seed=seed + rounds * 7919 + env.rank, overlong_window=rl.overlong_window,
                                 overlong_penalty=rl.overlong_penalty)
        rounds += 1
        generated += groups
        for part in dist.all_gather_objects([(g.uid, g.rewards) for g in groups]):
            for uid, rewards in part:
                table.record(uid, phase_i, rewards)
        kept = (kept + [g for g in groups if has_variance(g)] if rl.dynamic_sampling else kept + groups)[:local_target]
        (global_kept,) = dist.sum_floats(len(kept))
        if not rl.dynamic_sampling or global_kept >= rl.batch_size or rounds >= rl.max_gen_rounds:
            return kept, generated, rounds


def step_metrics(kept: list[Group], generated: list[Group]) -> dict:
    """Rollout metrics summed over ranks: reward (shaped), accuracy (answer reward) overall and by source."""
    by_src: dict[str, list[float]] = {}
    for g in generated:
        by_src.setdefault(g.source, [0.0, 0.0])
        by_src[g.source][0] += sum(g.rewards)
        by_src[g.source][1] += len(g.rewards)
    parts = dist.all_gather_objects({
        "acc": sum(sum(g.rewards) for g in generated), "shaped": sum(sum(g.shaped) for g in generated),
        "n": sum(len(g.rewards) for g in generated), "kept": len(kept), "gen": len(generated),
        "tokens": sum(len(r) for g in kept for r in g.responses),
        "len": sum(len(r) for g in generated for r in g.responses),
        "truncated": sum(f == "length" for g in generated for f in g.finish), "src": by_src})
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
            "train_tokens": tot["tokens"], **{f"acc/{s}": a / max(c, 1) for s, (a, c) in sorted(src.items())}}
