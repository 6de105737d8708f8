"""Loading a checkpoint straight into FSDP2 shards (qlfast/parallel/sharded_load.py) and the KL reference sharded
like the policy (qlfast/trainer/reference.py), under torchrun with 2 ranks (gloo); checks in _worker_sharded.py."""

import os
from pathlib import Path

import pytest
import torch

from qlfast.model import QwenForCausalLM
from qlfast.testing import run_torchrun

WORKER = str(Path(__file__).with_name("_worker_sharded.py"))
# 101M parameters, 405 MB in fp32; the largest tensors (embedding, head) 67 MB each; several files
BIG = dict(model_type="qwen2", vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
SMALL = dict(model_type="qwen3", vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
             tie_word_embeddings=False)


@pytest.mark.dist
def test_sharded_load_holds_a_share_per_rank(tmp_path):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak RSS")
    model = QwenForCausalLM.from_config(BIG, seed=0)
    model.save_pretrained(tmp_path / "big", max_shard_bytes=128 * 2**20)
    del model
    QwenForCausalLM.from_config(SMALL, seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "small")
    # glibc returns freed blocks to the OS at once, so the RSS high-water mark tracks live tensors
    out = run_torchrun(WORKER, "load", str(tmp_path / "big"), str(tmp_path / "small"), nproc=2, timeout=600,
                       env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert "OK load" in out
    print("\n".join(line for line in out.splitlines() if "RSS growth" in line or "outputs" in line))


@pytest.mark.dist
def test_fsdp2_reference_matches_replicated(tmp_path):
    QwenForCausalLM.from_config(SMALL, seed=0).save_pretrained(tmp_path / "policy")
    ref = QwenForCausalLM.from_config(SMALL, seed=0)
    with torch.no_grad():  # the reference differs from the policy, so that the KL term is not zero
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ref.save_pretrained(tmp_path / "reference")
    out = run_torchrun(WORKER, "reference", str(tmp_path / "policy"), str(tmp_path / "reference"), nproc=2,
                       timeout=600)
    assert "OK reference" in out
    print("\n".join(line for line in out.splitlines() if "KL" in line))
