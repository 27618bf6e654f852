"""Preprocessing: tissue masks, stain normalisation, expression normalisation."""

from __future__ import annotations

from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "tissue_mask": "_tissue",
    "normalize_stains": "_stains",
    "normalize_expression": "_expression",
    "highly_variable_genes": "_expression",
    "get_counts": "_expression",
    "sum_duplicate_genes": "_expression",
    "default_genes": "_expression",
    "MARKER_GENES": "_expression",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
