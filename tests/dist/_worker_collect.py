"""Fakes for rl_step.collect (a rollout engine answering from a table, a one-token-per-character tokenizer, a tiny
dataset in one curriculum phase) and the torchrun worker of tests/dist/test_collect.py (2 ranks, gloo, no model):

rank 0's groups all have right and wrong answers, rank 1's first round is all right and its second mixed, so rank 0
fills its share of the batch in round 1 and rank 1 only in round 2: both must run two rounds (the stop is a
collective), rank 0 keeping its first round's groups (the second's are surplus), and both must hold the same
difficulty table (every generated group of both ranks).

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_collect.py
"""

from types import SimpleNamespace

from qlfast import config
from qlfast.data.docqa import DocQAExample
from qlfast.reward.hybrid import HybridReward
from qlfast.rl.curriculum import Phase, assign_bins
from qlfast.rollout.engine import Sample
from qlfast.trainer import comm
from qlfast.trainer.context import RunContext
from qlfast.trainer.rl_step import PromptSource, collect

G, MAX_TOKENS, WINDOW = 4, 24, 8  # responses longer than 24 - 8 = 16 tokens get DAPO's overlong penalty
RESPONSES = {  # kind -> the G responses to a question whose gold answer is `gold`
    "right": lambda gold: [f"the answer is {gold}"] * G,
    "wrong-overlong": lambda gold: ["no", "no", "x" * 22, "x" * 22],  # all wrong; shaped rewards differ by length
    "mixed": lambda gold: [f"the answer is {gold}", "no", "no", "no"],
    "wrong": lambda gold: ["no"] * G,
}


class CharTokenizer:
    eos_token_id = 0

    def batch_decode(self, seqs, skip_special_tokens=True):
        return ["".join(chr(t) for t in s if not (skip_special_tokens and t == 0)) for s in seqs]


class TableEngine:
    """generate(): each prompt's responses from RESPONSES[kind(index, call)], index = the prompt's first token - 1,
    call = how many generate calls came before."""

    def __init__(self, kind):
        self.kind, self.calls = kind, 0

    def generate(self, prompts, n=1, sampling=None):
        assert sampling.max_tokens == MAX_TOKENS and n == G
        out = []
        for p in prompts:
            i = p[0] - 1
            texts = RESPONSES[self.kind(i, self.calls)](str(i))
            out.append([Sample(tuple(map(ord, t)) + (0,), (-1.0,) * (len(t) + 1), "stop", len(t) + 1, 0)
                        for t in texts])
        self.calls += 1
        return out


def make_context(env, kind, *, n_examples=40, batch_size=4, max_rounds=3, dynamic_sampling=True):
    """-> (RunContext with a TableEngine, PromptSource) over n_examples questions with gold answers "0", "1", ..."""
    cfg = config.Config()
    cfg.rl.phases = (Phase(100, MAX_TOKENS, steps=1),)
    cfg.rl.batch_size, cfg.rl.group_size, cfg.rl.max_gen_rounds = batch_size, G, max_rounds
    cfg.rl.overlong_window, cfg.rl.dynamic_sampling = WINDOW, dynamic_sampling
    train = [DocQAExample(uid=f"q{i}", answers=[str(i)], document=f"doc {i}", question=f"question {i}?")
             for i in range(n_examples)]
    ds = SimpleNamespace(train=train, prompt_ids=[[i + 1, 7, 7] for i in range(n_examples)],
                         bins=assign_bins([3] * n_examples, [100]))
    ctx = RunContext(cfg, env, CharTokenizer(), None, ds, HybridReward(None))
    ctx.engine = TableEngine(kind)
    return ctx, PromptSource.build(cfg, ds)


def main():
    env = comm.init("cpu")
    ctx, prompts = make_context(env, lambda i, call: "mixed" if env.rank == 0 or call > 0 else "right")
    kept, generated, rounds = collect(ctx, prompts, 0, 0, MAX_TOKENS)
    assert comm.all_gather_objects(rounds) == [2, 2], rounds
    assert len(generated) == 2 * 2  # two rounds of this rank's 2 prompts
    expect = generated[:2] if env.rank == 0 else generated[2:]
    assert [id(g) for g in kept] == [id(g) for g in expect], (env.rank, [g.uid for g in kept])
    tables = comm.all_gather_objects(prompts.difficulty.state_dict())
    uids = {u for part in comm.all_gather_objects([g.uid for g in generated]) for u in part}
    assert tables[0] == tables[1] and set(tables[0]["records"]) == uids, tables
    if env.rank == 0:
        print("OK collect", flush=True)
    comm.shutdown()


if __name__ == "__main__":
    main()
