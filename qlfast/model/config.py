"""Model configuration: the Hugging Face config (Qwen2Config / Qwen3Config) as is, plus the runtime options.

The architecture lives in the HF config object so that `save_pretrained` writes back exactly what transformers and
vLLM read; `ModelOptions` holds how we run it (attention backend, checkpointing, offload, tiling), none of which
changes the math.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from transformers import AutoConfig, PretrainedConfig

SUPPORTED = ("qwen2", "qwen3")


@dataclasses.dataclass
class ModelOptions:
    """How the model runs; every combination gives the same outputs and gradients up to rounding."""

    attn_backend: str = "auto"
    """qlfast.ops.flash_attention backend: "auto" (triton on CUDA, sdpa on CPU) | "triton" | "torch" | "sdpa" (CPU) |
    "flash_attn" (CUDA, the flash-attn package)."""
    attention_fn: Callable | None = None
    """Sequence-parallel attention: fn(q, k, v, cu_seqlens, max_seqlen) -> out (T, Hq, D) (or (out, lse))."""
    checkpoint: bool = False
    """Per-layer activation checkpointing (torch.utils.checkpoint, use_reentrant=False)."""
    offload: bool = False
    """With checkpoint: keep each layer's saved input in pinned CPU memory (ALST checkpoint offload)."""
    tiled_mlp: bool = False
    """Run the MLP over sequence tiles and recompute per tile in backward (only one tile's intermediate live)."""
    mlp_tile_tokens: int = 4096
    """Tokens per MLP tile when tiled_mlp."""
    use_liger: bool = False
    """Liger-Kernel RMSNorm / SwiGLU on CUDA tensors (needs liger_kernel): opt-in, never switched on by an install."""


def load_config(config) -> PretrainedConfig:
    """A Qwen2/Qwen3 PretrainedConfig from a PretrainedConfig, a dict (with model_type), or a directory/config.json."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            config = AutoConfig.from_pretrained(path)
        else:
            with open(path) as f:
                config = json.load(f)
    if isinstance(config, dict):
        d = dict(config)
        model_type = d.pop("model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"config: model_type must be one of {SUPPORTED}, got {model_type!r}")
        config = AutoConfig.for_model(model_type, **d)
    if not isinstance(config, PretrainedConfig):
        raise ValueError(f"config: expected a PretrainedConfig, dict or path, got {type(config).__name__}")
    if config.model_type not in SUPPORTED:
        raise ValueError(f"config: model_type must be one of {SUPPORTED}, got {config.model_type!r}")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("config: use_sliding_window=True is not supported (full causal attention only)")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"config: num_attention_heads={config.num_attention_heads} must be a multiple of "
                         f"num_key_value_heads={config.num_key_value_heads}")
    if config.hidden_act != "silu":
        raise ValueError(f"config: hidden_act must be 'silu' (SwiGLU), got {config.hidden_act!r}")
    if not config.architectures:
        config.architectures = ["Qwen2ForCausalLM" if config.model_type == "qwen2" else "Qwen3ForCausalLM"]
    return config


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qkv_bias(config) -> bool:
    """Qwen2 has q/k/v biases; Qwen3 has none unless attention_bias says so."""
    if config.model_type == "qwen2":
        return True
    return bool(getattr(config, "attention_bias", False))


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def rope_type(config) -> str:
    """The RoPE variant: transformers 5 keeps it in rope_parameters, 4.x in rope_scaling ("type" or "rope_type")."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_type" in params:
        return params["rope_type"]
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default"))
