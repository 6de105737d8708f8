"""Qwen2 / Qwen3 decoder over packed (varlen) sequences, with transformers' parameter names.

    model = QwenForCausalLM.from_pretrained(path)                 # or .from_config(dict | PretrainedConfig | path)
    hidden = model(input_ids, position_ids, cu_seqlens)           # (T,), (T,), (S+1,) int32 -> (T, H)
    logprob = linear_logprob(hidden, model.lm_head_weight, targets)

The forward stops at the final norm: the LM head only ever runs through qlfast.ops.linear_logprob / policy_loss,
so the (T, V) logits never exist. No padding anywhere: S sequences are concatenated into T tokens, cu_seqlens marks
their boundaries, position ids restart per sequence, attention is causal within each sequence.

Per layer (pre-norm, Qwen2 = Llama + qkv bias; Qwen3 = no qkv bias + RMSNorm over each head of q and k):
    h = x + o_proj(attn(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n))),  n = rmsnorm(x)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                                   m = rmsnorm(h)

Memory (options in ModelOptions, all gradient-neutral): per-layer activation checkpointing keeps only each layer's
input x (T, H) between forward and backward; `offload` moves those inputs to pinned CPU memory (ALST, Bekman et al.
2025, sec. 3.3; qlfast/model/activation_checkpoint.py); `tiled_mlp` keeps one tile's (T_tile, I) intermediates
instead of (T, I).

Host syncs: forward reads cu_seqlens on the host once (to check it and find max_seqlen; none when the caller passes
max_seqlen without a prefix); the layers never do.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from qlfast.model import activation_checkpoint as ckpt
from qlfast.model import io
from qlfast.model.config import ModelOptions, head_dim, load_config, qkv_bias
from qlfast.model.rope import RotaryEmbedding, apply_rope
from qlfast.model.tiled_mlp import swiglu_mlp, tiled_mlp
from qlfast.ops.flash_attention import TABLE as ATTENTION_BACKENDS
from qlfast.ops.flash_attention import check_cu_seqlens, flash_attention
from qlfast.ops.shared_prefix import SharedPrefix, check_layout, shared_prefix_attention


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) exactly as HF's Qwen2RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_liger = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_liger and x.is_cuda:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            # offset 0, "llama" casting (fp32 normalisation, weight applied in the input dtype), not in place
            return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim(config)
        h, bias = config.hidden_size, qkv_bias(config)
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, opts: ModelOptions, prefix: SharedPrefix | None = None):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)
        # cu_seqlens were checked once in QwenForCausalLM.forward: no layer reads them on the host (check=False)
        if prefix is not None:  # prompt-shared packing (qlfast/ops/shared_prefix.py)
            out, _ = shared_prefix_attention(q, k, v, cu_seqlens, prefix, max_seqlen=max_seqlen,
                                             softmax_scale=self.scale, backend=opts.attn_backend, check=False)
        elif opts.attention_fn is not None:
            out = opts.attention_fn(q, k, v, cu_seqlens, max_seqlen)
            out = out[0] if isinstance(out, tuple) else out
        else:
            out, _ = flash_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, causal=True, softmax_scale=self.scale,
                                     backend=opts.attn_backend, check=False)
        return self.o_proj(out.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.use_liger = False

    def forward(self, x: torch.Tensor, opts: ModelOptions) -> torch.Tensor:
        w = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        if opts.tiled_mlp and x.shape[0] > opts.mlp_tile_tokens:
            return tiled_mlp(x, *w, tile_tokens=opts.mlp_tile_tokens, use_liger=self.use_liger)
        return swiglu_mlp(x, *w, use_liger=self.use_liger)


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, opts: ModelOptions, prefix: SharedPrefix | None = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, opts, prefix)
        return h + self.mlp(self.post_attention_layernorm(h), opts)


class QwenModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(S+1,) boundaries -> (T,) int64 position ids restarting at 0 in every sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


class QwenForCausalLM(nn.Module):
    """Qwen2ForCausalLM / Qwen3ForCausalLM parameters, packed varlen forward to the final hidden states."""

    def __init__(self, config, options: ModelOptions | None = None):
        super().__init__()
        self.config = load_config(config)
        self.options = options or ModelOptions()
        self.model = QwenModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self._offloader = ckpt.ActivationOffloader()
        self.set_options()

    # --- construction and I/O -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, options: ModelOptions | None = None, *, dtype=None, device=None, seed=None):
        """Random init as HF does: normal(0, initializer_range) weights, zero biases, unit norms, zero padding row.

        Built directly on `device` (a 7B model never passes through CPU memory when device is a GPU)."""
        with torch.device(device or "cpu"):
            model = cls(config, options)
        model.init_weights(seed)
        return model.to(dtype=dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, options: ModelOptions | None = None):
        """Load config.json + model.safetensors (or a sharded index) from a Hugging Face model directory."""
        with torch.device("meta"):
            model = cls(load_config(path), options)
        io.load_weights(model, path, dtype=dtype, device=device)
        return model

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int = 4 * 2**30, dtype=None):
        """Write config.json + safetensors (sharded with an index past max_shard_bytes, in `dtype` if given, else as
        stored), the tokenizer if given, and the source directory's generation_config.json if it had one."""
        io.save(self, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, dtype=dtype)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        dev = self.model.embed_tokens.weight.device
        gen = torch.Generator(device=dev)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.normal_(0.0, std, generator=gen)
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    mod.bias.zero_()
                if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
                    mod.weight[mod.padding_idx].zero_()
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
        rot = self.model.rotary_emb
        rot.inv_freq = RotaryEmbedding(self.config).inv_freq.to(rot.inv_freq.device)

    def set_options(self, **changes):
        """Update ModelOptions fields (e.g. checkpoint=True, offload=True, attention_fn=...)."""
        for k, v in changes.items():
            if not hasattr(self.options, k):
                raise ValueError(f"set_options: unknown option {k!r}; see qlfast.model.config.ModelOptions")
            setattr(self.options, k, v)
        if self.options.offload and not self.options.checkpoint:
            raise ValueError("set_options: offload=True needs checkpoint=True (it offloads the checkpointed inputs)")
        if self.options.attn_backend not in ATTENTION_BACKENDS.names:
            raise ValueError(f"set_options: attn_backend must be one of {ATTENTION_BACKENDS.names}, got "
                             f"{self.options.attn_backend!r}")
        # Liger only when asked for: an installed liger_kernel must not silently change what "qlfast" measures
        use_liger = bool(self.options.use_liger)
        if use_liger and not _liger_available():
            raise ValueError("set_options: use_liger=True but liger_kernel is not installed")
        for mod in self.modules():
            if isinstance(mod, (RMSNorm, MLP)):
                mod.use_liger = use_liger
        return self

    def attention_backend(self, device=None) -> str:
        """The attention backend that runs for this model on `device` (its parameters' device by default): what
        options.attn_backend resolves to (qlfast.ops.flash_attention.TABLE), or "attention_fn" when one is set."""
        if self.options.attention_fn is not None:
            return "attention_fn"
        device = device or self.model.embed_tokens.weight.device
        return ATTENTION_BACKENDS.resolve(self.options.attn_backend, torch.device(device), d=head_dim(self.config),
                                dtype=self.model.embed_tokens.weight.dtype)

    # --- forward --------------------------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H): the output projection (the embedding when tie_word_embeddings)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                prefix: SharedPrefix | None = None) -> torch.Tensor:
        """input_ids (T,), position_ids (T,) (default: restart at every cu_seqlens boundary), cu_seqlens int32
        (S+1,) (default: one sequence) -> final-norm hidden states (T, H).

        prefix: prompt-shared packing (groups of [prompt | responses], see qlfast/ops/shared_prefix.py); the caller
        then gives position ids that continue each response from its prompt."""
        if prefix is not None and self.options.attention_fn is not None:
            raise ValueError("QwenForCausalLM: prompt-shared packing (prefix=...) does not combine with a "
                             "sequence-parallel attention_fn yet; pack sequences one by one under sequence parallel")
        if input_ids.dim() != 1:
            raise ValueError(f"QwenForCausalLM: input_ids must be packed (T,), got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=input_ids.device)
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"QwenForCausalLM: cu_seqlens must be int32 (S+1,), got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if self.options.attention_fn is not None:
            # sequence parallel: cu_seqlens is the attention_fn's packing (a hybrid plan's covers the Ulysses group's
            # tokens, not this rank's T), which its plan checked once per batch
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        elif max_seqlen is None or prefix is not None:
            # the one host read of the batch's bounds (a device sync): checked here, not in every layer
            bounds = check_cu_seqlens(cu_seqlens, t)
            if max_seqlen is None:
                max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, t)
        if position_ids.shape != (t,):
            raise ValueError(f"QwenForCausalLM: position_ids must be (T,) = ({t},), got {tuple(position_ids.shape)}")
        if prefix is not None:
            check_layout(cu_seqlens, prefix, t)  # once here; the layers skip the host-side checks
            prefix = prefix.to(input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (T, H)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (T, D) each
        opts = self.options
        offloader = self._offloader if opts.offload else None
        if offloader is not None:
            offloader.begin()
        for layer in self.model.layers:
            if opts.checkpoint and torch.is_grad_enabled():
                x = ckpt.checkpoint_layer(layer, x, cos, sin, cu_seqlens, max_seqlen, opts, prefix,
                                          offloader=offloader)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, opts, prefix)
        return self.model.norm(x)


def token_logprobs(model: QwenForCausalLM, input_ids, position_ids, cu_seqlens, targets, temperature: float = 1.0,
                   *, return_entropy: bool = False, backend: str = "auto"):
    """Per-token log p(targets | prefix) (T,) fp32 through linear_logprob (targets -100 are ignored and give 0)."""
    from qlfast.ops.linear_logprob import linear_logprob

    hidden = model(input_ids, position_ids, cu_seqlens)
    return linear_logprob(hidden, model.lm_head_weight, targets, temperature=temperature,
                          return_entropy=return_entropy, backend=backend)
