"""The algorithm registry: name -> (config dataclass, algorithm class)."""
from __future__ import annotations

from training.algorithms.base import Batch, Context, OfflineAlgorithm, SegmentBatch
from training.algorithms.bc import BC, BCConfig
from training.algorithms.bcq import BCQ, BCQConfig
from training.algorithms.cql import CQL, CQLConfig
from training.algorithms.dt import DT, DTConfig
from training.algorithms.iql import IQL, IQLConfig
from training.algorithms.td3bc import TD3BC, TD3BCConfig

ALGORITHMS: dict[str, tuple[type, type[OfflineAlgorithm]]] = {
    "bc": (BCConfig, BC),
    "iql": (IQLConfig, IQL),
    "td3bc": (TD3BCConfig, TD3BC),
    "cql": (CQLConfig, CQL),
    "bcq": (BCQConfig, BCQ),
    "dt": (DTConfig, DT),
}

__all__ = ["ALGORITHMS", "Batch", "Context", "OfflineAlgorithm", "SegmentBatch"]
