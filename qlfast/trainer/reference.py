"""The frozen reference policy of the KL penalty: the policy as RL starts (GRPO, DeepSeekMath eq. 4).

    ref = reference.build(model, cfg, env, run_dir, tokenizer, rl_step)   # None when --rl.kl_coef == 0
    ref_lp = reference.logprobs(ref, batch, env, temperature=..., backend=...)   # (N,) fp32, no grad

Built only when kl_coef > 0; then `rl_step.policy_update` runs one extra forward per micro-batch through it (no
backward) and passes the log-probs to `policy_loss(ref_logprob=...)`, whose k1/k2/k3 estimators do the rest.

Where the weights come from: when RL starts (RL step 0) the policy is written in its compute dtype to
<run_dir>/reference (HF layout, written aside then renamed); when no SFT ran and the policy is still --model.path,
that directory is the reference and nothing is written. Every start, fresh or --resume, then loads the reference
from there, so a resumed run penalises against the same weights as the uninterrupted one. Under FSDP2 the reference
is sharded like the policy (the same mesh; one layer all-gathered at a time) and loaded shard by shard
(qlfast/parallel/sharded_load.py), in CPU memory with --rl.ref_offload (FSDP2 CPUOffloadPolicy, GPU only).

Memory: compute-dtype weights only (no masters, gradients or optimizer state): 2 bytes per parameter / dp in bf16,
plus one forward's activations (no_grad: nothing is kept between layers).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from qlfast.model import QwenForCausalLM
from qlfast.model.config import load_config
from qlfast.ops.linear_logprob import linear_logprob
from qlfast.trainer import comm, precision, sp
from qlfast.trainer.packing import PackedBatch


def source(model, cfg, env, run_dir, tokenizer, rl_step: int) -> str:
    """The HF directory holding the reference weights; written from `model` at RL step 0 (collective under FSDP2)."""
    if cfg.model.path and cfg.sft.steps == 0:
        return cfg.model.path
    out = Path(run_dir) / "reference"
    if rl_step == 0:  # the policy as RL starts (rewritten on every start at step 0: never a stale one)
        from qlfast.trainer.build import export

        tmp = out.with_name("reference.tmp")
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()
        export(model, str(tmp), tokenizer, env)
        if env.is_main:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        comm.barrier()
    elif not (out / "config.json").exists():
        raise SystemExit(f"qlfast.train: --rl.kl_coef={cfg.rl.kl_coef} needs the reference policy, the policy as RL "
                         f"started, in {out}, which is missing; resume with --rl.kl_coef=0 or start the run again")
    return str(out)


def load(path, model, cfg, env) -> QwenForCausalLM:
    """The reference from `path` in the compute dtype, frozen, laid out like `model` (FSDP2-sharded when it is)."""
    compute = precision.dtype(cfg.model.dtype)
    options = copy.copy(model.options)  # its own: sequence parallel sets attention_fn per batch
    options.attention_fn = None
    if env.fsdp:
        from qlfast.parallel.fsdp import apply_fsdp
        from qlfast.parallel.sharded_load import load_sharded

        if cfg.rl.ref_offload and env.device.type != "cuda":
            raise SystemExit("qlfast.train: --rl.ref_offload=true keeps the reference's shards in pinned CPU memory "
                             f"for a GPU forward; it needs --train.device=cuda (this run is on {env.device})")
        with torch.device("meta"):
            ref = QwenForCausalLM(load_config(path), options).to(compute)
        ref.requires_grad_(False)
        mesh = next(model.parameters()).device_mesh
        apply_fsdp(ref, mesh, cpu_offload=cfg.rl.ref_offload)
        load_sharded(ref, path, "cpu" if cfg.rl.ref_offload else env.device, buffer_device=env.device)
    else:
        if cfg.rl.ref_offload:
            raise SystemExit("qlfast.train: --rl.ref_offload=true offloads FSDP2 shards: it needs --model.fsdp=true")
        ref = QwenForCausalLM.from_pretrained(path, dtype=compute, device=env.device, options=options)
        ref.requires_grad_(False)
    return ref.eval()


def build(model, cfg, env, run_dir, tokenizer, rl_step: int) -> QwenForCausalLM | None:
    """The frozen reference when cfg.rl.kl_coef > 0, else None (and nothing is written or loaded)."""
    if cfg.rl.kl_coef == 0:
        return None
    return load(source(model, cfg, env, run_dir, tokenizer, rl_step), model, cfg, env)


@torch.no_grad()
def logprobs(ref, b: PackedBatch, env, *, temperature: float, backend: str = "auto") -> torch.Tensor:
    """(N_local,) fp32 log-probs of b's targets under the reference, for the rows this rank computes (its shard of b
    under sequence parallel, exactly as the policy's pass over the same batch). Collective under FSDP2 / sp."""
    if ref is None:
        raise ValueError("policy_update: rl.kl_coef > 0 needs the reference policy (reference.build)")
    with sp.sharded(ref, b, env) as lb:
        hidden = ref(lb.input_ids, lb.position_ids, lb.cu_seqlens, prefix=lb.prefix).index_select(0, lb.rows)
        out = linear_logprob(hidden, ref.lm_head_weight, lb.targets, temperature=temperature, backend=backend)
    if hasattr(ref, "reshard"):  # FSDP2: the root stays gathered after forward; free it, the policy runs next
        ref.reshard()
    return out
