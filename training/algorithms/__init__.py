"""The algorithm registry: name -> (config dataclass, algorithm class)."""
from __future__ import annotations

from training.algorithms.base import Batch, Context, OfflineAlgorithm
from training.algorithms.bc import BC, BCConfig
from training.algorithms.iql import IQL, IQLConfig

ALGORITHMS: dict[str, tuple[type, type[OfflineAlgorithm]]] = {
    "bc": (BCConfig, BC),
    "iql": (IQLConfig, IQL),
}

__all__ = ["ALGORITHMS", "Batch", "Context", "OfflineAlgorithm"]
