"""A TP=2 vLLM engine over two torchrun ranks (gloo, external_launcher) equals TP=1 engines, and takes the trainer's
weights in its shards (replicated and FSDP2-sharded trainer), one bucket at a time; its KV cache is the planner's.
The checks run on every rank in tests/dist/_worker_rollout_tp.py."""

import os

import pytest

pytest.importorskip("vllm")

from qlfast.rollout.tiny import make_tiny_qwen2_dir  # noqa: E402
from qlfast.testing import run_torchrun  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_worker_rollout_tp.py")


@pytest.mark.dist
def test_tp2_engine_equals_tp1_and_takes_the_trainers_weights(tmp_path):
    # 4 query and 2 KV heads of 32: each rank holds 2 and 1 (the tiny preset's single KV head, replicated on both
    # ranks, runs end to end in tests/dist/test_train_tp.py)
    model_dir = make_tiny_qwen2_dir(str(tmp_path / "tiny"), seed=0, heads=4, kv_heads=2)
    out = run_torchrun(WORKER, model_dir, "1", nproc=2, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=600)
    for rank in (0, 1):
        assert f"rank {rank} ok:" in out, out[-4000:]
