"""Hybrid reward (QwenLong-L1 section 3.4): reward = max(rule, judge), the judge asked only when the rule says 0.

Per response (a `RewardItem`, qlfast.reward.dispatch): the rule score of its data source's family; if it is 0, an
answer was extracted, the family may be judged (never multiple choice) and a judge is configured, the LLM judge
compares the extracted answer with the parsed gold (several golds joined with " / ") for the question. A judge that
failed, or was skipped (its circuit breaker open, or the time budget spent), leaves the rule score. Responses with
no extractable answer get 0 without asking the judge, as in the recipe. The DAPO overlong penalty is added by the
caller (qlfast.rl.overlong), not here: this module scores answers only.

Time budget: `budget_s` bounds the judge's wall time per RL step (from `begin_step()` to `step_stats()`), and per
`score*` call outside a step; the items left when it runs out keep their rule score and are counted as skipped.

Counters: `stats` holds running totals; `step_stats()` returns the judge's counts since `begin_step()` (calls, yes,
failures, skipped, truncated and unparsed verdicts, reply tokens, seconds, whether the breaker is open), which the
trainer sums over ranks into metrics.jsonl. Without a judge it returns {}.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from qlfast.reward.dispatch import RewardItem, family_of, opens_thinking, score_rule
from qlfast.reward.judge import JudgeItem, LLMJudge, Verdict

JUDGE_COUNTERS = ("judge_calls", "judge_yes", "judge_failures", "judge_skipped", "judge_truncated", "judge_unparsed",
                  "judge_reply_tokens", "judge_seconds")


@dataclass
class RewardDetail:
    reward: float  # max(rule, judge), the RL reward
    rule: float
    judge: float | None  # None when the judge was not asked, failed or was skipped
    judge_failed: bool
    pred: str | None  # extracted answer (None: no "the answer is")
    method: str  # which rule decided: mc / numeric / sub_em / no_answer
    em: float
    f1: float
    judge_skipped: bool = False  # the judge would have been asked but its breaker was open or its time ran out
    judge_truncated: bool = False  # the judge's reply was cut at its token limit
    family: str = "auto"  # the data source's reward family (qlfast.reward.dispatch.family_of)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class HybridReward:
    """Scores batches of responses; keeps running counters in `stats` and per-step judge counters."""

    def __init__(self, judge: LLMJudge | None = None, *, rel_tol: float = 1.5e-3, require_think: bool = False,
                 budget_s: float | None = None):
        self.judge = judge
        self.rel_tol = rel_tol
        self.require_think = require_think  # every prompt opened the thinking (normally read from the prompt)
        self.budget_s = budget_s if budget_s and budget_s > 0 else None
        self.stats = {"scored": 0, "no_answer": 0, "judge_calls": 0, "judge_yes": 0, "judge_failures": 0,
                      "judge_skipped": 0, "judge_truncated": 0, "judge_unparsed": 0}
        self._step = dict.fromkeys(JUDGE_COUNTERS, 0.0)
        self._step_deadline: float | None = None

    # ---- per-step accounting ------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Start an RL step: zero the step counters and start the step's judge time budget."""
        self._step = dict.fromkeys(JUDGE_COUNTERS, 0.0)
        self._step_deadline = None if self.budget_s is None else time.monotonic() + self.budget_s

    def step_stats(self) -> dict[str, float]:
        """The judge's counters since begin_step() (sums, so that ranks add up), and end the step's budget."""
        self._step_deadline = None
        if self.judge is None:
            return {}
        return {**self._step, "judge_breaker_open": float(self.judge.breaker.state != "closed")}

    def _deadline(self) -> float | None:
        if self._step_deadline is not None:
            return self._step_deadline
        return None if self.budget_s is None else time.monotonic() + self.budget_s

    # ---- scoring --------------------------------------------------------------------------------------------------

    def score_items(self, items: Sequence[RewardItem]) -> list[RewardDetail]:
        """One RewardDetail per item (qlfast.reward.dispatch.RewardItem)."""
        if self.require_think:
            items = [RewardItem(it.response, it.golds, it.question, it.data_source, True) for it in items]
        rules = [score_rule(it, rel_tol=self.rel_tol) for it in items]
        verdicts: dict[int, Verdict] = {}
        if self.judge is not None:
            ask = [i for i, r in enumerate(rules) if r.score == 0.0 and r.pred is not None and r.judgeable]
            jitems = [JudgeItem(question=items[i].question, pred=rules[i].pred, gold=" / ".join(rules[i].golds))
                      for i in ask]
            t0 = time.perf_counter()
            verdicts = dict(zip(ask, self.judge.verdicts(jitems, deadline=self._deadline())))
            self._count(list(verdicts.values()), time.perf_counter() - t0 if ask else 0.0)
        out = []
        for i, (it, r) in enumerate(zip(items, rules)):
            v = verdicts.get(i)
            out.append(RewardDetail(
                reward=max(r.score, (v.value if v is not None else None) or 0.0), rule=r.score,
                judge=None if v is None else v.value, judge_failed=bool(v and v.failed), pred=r.pred,
                method=r.method, em=r.em, f1=r.f1, judge_skipped=bool(v and v.skipped),
                judge_truncated=bool(v and v.truncated), family=family_of(it.data_source)))
        self.stats["scored"] += len(rules)
        self.stats["no_answer"] += sum(r.pred is None for r in rules)
        return out

    def _count(self, vs: list[Verdict], seconds: float) -> None:
        counts = {"judge_calls": sum(not v.skipped for v in vs), "judge_yes": sum(v.value == 1.0 for v in vs),
                  "judge_failures": sum(v.failed for v in vs), "judge_skipped": sum(v.skipped for v in vs),
                  "judge_truncated": sum(v.truncated for v in vs),
                  "judge_unparsed": sum(not v.parsed for v in vs if v.value is not None)}
        for k, n in counts.items():
            self.stats[k] += n
            self._step[k] += n
        self._step["judge_reply_tokens"] += sum(v.tokens or 0 for v in vs)
        self._step["judge_seconds"] += seconds

    def score(self, responses: Sequence[str], golds: Sequence[str | Sequence[str]],
              questions: Sequence[str] | None = None, *, data_sources: Sequence[str] | None = None,
              prompt_opens_thinking: Sequence[bool] | None = None) -> list[RewardDetail]:
        """One RewardDetail per response. `golds[i]` is a gold string or list; `questions` feed the judge;
        `data_sources` pick each response's family; `prompt_opens_thinking[i]`: the prompt ended in "<think>"."""
        n = len(responses)
        for name, seq in (("golds", golds), ("questions", questions), ("data_sources", data_sources),
                          ("prompt_opens_thinking", prompt_opens_thinking)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"score: {n} responses but {len(seq)} {name}: lengths must match")
        items = [RewardItem(r, (g,) if isinstance(g, str) else tuple(g), "" if questions is None else questions[i],
                            "" if data_sources is None else data_sources[i],
                            bool(prompt_opens_thinking and prompt_opens_thinking[i]))
                 for i, (r, g) in enumerate(zip(responses, golds))]
        return self.score_items(items)

    def score_examples(self, responses: Sequence[str], examples: Sequence, prompt_ids: Sequence[Sequence[int]],
                       tokenizer) -> list[RewardDetail]:
        """Score responses to DocQA examples (gold, question, data_source from the example) rendered as `prompt_ids`:
        whether each prompt opened the thinking is read from its last tokens. What the trainer and qlfast.eval call."""
        if not len(responses) == len(examples) == len(prompt_ids):
            raise ValueError(f"score_examples: {len(responses)} responses, {len(examples)} examples, "
                             f"{len(prompt_ids)} prompts: lengths must match")
        seen: dict[int, bool] = {}
        items = []
        for r, ex, ids in zip(responses, examples, prompt_ids):
            if id(ids) not in seen:  # a group's responses share one prompt
                seen[id(ids)] = opens_thinking(tokenizer, ids)
            items.append(RewardItem.of(ex, r, seen[id(ids)]))
        return self.score_items(items)

