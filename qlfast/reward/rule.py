"""Rule-based answer verification: the primitives of the QwenLong-L1 recipe's reward (verl reward_score/docqa.py,
docmath.py, long.py), with the recipe's bugs fixed (docs/reward.md lists every difference, with an example each).

1. The final text: special tokens removed; the text after the last "</think>". With no "</think>", the response has
   no answer when the thinking was opened, by the prompt (DeepSeek-R1-Distill's chat template ends the generation
   prompt with "<think>\\n", qlfast.reward.dispatch detects it) or by the response itself; otherwise (a model that
   does not think) the whole response is the final text.
2. The answer: markdown bold removed, then the text after the LAST answer phrase ("the answer is", any case; "the
   correct answer is" for multiple choice), up to the first blank line; leading ":" and trailing punctuation /
   backticks stripped; `\\boxed{x}` -> x. No phrase -> no answer.
3. Comparisons (qlfast.reward.dispatch picks one per data source):
   - multiple choice: the prediction's leading option letter ("B", "(B)", "(b)", "B) 48", "Option B").
   - numbers (the recipe's docmath rule, sign-aware): equal within 0.15% relative error, or after a x100 (percent
     vs fraction) or x1000 / x10^6 / x10^9 (a unit of thousands / millions / billions) rescale either way, or equal
     once both are rounded to 3 decimals (half away from zero; golds under 0.0005 in size excepted). Scale words
     ("12.5 million") are applied; a unit word after both numbers must agree ("3 months" is not "3 years").
   - text: the recipe's sub-EM, SQuAD-normalised gold in the normalised prediction or vice versa, with an empty
     normalised side never matching. F1 and EM (SQuAD) are reported beside it.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

_SPECIAL = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>",
            "<｜begin▁of▁sentence｜>", "<｜User｜>")
ANSWER_RE = re.compile(r"the answer is", re.IGNORECASE)
CORRECT_RE = re.compile(r"the correct answer is", re.IGNORECASE)
_BOXED_RE = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_MC_GOLD_RE = re.compile(r"^\(?([A-J])\)?$")
# A bare letter is a capital standing alone ("B", "B) 48", "B 48"; "A combination" is not option A); "(b)" too.
_MC_PRED_RE = re.compile(r"^(?:(?i:options?)\s*)?(?:\(([A-Ja-j])\)|([A-J])(?=$|[.:,;)\]]|\s+(?![a-z])))")
_NUM_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_POW10_RE = re.compile(r"^\s*(?:[x×*]|\\times)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
_FRACTION_RE = re.compile(r"^\s*/\s*(\d+(?:\.\d+)?)")
# Single letters "m"/"b" are left out: metres and bytes are as common as millions and billions.
_SCALE = {"thousand": 1e3, "k": 1e3, "million": 1e6, "millions": 1e6, "mn": 1e6, "billion": 1e9, "billions": 1e9,
          "bn": 1e9, "trillion": 1e12}
_CURRENCY_RE = re.compile(r"[$£€¥₹]|\b(?:usd|us|rmb|eur|gbp|cny|dollars?|yuan|euros?)\b", re.IGNORECASE)
_PERCENT_RE = re.compile(r"%|\bper\s*cent\b|\bpercent(?:age)?\b", re.IGNORECASE)
_APPROX_RE = re.compile(r"\b(?:approximately|approx\.?|about|around|roughly|nearly)\b|[~≈]", re.IGNORECASE)
# Words after a number that are not its unit ("12 of them", "3 in 2020").
_NOT_UNITS = frozenset("of and or in on at by to for from with the a an is was were are as per which that this "
                       "than if so but because when where while after before over under each".split())
_UNIT_ALIASES = {"yr": "year", "yrs": "year", "mo": "month", "mos": "month", "mth": "month", "wk": "week",
                 "hr": "hour", "hrs": "hour", "min": "minute", "mins": "minute", "sec": "second", "secs": "second",
                 "kilometre": "km", "kilometer": "km", "kilometres": "km", "kilometers": "km", "kg": "kilogram",
                 "people": "person", "persons": "person"}


def final_text(response: str, opens_thinking: bool = False) -> str | None:
    """The text after the last </think>; None when the thinking was opened (by the prompt or the response) and
    never closed (reasoning cut off); the whole response when there was no thinking."""
    text = response
    for tok in _SPECIAL:
        text = text.replace(tok, "")
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if opens_thinking or "<think>" in text:
        return None
    return text


def clean_answer(ans: str) -> str | None:
    """Strip an extracted answer: leading ":", the text after a blank line, trailing punctuation, backticks, boxed."""
    ans = ans.strip().lstrip(":").strip()
    ans = ans.split("\n\n", 1)[0]
    ans = ans.rstrip(" \t\n.。;,!`").strip().strip("`").strip()
    boxed = _BOXED_RE.match(ans)
    if boxed:
        ans = boxed.group(1).strip()
    return ans or None


def answer_after(text: str, phrase: re.Pattern = ANSWER_RE) -> str | None:
    """The cleaned text after the last `phrase` in `text` (markdown bold removed first), or None."""
    text = text.replace("*", "")
    matches = list(phrase.finditer(text))
    if not matches:
        return None
    return clean_answer(text[matches[-1].end() :])


def extract_answer(response: str, require_think: bool = False) -> str | None:
    """The final answer of a response: the text after the last "the answer is" in its final text, or None."""
    text = final_text(response, opens_thinking=require_think)
    return None if text is None else answer_after(text)


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
    decimals: int  # decimals as written (after the point)
    unit: str | None = None  # the word after the number (scale words, currency and percent excluded), normalised


def _unit(word: str) -> str:
    w = word.lower()
    w = _UNIT_ALIASES.get(w, w)
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return _UNIT_ALIASES.get(w, w)


def _parse_one(m: re.Match, rest: str) -> Number:
    raw = m.group(0).replace(",", "")
    mant = raw.split("e")[0].split("E")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    value = float(raw)
    if p := _POW10_RE.match(rest):  # 1.2 x 10^6
        value *= 10.0 ** int(p.group(1))
        rest = rest[p.end() :]
    elif f := _FRACTION_RE.match(rest):  # 3/4
        if float(f.group(1)) != 0:
            value /= float(f.group(1))
            decimals = max(decimals, 3)
        rest = rest[f.end() :]
    unit = None
    word = re.match(r"\s+([A-Za-z]+)\b", rest) or re.match(r"([A-Za-z]+)\b", rest)
    if word and word.group(1).lower() in _SCALE:
        value *= _SCALE[word.group(1).lower()]
        rest = rest[word.end() :]
        word = re.match(r"\s+([A-Za-z]+)\b", rest)
    if word and word.group(1).lower() not in _NOT_UNITS:
        unit = _unit(word.group(1))
    return Number(value, decimals, unit)


def _clean_numeric(s: str) -> str:
    s = s.strip()
    # a parenthesised aside goes first ("60 (= 48 + 12)"), unless it holds the only number ("(3.2)")
    bare = re.sub(r"\([^()]*\)", " ", s)
    if _NUM_RE.search(bare):
        s = bare
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
    except (ValueError, OverflowError):
        return None


def numeric_gold(gold: str) -> Number | None:
    """The gold's number if the gold is one number (with optional currency, %, scale word, one unit word), else None."""
    s = _clean_numeric(gold)
    nums = list(_NUM_RE.finditer(s))
    if len(nums) != 1:
        return None
    m = nums[0]
    before, after = s[: m.start()].strip(), s[m.end() :].strip()
    after_words = [w for w in re.findall(r"[A-Za-z]+", after) if w.lower() not in _SCALE]
    if before.strip(" ()") or len(after_words) > 1 or re.search(r"\d", _POW10_RE.sub("", after)):
        return None
    try:
        return _parse_one(m, s[m.end() :])
    except (ValueError, OverflowError):
        return None


def _round3(x: float) -> float:
    return math.copysign(math.floor(abs(x) * 1000 + 0.5 + 1e-9), x) / 1000


# Rescales a prediction may differ from the gold by: percent vs fraction, and units of thousands / millions /
# billions (the recipe's docmath.compare_two_numbers has x100 and x1000, and accepts every power of ten).
RESCALES = (1.0, 100.0, 0.01, 1e3, 1e-3, 1e6, 1e-6, 1e9, 1e-9)


def numbers_match(pred: Number, gold: Number, rel_tol: float = 1.5e-3) -> bool:
    """See the module docstring: tolerance, rescales, 3-decimal rounding, units; signs must agree."""
    if pred.unit and gold.unit and pred.unit != gold.unit:
        return False
    for scale in RESCALES:
        g = gold.value * scale
        if abs(pred.value - g) <= rel_tol * abs(g) or pred.value == g:
            return True
    return abs(gold.value) >= 5e-4 and _round3(pred.value) == _round3(gold.value)


def choice_letter(pred: str) -> str | None:
    m = _MC_PRED_RE.match(pred.strip())
    if not m:
        return None
    return (m.group(1) or m.group(2)).upper()


def gold_letter(gold: str) -> str | None:
    """The option letter of a multiple-choice gold: "B", "(B)" or "The correct answer is (B)"; else None."""
    text = answer_after(gold, CORRECT_RE) if CORRECT_RE.search(gold) else gold.strip()
    if text is None:
        return None
    m = _MC_GOLD_RE.match(text.strip())
    return m.group(1) if m else None


def parse_gold(gold: str) -> str:
    """A stored gold answer: the text after its last "the answer is" when it is a sentence, else the gold itself."""
    if ANSWER_RE.search(gold):
        return answer_after(gold) or gold.strip()
    return gold.strip()


@dataclass(frozen=True)
class RuleResult:
    score: float  # 1.0 correct, 0.0 not (the reward before the judge)
    pred: str | None  # the extracted answer, None when the response has none
    method: str  # "mc", "numeric", "sub_em" (the rule that decided, for the best gold) or "no_answer"
    em: float
    f1: float
    golds: tuple[str, ...] = ()  # the parsed golds (what the judge compares with)
    judgeable: bool = True  # whether the LLM judge may be asked when the score is 0 (never for multiple choice)
