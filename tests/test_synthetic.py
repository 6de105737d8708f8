"""Synthetic long-document QA: determinism, answer correctness against the document, lengths, SFT traces."""

import re
from collections import Counter

import pytest

from qlfast.data.synthetic import KINDS, SyntheticConfig, approx_tokens, generate_synthetic, make_example, sft_pairs
from qlfast.data.tokenizer import build_tokenizer, load_tokenizer
from qlfast.reward.dispatch import rule_score

FACT = re.compile(r"The ([a-z ]+) of (\w+) House is (\d+)\.")
LINK = re.compile(r"(\w+) House is twinned with (\w+) House\.")


def solve(ex):
    """An oracle that reads the document: checks that every question is answerable from it, unambiguously."""
    facts = Counter()
    values = {}
    for attr, house, v in FACT.findall(ex.document):
        facts[(house, attr)] += 1
        values[(house, attr)] = int(v)
    assert max(facts.values()) == 1  # each (house, attribute) stated once
    twin = {}
    for a, b in LINK.findall(ex.document):
        assert a not in twin and b not in twin
        twin[a], twin[b] = b, a
    q = ex.question
    if m := re.match(r"What is the sum of the ([a-z ]+) of (\w+) House and the [a-z ]+ of (\w+) House\?", q):
        return str(values[(m[2], m[1])] + values[(m[3], m[1])])
    if m := re.match(r"What is the ([a-z ]+) of the house twinned with (\w+) House\?", q):
        return str(values[(twin[m[2]], m[1])])
    m = re.match(r"What is the ([a-z ]+) of (\w+) House\?(?: Options: (.*))?$", q)
    v = values[(m[2], m[1])]
    if m[3] is None:
        return str(v)
    opts = dict(re.findall(r"\(([A-D])\) (\d+)", m[3]))
    assert list(opts.values()).count(str(v)) == 1 and len(set(opts.values())) == 4
    return next(k for k, o in opts.items() if o == str(v))


def test_deterministic_per_seed_and_prefix_stable():
    a = generate_synthetic(20, seed=3)
    b = generate_synthetic(20, seed=3)
    assert [(e.document, e.question, e.answers, e.extra) for e in a] == [
        (e.document, e.question, e.answers, e.extra) for e in b]
    assert [e.document for e in generate_synthetic(5, seed=3)] == [e.document for e in a[:5]]
    assert generate_synthetic(3, seed=3, start=7)[0].document == a[7].document
    c = generate_synthetic(20, seed=4)
    assert sum(x.document == y.document for x, y in zip(a, c)) == 0
    assert len({e.uid for e in a + c}) == 40


def test_answers_match_the_document_for_every_kind():
    exs = generate_synthetic(200, seed=0)
    assert Counter(e.extra["kind"] for e in exs).keys() == set(KINDS)
    for e in exs:
        assert solve(e) == e.answers[0], (e.question, e.answers)
        assert e.source == f"synthetic_{e.extra['kind']}"


def test_reasoning_traces_score_one_and_wrong_answers_zero():
    exs = generate_synthetic(60, seed=1)
    for e in exs:
        trace = e.extra["reasoning"]
        assert trace.startswith("<think>") and "</think> Therefore, the answer is " in trace
        assert rule_score(trace, e.answers).score == 1.0
        wrong = "B" if e.answers[0] == "A" else ("A" if e.answers[0] in "BCD" else str(int(e.answers[0]) + 1))
        assert rule_score(f"<think></think> Therefore, the answer is {wrong}.", e.answers).score == 0.0
    pairs = sft_pairs(exs)
    assert pairs[0] == (exs[0].user_prompt(), exs[0].extra["reasoning"])
    with pytest.raises(ValueError, match="with_reasoning"):
        sft_pairs(generate_synthetic(1, cfg=SyntheticConfig(with_reasoning=False)))


def test_document_length_targets(tmp_path):
    tok = load_tokenizer(build_tokenizer(cache_dir=str(tmp_path)))
    cfg = SyntheticConfig(doc_tokens=300)
    for e in generate_synthetic(10, seed=2, cfg=cfg):
        approx = approx_tokens(e.document)
        real = len(tok.encode(e.document, add_special_tokens=False))
        assert 300 <= approx <= 320
        assert abs(real - approx) <= 0.1 * approx  # the default length_fn tracks the real tokenizer
    ranged = generate_synthetic(30, seed=2, cfg=SyntheticConfig(doc_tokens=(100, 600)))
    lens = [approx_tokens(e.document) for e in ranged]
    assert min(lens) >= 100 and max(lens) <= 620 and max(lens) - min(lens) > 200
    exact = make_example(0, 0, SyntheticConfig(doc_tokens=500), length_fn=lambda s: len(tok.encode(s)))
    assert len(tok.encode(exact.document)) >= 500


def test_kind_selection_and_config_validation():
    only = generate_synthetic(20, seed=5, cfg=SyntheticConfig(kinds=("two_hop",)))
    assert all(e.extra["kind"] == "two_hop" for e in only)
    weighted = generate_synthetic(200, seed=5, cfg=SyntheticConfig(kinds=("retrieval", "arithmetic"),
                                                                   kind_weights=(0.9, 0.1)))
    assert Counter(e.extra["kind"] for e in weighted)["retrieval"] > 150
    for bad in (dict(kinds=("nope",)), dict(kinds=("retrieval",), kind_weights=(1.0, 2.0)),
                dict(value_range=(1, 2)), dict(n_facts=1), dict(n_links=9)):
        with pytest.raises(ValueError):
            SyntheticConfig(**bad)


def test_guessing_baselines_are_weak():
    # The documents hold several values of the same attribute, so the answer is not guessable from the question:
    # the most common answer in the set is rarely right (a learnable task, but one that needs the document).
    exs = [e for e in generate_synthetic(300, seed=9) if e.extra["kind"] == "retrieval"]
    top = Counter(e.answers[0] for e in exs).most_common(1)[0][1]
    assert top / len(exs) < 0.1
