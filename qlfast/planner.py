"""qlfast.planner: does a run fit its GPUs? A memory plan per GPU and per host node, before any weight is loaded.

    python -m qlfast.plan --preset qwenlong-l1-32b --nodes 4 --gpus-per-node 8 --gpu-mem-gib 80
    p = plan(cfg, Hardware(nodes=4, gpus_per_node=8, gpu_mem_gib=80)); print(p.report()); p.fits

A colocated run has two memory states on every GPU, and both must fit (bytes per GPU; P parameters, P_l per decoder
layer, world = nodes x gpus_per_node, FSDP2 shards over all ranks):

  rollout   the trainer's resident state: fp32 master weights P 4 / world and AdamW's m, v P 8 / world (FSDP2; the
            whole model without it; nothing with optimizer_offload, where they live on the host) + one weight-sync
            bucket of gathered full tensors (FSDP2) + the engine's share, gpu_memory_utilization x GPU memory, in which
            vLLM puts its weights (1/tp of the model in the engine dtype; KV heads replicated when tp > num_kv_heads),
            its working memory, and the KV cache. The KV cache must hold one GRPO group of the largest phase:
            prompt + G responses when the prompt is shared (prefix caching), G (prompt + response) when not, at
            2 L ceil(Hkv / tp) D b bytes per token per GPU.
  training  masters + gradients (fp32, P 4 / world) + optimizer state, as above (host-resident with offload)
            + FSDP2's gathered copies in the compute dtype (two decoder layers, the root's embedding and head) and
            one layer's unsharded fp32 gradient + activations at the largest micro-batch (qlfast.model.memory:
            checkpoints + transient, at T = micro-batch tokens / sp per rank) + what the sleeping engine keeps
            (+ the flat fp32 gradient buffer of the all-reduce without FSDP2; the parts are summed, an upper bound).
  both      a CUDA context per process (CONTEXT_GIB).

Host, per node: pinned buffers of offloaded activation checkpoints, the offloaded masters, gradients and optimizer
state (optimizer_offload: FSDP2's CPUOffloadPolicy), and the engine's weights while it sleeps (sleep level 1).

The largest micro-batch is the packer's budget (rl.micro_batch_tokens), or one unit when a unit is larger: a GRPO
group (prompt + G responses) with prompt sharing, one sequence without; never more than a data-parallel group's
share of a mini-batch. A configuration that does not fit is refused with the numbers and the one or two overrides
(higher TP, offload, more sp, ...) that would make it fit. The figures are a model: the activation part is the memory
model that tests/test_model_memory.py checks against measured peaks, the KV arithmetic is vLLM's (checked against
the engine on CPU), the constants below are assumptions; on GPU every number is a prediction until a run checks it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

from qlfast.config import apply_override
from qlfast.model.config import head_dim, load_config, qkv_bias
from qlfast.model.memory import MemoryOptions, estimate, param_count

GIB = 2**30
CONTEXT_GIB = 1.0
"""CUDA context, cuBLAS workspace and NCCL buffers per process (assumed)."""
ENGINE_WORK_GIB = 2.0
"""vLLM's memory in its budget besides weights and KV cache: profiled activations, sampler, CUDA graphs (assumed)."""
ENGINE_ASLEEP_GIB = 1.0
"""What a sleeping engine keeps on the GPU (sleep level 1: NCCL / custom all-reduce buffers, graph pools; assumed)."""
SYNC_BUCKET_BYTES = 512 << 20
"""sync_weights' default bucket (qlfast.rollout.weight_sync)."""
GPU_BLOCK_SIZE = 16
"""vLLM's KV block size on CUDA (tokens)."""
VOCAB_PADDING = 64
"""vLLM pads the vocabulary to a multiple of this before splitting it over TP ranks."""

# Model shapes for when the model directory is not on this machine, from the models' public config.json
# (https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B and -32B; Qwen2.5-7B / Qwen2.5-32B architectures).
_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", tie_word_embeddings=False,
              vocab_size=152064, max_position_embeddings=131072, use_sliding_window=False)
BUILTIN_SHAPES = {
    "DeepSeek-R1-Distill-Qwen-7B": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                        num_attention_heads=28, num_key_value_heads=4, rope_theta=10000.0,
                                        rms_norm_eps=1e-6),
    "DeepSeek-R1-Distill-Qwen-32B": dict(_QWEN2, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                         num_attention_heads=40, num_key_value_heads=8, rope_theta=1000000.0,
                                         rms_norm_eps=1e-5),
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """The planner cannot read the model's shape."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The machines a run is planned for."""

    nodes: int
    """Nodes."""
    gpus_per_node: int
    """GPUs per node (torchrun --nproc_per_node)."""
    gpu_mem_gib: float
    """Memory of one GPU in GiB (an 80 GB H100 reports 79.1 GiB)."""
    host_mem_gib: float | None = None
    """Host memory per node in GiB to check the host part against (None: report it only)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass
class Plan:
    """Bytes per GPU for the two states, per node for the host, and what does not fit."""

    hardware: Hardware
    rollout: dict
    """Part -> bytes per GPU while the engine generates."""
    training: dict
    """Part -> bytes per GPU during the policy update."""
    engine: dict
    """Inside the engine's budget: weights, working memory, KV available / needed (bytes), groups in flight."""
    host: dict
    """Part -> bytes per node."""
    notes: dict
    """The shape of the run: world, tp, sp, dp groups, micro-batch tokens, group tokens."""
    problems: list = dataclasses.field(default_factory=list)
    suggestions: list = dataclasses.field(default_factory=list)
    """Overrides that would make a refused run fit (each a list of --section.key=value)."""

    @property
    def fits(self) -> bool:
        return not self.problems

    def report(self) -> str:
        hw, g = self.hardware, lambda b: f"{b / GIB:8.1f} GiB"
        n = self.notes
        lines = [f"memory plan: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) x {hw.gpu_mem_gib:g} GiB; "
                 f"rollout engines of tp={n['tp']} ({n['engines']} engines), sp={n['sp']} x dp={n['dp']}, "
                 f"largest micro-batch {n['micro_tokens']} tokens ({n['micro_tokens_per_rank']} per rank), "
                 f"largest group {n['group_tokens']} KV tokens ({'prompt shared' if n['shared'] else 'not shared'})",
                 "per GPU, rollout (engine awake):"]
        lines += [f"  {k:<44}{g(v)}" for k, v in self.rollout.items()]
        lines.append("  inside the engine's budget:")
        lines += [f"    {k:<42}{g(v)}" for k, v in self.engine.items() if k != "groups in flight"]
        lines.append(f"    {'GRPO groups of the largest phase in flight':<42}{self.engine['groups in flight']:8d}")
        lines.append("per GPU, training (engine asleep):")
        lines += [f"  {k:<44}{g(v)}" for k, v in self.training.items()]
        lines.append(f"host, per node{'' if hw.host_mem_gib is None else f' (of {hw.host_mem_gib:g} GiB)'}:")
        lines += [f"  {k:<44}{g(v)}" for k, v in self.host.items()]
        if self.problems:
            lines.append("does NOT fit:")
            lines += [f"  - {p}" for p in self.problems]
            if self.suggestions:
                lines.append("would fit with: " + "  or  ".join(" ".join(s) for s in self.suggestions))
            else:
                lines.append("no one or two of the usual overrides (tp, offload, sp, checkpointing, "
                             "gpu_memory_utilization) make it fit")
        else:
            lines.append("fits (a prediction from the memory model: see qlfast/planner.py)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the model


def model_config(cfg) -> dict:
    """The HF config of cfg's model: config.json of cfg.model.path, a built-in shape named by the path's last part,
    or (no path) the model the trainer builds from cfg.model's fields."""
    m = cfg.model
    if not m.path:
        # as qlfast.trainer.build does; the tokenizer's vocabulary is at most data.tokenizer_vocab, padded to 64
        return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                    vocab_size=-(-cfg.data.tokenizer_vocab // 64) * 64, hidden_size=m.hidden_size,
                    intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                    num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                    max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=True,
                    use_sliding_window=False)
    path = os.path.join(m.path, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    name = os.path.basename(os.path.normpath(m.path))
    if name in BUILTIN_SHAPES:
        return dict(BUILTIN_SHAPES[name])
    raise PlanError(f"planner: no {path!r} and no built-in shape named {name!r} (built-in: "
                    f"{', '.join(BUILTIN_SHAPES)}); point --model.path at the model directory")


def _shape(config: dict) -> tuple[int, int, int, int, int, int, int, bool, bool]:
    c = load_config(config)
    return (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            head_dim(c), c.vocab_size, bool(c.tie_word_embeddings), qkv_bias(c))


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """vLLM's split of the KV heads: num_kv_heads / tp, or one (replicated) per rank when tp > num_kv_heads."""
    return 1 if tp >= num_kv_heads else num_kv_heads // tp


def kv_bytes_per_token(config: dict, tp: int, dtype_bytes: int) -> int:
    """KV-cache bytes per token on one engine rank: K and V, every layer, this rank's KV heads."""
    _, _, layers, _, hkv, d, _, _, _ = _shape(config)
    return 2 * layers * kv_heads_per_rank(hkv, tp) * d * dtype_bytes


def kv_cache_tokens(config: dict, tp: int, dtype_bytes: int, budget_bytes: int, block_size: int) -> int:
    """Tokens a KV budget holds, as vLLM allocates it: whole blocks of block_size tokens over all layers."""
    return budget_bytes // (kv_bytes_per_token(config, tp, dtype_bytes) * block_size) * block_size


def engine_weight_bytes(config: dict, tp: int, dtype_bytes: int) -> int:
    """One engine rank's weights: q/o, MLP and (padded) vocabulary split over tp, its KV heads, norms replicated."""
    h, i, layers, hq, hkv, d, v, tie, bias = _shape(config)
    kv = kv_heads_per_rank(hkv, tp)
    attn = 2 * hq * d * h // tp + 2 * kv * d * h + ((hq * d // tp + 2 * kv * d) if bias else 0)
    layer = attn + 3 * h * i // tp + 2 * h
    vocab = -(-v // VOCAB_PADDING) * VOCAB_PADDING // tp * h * (1 if tie else 2)
    return (layers * layer + vocab + h) * dtype_bytes


def check_layout(config: dict, world: int, tp: int, sp: int = 1, sp_attention: str = "ring",
                 gpus_per_node: int | None = None) -> list[str]:
    """What vLLM and the trainer refuse about tp / sp on `world` ranks, as messages naming the override."""
    _, _, _, hq, hkv, _, _, _, _ = _shape(config)
    out = []
    if tp < 1 or world % tp:
        out.append(f"--rollout.tp={tp} must divide the number of ranks ({world})")
    if tp > 1 and (hq % tp or (tp % hkv if tp > hkv else hkv % tp)):
        out.append(f"--rollout.tp={tp}: vLLM splits {hq} query heads and {hkv} KV heads over tp ranks (tp must divide "
                   f"{hq}, and divide {hkv} or be a multiple of it)")
    if gpus_per_node and tp > gpus_per_node:
        out.append(f"--rollout.tp={tp} spans nodes ({gpus_per_node} GPUs each): keep a TP group inside one node")
    if sp < 1 or world % sp:
        out.append(f"--model.sp={sp} must divide the number of ranks ({world})")
    if sp > 1 and sp_attention == "ulysses" and (hq % sp or (sp % hkv if sp > hkv else hkv % sp)):
        out.append(f"--model.sp={sp} with Ulysses splits {hq} query / {hkv} KV heads over sp ranks (sp must divide "
                   f"{hq}, and divide {hkv} or be a multiple of it)")
    return out


def _largest(cfg, world: int) -> tuple[int, int, bool]:
    """(largest micro-batch tokens before sp, largest group's KV tokens, whether the packer shares prompts)."""
    rl, m = cfg.rl, cfg.model
    shared = rl.share_prompts and (m.sp == 1 or m.sp_attention == "ulysses")  # qlfast/trainer/sp.py
    unit = group = 0
    for p in rl.phases:
        seq = p.max_prompt_tokens + p.max_response_tokens
        one_prompt = p.max_prompt_tokens + rl.group_size * p.max_response_tokens
        unit = max(unit, one_prompt if shared else seq)
        group = max(group, one_prompt if cfg.rollout.prefix_caching else rl.group_size * seq)
    if unit >= rl.micro_batch_tokens:  # a unit longer than the budget goes alone
        return unit, group, shared
    # never more than a data-parallel group's share of one mini-batch
    share = -(-rl.mini_batch_size // max(1, world // m.sp)) * (unit if shared else rl.group_size * unit)
    return max(unit, min(rl.micro_batch_tokens, share)), group, shared


def plan(cfg, hw: Hardware) -> Plan:
    """The memory plan of `cfg` on `hw` (see the module docstring)."""
    config = model_config(cfg)
    m, ro = cfg.model, cfg.rollout
    world, tp, sp = hw.world, ro.tp, m.sp
    problems = check_layout(config, world, tp, sp, m.sp_attention, hw.gpus_per_node)
    micro, group_tokens, shared = _largest(cfg, world)
    h, i, _, _, _, _, v, _, _ = _shape(config)
    n = param_count(config)
    p_total, p_layer, p_embed = n["total"], n["layer"], n["embed"]
    b = _BYTES[m.dtype]  # compute (and engine) dtype
    mb = _BYTES[getattr(m, "master_dtype", "float32")]
    shard = world if m.fsdp else 1
    offload = m.optimizer_offload
    masters = p_total * mb // shard
    grads = p_total * max(mb, 4) // shard  # fp32 gradients (FSDP2's reduce dtype, or the fp32 masters')
    optimizer = p_total * 8 // shard  # AdamW m and v in fp32
    working = p_total * b if (not m.fsdp and b != mb) else 0  # without FSDP2: a compute-dtype copy of the model
    if m.fsdp and world > 1:
        gathered = (2 * p_layer + p_embed) * b + p_layer * 4
    else:
        gathered = 0
    largest_full = max(v * h, h * i) * mb  # the embedding (or head), or one MLP weight
    sync_bucket = SYNC_BUCKET_BYTES + largest_full if m.fsdp and world > 1 else 0

    acts = estimate(config, seq_len=micro, sp=sp, options=MemoryOptions(
        param_bytes=b, act_bytes=b, checkpoint=m.checkpointing, offload=m.offload_checkpoints, tiled_mlp=m.tiled_mlp))
    activations = acts["checkpoints"] + acts["transient"]
    # data parallel without FSDP2 all-reduces the gradients through one flat fp32 buffer (after the backward)
    flat = p_total * 4 if not m.fsdp and world > 1 else 0

    gpu = int(hw.gpu_mem_gib * GIB)
    context = int(CONTEXT_GIB * GIB)
    budget = int(ro.gpu_memory_utilization * gpu)
    e_weights = engine_weight_bytes(config, tp, b)
    e_work = int(ENGINE_WORK_GIB * GIB)
    kv_avail = max(0, budget - e_weights - e_work)
    kv_tokens = kv_cache_tokens(config, tp, b, kv_avail, GPU_BLOCK_SIZE)
    kv_needed = group_tokens * kv_bytes_per_token(config, tp, b)
    engine = {"engine weights (1/tp, engine dtype)": e_weights, "engine working memory (assumed)": e_work,
              "KV cache available": kv_avail, "KV cache for one group of the largest phase": kv_needed,
              "groups in flight": kv_tokens // group_tokens if group_tokens else 0}

    resident = {"master weights": 0 if offload else masters, "compute-dtype copy": working,
                "optimizer state (AdamW m, v)": 0 if offload else optimizer}
    rollout = {**{f"{k} (resident)": v for k, v in resident.items() if v},
               "weight-sync bucket (gathered full tensors)": sync_bucket,
               f"engine (gpu_memory_utilization={ro.gpu_memory_utilization:g})": budget, "CUDA context": context}
    training = {"master weights": 0 if offload else masters, "compute-dtype copy": working,
                "gradients (fp32)": 0 if offload else grads,
                "optimizer state (AdamW m, v)": 0 if offload else optimizer,
                "FSDP2 gathered layers + root, one layer's grad": gathered,
                f"activations ({-(-micro // sp)} tokens per rank)": activations,
                "gradient all-reduce buffer (fp32, no FSDP2)": flat,
                "sleeping engine": int(ENGINE_ASLEEP_GIB * GIB), "CUDA context": context}
    training = {k: v for k, v in training.items() if v or k.startswith(("master", "activations"))}
    rollout["total"], training["total"] = sum(rollout.values()), sum(training.values())
    rollout["headroom"], training["headroom"] = gpu - rollout["total"], gpu - training["total"]

    g = hw.gpus_per_node
    host = {"pinned activation checkpoints": g * acts["host"],
            "offloaded masters, gradients, optimizer state": g * (masters + grads + optimizer) if offload else 0,
            "sleeping engine weights (sleep level 1)": g * e_weights}
    host = {k: v for k, v in host.items() if v}
    host["total"] = sum(host.values())

    if kv_needed > kv_avail:
        problems.append(f"engine: weights {e_weights / GIB:.1f} GiB + working {e_work / GIB:.1f} GiB + KV for one "
                        f"group {kv_needed / GIB:.1f} GiB ({group_tokens} tokens) > its budget {budget / GIB:.1f} GiB "
                        f"(--rollout.gpu_memory_utilization={ro.gpu_memory_utilization:g})")
    for name, state in (("rollout", rollout), ("training", training)):
        if state["headroom"] < 0:
            problems.append(f"{name}: {state['total'] / GIB:.1f} GiB per GPU > {hw.gpu_mem_gib:g} GiB")
    if hw.host_mem_gib is not None and host["total"] > hw.host_mem_gib * GIB:
        problems.append(f"host: {host['total'] / GIB:.1f} GiB per node > {hw.host_mem_gib:g} GiB")
    notes = dict(tp=tp, engines=world // tp if tp >= 1 and world % tp == 0 else 0, sp=sp, dp=max(1, world // sp),
                 micro_tokens=micro, micro_tokens_per_rank=-(-micro // sp), group_tokens=group_tokens, shared=shared)
    return Plan(hw, rollout, training, engine, host, notes, problems)


# ---------------------------------------------------------------------------------------------------- refusals


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _candidates(cfg, hw: Hardware) -> list[list[str]]:
    m, ro = cfg.model, cfg.rollout
    out = [[f"--rollout.tp={t}"] for t in _divisors(hw.gpus_per_node) if t > ro.tp]
    if not m.optimizer_offload:
        out.append((["--model.fsdp=true"] if not m.fsdp else []) + ["--model.optimizer_offload=true"])
    if not m.fsdp:
        out.append(["--model.fsdp=true"])
    out += [[f"--model.sp={s}"] for s in _divisors(hw.world) if s > m.sp]
    if not m.checkpointing:
        out.append(["--model.checkpointing=true"])
    elif not m.offload_checkpoints:
        out.append(["--model.offload_checkpoints=true"])
    if not m.tiled_mlp:
        out.append(["--model.tiled_mlp=true"])
    out += [[f"--rollout.gpu_memory_utilization={u / 100:g}"] for u in range(20, 95, 5)
            if abs(u / 100 - ro.gpu_memory_utilization) > 1e-9]
    return out


def _with(cfg, overrides: list[str]):
    new = copy.deepcopy(cfg)
    for o in overrides:
        key, value = o[2:].split("=", 1)
        apply_override(new, key, value)
    return new


def suggest(cfg, hw: Hardware, limit: int = 2) -> list[list[str]]:
    """Up to `limit` override sets that make a refused run fit: single overrides first, then pairs."""
    cands = _candidates(cfg, hw)
    found = [c for c in cands if plan(_with(cfg, c), hw).fits][:limit]
    if not found:
        for i, a in enumerate(cands):
            for c in cands[i + 1:]:
                keys = {o.split("=")[0] for o in a}
                if keys & {o.split("=")[0] for o in c}:
                    continue
                if plan(_with(cfg, a + c), hw).fits:
                    found.append(a + c)
                    if len(found) == limit:
                        return found
    return found


def check(cfg, hw: Hardware) -> Plan:
    """plan() plus, when it does not fit, the overrides that would."""
    p = plan(cfg, hw)
    if not p.fits:
        p.suggestions = suggest(cfg, hw)
    return p


def check_run(cfg, world: int, gpus_per_node: int, gpu_mem_gib: float | None) -> str:
    """qlfast.train's start-up check, before any weight is loaded: SystemExit naming the problem when the TP / sp
    layout is impossible, and (on GPU, gpu_mem_gib given) when the memory plan does not fit, with the plan and the
    overrides that would fit. Returns a line for the log."""
    try:
        config = model_config(cfg)
    except PlanError as e:
        raise SystemExit(f"qlfast.train: {e}") from None
    if problems := check_layout(config, world, cfg.rollout.tp, cfg.model.sp, cfg.model.sp_attention, gpus_per_node):
        raise SystemExit("qlfast.train: " + "; ".join(problems))
    if gpu_mem_gib is None:
        return ""
    nodes = max(1, world // max(1, gpus_per_node))
    p = check(cfg, Hardware(nodes, gpus_per_node, gpu_mem_gib))
    if not p.fits:
        raise SystemExit(f"qlfast.train: this run does not fit its GPUs (python -m qlfast.plan prints the same):\n"
                         f"{p.report()}")
    return (f"memory plan (a prediction, python -m qlfast.plan): fits; headroom per GPU "
            f"{p.rollout['headroom'] / GIB:.1f} GiB in rollout, {p.training['headroom'] / GIB:.1f} GiB in training; "
            f"{p.engine['groups in flight']} groups of the largest phase in flight per engine")
