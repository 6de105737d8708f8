"""rl_step.collect keeps the groups that DAPO dynamic sampling (qlfast/rl/dynamic_sampling.py) decides, on the
answer rewards: one process with a table-driven engine, and two ranks (torchrun, gloo) that must stop after the
same round."""

from pathlib import Path

import pytest
import torch
from _worker_collect import MAX_TOKENS, make_context

from qlfast.rl.dynamic_sampling import dynamic_sample
from qlfast.testing import run_torchrun
from qlfast.trainer import comm
from qlfast.trainer.rl_step import collect

KINDS = ["right", "wrong-overlong", "mixed", "wrong"]


def _env():
    return comm.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def test_collect_keeps_what_dynamic_sampling_decides():
    ctx, prompts = make_context(_env(), lambda i, call: KINDS[i % 4])
    kept, generated, rounds = collect(ctx, prompts, 0, 0, MAX_TOKENS)
    b = ctx.cfg.rl.batch_size
    assert len(generated) == b * rounds
    by_round = [generated[r * b:(r + 1) * b] for r in range(rounds)]
    res = dynamic_sample(lambda r: by_round[r], target=b, max_rounds=ctx.cfg.rl.max_gen_rounds)
    assert [id(g) for g in kept] == [id(g) for g in res.groups] and rounds == res.rounds
    assert kept and all(max(g.rewards) > min(g.rewards) for g in kept)
    # the rule is on the answer rewards: groups whose shaped rewards differ only by the overlong penalty are dropped
    length_only = [g for g in generated if max(g.shaped) > min(g.shaped) and max(g.rewards) == min(g.rewards)]
    assert length_only, "no all-wrong group with an overlong response was drawn: the check is vacuous"
    assert not {id(g) for g in length_only} & {id(g) for g in kept}
    # every generated group's rewards are in the difficulty table
    assert set(prompts.difficulty.records) == {g.uid for g in generated}


def test_collect_without_dynamic_sampling_keeps_one_round():
    ctx, prompts = make_context(_env(), lambda i, call: KINDS[i % 4], dynamic_sampling=False)
    kept, generated, rounds = collect(ctx, prompts, 0, 0, MAX_TOKENS)
    assert rounds == 1 and len(kept) == ctx.cfg.rl.batch_size and [id(g) for g in kept] == [id(g) for g in generated]


@pytest.mark.dist
def test_collect_ranks_stop_together():
    out = run_torchrun(str(Path(__file__).with_name("_worker_collect.py")), nproc=2, timeout=300)
    assert "OK collect" in out, out[-4000:]
