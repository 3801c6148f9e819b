"""The torch device a command trains or evaluates on, refused in one line when this machine lacks it."""
from __future__ import annotations

import torch

from batchrl.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """``name`` (auto, cpu, cuda or cuda:N) as a device this machine has: auto is CUDA when torch sees a GPU.
    Checked here, before any data loads, so that a missing GPU is one line rather than torch's traceback
    from deep inside the first tensor moved there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: expected {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"device {name!r}: expected {DEVICE_CHOICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device {name!r}: this machine has no CUDA GPU that torch can use; available: cpu")
    if device.index is not None and device.index >= count:
        gpus = ", ".join(f"cuda:{i}" for i in range(count))
        raise UserError(f"device {name!r}: this machine has {count} CUDA GPU(s); available: cpu, {gpus}")
    return device
