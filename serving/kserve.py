"""The Open Inference Protocol (KServe v2 / Triton `inference.GRPCInferenceService`) beside batchrl's API.

Existing Triton and KServe clients (tritonclient.grpc, KServe's InferenceGRPCClient)
work unchanged, on the same port. The protocol modules are tritonclient's own
generated ones (`grpc_service.proto` and `model_config.proto`, package
`inference`), so a process that also uses tritonclient registers every symbol
once. This layer only translates, over the dataplane (serving/dataplane.py) that
batchrl's own API uses too: one repository, batcher per model, session store,
set of metrics and error table.

Feed-forward policies: input `observations` FP32 [-1, obs_dim] -> output
`actions` FP32 [-1, act_dim]. Decision Transformers through the sequence
extension: request parameters `sequence_id` (integer or string),
`sequence_start`, `sequence_end` and optionally `target_return` map onto a
batchrl session; inputs `observation` [1, obs_dim] and `reward` [1, 1] (the
reward earned by the previous action: none, or 0, on the start request) ->
output `action` [1, act_dim]. The `sequence_end` request may carry the episode's
end: parameter `ending` ("terminated" or "truncated") makes its observation the
final one (what the last action led to) and its reward what that action earned;
it is answered with the action for that observation like any request, but it is
not a step of the episode (the experience log records it as the episode's end).

Sequence ids are shared by every client of the server (of every server on one Redis store), and
the integer 42 and the string "42" are two ids. A sequence belongs to the client that started it:
its mutual-TLS identity, else its network address without the port (serving/admission.py's
client_identity). A start naming another client's open sequence is refused (FAILED_PRECONDITION)
instead of replacing it, and so is any other request naming it; a client may restart its own id
(that replaces the sequence). Clients behind one NAT, proxy or load balancer that hides their
address share an owner: among them, pick ids that cannot collide (a UUID), or use mutual TLS.
Responses always carry raw_output_contents.
"""
from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kv
from tritonclient.grpc import service_pb2_grpc as kv_grpc

from batchrl.serving.admission import client_identity
from batchrl.serving.auth import Tokens
from batchrl.serving.calls import Call, deadline_of, guarded
from batchrl.protos.experience import ENDINGS
from batchrl.protos.contract import MAX_VERSION
from batchrl.serving.dataplane import DataPlane, EpisodeEnd, check_version, quoted
from batchrl.serving.errors import FailedPrecondition, InvalidArgument, ServingError
from batchrl.serving.runtime import LoadedModel
from batchrl.serving.sessions import KeyInUse
from batchrl.serving.tensors import WIRE_DTYPE, from_bytes

MAX_SEQUENCE_ID = 128  # characters of a string sequence_id
EXTENSIONS = ["model_configuration", "model_repository", "sequence", "parameters"]
PLATFORM = "onnxruntime_onnx"


class Unimplemented(ServingError):
    """A method of the protocol this server does not offer (shared memory, statistics, tracing...)."""
    code = grpc.StatusCode.UNIMPLEMENTED


class KServeService(kv_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, tokens: Tokens, metrics=None, name: str = "batchrl", version: str = ""):
        self.plane = plane
        self.tokens = tokens  # RepositoryIndex shows unloaded folders to the admin only
        self.metrics = metrics
        self.name, self.version = name, version

    # -- health and metadata -------------------------------------------------
    def ServerLive(self, request, context):
        return kv.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return kv.ServerReadyResponse(ready=not self.plane.draining)

    def ModelReady(self, request, context):
        def ready(call):
            version = parse_version(request.version)  # malformed: the caller's error, not "not ready"
            try:
                self.plane.model(request.name, version)
            except ServingError:
                return kv.ModelReadyResponse(ready=False)
            return kv.ModelReadyResponse(ready=not self.plane.draining)

        return self._answer(context, "ModelReady", ready)

    def ServerMetadata(self, request, context):
        return kv.ServerMetadataResponse(name=self.name, version=self.version, extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        return self._answer(context, "ModelMetadata", lambda call: self._metadata(call, request))

    def ModelConfig(self, request, context):
        return self._answer(context, "ModelConfig", lambda call: self._config(call, request))

    def _metadata(self, call, request) -> kv.ModelMetadataResponse:
        model = self._model(call, request.name, request.version)
        versions = [str(v) for v in self.plane.registry.models.get(model.name, {})]
        inputs, outputs = tensor_specs(model)
        meta = kv.ModelMetadataResponse.TensorMetadata
        return kv.ModelMetadataResponse(
            name=model.name, versions=versions, platform=PLATFORM,
            inputs=[meta(name=n, datatype="FP32", shape=[-1, *s]) for n, s in inputs],
            outputs=[meta(name=n, datatype="FP32", shape=[-1, *s]) for n, s in outputs])

    def _config(self, call, request) -> kv.ModelConfigResponse:
        model = self._model(call, request.name, request.version)
        inputs, outputs = tensor_specs(model)
        config = mc.ModelConfig(
            name=model.name, platform=PLATFORM, backend="onnxruntime",
            input=[mc.ModelInput(name=n, data_type=mc.TYPE_FP32, dims=list(s)) for n, s in inputs],
            output=[mc.ModelOutput(name=n, data_type=mc.TYPE_FP32, dims=list(s)) for n, s in outputs])
        if model.is_sequence:
            config.max_batch_size = 1  # one step of one sequence per request
            config.sequence_batching.max_sequence_idle_microseconds = int(self.plane.sessions.idle_timeout * 1e6)
        else:
            config.max_batch_size = model.limits.max_rows
            config.dynamic_batching.max_queue_delay_microseconds = int(model.limits.max_delay * 1e6)
        return kv.ModelConfigResponse(config=config)

    # -- inference -------------------------------------------------------------
    def ModelInfer(self, request: kv.ModelInferRequest, context) -> kv.ModelInferResponse:
        deadline = deadline_of(context)
        return self._answer(context, "ModelInfer", lambda call: self._infer(call, request, deadline, context))

    def _infer(self, call, request: kv.ModelInferRequest, deadline, context) -> kv.ModelInferResponse:
        model = self._model(call, request.model_name, request.model_version)
        inputs = decode_inputs(request, model)
        _, outputs = tensor_specs(model)
        for wanted in request.outputs:
            if wanted.name != outputs[0][0]:
                raise InvalidArgument(f"model {model.name!r} has no output {wanted.name!r}; its output is "
                                      f"{outputs[0][0]!r}")
        if model.is_sequence:
            # (the caller's identity only where it is needed: not on the feed-forward hot path)
            action = self._sequence_step(model, request, inputs, deadline, client_identity(context))
            return self._response(request, model, outputs[0][0], action[None])
        if set(inputs) != {"observations"}:
            raise InvalidArgument(f"model {model.name!r} takes one input, 'observations' FP32 [-1, "
                                  f"{', '.join(map(str, model.observation_shape))}]; got {sorted(inputs)}")
        actions = self.plane.act(model, inputs["observations"], deadline, what="input 'observations'")
        return self._response(request, model, "actions", actions)

    def _sequence_step(self, model: LoadedModel, request, inputs, deadline, owner: str) -> np.ndarray:
        """One request of a sequence; ``owner``: the client's identity (the sequence's owner, if it starts)."""
        params = request.parameters
        if "sequence_id" not in params:
            raise InvalidArgument(f"model {model.name!r} is a sequence policy: set the sequence_id parameter (and "
                                  "sequence_start on an episode's first request)")
        sequence = parameter_value(params["sequence_id"], "sequence_id", ("int64_param", "uint64_param",
                                                                           "string_param"))
        if sequence in ("", 0):
            raise InvalidArgument("sequence_id must be a non-zero integer or a non-empty string")
        if isinstance(sequence, str) and len(sequence) > MAX_SEQUENCE_ID:
            raise InvalidArgument(f"sequence_id {quoted(sequence)} is longer than {MAX_SEQUENCE_ID} characters")
        index = (parameter_value(params["step_index"], "step_index", ("int64_param", "uint64_param"))
                 if "step_index" in params else None)  # this step's index in the sequence: a retry answers once
        start = bool(params["sequence_start"].bool_param) if "sequence_start" in params else False
        end = bool(params["sequence_end"].bool_param) if "sequence_end" in params else False
        ending = parameter_value(params["ending"], "ending", ("string_param",)) if "ending" in params else None
        if ending is not None and (not end or ending not in ENDINGS):
            raise InvalidArgument(f"parameter ending={ending!r}: it goes with sequence_end, and is one of "
                                  f"{list(ENDINGS)}")
        unknown = set(inputs) - {"observation", "reward"}
        if "observation" not in inputs or unknown:
            raise InvalidArgument(f"model {model.name!r} takes inputs 'observation' FP32 [1, "
                                  f"{', '.join(map(str, model.observation_shape))}] and 'reward' FP32 [1, 1]; got "
                                  f"{sorted(inputs)}")
        observation = inputs["observation"]
        if tuple(observation.shape) != (1, *model.observation_shape):
            raise InvalidArgument(f"input 'observation' has shape {list(observation.shape)}: one step per request, "
                                  f"[1, {', '.join(map(str, model.observation_shape))}]")
        reward = None
        if "reward" in inputs:
            if inputs["reward"].size != 1:
                raise InvalidArgument(f"input 'reward' has shape {list(inputs['reward'].shape)}; expected [1, 1]")
            reward = float(inputs["reward"].reshape(-1)[0])
        key = (model.name, sequence)  # 42 and "42" differ; forgotten with its session: closed, ended or expired
        if start:
            if reward not in (None, 0.0):
                raise InvalidArgument("the start request of a sequence has no previous action: omit 'reward' or "
                                      "send 0")
            reward = None
            target = (parameter_value(params["target_return"], "target_return",
                                      ("double_param", "int64_param", "uint64_param"))
                      if "target_return" in params else None)
            try:
                session = self.plane.open(model, target, key=key, owner=owner)  # replaces the owner's earlier one
            except KeyInUse:
                raise self._taken(model, sequence, "start") from None
        else:
            try:
                session_id = self.plane.sessions.find(key, owner)
            except KeyInUse:
                raise self._taken(model, sequence, "step") from None
            if session_id is None:
                raise InvalidArgument(f"sequence {sequence!r} of model {model.name!r} is not open: set "
                                      "sequence_start on its first request")
            session = self.plane.session(session_id)
        try:
            if ending is not None:  # the episode's end, answered but not stepped
                action = self.plane.peek(session, observation[0], reward, deadline, "input 'observation'", index)
                self.plane.close(session.id, EpisodeEnd(observation[0], reward, ending))
                return action
            result = self.plane.step(session, observation[0], reward, deadline, what="input 'observation'",
                                     index=index)
        except Exception:
            if start:  # a failed first step leaves no half-open sequence behind
                self.plane.sessions.close(session.id)
            raise
        if end:
            self.plane.sessions.close(session.id)
        return result.action

    def _taken(self, model: LoadedModel, sequence: int | str, request: str) -> FailedPrecondition:
        """The refusal of a ``request`` ("start" or "step") naming another client's open sequence, counted;
        it names nothing of that client."""
        if self.metrics is not None:
            self.metrics.sequence_conflicts.labels(request).inc()
        return FailedPrecondition(f"sequence_id {sequence!r} of model {model.name!r} is another client's open "
                                  "sequence: sequence ids are shared by all clients, so choose one that no other "
                                  "client uses (a UUID)" + (", or start it once that sequence has ended or expired"
                                                            if request == "start" else ""))

    def _response(self, request, model: LoadedModel, name: str, array: np.ndarray) -> kv.ModelInferResponse:
        array = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
        out = kv.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=list(array.shape))
        return kv.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id,
                                     outputs=[out], raw_output_contents=[array.tobytes()])

    # -- model repository extension --------------------------------------------
    def RepositoryIndex(self, request, context):
        """Loaded models to anyone, one entry per loaded version (the protocol's index is of model
        versions); folders on disk that are not loaded only to the admin token, one entry each."""
        def index(call):
            registry = self.plane.registry
            response = kv.RepositoryIndexResponse()
            on_disk = registry.folders() if self.tokens.is_admin(context.invocation_metadata()) else {}
            for name in sorted(set(registry.models) | set(on_disk)):
                loaded = registry.models.get(name, {})
                if loaded:
                    for version in loaded:
                        response.models.add(name=name, version=str(version), state="READY")
                elif not request.ready:
                    versions = on_disk[name]
                    response.models.add(name=name, version=str(versions[-1]) if versions else "",
                                        state="UNAVAILABLE", reason="unloaded")
            return response

        return self._answer(context, "RepositoryIndex", index)

    def RepositoryModelLoad(self, request, context):
        def load(call):
            self.plane.load(request.model_name)
            return kv.RepositoryModelLoadResponse()

        return self._answer(context, "RepositoryModelLoad", load)

    def RepositoryModelUnload(self, request, context):
        def unload(call):
            self.plane.unload(request.model_name)
            return kv.RepositoryModelUnloadResponse()

        return self._answer(context, "RepositoryModelUnload", unload)

    # -- shared plumbing -------------------------------------------------------
    def _answer(self, context, rpc: str, handler):
        call = Call(f"kserve.{rpc}")
        return guarded(context, call, lambda: handler(call), self.metrics)

    def _model(self, call, name: str, version: str) -> LoadedModel:
        model = self.plane.model(name, parse_version(version))
        call.model = model.name  # only loaded names become metric labels
        return model


def parse_version(text: str) -> int | None:
    """Triton versions are strings: "" is the default, else a positive integer (an int64 on batchrl's
    API). The digits are counted before int() reads them: Python's int() raises ValueError past 4,300
    digits, and a client may send a million."""
    if not text:
        return None
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(MAX_VERSION)):
        raise InvalidArgument(f"version {quoted(text)} is not a positive integer version (1 to {MAX_VERSION})")
    return check_version(int(digits or "0"))


def parameter_value(param: kv.InferParameter, name: str, kinds: tuple[str, ...]):
    """The value of ``param``, which must be one of ``kinds`` (e.g. "int64_param")."""
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidArgument(f"parameter {name!r} has no value")
    if kind not in kinds:
        raise InvalidArgument(f"parameter {name!r} is a {kind}; expected one of {', '.join(kinds)}")
    return getattr(param, kind)


def tensor_specs(model: LoadedModel) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
    """(inputs, outputs) as (name, shape without the batch axis)."""
    if model.is_sequence:
        return ([("observation", model.observation_shape), ("reward", (1,))], [("action", model.action_shape)])
    return [("observations", model.observation_shape)], [("actions", model.action_shape)]


def decode_inputs(request: kv.ModelInferRequest, model: LoadedModel) -> dict[str, np.ndarray]:
    """Inputs as float32 arrays (views of the request's bytes), from raw_input_contents or typed contents.
    An input ``model`` takes must have its rank, checked on the wire's shape before numpy sees it."""
    shapes = {name: [-1, *shape] for name, shape in tensor_specs(model)[0]}  # as ModelMetadata shows them
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input, "
                              "or none and typed contents")
    arrays: dict[str, np.ndarray] = {}
    for i, item in enumerate(request.inputs):
        what = f"input {item.name!r}"
        if item.datatype != "FP32":
            raise InvalidArgument(f"{what} has datatype {item.datatype!r}; batchrl models take FP32")
        if item.name in arrays:
            raise InvalidArgument(f"{what} is given twice")
        wanted = shapes.get(item.name)
        if wanted is not None and len(item.shape) != len(wanted):
            raise InvalidArgument(f"{what} must have rank {len(wanted)}, got rank {len(item.shape)}: model "
                                  f"{model.name!r} takes {item.name!r} FP32 {wanted}")
        shape = tuple(int(d) for d in item.shape)
        if raw:
            data = raw[i]
        elif item.HasField("contents"):
            data = np.asarray(item.contents.fp32_contents, dtype=WIRE_DTYPE).tobytes()
        else:
            raise InvalidArgument(f"{what} has no data: send raw_input_contents or contents.fp32_contents")
        arrays[item.name] = from_bytes(data, shape, what)
    return arrays


def _unimplemented(method: str):
    def answer(self: KServeService, request, context):
        def refuse(call):
            raise Unimplemented(f"{method} is not offered by this server (batchrl serve implements "
                                f"{', '.join(sorted(IMPLEMENTED))})")

        return self._answer(context, method, refuse)

    answer.__name__ = method
    return answer


# The generated servicer's own default for a method it does not override raises NotImplementedError,
# which grpcio logs with a traceback per call: every method of the protocol this server does not
# offer answers UNIMPLEMENTED through the guard instead (counted, never logged). Read from the
# service descriptor, so a tritonclient that adds methods is covered too.
IMPLEMENTED = frozenset(name for name in kv.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
                        if name in KServeService.__dict__)
for _method in kv.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _method not in IMPLEMENTED:
        setattr(KServeService, _method, _unimplemented(_method))
