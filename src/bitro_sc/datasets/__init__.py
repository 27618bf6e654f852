"""Synthetic slides with cell-level truth."""

from __future__ import annotations

from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "synthetic": "_synthetic",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
