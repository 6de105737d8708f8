"""LLM judge backends, retries and fallback; hybrid reward = max(rule, judge), judge only when the rule says 0; the
circuit breaker, the time budget and the per-step counters, against scripted, refused and hung local endpoints."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import (
    JUDGE_SYSTEM_PROMPT,
    CircuitBreaker,
    EngineBackend,
    HTTPBackend,
    JudgeItem,
    LLMJudge,
    Reply,
    judge_messages,
    parse_verdict,
    plain_render,
    read_verdict,
)


class FakeEngine:
    """In-process engine double: says YES when the two answers share a word (case-insensitive)."""

    def __init__(self, fail=False):
        self.fail, self.prompts = fail, []

    def generate(self, prompts):
        if self.fail:
            raise RuntimeError("engine died")
        self.prompts.extend(prompts)
        out = []
        for p in prompts:
            a1 = p.split("Answer 1: ")[1].split("\n")[0].lower().split()
            a2 = p.split("Answer 2: ")[1].split("\n")[0].lower().split()
            out.append("They match. [[YES]]" if set(a1) & set(a2) else "Different. [[NO]]")
        return out


class _Server:
    """A scripted OpenAI-compatible server on 127.0.0.1: replies[i] is 'fail' (500), 'bad' (400), 'slow', 'cut:<text>'
    (finish_reason length), or text."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                kind = outer.replies.pop(0) if outer.replies else "[[NO]]"
                if kind == "slow":
                    time.sleep(1.0)
                    kind = "[[YES]]"
                if kind in ("fail", "bad"):
                    self.send_response(500 if kind == "fail" else 400)
                    self.end_headers()
                    return
                finish = "length" if kind.startswith("cut:") else "stop"
                kind = kind.removeprefix("cut:")
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": kind},
                                                "finish_reason": finish}],
                                   "usage": {"completion_tokens": len(kind.split())}}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


ITEM = JudgeItem(question="What is the vault code of Kestrel House?", pred="forty-eight", gold="48")


def test_prompt_is_the_recipes():
    msgs = judge_messages(ITEM)
    assert msgs[0] == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    assert "[[YES]] or [[NO]]" in JUDGE_SYSTEM_PROMPT
    assert msgs[1]["content"] == ("\nProblem: What is the vault code of Kestrel House?\nAnswer 1: forty-eight\n"
                                  "Answer 2: 48\n")


@pytest.mark.parametrize("reply, v", [("[[YES]]", 1.0), ("[[NO]]", 0.0), ("maybe [[YES]]... no: [[NO]]", 0.0),
                                      ("[[NO]] hmm [[YES]]", 1.0), ("YES", 1.0), ("nope", 0.0)])
def test_parse_verdict(reply, v):
    assert parse_verdict(reply) == v


def test_http_retries_then_succeeds():
    sleeps = []
    with _Server(["fail", "fail", "explanation [[YES]]"]) as url:
        judge = LLMJudge(HTTPBackend(url, "judge-model", max_retries=3, backoff=0.5, sleep=sleeps.append))
        assert judge.judge([ITEM]) == [1.0]
    assert sleeps == [0.5, 1.0]  # exponential backoff
    assert judge.failures == 0


def test_http_batch_concurrent_and_auth_header():
    srv = _Server(["[[NO]]", "[[NO]]", "[[NO]]"])
    with srv as url:
        backend = HTTPBackend(url, "judge-model", api_key="k", concurrency=3, sleep=lambda s: None)
        assert backend.complete([judge_messages(ITEM)] * 3) == ["[[NO]]"] * 3
    assert len(srv.requests) == 3 and srv.requests[0][1]["messages"] == judge_messages(ITEM)


def test_http_gives_up_and_falls_back(caplog):
    with _Server(["fail"] * 10) as url:
        judge = LLMJudge(HTTPBackend(url, "m", max_retries=2, backoff=0.0, sleep=lambda s: None))
        with caplog.at_level("WARNING"):
            assert judge.judge([ITEM, ITEM]) == [None, None]
    assert judge.failures == 2 and judge.calls == 2
    assert "falling back to the rule score" in caplog.text


def test_http_bad_request_not_retried():
    srv = _Server(["bad", "[[YES]]"])
    with srv as url:
        judge = LLMJudge(HTTPBackend(url, "m", max_retries=3, backoff=0.0, sleep=lambda s: None, concurrency=1))
        assert judge.judge([ITEM]) == [None]
        assert len(srv.requests) == 1
        assert srv.requests[0][0] == "/v1/chat/completions"
        assert srv.requests[0][1]["model"] == "m" and srv.requests[0][1]["temperature"] == 0.0


def test_http_timeout_then_success():
    with _Server(["slow", "[[YES]]"]) as url:
        judge = LLMJudge(HTTPBackend(url, "m", timeout=0.2, max_retries=1, backoff=0.0, sleep=lambda s: None))
        t0 = time.perf_counter()
        assert judge.judge([ITEM]) == [1.0]
        assert time.perf_counter() - t0 < 0.9  # did not wait for the slow reply


def test_http_unreachable_never_raises():
    judge = LLMJudge(HTTPBackend("http://127.0.0.1:9/v1", "m", timeout=0.5, max_retries=1, backoff=0.0,
                                 sleep=lambda s: None))
    assert judge.judge([ITEM]) == [None]


def test_engine_backend_and_failure():
    eng = FakeEngine()
    judge = LLMJudge(EngineBackend(eng))
    items = [ITEM, JudgeItem("q", "Kestrel House", "kestrel")]
    assert judge.judge(items) == [0.0, 1.0]
    assert len(eng.prompts) == 2 and JUDGE_SYSTEM_PROMPT.strip() in eng.prompts[0]
    broken = LLMJudge(EngineBackend(FakeEngine(fail=True)))
    assert broken.judge(items) == [None, None] and broken.failures == 2
    with pytest.raises(ValueError, match="generate"):
        EngineBackend(object())


def test_hybrid_asks_judge_only_when_rule_is_zero():
    eng = FakeEngine()
    reward = HybridReward(LLMJudge(EngineBackend(eng)))
    responses = [
        "<think>x</think> Therefore, the answer is 48.",  # rule 1: no judge
        "<think>x</think> Therefore, the answer is Kestrel manor.",  # rule 0, judge YES (shares "kestrel")
        "<think>x</think> Therefore, the answer is Heron.",  # rule 0, judge NO
        "<think>x</think> I do not know.",  # no answer: no judge, 0
    ]
    golds = ["48", ["Kestrel House", "KH"], "Kestrel House", "48"]
    out = reward.score(responses, golds, questions=["q1", "q2", "q3", "q4"])
    assert [d.reward for d in out] == [1.0, 1.0, 0.0, 0.0]
    assert [d.rule for d in out] == [1.0, 0.0, 0.0, 0.0]
    assert [d.judge for d in out] == [None, 1.0, 0.0, None]
    assert len(eng.prompts) == 2 and "Answer 2: Kestrel House / KH" in eng.prompts[0] and "q2" in eng.prompts[0]
    assert reward.stats == {"scored": 4, "no_answer": 1, "judge_calls": 2, "judge_yes": 1, "judge_failures": 0,
                            "judge_skipped": 0, "judge_truncated": 0, "judge_unparsed": 0}


def test_hybrid_falls_back_to_rule_on_judge_failure():
    reward = HybridReward(LLMJudge(EngineBackend(FakeEngine(fail=True))))
    out = reward.score(["Therefore, the answer is Kestrel.", "Therefore, the answer is 7."], ["Heron", "7"])
    assert [d.reward for d in out] == [0.0, 1.0]
    assert out[0].judge_failed and out[0].judge is None and not out[1].judge_failed
    assert reward.stats["judge_failures"] == 1


def test_hybrid_without_judge_and_length_check():
    reward = HybridReward()
    assert [d.reward for d in reward.score(["the answer is 1", "the answer is 2"], ["1", "1"])] == [1.0, 0.0]
    with pytest.raises(ValueError, match="lengths must match"):
        reward.score(["a"], ["1", "2"])


# --- circuit breaker, deadline, per-step counters (issue 17: a judge outage must cost nothing) ---------------------


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_circuit_breaker_opens_cools_down_and_probes():
    clock = FakeClock()
    b = CircuitBreaker(failures=3, cooldown_s=10.0, max_cooldown_s=25.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and b.trips == 1 and not b.allow()
    clock.t = 9.9
    assert not b.allow()
    clock.t = 10.0
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure()  # the probe failed: open again for twice as long
    assert b.state == "open" and b.trips == 2 and b.cooldown == 20.0
    clock.t = 29.9
    assert not b.allow()
    clock.t = 30.0
    assert b.allow()
    b.failure()
    assert b.cooldown == 25.0  # capped
    clock.t = 55.0
    assert b.allow()
    b.success()  # the probe answered: closed, base cool-down again
    assert b.state == "closed" and b.allow() and b.allow() and b.cooldown == 10.0
    never = CircuitBreaker(failures=0)
    for _ in range(100):
        never.failure()
    assert never.allow()


def test_breaker_skips_a_failing_engine_backend_then_probes():
    clock = FakeClock()
    eng = FakeEngine(fail=True)
    judge = LLMJudge(EngineBackend(eng), CircuitBreaker(failures=2, cooldown_s=5.0, clock=clock), clock=clock)
    assert judge.judge([ITEM, ITEM]) == [None, None] and judge.failures == 2  # two failures: open
    out = judge.verdicts([ITEM] * 3)
    assert all(v.skipped for v in out) and judge.skipped == 3 and judge.calls == 2
    clock.t = 5.0
    eng.fail = False
    assert judge.judge([JudgeItem("q", "Kestrel House", "kestrel")]) == [1.0]  # the probe batch answers
    assert judge.breaker.state == "closed"


def _refused_url():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    return f"http://127.0.0.1:{port}/v1"


class _HungServer:
    """Accepts TCP connections (the kernel's backlog does) and never answers: a hung judge."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def __exit__(self, *exc):
        self.sock.close()


WRONG = ["<think>x</think> Therefore, the answer is Heron House."] * 24  # rule 0: every one goes to the judge
GOLDS = ["Kestrel House"] * 24


def _step(reward):
    reward.begin_step()
    t0 = time.perf_counter()
    out = reward.score(WRONG, GOLDS, ["q"] * 24)
    return time.perf_counter() - t0, out, reward.step_stats()


def test_dead_endpoint_costs_a_bounded_time_per_step():
    # real sleeps: backoff 0.5 s, so retrying all 24 items would take 24 / 8 * (0.5 + 1.0) = 4.5 s even when refused
    backend = HTTPBackend(_refused_url(), "m", timeout=2.0, max_retries=2, backoff=0.5, concurrency=8)
    reward = HybridReward(LLMJudge(backend, CircuitBreaker(failures=5, cooldown_s=30.0)), budget_s=1.0)
    seconds, out, stats = _step(reward)
    assert seconds < 1.0 + 0.5  # the budget, and in fact one backoff pause (0.5 s): the breaker opened at once
    assert [d.reward for d in out] == [0.0] * 24  # the rule score stands
    assert stats["judge_failures"] >= 5 and stats["judge_failures"] + stats["judge_skipped"] == 24
    assert stats["judge_calls"] == stats["judge_failures"] and stats["judge_breaker_open"] == 1.0
    assert all(d.judge_failed or d.judge_skipped for d in out)
    for _ in range(3):  # while the breaker is open: nothing is sent, the step costs nothing
        seconds, out, stats = _step(reward)
        assert seconds < 0.2 and stats["judge_skipped"] == 24 and stats["judge_calls"] == 0
        assert all(d.judge_skipped and d.judge is None for d in out)


def test_hung_endpoint_costs_at_most_the_budget_then_one_probe_per_cooldown():
    with _HungServer() as url:
        backend = HTTPBackend(url, "m", timeout=30.0, max_retries=3, backoff=0.1, concurrency=8)
        breaker = CircuitBreaker(failures=5, cooldown_s=0.3)
        reward = HybridReward(LLMJudge(backend, breaker), budget_s=0.8)
        seconds, out, stats = _step(reward)
        assert 0.7 < seconds < 1.4  # waited for the budget (not the 30 s timeout), then gave up
        assert stats["judge_failures"] + stats["judge_skipped"] == 24 and stats["judge_failures"] >= 5
        assert stats["judge_seconds"] == pytest.approx(seconds, abs=0.1)
        seconds, _, stats = _step(reward)  # open: free
        assert seconds < 0.2 and stats["judge_skipped"] == 24
        time.sleep(0.35)
        seconds, _, stats = _step(reward)  # cool-down over: one probe, which hangs until the budget; the rest skip
        assert seconds < 1.4 and stats["judge_calls"] == 1 and stats["judge_skipped"] == 23
        assert breaker.state == "open" and breaker.cooldown == pytest.approx(0.6)


def test_slow_judge_is_cut_at_the_budget_and_the_rest_keep_the_rule_score():
    with _Server(["slow"] * 20) as url:  # each reply takes 1 s
        backend = HTTPBackend(url, "m", timeout=5.0, max_retries=0, concurrency=2)
        reward = HybridReward(LLMJudge(backend), budget_s=1.5)
        seconds, out, stats = _step(reward)
    assert seconds < 2.2
    assert stats["judge_yes"] == 2 and stats["judge_calls"] == 2 and stats["judge_skipped"] == 22
    assert stats["judge_failures"] == 0 and reward.judge.breaker.state == "closed"  # slow is not broken
    assert sum(d.reward for d in out) == 2.0 and sum(d.judge_skipped for d in out) == 22


def test_without_a_budget_every_item_is_judged():
    with _Server(["[[YES]]"] * 30) as url:
        reward = HybridReward(LLMJudge(HTTPBackend(url, "m", concurrency=4)))
        seconds, out, stats = _step(reward)
    assert stats["judge_calls"] == 24 and stats["judge_yes"] == 24 and [d.reward for d in out] == [1.0] * 24


def test_truncated_and_unparsed_verdicts_are_counted():
    class Backend:
        def complete(self, convs):
            return [Reply("1) The answers differ because", truncated=True, tokens=512),
                    Reply("1) Same. 2) [[YES]]", tokens=9), "They are the same, YES.", "no idea"][:len(convs)]

    reward = HybridReward(LLMJudge(Backend()))
    reward.begin_step()
    out = reward.score(WRONG[:4], GOLDS[:4], ["q"] * 4)
    assert [d.judge for d in out] == [0.0, 1.0, 1.0, 0.0]  # truncated: no verdict; the recipe's bare "YES" rule
    assert [d.judge_truncated for d in out] == [True, False, False, False]
    s = reward.step_stats()
    assert (s["judge_calls"], s["judge_yes"], s["judge_truncated"], s["judge_unparsed"]) == (4, 2, 1, 3)
    assert s["judge_reply_tokens"] == 521
    assert read_verdict("The answers are not the same. [[YES]] is wrong: [[NO]]") == (0.0, True)
    assert read_verdict("cut before the verdict... YES", truncated=True) == (0.0, False)


def test_http_reply_reports_truncation_and_tokens():
    srv = _Server(["They match. [[YES]]", "cut:1) The two answers differ in"])
    with srv as url:
        judge = LLMJudge(HTTPBackend(url, "m", concurrency=1))
        out = judge.verdicts([ITEM, ITEM])
    assert (out[0].value, out[0].truncated, out[0].tokens) == (1.0, False, 3)
    assert (out[1].value, out[1].truncated, out[1].parsed, out[1].tokens) == (0.0, True, False, 6)
    assert judge.truncated == 1 and judge.unparsed == 1 and judge.failures == 0
    assert srv.requests[0][1]["max_tokens"] == 512  # room for the explanation and the verdict


def test_build_reward_gives_the_judge_room_to_answer():
    from qlfast.config import RewardConfig
    from qlfast.reward.factory import DEFAULT_JUDGE_MAX_TOKENS, build_reward, reward_from_config

    assert DEFAULT_JUDGE_MAX_TOKENS == RewardConfig().judge_max_tokens == 512
    r = build_reward("http://127.0.0.1:9/v1", "judge")
    assert r.judge.backend.max_tokens == 512 and r.budget_s is None  # evaluation: no time budget
    rc = RewardConfig(judge="http://127.0.0.1:9/v1", judge_max_tokens=300, judge_breaker_failures=7,
                      judge_breaker_cooldown_s=12.0, judge_step_budget_s=45.0)
    r = reward_from_config(rc)
    assert r.judge.backend.max_tokens == 300 and r.budget_s == 45.0
    assert (r.judge.breaker.threshold, r.judge.breaker.base_cooldown) == (7, 12.0)
    assert reward_from_config(RewardConfig()).judge is None and reward_from_config(RewardConfig()).step_stats() == {}
    with pytest.raises(ValueError, match="judge_max_tokens=0"):
        build_reward("http://127.0.0.1:9/v1", judge_max_tokens=0)


def test_in_process_judge_gets_the_token_budget_and_reports_cut_replies(tmp_path, monkeypatch):
    """build_reward(<model dir>) starts a second engine; a fake engine stands in for vLLM and records the sampling."""
    import qlfast.rollout.engine as engine_mod
    from qlfast.reward.factory import build_reward

    seen = []

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

        def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
            return plain_render(conv)

    class FakeLLM:
        def get_tokenizer(self):
            return Tok()

    class FakeRolloutEngine:
        def __init__(self, path, cfg):
            self.llm = FakeLLM()

        def generate(self, prompts, n, sampling):
            seen.append(sampling)
            texts = ["1) Same value. 2) [[YES]]", "1) The first answer says"]  # the second hits the limit
            return [[SimpleNamespace(token_ids=[ord(c) for c in t], finish_reason="stop" if k == 0 else "length")]
                    for k, t in zip(range(len(prompts)), texts)]

    monkeypatch.setattr(engine_mod, "RolloutEngine", FakeRolloutEngine)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    reward = build_reward(str(tmp_path))
    reward.begin_step()
    out = reward.score(WRONG[:2], GOLDS[:2], ["q", "q"])
    assert seen[0].max_tokens == 512 and seen[0].temperature == 0.0
    assert [d.reward for d in out] == [1.0, 0.0] and [d.judge_truncated for d in out] == [False, True]
    s = reward.step_stats()
    assert (s["judge_calls"], s["judge_truncated"], s["judge_unparsed"]) == (2, 1, 1)
    assert s["judge_reply_tokens"] == len("1) Same value. 2) [[YES]]") + len("1) The first answer says")
