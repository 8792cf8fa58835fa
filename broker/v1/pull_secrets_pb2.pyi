from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecretChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECRET_CHANGE_UNSPECIFIED: _ClassVar[SecretChange]
    SECRET_CHANGE_CREATED: _ClassVar[SecretChange]
    SECRET_CHANGE_UPDATED: _ClassVar[SecretChange]
    SECRET_CHANGE_UNCHANGED: _ClassVar[SecretChange]
    SECRET_CHANGE_DELETED: _ClassVar[SecretChange]
    SECRET_CHANGE_ABSENT: _ClassVar[SecretChange]

class ServiceAccountChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_ACCOUNT_CHANGE_UNSPECIFIED: _ClassVar[ServiceAccountChange]
    SERVICE_ACCOUNT_CHANGE_PATCHED: _ClassVar[ServiceAccountChange]
    SERVICE_ACCOUNT_CHANGE_UNCHANGED: _ClassVar[ServiceAccountChange]
    SERVICE_ACCOUNT_CHANGE_NOT_FOUND: _ClassVar[ServiceAccountChange]
    SERVICE_ACCOUNT_CHANGE_FAILED: _ClassVar[ServiceAccountChange]

class PullSecretState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_SECRET_STATE_UNSPECIFIED: _ClassVar[PullSecretState]
    PULL_SECRET_STATE_CURRENT: _ClassVar[PullSecretState]
    PULL_SECRET_STATE_STALE: _ClassVar[PullSecretState]
    PULL_SECRET_STATE_MISSING: _ClassVar[PullSecretState]
    PULL_SECRET_STATE_FOREIGN: _ClassVar[PullSecretState]
SECRET_CHANGE_UNSPECIFIED: SecretChange
SECRET_CHANGE_CREATED: SecretChange
SECRET_CHANGE_UPDATED: SecretChange
SECRET_CHANGE_UNCHANGED: SecretChange
SECRET_CHANGE_DELETED: SecretChange
SECRET_CHANGE_ABSENT: SecretChange
SERVICE_ACCOUNT_CHANGE_UNSPECIFIED: ServiceAccountChange
SERVICE_ACCOUNT_CHANGE_PATCHED: ServiceAccountChange
SERVICE_ACCOUNT_CHANGE_UNCHANGED: ServiceAccountChange
SERVICE_ACCOUNT_CHANGE_NOT_FOUND: ServiceAccountChange
SERVICE_ACCOUNT_CHANGE_FAILED: ServiceAccountChange
PULL_SECRET_STATE_UNSPECIFIED: PullSecretState
PULL_SECRET_STATE_CURRENT: PullSecretState
PULL_SECRET_STATE_STALE: PullSecretState
PULL_SECRET_STATE_MISSING: PullSecretState
PULL_SECRET_STATE_FOREIGN: PullSecretState

class NamespaceError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ServiceAccountResult(_message.Message):
    __slots__ = ("name", "change", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    change: ServiceAccountChange
    error: NamespaceError
    def __init__(self, name: _Optional[str] = ..., change: _Optional[_Union[ServiceAccountChange, str]] = ..., error: _Optional[_Union[NamespaceError, _Mapping]] = ...) -> None: ...

class NamespaceResult(_message.Message):
    __slots__ = ("namespace", "secret_name", "secret_change", "service_accounts", "image_hosts", "error")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_CHANGE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    secret_name: str
    secret_change: SecretChange
    service_accounts: _containers.RepeatedCompositeFieldContainer[ServiceAccountResult]
    image_hosts: _containers.RepeatedScalarFieldContainer[str]
    error: NamespaceError
    def __init__(self, namespace: _Optional[str] = ..., secret_name: _Optional[str] = ..., secret_change: _Optional[_Union[SecretChange, str]] = ..., service_accounts: _Optional[_Iterable[_Union[ServiceAccountResult, _Mapping]]] = ..., image_hosts: _Optional[_Iterable[str]] = ..., error: _Optional[_Union[NamespaceError, _Mapping]] = ...) -> None: ...

class ProvisionPullSecretRequest(_message.Message):
    __slots__ = ("namespaces", "namespace_selector", "image_hosts", "images", "secret_name", "service_accounts", "dry_run", "keep_in_sync")
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    KEEP_IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    namespace_selector: str
    image_hosts: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedScalarFieldContainer[str]
    secret_name: str
    service_accounts: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    keep_in_sync: bool
    def __init__(self, namespaces: _Optional[_Iterable[str]] = ..., namespace_selector: _Optional[str] = ..., image_hosts: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[str]] = ..., secret_name: _Optional[str] = ..., service_accounts: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ..., keep_in_sync: _Optional[bool] = ...) -> None: ...

class ProvisionPullSecretResponse(_message.Message):
    __slots__ = ("results", "image_hosts", "dry_run")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NamespaceResult]
    image_hosts: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, results: _Optional[_Iterable[_Union[NamespaceResult, _Mapping]]] = ..., image_hosts: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RevokePullSecretRequest(_message.Message):
    __slots__ = ("namespaces", "namespace_selector", "secret_name", "dry_run")
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAME_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    namespace_selector: str
    secret_name: str
    dry_run: bool
    def __init__(self, namespaces: _Optional[_Iterable[str]] = ..., namespace_selector: _Optional[str] = ..., secret_name: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RevokePullSecretResponse(_message.Message):
    __slots__ = ("results", "dry_run")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NamespaceResult]
    dry_run: bool
    def __init__(self, results: _Optional[_Iterable[_Union[NamespaceResult, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ListPullSecretsRequest(_message.Message):
    __slots__ = ("namespace", "page_size", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    page_size: int
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class PullSecret(_message.Message):
    __slots__ = ("namespace", "secret_name", "image_hosts", "keep_in_sync", "state", "current", "content_sha256", "service_accounts", "error")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HOSTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    secret_name: str
    image_hosts: _containers.RepeatedScalarFieldContainer[str]
    keep_in_sync: bool
    state: PullSecretState
    current: bool
    content_sha256: str
    service_accounts: _containers.RepeatedScalarFieldContainer[str]
    error: NamespaceError
    def __init__(self, namespace: _Optional[str] = ..., secret_name: _Optional[str] = ..., image_hosts: _Optional[_Iterable[str]] = ..., keep_in_sync: _Optional[bool] = ..., state: _Optional[_Union[PullSecretState, str]] = ..., current: _Optional[bool] = ..., content_sha256: _Optional[str] = ..., service_accounts: _Optional[_Iterable[str]] = ..., error: _Optional[_Union[NamespaceError, _Mapping]] = ...) -> None: ...

class ListPullSecretsResponse(_message.Message):
    __slots__ = ("pull_secrets", "next_page_token")
    PULL_SECRETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pull_secrets: _containers.RepeatedCompositeFieldContainer[PullSecret]
    next_page_token: str
    def __init__(self, pull_secrets: _Optional[_Iterable[_Union[PullSecret, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SyncPullSecretsRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class SyncPullSecretsResponse(_message.Message):
    __slots__ = ("results", "dry_run")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NamespaceResult]
    dry_run: bool
    def __init__(self, results: _Optional[_Iterable[_Union[NamespaceResult, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...
