"""The proof's RL stage: one policy update of a Qwen2.5-7B-shaped random model, the trainer's own code path.

    python bench/rl_update.py          # QLFAST_PROOF_CPU=1: the tiny preset's model shape on CPU

What runs: qlfast.trainer.rl_step.policy_update (no vLLM: the rollouts are given) on one prompt-shared GRPO group
(a 32K-token prompt and 8 responses of 2K: 48K tokens packed), FSDP2 over one GPU (qlfast.trainer.comm.shard_model),
per-layer checkpointing with the saved inputs offloaded to pinned host memory, the tiled MLP, AdamW at an RL learning
rate (1e-6). One update first (compiles, autotunes), then the timed one. The row carries: time, MFU (model FLOPs:
6 x dense parameters x tokens + causal attention pairs, recompute not counted, over the 989 TFLOP/s datasheet rate
and over the GEMM ceiling the env stage measured), peak device memory against qlfast.model.memory's prediction,
the pinned host memory of the offload, and the share of the optimizer-stepped parameters (the master weights) that
changed in the timed update: bf16 masters round an update of lr ~1e-6 away, fp32 masters keep it.

The share is read on a fixed sample of elements of every parameter the optimizer steps (its local shards under
FSDP2): the fp32 masters, as the trainer keeps them under bf16 compute (FSDP2's MixedPrecisionPolicy casts the
gathered copies); QLFAST_PROOF_MASTER_DTYPE=bfloat16 measures pure bf16 training for comparison.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import proof  # noqa: E402

QWEN_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
               max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(model_type="qwen2", vocab_size=704, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=4096)
CFG, MODEL = (TINY, "tiny-preset") if proof.SMALL else (QWEN_7B, "qwen2.5-7b")
PROMPT, RESPONSE, GROUP = (192, 48, 8) if proof.SMALL else (32768, 2048, 8)
LR = 1e-6
SAMPLE = 4096  # elements sampled per parameter for the changed share (a fixed stride through its local shard)


def _token_lists():
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, CFG["vocab_size"], (PROMPT,), generator=g).tolist()
    responses = [torch.randint(1, CFG["vocab_size"], (RESPONSE,), generator=g).tolist() for _ in range(GROUP)]
    return prompt, responses


def kernel_families(dtype: str) -> list[tuple[str, dict]]:
    """The Triton kernels this stage launches, at their exact shapes (for bench/warm.py): the group's packed layout
    from the trainer's own packing."""
    from qlfast.trainer.packing import pack

    prompt, responses = _token_lists()
    b = pack([prompt] * GROUP, responses, share_prompts=True)
    t, lay = b.num_tokens, b.prefix
    hq, hkv = CFG["num_attention_heads"], CFG["num_key_value_heads"]
    d = CFG["hidden_size"] // hq
    nseg = b.cu_seqlens.numel() - 1
    max_seg = int(b.cu_seqlens.diff().max())
    nq, nk = int(lay.q_rows.numel()), int(lay.kv_rows.numel())
    ngroups = lay.cu_q.numel() - 1
    self_attn = dict(tq=t, tk=t, hq=hq, hkv=hkv, d=d, dtype=dtype, causal=True, nseq=nseg)
    cross = dict(tq=nq, tk=nk, hq=hq, hkv=hkv, d=d, dtype=dtype, causal=False, nseq=ngroups)
    rows = int(b.rows.numel())
    h, v = CFG["hidden_size"], CFG["vocab_size"]
    return [("flash_fwd", dict(self_attn, max_q=max_seg)), ("flash_bwd", dict(self_attn, max_q=max_seg, max_k=max_seg)),
            ("flash_fwd", dict(cross, max_q=lay.max_q)), ("flash_bwd", dict(cross, max_q=lay.max_q, max_k=lay.max_kv)),
            ("attn_merge", dict(t=t, h=hq, d=d, n=nq, block_dtype=dtype, rows=True)),
            ("linear_fwd", dict(n=rows, h=h, v=v, dtype=dtype, with_entropy=True)),
            ("linear_dz", dict(n=rows, h=h, v=v, dtype=dtype, has_glp=True, has_gent=False))]


def make_groups():
    """One GRPO group of the trainer's Group type, rewards with variance, GRPO advantages."""
    from qlfast.trainer.rl_step import Group

    prompt, responses = _token_lists()
    rewards = [float(i % 2) for i in range(GROUP)]
    mean = sum(rewards) / GROUP
    std = (sum((r - mean) ** 2 for r in rewards) / (GROUP - 1)) ** 0.5
    return [Group(index=0, uid="proof-0", source="proof", prompt_ids=prompt, responses=responses,
                  rollout_logprobs=[[0.0] * RESPONSE for _ in range(GROUP)], rewards=rewards, shaped=rewards,
                  finish=["stop"] * GROUP, weight_version=0, advantages=[(r - mean) / (std + 1e-6) for r in rewards])]


def run_policy_update(model, optimizer, scheduler, groups, env, rl) -> dict:
    """The one call into the trainer, isolated: a change of policy_update's signature changes only this function."""
    from qlfast.trainer.rl_step import policy_update

    return policy_update(model, optimizer, scheduler, groups, env, rl=rl, mini_batches=1,
                         max_response_tokens=RESPONSE, backend="auto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stepped(optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, flat local tensor) of every parameter the optimizer steps (the local shard of a DTensor)."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            local = p.to_local() if hasattr(p, "to_local") else p
            out.append((f"{gi}.{pi}", local.detach().reshape(-1)))
    return out


def _sample(stepped) -> list[torch.Tensor]:
    return [flat[torch.arange(0, flat.numel(), max(1, flat.numel() // SAMPLE), device=flat.device)].clone()
            for _, flat in stepped]


def _changed_share(stepped, before) -> dict:
    changed = total = 0
    for (_, flat), b in zip(stepped, before):
        now = flat[torch.arange(0, flat.numel(), max(1, flat.numel() // SAMPLE), device=flat.device)]
        changed += int((now != b).sum())
        total += b.numel()
    dtypes = sorted({str(flat.dtype).split(".")[-1] for _, flat in stepped})
    return {"changed_share": round(changed / max(total, 1), 6), "sampled_elements": total,
            "master_dtypes": dtypes}


def _flops(n_dense: int, t: int) -> float:
    """6 x dense parameters x tokens + 12 x L x Hq x D per attended (query, key) pair of the shared layout (causal
    pairs once): P^2/2 + G (R P + R^2/2); recomputation (checkpointing) not counted."""
    d = CFG["hidden_size"] // CFG["num_attention_heads"]
    pairs = PROMPT * PROMPT / 2 + GROUP * (RESPONSE * PROMPT + RESPONSE * RESPONSE / 2)
    return 6.0 * n_dense * t + 12.0 * CFG["num_hidden_layers"] * CFG["num_attention_heads"] * d * pairs


def _gemm_ceiling() -> float | None:
    """The bf16 GEMM TFLOP/s the env stage of this call measured (from the rows file), if any."""
    path = os.environ.get("QLFAST_BENCH_ROWS")
    if not path or not Path(path).exists():
        return None
    best = None
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if row.get("op") == "ceiling" and row.get("provider") == "gemm" and row.get("tflops"):
            best = row["tflops"]
    return best


def main() -> int:
    from qlfast.config import RLConfig
    from qlfast.kernels import flash_attention as fk
    from qlfast.kernels import linear_logprob as lk
    from qlfast.model import ModelOptions, QwenForCausalLM
    from qlfast.model.memory import MemoryOptions, estimate, param_count
    from qlfast.ops.linear_logprob import TABLE as LOGPROB_BACKENDS
    from qlfast.trainer import comm as dist
    from qlfast.trainer import optim

    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                 ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    shape = {"model": MODEL, "prompt": PROMPT, "response": RESPONSE, "group": GROUP,
             "tokens": PROMPT + GROUP * RESPONSE}
    env = dist.init("cuda" if proof.GPU else "cpu", fsdp=True)
    try:
        # the trainer's precision: fp32 master shards, compute in the proof's dtype (FSDP2 MixedPrecisionPolicy)
        master = getattr(torch, os.environ.get("QLFAST_PROOF_MASTER_DTYPE", "float32"))
        compute = getattr(torch, proof.DTYPE_NAME)
        options = ModelOptions(checkpoint=True, offload=True, tiled_mlp=True)
        model = QwenForCausalLM.from_config(CFG, options, dtype=master, device=env.device, seed=0)
        attn_backend = model.attention_backend()
        model = dist.shard_model(model, env, param_dtype=None if compute == master else compute)
        optimizer = optim.adamw(model, lr=LR)
        scheduler = optim.schedule(optimizer, warmup=0)
        rl = RLConfig(micro_batch_tokens=PROMPT + GROUP * RESPONSE, share_prompts=True, tis_cap=None, lr=LR)
        groups = make_groups()
        t0 = time.perf_counter()
        run_policy_update(model, optimizer, scheduler, groups, env, rl)  # compiles and autotunes
        harness._sync()
        first_s = time.perf_counter() - t0
        stepped = _stepped(optimizer)
        before = _sample(stepped)
        harness.free_device_memory()  # resets the peak too
        harness._rss_peak_reset()
        t0 = time.perf_counter()
        metrics = run_policy_update(model, optimizer, scheduler, groups, env, rl)
        harness._sync()
        secs = time.perf_counter() - t0
        # the whole step's peak: parameters, gradients, optimizer state and activations (CPU: the process's RSS)
        peak = torch.cuda.max_memory_allocated() if proof.GPU else harness._proc_status_bytes("VmHWM")
        share = _changed_share(stepped, before)
        n = param_count(CFG)
        dense = n["total"] - CFG["vocab_size"] * CFG["hidden_size"] * (0 if CFG["tie_word_embeddings"] else 1)
        flops = _flops(dense, shape["tokens"])
        predicted = estimate(CFG, seq_len=shape["tokens"], options=MemoryOptions(
            param_bytes=compute.itemsize, master_bytes=master.itemsize, act_bytes=compute.itemsize, checkpoint=True,
            offload=True, tiled_mlp=True))
        ceiling = _gemm_ceiling()
        stats = {"median_ms": secs * 1e3, "min_ms": secs * 1e3, "reps": 1, "peak_bytes": peak}
        proof.stage_row(
            "rl_update", "qlfast", shape, "policy_update", stats, flops=flops,
            mfu=round(flops / secs / proof.H200_BF16_DENSE, 4) if proof.GPU else None,
            mfu_vs_measured_gemm=round(flops / secs / (ceiling * 1e12), 4) if proof.GPU and ceiling else None,
            first_update_s=round(first_s, 2), peak_gib=round(peak / 2**30, 2),
            predicted_gib=round(predicted["total"] / 2**30, 2), predicted_parts_gib={
                k: round(val / 2**30, 2) for k, val in predicted.items()},
            peak_over_predicted=round(peak / predicted["total"], 3) if proof.GPU else None,
            host_offload_mib=round(model._offloader.host_bytes() / 2**20, 1), built_dtype=str(master).split(".")[-1],
            attention_backend=attn_backend, logprob_backend=LOGPROB_BACKENDS.resolve("auto", env.device),
            liger_in_model=bool(model.options.use_liger), fsdp=True, lr=LR,
            config={**fk.LAST_CONFIG, **lk.LAST_CONFIG},
            policy_metrics={k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}, **share)
        print(f"rl_update: {secs:.2f} s, peak {peak / 2**30:.1f} GiB (predicted {predicted['total'] / 2**30:.1f}), "
              f"changed share {share['changed_share']:.4f} of {share['master_dtypes']} masters", flush=True)
        return 0 if metrics.get("finite", False) else 1
    except Exception as e:  # noqa: BLE001 - the row says what failed; the stage fails
        traceback.print_exc()
        proof.stage_row("rl_update", "qlfast", shape, "policy_update", status=f"failed: {type(e).__name__}: {e}"[:500])
        return 1
    finally:
        dist.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
