"""Held-out accuracy during training (after SFT and after each phase), through the evaluation library that
`python -m qlfast.eval` uses (qlfast/evaluation.py), on the prompts rendered as that CLI renders them
(qlfast.trainer.build.render), so both report the same accuracy for the same model.

Each rank scores its share of the questions (round-robin) on its own engine; the rows are gathered, so every rank
returns the same result. Accuracy is avg@k over k sampled responses at the evaluation temperature (the paper's
protocol), with greedy accuracy beside it.
"""

from __future__ import annotations

from qlfast.evaluation import evaluate, summarize
from qlfast.trainer import comm


def accuracy(ctx, stage: str, step: int) -> dict:
    """Evaluate ctx.engine's current weights on the held-out set; logs and returns the result row."""
    cfg, env, ds = ctx.cfg, ctx.env, ctx.ds
    max_new_tokens = max(p.max_response_tokens for p in cfg.rl.phases)
    mine = list(range(env.rank, len(ds.heldout), env.world))
    examples, prompts = [ds.heldout[i] for i in mine], [ds.heldout_prompt_ids[i] for i in mine]
    k = cfg.train.eval_samples
    # a TP engine's generate is a collective of its group: one call per rank and pass, whatever its share
    batch = {"batch_prompts": max(1, comm.max_int(len(mine)))} if ctx.engine.tp_size > 1 else {}
    for _ in range(2 if batch and not examples else 0):  # no questions here: join the sampled and greedy calls
        ctx.engine.generate([])
    sampled = evaluate(ctx.engine, ctx.tokenizer, examples, prompts, ctx.reward, n=k,
                       temperature=cfg.train.eval_temperature, top_p=cfg.train.eval_top_p,
                       max_new_tokens=max_new_tokens, seed=cfg.train.seed + 17, **batch)
    greedy = evaluate(ctx.engine, ctx.tokenizer, examples, prompts, ctx.reward, n=1, temperature=0.0,
                      max_new_tokens=max_new_tokens, **batch)
    sampled = [r for part in comm.all_gather_objects(sampled) for r in part]
    greedy = [r for part in comm.all_gather_objects(greedy) for r in part]
    s, g = summarize(sampled, k), summarize(greedy, 1)
    result = {"stage": stage, "step": step, "accuracy": s["all"][f"avg@{k}"], "greedy_accuracy": g["all"]["avg@1"],
              "n": len(greedy), "samples": k, "no_answer": s["all"]["no_answer"],
              "by_source": {name: v[f"avg@{k}"] for name, v in s.items() if name != "all"}}
    ctx.logger.log(step, result, stream="eval")
    ctx.logger.write(f"held-out accuracy {stage}: avg@{k} {100 * result['accuracy']:.1f}% "
                     f"at T={cfg.train.eval_temperature}, "
                     f"greedy {100 * result['greedy_accuracy']:.1f}%, on {len(greedy)} questions "
                     f"(no answer {100 * result['no_answer']:.1f}%)")
    return result
