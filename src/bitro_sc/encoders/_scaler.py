"""Feature standardisation fitted once (over one or several slides) and re-applied to others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _keys as K


@dataclass
class FeatureScaler:
    """Per-feature ``(x - mean) / scale`` with statistics from the training slides.

    Fitting once and re-applying keeps slides comparable (per-slide scaling would erase real
    differences between slides). A new slide reuses the training slides' scaling with
    ``bs.tl.cell_features(new, scaler=train_sdata)`` (or ``scaler=FeatureScaler.from_any(train_sdata)``,
    or the ``uns["bitro_features"]`` dict of a training slide's cells table).

    Attributes
    ----------
    mean, scale
        Per-feature mean and standard deviation (``scale`` 1 where a feature is constant).
    feature_names
        Names of the features, in column order; checked when the scaler is applied.
    encoder
        Name of the encoder that made the features.
    stains
        How the morphology encoder read the stain intensities (``"macenko"`` or ``"fixed"``; empty
        for other encoders); checked by ``bs.tl.cell_features`` when the scaler is re-applied.
    n_cells, n_slides
        How many cells / slides the statistics were fitted on.
    """

    mean: np.ndarray
    scale: np.ndarray
    feature_names: list[str] = field(default_factory=list)
    encoder: str = ""
    n_cells: int = 0
    n_slides: int = 0
    stains: str = ""

    @classmethod
    def fit(
        cls,
        matrices: Sequence[np.ndarray],
        *,
        feature_names: Sequence[str],
        encoder: str = "",
        stains: str = "",
    ) -> FeatureScaler:
        """Pooled mean / std over the rows of all ``matrices`` (NaNs ignored), in float64."""
        d = len(feature_names)
        total = np.zeros(d)
        sq = np.zeros(d)
        count = np.zeros(d)
        for x in matrices:
            x = np.asarray(x, dtype=np.float64)
            ok = np.isfinite(x)
            total += np.where(ok, x, 0).sum(0)
            count += ok.sum(0)
        mean = total / np.maximum(count, 1)
        for x in matrices:
            x = np.asarray(x, dtype=np.float64)
            dev = np.where(np.isfinite(x), x - mean, 0)
            sq += (dev * dev).sum(0)
        std = np.sqrt(sq / np.maximum(count - 1, 1))
        std[~(std > 1e-12)] = 1.0
        n_cells = int(sum(len(x) for x in matrices))
        return cls(mean, std, list(feature_names), encoder, n_cells, len(matrices), stains)

    def transform(self, x: np.ndarray, *, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """Standardised float32 copy of ``x``; checks the features match the fitted ones."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(
                f"The scaler was fitted on {len(self.mean)} features ({self.encoder or 'unknown encoder'}), "
                f"the data have shape {x.shape}. Use the same encoder and `fov_um` as the training slides."
            )
        if feature_names is not None and self.feature_names and list(feature_names) != self.feature_names:
            raise ValueError(
                "The features differ from the ones the scaler was fitted on "
                f"({self.feature_names[:3]}… vs {list(feature_names)[:3]}…). Use the same encoder."
            )
        return ((x - self.mean) / self.scale).astype(np.float32)

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        """Raw feature values (units of the feature names) from standardised ones."""
        return np.asarray(x, dtype=np.float64) * self.scale + self.mean

    def to_dict(self) -> dict[str, Any]:
        """A dict that AnnData can store in ``uns`` (and :meth:`from_any` reads back)."""
        return {
            "mean": np.asarray(self.mean, dtype=np.float64),
            "scale": np.asarray(self.scale, dtype=np.float64),
            "n_cells": int(self.n_cells),
            "n_slides": int(self.n_slides),
        }

    @classmethod
    def from_any(cls, obj: Any, *, cells_key: str = K.CELLS, key: str = K.FEATURES_PARAMS) -> FeatureScaler:
        """A scaler from a :class:`FeatureScaler`, a features-parameter dict, an AnnData or a SpatialData.

        ``obj`` may be a training slide (SpatialData with a featurised cells table), its cells table,
        the ``uns["bitro_features"]`` dict of one, or that dict's ``"scaler"`` entry.
        """
        if isinstance(obj, FeatureScaler):
            return obj
        if hasattr(obj, "tables"):  # SpatialData
            if cells_key not in obj.tables:
                raise KeyError(f"The SpatialData given as `scaler` has no table {cells_key!r}.")
            obj = obj.tables[cells_key]
        if hasattr(obj, "uns") and hasattr(obj, "obsm"):  # AnnData
            if key not in obj.uns:
                raise KeyError(
                    f"The cells table given as `scaler` has no uns[{key!r}]; run `bs.tl.cell_features` on it."
                )
            obj = obj.uns[key]
        if not isinstance(obj, Mapping):
            raise TypeError(
                "`scaler` must be a FeatureScaler, a featurised SpatialData / cells table, or its "
                f"uns[{key!r}] dict; got {type(obj).__name__}."
            )
        names = [str(v) for v in obj.get("feature_names", [])]
        encoder = str(obj.get("encoder", ""))
        stains = obj.get("stains")
        if stains is None:  # morphology features written before per-slide stains used the fixed matrix
            stains = "fixed" if encoder == "morphology" else ""
        stats = obj.get("scaler", obj)
        if not isinstance(stats, Mapping) or "mean" not in stats or "scale" not in stats:
            raise ValueError("The `scaler` dict has no 'mean' and 'scale' statistics.")
        return cls(
            mean=np.asarray(stats["mean"], dtype=np.float64),
            scale=np.asarray(stats["scale"], dtype=np.float64),
            feature_names=names,
            encoder=encoder,
            n_cells=int(stats.get("n_cells", 0)),
            n_slides=int(stats.get("n_slides", 0)),
            stains=str(stains),
        )
