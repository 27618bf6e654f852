"""Tools: segment, describe, relate and model cells; fit, predict and evaluate."""

from __future__ import annotations

from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "segment": "_segment",
    "cell_features": "_features",
    "train_encoder": "_train_encoder",
    "phenotypes": "_phenotypes",
    "assign_cells": "_assign",
    "cell_graph": "_graph",
    "fit_bitro": "_fit",
    "predict_bitro": "_predict",
    "cross_validate": "_cross_validate",
    "holdout": "_holdout",
    "Holdout": "_holdout",
    "prediction_table": "_holdout",
    "fit_baseline": "_baseline",
    "evaluate": "_evaluate",
    "run_batch": "_batch",
    "SlideJob": "_batch",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
