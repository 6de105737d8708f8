"""Hybrid reward (QwenLong-L1 section 3.4): reward = max(rule, judge), the judge asked only when the rule says 0.

Per response: the rule score (qlfast.reward.rule); if it is 0 and an answer was extracted and a judge is
configured, the LLM judge compares the extracted answer with the gold (several golds joined with " / ") for the
question; a failed judge call falls back to the rule score (counted in `stats["judge_failures"]`). Responses with
no extractable answer get 0 without asking the judge, as in the recipe. Optionally the DAPO overlong penalty is
added by the caller (qlfast.rl.overlong), not here: this module scores answers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qlfast.reward.judge import JudgeItem, LLMJudge
from qlfast.reward.rule import RuleResult, rule_score


@dataclass
class RewardDetail:
    reward: float  # max(rule, judge), the RL reward
    rule: float
    judge: float | None  # None when the judge was not asked or failed
    judge_failed: bool
    pred: str | None  # extracted answer (None: no "the answer is")
    method: str  # which rule decided: mc / numeric / sub_em / no_answer
    em: float
    f1: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class HybridReward:
    """Scores batches of responses; keeps running counters in `stats`."""

    def __init__(self, judge: LLMJudge | None = None, *, rel_tol: float = 1e-4, require_think: bool = False):
        self.judge = judge
        self.rel_tol = rel_tol
        self.require_think = require_think
        self.stats = {"scored": 0, "no_answer": 0, "judge_calls": 0, "judge_yes": 0, "judge_failures": 0}

    def score(self, responses: Sequence[str], golds: Sequence[str | Sequence[str]],
              questions: Sequence[str] | None = None) -> list[RewardDetail]:
        """One RewardDetail per response. `golds[i]` is a gold string or list; `questions` feed the judge."""
        if len(golds) != len(responses) or (questions is not None and len(questions) != len(responses)):
            raise ValueError(f"score: {len(responses)} responses, {len(golds)} golds, "
                             f"{None if questions is None else len(questions)} questions: lengths must match")
        rules: list[RuleResult] = [
            rule_score(r, g, rel_tol=self.rel_tol, require_think=self.require_think) for r, g in zip(responses, golds)
        ]
        verdicts: dict[int, float | None] = {}
        if self.judge is not None:
            ask = [i for i, r in enumerate(rules) if r.score == 0.0 and r.pred is not None]
            items = []
            for i in ask:
                g = golds[i]
                gold = g if isinstance(g, str) else " / ".join(g)
                items.append(JudgeItem(question="" if questions is None else questions[i], pred=rules[i].pred,
                                       gold=gold))
            before = self.judge.failures
            verdicts = dict(zip(ask, self.judge.judge(items)))
            self.stats["judge_calls"] += len(items)
            self.stats["judge_failures"] += self.judge.failures - before
        out = []
        for i, r in enumerate(rules):
            v = verdicts.get(i)
            failed = i in verdicts and v is None
            self.stats["judge_yes"] += int(v == 1.0)
            out.append(RewardDetail(reward=max(r.score, v or 0.0), rule=r.score, judge=v, judge_failed=failed,
                                    pred=r.pred, method=r.method, em=r.em, f1=r.f1))
        self.stats["scored"] += len(rules)
        self.stats["no_answer"] += sum(r.pred is None for r in rules)
        return out
