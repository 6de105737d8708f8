"""The rule reward per data source, as the QwenLong-L1 recipe dispatches it (verl reward_score/__init__.py).

The recipe picks its scorer by a substring of `data_source`, in this order; qlfast does the same:

| data_source contains   | family  | recipe file | gold (DocQA-RL-1.6K)          | rule                          |
|------------------------|---------|-------------|-------------------------------|-------------------------------|
| long_toc_choices       | mc      | long.py     | "The correct answer is (B)"   | option letter; never judged   |
| docmath                | docmath | docmath.py  | "...the answer is 12.5"       | numbers (qlfast.reward.rule)  |
| multihoprag, musique   | docqa   | docqa.py    | "Therefore, the answer is X." | sub-EM (numbers as numbers)   |
| anything else          | auto    | (raises)    | any                           | by the gold's form            |

The DocQA-RL-1.6K names seen in public copies are e.g. "long_toc_choices_0_20000", "docmath_v1" / "docmath_0_20000",
"multihoprag_v1", "musique_v1" (docs/reward.md says where each comes from); the substring rule covers them all.
`auto` (synthetic data, plain jsonl rows, any other benchmark) reads the gold: a letter ("B", "(B)", "The correct
answer is (B)") is multiple choice, one number (with optional unit) is numeric, anything else is sub-EM.

Every family parses stored golds with the same parser as responses ("...the answer is X" -> "X") and judges the
parsed gold. Multiple-choice answers are never sent to the LLM judge (the recipe's long.py has no judge).

Callers pass one `RewardItem` per response (response text, golds, question, data_source, whether the prompt opened
the thinking), or a DocQA example through `RewardItem.of`; `opens_thinking` reads that fact from the rendered prompt's
last tokens, so nobody has to remember a flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qlfast.reward.rule import (
    ANSWER_RE,
    CORRECT_RE,
    RuleResult,
    answer_after,
    choice_letter,
    exact_match,
    f1_score,
    final_text,
    gold_letter,
    numbers_match,
    numeric_gold,
    parse_gold,
    parse_number,
    sub_em,
)

MC, DOCMATH, DOCQA, AUTO = "mc", "docmath", "docqa", "auto"
# (substring of data_source, family), checked in the recipe's order
SOURCE_FAMILIES = (("long_toc_choices", MC), ("docmath", DOCMATH), ("multihoprag", DOCQA), ("musique", DOCQA))


def family_of(data_source: str | None) -> str:
    """The reward family of a data source (module docstring); `auto` for unknown or missing sources."""
    s = (data_source or "").lower()
    for key, family in SOURCE_FAMILIES:
        if key in s:
            return family
    return AUTO


@dataclass(frozen=True)
class RewardItem:
    """One response to score."""

    response: str  # the decoded response (special tokens may remain; they are stripped)
    golds: tuple[str, ...]  # stored gold answers (strings or "...the answer is X" sentences); the max is taken
    question: str = ""  # what the LLM judge sees as the problem
    data_source: str = ""  # picks the family (family_of)
    prompt_opens_thinking: bool = False  # the prompt ended in "<think>": no "</think>" in the response = no answer

    @classmethod
    def of(cls, example, response: str, prompt_opens_thinking: bool = False) -> RewardItem:
        """From a DocQA example (anything with .answers, .source, .question, .prompt)."""
        question = getattr(example, "question", None) or question_from_prompt(getattr(example, "prompt", None) or "")
        return cls(response, tuple(example.answers), question, getattr(example, "source", "") or "",
                   prompt_opens_thinking)


def question_from_prompt(prompt: str) -> str:
    """The question of a rendered QwenLong-L1 user message: the recipe's rule (docqa.py call_reward_model), the text
    between "</text>" and "Format your response as follows:"; the whole prompt when it is not in the template."""
    end, fmt = prompt.rfind("</text>"), prompt.rfind("Format your response as follows:")
    if end < 0 or fmt < end:
        return prompt.strip()
    return prompt[end + len("</text>") : fmt].strip()


def prompt_text_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside an open <think> (as R1-Distill's template does)."""
    return prompt.rstrip().endswith("<think>")


def opens_thinking(tokenizer, prompt_ids: Sequence[int]) -> bool:
    """`prompt_text_opens_thinking` of a tokenised prompt, from its last tokens (special tokens kept)."""
    tail = list(prompt_ids[-16:])
    if not tail:
        return False
    text = tokenizer.batch_decode([tail], skip_special_tokens=False)[0]
    return prompt_text_opens_thinking(text)


def template_opens_thinking(tokenizer) -> bool:
    """Whether the tokenizer's chat template opens the thinking in its generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                         add_generation_prompt=True)
    return prompt_text_opens_thinking(text)


# ---------------------------------------------------------------------------------------------------- scoring


def _mc_pred(text: str) -> str | None:
    """The answer of a multiple-choice response: after the last "the correct answer is" (long.py's phrase), else
    after the last "the answer is"."""
    return answer_after(text, CORRECT_RE) if CORRECT_RE.search(text) else answer_after(text, ANSWER_RE)


def _gold_kind(gold: str, family: str) -> tuple[str, str | None, object]:
    """(kind, parsed gold text, letter or Number): kind is "mc", "numeric" or "text"."""
    if family in (MC, AUTO):
        letter = gold_letter(gold)
        if letter is not None:
            return "mc", letter, letter
        if family == MC:  # a long_toc_choices gold that is no letter: scored as text, as auto would
            family = AUTO
    text = parse_gold(gold)
    if family in (DOCMATH, DOCQA, AUTO):
        number = numeric_gold(text) if family != DOCMATH else (numeric_gold(text) or parse_number(text))
        if number is not None:
            return "numeric", text, number
    return "text", text, None


def score_rule(item: RewardItem, *, rel_tol: float = 1.5e-3) -> RuleResult:
    """The rule score of one response: the max over its golds of its family's rule (module docstring)."""
    if not item.golds:
        raise ValueError("rule_score needs at least one gold answer")
    family = family_of(item.data_source)
    text = final_text(item.response, opens_thinking=item.prompt_opens_thinking)
    golds = [_gold_kind(g, family) for g in item.golds]
    parsed = tuple(g[1] for g in golds if g[1] is not None)
    judgeable = family != MC and all(kind != "mc" for kind, _, _ in golds)
    if text is None:
        return RuleResult(0.0, None, "no_answer", 0.0, 0.0, parsed, judgeable)
    plain = answer_after(text, ANSWER_RE)
    mc = _mc_pred(text) if any(kind == "mc" for kind, _, _ in golds) else None
    pred = mc if mc is not None else plain
    if pred is None:
        return RuleResult(0.0, None, "no_answer", 0.0, 0.0, parsed, judgeable)
    best, method = -1.0, "sub_em"
    for kind, gtext, value in golds:
        if kind == "mc":
            s = float(mc is not None and choice_letter(mc) == value)
        elif plain is None:
            s = 0.0
        elif kind == "numeric":
            p = parse_number(plain)
            s = float(p is not None and numbers_match(p, value, rel_tol))
        else:
            s = float(sub_em(plain, gtext))
        if s > best:
            best, method = s, {"mc": "mc", "numeric": "numeric"}.get(kind, "sub_em")
    em = max(float(exact_match(pred, g)) for g in parsed) if parsed else 0.0
    f1 = max(f1_score(pred, g) for g in parsed) if parsed else 0.0
    return RuleResult(best, pred, method, em, f1, parsed, judgeable)


def rule_score(response: str, golds: str | Sequence[str], *, rel_tol: float = 1.5e-3,
               require_think: bool = False) -> RuleResult:
    """Score one response against one or more gold answers with the `auto` family's rules (no data_source)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    return score_rule(RewardItem(response, tuple(golds), prompt_opens_thinking=require_think), rel_tol=rel_tol)
