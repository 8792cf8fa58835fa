"""Image references: the grammar of distribution/reference, normalised for the broker.

`parse_reference` accepts exactly the references that distribution's
`ParseNormalizedNamed` accepts (normalize.go, regexp.go, reference.go, with the
digest checks of go-digest), except for the deviations listed below, and returns
them normalised the way distribution does (`ubuntu` -> `docker.io/library/ubuntu:latest`),
with the registry host normalised the way `registry_url` normalises an image
host's URL, so that `ImageReference.registry == RegistryLocation.registry` is the
test "same registry".

Distribution's rules kept as they are, even where they surprise:

- The first component is a registry only when the reference has a '/' after it and
  it contains '.' or ':', is `localhost`, or has an uppercase letter (`Foo/bar` is
  image `bar` on host `Foo`). Without a '/', everything is a Docker Hub name:
  `localhost:5000` is `docker.io/library/localhost` with tag `5000`, `reg.io` is
  `docker.io/library/reg.io`, and `sha256:<64 hex>` is `docker.io/library/sha256`
  with that tag. Only a bare 64-hex string is rejected (it is an image ID).
- A digest must be sha256, sha384 or sha512 in lowercase hex of the exact length
  (go-digest's registered algorithms); other algorithms are rejected.
- A port is any string of digits (no range check): such a registry simply never
  matches an image host, whose ports `registry_url` limits to 1-65535.

Deviations (each rejects something useless or keeps the registry comparable):

- Registry hosts are lowercased, ports lose leading zeros, IPv6 addresses are
  compressed, and `index.docker.io` and `registry-1.docker.io` (any case, no port)
  become `docker.io`, which then gets `library/` on one-component paths like
  `docker.io` itself (distribution does that only for the exact spelling
  `index.docker.io`). Exception: a host that is one only because of its uppercase
  letters (`Foo` in `Foo/bar`) keeps its case, since `foo/bar` would name a Docker
  Hub repository; no image host can have such a registry, so it never gets
  credentials.
- A bracketed IPv6 host must be a real IPv6 address (distribution accepts any run
  of hex digits and colons).
- A first component with '.' or ':' that is not a valid host (`my_org.io/app`) is
  rejected; distribution returns a reference with an empty domain for it.
- References longer than `MAX_REFERENCE_LENGTH` are rejected.

Error messages name the rule that was broken and never repeat the input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from broker.core.registry_url import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    DOMAIN_COMPONENT,
    PATH_COMPONENT,
    InvalidRegistryUrl,
    parse_registry_url,
)

#: distribution/reference RepositoryNameTotalLengthMax (the path, without the registry).
MAX_REPOSITORY_LENGTH = 255
#: Longer than any reference with a real DNS host: 253 + port + 255 + tag + sha512 digest.
MAX_REFERENCE_LENGTH = 1024
DEFAULT_TAG = "latest"
OFFICIAL_REPOSITORY_PREFIX = "library/"
LOCALHOST = "localhost"

# distribution/reference regexp.go, on top of the components shared with registry_url.
_DOMAIN_NAME = rf"{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_RE = re.compile(rf"(?P<host>{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::(?P<port>[0-9]+))?")
_HOST_RE = re.compile(rf"{_DOMAIN_NAME}|{_IPV6_ADDRESS}")
_PATH_COMPONENT_RE = re.compile(PATH_COMPONENT)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_GRAMMAR_RE = re.compile(
    r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
_PORT_RE = re.compile(r"[0-9]+")
# go-digest's registered algorithms and the length of their lowercase hex encoding.
DIGEST_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX_RE = re.compile(r"[a-f0-9]+")

_INVALID = "invalid reference format"


class InvalidReference(ValueError):
    """The text is not an image reference; the message names the rule it breaks."""


@dataclass(frozen=True)
class ImageReference:
    """A parsed, normalised image reference.

    registry: lowercase `host[:port]` ("docker.io", "ghcr.io", "localhost:5000",
        "[::1]:5000"); "docker.io" for an unqualified reference.
    repository: the path on that registry, with Docker Hub's `library/` added
        ("library/ubuntu", "team/tool", "acme/app").
    tag: the tag; "latest" when neither tag nor digest was given, "" when only a
        digest was given.
    digest: "" or "<algorithm>:<lowercase hex>".
    qualified: the reference names its registry. An unqualified one is resolved
        against the broker's default host (see `resolve`).
    path: what `on_registry` places on a registry: for an unqualified reference the
        path as written, before `library/` is added ("ubuntu", "team/tool",
        "library/ubuntu"); for a qualified reference the same as `repository`.
    """

    registry: str
    repository: str
    tag: str
    digest: str
    qualified: bool
    path: str

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def fully_qualified(self) -> str:
        """E.g. `docker.io/library/ubuntu:latest`, `ghcr.io/acme/app:1@sha256:…`.

        It parses back to this reference (with `qualified=True`).
        """
        return self.name + self._suffix

    @property
    def familiar(self) -> str:
        """The form `docker` shows: Docker Hub's `docker.io/` and `library/` dropped.

        `ubuntu:latest`, `team/tool:1`, `ghcr.io/acme/app@sha256:…`. A familiar
        name on Docker Hub is unqualified when parsed again.
        """
        if self.registry != DOCKER_HUB:
            return self.fully_qualified
        repository = self.repository
        official = repository.removeprefix(OFFICIAL_REPOSITORY_PREFIX)
        if official != repository and "/" not in official:
            repository = official
        return repository + self._suffix

    @property
    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag else ""
        return suffix + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.fully_qualified

    def on_registry(self, registry: str) -> ImageReference:
        """Place this unqualified reference on `registry` and return it qualified.

        `registry` is an image host's registry (`RegistryLocation.registry`, e.g.
        "127.0.0.1:5000" or "docker.io"); other spellings `registry_url` accepts
        without a path ("index.docker.io", "https://ghcr.io") are normalised
        first. `library/` is added only when the registry is Docker Hub and the
        path has one component: `team/tool:1.0` on "127.0.0.1:5000" is
        `127.0.0.1:5000/team/tool:1.0`, `ubuntu` on "docker.io" is
        `docker.io/library/ubuntu:latest`.

        Raises ValueError for a qualified reference (it keeps its registry) and
        for a registry that is not a registry host; InvalidReference when the
        resulting repository name is too long.
        """
        if self.qualified:
            raise ValueError("a qualified image reference keeps its registry")
        try:
            location = parse_registry_url(registry)
        except InvalidRegistryUrl as exc:
            raise ValueError(f"registry: {exc}") from None
        if location.repository_prefix:
            raise ValueError("registry must be host[:port] without a path")
        repository = _repository_on(location.registry, self.path)
        return replace(
            self,
            registry=location.registry,
            repository=repository,
            qualified=True,
            path=repository,
        )

    def resolve(self, default_registry: str) -> ImageReference:
        """This reference if qualified, else placed on `default_registry` (`on_registry`)."""
        if self.qualified:
            return self
        return self.on_registry(default_registry)

    def in_prefix(self, prefix: str) -> bool:
        """Whether `repository` is `prefix` or below it, on component boundaries.

        `ghcr.io/acme/app` is in "acme" and "acme/app" but not in "acme2" or
        "acme/ap"; everything is in "". Leading and trailing '/' of the prefix
        are ignored (a `RegistryLocation.repository_prefix` has none).
        """
        prefix = prefix.strip("/")
        if not prefix:
            return True
        return self.repository == prefix or self.repository.startswith(prefix + "/")


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference like `docker pull` does; raise InvalidReference."""
    if not text:
        raise InvalidReference(f"{_INVALID}: reference is empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(
            f"{_INVALID}: reference must be at most {MAX_REFERENCE_LENGTH} characters"
        )
    if not text.isascii() or not text.isprintable() or any(ch.isspace() for ch in text):
        raise InvalidReference(
            f"{_INVALID}: must not contain whitespace, control or non-ASCII characters"
        )
    if "://" in text:
        raise InvalidReference(f"{_INVALID}: must not include a scheme (https://)")
    if _IDENTIFIER_RE.fullmatch(text):
        raise InvalidReference(
            f"{_INVALID}: cannot specify 64-byte hexadecimal strings "
            "(that is an image ID, not a repository name)"
        )

    name_and_tag, at, digest = text.partition("@")
    if at:
        if "@" in digest:
            raise InvalidReference(f"{_INVALID}: only one '@digest' is allowed")
        _check_digest(digest)

    name, tag = name_and_tag, ""
    colon = name_and_tag.rfind(":")
    if colon > name_and_tag.rfind("/"):
        name, tag = name_and_tag[:colon], name_and_tag[colon + 1 :]
        _check_tag(tag)
    if not name:
        raise InvalidReference(f"{_INVALID}: repository name is missing")

    # normalize.go splitDockerDomain: what comes before the first '/' is a registry
    # host when it contains '.' or ':', is localhost, or has an uppercase letter.
    first, slash, rest = name.partition("/")
    qualified = bool(slash) and (
        first == LOCALHOST or any(ch in first for ch in ".:") or first.lower() != first
    )
    if qualified:
        registry = _normalise_domain(first)
        path = rest
    else:
        registry = DOCKER_HUB
        path = name
    _check_path(path)
    repository = _repository_on(registry, path)
    if not tag and not digest:
        tag = DEFAULT_TAG
    return ImageReference(
        registry=registry,
        repository=repository,
        tag=tag,
        digest=digest,
        qualified=qualified,
        path=repository if qualified else path,
    )


def _repository_on(registry: str, path: str) -> str:
    repository = path
    if registry == DOCKER_HUB and "/" not in path:
        repository = OFFICIAL_REPOSITORY_PREFIX + path
    if len(repository) > MAX_REPOSITORY_LENGTH:
        raise InvalidReference(
            f"repository name must not be more than {MAX_REPOSITORY_LENGTH} characters"
        )
    return repository


def _check_digest(digest: str) -> None:
    if not _DIGEST_GRAMMAR_RE.fullmatch(digest):
        raise InvalidReference(
            f"{_INVALID}: invalid digest: must be <algorithm>:<hex>, e.g. sha256:<64 hex digits>"
        )
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_ALGORITHMS.get(algorithm)
    if length is None:
        supported = ", ".join(DIGEST_ALGORITHMS)
        raise InvalidReference(
            f"{_INVALID}: invalid digest: unsupported digest algorithm (supported: {supported})"
        )
    if len(encoded) != length or not _LOWER_HEX_RE.fullmatch(encoded):
        raise InvalidReference(
            f"{_INVALID}: invalid digest: {algorithm} needs exactly {length} lowercase hex digits"
        )


def _check_tag(tag: str) -> None:
    if len(tag) > 128:
        raise InvalidReference(f"{_INVALID}: invalid tag: must be at most 128 characters")
    if not _TAG_RE.fullmatch(tag):
        raise InvalidReference(
            f"{_INVALID}: invalid tag: must be letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-'"
        )


def _check_path(path: str) -> None:
    components = path.split("/")
    if not all(components):
        raise InvalidReference(
            f"{_INVALID}: repository name must not have empty components "
            "(no leading, trailing or double '/')"
        )
    if all(_PATH_COMPONENT_RE.fullmatch(c) for c in components):
        return
    if all(_PATH_COMPONENT_RE.fullmatch(c.lower()) for c in components):
        raise InvalidReference(f"{_INVALID}: repository name must be lowercase")
    raise InvalidReference(
        f"{_INVALID}: repository name components must be lowercase letters and digits "
        "separated by '.', '_', '__' or '-'"
    )


def _normalise_domain(domain: str) -> str:
    match = _DOMAIN_RE.fullmatch(domain)
    if match is None:
        host, sep, port = domain.rpartition(":")
        if sep and _HOST_RE.fullmatch(host) and not _PORT_RE.fullmatch(port):
            raise InvalidReference(f"{_INVALID}: registry port must be digits")
        raise InvalidReference(
            f"{_INVALID}: registry host must be a DNS name (letters, digits and '-' in "
            "dot-separated labels), an IPv4 address or a bracketed IPv6 address, "
            "with an optional :port"
        )
    host, port = match["host"], match["port"]
    if host.startswith("["):
        host = _normalise_ipv6(host[1:-1])
    else:
        lowered = host.lower()
        if port is None and "." not in lowered and lowered != LOCALHOST:
            # A host only because of its uppercase letters (`Foo/bar`): lowercased it
            # would read as a Docker Hub namespace, so it keeps its case.
            return host
        host = lowered
    if port is not None:
        return f"{host}:{int(port)}"
    if host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host


def _normalise_ipv6(text: str) -> str:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise InvalidReference(f"{_INVALID}: registry host is not a valid IPv6 address") from None
    mapped = address.ipv4_mapped
    # The same hex form of IPv4-mapped addresses as registry_url, on every Python version.
    compressed = (
        f"::ffff:{int(mapped) >> 16:x}:{int(mapped) & 0xFFFF:x}"
        if mapped is not None
        else address.compressed
    )
    return f"[{compressed}]"
