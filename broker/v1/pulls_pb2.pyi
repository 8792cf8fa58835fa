from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_BACKEND_UNSPECIFIED: _ClassVar[PullBackend]
    PULL_BACKEND_DOCKER: _ClassVar[PullBackend]
    PULL_BACKEND_SWARM: _ClassVar[PullBackend]
PULL_BACKEND_UNSPECIFIED: PullBackend
PULL_BACKEND_DOCKER: PullBackend
PULL_BACKEND_SWARM: PullBackend

class PullImageRequest(_message.Message):
    __slots__ = ("image", "backend", "platform")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    image: str
    backend: PullBackend
    platform: str
    def __init__(self, image: _Optional[str] = ..., backend: _Optional[_Union[PullBackend, str]] = ..., platform: _Optional[str] = ...) -> None: ...

class PullImageResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: LayerProgress
    result: PullResult
    def __init__(self, progress: _Optional[_Union[LayerProgress, _Mapping]] = ..., result: _Optional[_Union[PullResult, _Mapping]] = ...) -> None: ...

class LayerProgress(_message.Message):
    __slots__ = ("layer", "status", "current_bytes", "total_bytes")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    layer: str
    status: str
    current_bytes: int
    total_bytes: int
    def __init__(self, layer: _Optional[str] = ..., status: _Optional[str] = ..., current_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PullResult(_message.Message):
    __slots__ = ("image", "digest", "image_host", "pinned_image")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOST_FIELD_NUMBER: _ClassVar[int]
    PINNED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    digest: str
    image_host: str
    pinned_image: str
    def __init__(self, image: _Optional[str] = ..., digest: _Optional[str] = ..., image_host: _Optional[str] = ..., pinned_image: _Optional[str] = ...) -> None: ...
