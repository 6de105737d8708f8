"""Rollouts on a colocated vLLM engine with in-place weight hot-swap (see weight_sync.py for the step ordering).

vLLM is imported lazily (inside RolloutEngine), so importing qlfast.rollout costs nothing on machines without it.
"""

from qlfast.rollout.engine import EngineConfig, EngineStartError, RolloutEngine, Sample, SamplingConfig
from qlfast.rollout.parity import ParityError, ParityReport, check_parity
from qlfast.rollout.weight_sync import SyncStats, WeightSyncError, sync_weights, wake_and_sync

__all__ = [
    "EngineConfig", "EngineStartError", "ParityError", "ParityReport", "RolloutEngine", "Sample", "SamplingConfig",
    "SyncStats", "WeightSyncError", "check_parity", "sync_weights", "wake_and_sync",
]
