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

import os
import time

from qlfast import config as config_mod
from qlfast.reward.factory import reward_from_config
from qlfast.rollout.weight_sync import wake_and_sync
from qlfast.trainer import build, checkpoint, comm, context, heldout, optim, precision, reference, rl_step, sft
from qlfast.trainer.report import phase_line, write_report
from qlfast.trainer.state import TrainState, set_aside_earlier_run


def main(argv: list[str] | None = None) -> None:
    cfg = config_mod.from_args(argv, description=__doc__)
    comm.die_with_launcher()  # a killed torchrun takes its ranks with it
    env = comm.init(cfg.train.device, fsdp=cfg.model.fsdp, sp=cfg.model.sp, sp_attention=cfg.model.sp_attention,
                    sp_ulysses=cfg.model.sp_ulysses)
    ctx = None
    try:
        ctx, prompts = context.start(cfg, env, reward_from_config(cfg.reward))
        model, logger, ds, phases = ctx.model, ctx.logger, ctx.ds, list(cfg.rl.phases)

        # ---- state: fresh, or from the last checkpoint ------------------------------------------------------------
        sft_opt = optim.adamw(model, cfg.sft.lr)
        sft_sched = optim.schedule(sft_opt, cfg.sft.warmup_steps, cfg.sft.steps)
        rl_opt = optim.adamw(model, cfg.rl.lr, cfg.rl.weight_decay)
        rl_sched = optim.schedule(rl_opt, cfg.rl.warmup_steps)
        state = TrainState()
        # the same on every rank, written once: schedulers, and unless FSDP2 shards them (dcp/) the fp32 masters
        # and both optimizers
        replicated = {"sft_sched": sft_sched, "rl_sched": rl_sched}
        if not env.fsdp:
            replicated |= {"model": precision.Weights(model), "sft_opt": sft_opt, "rl_opt": rl_opt}
        ckpt = checkpoint.Checkpointer(
            ctx.run_dir, shared={"train": state, "curriculum": prompts.curriculum, "difficulty": prompts.difficulty},
            replicated=replicated, per_rank={"rng": checkpoint.RNGState()},
            sharded=(model, rl_opt, sft_opt) if env.fsdp else None,
            export=lambda d: build.export(model, d, ctx.tokenizer, env))
        _resume_or_start(cfg, ckpt, state, logger, env)

        # ---- 1. warm-up SFT -----------------------------------------------------------------------------------------
        if state.stage == "sft":
            responses = sft.response_ids(ctx.tokenizer, ds.sft, ds.sft_prompt_ids)
            for step in range(state.sft_step, cfg.sft.steps):
                idx = sft.step_indices(len(ds.sft), cfg.sft.batch_size, step, cfg.data.seed)
                m = sft.sft_step(model, sft_opt, sft_sched, ds.sft_prompt_ids, responses, idx, env,
                                 micro_tokens=cfg.rl.micro_batch_tokens, max_grad_norm=cfg.rl.max_grad_norm,
                                 backend=cfg.model.logprob_backend)
                state.sft_step = step + 1
                if step % 100 == 0 or step + 1 == cfg.sft.steps:  # the SFT bar shows every step
                    logger.write(f"SFT step {step + 1}/{cfg.sft.steps}: loss {m['sft_loss']:.4f}")
                logger.log(step, {k: v for k, v in m.items() if k != "finite"}, stream="sft")
                if (step + 1) % cfg.sft.checkpoint_every == 0 and step + 1 < cfg.sft.steps:
                    ckpt.save(f"sft-{step + 1:06d}")  # a run killed during SFT resumes from here (the last: "sft")
            state.stage = "rl"
            ckpt.save("sft")

        # ---- the rollout engine, started from the current weights ---------------------------------------------------
        engine = ctx.start_engine(state.weight_version)
        if cfg.train.eval_every_phase and not state.evaluated("after SFT"):
            state.evals.append(heldout.accuracy(ctx, "after SFT", 0))

        # ---- 2-3. phased RL -----------------------------------------------------------------------------------------
        ref = reference.build(model, cfg, env, ctx.run_dir, ctx.tokenizer, state.rl_step)  # the KL's, when kl_coef > 0
        model.train()
        total = prompts.curriculum.total_steps
        for step in range(state.rl_step, total):
            phase_i = prompts.curriculum.phase_of(step)
            max_tokens = phases[phase_i].max_response_tokens
            t0 = time.perf_counter()
            ctx.reward.begin_step()  # the judge's per-step counters and time budget
            kept, generated, rounds = rl_step.collect(ctx, prompts, phase_i, step, max_tokens)
            t1 = time.perf_counter()
            rl_step.add_advantages(kept, cfg.rl.group_size, cfg.rl.norm_adv_by_std)
            engine.sleep()  # GPU: release the engine's weights and KV cache for the training step (no-op on CPU)
            upd = rl_step.policy_update(model, rl_opt, rl_sched, kept, env, rl=cfg.rl,
                                        mini_batches=max(1, cfg.rl.batch_size // cfg.rl.mini_batch_size),
                                        max_response_tokens=max_tokens, backend=cfg.model.logprob_backend,
                                        reference=ref)
            t2 = time.perf_counter()
            if bad := state.count_update(upd.pop("finite")):
                logger.write(f"step {step}: non-finite loss or gradient, update skipped ({bad} in a row)")
                if bad >= cfg.train.max_bad_steps:
                    raise SystemExit(f"qlfast.train: {bad} consecutive non-finite steps; stopping")
            state.weight_version = wake_and_sync(engine, model).version
            t3 = time.perf_counter()
            row = {"phase": phase_i, "gen_rounds": rounds,
                   **rl_step.step_metrics(kept, generated, ctx.reward.step_stats()), **upd,
                   "weight_version": state.weight_version, "time_rollout_reward": t1 - t0, "time_train": t2 - t1,
                   "time_sync": t3 - t2, "time_step": t3 - t0}
            row["tokens_per_s"] = row["train_tokens"] / max(t3 - t0, 1e-9)
            if cfg.rollout.parity_every and (step + 1) % cfg.rollout.parity_every == 0:
                row.update(_parity(ctx))
            logger.log(step, row)
            state.rl_step = step + 1
            phase_done = prompts.curriculum.phase_of(step + 1) != phase_i or step + 1 == total
            if phase_done:
                logger.write(phase_line(logger.rows("train"), phase_i))
            if phase_done and cfg.train.eval_every_phase:
                state.evals.append(heldout.accuracy(ctx, f"after phase {phase_i + 1}", step + 1))
            stop = cfg.train.stop_at_step and step + 1 >= cfg.train.stop_at_step
            if phase_done or stop or (step + 1) % cfg.train.checkpoint_every == 0:
                ckpt.save(f"rl-{step + 1:06d}")
            if stop and step + 1 < total:
                logger.write(f"stopping after RL step {step + 1} (--train.stop_at_step); continue with --resume")
                return

        # ---- 4. report --------------------------------------------------------------------------------------------
        final = ctx.run_dir / "final"
        build.export(model, str(final), ctx.tokenizer, env)
        if env.is_main:
            report = write_report(ctx.run_dir, logger.rows("train"), state.evals)
            logger.write(f"final model: {final}\nreport: {report} (and {ctx.run_dir / 'report.md'})")
        comm.barrier()
    except SystemExit as e:  # a user-facing error (config, data, launch): the same on every rank, printed once
        if isinstance(e.code, str) and not env.is_main:
            time.sleep(2)  # torchrun stops every rank once one exits: let rank 0 print the message first
            raise SystemExit(1) from None
        raise
    except OSError as e:  # a path the run cannot write or read (disk full, read-only, not a directory): no traceback
        if e.filename is None or os.environ.get("QLFAST_TRACEBACK") == "1":
            raise
        raise SystemExit(f"qlfast.train: {e.strerror}: {e.filename} (rank {env.rank}); free space or choose another "
                         "--train.out_dir (QLFAST_TRACEBACK=1 shows where)") from None
    finally:  # also on an exception: the engine and the process group go down with the run
        if ctx is not None:
            ctx.close()
        comm.shutdown()


def _resume_or_start(cfg, ckpt, state, logger, env) -> None:
    """With --resume, load the newest checkpoint and cut metrics.jsonl back to it (no checkpoint: refuse, rather than
    start over under the user's feet); a fresh start moves an earlier run's outputs aside instead of deleting them."""
    if not cfg.train.resume:
        moved = set_aside_earlier_run(ckpt.run_dir) if env.is_main else None
        if moved is not None:
            logger.write(f"a fresh start: the earlier run's outputs in {ckpt.run_dir} were moved to {moved} "
                         "(--resume continues a run instead)")
        comm.barrier()
        return
    path = ckpt.latest()
    if path is None:
        raise SystemExit(f"qlfast.train: --resume: {ckpt.run_dir} holds no complete checkpoint "
                         f"({ckpt.run_dir / 'checkpoints' / 'LATEST'} is missing); run without --resume to start fresh"
                         if env.is_main else 1)
    ckpt.load(path)
    logger.truncate_after(state.rl_step, state.sft_step, {e["stage"] for e in state.evals})
    logger.write(f"resumed from {path} (stage {state.stage}, SFT step {state.sft_step}, RL step {state.rl_step})")


def _parity(ctx) -> dict:
    """Engine vs trainer log-probs on the same tokens on every rank (under FSDP2 the trainer's forward is a
    collective)."""
    from qlfast.rollout.parity import check_parity

    par = check_parity(ctx.engine, ctx.model, [ctx.ds.heldout_prompt_ids[0]], warn_above=ctx.cfg.rollout.parity_warn)
    return {"parity_mean": par.mean_abs_diff, "parity_max": par.max_abs_diff}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
