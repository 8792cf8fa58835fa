"""A wrapper that keeps secret values out of reprs, logs and tracebacks."""

from __future__ import annotations

from typing import Final


class Secret:
    """Holds a secret string; `str()` and `repr()` never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value: Final = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


EMPTY_SECRET = Secret("")
