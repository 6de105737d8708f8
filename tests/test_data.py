"""Prompt template, middle truncation, DocQA loaders (jsonl/parquet, both schemas, bad rows), binning, tokenizer."""

import json
import os

import pytest

from qlfast.data.docqa import bin_examples, load_docqa, prompt_length
from qlfast.data.template import (
    PROMPT_TEMPLATE,
    apply_chat,
    build_user_prompt,
    middle_truncate_ids,
    render_prompt,
    split_user_prompt,
)
from qlfast.data.tokenizer import CHAT_TEMPLATE, build_tokenizer, load_tokenizer
from qlfast.reward.dispatch import question_from_prompt  # the judge's question: the reward layer's own reading


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(cache_dir=str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


# ---------------------------------------------------------------- template


def test_template_text():
    p = build_user_prompt("  Doc {with} braces $Q$? \n", " What?  ")
    assert p == ("Please read the following text and answer the question below.\n\n<text>\nDoc {with} braces $Q$?\n"
                 "</text>\n\nWhat?\n\n"
                 'Format your response as follows: "Therefore, the answer is (insert answer here)".')
    assert split_user_prompt(p) == ("Doc {with} braces $Q$?", "What?")
    assert question_from_prompt(p) == "What?"
    assert split_user_prompt("no template") is None and question_from_prompt(" raw q ") == "raw q"
    assert "$DOC$" in PROMPT_TEMPLATE


def test_middle_truncate_ids_keeps_both_ends():
    ids = list(range(100))
    kept, t = middle_truncate_ids(ids, 11)
    assert t and kept == list(range(6)) + list(range(95, 100))
    assert middle_truncate_ids(ids, 100) == (ids, False)
    assert middle_truncate_ids(ids, 0) == ([], True)
    assert middle_truncate_ids(ids, 1) == ([0], True)
    with pytest.raises(ValueError):
        middle_truncate_ids(ids, -1)


def test_render_prompt_with_chat_template_and_budget(tok):
    doc = "The vault code of Kestrel House is 48. " + "The quiet bridge stood near the mill. " * 200 + "Last line."
    full = render_prompt(tok, doc, "What is the vault code of Kestrel House?")
    assert not full.truncated and full.text.startswith("<|im_start|>user\n")
    assert full.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    r = render_prompt(tok, doc, "What is the vault code of Kestrel House?", max_prompt_tokens=200)
    assert r.truncated and len(r.input_ids) <= 200 and len(r.input_ids) >= 190
    assert r.input_ids == tok.encode(r.text, add_special_tokens=False)
    assert "Kestrel House is 48" in r.text and "Last line." in r.text  # both ends survive
    assert "What is the vault code of Kestrel House?" in r.text and "Format your response" in r.text
    with pytest.raises(ValueError, match="without its document"):
        render_prompt(tok, doc, "q", max_prompt_tokens=10)


def test_apply_chat_without_template():
    assert apply_chat(None, "hello") == "hello"


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_properties(tok, tok_dir):
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                           "</think>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 300 <= len(tok) <= 1024
    text = "<think>The vault code of Kestrel House is 48.</think> Therefore, the answer is 48."
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 3 and 4 in ids
    assert tok.decode(ids, skip_special_tokens=True) == text  # think tags survive vLLM's default decoding
    assert len(ids) <= 25  # closed vocabulary: whole words are single tokens
    assert tok.decode(tok.encode("ünïcode ✓ 12,345.6", add_special_tokens=False)) == "ünïcode ✓ 12,345.6"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tokenizer_deterministic_and_cached(tok_dir, tmp_path):
    other = build_tokenizer(cache_dir=str(tmp_path))
    with open(os.path.join(tok_dir, "tokenizer.json")) as a, open(os.path.join(other, "tokenizer.json")) as b:
        assert a.read() == b.read()
    mtime = os.path.getmtime(os.path.join(other, "tokenizer.json"))
    assert build_tokenizer(cache_dir=str(tmp_path)) == other
    assert os.path.getmtime(os.path.join(other, "tokenizer.json")) == mtime  # reused, not retrained
    assert build_tokenizer(vocab_size=512, cache_dir=str(tmp_path)) != other


# ---------------------------------------------------------------- DocQA loading


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _rl_row(i, doc="Doc text.", q="Who?", gt="Alice"):
    return {"data_source": "docmath" if i % 2 else "frames",
            "prompt": [{"role": "user", "content": build_user_prompt(doc, q)}],
            "ability": "doc-qa", "reward_model": {"style": "rule", "ground_truth": gt},
            "extra_info": {"index": i, "split": "train"}}


def test_load_plain_jsonl(tmp_path):
    p = _write_jsonl(tmp_path / "plain.jsonl", [
        {"document": "D1", "question": "Q1", "answer": "A1", "source": "hotpotqa"},
        {"context": "D2", "input": "Q2", "answers": ["A2", "a two"], "_id": "x2"},
        "",
        {"context": "D3", "question": "Q3", "answers": 42},
    ])
    ex = load_docqa(p).examples
    assert [e.answers for e in ex] == [["A1"], ["A2", "a two"], ["42"]]
    assert [e.uid for e in ex] == ["plain-1", "x2", "plain-4"]
    assert ex[0].source == "hotpotqa" and ex[1].source == "docqa"
    assert ex[0].user_prompt() == build_user_prompt("D1", "Q1")


def test_load_docqa_rl_parquet_and_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [_rl_row(0), _rl_row(1, gt="12.5%"), _rl_row(2, gt=["x", "y"])]
    rows[1]["prompt"] = [{"role": "system", "content": "sys"}, rows[1]["prompt"][0]]
    # parquet needs one type per column: store ground truths as JSON strings where they are lists.
    prows = [dict(r, reward_model={"style": "rule", "ground_truth": json.dumps(r["reward_model"]["ground_truth"])
                                   if isinstance(r["reward_model"]["ground_truth"], list)
                                   else r["reward_model"]["ground_truth"]}) for r in rows]
    pq.write_table(pa.Table.from_pylist(prows), tmp_path / "rl.parquet")
    for path in (str(tmp_path / "rl.parquet"), _write_jsonl(tmp_path / "rl.jsonl", rows)):
        ex = load_docqa(path).examples
        assert [e.answers for e in ex] == [["Alice"], ["12.5%"], ["x", "y"]]
        assert [e.source for e in ex] == ["frames", "docmath", "frames"]
        assert ex[0].document == "Doc text." and ex[0].question == "Who?" and ex[0].prompt is None
        assert ex[0].extra["ability"] == "doc-qa" and ex[0].extra["index"] == 0
        assert ex[1].user_prompt() == build_user_prompt("Doc text.", "Who?")


def test_docqa_rl_prompt_outside_template_kept_as_is(tmp_path):
    row = _rl_row(0)
    row["prompt"] = [{"role": "user", "content": "Just answer: who?"}]
    ex = load_docqa(_write_jsonl(tmp_path / "a.jsonl", [row])).examples[0]
    assert ex.document is None and ex.user_prompt() == "Just answer: who?"


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"document": "D", "answer": "A"}, "question|input"),
        ({"document": "", "question": "Q", "answer": "A"}, "document"),
        ({"document": "D", "question": "Q"}, "answer|answers"),
        ({"document": "D", "question": "Q", "answers": []}, "answers"),
        ({"document": "D", "question": "Q", "answers": ["ok", None]}, "answers"),
        ({"document": "D", "question": 7, "answer": "A"}, "question"),
        ("{not json", "<json>"),
        ("[1, 2]", "<row>"),
        ({"prompt": [], "reward_model": {"ground_truth": "A"}}, "prompt"),
        ({"prompt": [{"role": "user", "content": "x"}], "reward_model": {}}, "reward_model.ground_truth"),
        ({"prompt": [{"role": "system", "content": "x"}], "reward_model": {"ground_truth": "A"}}, "prompt"),
    ],
)
def test_bad_rows_name_file_row_field(tmp_path, bad, field):
    good = {"document": "D", "question": "Q", "answer": "A"}
    p = _write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError) as e:
        load_docqa(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: row 3: field '{field}'"), msg
    res = load_docqa(p, skip_bad=True)
    assert len(res.examples) == 3 and len(res.skipped) == 1 and res.skipped[0] == msg


def test_non_utf8_row_is_a_named_skippable_row(tmp_path):
    p = tmp_path / "latin1.jsonl"
    good = json.dumps({"document": "D", "question": "Q", "answer": "A"}).encode()
    bad = '{"document": "caf\u00e9", "question": "Q", "answer": "A"}'.encode("latin-1")
    p.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    with pytest.raises(ValueError) as e:
        load_docqa(str(p))
    assert str(e.value) == f"{p}: row 2: field '<text>': not UTF-8 (byte 0xe9 at column 18)"
    res = load_docqa(str(p), skip_bad=True)
    assert len(res.examples) == 2 and res.skipped == [str(e.value)]


def test_bad_parquet_row_numbered(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"document": "D", "question": "Q", "answer": "A"}, {"document": "D", "question": "Q", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet: row 2: field 'answer\|answers': missing"):
        load_docqa(str(tmp_path / "p.parquet"))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_docqa("/nonexistent/nope.jsonl")


def test_bin_examples_counts_too_long(tmp_path, tok, caplog):
    rows = [{"document": "word " * n, "question": "Q?", "answer": "A"} for n in (5, 40, 80, 400, 10)]
    ex = load_docqa(_write_jsonl(tmp_path / "b.jsonl", rows)).examples
    lengths = [prompt_length(e, tok) for e in ex]
    assert lengths[0] < lengths[1] < lengths[2] < lengths[3]
    limits = [lengths[1], lengths[2]]
    with caplog.at_level("WARNING"):
        bins = bin_examples(ex, tok, limits)
    assert bins.bins == [[0, 1, 4], [2]] and bins.too_long == [3]
    assert "1 prompt(s) longer than every phase" in caplog.text


def test_tokenizer_saved_next_to_a_qwen2_config_loads_with_its_own_pre_tokenizer(tmp_path):
    """AutoTokenizer would pick Qwen2Tokenizer (digits split) for a qwen2 model dir: the ids must not change."""
    import json

    from qlfast.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

    src = build_tokenizer(1024, seed=0)
    save_tokenizer(src, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    text = "The vault code of Kestrel House is 17. Therefore, the answer is 48."
    assert load_tokenizer(str(tmp_path)).encode(text) == load_tokenizer(src).encode(text)
