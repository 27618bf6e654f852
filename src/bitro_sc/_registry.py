"""A small registry of named backends (segmenters, encoders, ...) behind one public function."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named backends of one kind.

    ``get`` accepts a registered name, a ``"prefix:<argument>"`` name whose prefix was registered
    with :meth:`register_prefix` (e.g. ``"timm:vit_small_patch16_224"``), or an object that is
    already a backend (returned as is), so that a user's callable works wherever a name does.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._prefixes: dict[str, Callable[[str], T]] = {}

    def register(self, name: str, backend: T, *, overwrite: bool = False) -> T:
        if name in self._items and not overwrite:
            raise ValueError(f"A {self.kind} named {name!r} is already registered; pass `overwrite=True`.")
        self._items[name] = backend
        return backend

    def register_prefix(self, prefix: str, factory: Callable[[str], T]) -> None:
        """Register a factory for names of the form ``"<prefix>:<argument>"``."""
        self._prefixes[prefix] = factory

    def names(self) -> list[str]:
        return sorted(self._items) + [f"{p}:<name>" for p in sorted(self._prefixes)]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def get(self, name_or_backend: str | T) -> T:
        if not isinstance(name_or_backend, str):
            return name_or_backend
        name = name_or_backend
        if name in self._items:
            return self._items[name]
        prefix, sep, arg = name.partition(":")
        if sep and prefix in self._prefixes:
            return self._prefixes[prefix](arg)
        raise ValueError(
            f"Unknown {self.kind} {name!r}. Registered: {', '.join(self.names()) or 'none'}; "
            f"or pass a callable / object that implements the {self.kind} interface."
        )
