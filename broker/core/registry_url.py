"""Normalisation of an image host's URL into (registry, repository prefix).

The grammar follows distribution/reference so that every registry a URL
normalises to can also appear as the first component of an image reference.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
#: The key Docker itself uses for Docker Hub in config.json and credential helpers.
DOCKER_HUB_SERVER_ADDRESS = "https://index.docker.io/v1/"

MAX_URL_LENGTH = 512

# distribution/reference regexp.go
DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_NAME_RE = re.compile(rf"{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*")
_PATH_COMPONENT_RE = re.compile(PATH_COMPONENT)
_PORT_RE = re.compile(r"[0-9]{1,5}")
# A trailing API-version path ("/v1/" in https://index.docker.io/v1/) names no repository.
_API_VERSION_PATHS = frozenset({"v1", "v2"})


class InvalidRegistryUrl(ValueError):
    """The URL breaks a rule; the message names the rule and never echoes credentials."""


@dataclass(frozen=True)
class RegistryLocation:
    registry: str
    repository_prefix: str
    plain_http: bool

    @property
    def is_docker_hub(self) -> bool:
        return self.registry == DOCKER_HUB

    @property
    def claim(self) -> str:
        """The identity that must be unique across image hosts."""
        if self.repository_prefix:
            return f"{self.registry}/{self.repository_prefix}"
        return self.registry


def parse_registry_url(url: str) -> RegistryLocation:
    if not url:
        raise InvalidRegistryUrl("is required")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRegistryUrl(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise InvalidRegistryUrl("must not contain whitespace or control characters")

    plain_http = False
    rest = url
    if "://" in url:
        scheme, rest = url.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidRegistryUrl("scheme must be http:// or https://")
        plain_http = scheme == "http"
    if "?" in rest or "#" in rest:
        raise InvalidRegistryUrl("must not contain a query or fragment")

    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise InvalidRegistryUrl(
            "must not contain credentials (user:password@); set username and access_token"
        )
    host, port = _split_host_port(authority)
    registry = _normalise_host(host, port)
    prefix = _normalise_path(path)
    return RegistryLocation(registry=registry, repository_prefix=prefix, plain_http=plain_http)


def _split_host_port(authority: str) -> tuple[str, str | None]:
    if not authority:
        raise InvalidRegistryUrl("must name a registry host")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidRegistryUrl("IPv6 address must be closed with ']'")
        host, after = authority[: end + 1], authority[end + 1 :]
        if after and not after.startswith(":"):
            raise InvalidRegistryUrl("only a :port may follow the IPv6 address")
        return host, (after[1:] if after else None)
    if authority.count(":") > 1:
        raise InvalidRegistryUrl("IPv6 addresses must be written in brackets, e.g. [::1]:5000")
    host, sep, port = authority.partition(":")
    return host, (port if sep else None)


def _normalise_host(host: str, port: str | None) -> str:
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidRegistryUrl("host is not a valid IPv6 address") from None
        if address.scope_id is not None:
            raise InvalidRegistryUrl(
                "IPv6 zone ids ('%eth0') are not allowed: image references cannot contain them"
            )
        mapped = address.ipv4_mapped
        # Python 3.13+ writes IPv4-mapped addresses dotted (::ffff:1.2.3.4), which the
        # reference grammar rejects; keep the hex form on every Python version.
        text = (
            f"::ffff:{int(mapped) >> 16:x}:{int(mapped) & 0xFFFF:x}"
            if mapped is not None
            else address.compressed
        )
        name = f"[{text}]"
    else:
        if not host or len(host) > 253 or not _DOMAIN_NAME_RE.fullmatch(host):
            raise InvalidRegistryUrl(
                "host must be a DNS name or IP address "
                "(letters, digits and '-' in dot-separated labels)"
            )
        name = host.lower()
        if port is None and "." not in name and name != "localhost":
            raise InvalidRegistryUrl(
                "host must contain '.' or a ':port', or be 'localhost': "
                "image references read a bare name like this as a Docker Hub repository"
            )
    if port is not None:
        if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise InvalidRegistryUrl("port must be a number from 1 to 65535")
        return f"{name}:{int(port)}"
    if name in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return name


def _normalise_path(path: str) -> str:
    stripped = path.rstrip("/")
    if not stripped or stripped in _API_VERSION_PATHS:
        return ""
    components = stripped.split("/")
    for component in components:
        if not component:
            raise InvalidRegistryUrl("path must not contain empty components ('//')")
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise InvalidRegistryUrl(
                "path components must be lowercase letters and digits, "
                "separated by '.', '_', '__' or '-'"
            )
    prefix = "/".join(components)
    if len(prefix) > 200:
        raise InvalidRegistryUrl("repository prefix must be at most 200 characters")
    return prefix
