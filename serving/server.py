"""The gRPC policy server: Act and ListModels, plus grpc.health.v1 and reflection.

Imports neither torch, minari nor gymnasium: a serving image stays small and
starts fast.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.batchrl.v1 import policy_pb2, policy_pb2_grpc
from serving.repository import Registry
from serving.runtime import LoadedModel, choose_providers
from serving.tensors import decode, encode

log = logging.getLogger("batchrl.serve")
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
MAX_BATCH = 65_536


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def validate_observations(model: LoadedModel, request: policy_pb2.ActRequest) -> np.ndarray:
    if not request.HasField("observations"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "observations are missing")
    try:
        obs = decode(request.observations, "observations")
    except ValueError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    expected = model.observation_shape
    if obs.ndim != 1 + len(expected) or obs.shape[1:] != expected:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"observations have shape {list(obs.shape)}; model {model.name!r} expects "
                           f"[batch, {', '.join(map(str, expected))}]")
    if obs.shape[0] == 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "observations hold an empty batch (batch size 0)")
    if obs.shape[0] > MAX_BATCH:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"batch size {obs.shape[0]} exceeds the maximum of {MAX_BATCH}")
    finite = np.isfinite(obs)
    if not finite.all():
        row, col = map(int, np.argwhere(~finite)[0])
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"observations must be finite: row {row}, element {col} is {obs[row, col]}")
    return obs


def add_noise(model: LoadedModel, actions: np.ndarray, sampling: policy_pb2.Sampling) -> np.ndarray:
    if not np.isfinite(sampling.noise_std) or sampling.noise_std < 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"sampling.noise_std must be finite and >= 0, got {sampling.noise_std}")
    if sampling.noise_std == 0:
        return actions
    rng = np.random.default_rng(sampling.seed if sampling.HasField("seed") else None)
    noisy = actions + rng.normal(0.0, sampling.noise_std, size=actions.shape).astype(np.float32)
    return np.clip(noisy, *model.action_bounds)


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    def _model(self, name: str, version: int | None) -> LoadedModel:
        try:
            return self.registry.get(name, version)
        except LookupError as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    def Act(self, request: policy_pb2.ActRequest, context: grpc.ServicerContext) -> policy_pb2.ActResponse:
        try:
            model = self._model(request.model, request.version if request.HasField("version") else None)
            obs = validate_observations(model, request)
            actions = model.run(obs)
            if request.HasField("sampling"):
                actions = add_noise(model, actions, request.sampling)
        except RequestError as exc:
            context.abort(exc.code, str(exc))
        except Exception:  # noqa: BLE001 - one bad request must never take the server down
            log.exception("Act failed for model %r", request.model)
            context.abort(grpc.StatusCode.INTERNAL, f"model {request.model!r} failed to run; see the server log")
        return policy_pb2.ActResponse(model=model.name, version=model.version, actions=encode(actions))

    def ListModels(self, request, context) -> policy_pb2.ListModelsResponse:
        response = policy_pb2.ListModelsResponse()
        for name, versions in sorted(self.registry.models.items()):
            info = response.models.add(name=name, default_version=max(versions))
            for version, model in sorted(versions.items()):
                info.versions.add(version=version, manifest=model.manifest, providers=model.providers)
        return response


def build_server(registry: Registry, address: str = "127.0.0.1:0", workers: int = 16) -> tuple[grpc.Server, int]:
    """A configured, not yet started, server bound to ``address``; returns it and the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchrl"))
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyService(registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the server to {address}")
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchrl serve", description="Serve the model repository over gRPC.")
    parser.add_argument("--repository", "-r", default="models", help="model repository root (default: models)")
    parser.add_argument("--address", "-a", default="127.0.0.1:50051", help="host:port to listen on")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: CUDA when a GPU is usable, else CPU")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device index")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per model")
    parser.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    providers = choose_providers(args.device, args.device_id)
    registry = Registry.load(Path(args.repository), providers, args.threads)
    if not registry.models:
        log.warning("no models loaded from %s", args.repository)
    server, port = build_server(registry, args.address, args.workers)
    server.start()
    in_use = sorted({p for versions in registry.models.values() for m in versions.values() for p in m.providers})
    log.info("serving %d model(s) on %s (port %d); onnxruntime providers in use: %s",
             sum(len(v) for v in registry.models.values()), args.address, port, ", ".join(in_use) or "none")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: finishing requests in flight")
    server.stop(grace=5).wait()
    return 0
