"""Registries by name: criteria, composites, quantizers and codecs are objects registered here under their name.

Plan validation, CLI choices, the app's option lists, labels and colours all read a :class:`Registry`; adding a
criterion (or a composite, quantizer, codec) is one registered class in one file. Third-party packages add theirs
through the ``xaicomp.plugins`` entry-point group: each entry point names a module (or a callable) that registers
its objects when loaded (see ``docs/ARCHITECTURE.md`` and ``examples/plugin``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from xaicomp_core.errors import XaicompError

T = TypeVar("T")

PLUGIN_GROUP = "xaicomp.plugins"


class Registry(Generic[T]):
    """Objects of one kind by name, in registration order.

    Parameters
    ----------
    kind : str
        What the objects are ("criterion", "composite", ...), used in messages.
    error : type
        Exception raised for an unknown name (a :class:`~xaicomp_core.errors.XaicompError` subclass).
    """

    def __init__(self, kind: str, error: type[XaicompError] = XaicompError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, obj: T, *, replace: bool = False) -> T:
        """Add ``obj`` under ``obj.name``; a second object with the same name needs ``replace=True``."""
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name or name != name.strip() or " " in name:
            raise XaicompError(f"a {self.kind} needs a non-empty name without spaces, got {name!r}")
        if name in self._items and not replace and self._items[name] is not obj:
            raise XaicompError(f"a {self.kind} named {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; raises ``error`` naming the choices otherwise."""
        load_plugins()
        if not isinstance(name, str) or name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, in registration order (plugins included)."""
        load_plugins()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs in registration order."""
        load_plugins()
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plugins that replace an entry)."""
        self._items.pop(name, None)


_plugins_lock = threading.Lock()
_plugins_loaded = False
PLUGIN_ERRORS: list[str] = []


def load_plugins(force: bool = False) -> list[str]:
    """Import every ``xaicomp.plugins`` entry point once (each registers its objects on import or when called).

    A plugin that fails to load is reported in :data:`PLUGIN_ERRORS` (``xaicomp info`` shows it) instead of
    breaking the tool. Returns the names of the entry points loaded by this call.
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return []
    with _plugins_lock:
        if _plugins_loaded and not force:
            return []
        _plugins_loaded = True
        from importlib.metadata import entry_points

        loaded = []
        for ep in entry_points(group=PLUGIN_GROUP):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type):
                    obj()
                loaded.append(ep.name)
            except Exception as e:  # a broken plugin must not break the tool
                PLUGIN_ERRORS.append(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}")
        return loaded


def decorator(registry: Registry[T]) -> Callable[..., object]:
    """``@register_x`` for ``registry``: use on a class (an instance is registered) or call with an instance."""

    def register(obj=None, *, replace: bool = False):
        def add(o):
            inst = o() if isinstance(o, type) else o
            registry.register(inst, replace=replace)
            return o

        return add if obj is None else add(obj)

    return register


class RegistryView(Mapping):
    """A read-only, always current mapping over a registry: name -> ``value(obj)`` (e.g. its description).

    Lets code that reads ``COMPOSITES[name]`` or iterates ``CRITERIA`` see plugins registered later.
    """

    def __init__(self, registry: Registry, value: Callable[[object], object]) -> None:
        self._registry = registry
        self._value = value

    def __getitem__(self, name: str):
        if name not in self._registry:
            raise KeyError(name)
        return self._value(self._registry.get(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __len__(self) -> int:
        return len(self._registry.names())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"
