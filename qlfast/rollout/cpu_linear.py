"""qlfast.rollout.cpu_linear: an engine patch for vLLM's CPU build that keeps linear weights as plain tensors.

vLLM's CPU build replaces each linear weight by a oneDNN/sgl packed handle at load time (the tensor becomes shape
(0,)), so new weights need a re-pack per layer (~5x a copy, docs/perf/weight_sync.md). With the patch, the layer keeps
its weight and calls F.linear on it, so an in-place copy into the weight (weight_sync) is what the next GEMM reads.
"""

from __future__ import annotations

import torch

_INSTALLED = False


def use_plain_cpu_linear() -> None:
    """Make vLLM's CPU linear layers keep their weight tensor and call F.linear on it (idempotent, process-wide).

    Installed before the engine loads; it affects engines created afterwards in this process. Non-2D weights keep
    vLLM's own handling.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    import vllm.model_executor.layers.utils as vllm_layer_utils

    packed_dispatch = vllm_layer_utils.dispatch_cpu_unquantized_gemm

    def plain_dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return packed_dispatch(layer, remove_weight)
        # the layer passes its current `weight` at call time, so an in-place copy into it is seen by the next GEMM
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    # vLLM imports this name inside process_weights_after_loading at call time, so replacing the attribute suffices
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = plain_dispatch
    _INSTALLED = True
