"""A Python client for the policy service."""
from __future__ import annotations

import grpc
import numpy as np

from protos.batchrl.v1 import policy_pb2, policy_pb2_grpc
from serving.tensors import decode, encode


class PolicyClient:
    """Blocking client: ``with PolicyClient("127.0.0.1:50051") as c: c.act("hopper-iql", obs)``."""

    def __init__(self, address: str, timeout: float | None = 10.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.timeout = timeout

    def act(self, model: str, observations: np.ndarray, version: int | None = None,
            noise_std: float = 0.0, seed: int | None = None) -> np.ndarray:
        """A batch of observations [batch, *obs_shape] -> a batch of actions [batch, *act_shape]."""
        request = policy_pb2.ActRequest(model=model, observations=encode(observations))
        if version is not None:
            request.version = version
        if noise_std or seed is not None:
            request.sampling.noise_std = noise_std
            if seed is not None:
                request.sampling.seed = seed
        response = self.stub.Act(request, timeout=self.timeout)
        return decode(response.actions, "actions")

    def list_models(self) -> list[policy_pb2.ModelInfo]:
        return list(self.stub.ListModels(policy_pb2.ListModelsRequest(), timeout=self.timeout).models)

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
