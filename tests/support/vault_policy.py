"""Vault ACL policies for the Vault emulator: an HCL-subset parser and the matcher.

The parser reads what Vault policies are written in::

    # comment            // comment            /* comment */
    path "secret/data/reg/*" {
      capabilities = ["read", "list"]
    }

plus the other keys Vault accepts inside a ``path`` block (they are parsed and
ignored, apart from the legacy ``policy = "read"`` shorthand which is expanded
the way Vault expands it).

The matcher follows ``vault/acl.go``:

- rules for the same path string coming from several policies are merged: the
  union of their capabilities, except that ``deny`` replaces everything;
- a path ending in ``*`` is a prefix rule (``*`` anywhere else is a literal
  character); a path with a ``+`` segment is a segment-wildcard rule; every other
  path is exact;
- an exact rule wins outright; otherwise the longest prefix rule and every
  matching segment-wildcard rule compete and the most specific one wins (first
  wildcard later, not a prefix, fewer ``+``, longer, lexically greater); only
  the winning rule's capabilities count;
- a LIST request is checked as ``path/`` and, when nothing matches that, as
  ``path`` without the trailing slash.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list", "sudo", "deny"})

# Keys Vault accepts in a path block besides "capabilities" (parsed, not enforced).
_OTHER_PATH_KEYS = frozenset(
    {
        "policy",
        "comment",
        "allowed_parameters",
        "denied_parameters",
        "required_parameters",
        "min_wrapping_ttl",
        "max_wrapping_ttl",
        "mfa_methods",
        "control_group",
        "subscribe_event_types",
    }
)

# The legacy "policy = ..." shorthand (vault/policy.go).
_LEGACY = {
    "deny": ("deny",),
    "read": ("read", "list"),
    "write": ("create", "read", "update", "delete", "list"),
    "sudo": ("create", "read", "update", "delete", "list", "sudo"),
}

# Vault's built-in "default" policy, reduced to the paths the emulator serves.
DEFAULT_POLICY_HCL = """
# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}
"""


class PolicyError(ValueError):
    """The policy text is not valid (the message names the line)."""


@dataclass(frozen=True)
class PathRule:
    path: str
    capabilities: frozenset[str]


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[PathRule, ...]
    text: str


# --------------------------------------------------------------------------- HCL


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<heredoc><<-?(?P<tag>[A-Za-z_][A-Za-z0-9_]*)\n(?P<hbody>.*?)\n[ \t]*(?P=tag)(?=\s|$))
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-.]*)
  | (?P<punct>[{}\[\]=,:])
    """,
    re.VERBOSE | re.DOTALL,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    value: str
    line: int


def _unquote(raw: str, line: int) -> str:
    out: list[str] = []
    i = 1
    end = len(raw) - 1
    while i < end:
        ch = raw[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", raw[i + 2 : i + 6]):
            out.append(chr(int(raw[i + 2 : i + 6], 16)))
            i += 6
        else:
            raise PolicyError(f"line {line}: invalid escape \\{nxt}")
    return "".join(out)


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    line = 1
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise PolicyError(f"line {line}: unexpected character {text[pos]!r}")
        raw = match.group(0)
        if match.group("heredoc") is not None:
            tokens.append(_Tok("string", match.group("hbody"), line))
        elif match.group("string") is not None:
            tokens.append(_Tok("string", _unquote(raw, line), line))
        elif match.group("number") is not None:
            tokens.append(_Tok("number", raw, line))
        elif match.group("ident") is not None:
            tokens.append(_Tok("ident", raw, line))
        elif match.group("punct") is not None:
            tokens.append(_Tok(raw, raw, line))
        line += raw.count("\n")
        pos = match.end()
    tokens.append(_Tok("eof", "", line))
    return tokens


HclValue = str | float | bool | list["HclValue"] | dict[str, "HclValue"]


class _Parser:
    def __init__(self, text: str) -> None:
        self._toks = _tokenize(text)
        self._i = 0

    def _peek(self) -> _Tok:
        return self._toks[self._i]

    def _next(self) -> _Tok:
        tok = self._toks[self._i]
        if tok.kind != "eof":
            self._i += 1
        return tok

    def _expect(self, kind: str) -> _Tok:
        tok = self._next()
        if tok.kind != kind:
            shown = tok.value or "end of input"
            raise PolicyError(f"line {tok.line}: expected {kind!r}, found {shown!r}")
        return tok

    def body(self, closing: str) -> list[tuple[str, list[str], HclValue, int]]:
        """Items of a body: (key, block labels, value, line); value is a dict for blocks."""
        items: list[tuple[str, list[str], HclValue, int]] = []
        while True:
            tok = self._peek()
            if tok.kind == closing:
                return items
            if tok.kind == ",":  # tolerated between object items
                self._next()
                continue
            if tok.kind not in ("ident", "string"):
                shown = tok.value or "end of input"
                raise PolicyError(f"line {tok.line}: expected a key, found {shown!r}")
            key_tok = self._next()
            labels: list[str] = []
            while self._peek().kind == "string":
                labels.append(self._next().value)
            follower = self._peek()
            if follower.kind in ("=", ":") and not labels:
                self._next()
                items.append((key_tok.value, [], self.value(), key_tok.line))
            elif follower.kind == "{":
                self._next()
                inner = self.body("}")
                self._expect("}")
                items.append((key_tok.value, labels, _items_to_dict(inner), key_tok.line))
            else:
                shown = follower.value or "end of input"
                raise PolicyError(f"line {follower.line}: unexpected {shown!r}")

    def value(self) -> HclValue:
        tok = self._next()
        if tok.kind == "string":
            return tok.value
        if tok.kind == "number":
            return float(tok.value)
        if tok.kind == "ident" and tok.value in ("true", "false"):
            return tok.value == "true"
        if tok.kind == "[":
            values: list[HclValue] = []
            while self._peek().kind != "]":
                values.append(self.value())
                if self._peek().kind == ",":
                    self._next()
                elif self._peek().kind != "]":
                    bad = self._peek()
                    raise PolicyError(f"line {bad.line}: expected ',' or ']'")
            self._expect("]")
            return values
        if tok.kind == "{":
            inner = self.body("}")
            self._expect("}")
            return _items_to_dict(inner)
        shown = tok.value or "end of input"
        raise PolicyError(f"line {tok.line}: unexpected {shown!r}")


def _items_to_dict(items: list[tuple[str, list[str], HclValue, int]]) -> dict[str, HclValue]:
    out: dict[str, HclValue] = {}
    for key, labels, value, _line in items:
        target: dict[str, HclValue] = out
        for label in [key, *labels][:-1]:
            existing = target.get(label)
            if not isinstance(existing, dict):
                existing = {}
                target[label] = existing
            target = existing
        target[[key, *labels][-1]] = value
    return out


def parse_policy(name: str, text: str) -> Policy:
    """Parse HCL policy text; raises PolicyError on anything Vault would refuse."""
    parser = _Parser(text)
    items = parser.body("eof")
    merged: dict[str, set[str]] = {}
    order: list[str] = []
    for key, labels, value, line in items:
        if key == "name" and not labels:
            continue
        if key != "path" or len(labels) != 1 or not isinstance(value, dict):
            raise PolicyError(f'line {line}: expected path "<path>" {{ ... }}, found {key!r}')
        path = labels[0].removeprefix("/")
        caps: set[str] = set()
        for attr, attr_value in value.items():
            if attr == "capabilities":
                if not isinstance(attr_value, list) or not all(
                    isinstance(c, str) for c in attr_value
                ):
                    raise PolicyError(f'line {line}: path "{path}": capabilities must be strings')
                for cap in attr_value:
                    assert isinstance(cap, str)
                    if cap not in CAPABILITIES:
                        raise PolicyError(f'path "{path}": invalid capability "{cap}"')
                    caps.add(cap)
            elif attr == "policy":
                if not isinstance(attr_value, str) or attr_value not in _LEGACY:
                    raise PolicyError(f'path "{path}": invalid policy "{attr_value}"')
                caps.update(_LEGACY[attr_value])
            elif attr not in _OTHER_PATH_KEYS:
                raise PolicyError(f'line {line}: path "{path}": invalid key "{attr}"')
        if path not in merged:
            merged[path] = set()
            order.append(path)
        merged[path] |= caps
    rules = tuple(PathRule(p, _normalise(merged[p])) for p in order)
    return Policy(name=name, rules=rules, text=text)


def _normalise(caps: Iterable[str]) -> frozenset[str]:
    caps = frozenset(caps)
    return frozenset({"deny"}) if "deny" in caps else caps


def _merge(old: frozenset[str] | None, new: frozenset[str]) -> frozenset[str]:
    if old is None:
        return new
    if "deny" in old or "deny" in new:
        return frozenset({"deny"})
    return old | new


# --------------------------------------------------------------------------- ACL


@dataclass(frozen=True)
class _WildcardMatch:
    first_wildcard: int
    is_prefix: bool
    wildcards: int
    pattern: str
    capabilities: frozenset[str]


def _higher(a: _WildcardMatch, b: _WildcardMatch) -> bool:
    """True when a has priority over b (vault/acl.go)."""
    if a.first_wildcard != b.first_wildcard:
        return a.first_wildcard > b.first_wildcard
    if a.is_prefix != b.is_prefix:
        return not a.is_prefix
    if a.wildcards != b.wildcards:
        return a.wildcards < b.wildcards
    if len(a.pattern) != len(b.pattern):
        return len(a.pattern) > len(b.pattern)
    return a.pattern > b.pattern


class ACL:
    """The merged rules of a token's policies."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.exact: dict[str, frozenset[str]] = {}
        self.prefix: dict[str, frozenset[str]] = {}
        self.segment: dict[str, frozenset[str]] = {}
        for policy in policies:
            for rule in policy.rules:
                path = rule.path
                if "+" in path.split("/"):
                    table = self.segment
                elif path.endswith("*"):
                    table = self.prefix
                    path = path[:-1]
                else:
                    table = self.exact
                table[path] = _merge(table.get(path), rule.capabilities)

    def _non_exact(self, path: str) -> frozenset[str] | None:
        best: _WildcardMatch | None = None
        prefixes = [p for p in self.prefix if path.startswith(p)]
        if prefixes:
            longest = max(prefixes, key=len)
            best = _WildcardMatch(len(longest), True, 0, longest, self.prefix[longest])
        parts = path.split("/")
        for full, caps in self.segment.items():
            pattern = full
            is_prefix = pattern.endswith("*")
            if is_prefix:
                pattern = pattern[:-1]
            pattern_parts = pattern.split("/")
            if len(parts) < len(pattern_parts):
                continue
            if not is_prefix and len(parts) != len(pattern_parts):
                continue
            wildcards = 0
            matched = True
            for i, want in enumerate(pattern_parts):
                last = i == len(pattern_parts) - 1
                if want == "+":
                    wildcards += 1
                elif want != parts[i] and not (is_prefix and last and parts[i].startswith(want)):
                    matched = False
                    break
            if not matched:
                continue
            candidate = _WildcardMatch(full.index("+"), is_prefix, wildcards, pattern, caps)
            if best is None or _higher(candidate, best):
                best = candidate
        return None if best is None else best.capabilities

    def capabilities(self, path: str, *, listing: bool = False) -> frozenset[str]:
        """The capabilities the winning rule grants on path (empty: nothing matches)."""
        found = self.exact.get(path)
        if found is None and listing:
            found = self.exact.get(path.removesuffix("/"))
        if found is None:
            found = self._non_exact(path)
        if found is None and listing:
            found = self._non_exact(path.removesuffix("/"))
        return found if found is not None else frozenset()

    def allows(self, path: str, capability: str) -> bool:
        caps = self.capabilities(path, listing=capability == "list")
        return "deny" not in caps and capability in caps


def build_acl(names: Sequence[str], policies: Mapping[str, Policy]) -> ACL:
    """The ACL of a token holding the named policies (unknown names grant nothing)."""
    return ACL(policies[n] for n in names if n in policies)
