"""Plots: every result one call away from a picture."""

from __future__ import annotations

from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "expression": "_expression",
    "cells": "_cells",
    "gene_correlation": "_gene_correlation",
    "history": "_history",
    "holdout": "_holdout",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
