"""QwenForCausalLM under torchrun (2 ranks, gloo): FSDP2 data parallel and ring/Ulysses sequence parallel give the
single-process gradients."""

from pathlib import Path

import pytest

from qlfast.testing import run_torchrun

WORKER = str(Path(__file__).with_name("_worker_model.py"))


@pytest.mark.dist
def test_fsdp2_dp2_matches_dp1():
    assert "OK dp" in run_torchrun(WORKER, "dp", nproc=2)


@pytest.mark.dist
def test_sequence_parallel_sp2_matches_sp1():
    assert "OK sp" in run_torchrun(WORKER, "sp", nproc=2)
