"""Name → object tables filled by the registration hooks, with attribution to the plugin that registered."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, Iterator, List, TypeVar
from .errors import HfquantError

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

T = TypeVar("T")


class PluginError(HfquantError, RuntimeError):
    """A plugin misbehaved (bad name, duplicate name, unknown hook) — the message names the plugin."""


class UnknownNameError(KeyError):
    """A name nobody registered; the message lists the registered names and the closest match."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def unknown_name_message(kind: str, name: str, names) -> str:
    """`unknown scheme 'w4'; registered: ... Did you mean 'w4a16'?` — for a registry, or a config group it fills."""
    names = sorted(names)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}; registered: {', '.join(names) or '(none)'}.{hint}"


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    plugin: str


class Registry(Generic[T]):
    """One kind of registered object (observers, schemes, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Entry[T]] = {}

    def register_for(self, plugin: str) -> Callable[[str, T], None]:
        """The `register(name, obj)` callback handed to one plugin's hook implementation."""

        def register(name: str, obj: T) -> None:
            self.add(name, obj, plugin)

        return register

    def add(self, name: str, obj: T, plugin: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginError(
                f"plugin {plugin!r} registered {self.kind[:-1]} name {name!r}; names must be "
                "lower-case-hyphenated, e.g. 'my-observer'"
            )
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"{self.kind[:-1]} {name!r} is registered by both plugin {other!r} and plugin {plugin!r}; "
                f"uninstall one of them or restrict loading with HFQUANT_LOAD_PLUGINS"
            )
        self._entries[name] = Entry(name, obj, plugin)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind[:-1], name, self._entries)) from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def by_plugin(self, plugin: str) -> List[str]:
        return sorted(n for n, e in self._entries.items() if e.plugin == plugin)

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
