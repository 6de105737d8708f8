"""Each rank's colocated engine receives the FSDP2 trainer's weights (torchrun, 2 ranks, gloo, external_launcher)."""

import os

import pytest

pytest.importorskip("vllm")

from qlfast.rollout.tiny import make_tiny_qwen2_dir  # noqa: E402
from qlfast.testing import run_torchrun  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_worker_rollout.py")


@pytest.mark.dist
def test_each_rank_engine_gets_the_update(tmp_path):
    model_dir = make_tiny_qwen2_dir(str(tmp_path / "tiny"), seed=0)
    out = run_torchrun(WORKER, model_dir, nproc=2, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    for rank in (0, 1):
        assert f"rank {rank} ok: version 1" in out, out[-4000:]
