"""Slides with cell-level truth: realistic synthetic slides and tiny toy slides.

- :func:`synthetic`: realistic H&E slides with spot / bulk expression (tutorials, benchmarks).
- :func:`toy`: tiny contract slides built in milliseconds (tests, examples, benchmarks).
"""

from __future__ import annotations

from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "synthetic": "_synthetic",
    "toy": "_toy",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
