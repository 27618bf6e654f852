"""Several encoders side by side, learned embeddings reduced by a PCA fitted on the training slides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

#: encoders whose features are few and named (never reduced by default)
_HAND_MADE = ("morphology", "context", "niche")


class CombinedEncoder:
    """The features of several encoders side by side (``encoder="morphology+context"``).

    Parameters
    ----------
    parts
        Encoders (names, ``torch.nn.Module`` or encoder objects), resolved with
        :func:`bitro_sc.encoders.get_encoder`.
    n_components
        Reduce each learned embedding (every part whose name is not ``"morphology"`` / ``"context"``,
        or the parts chosen with ``reduce``) to this many principal components. The PCA is fitted
        by ``bs.tl.cell_features`` on the slides it fits the standardisation on (the training
        slides, ``scaler=None``) and re-applied as is when a ``scaler`` is passed (new slides), so
        nothing is learned from test slides. ``None``: no reduction.
    reduce
        Which parts to reduce (one bool per part); by default the learned embeddings.

    Features are named ``<part feature name>`` (morphology, context) or ``<part>_pc<i>`` (reduced).
    """

    def __init__(
        self,
        parts: Sequence[Any],
        *,
        n_components: int | None = None,
        reduce: Sequence[bool] | None = None,
    ) -> None:
        from . import get_encoder

        if len(parts) < 1:
            raise ValueError("A CombinedEncoder needs at least one part, e.g. ['morphology', 'context'].")
        self.parts = [get_encoder(p) for p in parts]
        names = [str(getattr(p, "name", type(p).__name__)) for p in self.parts]
        if n_components is not None and int(n_components) < 1:
            raise ValueError(f"`n_components` must be a positive integer or None, got {n_components!r}.")
        self.n_components = None if n_components is None else int(n_components)
        if reduce is None:
            reduce = [n not in _HAND_MADE for n in names]
        if len(reduce) != len(self.parts):
            raise ValueError(f"`reduce` needs one bool per part ({len(self.parts)}), got {len(reduce)}.")
        self.reduce = [bool(r) and self.n_components is not None for r in reduce]
        self.name = "+".join(names)
        self.stains = next(
            (str(getattr(p, "stains", "")) for p in self.parts if getattr(p, "stains", "")), ""
        )
        self._widths: list[int] | None = None
        self._pca: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pca_cells = 0

    def __repr__(self) -> str:
        return f"CombinedEncoder({self.name!r}, n_components={self.n_components})"

    @property
    def params(self) -> dict[str, Any]:
        """Settings of the combination and of every part (JSON-serialisable)."""
        return {
            "parts": [
                {"name": str(getattr(p, "name", type(p).__name__)), "params": dict(getattr(p, "params", {}))}
                for p in self.parts
            ],
            "n_components": self.n_components,
            "reduce": list(self.reduce),
            "pca_fitted_on_cells": int(self._pca_cells),
        }

    def build(self) -> CombinedEncoder:
        """Build every part that needs building (checks weights / packages before any work)."""
        for p in self.parts:
            if hasattr(p, "build"):
                p.build()
        return self

    def encode(self, image: xr.DataArray, cells: pd.DataFrame, **kwargs: Any) -> tuple[np.ndarray, list[str]]:
        """The raw (unreduced) features of every part, side by side."""
        mats, names = [], []
        for p in self.parts:
            x, nm = p.encode(image, cells, **kwargs)
            mats.append(np.asarray(x, dtype=np.float32).reshape(len(cells), -1))
            names += list(nm)
        self._widths = [m.shape[1] for m in mats]
        return np.hstack(mats), names

    # -- reduction hooks used by bs.tl.cell_features ------------------------------------------
    def fit_reduction(self, raws: Sequence[np.ndarray]) -> None:
        """Fit the PCA of each reduced part on the rows of ``raws`` (the training slides)."""
        self._pca = {}
        self._pca_cells = 0
        if not any(self.reduce):
            return
        assert self._widths is not None, "encode() must run before fit_reduction()"
        x = np.vstack([np.asarray(r, dtype=np.float64) for r in raws])
        self._pca_cells = len(x)
        start = 0
        for i, w in enumerate(self._widths):
            if self.reduce[i]:
                block = x[:, start : start + w]
                block = block[np.isfinite(block).all(1)]
                mean = block.mean(0) if len(block) else np.zeros(w)
                k = min(int(self.n_components or w), w, max(len(block) - 1, 1))
                if len(block) > 1:
                    _, _, vt = np.linalg.svd(block - mean, full_matrices=False)
                    comps = vt[:k]
                else:
                    comps = np.eye(w)[:k]
                self._pca[i] = (mean, comps)
            start += w

    @property
    def is_fitted(self) -> bool:
        """Whether the reduction is ready to apply (always, when nothing is reduced)."""
        return not any(self.reduce) or bool(self._pca)

    def apply_reduction(self, raw: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """``raw`` with each reduced part replaced by its principal components."""
        if not any(self.reduce):
            return raw, list(names)
        if not self._pca or self._widths is None:
            raise ValueError(
                f"The PCA of {self.name!r} is not fitted: run `bs.tl.cell_features(train_slides, "
                "encoder=this_encoder)` on the training slides first (scaler=None), then re-use the same "
                "encoder object with `scaler=` on new slides."
            )
        out, out_names, start = [], [], 0
        for i, w in enumerate(self._widths):
            block = np.asarray(raw[:, start : start + w], dtype=np.float64)
            if i in self._pca:
                mean, comps = self._pca[i]
                out.append((block - mean) @ comps.T)
                part = str(getattr(self.parts[i], "name", f"part{i}")).split(":")[-1].split("/")[-1]
                out_names += [f"{part}_pc{j}" for j in range(len(comps))]
            else:
                out.append(block)
                out_names += list(names[start : start + w])
            start += w
        return np.hstack(out).astype(np.float32), out_names
