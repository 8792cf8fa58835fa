"""The `.dockerconfigjson` of a pull secret, byte for byte as kubectl writes it.

`kubectl create secret docker-registry` marshals
`{"auths":{"<server>":{"username","password","email","auth"}}}` with Go's
`encoding/json`: compact, map keys sorted, struct fields in that order, empty
fields omitted, and `<`, `>`, `&`, U+2028 and U+2029 escaped as `\\u003c`...
`auth` is base64 (standard alphabet, padded) of `username:password`; the
kubelet prefers it over the separate fields. This module writes the same
bytes, so that a secret's hash is stable and comparable whoever wrote it.

Keys (the "server"): `https://index.docker.io/v1/` for Docker Hub, otherwise
the registry's `host[:port]`, as `Resolution.server_address` says and Docker
writes them. A host scoped to a repository prefix (`ghcr.io/acme`) is keyed
`ghcr.io/acme`: the kubelet matches keys with a path as a prefix of the image's
repository and tries the most specific key first, which is the broker's own
longest-prefix rule, and two hosts on one registry (`ghcr.io` and
`ghcr.io/acme`) would otherwise collide on one key.

Hosts without an access token (anonymous) add no entry. An image host whose
username is Docker's identity-token marker `<token>` is written like any other
(username `<token>`, the token as password): that is exactly what
ResolveCredentials hands out for it.

The content is a secret: nothing here logs it, and `PullSecretContent`'s repr
shows only its hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.core.image_hosts import ImageHost

#: The Secret type and its one data key.
DOCKER_CONFIG_JSON_TYPE = "kubernetes.io/dockerconfigjson"
DOCKER_CONFIG_JSON_KEY = ".dockerconfigjson"

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


@dataclass(frozen=True)
class PullSecretContent:
    """The bytes of `.dockerconfigjson` and the hosts whose credentials are in it."""

    raw: bytes = field(repr=False)
    #: Ids of the hosts with an entry (those with credentials), in key order.
    image_host_ids: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def base64(self) -> str:
        """The value of `data[".dockerconfigjson"]` in the Secret."""
        return base64.b64encode(self.raw).decode("ascii")

    def __repr__(self) -> str:
        return f"PullSecretContent(sha256={self.sha256[:12]}…, hosts={self.image_host_ids})"


def server_key(host: ImageHost) -> str:
    """The `auths` key of a host (see the module documentation)."""
    location = host.location
    if location.repository_prefix:
        return f"{location.registry}/{location.repository_prefix}"
    return host.server_address


def auth_entry(username: str, password: str) -> dict[str, str]:
    """One `auths` entry as kubectl writes it (empty fields omitted)."""
    entry: dict[str, str] = {}
    if username:
        entry["username"] = username
    if password:
        entry["password"] = password
    entry["auth"] = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return entry


def go_json(value: object) -> str:
    """JSON as Go's `json.Marshal` writes it (see the module documentation)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    # The characters Go escapes can only occur inside strings, so a plain
    # replacement never touches the JSON structure.
    for char, escaped in _GO_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


def build_content(hosts: Iterable[ImageHost]) -> PullSecretContent:
    """`.dockerconfigjson` for these hosts; those without credentials are left out."""
    auths: dict[str, dict[str, str]] = {}
    ids: dict[str, str] = {}
    for host in hosts:
        if not host.access_token:
            continue
        key = server_key(host)
        auths[key] = auth_entry(host.username, host.access_token.reveal())
        ids[key] = host.id
    # sort_keys orders the entry fields too; Go writes them in struct order
    # (username, password, email, auth), which is not alphabetical: build
    # the entries' text by hand.
    parts = []
    for key in sorted(auths):
        fields = ",".join(f"{go_json(k)}:{go_json(v)}" for k, v in auths[key].items())
        parts.append(f"{go_json(key)}:{{{fields}}}")
    text = '{"auths":{' + ",".join(parts) + "}}"
    return PullSecretContent(
        raw=text.encode("utf-8"), image_host_ids=tuple(ids[k] for k in sorted(auths))
    )


def decode_data(secret: dict[str, object]) -> bytes | None:
    """The `.dockerconfigjson` bytes of a Secret object, None when absent or not base64."""
    data = secret.get("data")
    if not isinstance(data, dict):
        return None
    value = data.get(DOCKER_CONFIG_JSON_KEY)
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
