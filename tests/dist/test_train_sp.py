"""The trainer's update steps under sequence parallel (2 ranks, gloo, no rollout engine): sp=2 with ring, Ulysses and
ring + FSDP2 equal the replicated data-parallel step. The whole run (`--model.sp=2` vs replicated, metrics step by
step) is test_train_e2e.py's test_sp2_run_matches_the_replicated_run, which shares the replicated run's fixture."""

from pathlib import Path

import pytest

from qlfast.testing import run_torchrun


@pytest.mark.dist
def test_sp2_update_steps_match_replicated():
    out = run_torchrun(str(Path(__file__).with_name("_worker_train_sp.py")), nproc=2, timeout=300)
    assert out.count("OK ") == 8, out[-4000:]
