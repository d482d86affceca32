"""Reading TOML tables strictly: every key typed, bounded and named by its dotted path
in the error, and every key the reader did not take refused as unknown, so that a typo
in the config file stops start-up instead of being ignored."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


class Section:
    """A TOML table being read: tracks its dotted path and rejects unknown keys."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table")
        self.data = dict(data)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.data:
            if default is ...:
                raise ConfigError(f"{self.key(name)}: missing (required)")
            return default
        value = self.data.pop(name)
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise ConfigError(f"{self.key(name)}: expected {_kind_name(kind)}")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.key(name)}: expected {_kind_name(kind)}")
        return value

    def number(self, name: str, default: float, minimum: float = 0) -> float:
        """A number above `minimum`; TOML's `nan` and `inf` are numbers too, and refused."""
        try:
            value = float(self.take(name, (int, float), default))
        except OverflowError:  # an integer too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{self.key(name)}: must be a finite number")
        if value <= minimum:
            raise ConfigError(f"{self.key(name)}: must be greater than {minimum:g}")
        return value

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        value: int = self.take(name, int, default)
        if value < minimum:
            raise ConfigError(f"{self.key(name)}: must be at least {minimum}")
        return value

    def optional_integer(self, name: str, minimum: int = 1) -> int | None:
        return self.integer(name, 0, minimum) if name in self.data else None

    def section(self, name: str) -> Section:
        return Section(self.take(name, dict, {}), self.key(name))

    def done(self) -> None:
        if self.data:
            unknown = ", ".join(self.key(k) for k in sorted(self.data))
            raise ConfigError(f"{unknown}: unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "a table"}
    names.update({list: "an array", bool: "true or false"})
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
