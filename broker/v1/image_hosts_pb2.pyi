import datetime

from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TestImageHostResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEST_IMAGE_HOST_RESULT_UNSPECIFIED: _ClassVar[TestImageHostResult]
    TEST_IMAGE_HOST_RESULT_OK: _ClassVar[TestImageHostResult]
    TEST_IMAGE_HOST_RESULT_UNAUTHORIZED: _ClassVar[TestImageHostResult]
    TEST_IMAGE_HOST_RESULT_UNREACHABLE: _ClassVar[TestImageHostResult]
    TEST_IMAGE_HOST_RESULT_TLS_ERROR: _ClassVar[TestImageHostResult]
    TEST_IMAGE_HOST_RESULT_NOT_A_REGISTRY: _ClassVar[TestImageHostResult]
TEST_IMAGE_HOST_RESULT_UNSPECIFIED: TestImageHostResult
TEST_IMAGE_HOST_RESULT_OK: TestImageHostResult
TEST_IMAGE_HOST_RESULT_UNAUTHORIZED: TestImageHostResult
TEST_IMAGE_HOST_RESULT_UNREACHABLE: TestImageHostResult
TEST_IMAGE_HOST_RESULT_TLS_ERROR: TestImageHostResult
TEST_IMAGE_HOST_RESULT_NOT_A_REGISTRY: TestImageHostResult

class ImageHost(_message.Message):
    __slots__ = ("name", "display_name", "url", "registry", "repository_prefix", "plain_http", "username", "access_token", "access_token_set", "default", "create_time", "update_time", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_SET_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    url: str
    registry: str
    repository_prefix: str
    plain_http: bool
    username: str
    access_token: str
    access_token_set: bool
    default: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., url: _Optional[str] = ..., registry: _Optional[str] = ..., repository_prefix: _Optional[str] = ..., plain_http: _Optional[bool] = ..., username: _Optional[str] = ..., access_token: _Optional[str] = ..., access_token_set: _Optional[bool] = ..., default: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class CreateImageHostRequest(_message.Message):
    __slots__ = ("image_host", "image_host_id")
    IMAGE_HOST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    image_host: ImageHost
    image_host_id: str
    def __init__(self, image_host: _Optional[_Union[ImageHost, _Mapping]] = ..., image_host_id: _Optional[str] = ...) -> None: ...

class GetImageHostRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListImageHostsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListImageHostsResponse(_message.Message):
    __slots__ = ("image_hosts", "next_page_token")
    IMAGE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    image_hosts: _containers.RepeatedCompositeFieldContainer[ImageHost]
    next_page_token: str
    def __init__(self, image_hosts: _Optional[_Iterable[_Union[ImageHost, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateImageHostRequest(_message.Message):
    __slots__ = ("image_host", "update_mask")
    IMAGE_HOST_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    image_host: ImageHost
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, image_host: _Optional[_Union[ImageHost, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteImageHostRequest(_message.Message):
    __slots__ = ("name", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class SetDefaultImageHostRequest(_message.Message):
    __slots__ = ("name", "reason", "etag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    etag: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class GetDefaultImageHostRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TestImageHostRequest(_message.Message):
    __slots__ = ("name", "candidate_username", "candidate_access_token", "use_candidate_credentials")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_USERNAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USE_CANDIDATE_CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    candidate_username: str
    candidate_access_token: str
    use_candidate_credentials: bool
    def __init__(self, name: _Optional[str] = ..., candidate_username: _Optional[str] = ..., candidate_access_token: _Optional[str] = ..., use_candidate_credentials: _Optional[bool] = ...) -> None: ...

class TestImageHostResponse(_message.Message):
    __slots__ = ("result", "message", "auth_scheme", "endpoint", "latency")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTH_SCHEME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    result: TestImageHostResult
    message: str
    auth_scheme: str
    endpoint: str
    latency: _duration_pb2.Duration
    def __init__(self, result: _Optional[_Union[TestImageHostResult, str]] = ..., message: _Optional[str] = ..., auth_scheme: _Optional[str] = ..., endpoint: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
