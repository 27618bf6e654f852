"""bitro_sc: predict gene expression from H&E histology per spot, per slide and per cell.

Submodules load on first attribute access, so ``import bitro_sc`` stays fast and does not
import torch, torch_geometric or spatialdata until they are needed.

>>> import bitro_sc as bs
>>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
>>> sorted(sdata.tables)
[...'table'...]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

from ._settings import init_process as _init_process
from ._settings import settings

_init_process()

_SUBMODULES = ("io", "pp", "tl", "pl", "datasets", "metrics", "models", "segmentation", "encoders")
#: slide metadata helpers, public at the top level (defined in ``bitro_sc._sdata``)
_FUNCTIONS = ("get_mpp", "set_mpp", "slide_info", "set_slide_info")

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, encoders, io, metrics, models, pl, pp, segmentation, tl

__all__ = [*_SUBMODULES, *_FUNCTIONS, "settings", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _FUNCTIONS:
        return getattr(importlib.import_module("._sdata", __name__), name)
    raise AttributeError(f"module 'bitro_sc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
