"""LLM-as-a-judge answer equivalence (QwenLong-L1's hybrid reward), with a fallback that never crashes a run and never
stalls it: a circuit breaker and a wall-time deadline.

The prompt is the recipe's (verl reward_score/docqa.py GENERAL_ORM_PROMPT / ORM_USER_TEMPLATE): a system message
asking whether two answers are equivalent, an explanation first and then [[YES]] or [[NO]], and a user message with
the question, the model's (parsed) answer and the (parsed) gold answer; greedy decoding. Verdict: the last [[YES]] /
[[NO]] in the reply; failing that, the recipe's rule ("YES" anywhere), except in a reply cut at the token limit,
which has no verdict (0, counted as truncated: see docs/reward.md for the token budget).

Backends (anything with `complete(conversations) -> list[str | Exception]`):
- `EngineBackend(engine, render=...)`: any object with `generate(prompts: list[str]) -> list[str]`, e.g. a second
  in-process vLLM engine (qlfast.reward.factory); `render` turns a chat into a prompt string (`chat_renderer`).
- `HTTPBackend(base_url, model)`: an OpenAI-compatible `/chat/completions` endpoint (`vllm serve`, ...), through
  urllib with a per-request timeout and retries with exponential backoff (backoff * 2**attempt, capped); 4xx other
  than 408/429 is not retried. It is `gated`: it takes a deadline and the breaker and checks both before every
  request, so that a dead endpoint costs one round of failed requests, not retries for every item.
A reply may be a `Reply` (a str that also says whether it was cut at the token limit and how many tokens it took).

`CircuitBreaker`: after `failures` consecutive failed requests it opens and nothing is sent for `cooldown_s`; then one
probe request goes out (half open): success closes it, failure opens it again for twice the cool-down (up to
`max_cooldown_s`). `LLMJudge.verdicts(items, deadline)` returns a `Verdict` per item: yes / no, failed (the backend
failed after its retries), or skipped (breaker open or deadline passed); the caller (hybrid.py) keeps the rule
score for the last two and counts them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
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


class _Skipped:
    """A request that was not sent (breaker open or deadline passed)."""

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED = _Skipped()


class Reply(str):
    """A judge's reply text, with whether it was cut at the token limit and its length in tokens (when known)."""

    truncated: bool
    tokens: int | None

    def __new__(cls, text: str, truncated: bool = False, tokens: int | None = None):
        obj = super().__new__(cls, text)
        obj.truncated, obj.tokens = truncated, tokens
        return obj


@dataclass(frozen=True)
class JudgeItem:
    question: str
    pred: str  # the extracted model answer
    gold: str  # the parsed gold answer; several golds are joined with " / " by the caller


@dataclass(frozen=True)
class Verdict:
    value: float | None  # 1.0 YES, 0.0 NO; None: no verdict (failed or skipped)
    failed: bool = False
    skipped: bool = False
    truncated: bool = False  # the reply was cut at the token limit
    parsed: bool = True  # the reply had a [[YES]] / [[NO]] verdict
    tokens: int | None = None


def judge_messages(item: JudgeItem) -> Conversation:
    user = JUDGE_USER_TEMPLATE.format(problem=item.question, answer_1=item.pred, answer_2=item.gold)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def read_verdict(reply: str, truncated: bool = False) -> tuple[float, bool]:
    """(1.0 YES / 0.0 otherwise, whether a [[YES]]/[[NO]] verdict was found). The last bracketed verdict decides;
    without one, "YES" anywhere (the recipe's rule), except in a truncated reply (no verdict: 0)."""
    yes, no = reply.rfind("[[YES]]"), reply.rfind("[[NO]]")
    if yes >= 0 or no >= 0:
        return float(yes > no), True
    return (0.0 if truncated else float("YES" in reply)), False


def parse_verdict(reply: str) -> float:
    """1.0 for YES, 0.0 otherwise (read_verdict's value)."""
    return read_verdict(reply, getattr(reply, "truncated", False))[0]


def plain_render(conv: Conversation) -> str:
    return "\n\n".join(m["content"].strip() for m in conv) + "\n"


def chat_renderer(tokenizer) -> Callable[[Conversation], str]:
    """Render judge chats with a tokenizer's chat template (generation prompt added)."""
    return lambda conv: tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


class CircuitBreaker:
    """Consecutive-failure circuit breaker (module docstring). `failures <= 0` never opens. Thread-safe."""

    def __init__(self, failures: int = 5, cooldown_s: float = 60.0, max_cooldown_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold, self.base_cooldown = failures, cooldown_s
        self.max_cooldown = max_cooldown_s if max_cooldown_s is not None else 10 * cooldown_s
        self.cooldown, self.clock = cooldown_s, clock
        self.consecutive, self.opened_at, self.probing, self.trips = 0, None, False, 0
        self.last_success: float | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self.opened_at is None:
                return "closed"
            return "half_open" if self.probing or self.clock() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        """Whether a request may be sent now (in the half-open state: only the one probe)."""
        with self._lock:
            if self.opened_at is None:
                return True
            if self.probing or self.clock() - self.opened_at < self.cooldown:
                return False
            self.probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self.consecutive, self.opened_at, self.probing, self.cooldown = 0, None, False, self.base_cooldown
            self.last_success = self.clock()

    def succeeded_within(self, seconds: float) -> bool:
        """Whether a request succeeded in the last `seconds` (a slow endpoint, as opposed to a hung one)."""
        with self._lock:
            return self.last_success is not None and self.clock() - self.last_success <= seconds

    def release(self) -> None:
        """An allowed request ended without telling anything about the endpoint (cut by the caller's deadline)."""
        with self._lock:
            self.probing = False

    def failure(self) -> None:
        with self._lock:
            self.consecutive += 1
            if self.probing:  # the probe failed: open again, for longer
                self.probing, self.opened_at = False, self.clock()
                self.cooldown = min(2 * self.cooldown, self.max_cooldown)
                self.trips += 1
            elif self.opened_at is None and 0 < self.threshold <= self.consecutive:
                self.opened_at = self.clock()
                self.trips += 1


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

    gated = True  # complete() takes deadline= and breaker= and records every request's outcome in the breaker

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, max_tokens: int = 512,
                 concurrency: int = 8, sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.max_tokens, self.concurrency, self.sleep = max_tokens, concurrency, sleep

    def _post(self, conv: Conversation, timeout: float) -> Reply:
        body = json.dumps({"model": self.model, "messages": conv, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read().decode())
        choice = payload["choices"][0]
        content = choice["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"judge reply content is {type(content).__name__}, not text")
        tokens = (payload.get("usage") or {}).get("completion_tokens")
        return Reply(content, choice.get("finish_reason") == "length", tokens if isinstance(tokens, int) else None)

    def complete_one(self, conv: Conversation, deadline: float | None = None,
                     breaker: CircuitBreaker | None = None) -> Reply | Exception | _Skipped:
        """One conversation with retries; SKIPPED when no request could be sent (breaker open, no time left)."""
        err: Exception | None = None
        for attempt in range(self.max_retries + 1):
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0.01:
                    break
            if breaker is not None and not breaker.allow():
                break
            try:
                reply = self._post(conv, timeout)
            except urllib.error.HTTPError as e:
                err = e
                if breaker is not None:
                    breaker.failure()
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    return e  # a bad request stays bad
            except Exception as e:  # timeouts, refused connections, bad JSON: retried
                cut = deadline is not None and timeout < self.timeout and time.monotonic() >= deadline - 0.05
                # A request cut by the deadline while the endpoint answers others is late, not failed: it is
                # skipped and tells the breaker nothing. With no recent answer, the endpoint counts as hung.
                if cut and (breaker is None or breaker.succeeded_within(self.timeout)):
                    if breaker is not None:
                        breaker.release()
                    return err if err is not None else SKIPPED
                err = e
                if breaker is not None:
                    breaker.failure()
            else:
                if breaker is not None:
                    breaker.success()
                return reply
            if attempt < self.max_retries:
                pause = min(self.backoff * 2**attempt, self.max_backoff)
                if (deadline is not None and time.monotonic() + pause >= deadline) or (
                        breaker is not None and breaker.state == "open"):
                    break
                self.sleep(pause)
        return err if err is not None else SKIPPED

    def complete(self, conversations: Sequence[Conversation], deadline: float | None = None,
                 breaker: CircuitBreaker | None = None) -> list[Reply | Exception | _Skipped]:
        if len(conversations) <= 1 or self.concurrency <= 1:
            return [self.complete_one(c, deadline, breaker) for c in conversations]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations)))
        try:
            futures = [pool.submit(self.complete_one, c, deadline, breaker) for c in conversations]
            # a reply that trickles in past its socket timeout must not hold the step: wait until the deadline only
            done, _ = wait(futures, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.2)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [(f.exception() or f.result()) if f in done else SKIPPED for f in futures]


class LLMJudge:
    """Verdicts for (question, pred, gold) items, behind a circuit breaker and an optional deadline; never raises.

    Counters (running totals): calls (items sent), failures, skipped, truncated, unparsed (no [[YES]]/[[NO]])."""

    def __init__(self, backend, breaker: CircuitBreaker | None = None, clock: Callable[[], float] = time.monotonic):
        self.backend, self.clock = backend, clock
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.calls = self.failures = self.skipped = self.truncated = self.unparsed = 0

    def _replies(self, convs: list[Conversation], deadline: float | None) -> list:
        if self.breaker.state == "open" or (deadline is not None and self.clock() >= deadline):
            return [SKIPPED] * len(convs)
        if getattr(self.backend, "gated", False):
            return list(self.backend.complete(convs, deadline=deadline, breaker=self.breaker))
        if not self.breaker.allow():
            return [SKIPPED] * len(convs)
        try:
            replies = list(self.backend.complete(convs))
            if len(replies) != len(convs):
                raise RuntimeError(f"judge backend returned {len(replies)} replies for {len(convs)} items")
        except Exception as e:  # a backend bug must not crash the run either
            replies = [e] * len(convs)
        # one batch call: a failure per failed item, and any answer closes the breaker
        for r in replies:
            if isinstance(r, Exception):
                self.breaker.failure()
        if any(isinstance(r, str) for r in replies):
            self.breaker.success()
        return replies

    def verdicts(self, items: Sequence[JudgeItem], deadline: float | None = None) -> list[Verdict]:
        """A Verdict per item; `deadline` is a time.monotonic() value after which nothing more is sent."""
        if not items:
            return []
        replies = self._replies([judge_messages(it) for it in items], deadline)
        out: list[Verdict] = []
        for r in replies:
            if r is SKIPPED:
                self.skipped += 1
                out.append(Verdict(None, skipped=True))
            elif isinstance(r, str):
                self.calls += 1
                truncated = bool(getattr(r, "truncated", False))
                value, parsed = read_verdict(r, truncated)
                self.truncated += truncated
                self.unparsed += not parsed
                out.append(Verdict(value, truncated=truncated, parsed=parsed, tokens=getattr(r, "tokens", None)))
            else:
                self.calls += 1
                self.failures += 1
                out.append(Verdict(None, failed=True))
        n_failed = sum(v.failed for v in out)
        if n_failed:
            first = next(r for r in replies if isinstance(r, Exception))
            log.warning("LLM judge failed on %d/%d items (falling back to the rule score): %r", n_failed, len(items),
                        first)
        n_skipped = sum(v.skipped for v in out)
        if n_skipped:
            log.warning("LLM judge skipped %d/%d items (breaker %s; rule score kept)", n_skipped, len(items),
                        self.breaker.state)
        return out

    def judge(self, items: Sequence[JudgeItem], deadline: float | None = None) -> list[float | None]:
        """1.0 / 0.0 per item; None where the backend failed or the item was skipped."""
        return [v.value for v in self.verdicts(items, deadline)]
