"""Cell feature encoders behind `bs.tl.cell_features` (a registry).

- ``"morphology"`` (default): :class:`MorphologyEncoder`, classical nucleus shape, stain intensity,
  texture, context and density features; CPU, no weights.
- ``"timm:<name>"``: :class:`TimmEncoder`, a ``timm`` model with local weights (``weights=``).
- any ``torch.nn.Module``: wrapped in :class:`TorchEncoder` (input size 224, ImageNet mean / std), or
  a :class:`TorchEncoder` built with the module's own preprocessing.
- any object with the :class:`CellEncoder` interface.

Register your own with ``bs.encoders.ENCODERS.register("name", encoder)``.
Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._registry import Registry
from ._base import CellEncoder
from ._morphology import FEATURE_NAMES as MORPHOLOGY_FEATURES
from ._morphology import MorphologyEncoder
from ._scaler import FeatureScaler

if TYPE_CHECKING:  # pragma: no cover
    from ._torch import TimmEncoder, TorchEncoder

__all__ = [
    "ENCODERS",
    "MORPHOLOGY_FEATURES",
    "CellEncoder",
    "FeatureScaler",
    "MorphologyEncoder",
    "TimmEncoder",
    "TorchEncoder",
    "get_encoder",
]

ENCODERS: Registry[Any] = Registry("cell encoder")
ENCODERS.register("morphology", MorphologyEncoder())


def _timm_factory(name: str) -> Any:
    from ._torch import TimmEncoder

    return TimmEncoder(name)


ENCODERS.register_prefix("timm", _timm_factory)


def get_encoder(encoder: Any, *, weights: Any = None) -> CellEncoder:
    """Resolve a registered name, ``"timm:<name>"``, a ``torch.nn.Module`` or an encoder object.

    ``weights`` (a local file) is loaded into encoders that take weights (timm, torch modules).
    """
    backend = ENCODERS.get(encoder)
    if not isinstance(backend, CellEncoder) and not isinstance(encoder, str):
        import torch

        from ._torch import TorchEncoder

        if isinstance(backend, torch.nn.Module):
            backend = TorchEncoder(backend)
        else:
            raise TypeError(
                f"`encoder` must be a registered name ({', '.join(ENCODERS.names())}), a torch.nn.Module "
                f"or an object with an `encode` method; got {type(encoder).__name__}."
            )
    if weights is not None:
        if not hasattr(backend, "with_weights"):
            raise ValueError(f"Encoder {getattr(backend, 'name', backend)!r} takes no `weights=`.")
        backend = backend.with_weights(weights)
    return backend


def __getattr__(name: str) -> Any:
    if name in ("TorchEncoder", "TimmEncoder"):
        from . import _torch

        return getattr(_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
