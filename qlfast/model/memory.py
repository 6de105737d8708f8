"""A memory model for one training step of QwenForCausalLM: predicted peak device memory, by part.

    parts = estimate(config, seq_len=60_000, sp=1, dp=1, options=MemoryOptions(offload=True))
    parts["total"] / 2**30  # GiB on each device; parts["host"]: pinned CPU memory for offloaded checkpoints

T = seq_len / sp tokens per rank, b = activation bytes, H hidden, I intermediate, Hq/Hkv heads of size D, L layers,
P parameters (P_l per layer, P_e in embedding + head + final norm), V vocab, dp = FSDP2 shards. b_p = bytes of the
compute-dtype parameters (2, bf16), b_m = bytes of the master weights (4: fp32 masters, qlfast/trainer/precision.py;
b_m = b_p: no separate masters), b_g = bytes of the gradients the optimizer sees (default b_m), s = optimizer state
(8: AdamW m and v in fp32). Masters and AdamW are b_m + s = 12 bytes per parameter before sharding, 16 with their
fp32 gradients. Parts (bytes per rank):

  params      P b_m / dp            masters (the FSDP2 shards; 0 on the device with CPUOffloadPolicy)
              + P b_p               replicated (dp = 1) with b_m > b_p: the compute-dtype working copy
              + (2 P_l + P_e) b_p   all-gathered layers in flight and the root, which stays gathered through the
                                    step (dp > 1 or CPUOffloadPolicy)
  grads       P b_g / dp            fp32 gradients of the masters (0 on the device with CPUOffloadPolicy)
              + P_l (b_p + 4)       dp > 1: the compute-dtype gradient of the layer being reduced and its fp32 copy
                                    (reduce_dtype); dp = 1 with b_m > b_p: P_l b_p before the hook casts it
  optimizer   P s / dp              (0 on the device with CPUOffloadPolicy, which steps AdamW on the host)
  checkpoints L T H b               (checkpointing: one saved input per layer; 0 on the device with offload,
                                     2 T H b in flight for the prefetch; without checkpointing it is L times the
                                     activations one layer saves for its backward, S_* counts in the code)
  transient   max(layer, head)      the peak inside one layer's recompute + backward, or the LM head
      layer = T H (c_h b + c_f 4)               residual stream, norm inputs/outputs and their gradients
            + T (Hq + Hkv) D b c_a + T Hq 4 c_l q, k, v (raw and rotated), attention out, dq/dk/dv; fp32 lse
            + T_m I b c_i                       MLP gate, up, silu(gate), act and their gradients (T_m = T, or the
                                                tile size with the tiled MLP, which adds 3 I H 4 fp32 dW buffers)
            + attention workspace               0 for flash kernels (see MemoryOptions.attn_workspace_bytes)
      head  = T H (b + 4) + V H 4 + chunk V 4 c_v   final norm, dW of the head in fp32, logit chunks

The counts c_* are the tensors of each size alive at the peak of the backward of one checkpointed layer with the
torch ops used here (RMSNorm in fp32, SwiGLU as three GEMMs): c_h = 12, c_f = 5, c_a = 6, c_l = 2, c_i = 8.
They are upper bounds that the tests check against measured peaks (CPU RSS here; CUDA max_memory_allocated in the
benchmark), so a prediction can be used to pick seq_len, sp and the options before a run.
"""

from __future__ import annotations

import dataclasses

from qlfast.model.config import head_dim, load_config, qkv_bias

C_H, C_F, C_A, C_L, C_I, C_V = 12, 5, 6, 2, 8, 3
S_H, S_F, S_A, S_I = 6, 3, 3, 4


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """What the step does; byte sizes are per element."""

    param_bytes: int = 2
    """bytes per compute-dtype parameter (2 for bf16, 4 for fp32)."""
    grad_bytes: int | None = None
    """bytes per gradient element the optimizer sees (default: master_bytes, else param_bytes)."""
    act_bytes: int | None = None
    """bytes per activation element (default: param_bytes)."""
    optimizer_bytes: int = 8
    """optimizer state per parameter: 8 = AdamW m and v in fp32, 0 = no optimizer (fwd+bwd only)."""
    offload_optimizer: bool = False
    """FSDP2 CPUOffloadPolicy: the sharded masters, their gradients and the optimizer state live in CPU memory."""
    checkpoint: bool = True
    """per-layer activation checkpointing."""
    offload: bool = False
    """checkpointed layer inputs offloaded to pinned CPU memory."""
    tiled_mlp: bool = False
    """tiled MLP with mlp_tile_tokens rows per tile."""
    mlp_tile_tokens: int = 4096
    logprob_chunk_bytes: int = 64 * 2**20
    """fp32 logit chunk of the linear_logprob torch backend (the triton backend needs O(T) only)."""
    attn_workspace_bytes: int = 0
    """attention working memory beyond q/k/v/out/lse: 0 for flash/triton kernels; the torch reference backend
    holds score chunks of Hq x 1024 rows x L keys in fp32, about 8 such tensors at its peak."""
    master_bytes: int | None = 4
    """bytes per master weight: 4 = fp32 masters (the trainer's default, --model.master_dtype=float32); None or
    param_bytes: the parameters are the masters (pure bf16, or fp32 throughout)."""


def param_count(config) -> dict:
    """Parameters of the whole model, of one decoder layer, and of the embedding/head."""
    c = load_config(config)
    h, i, d = c.hidden_size, c.intermediate_size, head_dim(c)
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h
    if qkv_bias(c):
        attn += hq * d + 2 * hkv * d
    if c.model_type == "qwen3":
        attn += 2 * d
    layer = attn + 3 * h * i + 2 * h
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return {"total": c.num_hidden_layers * layer + embed + h, "layer": layer, "embed": embed}


def estimate(config, seq_len: int, sp: int = 1, dp: int = 1, options: MemoryOptions | dict | None = None) -> dict:
    """Predicted peak bytes per rank by part: params, grads, optimizer, checkpoints, transient, total (+ host)."""
    o = MemoryOptions(**options) if isinstance(options, dict) else (options or MemoryOptions())
    if seq_len < 1 or sp < 1 or dp < 1:
        raise ValueError(f"estimate: seq_len, sp, dp must be >= 1, got {seq_len}, {sp}, {dp}")
    c = load_config(config)
    n = param_count(c)
    bp = o.param_bytes
    bm = max(o.master_bytes or bp, bp)
    bg = o.grad_bytes or bm
    b = o.act_bytes or bp
    mixed = bm > bp
    t = -(-seq_len // sp)
    h, i, d, v, nl = c.hidden_size, c.intermediate_size, head_dim(c), c.vocab_size, c.num_hidden_layers
    hq, hkv = c.num_attention_heads, c.num_key_value_heads

    sharded = dp > 1 or o.offload_optimizer  # FSDP2: parameters gathered layer by layer
    host_state = n["total"] * (bm + bg + o.optimizer_bytes) / dp if o.offload_optimizer else 0
    params = (0 if o.offload_optimizer else n["total"] * bm / dp) + (n["total"] * bp if mixed and not sharded else 0)
    params += (2 * n["layer"] + n["embed"] + h) * bp if sharded else 0
    grads = 0 if o.offload_optimizer else n["total"] * bg / dp
    grads += n["layer"] * (bp + 4) if sharded else (n["layer"] * bp if mixed else 0)
    optimizer = 0 if o.offload_optimizer else n["total"] * o.optimizer_bytes / dp

    t_mlp = min(t, o.mlp_tile_tokens) if o.tiled_mlp else t
    layer = (t * h * (C_H * b + C_F * 4) + t * (hq + hkv) * d * b * C_A + t * hq * 4 * C_L
             + t_mlp * i * b * C_I + (3 * i * h * 4 if o.tiled_mlp and t > o.mlp_tile_tokens else 0)
             + o.attn_workspace_bytes)
    rows = max(16, o.logprob_chunk_bytes // (4 * v))
    head = t * h * (b + 4) + v * h * 4 + min(rows, t) * v * 4 * C_V
    transient = max(layer, head)

    if o.checkpoint:
        saved = nl * t * h * b
        checkpoints = 2 * t * h * b if o.offload else saved
        host = saved if o.offload else 0
    else:
        # without checkpointing every layer keeps what its backward needs (no gradients yet): about half the
        # counts above (S_* below), and the MLP's four (T, I) tensors
        saved = (t * h * (S_H * b + S_F * 4) + t * (hq + hkv) * d * b * S_A + t * hq * 4
                 + t_mlp * i * b * S_I)
        checkpoints, host = nl * saved, 0
    host += host_state
    parts = {"params": params, "grads": grads, "optimizer": optimizer, "checkpoints": checkpoints,
             "transient": transient}
    parts = {k: int(val) for k, val in parts.items()}
    parts["total"] = sum(parts.values())
    parts["host"] = int(host)
    return parts
