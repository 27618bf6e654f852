"""The niche encoder: a cell's features plus their mean over the cells in a window around it."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.encoders import MORPHOLOGY_FEATURES, NicheEncoder
from bitro_sc.encoders._niche import neighbourhood_means


class _Column:
    """A fake per-cell encoder: one feature, the value given per cell (NaN allowed)."""

    name = "col"
    params: ClassVar[dict[str, int]] = {}

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def encode(self, image, cells, **kw):
        return self.values[:, None].astype(np.float32), ["v"]


def _cells(x_um: np.ndarray, y_um: np.ndarray, mpp: float) -> pd.DataFrame:
    return pd.DataFrame({K.X_PX: x_um / mpp, K.Y_PX: y_um / mpp})


def test_window_means_are_brute_force_means_over_the_square():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 400, 300), rng.uniform(0, 300, 300)
    v = rng.normal(size=(300, 2))
    v[::7, 1] = np.nan
    got = neighbourhood_means(x, y, v, 100.0)
    # grid binning: a cell whose centroid is within 50 µm ± one 4 µm grid cell may differ; check the
    # cells whose window border has no centroid within 4 µm of it on the inside or outside
    for i in range(300):
        dx, dy = np.abs(x - x[i]), np.abs(y - y[i])
        inside, outside = (dx < 46) & (dy < 46), (dx > 54) | (dy > 54)
        if not (inside | outside).all():
            continue
        for j in range(2):
            ok = inside & np.isfinite(v[:, j])
            assert got[i, j] == pytest.approx(v[ok, j].mean(), rel=1e-5)


def test_niche_sees_the_neighbourhood_not_only_the_cell():
    """Cells valued 1 on the left, 0 on the right: the window mean falls across the border."""
    x = np.repeat(np.arange(0, 400, 10.0), 10)
    y = np.tile(np.arange(0, 100, 10.0), 40)
    vals = (x < 200).astype(np.float64)
    mpp = 0.5
    enc = NicheEncoder(base=_Column(vals), scales_um=(100.0,))
    feats, names = enc.encode(None, _cells(x, y, mpp), mpp=mpp, fov_um=48.0, progress=False)
    assert names == ["v", "nbr100_v"]
    np.testing.assert_array_equal(feats[:, 0], vals)
    nbr = feats[:, 1]
    assert nbr[x < 140].min() == 1.0
    assert nbr[x > 260].max() == 0.0
    near = (x >= 160) & (x <= 230)
    assert ((nbr[near] > 0) & (nbr[near] < 1)).all()  # cells by the border see both sides
    assert np.all(np.diff(nbr[y == 50]) <= 0)  # monotone across the border
    only = NicheEncoder(base=_Column(vals), scales_um=(100.0, 300.0), include_base=False)
    f2, n2 = only.encode(None, _cells(x, y, mpp), mpp=mpp, fov_um=48.0, progress=False)
    assert n2 == ["nbr100_v", "nbr300_v"]
    np.testing.assert_allclose(f2[:, 0], nbr)


def test_niche_through_cell_features_starts_with_the_morphology():
    s = bs.datasets.toy("nuclei", seed=0, size_px=240, labels=False)
    bs.tl.cell_features(s, encoder="niche", progress=False)
    p = s.tables[K.CELLS].uns[K.FEATURES_PARAMS]
    names = list(p["feature_names"])
    assert names == list(MORPHOLOGY_FEATURES) + [f"nbr300_{n}" for n in MORPHOLOGY_FEATURES]
    assert p["encoder"] == "niche"
    assert p["stains"] == "macenko"
    ref = bs.datasets.toy("nuclei", seed=0, size_px=240, labels=False)
    bs.tl.cell_features(ref, encoder="morphology", progress=False)
    x, r = s.tables[K.CELLS].obsm[K.FEATURES], ref.tables[K.CELLS].obsm[K.FEATURES]
    np.testing.assert_allclose(x[:, : len(MORPHOLOGY_FEATURES)], r, rtol=1e-5, atol=1e-5)
    assert np.isfinite(x).all()
    json.dumps(bs.encoders.get_encoder("niche").params)
    with pytest.raises(ValueError, match="scales_um"):
        NicheEncoder(scales_um=(0.0,))
