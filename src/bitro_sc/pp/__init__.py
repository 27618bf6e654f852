"""Preprocessing: tissue masks, stain normalisation, expression normalisation."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "tissue_mask": "_tissue",
    "normalize_stains": "_stains",
    "normalize_expression": "_expression",
    "highly_variable_genes": "_expression",
    "get_counts": "_expression",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
