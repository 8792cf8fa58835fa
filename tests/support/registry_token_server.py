"""A small token server for distribution's token authentication (`auth: token:`).

Follows the distribution token spec (`spec/auth/token.md`, `spec/auth/oauth.md`)
as far as a registry and the Docker engine use it:

- `GET /token?service=…&scope=…[&scope=…][&account=…]` with Basic credentials
  answers `{"token", "access_token", "expires_in", "issued_at"}`. Wrong
  credentials: 401 (`WWW-Authenticate: Basic`). No credentials: an anonymous
  token that grants nothing (as Docker Hub does), unless `allow_anonymous` is off.
- `POST /token` (OAuth2 form: `grant_type=password` or `refresh_token`, `service`,
  `scope` space-separated, `client_id`, `access_type=offline` for a refresh token).
- A requested action is granted only when the user has it: too little access is
  not an error, the token just grants less.

Tokens are JWTs signed ES256 with a key whose certificate (issued by this
server's own CA, `rootcertbundle`) travels in the `x5c` header; distribution 2.8
verifies that chain against `rootcertbundle`, then the signature, issuer,
audience (`service`) and expiry. Every request is recorded in `requests`
(user names and scopes, never passwords).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.certificates import CertificateAuthority
from tests.support.registry_http_fakes import HttpServerThread, PlainHandler

DEFAULT_SERVICE = "credbroker-test-registry"
DEFAULT_ISSUER = "credbroker-test-token-issuer"
DEFAULT_EXPIRES_IN = 300
ALL_ACTIONS = frozenset({"pull", "push", "delete", "*"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class ResourceScope:
    """`repository:team/tool:pull,push` parsed."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> ResourceScope | None:
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name or not actions:
            return None
        return cls(kind, name, tuple(a for a in actions.split(",") if a))


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server saw. Never holds a password."""

    method: str
    path: str
    service: str | None
    scopes: tuple[str, ...]
    account: str | None
    #: The user name of the Basic credentials (or of the password grant), if any.
    username: str | None
    #: "granted", "anonymous", "denied" (bad credentials) or "bad-request".
    outcome: str
    #: What the token grants: (type, name, actions) per resource.
    granted: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


@dataclass
class _User:
    password: str = field(repr=False)
    actions: frozenset[str]


class TokenServer:
    """Token endpoint on 127.0.0.1; `realm`, `service`, `issuer`, `rootcertbundle`."""

    def __init__(
        self,
        work_dir: Path,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        expires_in: int = DEFAULT_EXPIRES_IN,
        allow_anonymous: bool = True,
    ) -> None:
        self.work_dir = work_dir
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.allow_anonymous = allow_anonymous
        self._users: dict[str, _User] = {}
        self._refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self.ca = CertificateAuthority("token-issuer", work_dir)
        signer = self.ca.client("token-signer", label="token-signer")
        key = serialization.load_pem_private_key(signer.key_pem(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the token signing key must be EC P-256")
        self._key = key
        leaf = x509.load_pem_x509_certificate(signer.cert_pem())
        self._x5c = [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]
        self._server = HttpServerThread(self._handler_class(), name="token server")

    # -- configuration ---------------------------------------------------------------

    @property
    def rootcertbundle(self) -> Path:
        """The CA certificate the registry trusts for token signatures."""
        return self.ca.cert

    @property
    def address(self) -> str:
        return self._server.address

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def realm(self) -> str:
        return f"{self._server.url}/token"

    def add_user(
        self, username: str, password: str, actions: Iterable[str] = ("pull", "push")
    ) -> None:
        """Allow `username`; its tokens grant at most `actions` on any repository."""
        with self._lock:
            self._users[username] = _User(password, frozenset(actions))

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def start(self) -> TokenServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- tokens ----------------------------------------------------------------------

    def _check_password(self, username: str, password: str) -> bool:
        with self._lock:
            user = self._users.get(username)
        # Compare anyway so that an unknown user takes as long as a wrong password.
        expected = user.password if user is not None else secrets.token_urlsafe(24)
        return hmac.compare_digest(expected.encode(), password.encode()) and user is not None

    def _grant(self, username: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        with self._lock:
            user = self._users.get(username) if username is not None else None
        allowed = user.actions if user is not None else frozenset()
        access = []
        for text in scopes:
            scope = ResourceScope.parse(text)
            if scope is None:
                continue
            actions = [a for a in scope.actions if a in allowed or "*" in allowed]
            access.append({"type": scope.type, "name": scope.name, "actions": actions})
        return access

    def issue(self, username: str | None, scopes: Iterable[str]) -> tuple[str, list[Any]]:
        """A signed token for `username` (None: anonymous) and what it grants."""
        now = int(time.time())
        access = self._grant(username, scopes)
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64url(signature)}", access

    def _refresh_token_for(self, username: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh_tokens[token] = username
        return token

    def _user_of_refresh_token(self, token: str) -> str | None:
        with self._lock:
            return self._refresh_tokens.get(token)

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(PlainHandler):
            def do_GET(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                if parsed.path != "/token":
                    self._json(404, {"errors": [{"code": "NOT_FOUND", "message": "no such path"}]})
                    return
                scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
                service = query.get("service", [None])[0]
                username, password = self._basic_credentials()
                seen = TokenRequest(
                    method="GET",
                    path=parsed.path,
                    service=service,
                    scopes=scopes,
                    account=query.get("account", [None])[0],
                    username=username,
                    outcome="bad-request",
                )
                if service != server.service:
                    server._record(seen)
                    self._json(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
                    return
                if username is None and not server.allow_anonymous:
                    server._record(dataclasses.replace(seen, outcome="denied"))
                    self._unauthorized()
                    return
                if username is not None and not server._check_password(username, password or ""):
                    server._record(dataclasses.replace(seen, outcome="denied"))
                    self._unauthorized()
                    return
                token, access = server.issue(username, scopes)
                outcome = "anonymous" if username is None else "granted"
                server._record(dataclasses.replace(seen, outcome=outcome, granted=_granted(access)))
                self._token(token)

            def do_POST(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 65536)).decode(errors="replace")
                form = urllib.parse.parse_qs(body)

                def one(name: str) -> str | None:
                    return form.get(name, [None])[0]

                scopes = tuple((one("scope") or "").split())
                grant_type = one("grant_type")
                username = one("username")
                seen = TokenRequest(
                    method="POST",
                    path=parsed.path,
                    service=one("service"),
                    scopes=scopes,
                    account=None,
                    username=username,
                    outcome="bad-request",
                )
                if parsed.path != "/token" or one("service") != server.service:
                    server._record(seen)
                    self._json(400, {"error": "invalid_request"})
                    return
                if grant_type == "password":
                    ok = username is not None and server._check_password(
                        username, one("password") or ""
                    )
                elif grant_type == "refresh_token":
                    username = server._user_of_refresh_token(one("refresh_token") or "")
                    ok = username is not None
                else:
                    server._record(seen)
                    self._json(400, {"error": "unsupported_grant_type"})
                    return
                seen = dataclasses.replace(seen, username=username)
                if not ok or username is None:
                    server._record(dataclasses.replace(seen, outcome="denied"))
                    self._json(401, {"error": "invalid_grant"})
                    return
                token, access = server.issue(username, scopes)
                server._record(
                    dataclasses.replace(seen, outcome="granted", granted=_granted(access))
                )
                extra: dict[str, Any] = {"scope": " ".join(scopes)}
                if one("access_type") == "offline" or grant_type == "refresh_token":
                    extra["refresh_token"] = server._refresh_token_for(username)
                self._token(token, extra)

            def _basic_credentials(self) -> tuple[str | None, str | None]:
                header = self.headers.get("Authorization") or ""
                scheme, _, value = header.partition(" ")
                if scheme.lower() != "basic" or not value:
                    return None, None
                try:
                    decoded = base64.b64decode(value.strip(), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    return "", None
                username, _, password = decoded.partition(":")
                return username, password

            def _unauthorized(self) -> None:
                self._json(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                    {"WWW-Authenticate": 'Basic realm="credbroker test token server"'},
                )

            def _token(self, token: str, extra: dict[str, Any] | None = None) -> None:
                issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                self._json(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": server.expires_in,
                        "issued_at": issued_at,
                        **(extra or {}),
                    },
                )

            def _json(
                self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _granted(access: list[dict[str, Any]]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    return tuple((a["type"], a["name"], tuple(a["actions"])) for a in access)
