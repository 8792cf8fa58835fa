"""Kubernetes names and label selectors, checked before anything reaches a cluster.

- Namespace names are DNS-1123 labels (apimachinery `IsDNS1123Label`):
  at most 63 characters of lowercase letters, digits and '-', starting and
  ending with a letter or digit.
- Secret and service account names are DNS-1123 subdomains
  (`IsDNS1123Subdomain`): at most 253 characters, dot-separated labels as above.
- Label selectors follow `labels.Parse` of apimachinery, the syntax of
  `kubectl get -l`: comma-separated requirements `key=value`, `key==value`,
  `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`, `key` (exists) and
  `!key` (does not exist). Keys are `[prefix/]name` (prefix a DNS-1123
  subdomain, name at most 63 characters of letters, digits, '-', '_', '.',
  alphanumeric at both ends); values are empty or at most 63 such characters.
  The numeric `gt`/`lt` operators are refused: they select nothing useful for
  namespaces. `normalise_selector` returns the canonical form (requirements in
  key order, `==` as `=`, set values sorted), so that two spellings of one
  selector compare equal.

Error messages name the rule that was broken and never repeat the input (a
caller may paste anything into these fields).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LABEL = 63
MAX_SUBDOMAIN = 253
MAX_SELECTOR = 4096

_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

LABEL_RULE = (
    "must be a DNS-1123 label: at most 63 characters of lowercase letters, digits and '-', "
    "starting and ending with a letter or digit"
)
SUBDOMAIN_RULE = (
    "must be a DNS-1123 subdomain: at most 253 characters of lowercase letters, digits, "
    "'-' and '.', each dot-separated part starting and ending with a letter or digit"
)


def label_violation(value: str) -> str | None:
    """Why `value` is not a DNS-1123 label, or None."""
    if not value:
        return "is required"
    if len(value) > MAX_LABEL or not _LABEL_RE.fullmatch(value):
        return LABEL_RULE
    return None


def subdomain_violation(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain, or None."""
    if not value:
        return "is required"
    if len(value) > MAX_SUBDOMAIN or not _SUBDOMAIN_RE.fullmatch(value):
        return SUBDOMAIN_RULE
    return None


class InvalidSelector(ValueError):
    """The label selector breaks a rule; the message names it without quoting the input."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.operator == "exists":
            return self.key
        if self.operator == "!":
            return "!" + self.key
        if self.operator in ("in", "notin"):
            return f"{self.key} {self.operator} ({','.join(self.values)})"
        return f"{self.key}{self.operator}{self.values[0]}"


def parse_selector(text: str) -> list[Requirement]:
    """The requirements of a label selector; raise InvalidSelector."""
    if len(text) > MAX_SELECTOR:
        raise InvalidSelector(f"must be at most {MAX_SELECTOR} characters")
    if any(not ch.isprintable() or (ch.isspace() and ch != " ") for ch in text):
        raise InvalidSelector("must not contain control characters, tabs or newlines")
    if not text.strip():
        raise InvalidSelector("is empty")
    requirements: list[Requirement] = []
    for position, part in enumerate(_split_requirements(text), start=1):
        requirements.append(_parse_requirement(part.strip(), position))
    return requirements


def normalise_selector(text: str) -> str:
    """The canonical spelling of a label selector; raise InvalidSelector."""
    requirements = parse_selector(text)
    unique = {str(r): r for r in requirements}
    ordered = sorted(unique.values(), key=lambda r: (r.key, r.operator, r.values))
    return ",".join(str(r) for r in ordered)


def _split_requirements(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
            if depth > 1:
                raise InvalidSelector("parentheses must not nest")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InvalidSelector("has a ')' without its '('")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise InvalidSelector("has a '(' without its ')'")
    parts.append("".join(current))
    return parts


_SET_RE = re.compile(r"(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")
_EQ_RE = re.compile(r"(?P<key>[^\s!=(),<>]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),<>]*)")


def _parse_requirement(part: str, position: int) -> Requirement:
    where = f"requirement {position}"
    if not part:
        raise InvalidSelector(f"{where} is empty (a stray ',')")
    if any(op in part for op in ("<", ">")):
        raise InvalidSelector(f"{where}: the numeric operators '<' and '>' are not supported")
    match = _SET_RE.fullmatch(part)
    if match:
        key = _check_key(match["key"], where)
        values = [v.strip() for v in match["values"].split(",")]
        if values == [""]:
            raise InvalidSelector(f"{where}: '{match['op']}' needs at least one value")
        for value in values:
            _check_value(value, where)
        return Requirement(key, match["op"], tuple(sorted(set(values))))
    match = _EQ_RE.fullmatch(part)
    if match:
        key = _check_key(match["key"], where)
        value = _check_value(match["value"], where)
        operator = "!=" if match["op"] == "!=" else "="
        return Requirement(key, operator, (value,))
    if part.startswith("!"):
        return Requirement(_check_key(part[1:].strip(), where), "!")
    if any(ch in part for ch in " =!()"):
        raise InvalidSelector(
            f"{where} is not of the form key=value, key!=value, key in (a,b), "
            "key notin (a,b), key or !key"
        )
    return Requirement(_check_key(part, where), "exists")


def _check_key(key: str, where: str) -> str:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > MAX_SUBDOMAIN or not _SUBDOMAIN_RE.fullmatch(prefix)):
        raise InvalidSelector(f"{where}: the key's prefix {SUBDOMAIN_RULE}")
    if not name or len(name) > MAX_LABEL or not _QUALIFIED_NAME_RE.fullmatch(name):
        raise InvalidSelector(
            f"{where}: the key's name must be at most 63 characters of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    return key


def _check_value(value: str, where: str) -> str:
    if len(value) > MAX_LABEL or not _LABEL_VALUE_RE.fullmatch(value):
        raise InvalidSelector(
            f"{where}: a value must be empty or at most 63 characters of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    return value
