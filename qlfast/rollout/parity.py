"""qlfast.rollout.parity: does the engine compute the same log-probs as the trainer, on the same tokens?

    report = check_parity(engine, model, token_ids)            # model: qlfast QwenForCausalLM or a HF CausalLM
    report = check_parity(engine, logprob_fn, token_ids)       # logprob_fn(ids (T,)) -> (T-1,) log p(ids[t+1] | <=t)

Engine side: vLLM's prompt log-probs (`prompt_logprobs=0`: the log-prob of each actual next token, raw, i.e. at
temperature 1 before any sampling processor). Trainer side: `linear_logprob(hidden[:-1], lm_head_weight, ids[1:])`,
the same fused op the policy loss uses, so a parity pass vouches for the numbers the importance ratio is built from.
Returns mean and max |diff| over all tokens; warns past `warn_above` (mean), raises ParityError past `raise_above`
(mean), which is how "the sync did not arrive" surfaces.

Thresholds: mean |diff| is ~1e-6 when both sides run fp32 on CPU; bf16 engines differ from an fp32 trainer by
~1e-2 on average, so the default warn threshold follows the engine dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qlfast.rollout.engine import RolloutEngine


class ParityError(RuntimeError):
    """The engine's log-probs are far from the trainer's (a weight sync that did not arrive, or a mismatch)."""


@dataclass(frozen=True)
class ParityReport:
    mean_abs_diff: float
    max_abs_diff: float
    tokens: int
    weight_version: int


def default_warn_above(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


def _module_logprob_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from qlfast.ops.linear_logprob import linear_logprob

    param = next(model.parameters())

    def fn(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(param.device)
        if hasattr(model, "lm_head_weight"):  # qlfast.model contract: forward(input_ids (T,)) -> hidden (T, H)
            hidden = model(ids, torch.arange(ids.numel(), device=ids.device))
            weight = model.lm_head_weight
        elif hasattr(model, "get_output_embeddings") and hasattr(model, "model"):  # transformers CausalLM
            hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
            weight = model.get_output_embeddings().weight
        else:
            raise TypeError(f"check_parity: {type(model).__name__} is neither a qlfast model (lm_head_weight) nor a "
                            "transformers CausalLM; pass a logprob_fn instead")
        try:
            from torch.distributed.tensor import DTensor

            if isinstance(weight, DTensor):
                weight = weight.full_tensor()
        except ImportError:
            pass
        return linear_logprob(hidden[:-1], weight.to(hidden.dtype), ids[1:])

    return fn


def check_parity(engine: RolloutEngine, source: torch.nn.Module | Callable, token_ids: Sequence[Sequence[int]] |
                 Sequence[int], *, warn_above: float | None = None, raise_above: float | None = None) -> ParityReport:
    """Compare the engine's prompt log-probs with the trainer's on `token_ids` (one sequence or a list of them)."""
    seqs = [token_ids] if token_ids and isinstance(token_ids[0], int) else list(token_ids)
    seqs = [[int(t) for t in (s.tolist() if isinstance(s, torch.Tensor) else s)] for s in seqs]
    if not seqs or any(len(s) < 2 for s in seqs):
        raise ValueError("check_parity: token_ids must be sequences of at least 2 tokens, got lengths "
                         f"{[len(s) for s in seqs]}")
    fn = _module_logprob_fn(source) if isinstance(source, torch.nn.Module) else source
    engine_lps = engine.prompt_logprobs(seqs)
    diffs = []
    with torch.no_grad():
        for ids, lp_engine in zip(seqs, engine_lps):
            lp_trainer = fn(torch.tensor(ids, dtype=torch.long)).detach().float().cpu()
            if lp_trainer.shape != lp_engine.shape:
                raise ValueError(f"check_parity: trainer log-probs have shape {tuple(lp_trainer.shape)}, expected "
                                 f"({len(ids) - 1},) = one per next token")
            diffs.append((lp_trainer - lp_engine).abs())
    diff = torch.cat(diffs)
    report = ParityReport(float(diff.mean()), float(diff.max()), diff.numel(), engine.weight_version)
    warn_above = default_warn_above(engine.dtype) if warn_above is None else warn_above
    if raise_above is not None and report.mean_abs_diff > raise_above:
        raise ParityError(f"check_parity: engine vs trainer log-probs differ by mean {report.mean_abs_diff:.3g} "
                          f"(max {report.max_abs_diff:.3g}) > {raise_above:g} at weight version "
                          f"{report.weight_version}: did the last weight sync arrive?")
    if report.mean_abs_diff > warn_above:
        warnings.warn(f"check_parity: engine vs trainer log-probs differ by mean {report.mean_abs_diff:.3g} "
                      f"(max {report.max_abs_diff:.3g}) > {warn_above:g} at weight version {report.weight_version}",
                      stacklevel=2)
    return report
