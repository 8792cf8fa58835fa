from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_BACKEND_UNSPECIFIED: _ClassVar[PullBackend]
    PULL_BACKEND_DOCKER: _ClassVar[PullBackend]
    PULL_BACKEND_SWARM: _ClassVar[PullBackend]

class NodePullState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_PULL_STATE_UNSPECIFIED: _ClassVar[NodePullState]
    NODE_PULL_STATE_PULLED: _ClassVar[NodePullState]
    NODE_PULL_STATE_ALREADY_PRESENT: _ClassVar[NodePullState]
    NODE_PULL_STATE_FAILED: _ClassVar[NodePullState]
PULL_BACKEND_UNSPECIFIED: PullBackend
PULL_BACKEND_DOCKER: PullBackend
PULL_BACKEND_SWARM: PullBackend
NODE_PULL_STATE_UNSPECIFIED: NodePullState
NODE_PULL_STATE_PULLED: NodePullState
NODE_PULL_STATE_ALREADY_PRESENT: NodePullState
NODE_PULL_STATE_FAILED: NodePullState

class PullImageRequest(_message.Message):
    __slots__ = ("image", "backend", "platform", "placement_constraints", "include_registry_auth")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REGISTRY_AUTH_FIELD_NUMBER: _ClassVar[int]
    image: str
    backend: PullBackend
    platform: str
    placement_constraints: _containers.RepeatedScalarFieldContainer[str]
    include_registry_auth: bool
    def __init__(self, image: _Optional[str] = ..., backend: _Optional[_Union[PullBackend, str]] = ..., platform: _Optional[str] = ..., placement_constraints: _Optional[_Iterable[str]] = ..., include_registry_auth: _Optional[bool] = ...) -> None: ...

class PullImageResponse(_message.Message):
    __slots__ = ("progress", "result", "node")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    progress: LayerProgress
    result: PullResult
    node: NodePull
    def __init__(self, progress: _Optional[_Union[LayerProgress, _Mapping]] = ..., result: _Optional[_Union[PullResult, _Mapping]] = ..., node: _Optional[_Union[NodePull, _Mapping]] = ...) -> None: ...

class NodePull(_message.Message):
    __slots__ = ("node_id", "hostname", "state", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    state: NodePullState
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., state: _Optional[_Union[NodePullState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("image", "digest", "image_host", "pinned_image", "backend", "nodes", "registry_auth")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOST_FIELD_NUMBER: _ClassVar[int]
    PINNED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTH_FIELD_NUMBER: _ClassVar[int]
    image: str
    digest: str
    image_host: str
    pinned_image: str
    backend: PullBackend
    nodes: _containers.RepeatedCompositeFieldContainer[NodePull]
    registry_auth: str
    def __init__(self, image: _Optional[str] = ..., digest: _Optional[str] = ..., image_host: _Optional[str] = ..., pinned_image: _Optional[str] = ..., backend: _Optional[_Union[PullBackend, str]] = ..., nodes: _Optional[_Iterable[_Union[NodePull, _Mapping]]] = ..., registry_auth: _Optional[str] = ...) -> None: ...
