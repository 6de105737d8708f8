"""`build_reward`: the hybrid reward of a run or an evaluation, from the judge's settings.

    build_reward("none")                                  # rule only
    build_reward("http://127.0.0.1:8000/v1", "judge")     # an OpenAI-compatible endpoint (`vllm serve ...`)
    build_reward("/models/Qwen2.5-1.5B-Instruct")         # a second, in-process vLLM engine
    reward_from_config(cfg.reward)                        # the trainer's RewardConfig fields

Token budget of the judge (`max_tokens`, default 512): the recipe's prompt asks for an explanation before the
[[YES]]/[[NO]] verdict, so the budget must hold both; docs/reward.md says how 512 was chosen and how a run confirms
it (metrics.jsonl's judge_truncated and judge_reply_tokens / judge_calls).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import CircuitBreaker, EngineBackend, HTTPBackend, LLMJudge, Reply, chat_renderer

DEFAULT_JUDGE_MAX_TOKENS = 512


def build_reward(judge: str = "none", judge_model: str = "", timeout: float = 30.0, retries: int = 3,
                 judge_max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS, *, breaker_failures: int = 5,
                 breaker_cooldown_s: float = 60.0, budget_s: float | None = None) -> HybridReward:
    """none | http(s)://host/v1 (OpenAI-compatible) | a model directory (second in-process vLLM engine).

    `budget_s`: the judge's wall time per RL step (and per score call outside a step); None: unbounded."""
    if judge_max_tokens < 1 or timeout <= 0 or retries < 0 or breaker_cooldown_s < 0:
        raise ValueError(f"judge settings out of range: judge_max_tokens={judge_max_tokens} (>= 1), timeout="
                         f"{timeout} (> 0), retries={retries} (>= 0), breaker_cooldown_s={breaker_cooldown_s} (>= 0)")
    if not judge or judge == "none":
        return HybridReward(None)
    breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
    if judge.startswith(("http://", "https://")):
        backend = HTTPBackend(judge, judge_model or "judge", timeout=timeout, max_retries=retries,
                              max_tokens=judge_max_tokens)
        return HybridReward(LLMJudge(backend, breaker), budget_s=budget_s)
    if not os.path.isdir(judge):
        raise ValueError(f"--judge {judge!r}: expected 'none', an http(s) URL or a model directory")
    from qlfast.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig

    # Judge prompts are a question and two short answers: a small context keeps the judge's KV cache small.
    cfg = EngineConfig(gpu_memory_utilization=0.15, max_model_len=min(4096, _max_positions(judge)),
                       enable_sleep_mode=False)
    engine = RolloutEngine(judge, cfg)
    tok = engine.llm.get_tokenizer()

    class _Texts:  # generate(prompts) -> replies, the interface EngineBackend expects
        def generate(self, prompts: Sequence[str]) -> list[Reply]:
            groups = engine.generate(list(prompts), 1, SamplingConfig(temperature=0.0, max_tokens=judge_max_tokens))
            return [Reply(tok.decode(list(g[0].token_ids), skip_special_tokens=True),
                          truncated=str(g[0].finish_reason) == "length", tokens=len(g[0].token_ids)) for g in groups]

    return HybridReward(LLMJudge(EngineBackend(_Texts(), render=chat_renderer(tok)), breaker), budget_s=budget_s)


def reward_from_config(rc) -> HybridReward:
    """The trainer's reward from a RewardConfig (read by attribute: the reward layer does not import qlfast.config)."""
    return build_reward(rc.judge, rc.judge_model, rc.judge_timeout_s, rc.judge_retries,
                        getattr(rc, "judge_max_tokens", DEFAULT_JUDGE_MAX_TOKENS),
                        breaker_failures=getattr(rc, "judge_breaker_failures", 5),
                        breaker_cooldown_s=getattr(rc, "judge_breaker_cooldown_s", 60.0),
                        budget_s=getattr(rc, "judge_step_budget_s", None) or None)


def _max_positions(model_dir: str) -> int:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings") or 4096)
    except (OSError, ValueError):
        return 4096
