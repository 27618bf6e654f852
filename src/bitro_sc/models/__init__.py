"""The BiTro model: nn.Module, bags (cells → PyG batches), training loop, LoRA policies, checkpoints.

Public names load lazily (``import bitro_sc.models`` does not import torch):

- :class:`BiTroModel` — a fitted model (``save`` / ``load``, ``predict_frame``);
- :class:`ModelParams`, :class:`TrainParams` — architecture and training knobs;
- :class:`ExpressionModel` — the protocol ``bs.tl.predict_bitro`` accepts (BiTro, baselines).
"""

from __future__ import annotations

from .._lazy import attach

_EXPORTS = {
    "BiTroModel": "_model",
    "ModelParams": "_params",
    "TrainParams": "_params",
    "ExpressionModel": "_protocol",
    "BiTroNet": "_net",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
