"""The algorithm registry: name -> (config dataclass, algorithm class)."""
from __future__ import annotations

from batchrl.training.algorithms.base import Batch, Context, OfflineAlgorithm, SegmentBatch
from batchrl.training.algorithms.bc import BC, BCConfig
from batchrl.training.algorithms.bcq import BCQ, BCQConfig
from batchrl.training.algorithms.cql import CQL, CQLConfig
from batchrl.training.algorithms.dt import DT, DTConfig
from batchrl.training.algorithms.iql import IQL, IQLConfig
from batchrl.training.algorithms.td3bc import TD3BC, TD3BCConfig

ALGORITHMS: dict[str, tuple[type, type[OfflineAlgorithm]]] = {
    "bc": (BCConfig, BC),
    "iql": (IQLConfig, IQL),
    "td3bc": (TD3BCConfig, TD3BC),
    "cql": (CQLConfig, CQL),
    "bcq": (BCQConfig, BCQ),
    "dt": (DTConfig, DT),
}

__all__ = ["ALGORITHMS", "Batch", "Context", "OfflineAlgorithm", "SegmentBatch"]
