"""LLM-as-a-judge answer equivalence (QwenLong-L1's hybrid reward), with a fallback that never crashes a run.

The prompt is the recipe's (verl reward_score/docqa.py GENERAL_ORM_PROMPT / ORM_USER_TEMPLATE): a system message
asking whether two answers are equivalent and to finish with [[YES]] or [[NO]], and a user message with the
question, the model's answer and the gold answer; greedy decoding. Verdict: the last [[YES]] / [[NO]] in the
reply; failing that, the recipe's rule ("YES" anywhere in the reply).

Backends (anything with `complete(conversations) -> list[str | Exception]`):
- `EngineBackend(engine, render=...)`: any object with `generate(prompts: list[str]) -> list[str]`, e.g. a second
  in-process vLLM engine wrapped by the rollout module; `render` turns a chat into a prompt string
  (`chat_renderer(tokenizer)` uses the judge tokenizer's chat template).
- `HTTPBackend(base_url, model)`: an OpenAI-compatible `/chat/completions` endpoint (`vllm serve`, ...), through
  urllib with a per-request timeout and retries with exponential backoff (backoff * 2**attempt, capped);
  4xx other than 408/429 is not retried.

`LLMJudge.judge` returns a verdict per item, or None where the backend failed after its retries; it counts
calls and failures and logs a warning, and the caller (hybrid.py) falls back to the rule score.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

JUDGE_SYSTEM_PROMPT = """You are an expert in verifying if two answers are the same.
Your input is a problem and two answers, Answer 1 and Answer 2. You need to check if they are equivalent.
Your task is to determine if two answers are equivalent, without attempting to solve the original problem.
Compare the answers to verify they represent identical values or meaning, even when written in different forms or notations.

Your output must follow the following format:
1) Provide an explanation for why the answers are equivalent or not.
2) Then provide your final answer in the form of: [[YES]] or [[NO]]
"""  # noqa: E501  (the recipe's text, kept byte for byte)

JUDGE_USER_TEMPLATE = """
Problem: {problem}
Answer 1: {answer_1}
Answer 2: {answer_2}
"""

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class JudgeItem:
    question: str
    pred: str  # the extracted model answer
    gold: str  # a gold answer; several golds are joined with " / " by the caller


def judge_messages(item: JudgeItem) -> Conversation:
    user = JUDGE_USER_TEMPLATE.format(problem=item.question, answer_1=item.pred, answer_2=item.gold)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> float:
    """1.0 for YES, 0.0 otherwise: the last [[YES]]/[[NO]] decides; without brackets, "YES" anywhere (recipe)."""
    yes, no = reply.rfind("[[YES]]"), reply.rfind("[[NO]]")
    if yes >= 0 or no >= 0:
        return float(yes > no)
    return float("YES" in reply)


def plain_render(conv: Conversation) -> str:
    return "\n\n".join(m["content"].strip() for m in conv) + "\n"


def chat_renderer(tokenizer) -> Callable[[Conversation], str]:
    """Render judge chats with a tokenizer's chat template (generation prompt added)."""
    return lambda conv: tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


class EngineBackend:
    """Judge with an in-process engine: any object with generate(prompts: list[str]) -> list[str]."""

    def __init__(self, engine, render: Callable[[Conversation], str] = plain_render):
        if not callable(getattr(engine, "generate", None)):
            raise ValueError(f"judge engine must have a generate(prompts) -> texts method, got {type(engine).__name__}")
        self.engine, self.render = engine, render

    def complete(self, conversations: Sequence[Conversation]) -> list[str | Exception]:
        try:
            texts = list(self.engine.generate([self.render(c) for c in conversations]))
            if len(texts) != len(conversations):
                raise RuntimeError(f"judge engine returned {len(texts)} texts for {len(conversations)} prompts")
            return [t if isinstance(t, str) else RuntimeError(f"non-text judge output {type(t).__name__}")
                    for t in texts]
        except Exception as e:  # the engine failing must not stop training
            return [e] * len(conversations)


class HTTPBackend:
    """OpenAI-compatible chat completions over HTTP. `base_url` ends with /v1 (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, max_tokens: int = 1024,
                 concurrency: int = 8, sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.max_tokens, self.concurrency, self.sleep = max_tokens, concurrency, sleep

    def _post(self, conv: Conversation) -> str:
        body = json.dumps({"model": self.model, "messages": conv, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            payload = json.loads(resp.read().decode())
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"judge reply content is {type(content).__name__}, not text")
        return content

    def complete_one(self, conv: Conversation) -> str | Exception:
        err: Exception = RuntimeError("no attempt made")
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(conv)
            except urllib.error.HTTPError as e:
                err = e
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    return e  # a bad request stays bad
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError) as e:
                err = e
            if attempt < self.max_retries:
                self.sleep(min(self.backoff * 2**attempt, self.max_backoff))
        return err

    def complete(self, conversations: Sequence[Conversation]) -> list[str | Exception]:
        if len(conversations) <= 1 or self.concurrency <= 1:
            return [self.complete_one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(self.complete_one, conversations))


class LLMJudge:
    """Verdicts for (question, pred, gold) items; None where the backend failed (counted, logged, never raised)."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = 0
        self.failures = 0

    def judge(self, items: Sequence[JudgeItem]) -> list[float | None]:
        if not items:
            return []
        self.calls += len(items)
        try:
            replies = self.backend.complete([judge_messages(it) for it in items])
        except Exception as e:  # a backend bug must not crash the run either
            replies = [e] * len(items)
        out: list[float | None] = []
        for r in replies:
            if isinstance(r, Exception):
                self.failures += 1
                out.append(None)
            else:
                out.append(parse_verdict(r))
        n_failed = sum(v is None for v in out)
        if n_failed:
            first = next(r for r in replies if isinstance(r, Exception))
            log.warning("LLM judge failed on %d/%d items (falling back to the rule score): %r",
                        n_failed, len(items), first)
        return out
