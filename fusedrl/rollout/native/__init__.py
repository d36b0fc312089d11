"""The native rollout engine (paged KV with prefix sharing, continuous batching, decode attention).

    from fusedrl.rollout.native import NativeEngine, EngineConfig, UnsupportedModelError
"""
from .engine import EngineConfig, NativeEngine
from .model import FAMILIES, UnsupportedModelError

__all__ = ["EngineConfig", "NativeEngine", "UnsupportedModelError", "FAMILIES"]
