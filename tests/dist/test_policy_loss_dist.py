"""Data-parallel global normalisation of qlfast.ops.policy_loss under torchrun (2 ranks, gloo)."""

from pathlib import Path

import pytest

from qlfast.testing import run_torchrun


@pytest.mark.dist
def test_two_ranks_all_reduced_grads_equal_single_process():
    out = run_torchrun(str(Path(__file__).with_name("_worker_policy_loss.py")), nproc=2, timeout=300)
    assert out.count("policy_loss dist OK") == 2, out[-4000:]
