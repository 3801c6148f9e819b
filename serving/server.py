"""The gRPC policy server, one port for: batchrl's PolicyService (Act, ListModels, sequence-policy
sessions), model control (ModelService, behind the admin token), the Open Inference Protocol
(serving/kserve.py), grpc.health.v1 and reflection.

Imports neither torch, minari nor gymnasium: a serving image stays small and
starts fast.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import resource
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batchrl.errors import UserError
from batchrl.version import package_version
from batchrl.protos.batchrl.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc
from batchrl.protos.contract import MAX_MESSAGE_BYTES
from batchrl.serving.admission import Admission, AdmissionLimits, Role, StreamIdle
from batchrl.serving.auth import Tokens
from batchrl.serving.background import every
from batchrl.serving.calls import Call, deadline_of, guarded
from batchrl.serving.dataplane import DataPlane, EpisodeEnd, check_rank
from batchrl.serving.errors import FailedPrecondition, InvalidArgument, Unavailable
from batchrl.serving.kserve import KServeService, kv, kv_grpc
from batchrl.serving.logs import RateLimitedLog
from batchrl.serving.metrics import Metrics
from batchrl.serving.repository import Registry
from batchrl.serving.runtime import LoadedModel
from batchrl.serving.sessions import Session, Sessions, SessionStore
from batchrl.serving.tensors import decode, encode
from batchrl.serving.tls import check_tls, warn_expiry

log = logging.getLogger("batchrl.serve")
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
KSERVE_SERVICE_NAME = kv.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
DRAIN_BOUND = 2.0  # seconds the drain waits past its grace period for grpc to finish stopping
# Connections: each open one holds a file descriptor and some memory until it closes. The default cap
# leaves FD_RESERVE descriptors (at most half the limit) for model files, the repository scan, the
# metrics endpoint, the experience log and Redis, so a crowd of connections cannot starve them.
MAX_CONNECTIONS = 10_000
FD_RESERVE = 256
# Keepalive enforcement: a client may ping at most every PING_INTERVAL seconds, with or without calls
# in flight (idle connections are closed by the idle timeout, not by ping rules); a client that pings
# more often is told "too many pings" and disconnected at its PING_STRIKES + 1st early ping.
PING_INTERVAL = 10.0
PING_STRIKES = 2
ADMIN_METHODS = frozenset(f"/{service}/{method}" for service, method in (
    (ADMIN_SERVICE_NAME, "LoadModel"), (ADMIN_SERVICE_NAME, "UnloadModel"),
    (KSERVE_SERVICE_NAME, "RepositoryModelLoad"), (KSERVE_SERVICE_NAME, "RepositoryModelUnload")))
# Calls that reveal no more than health does: no token needed. RepositoryIndex lists only loaded
# models to a caller without the admin token.
OPEN_METHODS = frozenset(f"/{KSERVE_SERVICE_NAME}/{method}" for method in (
    "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "RepositoryIndex"))


def role_of(method: str) -> Role:
    if method in ADMIN_METHODS:
        return Role.ADMIN
    if method in OPEN_METHODS or method.startswith("/grpc.reflection."):
        return Role.OPEN
    return Role.DATA


def optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    """batchrl's gRPC API: protobuf in and out, over the dataplane; every call through the guard."""

    def __init__(self, plane: DataPlane, metrics: Metrics | None = None):
        self.plane = plane
        self.metrics = metrics
        self._stream_closes = RateLimitedLog(log)  # a client can have its streams closed at will

    def _guard(self, context, call: Call, handler):
        return guarded(context, call, handler, self.metrics)

    def _model(self, call: Call, name: str, version: int | None) -> LoadedModel:
        model = self.plane.model(name, version)
        call.model = model.name  # only loaded names become metric labels
        return model

    def _session(self, call: Call, session_id: str) -> Session:
        session = self.plane.session(session_id)
        call.model = session.model.name
        return session

    # -- feed-forward policies ---------------------------------------------
    def Act(self, request: policy_pb2.ActRequest, context: grpc.ServicerContext) -> policy_pb2.ActResponse:
        call = Call("Act")
        return self._guard(context, call, lambda: self._act(call, request, context))

    def ActStream(self, request_iterator, context):
        """Act, one answer per request on one stream; each message goes through the guard."""
        try:
            for request in request_iterator:
                call = Call("ActStream")
                yield self._guard(context, call, lambda: self._act(call, request, context))
        except StreamIdle:
            return

    def _act(self, call: Call, request: policy_pb2.ActRequest, context) -> policy_pb2.ActResponse:
        model = self._model(call, request.model, optional(request, "version"))
        if not request.HasField("observations"):
            raise InvalidArgument("observations are missing")
        check_rank(model, request.observations.shape, "observations", batched=True)  # before numpy sees the shape
        sampling = request.sampling
        actions = self.plane.act(model, decode(request.observations, "observations"), deadline_of(context),
                                 sampling.noise_std, optional(sampling, "seed"))
        return policy_pb2.ActResponse(model=model.name, version=model.version, actions=encode(actions))

    def ListModels(self, request, context) -> policy_pb2.ListModelsResponse:
        def list_models():
            response = policy_pb2.ListModelsResponse()
            for name, versions in sorted(self.plane.registry.models.items()):
                info = response.models.add(name=name, default_version=max(versions))
                for version, model in sorted(versions.items()):
                    info.versions.add(version=version, manifest=model.manifest, providers=model.providers)
            return response

        return self._guard(context, Call("ListModels"), list_models)

    # -- sequence policies: sessions ---------------------------------------
    def OpenSession(self, request: policy_pb2.OpenSessionRequest, context) -> policy_pb2.OpenSessionResponse:
        call = Call("OpenSession")
        return self._guard(context, call, lambda: opened_response(self._open(call, request)))

    def Step(self, request: policy_pb2.StepRequest, context) -> policy_pb2.StepResponse:
        call = Call("Step")
        return self._guard(context, call, lambda: self._step(self._session(call, request.session_id), request,
                                                             deadline_of(context), optional(request, "index")))

    def CloseSession(self, request: policy_pb2.CloseSessionRequest, context) -> policy_pb2.CloseSessionResponse:
        call = Call("CloseSession")

        def close():
            closed = self.plane.close(request.session_id, episode_end(request))
            call.model = closed.model_name
            return policy_pb2.CloseSessionResponse(steps=closed.steps)

        return self._guard(context, call, close)

    def Episode(self, request_iterator, context):
        """One stream, one episode: open (or attach), step..., close.

        The first message opens a session, or attaches the stream to an open one (a step carrying
        its session_id); `close` ends the episode. A stream that ends without `close` (the client
        stopped, cancelled or lost its connection; the server closed it for idleness) closes an
        in-process session, except after idleness, but leaves a shared store's session open for
        another stream, here or at another server, to attach to. Every message goes through the
        guard; the first error ends the stream with its status. A stream is ordered, so a step
        without an index takes the one after the stream's previous step (0 after `open`); a stream
        that attaches names its first step's index.
        """
        opened: list[Session] = []
        next_index: list[int | None] = [None]  # the index a step without one takes
        try:
            for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    call = Call("EpisodeOpen")
                    response = self._guard(context, call, lambda: self._stream_open(call, opened, request.open))
                    next_index[0] = 0
                    yield policy_pb2.EpisodeResponse(opened=response)
                elif kind == "step":
                    call = Call("EpisodeStep")
                    step = self._guard(context, call, lambda: self._stream_step(call, opened, request.step,
                                                                                deadline_of(context), next_index))
                    yield policy_pb2.EpisodeResponse(step=step)
                elif kind == "close":
                    call = Call("EpisodeClose")
                    closed = self._guard(context, call, lambda: self._stream_close(call, opened, request.close))
                    yield policy_pb2.EpisodeResponse(closed=closed)
                else:
                    self._guard(context, Call("Episode"), _raise(InvalidArgument(
                        "empty EpisodeRequest: set `open`, `step` or `close`")))
        except StreamIdle:
            if opened:
                self._stream_closes.info("episode", "session %s stays open after the server closed its Episode "
                                         "stream (idle, or its client took no answer)", opened[0].id)
            opened.clear()
        finally:
            if self.plane.sessions.shared:
                opened.clear()  # for another stream to attach to; it expires after the idle timeout
            while opened:
                self.plane.sessions.close(opened.pop().id)

    def _stream_close(self, call: Call, opened: list[Session],
                      request: policy_pb2.CloseSessionRequest) -> policy_pb2.CloseSessionResponse:
        if not opened and not request.session_id:
            raise FailedPrecondition("`close` on an Episode stream with no session: open or attach first, or name "
                                     "the session_id")
        end = episode_end(request)
        closed = self.plane.close(opened[0].id if opened else request.session_id, end)
        opened.clear()  # closed: the stream no longer holds it
        call.model = closed.model_name
        return policy_pb2.CloseSessionResponse(steps=closed.steps)

    def _stream_open(self, call: Call, opened: list[Session],
                     request: policy_pb2.OpenSessionRequest) -> policy_pb2.OpenSessionResponse:
        if opened:
            raise FailedPrecondition(f"this stream already has session {opened[0].id}: one stream is one episode; "
                                     "start a new stream for the next one")
        session = self._open(call, request)
        opened.append(session)
        return opened_response(session)

    def _stream_step(self, call: Call, opened: list[Session], request: policy_pb2.StepRequest,
                     deadline: float | None, next_index: list[int | None]) -> policy_pb2.StepResponse:
        if not opened and not request.session_id:
            raise FailedPrecondition("the first message of an Episode stream must be `open`, or a `step` carrying "
                                     "the session_id of an open session")
        if opened and self.plane.sessions.shared:
            # The stream's own copy of a shared session is current after its last step: no read of the
            # store, and the store's conditional write refuses it if another process stepped meanwhile.
            session = opened[0]
            call.model = session.model.name
        else:
            session = self._session(call, opened[0].id if opened else request.session_id)
        if not opened:
            opened.append(session)  # the stream attaches to the open session named by its first step
        index = optional(request, "index")
        index = next_index[0] if index is None else index
        response = self._step(session, request, deadline, index)
        next_index[0] = None if index is None else index + 1
        return response

    def _open(self, call: Call, request: policy_pb2.OpenSessionRequest) -> Session:
        model = self._model(call, request.model, optional(request, "version"))
        return self.plane.open(model, optional(request, "target_return"))

    def _step(self, session: Session, request: policy_pb2.StepRequest, deadline: float | None = None,
              index: int | None = None) -> policy_pb2.StepResponse:
        """``index``: the step's index (unary Step: the request's own)."""
        if not request.HasField("observation"):
            raise InvalidArgument("observation is missing")
        check_rank(session.model, request.observation.shape, "observation", batched=False)  # before numpy does
        sampling = request.sampling
        result = self.plane.step(session, decode(request.observation, "observation"), optional(request, "reward"),
                                 deadline, index=index, noise_std=sampling.noise_std, seed=optional(sampling, "seed"))
        return policy_pb2.StepResponse(action=encode(result.action), timestep=result.timestep,
                                       return_to_go=result.return_to_go, version=result.version)


def episode_end(request: policy_pb2.CloseSessionRequest) -> EpisodeEnd | None:
    """The episode's end a close carries, or None when it carries none; InvalidArgument for a part of one."""
    if not request.HasField("final_observation"):
        if request.HasField("reward") or request.ending:
            raise InvalidArgument("a close with a reward or an ending must carry the final_observation too (send "
                                  "all three, or none)")
        return None
    if request.ending not in (policy_pb2.TERMINATED, policy_pb2.TRUNCATED):
        raise InvalidArgument(f"a close with a final_observation must say how the episode ended: ending TERMINATED "
                              f"({policy_pb2.TERMINATED}) or TRUNCATED ({policy_pb2.TRUNCATED}), got {request.ending}")
    return EpisodeEnd(decode(request.final_observation, "final_observation"), optional(request, "reward"),
                      policy_pb2.Ending.Name(request.ending).lower())  # the words of protos/experience.ENDINGS


def opened_response(session: Session) -> policy_pb2.OpenSessionResponse:
    model = session.model
    return policy_pb2.OpenSessionResponse(session_id=session.id, model=model.name, version=model.version,
                                          context_length=model.manifest.context_length,
                                          target_return=session.context.return_to_go)


def _raise(error: Exception):
    def handler():
        raise error
    return handler


class ModelService(admin_pb2_grpc.ModelServiceServicer):
    """Operators' model control: load and unload by name (the admin token is checked by admission)."""

    def __init__(self, plane: DataPlane, metrics: Metrics | None = None):
        self.plane = plane
        self.metrics = metrics

    def LoadModel(self, request: admin_pb2.LoadModelRequest, context) -> admin_pb2.LoadModelResponse:
        def load():
            loaded = self.plane.load(request.name, optional(request, "version"))
            versions = sorted(self.plane.registry.models.get(request.name, {}))
            log.info("load %s: loaded %s; serving versions %s", request.name,
                     [m.version for m in loaded] or "nothing new", versions)
            return admin_pb2.LoadModelResponse(name=request.name, loaded_versions=[m.version for m in loaded],
                                               versions=versions, default_version=max(versions))

        return guarded(context, Call("LoadModel"), load, self.metrics)

    def UnloadModel(self, request: admin_pb2.UnloadModelRequest, context) -> admin_pb2.UnloadModelResponse:
        def unload():
            removed = self.plane.unload(request.name)
            log.info("unload %s: versions %s", request.name, [m.version for m in removed])
            return admin_pb2.UnloadModelResponse(name=request.name, unloaded_versions=[m.version for m in removed],
                                                 pinned_versions=[m.version for m in removed if m.pins])

        return guarded(context, Call("UnloadModel"), unload, self.metrics)


def start_sweeper(sessions: Sessions, stop: threading.Event) -> threading.Thread:
    """Evict idle sessions in the background, so an abandoned session does not pin its model forever.
    A failed pass (a shared store down) is logged once per outage, and the next pass tries again."""
    interval = min(30.0, sessions.idle_timeout / 2)

    def sweep():
        failing = False  # the last pass failed: said once, until a pass succeeds
        while not stop.wait(interval):
            try:
                evicted = sessions.evict_idle()
            except Exception as exc:  # noqa: BLE001 - a failed pass must not end sweeping
                if not failing:
                    if isinstance(exc, Unavailable):  # its message names the store, never its password
                        log.warning("session sweeper: %s; it tries again every %g s", exc, interval)
                    else:
                        log.exception("session sweeper: a pass failed; it tries again every %g s", interval)
                failing = True
                continue
            if failing:
                log.info("session sweeper: evicting idle sessions again")
                failing = False
            if evicted:
                log.info("evicted %d idle session(s)", evicted)

    thread = threading.Thread(target=sweep, name="batchrl-session-sweeper", daemon=True)
    thread.start()
    return thread


def start_poller(registry: Registry, interval: float, stop: threading.Event,
                 metrics: Metrics | None = None) -> threading.Thread:
    """Pick up new version folders (and drop removed ones) every ``interval`` seconds.

    A pass that fails for the system's sake (OSError: too many open files, an unreadable or vanished
    folder) is logged once per kind of failure, not once per pass, and retried the next pass; anything
    else is a bug, logged with its traceback at most once per RateLimitedLog interval. Every failed pass
    is counted (batchrl_repository_poll_failures, by reason)."""
    bugs = RateLimitedLog(log, interval=60.0)

    def poll():
        failing: str | None = None  # the reason of the last failed pass; None after a pass that worked
        while not stop.wait(interval):
            try:
                changes = registry.poll()
            except Exception as exc:  # noqa: BLE001 - a failed scan must not end polling
                reason = errno.errorcode.get(exc.errno, "OSError") if isinstance(exc, OSError) else "bug"
                if metrics is not None:
                    metrics.poll_failures.labels(reason).inc()
                if reason == "bug":
                    bugs.exception(type(exc).__qualname__, "repository poll failed")
                elif reason != failing:
                    log.error("repository poll failed: %s; retrying every %g s (logged again only when the "
                              "failure changes)", exc, interval)
                failing = reason
                continue
            if failing is not None:
                log.info("repository poll works again")
                failing = None
            for change in changes:
                log.info("repository poll: %s", change)

    thread = threading.Thread(target=poll, name="batchrl-repository-poll", daemon=True)
    thread.start()
    return thread


def start_memory_trim(interval: float, stop: threading.Event) -> threading.Thread | None:
    """Give memory that malloc holds free back to the system every ``interval`` seconds (glibc only).

    Each connection costs the server some 15 KB of grpc core's memory. When connections close, glibc
    keeps the freed memory in the arena of whichever thread freed it, and the next crowd of connections
    lands partly in other arenas: without a trim the process grows with every crowd (5 crowds of 1,000
    connections: +20 MB, never given back). A trim takes about a millisecond on a heap like this one's
    (longer, holding malloc's locks, on one fragmented by hundreds of MB: raise the interval there).
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        log.info("no malloc_trim (not glibc): memory freed by closed connections stays with the allocator")
        return None

    return every(interval, stop, "batchrl-memory-trim", lambda: trim(0))


@dataclass
class ServerOptions:
    address: str = "127.0.0.1:0"
    grpc_threads: int = 64               # gRPC worker threads; each open stream holds one
    max_streams: int | None = None       # concurrent streams; None: grpc_threads - 8 (half when <= 8)
    stream_idle_timeout: float = 60.0    # seconds a stream may wait for its client's next message
    admin_token: str | None = None       # None: model management is refused
    data_token: str | None = None        # None: the data plane needs no token
    max_message_bytes: int = MAX_MESSAGE_BYTES
    grace: float = 5.0                   # seconds in-flight requests get to finish on shutdown
    per_client_limit: int | None = None  # concurrent requests per client (mTLS identity, else peer address)
    reuse_port: bool = False             # share the port with other processes (SO_REUSEPORT) on purpose
    tls_cert: str | None = None          # PEM server certificate (chain) and key: TLS instead of plaintext
    tls_key: str | None = None
    client_ca: str | None = None         # PEM CA: require client certificates signed by it (mutual TLS)
    max_connections: int | None = None   # open connections at most (grpc closes more); None: from the fd limit
    connection_idle_timeout: float = 120.0  # seconds a connection without calls in flight stays open
    handshake_timeout: float = 10.0      # seconds a new connection has for TLS and its first HTTP/2 SETTINGS

    def admission_limits(self) -> AdmissionLimits:
        """The stream cap stays below the worker count, so unary calls and health always find a thread."""
        if self.grpc_threads < 2:
            raise ValueError(f"--grpc-threads must be >= 2 (streams and unary calls need threads), got "
                             f"{self.grpc_threads}")
        streams = self.max_streams
        if streams is None:
            streams = self.grpc_threads - 8 if self.grpc_threads > 8 else self.grpc_threads // 2
        if streams >= self.grpc_threads:
            raise ValueError(f"max streams ({streams}) must be below --grpc-threads ({self.grpc_threads}): each open "
                             "stream holds a worker thread, and unary calls and health need some left")
        return AdmissionLimits(streams, self.stream_idle_timeout, self.per_client_limit)

    def connection_cap(self) -> int:
        if self.max_connections is None:
            return default_max_connections()
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        return self.max_connections

    def connection_options(self) -> list[tuple[str, int]]:
        """grpc's channel arguments for the limits on connections (a client over the cap finds its
        connection closed at once: UNAVAILABLE)."""
        for flag, seconds in (("--connection-idle-timeout", self.connection_idle_timeout),
                              ("--handshake-timeout", self.handshake_timeout)):
            if not seconds > 0:
                raise ValueError(f"{flag} must be > 0 seconds, got {seconds}")
        ms = lambda seconds: max(1, round(seconds * 1000))  # noqa: E731
        return [("grpc.max_allowed_incoming_connections", self.connection_cap()),
                ("grpc.max_connection_idle_ms", ms(self.connection_idle_timeout)),
                ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout)),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(PING_INTERVAL)),
                ("grpc.http2.max_ping_strikes", PING_STRIKES),
                # Pings on a connection without calls are judged by the same interval, not by grpc's
                # default of one per two hours (which disconnects clients with an idle keepalive).
                ("grpc.keepalive_permit_without_calls", 1)]

    def credentials(self) -> grpc.ServerCredentials | None:
        check_tls(self.tls_cert, self.tls_key, self.client_ca)
        if not self.tls_cert:
            return None
        warn_expiry(self.tls_cert)
        read = lambda path: Path(path).read_bytes()  # noqa: E731
        ca = read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials([(read(self.tls_key), read(self.tls_cert))], root_certificates=ca,
                                           require_client_auth=ca is not None)


def default_max_connections() -> int:
    """MAX_CONNECTIONS, or fewer when this process's file descriptor limit leaves less beside FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - min(FD_RESERVE, soft // 2)))


@dataclass(frozen=True)
class Drained:
    unary_left: int     # unary calls still running at the deadline (cut off: the drain was not clean)
    streams_left: int   # streams still open at the deadline (closed by the drain: normal)
    finished: bool      # grpc finished stopping within DRAIN_BOUND of the deadline


@dataclass
class Served:
    """A configured server: start it, and drain it (health NOT_SERVING first, then stop with grace)."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    plane: DataPlane
    admission: Admission
    grace: float

    def start(self) -> None:
        self.server.start()
        self.admission.start()

    def drain(self, grace: float | None = None) -> Drained:
        """Stop accepting, let calls in flight finish within the grace period, then stop.

        Returns within grace + DRAIN_BOUND whatever clients do (grpc's own stop can wait forever
        on a call that never finishes), saying what was still running at the deadline.
        """
        grace = self.grace if grace is None else grace
        self.plane.draining = True
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING: balancers stop sending
        # New calls are refused from now on. grpc's own cut-off is set past the deadline, so that what
        # is still running at the deadline is counted here before anything is cut off (then at once).
        stopped = self.server.stop(grace + DRAIN_BOUND)
        if stopped.wait(grace):
            self.admission.stop()
            return Drained(0, 0, True)
        unary, streams = self.admission.unary_in_flight, self.admission.open_streams
        self.server.stop(0)  # the shortest grace given wins: cut off now
        finished = stopped.wait(DRAIN_BOUND)
        self.admission.stop()
        return Drained(unary, streams, finished)

    def stop(self) -> None:
        self.server.stop(None)
        self.admission.stop()


def build_server(registry: Registry, options: ServerOptions | str = ServerOptions(),
                 sessions: Sessions | None = None, metrics: Metrics | None = None, experience=None) -> Served:
    """A configured, not yet started, server bound to ``options.address`` (a bare string is the address);
    ``experience``: an ExperienceLog recording the sessions' steps, or None."""
    if isinstance(options, str):
        options = ServerOptions(address=options)
    grpc_options = [("grpc.max_receive_message_length", options.max_message_bytes),
                    ("grpc.max_send_message_length", options.max_message_bytes),
                    # grpc turns SO_REUSEPORT on by default: a second server on a busy port would start
                    # silently and take part of the traffic. Sharing a port is asked for, never implied.
                    ("grpc.so_reuseport", int(options.reuse_port)),
                    *options.connection_options()]
    if metrics is not None:
        metrics.max_connections.set(options.connection_cap())
    tokens = Tokens(options.admin_token, options.data_token)
    admission = Admission(role_of, tokens, options.admission_limits(), metrics)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.grpc_threads, thread_name_prefix="batchrl"),
                         options=grpc_options, interceptors=[admission])
    plane = DataPlane(registry, SessionStore() if sessions is None else sessions, metrics, experience)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyService(plane, metrics), server)
    admin_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(plane, metrics), server)
    kv_grpc.add_GRPCInferenceServiceServicer_to_server(KServeService(plane, tokens, metrics, version=package_version()),
                                                       server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME, KSERVE_SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Per-model health: the service name is the model name; NOT_SERVING once unloaded.
    state = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
    registry.on_change = lambda name, up: health_servicer.set(name, state[up])
    for name in registry.models:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, KSERVE_SERVICE_NAME,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    credentials = options.credentials()
    try:
        port = (server.add_secure_port(options.address, credentials) if credentials is not None
                else server.add_insecure_port(options.address))
    except RuntimeError:  # grpc's "Failed to bind to address ...", with the reason only in its debug log
        port = 0
    if port == 0:  # (the TLS files were checked before: a refusal of them is grpc's own, in its line above)
        raise UserError(f"cannot listen on {options.address}: the port is in use (another server?) or the "
                           "address is not one of this machine's; to share a port between batchrl serve "
                           "processes on purpose, start every one of them with --reuse-port"
                        + ("; or grpc refused the TLS files" if credentials is not None else ""))
    return Served(server, port, health_servicer, plane, admission, options.grace)
