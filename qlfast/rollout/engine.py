"""qlfast.rollout.engine: a vLLM engine living inside the trainer process, and the samples it returns.

    engine = RolloutEngine(model_dir, EngineConfig(dtype="bfloat16", gpu_memory_utilization=0.4))
    groups = engine.generate(prompts, n=8, sampling=SamplingConfig(temperature=1.0, max_tokens=4096, seed=step))
    groups[i][j].token_ids, .logprobs, .finish_reason, .length, .weight_version

In-process, always: under torchrun the engine uses vLLM's `external_launcher` executor (sharing the trainer's process
group); otherwise `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process. Being in-process is what
lets `weight_sync.sync_weights` write straight into the engine's parameters instead of shipping tensors over IPC.

Tensor parallel (`EngineConfig(tensor_parallel_size=N)`, torchrun only): each group of N consecutive ranks forms one
engine, each rank holding 1/N of it. `generate` and `prompt_logprobs` are then collectives of the group: every rank
passes its own prompts and gets back its own samples (qlfast/rollout/tp.py), so a caller written for one engine per
rank works unchanged as long as all ranks of a group make the same calls.

Memory: on GPU the engine takes `gpu_memory_utilization` of the device (weights + KV cache) and, with sleep mode,
gives it back during the training step (`sleep()`: level 1 offloads weights to CPU and drops the KV cache). On CPU the
KV cache is an explicit `cpu_kv_cache_gib` (VLLM_CPU_KVCACHE_SPACE) and vLLM has no sleep mode, so `sleep()` and
`wake_up()` return quietly.

Sleep under TP (GPU; reasoned from vLLM's design, not run here): sleep and wake_up act on this rank's CuMem pool only
(its weight shard and KV blocks), with no collective, and wake_up maps the memory back at the same virtual addresses,
so captured CUDA graphs and the TP group's NCCL / custom all-reduce buffers (allocated outside the pool, never
released) stay valid. What must hold across the group is order, and the trainer's loop gives it: every rank runs
sleep -> train -> wake weights -> sync its own shard -> reset its prefix cache -> wake KV -> generate, and the first
TP all-reduce inside generate waits for the slowest rank. Each rank must reset its prefix cache in the same sync (its
scheduler decides from it which tokens to compute, and the group's schedulers must agree), which sync_weights does.

CPU linear layers: vLLM's CPU build packs every linear weight into an opaque oneDNN handle and drops the tensor;
re-packing after an update costs ~5x a plain copy per sync (that is most of what `reload_weights` spends). With
`cpu_plain_linear=True` (default) the engine keeps plain weights and runs `F.linear` on them, so a sync is an
in-place copy. Decode GEMMs are slower than oneDNN's on CPU (~2x here at M=1), which does not matter for the CPU
path's purpose (CI and smoke runs); GPU engines are unaffected.

Log-probs: `logprobs=0` makes vLLM return the sampled token's log-prob, and `logprobs_mode="processed_logprobs"`
takes it after temperature/top-p, i.e. the log-prob of the distribution the token was drawn from, which is what the
trainer's importance-sampling correction (and `linear_logprob(..., temperature=T)` at top_p=1) compares against.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qlfast.rollout.cpu_linear import use_plain_cpu_linear
from qlfast.rollout.tp import concat, gather, my_slice, tp_layout

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class EngineStartError(RuntimeError):
    """vLLM could not start; the message carries vLLM's own error."""


@dataclass(frozen=True)
class EngineConfig:
    """How the colocated engine is built and how much memory it may take."""

    dtype: str = "auto"
    """Engine dtype ("auto" = the checkpoint's, "bfloat16", "float32", ...). Synced weights are cast to it."""
    gpu_memory_utilization: float = 0.5
    """GPU only: fraction of device memory for weights + KV cache (the trainer keeps the rest)."""
    cpu_kv_cache_gib: int = 1
    """CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE), explicit so that tests stay bounded."""
    max_model_len: int | None = None
    """Longest prompt + response in tokens (None = the model's max_position_embeddings)."""
    seed: int = 0
    """Engine seed (same on every rank under external_launcher)."""
    enable_sleep_mode: bool | None = None
    """Release weights + KV cache during training (None = on when CUDA is available; vLLM CPU has no sleep mode)."""
    sleep_level: int = 1
    """vLLM sleep level: 1 offloads weights to CPU and drops the KV cache, 2 drops both (weights must be re-synced)."""
    enforce_eager: bool | None = None
    """No CUDA graphs / torch.compile (None = eager on CPU, graphs on GPU)."""
    enable_prefix_caching: bool = True
    """Share KV of common prompt prefixes within a group; reset after every weight sync."""
    logprobs_mode: str = "processed_logprobs"
    """Which log-probs samples carry: "processed_logprobs" (after temperature/top-p) or "raw_logprobs"."""
    skip_tokenizer_init: bool = False
    """Token-id prompts only, no tokenizer needed in the model directory."""
    cpu_plain_linear: bool = True
    """CPU only: keep plain linear weights (F.linear) so syncs are in-place copies; False keeps oneDNN packing."""
    load_format: str = "auto"
    """vLLM load format; "dummy" starts from random weights (benchmarks that push their own weights)."""
    tensor_parallel_size: int = 1
    """Ranks per engine (torchrun only): groups of this many consecutive ranks share one engine (qlfast/rollout/tp.py);
    `seed` must then be the same on every rank of a group."""
    extra: dict = field(default_factory=dict)
    """Further keyword arguments for vllm.LLM, passed through unchanged."""


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters of one generate call (one RL phase's settings)."""

    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass; log-probs in processed mode are renormalised over it."""
    max_tokens: int = 256
    """Maximum response length (the phase's max response length)."""
    seed: int | None = None
    """Per-request seed, for reproducible sampling."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens besides the model's EOS."""


@dataclass(frozen=True)
class Sample:
    """One generated response."""

    token_ids: tuple[int, ...]
    """Response tokens (the stop token included when generation stopped on one)."""
    logprobs: tuple[float, ...]
    """Engine log-prob of each response token, len == length."""
    finish_reason: str
    """"stop" (EOS / stop token) or "length" (max_tokens reached)."""
    length: int
    """Number of response tokens."""
    weight_version: int
    """The engine's weight version when the sample was generated (stale-sample detection)."""


def under_torchrun() -> bool:
    """True when launched by torchrun (its environment variables are set)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def check_model_dir(model_dir: str, *, need_tokenizer: bool = True, need_weights: bool = True) -> None:
    """Raise FileNotFoundError / PermissionError naming the directory and the missing or unreadable file."""
    if not os.path.isdir(model_dir):
        what = "is not a directory" if os.path.exists(model_dir) else "does not exist"
        raise FileNotFoundError(f"model directory {model_dir!r} {what}")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise PermissionError(f"model directory {model_dir!r} is not readable")
    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"model directory {model_dir!r} has no config.json (missing file {config!r})")
    weights = [p for g in _WEIGHT_GLOBS for p in glob.glob(os.path.join(model_dir, g))]
    if need_weights and not weights:
        raise FileNotFoundError(f"model directory {model_dir!r} has no weights: no file matches "
                                f"{', '.join(_WEIGHT_GLOBS)}")
    if need_tokenizer and not any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {model_dir!r} has no tokenizer (none of "
                                f"{', '.join(_TOKENIZER_FILES)}); save one there or use "
                                "EngineConfig(skip_tokenizer_init=True) with token-id prompts")
    for path in [config, *weights]:
        if not os.access(path, os.R_OK):
            raise PermissionError(f"model directory {model_dir!r}: file {path!r} is not readable")


class RolloutEngine:
    """vLLM in this process, plus the weight version that every sample carries."""

    def __init__(self, model_dir: str, config: EngineConfig | None = None):
        self.model_dir = os.fspath(model_dir)
        self.config = cfg = config or EngineConfig()
        on_gpu = torch.cuda.is_available()
        check_model_dir(self.model_dir, need_tokenizer=not cfg.skip_tokenizer_init,
                        need_weights=cfg.load_format != "dummy")
        self.weight_version = 0
        self.sleep_enabled = bool(on_gpu if cfg.enable_sleep_mode is None else cfg.enable_sleep_mode) and on_gpu
        self.asleep = False  # KV cache released: no generation
        self.weights_asleep = False  # weights released: no sync
        self.external_launcher = under_torchrun()
        self.tp_size, self.tp_rank, self.tp_group = int(cfg.tensor_parallel_size), 0, None
        if self.tp_size > 1:
            if not self.external_launcher:
                raise ValueError(f"RolloutEngine: tensor_parallel_size={self.tp_size} spans torchrun ranks (vLLM's "
                                 "external_launcher); launch with `torchrun --nproc_per_node=N ...`")
            tp_layout(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), self.tp_size)
        if not self.external_launcher:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(cfg.cpu_kv_cache_gib)))
            if cfg.cpu_plain_linear:
                use_plain_cpu_linear()
        kwargs = dict(model=self.model_dir, dtype=cfg.dtype, seed=cfg.seed, tensor_parallel_size=self.tp_size,
                      enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
                      enable_prefix_caching=cfg.enable_prefix_caching, logprobs_mode=cfg.logprobs_mode,
                      skip_tokenizer_init=cfg.skip_tokenizer_init, load_format=cfg.load_format, **cfg.extra)
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_enabled
        if self.external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        try:
            from vllm import LLM

            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types; keep its message, add which model and settings
            raise EngineStartError(f"vLLM failed to start from {self.model_dir!r} ({type(e).__name__}: {e}); "
                                   f"settings: {kwargs}") from e
        self._model = None
        self._sync_plan = None
        if self.tp_size > 1:
            from vllm.distributed.parallel_state import get_tp_group

            group = get_tp_group()
            self.tp_rank, self.tp_group = group.rank_in_group, group.cpu_group
            # unseeded requests draw from the engine's generator: the group's copies must draw alike to stay in step
            seeds = gather(cfg.seed, self.tp_group)
            if len(set(seeds)) > 1:
                raise ValueError(f"RolloutEngine: EngineConfig.seed differs across the ranks of one TP group "
                                 f"({seeds}); give every rank of a group the same seed")

    # --- engine internals used by weight_sync / parity -------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The engine's own nn.Module (in-process, so this is the live object, not a copy)."""
        if self._model is None:
            self._model = self.llm.apply_model(lambda m: m)[0]
        return self._model

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    # --- generation ------------------------------------------------------------------------------------------------

    def _submit(self, prompts: list, specs: list[tuple]) -> list:
        """vLLM's outputs for (prompt, spec) pairs, in order. Under TP the group's pairs are gathered, submitted as
        one call, and this rank's outputs returned (a collective of the group, also with no prompts here)."""
        from vllm import SamplingParams

        mine = list(zip(prompts, specs))
        if self.tp_size > 1:
            requests, offsets = concat(gather(mine, self.tp_group))
        else:
            requests, offsets = mine, [0, len(mine)]
        if not requests:
            return []
        params = []
        for _, spec in requests:
            if spec[0] == "sample":
                _, n, s = spec
                params.append(SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                             seed=s.seed, stop_token_ids=list(s.stop_token_ids), logprobs=0,
                                             detokenize=False))
            else:  # "prompt_logprobs": raw log-probs of the prompt's own next tokens
                params.append(SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False))
        outputs = self.llm.generate([p for p, _ in requests], params, use_tqdm=False)
        return my_slice(outputs, offsets, self.tp_rank if self.tp_size > 1 else 0)

    def _prompts(self, prompts: Sequence[str | Sequence[int]]) -> list:
        if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
            raise ValueError("generate: prompts must be a list of strings or of token-id lists, got "
                             f"{type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.config.skip_tokenizer_init:
                    raise ValueError(f"generate: prompts[{i}] is a string but the engine has no tokenizer "
                                     "(skip_tokenizer_init=True); pass token ids")
                out.append(p)
            else:
                ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
                if not ids:
                    raise ValueError(f"generate: prompts[{i}] is empty")
                out.append({"prompt_token_ids": [int(t) for t in ids]})
        return out

    def generate(self, prompts: Sequence[str | Sequence[int]], n: int = 1,
                 sampling: SamplingConfig | None = None) -> list[list[Sample]]:
        """n samples per prompt, in prompt order; each carries the weight version it was generated with. Under TP a
        collective of the group: every rank passes its own prompts (possibly none) and gets its own samples."""
        s = sampling or SamplingConfig()
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if self.asleep:
            raise RuntimeError("generate: the engine is asleep; call wake_up() (after the weight sync) first")
        version = self.weight_version
        prompts = self._prompts(prompts)
        outputs = self._submit(prompts, [("sample", n, s)] * len(prompts))
        groups = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = tuple(int(t) for t in c.token_ids)
                # logprobs=0: each position's dict holds exactly the sampled token's entry
                lps = tuple(float(step[t].logprob) for t, step in zip(ids, c.logprobs or ()))
                group.append(Sample(ids, lps, str(c.finish_reason), len(ids), version))
            groups.append(group)
        return groups

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Raw engine log-probs of token t+1 given tokens <= t, for each sequence: (T-1,) fp32 each (a collective of
        the group under TP, like generate)."""
        prompts = self._prompts(token_ids)
        outputs = self._submit(prompts, [("prompt_logprobs",)] * len(prompts))
        result = []
        for ids, out in zip(token_ids, outputs):
            ids = [int(t) for t in ids]
            steps = out.prompt_logprobs[1:]  # position 0 has no prediction
            result.append(torch.tensor([step[t].logprob for t, step in zip(ids[1:], steps)], dtype=torch.float32))
        return result

    # --- sleep / wake (GPU) ----------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release weights and KV cache for the training step; a no-op without sleep mode (CPU)."""
        if not self.sleep_enabled or self.asleep:
            return
        self.llm.sleep(level=self.config.sleep_level)
        self.asleep = self.weights_asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate "weights" and/or "kv_cache" (None = both); a no-op without sleep mode (CPU)."""
        if not self.sleep_enabled:
            return
        self.llm.wake_up(tags=list(tags) if tags is not None else None)
        if tags is None or "weights" in tags:
            self.weights_asleep = False
        if tags is None or "kv_cache" in tags:
            self.asleep = False

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory (the trainer's process group is left alone)."""
        llm, self.llm, self._model, self._sync_plan = getattr(self, "llm", None), None, None, None
        if llm is None:
            return
        client = getattr(llm.llm_engine, "engine_core", None)  # in-process client
        core = getattr(client, "engine_core", None)
        if self.external_launcher and core is not None:
            # EngineCore.shutdown() ends with cleanup_dist_env_and_memory(), which destroys the default process
            # group: the trainer's, under torchrun. Shut down the executor and scheduler only, and drop vLLM's own
            # model-parallel groups. The client's finalizer would call EngineCore.shutdown() on collection: detach it.
            from vllm.distributed.parallel_state import destroy_model_parallel

            with contextlib.suppress(Exception):
                client._finalizer.detach()

            for part in (core.model_executor, core.scheduler):
                with contextlib.suppress(Exception):
                    part.shutdown()
            with contextlib.suppress(Exception):
                destroy_model_parallel()
        elif client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()
        del llm, client, core
        import gc

        gc.collect()

