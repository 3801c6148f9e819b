from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Space(_message.Message):
    __slots__ = ("shape", "low", "high")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    low: _containers.RepeatedScalarFieldContainer[float]
    high: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., low: _Optional[_Iterable[float]] = ..., high: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("algorithm", "observation_space", "action_space", "dataset_id", "env_id", "normalized_score", "mean_return", "ref_min_score", "ref_max_score", "training_steps", "created_at", "batchrl_version", "code_version", "context_length", "return_scale", "max_timestep", "default_target_return", "promotion", "planned_steps")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SPACE_FIELD_NUMBER: _ClassVar[int]
    ACTION_SPACE_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    REF_MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REF_MAX_SCORE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BATCHRL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TARGET_RETURN_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FIELD_NUMBER: _ClassVar[int]
    PLANNED_STEPS_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    observation_space: Space
    action_space: Space
    dataset_id: str
    env_id: str
    normalized_score: float
    mean_return: float
    ref_min_score: float
    ref_max_score: float
    training_steps: int
    created_at: str
    batchrl_version: str
    code_version: str
    context_length: int
    return_scale: float
    max_timestep: int
    default_target_return: float
    promotion: str
    planned_steps: int
    def __init__(self, algorithm: _Optional[str] = ..., observation_space: _Optional[_Union[Space, _Mapping]] = ..., action_space: _Optional[_Union[Space, _Mapping]] = ..., dataset_id: _Optional[str] = ..., env_id: _Optional[str] = ..., normalized_score: _Optional[float] = ..., mean_return: _Optional[float] = ..., ref_min_score: _Optional[float] = ..., ref_max_score: _Optional[float] = ..., training_steps: _Optional[int] = ..., created_at: _Optional[str] = ..., batchrl_version: _Optional[str] = ..., code_version: _Optional[str] = ..., context_length: _Optional[int] = ..., return_scale: _Optional[float] = ..., max_timestep: _Optional[int] = ..., default_target_return: _Optional[float] = ..., promotion: _Optional[str] = ..., planned_steps: _Optional[int] = ...) -> None: ...
