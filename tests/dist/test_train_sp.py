"""The trainer's update steps under sequence parallel (gloo, no rollout engine): sp=2 with ring, Ulysses and
ring + FSDP2 (2 ranks), and sp=4 hybrid (4 ranks), equal the replicated data-parallel step. The whole run
(`--model.sp=2` vs replicated, metrics step by step) is test_train_e2e.py's test_sp2_run_matches_the_replicated_run,
which shares the replicated run's fixture."""

from pathlib import Path

import pytest

from qlfast.testing import run_torchrun


@pytest.mark.dist
def test_sp2_update_steps_match_replicated():
    out = run_torchrun(str(Path(__file__).with_name("_worker_train_sp.py")), nproc=2, timeout=300)
    assert out.count("OK ") == 9, out[-4000:]


@pytest.mark.dist
def test_sp4_hybrid_update_steps_match_replicated():
    """--model.sp_attention=hybrid on 4 ranks: Ulysses inside pairs of ranks, ring across the two pairs."""
    out = run_torchrun(str(Path(__file__).with_name("_worker_train_sp.py")), "4", "hybrid", nproc=4, timeout=300)
    assert out.count("OK ") == 3, out[-4000:]
