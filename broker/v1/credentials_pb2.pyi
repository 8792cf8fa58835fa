from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ResolveCredentialsRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: str
    def __init__(self, image: _Optional[str] = ...) -> None: ...

class ResolveCredentialsResponse(_message.Message):
    __slots__ = ("image", "registry", "image_host", "anonymous", "username", "secret", "server_address", "registry_auth", "plain_http")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOST_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    SERVER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTH_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    image: str
    registry: str
    image_host: str
    anonymous: bool
    username: str
    secret: str
    server_address: str
    registry_auth: str
    plain_http: bool
    def __init__(self, image: _Optional[str] = ..., registry: _Optional[str] = ..., image_host: _Optional[str] = ..., anonymous: _Optional[bool] = ..., username: _Optional[str] = ..., secret: _Optional[str] = ..., server_address: _Optional[str] = ..., registry_auth: _Optional[str] = ..., plain_http: _Optional[bool] = ...) -> None: ...
