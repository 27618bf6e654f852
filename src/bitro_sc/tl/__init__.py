"""Tools: segment, describe, relate and model cells; fit, predict and evaluate."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "segment": "_segment",
    "cell_features": "_features",
    "phenotypes": "_phenotypes",
    "assign_cells": "_assign",
    "cell_graph": "_graph",
    "fit_bitro": "_fit",
    "predict_bitro": "_predict",
    "cross_validate": "_cross_validate",
    "fit_baseline": "_baseline",
    "evaluate": "_evaluate",
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
