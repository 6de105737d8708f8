"""The trainer's rewards on DocQA-RL-schema parquet rows of each family are the recipe's.

Rows are written with pyarrow in the public DocQA-RL-1.6K layout (data_source, prompt chat list, ability,
reward_model.ground_truth as a stored sentence, extra_info), loaded with qlfast.data.docqa.load_docqa, rendered by the
trainer's own qlfast.trainer.build.render with a local tokenizer whose chat template ends the generation prompt with
"<think>\\n" (as DeepSeek-R1-Distill's does), and scored through qlfast.trainer.rl_step.generate_groups, the function
the trainer's rollout collection calls, with a scripted engine in place of vLLM. Nothing downloads.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from qlfast.config import Config
from qlfast.data import docqa, template
from qlfast.data import tokenizer as tok
from qlfast.reward.dispatch import opens_thinking, template_opens_thinking
from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import LLMJudge
from qlfast.trainer import build, comm, rl_step
from qlfast.trainer.context import RunContext

# DeepSeek-R1-Distill's template, shortened: the generation prompt opens the thinking.
R1_TEMPLATE = ("{%- for m in messages %}{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{%- endif %}"
               "{%- endfor %}{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}")

DOC = "Kestrel House reported revenue of 12.5 million dollars. Its vault code is 48. Heron House is twinned with it."
# data_source -> (question, stored ground truth, [(response, recipe's score, finish reason)])
ROWS = {
    "long_toc_choices_0_20000": ("Which chapter covers revenue? (A) 1 (B) 2 (C) 3 (D) 4", "The correct answer is (B)", [
        ("The table of contents lists revenue in chapter 2.\n</think>\n\nThe correct answer is (B)", 1.0, "stop"),
        ("Chapter 2 it is.</think>\n\nThe correct answer is B", 1.0, "stop"),
        ("Maybe chapter 3.</think>\n\nThe correct answer is (C)", 0.0, "stop"),
        ("The correct answer is (B), I think, but let me check chapter", 0.0, "length"),  # cut inside the thinking
    ]),
    "docmath_v1": ("What was the revenue in millions?", "Therefore, the answer is 12.5", [
        ("12.5 million.</think>\n\nTherefore, the answer is 12.5.", 1.0, "stop"),
        ("In millions.</think>\n\nTherefore, the answer is 12.51.", 1.0, "stop"),  # 0.08%
        ("Hmm.</think>\n\nTherefore, the answer is 12.6.", 0.0, "stop"),  # 0.8%
        ("So the answer is 12.5, and next I would", 0.0, "length"),
    ]),
    "musique_v1": ("Which house is twinned with Heron House?", "Therefore, the answer is Kestrel House.", [
        ("The twin is Kestrel.</think>\n\nTherefore, the answer is Kestrel House.", 1.0, "stop"),
        ("Twinned.</think>\n\nTherefore, the answer is kestrel house, in the north.", 1.0, "stop"),
        ("Not sure.</think>\n\nTherefore, the answer is Heron House.", 0.0, "stop"),
        ("I guess the answer is Kestrel House but", 0.0, "length"),
    ]),
    "multihoprag_v1": ("What is the vault code of the twin of Heron House?", "Therefore, the answer is 48.", [
        ("Kestrel's code.</think>\n\nTherefore, the answer is 48.", 1.0, "stop"),
        ("Code.</think>\n\nTherefore, the answer is **48**.", 1.0, "stop"),
        ("Code.</think>\n\nTherefore, the answer is 47.", 0.0, "stop"),
        ("The answer is 48 so far but", 0.0, "length"),
    ]),
}


def _write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ability = {"long_toc_choices": "doc-mc", "docmath": "doc-math"}
    rows = [{"data_source": src,
             "prompt": [{"role": "user", "content": template.build_user_prompt(DOC, q)}],
             "ability": next((v for k, v in ability.items() if k in src), "doc-qa"),
             "reward_model": {"style": "rule", "ground_truth": gold},
             "extra_info": {"index": j}} for j, (src, (q, gold, _)) in enumerate(ROWS.items())]
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def r1_tokenizer():
    t = tok.load_tokenizer(tok.build_tokenizer(1024))
    t.chat_template = R1_TEMPLATE
    return t


@dataclass
class _Sample:
    token_ids: list
    logprobs: list
    length: int
    finish_reason: str
    weight_version: int = 0


class ScriptedEngine:
    """generate(prompts, n, sampling): the scripted responses of each prompt's row, in order."""

    def __init__(self, tokenizer, by_prompt):
        self.tokenizer, self.by_prompt, self.prompts = tokenizer, by_prompt, []

    def generate(self, prompts, n=1, sampling=None):
        out = []
        for p in prompts:
            self.prompts.append(list(p))
            group = []
            for text, _, finish in self.by_prompt[tuple(p)][:n]:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if finish == "stop":
                    ids = ids + [self.tokenizer.eos_token_id]
                group.append(_Sample(ids, [0.0] * len(ids), len(ids), finish))
            out.append(group)
        return out


def _dataset(tmp_path, tokenizer):
    path = tmp_path / "docqa_rl.parquet"
    _write_parquet(path)
    examples = docqa.load_docqa(str(path)).examples
    prompt_ids = [build.render(tokenizer, ex)[0] for ex in examples]
    return SimpleNamespace(train=examples, prompt_ids=prompt_ids)


def _groups(ds, tokenizer, reward):
    by_prompt = {tuple(p): ROWS[ex.source][2] for ex, p in zip(ds.train, ds.prompt_ids)}
    cfg = Config()
    cfg.rl.group_size, cfg.rl.temperature, cfg.rl.top_p, cfg.rl.overlong_window = 4, 1.0, 1.0, 0
    env = comm.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    ctx = RunContext(cfg, env, tokenizer, None, ds, reward, engine=ScriptedEngine(tokenizer, by_prompt))
    return rl_step.generate_groups(ctx, list(range(len(ds.train))), max_tokens=64, seed=0)


def test_trainer_rewards_on_docqa_rl_rows_are_the_recipes(tmp_path, r1_tokenizer):
    ds = _dataset(tmp_path, r1_tokenizer)
    assert [ex.source for ex in ds.train] == list(ROWS)
    assert template_opens_thinking(r1_tokenizer)
    assert all(opens_thinking(r1_tokenizer, p) for p in ds.prompt_ids)  # read from the rendered prompt, no flag
    groups = _groups(ds, r1_tokenizer, HybridReward())
    for g in groups:
        assert g.rewards == [score for _, score, _ in ROWS[g.source][2]], g.source
        assert g.shaped == g.rewards


def test_the_same_rows_without_an_opened_think_keep_old_behaviour(tmp_path):
    """With the tiny tokenizer's template (no <think> in the generation prompt), a response without any think tags is
    a non-thinking model's answer: the cut-off responses above then count, as they would for such a model."""
    tiny = tok.load_tokenizer(tok.build_tokenizer(1024))
    assert not template_opens_thinking(tiny)
    ds = _dataset(tmp_path, tiny)
    assert not any(opens_thinking(tiny, p) for p in ds.prompt_ids)
    groups = _groups(ds, tiny, HybridReward())
    assert [g.rewards[3] for g in groups] == [1.0, 1.0, 1.0, 1.0]
    assert [g.rewards[:3] for g in groups] == [[s for _, s, _ in ROWS[g.source][2][:3]] for g in groups]


def test_trainer_judge_sees_parsed_answers_and_never_mc(tmp_path, r1_tokenizer):
    asked = []

    class Backend:
        def complete(self, convs):
            asked.extend(c[-1]["content"].split("Answer 1: ")[1] for c in convs)
            return ["Different. [[NO]]"] * len(convs)

    reward = HybridReward(LLMJudge(Backend()))
    reward.begin_step()
    groups = _groups(_dataset(tmp_path, r1_tokenizer), r1_tokenizer, reward)
    assert sorted(asked) == sorted(["12.6\nAnswer 2: 12.5\n", "Heron House\nAnswer 2: Kestrel House\n",
                                    "47\nAnswer 2: 48\n"])
    stats = reward.step_stats()
    assert (stats["judge_calls"], stats["judge_yes"], stats["judge_skipped"]) == (3, 0, 0)
    m = rl_step.step_metrics(groups, groups, stats)  # the row the trainer writes to metrics.jsonl
    assert m["judge_calls"] == 3 and m["judge_failures"] == 0 and m["judge_breaker_open"] == 0
    assert m["acc/long_toc_choices_0_20000"] == 0.5 and m["acc/docmath_v1"] == 0.5
