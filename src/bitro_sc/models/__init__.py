"""The BiTro model: nn.Module, bags (cells → PyG batches), training loop, LoRA policies, checkpoints.

Public names load lazily (``import bitro_sc.models`` does not import torch):

- :class:`BiTroModel` — a fitted model (``save`` / ``load``, ``predict_frame``);
- :class:`ModelParams`, :class:`TrainParams` — architecture and training knobs;
- :class:`ExpressionModel` — the protocol ``bs.tl.predict_bitro`` accepts (BiTro, baselines).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BiTroModel": "_model",
    "ModelParams": "_params",
    "TrainParams": "_params",
    "ExpressionModel": "_protocol",
    "BiTroNet": "_net",
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
