"""Tensors on the wire: a shape plus raw little-endian float32 bytes."""
from __future__ import annotations

import math

import numpy as np

from batchrl.protos.batchrl.v1 import policy_pb2
from batchrl.serving.errors import InvalidArgument

WIRE_DTYPE = np.dtype("<f4")
# Dimensions of a tensor on the wire. numpy refuses arrays of more than 64 (32 before numpy 2), and no
# policy takes more than a few: a deeper shape is refused before any numpy work, naming its rank.
MAX_RANK = 32


def encode(array: np.ndarray) -> policy_pb2.Tensor:
    arr = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return policy_pb2.Tensor(shape=arr.shape, data=arr.tobytes())


def decode(tensor: policy_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """A read-only view over the message's bytes (no copy); InvalidArgument names what is wrong."""
    return from_bytes(tensor.data, tuple(tensor.shape), what)


def from_bytes(data: bytes, shape: tuple[int, ...], what: str) -> np.ndarray:
    """float32 little-endian ``data`` as an array of ``shape`` (a view, no copy), checked first."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{what}: shape of rank {len(shape)} ({len(shape)} dimensions); tensors have at most "
                              f"{MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {list(shape)}")
    expected = WIRE_DTYPE.itemsize * math.prod(shape)  # exact: a product past int64 must not wrap around
    if len(data) != expected:
        raise InvalidArgument(f"{what}: {len(data)} bytes of data for shape {list(shape)} "
                              f"(expected {expected}: float32, {WIRE_DTYPE.itemsize} bytes per element)")
    return np.frombuffer(data, dtype=WIRE_DTYPE).reshape(shape)
