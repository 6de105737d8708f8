"""The README's "Using the ops from another trainer" snippet runs as written on a transformers Qwen2 and gives the
full-logits loss and gradients."""

import re
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qlfast.ops import PolicyLossConfig
from qlfast.ref.policy_loss import policy_loss_reference


def _snippet() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Using the ops from another trainer.*?```python\n(.*?)```", text, re.S)
    assert block, "README has no python block under 'Using the ops from another trainer'"
    return block.group(1)


def test_readme_snippet_matches_full_logits_reference():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).float()
    b, t = 2, 23
    input_ids = torch.randint(0, 301, (b, t))
    targets = torch.roll(input_ids, -1, dims=1).flatten()
    advantages = torch.randn(b * t)
    mask = (torch.rand(b * t) > 0.3).float()
    old_logprob = -torch.rand(b * t) * 6
    scope = {"model": model, "input_ids": input_ids, "targets": targets, "advantages": advantages, "mask": mask,
             "old_logprob": old_logprob}
    exec(_snippet(), scope)  # runs the README's lines, including loss.backward()
    grads = [p.grad.clone() for p in (model.lm_head.weight, model.model.embed_tokens.weight)]
    model.zero_grad()
    hidden = model.model(input_ids).last_hidden_state.flatten(0, 1)
    ref, _ = policy_loss_reference(hidden, model.lm_head.weight, targets, advantages, mask, old_logprob=old_logprob,
                                   config=PolicyLossConfig(clip_high=0.28))
    ref.backward()
    assert torch.allclose(scope["loss"], ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, (model.lm_head.weight, model.model.embed_tokens.weight)):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
