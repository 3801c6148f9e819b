"""The Open Inference Protocol (KServe v2 / Triton `inference.GRPCInferenceService`) beside batchrl's API.

Existing Triton and KServe clients (tritonclient.grpc, KServe's InferenceGRPCClient)
work unchanged, on the same port. The protocol modules are tritonclient's own
generated ones (`grpc_service.proto` and `model_config.proto`, package
`inference`), so a process that also uses tritonclient registers every symbol
once. This layer only translates: the repository, the batcher, the session
store, the metrics and the errors are the PolicyService's.

Feed-forward policies: input `observations` FP32 [-1, obs_dim] -> output
`actions` FP32 [-1, act_dim]. Decision Transformers through the sequence
extension: request parameters `sequence_id` (integer or string),
`sequence_start`, `sequence_end` and optionally `target_return` map onto a
batchrl session; inputs `observation` [1, obs_dim] and `reward` [1, 1] (the
reward earned by the previous action: none, or 0, on the start request) ->
output `action` [1, act_dim]. Responses always carry raw_output_contents.
"""
from __future__ import annotations

import math

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kv
from tritonclient.grpc import service_pb2_grpc as kv_grpc

from batchrl.protos.batchrl.v1 import policy_pb2
from batchrl.protos.contract import version_dirs
from batchrl.serving.auth import Tokens
from batchrl.serving.calls import Call, RequestError, deadline_of, quoted
from batchrl.serving.runtime import LoadedModel
from batchrl.serving.tensors import WIRE_DTYPE

MAX_SEQUENCE_ID = 128  # characters of a string sequence_id
EXTENSIONS = ["model_configuration", "model_repository", "sequence", "parameters"]
PLATFORM = "onnxruntime_onnx"


class KServeService(kv_grpc.GRPCInferenceServiceServicer):
    def __init__(self, policy, admin, tokens: Tokens, name: str = "batchrl", version: str = ""):
        self.policy = policy  # serving.server.PolicyService: registry, sessions, metrics, errors
        self.admin = admin    # serving.server.ModelService: load and unload
        self.tokens = tokens  # RepositoryIndex shows unloaded folders to the admin only
        self.name, self.version = name, version

    # -- health and metadata -------------------------------------------------
    def ServerLive(self, request, context):
        return kv.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return kv.ServerReadyResponse(ready=not self.policy.draining)

    def ModelReady(self, request, context):
        try:
            self.policy.registry.get(request.name, parse_version(request.version))
        except (LookupError, ValueError):
            return kv.ModelReadyResponse(ready=False)
        return kv.ModelReadyResponse(ready=not self.policy.draining)

    def ServerMetadata(self, request, context):
        return kv.ServerMetadataResponse(name=self.name, version=self.version, extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        return self._answer(context, "ModelMetadata", lambda call: self._metadata(call, request))

    def ModelConfig(self, request, context):
        return self._answer(context, "ModelConfig", lambda call: self._config(call, request))

    def _metadata(self, call, request) -> kv.ModelMetadataResponse:
        model = self._model(call, request.name, request.version)
        versions = [str(v) for v in self.policy.registry.models.get(model.name, {})]
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
            config.sequence_batching.max_sequence_idle_microseconds = int(
                self.policy.sessions.idle_timeout * 1e6)
        else:
            config.max_batch_size = model.limits.max_rows
            config.dynamic_batching.max_queue_delay_microseconds = int(model.limits.max_delay * 1e6)
        return kv.ModelConfigResponse(config=config)

    # -- inference -------------------------------------------------------------
    def ModelInfer(self, request: kv.ModelInferRequest, context) -> kv.ModelInferResponse:
        deadline = deadline_of(context)
        return self._answer(context, "ModelInfer", lambda call: self._infer(call, request, deadline))

    def _infer(self, call, request: kv.ModelInferRequest, deadline) -> kv.ModelInferResponse:
        model = self._model(call, request.model_name, request.model_version)
        inputs = decode_inputs(request)
        _, outputs = tensor_specs(model)
        for wanted in request.outputs:
            if wanted.name != outputs[0][0]:
                raise bad(f"model {model.name!r} has no output {wanted.name!r}; its output is {outputs[0][0]!r}")
        if model.is_sequence:
            action = self._sequence_step(call, model, request, inputs, deadline)
            batched = policy_pb2.Tensor(shape=[1, *model.action_shape], data=action.data)
            return self._response(request, model, outputs[0][0], batched)
        if set(inputs) != {"observations"}:
            raise bad(f"model {model.name!r} takes one input, 'observations' FP32 [-1, "
                      f"{', '.join(map(str, model.observation_shape))}]; got {sorted(inputs)}")
        act = policy_pb2.ActRequest(model=model.name, version=model.version, observations=inputs["observations"])
        answer = self.policy._act(call, act, deadline)
        return self._response(request, model, "actions", answer.actions)

    def _sequence_step(self, call, model: LoadedModel, request, inputs, deadline) -> policy_pb2.Tensor:
        params = request.parameters
        if "sequence_id" not in params:
            raise bad(f"model {model.name!r} is a sequence policy: set the sequence_id parameter (and "
                      "sequence_start on an episode's first request)")
        sequence = parameter_value(params["sequence_id"], "sequence_id", ("int64_param", "uint64_param",
                                                                           "string_param"))
        if sequence in ("", 0):
            raise bad("sequence_id must be a non-zero integer or a non-empty string")
        if isinstance(sequence, str) and len(sequence) > MAX_SEQUENCE_ID:
            raise bad(f"sequence_id {quoted(sequence)} is longer than {MAX_SEQUENCE_ID} characters")
        start = bool(params["sequence_start"].bool_param) if "sequence_start" in params else False
        end = bool(params["sequence_end"].bool_param) if "sequence_end" in params else False
        unknown = set(inputs) - {"observation", "reward"}
        if "observation" not in inputs or unknown:
            raise bad(f"model {model.name!r} takes inputs 'observation' FP32 [1, "
                      f"{', '.join(map(str, model.observation_shape))}] and 'reward' FP32 [1, 1]; got "
                      f"{sorted(inputs)}")
        observation = inputs["observation"]
        if tuple(observation.shape) != (1, *model.observation_shape):
            raise bad(f"input 'observation' has shape {list(observation.shape)}: one step per request, "
                      f"[1, {', '.join(map(str, model.observation_shape))}]")
        reward = None
        if "reward" in inputs:
            values = tensor_values(inputs["reward"])
            if values.size != 1:
                raise bad(f"input 'reward' has shape {list(values.shape)}; expected [1, 1]")
            reward = float(values.reshape(-1)[0])
        key = (model.name, str(sequence))  # forgotten with its session: closed, ended or expired
        session_id = self.policy.sessions.find(key)
        if start:
            if reward not in (None, 0.0):
                raise bad("the start request of a sequence has no previous action: omit 'reward' or send 0")
            reward = None
            opening = policy_pb2.OpenSessionRequest(model=model.name, version=model.version)
            if "target_return" in params:
                opening.target_return = parameter_value(params["target_return"], "target_return",
                                                        ("double_param", "int64_param", "uint64_param"))
            session, _ = self.policy._open(call, opening, key=key)  # replaces the key's earlier session
            session_id = session.id
        elif session_id is None:
            raise bad(f"sequence {sequence!r} of model {model.name!r} is not open: set sequence_start on its "
                      "first request")
        try:
            step = policy_pb2.StepRequest(observation=policy_pb2.Tensor(
                shape=list(model.observation_shape), data=observation.data))
            if reward is not None:
                step.reward = reward
            answer = self.policy._step(self.policy._session(call, session_id), step, deadline)
        except Exception:
            if start:  # a failed first step leaves no half-open sequence behind
                self.policy.sessions.close(session_id)
            raise
        if end:
            self.policy.sessions.close(session_id)
        return answer.action

    def _response(self, request, model: LoadedModel, name: str, tensor: policy_pb2.Tensor) -> kv.ModelInferResponse:
        out = kv.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=list(tensor.shape))
        return kv.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id,
                                     outputs=[out], raw_output_contents=[tensor.data])

    # -- model repository extension (admin token) ------------------------------
    def RepositoryIndex(self, request, context):
        """Loaded models to anyone; folders on disk that are not loaded only to the admin token."""
        def index(call):
            registry = self.policy.registry
            response = kv.RepositoryIndexResponse()
            if self.tokens.is_admin(context.invocation_metadata()):
                names = sorted(p.name for p in registry.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            else:
                names = sorted(registry.models)
            for name in names:
                loaded = registry.models.get(name, {})
                if loaded:
                    for version in loaded:
                        response.models.add(name=name, version=str(version), state="READY")
                elif not request.ready:
                    versions = list(version_dirs(registry.root / name))
                    response.models.add(name=name, version=str(versions[-1]) if versions else "",
                                        state="UNAVAILABLE", reason="unloaded")
            return response

        return self._answer(context, "RepositoryIndex", index)

    def RepositoryModelLoad(self, request, context):
        def load(call):
            self.admin.load(context, request.model_name, None)
            return kv.RepositoryModelLoadResponse()

        return self._answer(context, "RepositoryModelLoad", load)

    def RepositoryModelUnload(self, request, context):
        def unload(call):
            self.admin.unload(context, request.model_name)
            return kv.RepositoryModelUnloadResponse()

        return self._answer(context, "RepositoryModelUnload", unload)

    # -- shared plumbing -------------------------------------------------------
    def _answer(self, context, rpc: str, handler):
        call = Call(f"kserve.{rpc}")
        return self.policy._guard(context, call, lambda: handler(call))

    def _model(self, call, name: str, version: str) -> LoadedModel:
        try:
            number = parse_version(version)
        except ValueError as exc:
            raise bad(str(exc)) from None
        return self.policy._model(call, name, number)


def bad(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def tensor_values(tensor: policy_pb2.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=WIRE_DTYPE).reshape(tuple(tensor.shape))


def parse_version(text: str) -> int | None:
    """Triton versions are strings: "" is the default, else a positive integer."""
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"model_version {text!r} is not a positive integer version")
    return int(text)


def parameter_value(param: kv.InferParameter, name: str, kinds: tuple[str, ...]):
    """The value of ``param``, which must be one of ``kinds`` (e.g. "int64_param")."""
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise bad(f"parameter {name!r} has no value")
    if kind not in kinds:
        raise bad(f"parameter {name!r} is a {kind}; expected one of {', '.join(kinds)}")
    return getattr(param, kind)


def tensor_specs(model: LoadedModel) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
    """(inputs, outputs) as (name, shape without the batch axis)."""
    if model.is_sequence:
        return ([("observation", model.observation_shape), ("reward", (1,))], [("action", model.action_shape)])
    return [("observations", model.observation_shape)], [("actions", model.action_shape)]


def decode_inputs(request: kv.ModelInferRequest) -> dict[str, policy_pb2.Tensor]:
    """Inputs as batchrl wire tensors (shape + float32 bytes), from raw_input_contents or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input, or none "
                  "and typed contents")
    tensors: dict[str, policy_pb2.Tensor] = {}
    for i, item in enumerate(request.inputs):
        if item.datatype != "FP32":
            raise bad(f"input {item.name!r} has datatype {item.datatype!r}; batchrl models take FP32")
        if item.name in tensors:
            raise bad(f"input {item.name!r} is given twice")
        shape = [int(d) for d in item.shape]
        if any(d < 0 for d in shape):
            raise bad(f"input {item.name!r} has a negative dimension in shape {shape}")
        count = math.prod(shape)  # exact: a product past int64 must not wrap around
        if raw:
            data = raw[i]
        elif item.HasField("contents"):
            values = item.contents.fp32_contents
            if len(values) != count:
                raise bad(f"input {item.name!r}: {len(values)} fp32_contents for shape {shape} "
                          f"(expected {count})")
            data = np.asarray(values, dtype=WIRE_DTYPE).tobytes()
        else:
            raise bad(f"input {item.name!r} has no data: send raw_input_contents or contents.fp32_contents")
        if len(data) != 4 * count:
            raise bad(f"input {item.name!r}: {len(data)} bytes for shape {shape} (expected {4 * count}: FP32, "
                      "4 bytes per element)")
        tensors[item.name] = policy_pb2.Tensor(shape=shape, data=data)
    return tensors
