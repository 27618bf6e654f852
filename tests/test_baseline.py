from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import metrics
from bitro_sc.models import BaselineModel
from bitro_sc.models._baseline import spot_features

N_TYPES, N_FEAT, N_GENES = 3, 6, 25


def toy_slide(seed: int, **options):
    """``bs.datasets.toy("mixture")`` and its truth: spots of 0-8 cells of 3 types (features reveal it)."""
    return bs.datasets.toy("mixture", seed=seed, return_truth=True, **options)


def _measured_log(sdata, genes):
    from bitro_sc.pp import normalize_expression

    t = sdata.tables[K.TABLE]
    lib = np.asarray(t.X.sum(axis=1)).ravel()
    return normalize_expression(t[:, genes].X, library_size=lib)


def test_spot_features_average_cells_and_count_them():
    sdata, _ = toy_slide(0, n_spots=10)
    feats, n = spot_features(sdata)
    cells = sdata.tables[K.CELLS]
    sid = cells.obs[K.SPOT_ID].to_numpy()
    for s in (3, 7):
        members = sid == s
        assert n[s] == members.sum()
        np.testing.assert_allclose(feats[s], cells.obsm[K.FEATURES][members].mean(axis=0), rtol=1e-6)
    assert n[:3].sum() == 0
    assert np.isnan(feats[:3]).all()


def test_ridge_predicts_held_out_slide_and_beats_the_mean():
    train = [toy_slide(s)[0] for s in (1, 2, 3)]
    test, _ = toy_slide(4)
    genes = [f"G{j}" for j in range(N_GENES)]
    ridge = bs.tl.fit_baseline(train, method="ridge", genes=genes)
    mean = bs.tl.fit_baseline(train, method="mean", genes=genes)
    assert isinstance(ridge, BaselineModel)
    assert ridge.record["alpha"] in ridge.record["alpha_selection"]["alphas"]
    assert ridge.record["alpha_selection"]["cv"].startswith("GroupKFold(3)")
    pred = ridge.predict_frame(test, level="spot")
    assert list(pred.columns) == genes
    assert list(pred.index) == list(test.tables[K.TABLE].obs_names)
    has_cells = spot_features(test)[1] > 0
    assert (pred.to_numpy()[has_cells] >= 0).all()
    assert np.isnan(pred.to_numpy()[~has_cells]).all()  # no cell, no prediction (as BiTro)
    y = _measured_log(test, genes)[has_cells]
    r = metrics.pearson(y, np.log1p(pred.to_numpy()[has_cells]))
    assert np.nanmedian(r) > 0.6
    mean_pred = mean.predict_frame(test, level="spot").to_numpy()
    assert np.isnan(metrics.pearson(y, np.log1p(mean_pred[has_cells]))).all()  # constant prediction
    # the mean profile is the training average on the counts-per-10k scale
    ytrain = np.vstack([np.expm1(_measured_log(s, genes)[spot_features(s)[1] > 0]) for s in train])
    np.testing.assert_allclose(mean_pred[has_cells][0], ytrain.mean(axis=0), rtol=1e-5)


def test_default_genes_are_training_hvgs_and_recorded():
    train = [toy_slide(s)[0] for s in (1, 2)]
    model = bs.tl.fit_baseline(train, method="ridge", n_top_genes=10, alpha=10.0)
    assert len(model.genes) == 10
    assert set(model.genes) <= set(model.record["hvgs"])
    assert model.record["alpha"] == 10.0
    assert model.record["method"] == "ridge"


def test_cell_level_predictions_sum_to_spot_and_follow_cell_truth():
    train = [toy_slide(s)[0] for s in (1, 2, 3)]
    test, truth = toy_slide(5)
    genes = [f"G{j}" for j in range(N_GENES)]
    model = bs.tl.fit_baseline(train, method="ridge", genes=genes)
    cells = model.predict_frame(test, level="cell")
    spots = model.predict_frame(test, level="spot")
    cell_spot = test.tables[K.CELLS].obs[K.SPOT_ID].to_numpy()
    summed = cells[~np.isnan(cell_spot)].groupby(cell_spot[~np.isnan(cell_spot)].astype(int)).sum()
    np.testing.assert_allclose(summed.to_numpy(), spots.to_numpy()[summed.index], rtol=1e-6)
    assert np.isfinite(cells.to_numpy()).all()
    r = metrics.pearson(np.log1p(truth.X), np.log1p(cells.to_numpy()))
    assert np.nanmedian(r) > 0.4  # cell types are visible in the features


def test_bulk_baseline_learns_across_slides():
    slides = []
    for s in range(8):
        sd, _ = toy_slide(10 + s, n_spots=30)
        t = sd.tables[K.TABLE]
        bulk = ad.AnnData(
            np.asarray(t.X.sum(axis=0)),
            obs=pd.DataFrame({K.SAMPLE_ID: [f"S{10 + s}"]}, index=[f"S{10 + s}"]),
            var=t.var.copy(),
        )
        sd.tables[K.BULK] = bulk
        slides.append(sd)
    genes = [f"G{j}" for j in range(N_GENES)]
    model = bs.tl.fit_baseline(slides[:6], method="ridge", level="bulk", genes=genes)
    assert model.record["level"] == "bulk"
    assert model.record["n_train_observations"] == 6
    frame = model.predict_frame(slides[6], level="bulk")
    assert list(frame.index) == ["S16"]
    assert frame.shape == (1, N_GENES)
    cells = model.predict_frame(slides[6], level="cell")
    np.testing.assert_allclose(cells.sum(axis=0).to_numpy(), frame.to_numpy()[0], rtol=1e-6)


def test_bad_input_errors_name_the_fix():
    train = [toy_slide(1)[0]]
    with pytest.raises(ValueError, match=r"not in the training table.*NOPE"):
        bs.tl.fit_baseline(train, genes=["G1", "NOPE"])
    with pytest.raises(ValueError, match="`method` must be one of"):
        bs.tl.fit_baseline(train, method="lasso")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 3 training slides"):
        bs.tl.fit_baseline(train, level="bulk")
    no_cells, _ = toy_slide(2)
    del no_cells.tables[K.CELLS].obsm[K.FEATURES]
    with pytest.raises(KeyError, match="cell_features"):
        bs.tl.fit_baseline([no_cells], genes=["G1"])
    empty, _ = toy_slide(3)
    empty.tables[K.CELLS].obs[K.SPOT_ID] = np.nan
    with pytest.raises(ValueError, match="No spot of the training slides contains a cell"):
        bs.tl.fit_baseline([empty], genes=["G1"])
    model = bs.tl.fit_baseline([toy_slide(4)[0]], genes=["G1"], alpha=1.0)
    other, _ = toy_slide(5)
    other.tables[K.CELLS].obsm[K.FEATURES] = np.zeros((other.tables[K.CELLS].n_obs, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="3 features but the baseline was fitted on 6"):
        model.predict_frame(other)


def test_predict_bitro_writes_the_baseline_layer_and_record():
    train = [toy_slide(s)[0] for s in (1, 2)]
    test, _ = toy_slide(6)
    model = bs.tl.fit_baseline(train, method="ridge", n_top_genes=8)
    bs.tl.predict_bitro(test, model, level="spot")
    table = test.tables[K.TABLE]
    layer = table.layers[K.PREDICTION]
    layer = layer.toarray() if sparse.issparse(layer) else np.asarray(layer)
    cols = table.var_names.get_indexer(model.genes)
    np.testing.assert_allclose(layer[:, cols], model.predict_frame(test).to_numpy(), rtol=1e-5)
    assert list(table.uns[K.RUN]["hvgs"]) == model.record["hvgs"]


def test_cell_level_on_a_slide_without_spots_uses_each_cells_own_features():
    train = [toy_slide(s)[0] for s in (1, 2)]
    model = bs.tl.fit_baseline(train, method="ridge", genes=["G1", "G2"], alpha=1.0)
    wsi, _ = toy_slide(8)
    del wsi.tables[K.TABLE]
    cells = model.predict_frame(wsi, level="cell")
    feats = wsi.tables[K.CELLS].obsm[K.FEATURES].astype(float)
    expected = (
        model._predict_profile(feats, np.full(len(feats), model.typical_n_cells)) / model.typical_n_cells
    )
    np.testing.assert_allclose(cells.to_numpy(), expected, rtol=1e-10)
    assert cells.shape == (wsi.tables[K.CELLS].n_obs, 2)


def test_ridge_reads_features_under_a_custom_key_and_predicts_with_it():
    train = [toy_slide(s)[0] for s in (1, 2)]
    test, _ = toy_slide(6)
    plain = bs.tl.fit_baseline(train, method="ridge", genes=["G1", "G2"], alpha=1.0)
    expected = plain.predict_frame(test, level="spot")
    for s in [*train, test]:
        cells = s.tables[K.CELLS]
        cells.obsm["X_uni"] = cells.obsm.pop(K.FEATURES)
    model = bs.tl.fit_baseline(train, method="ridge", genes=["G1", "G2"], alpha=1.0, features_key="X_uni")
    assert model.record["keys"]["features_key"] == "X_uni"
    pd.testing.assert_frame_equal(model.predict_frame(test, level="spot"), expected)
    bs.tl.predict_bitro(test, model)  # the recorded key, without naming it
    table = test.tables[K.TABLE]
    np.testing.assert_allclose(table[:, ["G1", "G2"]].layers[K.PREDICTION], expected.to_numpy(), rtol=1e-6)
