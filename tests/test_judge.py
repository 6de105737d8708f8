"""LLM judge backends, retries and fallback; hybrid reward = max(rule, judge), judge only when the rule says 0."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import (
    JUDGE_SYSTEM_PROMPT,
    EngineBackend,
    HTTPBackend,
    JudgeItem,
    LLMJudge,
    judge_messages,
    parse_verdict,
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
    """A scripted OpenAI-compatible server on 127.0.0.1: replies[i] is 'fail' (500), 'bad' (400), 'slow', or text."""

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
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": kind}}]}).encode()
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
    assert reward.stats == {"scored": 4, "no_answer": 1, "judge_calls": 2, "judge_yes": 1, "judge_failures": 0}


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
