"""The tissue-context encoder and combined encoders (PCA fitted on the training slides only)."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.encoders import MORPHOLOGY_FEATURES, CombinedEncoder, ContextEncoder, FeatureScaler
from bitro_sc.encoders._context import feature_names


def _raw(sdata) -> pd.DataFrame:
    t = sdata.tables[K.CELLS]
    p = t.uns[K.FEATURES_PARAMS]
    raw = t.obsm[K.FEATURES] * p["scaler"]["scale"] + p["scaler"]["mean"]
    return pd.DataFrame(raw, columns=list(p["feature_names"]), index=t.obs_names)


@pytest.fixture(scope="module")
def toy():
    return bs.datasets.toy("nuclei", seed=0, size_px=240, labels=False)


def test_context_features_are_named_finite_and_physical(toy):
    enc = ContextEncoder(scales_um=(40.0,))
    obs = toy.tables[K.CELLS].obs
    x, names = enc.encode(toy.images[K.IMAGE], obs, mpp=0.5, progress=False)
    assert names == feature_names((40.0,))
    assert x.shape == (len(obs), len(names))
    raw = pd.DataFrame(x, columns=names)
    assert np.isfinite(x).all()
    # cells on a 14 µm grid: ≈ 1e6 / 14² per mm² for a window well inside the slide
    inner = (obs[K.X_UM].between(40, 80) & obs[K.Y_UM].between(40, 80)).to_numpy()
    assert inner.sum() >= 4
    assert np.median(raw.loc[inner, "ctx40_density_per_mm2"]) == pytest.approx(1e6 / 14**2, rel=0.2)
    assert raw["ctx40_tissue_frac"].between(0, 1).all()
    assert raw["ctx40_hema_frac"].between(0, 1).all()
    # the nucleus area statistics of the window are those of the table
    area = obs[K.AREA_UM2].to_numpy()
    assert raw["ctx40_nuc_area_mean_um2"].between(area.min(), area.max()).all()
    json.dumps(enc.params)


def test_context_sees_the_neighbourhood_not_the_cell():
    """Dark-stained tissue on the left half only: a cell's context differs with its neighbourhood."""
    slide = bs.datasets.toy("nuclei", seed=1, size_px=240, labels=False)
    img = slide.images[K.IMAGE]
    arr = np.asarray(img.data).copy()
    arr[:, :, :120] = (arr[:, :, :120] * 0.6).astype(arr.dtype)  # darker left half
    img.data = arr
    obs = slide.tables[K.CELLS].obs
    x, names = ContextEncoder(scales_um=(30.0,), stains="fixed").encode(img, obs, mpp=0.5, progress=False)
    od = pd.Series(x[:, names.index("ctx30_od_mean")])
    left = (obs[K.X_PX] < 90).to_numpy()
    right = (obs[K.X_PX] > 150).to_numpy()
    assert od[left].min() > od[right].max()


def test_tile_size_does_not_change_context_features(toy):
    obs = toy.tables[K.CELLS].obs
    img = toy.images[K.IMAGE]
    a, _ = ContextEncoder(tile_um=2048.0).encode(img, obs, mpp=0.5, progress=False)
    b, _ = ContextEncoder(tile_um=40.0).encode(img, obs, mpp=0.5, progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_morphology_plus_context_side_by_side(toy):
    s = bs.datasets.toy("nuclei", seed=0, size_px=240, labels=False)
    bs.tl.cell_features(s, encoder="morphology+context", progress=False)
    p = s.tables[K.CELLS].uns[K.FEATURES_PARAMS]
    names = list(p["feature_names"])
    assert names == list(MORPHOLOGY_FEATURES) + feature_names(ContextEncoder().scales_um)
    assert p["encoder"] == "morphology+context"
    ref = bs.datasets.toy("nuclei", seed=0, size_px=240, labels=False)
    bs.tl.cell_features(ref, encoder="morphology", progress=False)
    np.testing.assert_allclose(
        _raw(s)[list(MORPHOLOGY_FEATURES)].to_numpy(), _raw(ref).to_numpy(), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match="Unknown cell encoder 'nope'"):
        bs.tl.cell_features(s, encoder="morphology+nope", overwrite=True, progress=False)


class _Embedding:
    """A fake learned encoder: a fixed random projection of (x, y) plus noise dimensions."""

    name = "emb"
    params: ClassVar[dict[str, int]] = {"dim": 10}

    def encode(self, image, cells, **kw):
        rng = np.random.default_rng(0)
        xy = cells[[K.X_UM, K.Y_UM]].to_numpy()
        return xy @ rng.normal(size=(2, 10)) + 0.01 * rng.normal(size=(len(cells), 10)), [
            f"emb_{i}" for i in range(10)
        ]


def test_pca_of_the_embedding_is_fitted_on_training_slides_only():
    train = [bs.datasets.toy("nuclei", seed=i, size_px=200, labels=False) for i in (2, 3)]
    test = bs.datasets.toy("nuclei", seed=4, size_px=200, labels=False)
    enc = CombinedEncoder(["morphology", _Embedding()], n_components=2)
    assert enc.reduce == [False, True]
    with pytest.raises(ValueError, match="has not been fitted"):
        bs.tl.cell_features(
            test, encoder=enc, scaler=FeatureScaler(np.zeros(1), np.ones(1), ["a"]), progress=False
        )
    bs.tl.cell_features(train, encoder=enc, progress=False)
    names = list(train[0].tables[K.CELLS].uns[K.FEATURES_PARAMS]["feature_names"])
    assert names == [*MORPHOLOGY_FEATURES, "emb_pc0", "emb_pc1"]
    mean, comps = enc._pca[1]
    assert enc.params["pca_fitted_on_cells"] == sum(s.tables[K.CELLS].n_obs for s in train)
    bs.tl.cell_features(test, encoder=enc, scaler=train[0], progress=False)
    # the held-out slide is projected with the training PCA: nothing is refitted
    np.testing.assert_array_equal(enc._pca[1][1], comps)
    emb, _ = _Embedding().encode(None, test.tables[K.CELLS].obs)
    expected = (emb - mean) @ comps.T
    np.testing.assert_allclose(_raw(test)[["emb_pc0", "emb_pc1"]].to_numpy(), expected, rtol=1e-4, atol=1e-4)
    json.dumps(enc.params)
