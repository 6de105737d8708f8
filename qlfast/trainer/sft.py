"""Warm-up SFT: cross-entropy on (prompt, worked response) pairs, computed as -linear_logprob over response tokens
(the same fused op as RL, so no (tokens x vocab) logits here either)."""

from __future__ import annotations

import random

from qlfast.ops.linear_logprob import linear_logprob
from qlfast.reward.dispatch import opens_thinking
from qlfast.trainer import comm, sp
from qlfast.trainer.optim import clip_and_step
from qlfast.trainer.packing import empty_batch, pack, split_by_tokens


def response_ids(tokenizer, examples, prompt_ids=None) -> list[list[int]]:
    """Each example's worked response as token ids + EOS. When its prompt already opens the thinking (an R1-style
    template's generation prompt ends in "<think>\\n"), a leading "<think>" of the response is dropped: the trained
    sequence then reads "<think>\\n...</think> answer" as the model will see it at rollout, not "<think>\\n<think>"."""
    eos = tokenizer.eos_token_id
    out = []
    for k, ex in enumerate(examples):
        if "reasoning" not in ex.extra:
            raise ValueError(f"SFT: example {ex.uid} has no worked response (extra['reasoning'])")
        text = ex.extra["reasoning"]
        if prompt_ids is not None and text.lstrip().startswith("<think>") and opens_thinking(tokenizer, prompt_ids[k]):
            text = text.lstrip()[len("<think>"):].lstrip("\n")
        out.append(tokenizer.encode(text, add_special_tokens=False) + [eos])
    return out


def step_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of SFT step `step`: a deterministic function of (seed, step), so resume is exact."""
    rng = random.Random(f"sft/{seed}/{step // max(1, n_examples // batch_size)}")
    perm = list(range(n_examples))
    rng.shuffle(perm)
    k = step % max(1, n_examples // batch_size)
    return perm[k * batch_size:(k + 1) * batch_size]


def sft_step(model, optimizer, scheduler, prompts, responses, indices, env, *, micro_tokens: int, max_grad_norm: float,
             backend: str = "auto") -> dict:
    own = indices[env.rank::env.world]
    (global_tokens,) = comm.sum_floats(sum(len(responses[i]) for i in own))  # each rank its own: once over ranks
    local = sp.union(own, env)  # under sequence parallel, the sp group's examples (each rank 1/sp of their tokens)
    loss_sum = 0.0
    local_prompts, local_responses = [prompts[i] for i in local], [responses[i] for i in local]
    batches = [pack(prompts, responses, indices=[local[j] for j in group])
               for group in split_by_tokens(local_prompts, local_responses, micro_tokens)]
    if env.fsdp:  # the same number of passes on every rank
        batches += [empty_batch()] * (comm.max_int(len(batches)) - len(batches))
    for b in batches:
        with sp.sharded(model, b, env) as b:
            hidden = model(b.input_ids, b.position_ids, b.cu_seqlens).index_select(0, b.rows)
            logp = linear_logprob(hidden, model.lm_head_weight, b.targets, backend=backend)
            loss = -logp.sum() / max(global_tokens, 1.0)
            (loss * env.loss_scale).backward()
        loss_sum += float(loss.detach())
    comm.all_reduce_grads(model, env)
    norm, ok = clip_and_step(model, optimizer, scheduler, max_grad_norm)
    (loss_total,) = comm.sum_floats(loss_sum)
    return {"sft_loss": loss_total, "grad_norm": norm, "finite": ok, "tokens": global_tokens}
