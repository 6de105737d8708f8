"""The rule reward per data source against the QwenLong-L1 recipe's rules (verl reward_score/long.py, docmath.py,
docqa.py, dispatched by data_source in __init__.py).

Each case gives the score the recipe's code gives (worked out by hand from its rules, noted beside the case) and the
score qlfast gives. They are equal except where a case names a row of the deliberate-differences table in
docs/reward.md; a test checks that every such row exists there.
"""

import re
from pathlib import Path

import pytest

from qlfast.reward.dispatch import AUTO, DOCMATH, DOCQA, MC, RewardItem, family_of, score_rule
from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import LLMJudge

THINK = "Let me look at the document. The answer is (A) maybe, 7 perhaps.</think>\n\n"  # decoys inside the thinking
DOCS = Path(__file__).resolve().parents[1] / "docs" / "reward.md"


def rule(answer: str, gold: str, source: str, opens: bool = True, think: str = THINK) -> float:
    return score_rule(RewardItem(think + answer, (gold,), "q", source, opens)).score


@pytest.mark.parametrize("source, family", [
    ("long_toc_choices_0_20000", MC), ("long_toc_choices_20000_40000", MC), ("long_toc_choices_40000_plus", MC),
    ("docmath_v1", DOCMATH), ("docmath_0_20000", DOCMATH), ("multihoprag_v1", DOCQA), ("multihoprag_0_20000", DOCQA),
    ("musique_v1", DOCQA), ("musique_0_20000", DOCQA), ("frames", AUTO), ("", AUTO), (None, AUTO),
    ("synthetic_two_hop", AUTO), ("docqa", AUTO),
])
def test_family_by_data_source(source, family):
    assert family_of(source) == family


# (answer text after </think>, gold, recipe's score, qlfast's score, docs/reward.md row or None)
MC_GOLD = "The correct answer is (B)"
MC_CASES = [
    ("The correct answer is (B)", MC_GOLD, 1, 1, None),
    ("The correct answer is B", MC_GOLD, 1, 1, None),  # long.py's second pattern: no parentheses
    ("**The correct answer is (B)**", MC_GOLD, 1, 1, None),  # markdown removed first
    ("The correct answer is (C)", MC_GOLD, 0, 0, None),
    ("The correct answer is (A)", "The correct answer is (A)", 1, 1, None),  # issue 12: "(A)" never scored
    ("The correct answer is (A). No, the correct answer is (B).", MC_GOLD, 0, 1, "mc-last"),  # recipe: first
    ("Therefore, the answer is (B).", MC_GOLD, 0, 1, "mc-answer-is"),
    ("the correct answer is (b)", MC_GOLD, 0, 1, "mc-case"),
    ("The correct answer is \\boxed{B}", MC_GOLD, 0, 1, "boxed"),
    ("The correct answer is Definitely (B)", "The correct answer is (D)", 1, 0, "mc-letter-boundary"),
    ("I cannot tell.", MC_GOLD, 0, 0, None),
]


@pytest.mark.parametrize("answer, gold, recipe, ours, diff", MC_CASES)
def test_long_toc_choices(answer, gold, recipe, ours, diff):
    assert (recipe == ours) == (diff is None)
    assert rule(answer, gold, "long_toc_choices_0_20000") == ours


@pytest.mark.parametrize("letter", "ABCD")
@pytest.mark.parametrize("form", ["({})", "{}"])
def test_mc_letters_with_and_without_parentheses(letter, form):
    gold = f"The correct answer is ({letter})"
    for other in "ABCD":
        got = rule(f"The correct answer is {form.format(other)}", gold, "long_toc_choices_0_20000")
        assert got == float(other == letter), (letter, form, other)
        # the same rows without a known source: the gold's form makes them multiple choice
        assert rule(f"Therefore, the answer is {form.format(other)}.", gold, "") == float(other == letter)


DOCMATH_CASES = [  # gold sentences as DocQA-RL stores them
    ("Therefore, the answer is 12.5.", "Therefore, the answer is 12.5", 1, 1, None),
    ("Therefore, the answer is 12.51.", "Therefore, the answer is 12.5", 1, 1, None),  # 0.08%
    ("Therefore, the answer is 12.52.", "Therefore, the answer is 12.5", 0, 0, None),  # 0.16% > 0.15%
    ("Therefore, the answer is 100.14.", "the answer is 100", 1, 1, None),
    ("Therefore, the answer is 100.16.", "the answer is 100", 0, 0, None),
    ("Therefore, the answer is 99.86.", "the answer is 100", 1, 1, None),
    ("Therefore, the answer is 12.5%.", "the answer is 0.125", 1, 1, None),  # x100
    ("Therefore, the answer is 0.125.", "the answer is 12.5", 1, 1, None),
    ("Therefore, the answer is 2.5.", "the answer is 2500", 1, 1, None),  # x1000
    ("Therefore, the answer is 2.5 thousand.", "the answer is 2500", 1, 1, None),
    ("Therefore, the answer is 12.5 million.", "the answer is 12.5", 1, 1, None),  # the recipe drops the word
    ("Therefore, the answer is $12,500,000.", "the answer is 12.5", 1, 1, None),  # recipe: a power of ten; us: x10^6
    ("Therefore, the answer is 1.25.", "the answer is 12.5", 1, 0, "pow10"),
    ("Therefore, the answer is 0.1.", "the answer is 0.08", 0, 0, None),  # coarser: no
    ("Therefore, the answer is 0.123.", "the answer is 0.123456", 0, 1, "round-half"),  # recipe rounds up (ceil)
    ("Therefore, the answer is 0.124.", "the answer is 0.1235", 1, 1, None),
    ("Therefore, the answer is 5.", "the answer is -5", 1, 0, "sign"),
    ("Therefore, the answer is -5.", "the answer is -5", 1, 1, None),
    ("Therefore, the answer is $1,250.", "the answer is 1250", 1, 1, None),
    ("Therefore, the answer is **12.5**.", "the answer is 12.5", 1, 1, None),
    ("Therefore, the answer is \\boxed{12.5}.", "the answer is 12.5", 0, 1, "boxed"),
    ("Therefore, the answer is: 12.5.", "the answer is 12.5", 0, 1, "number-prefix"),
    ("Therefore, the answer is approximately 12.5.", "the answer is 12.5", 0, 1, "number-prefix"),
    ("The answer is 10. Checking again, the answer is 12.5.", "the answer is 12.5", 0, 1, "last-phrase"),
    ("Therefore, the answer is 60 (= 48 + 12).", "the answer is 60", 1, 1, None),
    ("Therefore, the answer is 48 + 12 = 60.", "the answer is 60", 0, 1, "equation"),  # recipe reads 48
    ("Therefore, the answer is 0.", "the answer is 0", 1, 1, None),
    ("Therefore, the answer is 0.0004.", "the answer is 0", 0, 0, None),
    ("No idea.", "the answer is 12.5", 0, 0, None),
]


@pytest.mark.parametrize("answer, gold, recipe, ours, diff", DOCMATH_CASES)
def test_docmath(answer, gold, recipe, ours, diff):
    assert (recipe == ours) == (diff is None)
    assert rule(answer, gold, "docmath_v1") == ours


KH = "Therefore, the answer is Kestrel House."
DOCQA_CASES = [
    ("Therefore, the answer is Kestrel House.", KH, 1, 1, None),
    ("Therefore, the answer is kestrel house, in the north.", KH, 1, 1, None),  # gold in prediction
    ("Therefore, the answer is Kestrel.", KH, 1, 1, None),  # prediction in gold
    ("Therefore, the answer is **Kestrel House**.", KH, 1, 1, None),
    ("Therefore, the answer is Heron House.", KH, 0, 0, None),
    ("Therefore, the answer is the.", KH, 1, 0, "empty-pred"),  # normalises to "": in every gold
    ("Therefore, the answer is .", KH, 0, 0, None),
    ("The answer is Kestrel House.", KH, 0, 1, "case"),  # recipe's "the answer is" is case-sensitive
    ("Therefore, the answer is Heron. Wait: the answer is Kestrel House.", KH, 1, 1, None),  # both take the last
    ("Therefore, the answer is 160.", "Therefore, the answer is 60.", 1, 0, "numbers-in-docqa"),  # "60" in "160"
    ("Therefore, the answer is 3 months.", "Therefore, the answer is 3 years.", 0, 0, None),
    ("Therefore, the answer is 3.", "Therefore, the answer is 3 years.", 1, 1, None),
    ("Therefore, the answer is 12.5 million.", "Therefore, the answer is 12.5.", 1, 1, None),
    ("Therefore, the answer is Yes.", "Therefore, the answer is Yes.", 1, 1, None),
    ("Therefore, the answer is No.", "Therefore, the answer is Yes.", 0, 0, None),
    ("Therefore, the answer is Heron.\n\nNote: not Kestrel House.", KH, 1, 0, "blank-line"),
]


@pytest.mark.parametrize("source", ["musique_v1", "multihoprag_v1"])
@pytest.mark.parametrize("answer, gold, recipe, ours, diff", DOCQA_CASES)
def test_docqa(answer, gold, recipe, ours, diff, source):
    assert (recipe == ours) == (diff is None)
    assert rule(answer, gold, source) == ours


@pytest.mark.parametrize("source", ["long_toc_choices_0_20000", "docmath_v1", "musique_v1", "frames"])
def test_no_closing_think_is_no_answer_when_the_prompt_opened_it(source):
    gold = {"long_toc_choices_0_20000": MC_GOLD, "docmath_v1": "the answer is 12.5"}.get(source, KH)
    right = {"long_toc_choices_0_20000": "The correct answer is (B)", "docmath_v1": "the answer is 12.5"}.get(
        source, "the answer is Kestrel House")
    cut = "Reading the table... so " + right + " and then I should check the"  # cut at the token limit
    assert rule(cut, gold, source, opens=True, think="") == 0.0  # the recipe: no </think>, no answer
    assert rule(right, gold, source, opens=True) == 1.0
    # a response that opened <think> itself and never closed it: no answer either
    assert rule("<think>" + cut, gold, source, opens=False, think="") == 0.0
    # a model that does not think (no <think> anywhere): the whole response is the answer text
    assert rule(right, gold, source, opens=False, think="") == 1.0


AUTO_CASES = [  # plain jsonl rows / unknown sources: the gold's form picks the rule
    ("Therefore, the answer is (C).", "The correct answer is (B)", "mc"),  # issue 12: "(C)" matched "correct"
    ("Therefore, the answer is (B).", "The correct answer is (B)", "mc"),
    ("Therefore, the answer is B.", "B", "mc"),
    ("Therefore, the answer is A combination of both.", "A", "mc"),  # a capital starting a word is no letter
    ("Therefore, the answer is 12 km.", "12 km", "numeric"),
    ("Therefore, the answer is 5 miles.", "5 km", "numeric"),
    ("Therefore, the answer is 3 months.", "3 years", "numeric"),
    ("Therefore, the answer is 12.5 million.", "12.5", "numeric"),
    ("Therefore, the answer is 100.1.", "100", "numeric"),
    ("Therefore, the answer is 0.1.", "0.08", "numeric"),
    ("Therefore, the answer is Kestrel House.", "Therefore, the answer is Kestrel House.", "sub_em"),
]
AUTO_SCORES = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1]


@pytest.mark.parametrize("case, expected", list(zip(AUTO_CASES, AUTO_SCORES)))
def test_auto_family_reads_the_gold(case, expected):
    answer, gold, method = case
    r = score_rule(RewardItem(THINK + answer, (gold,), "q", "frames", True))
    assert (r.score, r.method) == (expected, method)
    assert r.judgeable == (method != "mc")


def test_stored_golds_are_parsed_for_the_judge_and_mc_is_never_judged():
    asked = []

    class Backend:
        def complete(self, convs):
            asked.extend(c[-1]["content"] for c in convs)
            return ["They differ. [[YES]]"] * len(convs)

    reward = HybridReward(LLMJudge(Backend()))
    items = [RewardItem(THINK + "Therefore, the answer is twelve and a half.", ("Therefore, the answer is 12.5.",),
                        "What was the margin?", "docmath_v1", True),
             RewardItem(THINK + "Therefore, the answer is the kestrel one.", ("Therefore, the answer is Kestrel "
                                                                              "House.",), "Which house?", "musique_v1",
                        True),
             RewardItem(THINK + "The correct answer is (C)", (MC_GOLD,), "Which option?", "long_toc_choices_0_20000",
                        True),
             RewardItem(THINK + "Therefore, the answer is (C).", (MC_GOLD,), "Which option?", "frames", True),
             RewardItem("cut off: the answer is 12.5", ("the answer is 12.5",), "q", "docmath_v1", True)]
    out = reward.score_items(items)
    assert [d.reward for d in out] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [d.family for d in out] == [DOCMATH, DOCQA, MC, AUTO, DOCMATH]
    assert asked == ["\nProblem: What was the margin?\nAnswer 1: twelve and a half\nAnswer 2: 12.5\n",
                     "\nProblem: Which house?\nAnswer 1: the kestrel one\nAnswer 2: Kestrel House\n"]


def test_every_difference_is_in_the_docs_table():
    table = DOCS.read_text()
    ids = {c[-1] for c in MC_CASES + DOCMATH_CASES + DOCQA_CASES if c[-1]}
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.MULTILINE))
    assert ids <= rows, sorted(ids - rows)
