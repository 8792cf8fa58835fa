"""Which role may call which RPC. Every RPC the server registers must be listed here."""

from __future__ import annotations

from collections.abc import Iterable

from broker.security.principals import Principal

_IMAGE_HOSTS = "/broker.v1.ImageHostService/"
_PULL_SECRETS = "/broker.v1.PullSecretService/"

#: Open to everyone, no credentials needed.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

_READ_HOSTS = frozenset({_IMAGE_HOSTS + "GetImageHost", _IMAGE_HOSTS + "ListImageHosts"})

ROLE_METHODS: dict[str, frozenset[str]] = {
    "viewer": _READ_HOSTS | {_IMAGE_HOSTS + "GetDefaultImageHost"},
    "launcher": _READ_HOSTS
    | {
        _IMAGE_HOSTS + "GetDefaultImageHost",
        "/broker.v1.CredentialService/ResolveCredentials",
        "/broker.v1.PullService/PullImage",
    },
    "provisioner": _READ_HOSTS
    | {
        _PULL_SECRETS + "ProvisionPullSecret",
        _PULL_SECRETS + "RevokePullSecret",
        _PULL_SECRETS + "ListPullSecrets",
        _PULL_SECRETS + "SyncPullSecrets",
    },
}

#: Methods that change state or disclose a secret: every call is audited.
AUDITED_METHODS = frozenset(
    {
        _IMAGE_HOSTS + "CreateImageHost",
        _IMAGE_HOSTS + "UpdateImageHost",
        _IMAGE_HOSTS + "DeleteImageHost",
        _IMAGE_HOSTS + "SetDefaultImageHost",
        _IMAGE_HOSTS + "TestImageHost",
        "/broker.v1.CredentialService/ResolveCredentials",
        "/broker.v1.PullService/PullImage",
        _PULL_SECRETS + "ProvisionPullSecret",
        _PULL_SECRETS + "RevokePullSecret",
        _PULL_SECRETS + "SyncPullSecrets",
    }
)


def is_allowed(principal: Principal, method: str) -> bool:
    if "admin" in principal.roles:
        return True
    return any(method in ROLE_METHODS.get(role, frozenset()) for role in principal.roles)


def unclassified(methods: Iterable[str]) -> list[str]:
    """Registered methods nobody but admin could call and that are not open: a
    new RPC must be given to its roles here (the server refuses to start otherwise)."""
    granted = frozenset().union(*ROLE_METHODS.values())
    admin_only = {
        _IMAGE_HOSTS + "CreateImageHost",
        _IMAGE_HOSTS + "UpdateImageHost",
        _IMAGE_HOSTS + "DeleteImageHost",
        _IMAGE_HOSTS + "SetDefaultImageHost",
        _IMAGE_HOSTS + "TestImageHost",
    }
    return sorted(m for m in methods if m not in granted | OPEN_METHODS | admin_only)
