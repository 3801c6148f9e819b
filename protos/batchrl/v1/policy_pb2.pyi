from batchrl.protos.batchrl.v1 import manifest_pb2 as _manifest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Ending(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDING_UNSPECIFIED: _ClassVar[Ending]
    TERMINATED: _ClassVar[Ending]
    TRUNCATED: _ClassVar[Ending]
ENDING_UNSPECIFIED: Ending
TERMINATED: Ending
TRUNCATED: Ending

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("noise_std", "seed")
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    noise_std: float
    seed: int
    def __init__(self, noise_std: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("model", "version", "observations", "sampling")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    observations: Tensor
    sampling: Sampling
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., observations: _Optional[_Union[Tensor, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("model", "version", "actions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    actions: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., actions: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "manifest", "providers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest: _manifest_pb2.ModelManifest
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., manifest: _Optional[_Union[_manifest_pb2.ModelManifest, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "default_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_version: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, name: _Optional[str] = ..., default_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model", "version", "target_return")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_RETURN_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    target_return: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., target_return: _Optional[float] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "model", "version", "context_length", "target_return")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_RETURN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    context_length: int
    target_return: float
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., context_length: _Optional[int] = ..., target_return: _Optional[float] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "observation", "reward", "index", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    observation: Tensor
    reward: float
    index: int
    sampling: Sampling
    def __init__(self, session_id: _Optional[str] = ..., observation: _Optional[_Union[Tensor, _Mapping]] = ..., reward: _Optional[float] = ..., index: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("action", "timestep", "return_to_go", "version")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    RETURN_TO_GO_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    action: Tensor
    timestep: int
    return_to_go: float
    version: int
    def __init__(self, action: _Optional[_Union[Tensor, _Mapping]] = ..., timestep: _Optional[int] = ..., return_to_go: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "final_observation", "reward", "ending")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    final_observation: Tensor
    reward: float
    ending: Ending
    def __init__(self, session_id: _Optional[str] = ..., final_observation: _Optional[_Union[Tensor, _Mapping]] = ..., reward: _Optional[float] = ..., ending: _Optional[_Union[Ending, str]] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: _Optional[int] = ...) -> None: ...

class EpisodeRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSessionRequest
    step: StepRequest
    close: CloseSessionRequest
    def __init__(self, open: _Optional[_Union[OpenSessionRequest, _Mapping]] = ..., step: _Optional[_Union[StepRequest, _Mapping]] = ..., close: _Optional[_Union[CloseSessionRequest, _Mapping]] = ...) -> None: ...

class EpisodeResponse(_message.Message):
    __slots__ = ("opened", "step", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: OpenSessionResponse
    step: StepResponse
    closed: CloseSessionResponse
    def __init__(self, opened: _Optional[_Union[OpenSessionResponse, _Mapping]] = ..., step: _Optional[_Union[StepResponse, _Mapping]] = ..., closed: _Optional[_Union[CloseSessionResponse, _Mapping]] = ...) -> None: ...
