"""Rollouts on a colocated vLLM engine with in-place weight hot-swap (see weight_sync.py for the step ordering).

vLLM is imported lazily (inside RolloutEngine), so importing qlfast.rollout costs nothing on machines without it.
vLLM logs at WARNING unless VLLM_LOGGING_LEVEL says otherwise: at INFO it prints a line per cache reset and weight
load, hundreds per run, burying the trainer's progress.
"""

import os

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is first imported, which only this package does

from qlfast.rollout.engine import EngineConfig, EngineStartError, RolloutEngine, Sample, SamplingConfig
from qlfast.rollout.parity import ParityError, ParityReport, check_parity
from qlfast.rollout.weight_sync import SyncStats, WeightSyncError, sync_weights, wake_and_sync

__all__ = [
    "EngineConfig", "EngineStartError", "ParityError", "ParityReport", "RolloutEngine", "Sample", "SamplingConfig",
    "SyncStats", "WeightSyncError", "check_parity", "sync_weights", "wake_and_sync",
]
