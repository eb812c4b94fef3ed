# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_KIND_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_KIND_PACKED_BITS: _ClassVar[PayloadKind]
    PAYLOAD_KIND_FLOAT16: _ClassVar[PayloadKind]

class PolicyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_KIND_UNSPECIFIED: _ClassVar[PolicyKind]
    POLICY_KIND_PERCENT: _ClassVar[PolicyKind]
    POLICY_KIND_COUNT: _ClassVar[PolicyKind]
    POLICY_KIND_THRESHOLD: _ClassVar[PolicyKind]
    POLICY_KIND_NONE: _ClassVar[PolicyKind]
    POLICY_KIND_ALL: _ClassVar[PolicyKind]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_FINE: _ClassVar[Stage]
    STAGE_COARSE: _ClassVar[Stage]
    STAGE_COARSE_FINE_MISSING: _ClassVar[Stage]
PAYLOAD_KIND_UNSPECIFIED: PayloadKind
PAYLOAD_KIND_PACKED_BITS: PayloadKind
PAYLOAD_KIND_FLOAT16: PayloadKind
POLICY_KIND_UNSPECIFIED: PolicyKind
POLICY_KIND_PERCENT: PolicyKind
POLICY_KIND_COUNT: PolicyKind
POLICY_KIND_THRESHOLD: PolicyKind
POLICY_KIND_NONE: PolicyKind
POLICY_KIND_ALL: PolicyKind
STAGE_UNSPECIFIED: Stage
STAGE_FINE: Stage
STAGE_COARSE: Stage
STAGE_COARSE_FINE_MISSING: Stage

class IndexedQuery(_message.Message):
    __slots__ = ("collection", "video_id", "self_sim", "coarse")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_SIM_FIELD_NUMBER: _ClassVar[int]
    COARSE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    video_id: str
    self_sim: float
    coarse: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, collection: _Optional[str] = ..., video_id: _Optional[str] = ..., self_sim: _Optional[float] = ..., coarse: _Optional[_Iterable[float]] = ...) -> None: ...

class InlineQuery(_message.Message):
    __slots__ = ("coarse", "self_sim", "fine", "payload_kind", "fine_shape")
    COARSE_FIELD_NUMBER: _ClassVar[int]
    SELF_SIM_FIELD_NUMBER: _ClassVar[int]
    FINE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    FINE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    coarse: _containers.RepeatedScalarFieldContainer[float]
    self_sim: float
    fine: bytes
    payload_kind: PayloadKind
    fine_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, coarse: _Optional[_Iterable[float]] = ..., self_sim: _Optional[float] = ..., fine: _Optional[bytes] = ..., payload_kind: _Optional[_Union[PayloadKind, str]] = ..., fine_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("video_id", "coarse_score", "self_sim", "fine_key", "n_frames", "payload_kind", "segments")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    COARSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SELF_SIM_FIELD_NUMBER: _ClassVar[int]
    FINE_KEY_FIELD_NUMBER: _ClassVar[int]
    N_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    coarse_score: float
    self_sim: float
    fine_key: str
    n_frames: int
    payload_kind: PayloadKind
    segments: bytes
    def __init__(self, video_id: _Optional[str] = ..., coarse_score: _Optional[float] = ..., self_sim: _Optional[float] = ..., fine_key: _Optional[str] = ..., n_frames: _Optional[int] = ..., payload_kind: _Optional[_Union[PayloadKind, str]] = ..., segments: _Optional[bytes] = ...) -> None: ...

class SelectionPolicy(_message.Message):
    __slots__ = ("kind", "value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: PolicyKind
    value: float
    def __init__(self, kind: _Optional[_Union[PolicyKind, str]] = ..., value: _Optional[float] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("indexed", "inline", "candidates", "policy", "top_k", "model_set", "model_tag", "request_id")
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_SET_FIELD_NUMBER: _ClassVar[int]
    MODEL_TAG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    indexed: IndexedQuery
    inline: InlineQuery
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    policy: SelectionPolicy
    top_k: int
    model_set: str
    model_tag: str
    request_id: str
    def __init__(self, indexed: _Optional[_Union[IndexedQuery, _Mapping]] = ..., inline: _Optional[_Union[InlineQuery, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., policy: _Optional[_Union[SelectionPolicy, _Mapping]] = ..., top_k: _Optional[int] = ..., model_set: _Optional[str] = ..., model_tag: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RankedCandidate(_message.Message):
    __slots__ = ("video_id", "score", "coarse_score", "selector_confidence", "fine_score", "stage")
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COARSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    FINE_SCORE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    video_id: str
    score: float
    coarse_score: float
    selector_confidence: float
    fine_score: float
    stage: Stage
    def __init__(self, video_id: _Optional[str] = ..., score: _Optional[float] = ..., coarse_score: _Optional[float] = ..., selector_confidence: _Optional[float] = ..., fine_score: _Optional[float] = ..., stage: _Optional[_Union[Stage, str]] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("hits", "timings_ms", "warnings", "n_candidates", "n_reranked", "model_set", "model_tag")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HITS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    N_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    N_RERANKED_FIELD_NUMBER: _ClassVar[int]
    MODEL_SET_FIELD_NUMBER: _ClassVar[int]
    MODEL_TAG_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    timings_ms: _containers.ScalarMap[str, float]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    n_candidates: int
    n_reranked: int
    model_set: str
    model_tag: str
    def __init__(self, hits: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., warnings: _Optional[_Iterable[str]] = ..., n_candidates: _Optional[int] = ..., n_reranked: _Optional[int] = ..., model_set: _Optional[str] = ..., model_tag: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_set", "model_tag", "payload_kind", "coarse_dim", "device", "max_candidates", "max_message_bytes", "server_version", "selector_segments")
    MODEL_SET_FIELD_NUMBER: _ClassVar[int]
    MODEL_TAG_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    COARSE_DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    model_set: str
    model_tag: str
    payload_kind: PayloadKind
    coarse_dim: int
    device: str
    max_candidates: int
    max_message_bytes: int
    server_version: str
    selector_segments: int
    def __init__(self, model_set: _Optional[str] = ..., model_tag: _Optional[str] = ..., payload_kind: _Optional[_Union[PayloadKind, str]] = ..., coarse_dim: _Optional[int] = ..., device: _Optional[str] = ..., max_candidates: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., server_version: _Optional[str] = ..., selector_segments: _Optional[int] = ...) -> None: ...
