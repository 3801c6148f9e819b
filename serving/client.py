"""A Python client for the policy service."""
from __future__ import annotations

import itertools
import os
import queue
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# gRPC core logs each failed TLS handshake at INFO, which it shows unless told otherwise: wait_ready
# says what went wrong in one line instead. (Read once, as grpc is imported; GRPC_VERBOSITY=INFO shows them.)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from batchrl.errors import UserError  # noqa: E402
from batchrl.protos.batchrl.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc  # noqa: E402
from batchrl.protos.experience import ENDINGS  # noqa: E402
from batchrl.protos.contract import MAX_MESSAGE_BYTES  # noqa: E402
from batchrl.serving.tensors import decode, encode  # noqa: E402
from batchrl.serving.tls import check_pem  # noqa: E402

Pem = bytes | str | os.PathLike  # PEM contents (bytes), or the path of a file holding them (str or Path)


@dataclass(frozen=True)
class Failover:
    """How a call that finds its server UNAVAILABLE (down, draining, a broken stream) is retried: on
    the next address at once while this call has addresses left that it has not tried, then (the
    same addresses again, or a lone address) after a back-off that doubles from ``backoff`` (capped
    at 1 s); at most ``tries`` attempts in all and none started after ``deadline`` seconds. A session
    Step retried this way carries the same step index, so it is answered once."""
    tries: int = 4
    backoff: float = 0.05
    deadline: float = 10.0


class PolicyClient:
    """Blocking client: ``with PolicyClient("127.0.0.1:50051") as c: c.act("hopper-iql", obs)``.

    Several addresses (replicas sharing a session store) make it fail over: calls go to one address
    until it is UNAVAILABLE, then to the next (see Failover); ``retries`` counts the retried calls."""

    def __init__(self, address: str | Sequence[str], timeout: float | None = 10.0, tls_ca: Pem | None = None,
                 client_cert: Pem | None = None, client_key: Pem | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None,
                 failover: Failover = Failover(), channel_options: Sequence[tuple[str, object]] = ()):
        """Plaintext by default; ``tls_ca`` switches to TLS (trusting server certificates that CA signed),
        and ``client_cert`` with ``client_key`` present a client certificate (mutual TLS); each is PEM
        bytes or the path (str or Path) of a PEM file, checked here (UserError naming a file grpc could not
        use). ``token``: the data-plane bearer token, for a server started with one. ``channel_options``:
        gRPC channel arguments, e.g. ``[("grpc.lb_policy_name", "round_robin")]`` with a ``dns:///``
        address of several replicas."""
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes), *channel_options]
        self.addresses = [address] if isinstance(address, str) else list(address)
        if not self.addresses:
            raise ValueError("PolicyClient needs at least one address")
        # The TLS files by flag, as messages name them (None: plaintext).
        self.tls: dict[str, str] | None = None
        if tls_ca is None and client_cert is None and client_key is None:
            self._channels = [grpc.insecure_channel(a, options=options) for a in self.addresses]
        else:
            creds, self.tls = tls_credentials(tls_ca, client_cert, client_key)
            self._channels = [grpc.secure_channel(a, creds, options=options) for a in self.addresses]
        self._stubs = [policy_pb2_grpc.PolicyServiceStub(c) for c in self._channels]
        self._admins = [admin_pb2_grpc.ModelServiceStub(c) for c in self._channels]
        self._current = 0  # the address calls go to until it fails
        self.failover = failover
        self.retries = 0
        self.timeout = timeout
        self.metadata = _auth(token)

    @property
    def address(self) -> str:
        return self.addresses[self._current]

    @property
    def channel(self) -> grpc.Channel:
        return self._channels[self._current]

    @property
    def stub(self) -> policy_pb2_grpc.PolicyServiceStub:
        return self._stubs[self._current]

    @property
    def admin(self) -> admin_pb2_grpc.ModelServiceStub:
        return self._admins[self._current]

    def _failing_over(self, attempt, reconnect=None):
        """``attempt()``, retried as Failover says while it raises UNAVAILABLE: each retry moves to the
        next address (waiting out the back-off once every address has failed this call) and calls
        ``reconnect()`` first, if given."""
        policy, started = self.failover, time.monotonic()
        for tried in itertools.count(1):
            try:
                return attempt()
            except grpc.RpcError as error:
                # Another replica is tried at once; once every address failed, back-off doubles per retry.
                cycled = tried - len(self.addresses)
                pause = 0.0 if cycled < 0 else min(policy.backoff * 2 ** cycled, 1.0)
                if (error.code() != grpc.StatusCode.UNAVAILABLE or tried >= policy.tries
                        or time.monotonic() + pause - started > policy.deadline):
                    raise
                self.retries += 1
                self._current = (self._current + 1) % len(self.addresses)
                time.sleep(pause)
                if reconnect is not None:
                    reconnect()

    def _unary(self, method: str, request):
        return self._failing_over(
            lambda: getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata))

    def act(self, model: str, observations: np.ndarray, version: int | None = None,
            noise_std: float = 0.0, seed: int | None = None) -> np.ndarray:
        """A batch of observations [batch, *obs_shape] -> a batch of actions [batch, *act_shape]."""
        request = act_request(model, observations, version)
        set_sampling(request.sampling, noise_std, seed)
        return decode(self._unary("Act", request).actions, "actions")

    def list_models(self) -> list[policy_pb2.ModelInfo]:
        return list(self._unary("ListModels", policy_pb2.ListModelsRequest()).models)

    def act_stream(self, model: str, version: int | None = None) -> "ActStream":
        """An ActStream: ``stream.act(observations)`` per tick on one stream, answered in order."""
        return ActStream(self, model, version)

    # -- sessions (one per episode, every policy) ----------------------------
    def open_session(self, model: str, version: int | None = None,
                     target_return: float | None = None) -> policy_pb2.OpenSessionResponse:
        return self._unary("OpenSession", open_request(model, version, target_return))

    def step(self, session_id: str, observation: np.ndarray, reward: float | None = None,
             index: int | None = None, noise_std: float = 0.0, seed: int | None = None) -> np.ndarray:
        """One observation -> the session's action; ``reward`` is what the previous action earned;
        ``index``, this step's index in the episode (0 first), makes a retry answer once (a shared
        session store requires it); ``noise_std`` and ``seed`` as in ``act``."""
        request = step_request(observation, reward, session_id, index, noise_std, seed)
        return decode(self._unary("Step", request).action, "action")

    def close_session(self, session_id: str, final_observation: np.ndarray | None = None,
                      reward: float | None = None, ending: str | None = None) -> int:
        """Close a session; with the episode's end (see ``close_request``) it is a complete episode."""
        return self._unary("CloseSession", close_request(session_id, final_observation, reward, ending)).steps

    def episode(self, model: str, version: int | None = None, target_return: float | None = None) -> "Episode":
        """An Episode stream: one session for one episode, closed by ``close()`` (or the with block)."""
        return Episode(self, open_request(model, version, target_return))

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
        """Wait until a server answers at the current address; ConnectionError in one line if none does:
        at once when the connection fails for a TLS reason (waiting would not mend it), else after
        ``timeout`` (a server may be starting)."""
        deadline = time.monotonic() + timeout
        health = health_pb2_grpc.HealthStub(self.channel)
        while True:
            try:  # fail fast (no wait_for_ready): a failed connection attempt ends the call with grpc's reason
                health.Check(health_pb2.HealthCheckRequest(), timeout=max(deadline - time.monotonic(), 0.01))
                return
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return  # a server answered (one without the health service says UNIMPLEMENTED)
                reason = connect_error(error.details() or "") if error.code() == grpc.StatusCode.UNAVAILABLE else ""
            problem = tls_problem(self.address, self.tls, reason)
            if problem:
                raise ConnectionError(f"cannot reach {self.address}{' over TLS' if self.tls else ''}: {problem}")
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no server answered at {self.address} within {timeout:g} s; start one with "
                                      "`batchrl serve`, or pass --server HOST:PORT")
            time.sleep(0.05)  # grpc retries the connection on its own back-off meanwhile

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tls_credentials(tls_ca: Pem | None, client_cert: Pem | None,
                    client_key: Pem | None) -> tuple[grpc.ChannelCredentials, dict[str, str]]:
    """grpc's channel credentials from PEM bytes or files, and each given one's name for messages (its path,
    or "<bytes>"). Checked first as the server checks its own (serving/tls.py): grpc takes bytes only, and
    with a file it cannot use every handshake fails, logged by grpc, not said to the caller."""
    if (client_cert is None) != (client_key is None):
        raise UserError("--client-cert and --client-key (client_cert, client_key) go together: a client "
                        "certificate is presented with its private key")
    given = {flag: value for flag, value in (("--tls-ca", tls_ca), ("--client-cert", client_cert),
                                             ("--client-key", client_key)) if value is not None}
    names = {flag: "<bytes>" if isinstance(value, bytes) else str(value) for flag, value in given.items()}
    with tempfile.TemporaryDirectory() as folder:  # bytes go through a file too: OpenSSL loads keys from files
        files = {flag: Path(value) for flag, value in given.items() if not isinstance(value, bytes)}
        for flag, value in given.items():
            if isinstance(value, bytes):
                files[flag] = Path(folder, flag.strip("-"))
                files[flag].write_bytes(value)
        check_pem({flag: files.get(flag) for flag in ("--client-cert", "--client-key", "--tls-ca")},
                  ssl.PROTOCOL_TLS_CLIENT, names)
        pem = {flag: path.read_bytes() for flag, path in files.items()}
    return grpc.ssl_channel_credentials(pem.get("--tls-ca"), pem.get("--client-key"), pem.get("--client-cert")), names


def connect_error(details: str) -> str:
    """The reason in grpc's "failed to connect to all addresses; last error: CODE: ipv4:HOST:PORT: REASON"
    ("" when the details are not of that form: a server's own UNAVAILABLE)."""
    _, found, last = details.partition("last error: ")
    if not found:
        return ""
    parts = last.split(": ", 2)  # CODE, the address, the reason
    return parts[2].removesuffix(": OK").strip() if len(parts) == 3 else last


def tls_problem(address: str, tls: dict[str, str] | None, reason: str) -> str | None:
    """What a failed connection attempt (grpc's ``reason``) says about TLS on either side, in words; None when
    it is no TLS problem (e.g. connection refused: nothing listens yet)."""
    closed = "Socket closed" in reason or "Connection reset" in reason
    if tls is None:  # plaintext: a TLS server closes the connection, which is all grpc says, so ask it
        if closed and speaks_tls(address):
            return ("the server speaks TLS and this client plaintext: pass --tls-ca (tls_ca) with the CA that "
                    "signed the server's certificate")
        return None
    ca = f"--tls-ca {tls['--tls-ca']}" if "--tls-ca" in tls else "the system's CA certificates (no --tls-ca given)"
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        why = reason.partition("CERTIFICATE_VERIFY_FAILED")[2].strip(": ")
        if "issuer" in why or "self signed" in why or "self-signed" in why:
            return f"the server's certificate is not signed by {ca}"
        return f"the server's certificate does not verify with {ca}: {why}"
    if "Hostname Verification" in reason or "Peer name" in reason:
        return f"the server's certificate is not issued for {address.rpartition(':')[0]}: {reason}"
    if "WRONG_VERSION_NUMBER" in reason:
        return "the server does not speak TLS (plaintext): connect without --tls-ca, --client-cert, --client-key"
    if closed:  # the handshake went through on this side, then the server hung up: what mutual TLS does
        if "--client-cert" in tls:
            return (f"the server closed the connection after the TLS handshake: it did not accept --client-cert "
                    f"{tls['--client-cert']} (mutual TLS: a certificate signed by the server's --client-ca)")
        return ("the server closed the connection after the TLS handshake: it requires a client certificate "
                "(mutual TLS): pass --client-cert and --client-key (client_cert, client_key)")
    if "handshake" in reason.lower():
        return f"the TLS handshake failed: {reason}"
    return None


def speaks_tls(address: str, timeout: float = 2.0) -> bool:
    """Whether the server at HOST:PORT completes a TLS handshake (its certificate unchecked: only asking)."""
    host, _, port = address.removeprefix("dns:///").rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            context.wrap_socket(raw).close()
        return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def act_request(model: str, observations: np.ndarray, version: int | None) -> policy_pb2.ActRequest:
    request = policy_pb2.ActRequest(model=model, observations=encode(observations))
    if version is not None:
        request.version = version
    return request


def open_request(model: str, version: int | None, target_return: float | None) -> policy_pb2.OpenSessionRequest:
    request = policy_pb2.OpenSessionRequest(model=model)
    if version is not None:
        request.version = version
    if target_return is not None:
        request.target_return = target_return
    return request


def set_sampling(sampling: policy_pb2.Sampling, noise_std: float, seed: int | None) -> None:
    if noise_std or seed is not None:
        sampling.noise_std = noise_std
        if seed is not None:
            sampling.seed = seed


def step_request(observation: np.ndarray, reward: float | None, session_id: str = "", index: int | None = None,
                 noise_std: float = 0.0, seed: int | None = None) -> policy_pb2.StepRequest:
    request = policy_pb2.StepRequest(session_id=session_id, observation=encode(observation))
    if reward is not None:
        request.reward = reward
    if index is not None:
        request.index = index
    set_sampling(request.sampling, noise_std, seed)
    return request


def close_request(session_id: str, final_observation: np.ndarray | None = None, reward: float | None = None,
                  ending: str | None = None) -> policy_pb2.CloseSessionRequest:
    """A close; with ``final_observation`` (what the last action led to), ``reward`` (what it earned; None
    after no step) and ``ending`` ("terminated" or "truncated") it carries the episode's end."""
    request = policy_pb2.CloseSessionRequest(session_id=session_id)
    if final_observation is None:
        if reward is not None or ending is not None:
            raise ValueError("reward and ending are sent with a final_observation")
        return request
    if ending not in ENDINGS:
        raise ValueError(f"ending must be one of {list(ENDINGS)} with a final observation, got {ending!r}")
    request.final_observation.CopyFrom(encode(final_observation))
    request.ending = policy_pb2.Ending.Value(ending.upper())
    if reward is not None:
        request.reward = reward
    return request


class _Stream:
    """A bidirectional stream fed from a queue, re-opened on the client's next address when it breaks."""

    _END = object()

    def __init__(self, client: PolicyClient, method: str):
        self._client, self._method = client, method
        self._connect()

    def _connect(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        stub = getattr(self._client.stub, self._method)
        self._call = stub(iter(self._requests.get, self._END), metadata=self._client.metadata)

    def _exchange(self, request, on_reconnect=None):
        """Send ``request`` and return the answer; on UNAVAILABLE, again on a new stream (Failover)."""
        def attempt():
            self._requests.put(request)
            try:
                return next(self._call)
            except grpc.RpcError:
                self._requests.put(self._END)  # ends the broken stream's request iterator
                raise

        def reconnect():
            self._connect()
            if on_reconnect is not None:
                on_reconnect(request)

        return self._client._failing_over(attempt, reconnect)

    def close(self) -> None:
        """End the stream."""
        self._requests.put(self._END)
        for _ in self._call:  # drain to the end of the stream
            pass

    def cancel(self) -> None:
        """Abandon the stream (to the server, a broken stream)."""
        self._call.cancel()
        # End the request iterator, so grpc's thread reading it exits; only once the call is over, or
        # that thread could half-close the stream first and the server would see an ended episode.
        self._call.add_done_callback(lambda _: self._requests.put(self._END))

    def __enter__(self):
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is None:
            self.close()
        else:  # the stream may be over already: do not hide the error behind another
            self.cancel()


class ActStream(_Stream):
    """``with client.act_stream("hopper-iql") as s: actions = s.act(observations)``: Act on one stream."""

    def __init__(self, client: PolicyClient, model: str, version: int | None = None):
        super().__init__(client, "ActStream")
        self.model, self.version = model, version

    def act(self, observations: np.ndarray) -> np.ndarray:
        """A batch of observations [batch, *obs_shape] -> actions [batch, *act_shape]."""
        return decode(self._exchange(act_request(self.model, observations, self.version)).actions, "actions")


class Episode(_Stream):
    """``with client.episode("hopper-dt") as ep: action = ep.step(obs); action = ep.step(obs, reward)``.

    Every step carries its index. If the stream breaks (its server UNAVAILABLE), the step is sent
    again on a new stream to the client's next address, attaching to the same session (the first
    message of that stream is the step, with the session id): with a shared session store the
    episode goes on where it was, each step answered once. ``close()`` ends the episode."""

    def __init__(self, client: PolicyClient, request: policy_pb2.OpenSessionRequest):
        super().__init__(client, "Episode")
        self.opened: policy_pb2.OpenSessionResponse = self._exchange(policy_pb2.EpisodeRequest(open=request)).opened
        self.index = 0  # the next step's index in the episode: every step carries it
        self.steps: int | None = None  # the step count, once closed

    def step(self, observation: np.ndarray, reward: float | None = None, noise_std: float = 0.0,
             seed: int | None = None) -> np.ndarray:
        request = policy_pb2.EpisodeRequest(step=step_request(observation, reward, index=self.index,
                                                              noise_std=noise_std, seed=seed))

        def attach(message):  # the new stream attaches to the session
            message.step.session_id = self.opened.session_id

        action = decode(self._exchange(request, attach).step.action, "action")
        self.index += 1
        return action

    def close(self, final_observation: np.ndarray | None = None, reward: float | None = None,
              ending: str | None = None) -> int:
        """End the episode, with its end if given (see ``close_request``): the server closes the session;
        returns its step count. Once closed (the with block closes too), closing again returns it."""
        if self.steps is None:
            request = policy_pb2.EpisodeRequest(close=close_request(self.opened.session_id, final_observation,
                                                                    reward, ending))
            self.steps = self._exchange(request).closed.steps
            super().close()
        return self.steps
