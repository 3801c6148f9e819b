"""A Python client for the policy service."""
from __future__ import annotations

import queue

import grpc
import numpy as np

from batchrl.protos.batchrl.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc
from batchrl.protos.contract import MAX_MESSAGE_BYTES
from batchrl.serving.tensors import decode, encode


class PolicyClient:
    """Blocking client: ``with PolicyClient("127.0.0.1:50051") as c: c.act("hopper-iql", obs)``."""

    def __init__(self, address: str, timeout: float | None = 10.0, tls_ca: bytes | None = None,
                 client_cert: bytes | None = None, client_key: bytes | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None):
        """Plaintext by default; ``tls_ca`` (PEM bytes) switches to TLS, and ``client_cert`` with
        ``client_key`` present a client certificate (mutual TLS). ``token``: the data-plane bearer
        token, for a server started with one."""
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls_ca is None and client_cert is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            creds = grpc.ssl_channel_credentials(tls_ca, client_key, client_cert)
            self.channel = grpc.secure_channel(address, creds, options=options)
        self.address = address
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.admin = admin_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout = timeout
        self.metadata = _auth(token)

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
        response = self.stub.Act(request, timeout=self.timeout, metadata=self.metadata)
        return decode(response.actions, "actions")

    def list_models(self) -> list[policy_pb2.ModelInfo]:
        return list(self.stub.ListModels(policy_pb2.ListModelsRequest(), timeout=self.timeout,
                                         metadata=self.metadata).models)

    # -- sessions (sequence policies) ----------------------------------------
    def open_session(self, model: str, version: int | None = None,
                     target_return: float | None = None) -> policy_pb2.OpenSessionResponse:
        return self.stub.OpenSession(open_request(model, version, target_return), timeout=self.timeout,
                                     metadata=self.metadata)

    def step(self, session_id: str, observation: np.ndarray, reward: float | None = None,
             index: int | None = None) -> np.ndarray:
        """One observation -> the session's action; ``reward`` is what the previous action earned;
        ``index``, this step's index in the episode (0 first), makes a retry answer once (a shared
        session store requires it)."""
        return decode(self.stub.Step(step_request(observation, reward, session_id, index), timeout=self.timeout,
                                     metadata=self.metadata).action, "action")

    def close_session(self, session_id: str) -> int:
        return self.stub.CloseSession(policy_pb2.CloseSessionRequest(session_id=session_id),
                                      timeout=self.timeout, metadata=self.metadata).steps

    def episode(self, model: str, version: int | None = None, target_return: float | None = None) -> "Episode":
        """An Episode stream: one session for one episode, closed when the stream ends."""
        return Episode(self.stub, open_request(model, version, target_return), self.metadata)

    # -- model control (needs the server's admin token) ---------------------
    def load_model(self, name: str, version: int | None = None, token: str | None = None,
                   timeout: float | None = 120.0) -> admin_pb2.LoadModelResponse:
        request = admin_pb2.LoadModelRequest(name=name)
        if version is not None:
            request.version = version
        return self.admin.LoadModel(request, timeout=timeout, metadata=_auth(token))

    def unload_model(self, name: str, token: str | None = None) -> admin_pb2.UnloadModelResponse:
        return self.admin.UnloadModel(admin_pb2.UnloadModelRequest(name=name), timeout=self.timeout,
                                      metadata=_auth(token))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects; ConnectionError naming the address if it does not."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"no server answered at {self.address} within {timeout:g} s; start one with "
                                  "`batchrl serve`, or pass --server HOST:PORT") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_request(model: str, version: int | None, target_return: float | None) -> policy_pb2.OpenSessionRequest:
    request = policy_pb2.OpenSessionRequest(model=model)
    if version is not None:
        request.version = version
    if target_return is not None:
        request.target_return = target_return
    return request


def step_request(observation: np.ndarray, reward: float | None, session_id: str = "",
                 index: int | None = None) -> policy_pb2.StepRequest:
    request = policy_pb2.StepRequest(session_id=session_id, observation=encode(observation))
    if reward is not None:
        request.reward = reward
    if index is not None:
        request.index = index
    return request


class Episode:
    """``with client.episode("hopper-dt") as ep: action = ep.step(obs); action = ep.step(obs, reward)``."""

    _END = object()

    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, request: policy_pb2.OpenSessionRequest,
                 metadata: tuple = ()):
        self._requests: queue.Queue = queue.Queue()
        self._call = stub.Episode(iter(self._requests.get, self._END), metadata=metadata)
        self._requests.put(policy_pb2.EpisodeRequest(open=request))
        self.opened: policy_pb2.OpenSessionResponse = next(self._call).opened
        self.index = 0  # the next step's index in the episode: every step carries it

    def step(self, observation: np.ndarray, reward: float | None = None) -> np.ndarray:
        self._requests.put(policy_pb2.EpisodeRequest(step=step_request(observation, reward, index=self.index)))
        action = decode(next(self._call).step.action, "action")
        self.index += 1
        return action

    def close(self) -> None:
        """End the stream (the server closes the session)."""
        self._requests.put(self._END)
        for _ in self._call:  # drain to the end of the stream
            pass

    def cancel(self) -> None:
        """Abandon the stream mid-episode (the server closes the session)."""
        self._call.cancel()
        self._requests.put(self._END)  # ends the request iterator, so grpc's thread reading it exits

    def __enter__(self) -> "Episode":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
