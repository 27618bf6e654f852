"""Cell feature encoders behind `bs.tl.cell_features` (a registry).

- ``"morphology"`` (default): :class:`MorphologyEncoder`, classical nucleus shape, stain intensity,
  texture, context and density features; CPU, no weights.
- ``"niche"``: :class:`NicheEncoder`, the morphology features of each cell followed by their mean
  over the cells in the 300 µm square around it (the tissue at the scale of a spot).
- ``"context"``: :class:`ContextEncoder`, each cell's tissue neighbourhood at the scale of a spot
  (colour / stain statistics, texture, cell density over 64 and 160 µm windows); CPU, no weights.
- ``"a+b"`` (e.g. ``"morphology+context"``): :class:`CombinedEncoder`, features side by side.
- ``"timm:<name>"``: :class:`TimmEncoder`, a ``timm`` model with local weights (``weights=``).
- ``"hf:<org>/<repo>"`` (or ``"hf-hub:"``, or ``"hf:<local folder>"``): :class:`HFEncoder`, a
  Hugging Face ``transformers`` vision model from the local cache or a folder (never downloaded).
- a path to an encoder saved by :func:`bitro_sc.tl.train_encoder` (``.pt``), or the returned object.
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
from ._combined import CombinedEncoder
from ._context import ContextEncoder
from ._morphology import FEATURE_NAMES as MORPHOLOGY_FEATURES
from ._morphology import MorphologyEncoder
from ._niche import NicheEncoder
from ._scaler import FeatureScaler

if TYPE_CHECKING:  # pragma: no cover
    from ._hf import HFEncoder
    from ._learned import LearnedEncoder, load_encoder
    from ._torch import TimmEncoder, TorchEncoder

__all__ = [
    "ENCODERS",
    "MORPHOLOGY_FEATURES",
    "CellEncoder",
    "CombinedEncoder",
    "ContextEncoder",
    "FeatureScaler",
    "HFEncoder",
    "LearnedEncoder",
    "MorphologyEncoder",
    "NicheEncoder",
    "TimmEncoder",
    "TorchEncoder",
    "get_encoder",
    "load_encoder",
]

ENCODERS: Registry[Any] = Registry("cell encoder")
ENCODERS.register("morphology", MorphologyEncoder())
ENCODERS.register("context", ContextEncoder())


def _timm_factory(name: str) -> Any:
    from ._torch import TimmEncoder

    return TimmEncoder(name)


def _hf_factory(name: str) -> Any:
    from ._hf import HFEncoder

    return HFEncoder(name)


ENCODERS.register_prefix("timm", _timm_factory)
ENCODERS.register_prefix("hf", _hf_factory)
ENCODERS.register_prefix("hf-hub", _hf_factory)


def get_encoder(encoder: Any, *, weights: Any = None) -> CellEncoder:
    """Resolve a registered name, ``"timm:<name>"``, a ``torch.nn.Module`` or an encoder object.

    ``weights`` (a local file) is loaded into encoders that take weights (timm, torch modules).
    ``"a+b"`` combines registered encoders side by side (:class:`CombinedEncoder`).
    """
    if isinstance(encoder, str) and "+" in encoder and not encoder.startswith(("hf:", "hf-hub:", "timm:")):
        if weights is not None:
            raise ValueError("`weights=` is ambiguous for a combination; build each part with its weights.")
        return CombinedEncoder(encoder.split("+"))
    if isinstance(encoder, str) and encoder.endswith(".pt") and ":" not in encoder.split("/")[0]:
        from ._learned import load_encoder

        return load_encoder(encoder)
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


ENCODERS.register("niche", NicheEncoder())


def __getattr__(name: str) -> Any:
    if name in ("TorchEncoder", "TimmEncoder"):
        from . import _torch

        return getattr(_torch, name)
    if name in ("LearnedEncoder", "load_encoder"):
        from . import _learned

        return getattr(_learned, name)
    if name == "HFEncoder":
        from . import _hf

        return _hf.HFEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
