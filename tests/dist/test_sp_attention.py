"""Sequence-parallel attention under torchrun (gloo on CPU): ring (zigzag) and Ulysses outputs and dq, dk, dv equal
single-process attention on the gathered packed batch (lengths 37, 130, 64 plus padding; fp64 and fp32; GQA; kv
head replication; a sequence shorter than 2W; non-causal), and bad inputs raise on every rank instead of hanging.
The assertions run inside tests/dist/_worker_sp_attention.py on every rank."""

from pathlib import Path

import pytest

from qlfast.testing import run_torchrun

WORKER = str(Path(__file__).resolve().parent / "_worker_sp_attention.py")


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_sp_attention_matches_single_process(nproc):
    out = run_torchrun(WORKER, "all", nproc=nproc, timeout=300)
    assert f"sp_attention worker OK (W={nproc}, all)" in out


@pytest.mark.dist
def test_ring_attention_three_ranks():
    """W=3: an odd ring, where the zigzag chunk pairs (0,5), (1,4), (2,3) and the dk/dv hops are all distinct."""
    out = run_torchrun(WORKER, "ring", nproc=3, timeout=300)
    assert "sp_attention worker OK (W=3, ring)" in out
