"""Lazy public names for subpackages (fast ``import bitro_sc``, as in spatialdata and scikit-image)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def attach(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose public names live in submodules.

    ``exports`` maps a public name to the (relative, private) submodule that defines it; the submodule
    is imported on first access and the value cached on the package.

    Examples
    --------
    >>> getattr_, dir_, all_ = attach("bitro_sc.tl", {"segment": "_segment"})
    >>> all_
    ['segment']
    >>> getattr_("segment").__name__
    'segment'
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, list(exports)
