import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_KIND_UNSPECIFIED: _ClassVar[AdapterKind]
    ADAPTER_KIND_LORA: _ClassVar[AdapterKind]
    ADAPTER_KIND_IA3: _ClassVar[AdapterKind]
    ADAPTER_KIND_PROMPT: _ClassVar[AdapterKind]
    ADAPTER_KIND_PREFIX: _ClassVar[AdapterKind]
    ADAPTER_KIND_DORA: _ClassVar[AdapterKind]
    ADAPTER_KIND_BOTTLENECK: _ClassVar[AdapterKind]
    ADAPTER_KIND_TEMPLATE: _ClassVar[AdapterKind]

class CacheTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_TIER_UNSPECIFIED: _ClassVar[CacheTier]
    CACHE_TIER_DISK: _ClassVar[CacheTier]
    CACHE_TIER_HOST: _ClassVar[CacheTier]
    CACHE_TIER_DEVICE: _ClassVar[CacheTier]
ADAPTER_KIND_UNSPECIFIED: AdapterKind
ADAPTER_KIND_LORA: AdapterKind
ADAPTER_KIND_IA3: AdapterKind
ADAPTER_KIND_PROMPT: AdapterKind
ADAPTER_KIND_PREFIX: AdapterKind
ADAPTER_KIND_DORA: AdapterKind
ADAPTER_KIND_BOTTLENECK: AdapterKind
ADAPTER_KIND_TEMPLATE: AdapterKind
CACHE_TIER_UNSPECIFIED: CacheTier
CACHE_TIER_DISK: CacheTier
CACHE_TIER_HOST: CacheTier
CACHE_TIER_DEVICE: CacheTier

class AdapterFile(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "kind", "peft_type", "rank", "num_virtual_tokens", "target_modules", "num_parameters", "weight_bytes", "size_bytes", "files", "digest", "base_fingerprint", "created_at", "description", "pinned", "version", "cache_tier", "origin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PEFT_TYPE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_TIER_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: AdapterKind
    peft_type: str
    rank: int
    num_virtual_tokens: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    num_parameters: int
    weight_bytes: int
    size_bytes: int
    files: _containers.RepeatedCompositeFieldContainer[AdapterFile]
    digest: str
    base_fingerprint: str
    created_at: _timestamp_pb2.Timestamp
    description: str
    pinned: bool
    version: int
    cache_tier: CacheTier
    origin: AdapterOrigin
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[AdapterKind, str]] = ..., peft_type: _Optional[str] = ..., rank: _Optional[int] = ..., num_virtual_tokens: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., num_parameters: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., size_bytes: _Optional[int] = ..., files: _Optional[_Iterable[_Union[AdapterFile, _Mapping]]] = ..., digest: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., description: _Optional[str] = ..., pinned: _Optional[bool] = ..., version: _Optional[int] = ..., cache_tier: _Optional[_Union[CacheTier, str]] = ..., origin: _Optional[_Union[AdapterOrigin, _Mapping]] = ...) -> None: ...

class AdapterOrigin(_message.Message):
    __slots__ = ("source", "etag", "revision", "fetched_at")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FETCHED_AT_FIELD_NUMBER: _ClassVar[int]
    source: str
    etag: str
    revision: str
    fetched_at: _timestamp_pb2.Timestamp
    def __init__(self, source: _Optional[str] = ..., etag: _Optional[str] = ..., revision: _Optional[str] = ..., fetched_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
