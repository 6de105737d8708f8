"""Qwen2/Qwen3 decoder with HF parameter names, packed varlen input and a memory-lean backward."""

from qlfast.model.config import ModelOptions, load_config
from qlfast.model.qwen import QwenForCausalLM, positions_from_cu_seqlens, token_logprobs

__all__ = ["ModelOptions", "QwenForCausalLM", "load_config", "positions_from_cu_seqlens", "token_logprobs"]
