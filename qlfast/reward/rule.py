"""Rule-based answer verification, as the QwenLong-L1 recipe scores DocQA (verl reward_score/docqa.py, docmath.py).

1. Extraction: special tokens removed; if the response has "</think>", the text after the last one; a response
   with "<think>" but no "</think>" (reasoning cut off) has no answer. Then markdown bold removed and the text after
   the last "the answer is" (any case); leading ":" and trailing punctuation / markdown stripped; `\\boxed{x}` -> x.
   No "the answer is" -> no answer (score 0, counted by the caller).
2. Scoring against each gold (a gold list scores the max over its entries; a gold containing "the answer is" is
   extracted first, as the recipe does):
   - multiple choice (gold is a single capital letter, optionally in parentheses): the prediction's leading option
     letter ("B", "(B)", "B) 48", "Option B") must equal it.
   - numeric (gold is one number, optionally with currency, %, a scale word, or a leading-number unit such as
     "12 km"): the prediction's number (after the last "=", first number, scale words applied) must equal the gold
     up to relative tolerance `rel_tol` (1e-4), after rescaling the gold by 100 or 1000 either way (percent vs
     fraction, thousands), or after rounding the prediction to the gold's written decimals when the gold has 1+
     decimals (or, when the prediction is written with 1+ but fewer decimals, rounding the gold to them).
     Sub-EM is not used for numbers: "60" is a substring of "160".
   - otherwise sub-EM (the recipe's metric): SQuAD-normalised gold contained in the normalised prediction or vice
     versa, with an empty normalised prediction never matching.
   F1 and EM (SQuAD) are reported alongside for logging.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_SPECIAL = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")
_ANSWER_RE = re.compile(r"the answer is", re.IGNORECASE)
_BOXED_RE = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_MC_GOLD_RE = re.compile(r"^\(?([A-J])\)?$")
_MC_PRED_RE = re.compile(r"^(?:options?\s*)?\(?([A-J])\)?(?=$|[\s.:,;)\]])", re.IGNORECASE)
_NUM_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
# Single letters "m"/"b" are left out: metres and bytes are as common as millions and billions.
_SCALE = {"thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "billion": 1e9, "bn": 1e9, "trillion": 1e12}
_CURRENCY_RE = re.compile(r"[$£€¥₹]|\b(?:usd|us|rmb|eur|gbp|cny|dollars?|yuan|euros?)\b", re.IGNORECASE)
_PERCENT_RE = re.compile(r"%|\bper\s*cent\b|\bpercent(?:age)?\b", re.IGNORECASE)
_APPROX_RE = re.compile(r"\b(?:approximately|approx\.?|about|around|roughly|nearly)\b|[~≈]", re.IGNORECASE)


def extract_answer(response: str, require_think: bool = False) -> str | None:
    """The final answer of a response (see module docstring), or None when there is none."""
    text = response
    for tok in _SPECIAL:
        text = text.replace(tok, "")
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif require_think or "<think>" in text:
        return None
    text = text.replace("*", "")
    matches = list(_ANSWER_RE.finditer(text))
    if not matches:
        return None
    ans = text[matches[-1].end() :].strip().lstrip(":").strip()
    ans = ans.rstrip(" \t\n.。;,!`").strip().strip("`").strip()
    boxed = _BOXED_RE.match(ans)
    if boxed:
        ans = boxed.group(1).strip()
    return ans or None


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == normalize_answer(gold)


def sub_em(pred: str, gold: str) -> bool:
    """The recipe's sub-EM: normalised gold in normalised prediction or vice versa (empty strings never match)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    return g in p or p in g


def f1_score(pred: str, gold: str) -> float:
    """SQuAD token F1, with the HotpotQA rule that yes/no/noanswer must match exactly."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
        return 0.0
    pt, gt = p.split(), g.split()
    common = sum((Counter(pt) & Counter(gt)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Number:
    value: float
    decimals: int  # decimals as written (after the point), for rounding comparisons


def _parse_one(m: re.Match, rest: str) -> Number:
    raw = m.group(0).replace(",", "")
    mant = raw.split("e")[0].split("E")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    value = float(raw)
    word = re.match(r"\s*([A-Za-z]+)", rest)
    if word and word.group(1).lower() in _SCALE:
        value *= _SCALE[word.group(1).lower()]
    return Number(value, decimals)


def _clean_numeric(s: str) -> str:
    s = s.strip()
    for sep in ("=", "≈"):
        if sep in s:
            s = s.rsplit(sep, 1)[1]
    s = _APPROX_RE.sub(" ", s)
    s = _CURRENCY_RE.sub(" ", s)
    s = _PERCENT_RE.sub(" ", s)
    return s.replace("−", "-").strip()


def parse_number(s: str) -> Number | None:
    """The first number in `s` (after the last '='), with scale words applied; None if there is none."""
    s = _clean_numeric(s)
    m = _NUM_RE.search(s)
    if not m:
        return None
    try:
        return _parse_one(m, s[m.end() :])
    except ValueError:
        return None


def numeric_gold(gold: str) -> Number | None:
    """The gold's number if the gold is a numeric answer (see module docstring), else None."""
    s = _clean_numeric(gold)
    nums = list(_NUM_RE.finditer(s))
    if len(nums) != 1:
        return None
    m = nums[0]
    before, after = s[: m.start()].strip(), s[m.end() :].strip()
    after_words = [w for w in re.findall(r"[A-Za-z]+", after) if w.lower() not in _SCALE]
    if before.strip(" ()") or len(after_words) > 1 or re.search(r"\d", after):
        return None
    return _parse_one(m, s[m.end() :])


def _round_eq(a: float, decimals: int, b: float) -> bool:
    return decimals >= 0 and math.isclose(round(a, decimals), b, rel_tol=1e-9, abs_tol=10.0 ** (-decimals - 6))


def numbers_match(pred: Number, gold: Number, rel_tol: float = 1e-4) -> bool:
    for scale, shift in ((1.0, 0), (100.0, -2), (0.01, 2), (1000.0, -3), (0.001, 3)):
        g = gold.value * scale
        if math.isclose(pred.value, g, rel_tol=rel_tol, abs_tol=1e-12):
            return True
        # Prediction more precise than a gold written with decimals (integer golds: tolerance only, so that
        # 100.4 is not 100).
        if gold.decimals >= 1 and _round_eq(pred.value, gold.decimals + shift, g):
            return True
    # Prediction rounded to fewer (but at least one) decimals than the gold was written with.
    return 1 <= pred.decimals < gold.decimals and _round_eq(gold.value, pred.decimals, pred.value)


def choice_letter(pred: str) -> str | None:
    m = _MC_PRED_RE.match(pred.strip())
    return m.group(1).upper() if m else None


@dataclass(frozen=True)
class RuleResult:
    score: float  # 1.0 correct, 0.0 not (the reward before the judge)
    pred: str | None  # the extracted answer, None when the response has none
    method: str  # "mc", "numeric", "sub_em" (the rule that decided, for the best gold) or "no_answer"
    em: float
    f1: float


def _score_one(pred: str, gold: str, rel_tol: float) -> tuple[float, str]:
    if _ANSWER_RE.search(gold):
        gold = extract_answer(gold) or gold
    mc = _MC_GOLD_RE.match(gold.strip())
    if mc:
        return float(choice_letter(pred) == mc.group(1)), "mc"
    g = numeric_gold(gold)
    if g is not None:
        p = parse_number(pred)
        return float(p is not None and numbers_match(p, g, rel_tol)), "numeric"
    return float(sub_em(pred, gold)), "sub_em"


def rule_score(response: str, golds: str | Sequence[str], *, rel_tol: float = 1e-4,
               require_think: bool = False) -> RuleResult:
    """Score one response against one or more gold answers (max over golds)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("rule_score needs at least one gold answer")
    pred = extract_answer(response, require_think=require_think)
    if pred is None:
        return RuleResult(0.0, None, "no_answer", 0.0, 0.0)
    best, method = -1.0, "sub_em"
    for g in golds:
        s, m = _score_one(pred, g, rel_tol)
        if s > best:
            best, method = s, m
    em = max(float(exact_match(pred, g)) for g in golds)
    f1 = max(f1_score(pred, g) for g in golds)
    return RuleResult(best, pred, method, em, f1)
