"""Tensors on the wire: a shape plus raw little-endian float32 bytes."""
from __future__ import annotations

import math

import numpy as np

from batchrl.protos.batchrl.v1 import policy_pb2

WIRE_DTYPE = np.dtype("<f4")


def encode(array: np.ndarray) -> policy_pb2.Tensor:
    arr = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return policy_pb2.Tensor(shape=arr.shape, data=arr.tobytes())


def decode(tensor: policy_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """A read-only view over the message's bytes (no copy); ValueError names what is wrong."""
    shape = tuple(tensor.shape)  # ints already (a repeated int64 field); math.prod is exact and fast
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}: negative dimension in shape {list(shape)}")
    expected = 4 * math.prod(shape)
    if len(tensor.data) != expected:
        raise ValueError(f"{what}: {len(tensor.data)} bytes of data for shape {list(shape)} "
                         f"(expected {expected}: float32, 4 bytes per element)")
    return np.frombuffer(tensor.data, dtype=WIRE_DTYPE).reshape(shape)
