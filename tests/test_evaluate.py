from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats
from spatialdata import SpatialData

import bitro_sc as bs
from bitro_sc import _keys as K


def _table(seed: int = 0, n: int = 50, g: int = 12, *, noise: float = 0.5) -> ad.AnnData:
    """Counts + a noisy counts-per-10k prediction in layers['bitro'] (gene G0 never detected)."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(1.0, 5.0, size=(n, g))
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 0] = 0
    cp10k = counts / counts.sum(axis=1, keepdims=True) * 1e4
    pred = np.expm1(np.log1p(cp10k) + rng.normal(scale=noise, size=cp10k.shape)).clip(0)
    t = ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame({K.SAMPLE_ID: [f"S{i}" for i in range(n)]}, index=[f"o{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(g)]),
    )
    t.layers[K.PREDICTION] = pred.astype(np.float32)
    return t


def _log_measured(t: ad.AnnData) -> np.ndarray:
    x = t.X.toarray()
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def test_per_gene_values_match_scipy_on_log1p_cp10k():
    t = _table()
    df = bs.tl.evaluate(t, top_hvg=None)
    y, p = _log_measured(t), np.log1p(t.layers[K.PREDICTION])
    for j in (1, 5, 11):
        assert df["pearson"].iloc[j] == pytest.approx(stats.pearsonr(y[:, j], p[:, j]).statistic, rel=1e-5)
        assert df["spearman"].iloc[j] == pytest.approx(stats.spearmanr(y[:, j], p[:, j]).statistic, rel=1e-5)
    assert np.isnan(df.loc["G0", "pearson"])  # never detected: undefined, not 0
    assert df.attrs["n_nan"] == 1
    assert df.attrs["n_genes"] == 12
    assert df.attrs["mean_pearson"] == pytest.approx(df["pearson"].iloc[1:].mean())
    assert (df["n"] == 50).all()


def test_perfect_prediction_scores_one():
    t = _table(noise=0.0)
    df = bs.tl.evaluate(t, top_hvg=None)
    np.testing.assert_allclose(df["pearson"].iloc[1:], 1.0, atol=1e-5)


def test_top_hvg_uses_the_training_record_not_the_test_slide():
    t = _table()
    t.uns[K.RUN] = {"genes": [f"G{j}" for j in range(12)], "hvgs": ["G7", "G3", "G9", "G1"]}
    df = bs.tl.evaluate(t, top_hvg=3)
    assert list(df.index) == ["G7", "G3", "G9"]
    assert df.attrs["hest_score"] == pytest.approx(df["pearson"].mean())
    assert df.attrs["n_hvg"] == 3
    assert df["is_hvg"].all()
    assert t.uns[K.RUN]["metrics"]["hest_score"] == pytest.approx(df.attrs["hest_score"])
    # with explicit genes, the HVG flag and score still come from the record
    df2 = bs.tl.evaluate(t, genes=["G1", "G3", "G5"], top_hvg=3)
    assert df2["is_hvg"].tolist() == [False, True, False]
    assert df2.attrs["hest_score"] == pytest.approx(df2.loc["G3", "pearson"])


def test_missing_record_is_an_error_unless_genes_given():
    t = _table()
    with pytest.raises(ValueError, match="No training HVGs recorded"):
        bs.tl.evaluate(t)
    df = bs.tl.evaluate(t, genes=["G2", "G4"])
    assert list(df.index) == ["G2", "G4"]
    assert np.isnan(df.attrs["hest_score"])


def test_bad_layer_and_genes_are_errors():
    t = _table()
    with pytest.raises(KeyError, match=r"run `bs\.tl\.predict_bitro"):
        bs.tl.evaluate(t, layer="ridge", top_hvg=None)
    with pytest.raises(ValueError, match="not in the table"):
        bs.tl.evaluate(t, genes=["NOPE"])
    t.layers["logs"] = np.log1p(t.layers[K.PREDICTION]) - 3
    with pytest.raises(ValueError, match="negative values"):
        bs.tl.evaluate(t, layer="logs", top_hvg=None)
    t.layers["part"] = t.layers[K.PREDICTION].copy()
    t.layers["part"][:, 4] = np.nan
    with pytest.raises(ValueError, match=r"no prediction.*G4"):
        bs.tl.evaluate(t, layer="part", genes=["G4"])
    assert "G4" not in bs.tl.evaluate(t, layer="part", top_hvg=None).index


def test_spot_level_on_spatialdata_uses_in_tissue_spots():
    t = _table(n=40)
    t.obs[K.IN_TISSUE] = np.arange(40) < 30
    t.layers[K.PREDICTION][30:] = 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        sdata = SpatialData(tables={K.TABLE: t})
    df = bs.tl.evaluate(sdata, top_hvg=None)
    assert df.attrs["n_observations"] == 30
    assert sdata.tables[K.TABLE].uns[K.RUN]["metrics"]["n_observations"] == 30
    assert (
        bs.tl.evaluate(sdata, top_hvg=None, in_tissue_only=False, store=False).attrs["n_observations"] == 40
    )


def test_bulk_level_counts_significant_genes_across_slides():
    from bitro_sc import metrics

    t = _table(n=30, noise=0.8)
    slides = []
    for i in range(30):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            s = SpatialData(tables={K.BULK: t[i].copy()})
        s.attrs[K.ATTRS] = {K.SAMPLE_ID: f"S{i}"}
        slides.append(s)
    df = bs.tl.evaluate(slides, level="bulk", top_hvg=None)
    count, _r, _, q = metrics.significant_genes(_log_measured(t), np.log1p(t.layers[K.PREDICTION]))
    assert df.attrs["n_significant"] == count > 5
    np.testing.assert_allclose(df["q_value"].to_numpy(), q, rtol=1e-5)
    assert df.attrs["n_observations"] == 30
    same = bs.tl.evaluate(t, level="bulk", top_hvg=None)  # a bulk AnnData with both layers
    np.testing.assert_allclose(same["pearson"], df["pearson"])
    with pytest.raises(ValueError, match="at least 3"):
        bs.tl.evaluate(slides[:2], level="bulk", top_hvg=None)


def test_record_under_the_layer_key_wins_and_receives_the_metrics():
    t = _table()
    t.uns[K.RUN] = {"genes": ["G1"], "hvgs": ["G1"]}  # another model's record
    t.layers["ridge"] = t.layers[K.PREDICTION].copy()
    t.uns["ridge"] = {"genes": ["G2", "G3", "G4"], "hvgs": ["G4", "G2"]}  # as predict_bitro writes it
    df = bs.tl.evaluate(t, layer="ridge", top_hvg=50)
    assert list(df.index) == ["G4", "G2"]
    assert t.uns["ridge"]["metrics"]["n_hvg"] == 2
    assert "metrics" not in t.uns[K.RUN]
    assert list(bs.tl.evaluate(t, layer="ridge", top_hvg=None, store=False).index) == ["G2", "G3", "G4"]


def test_evaluate_after_predict_bitro_uses_the_model_record():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_toy_eval", Path(__file__).with_name("test_baseline.py"))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    train = [toy.toy_slide(s)[0] for s in (1, 2, 3)]
    test, _ = toy.toy_slide(7)
    model = bs.tl.fit_baseline(train, method="ridge", n_top_genes=12)
    bs.tl.predict_bitro(test, model, key_added="ridge")
    df = bs.tl.evaluate(test, layer="ridge", top_hvg=5)
    expected = [g for g in model.record["hvgs"][:5] if g in model.genes]  # training HVGs the model predicts
    assert list(df.index) == expected
    assert len(expected) >= 2
    assert df.attrs["hest_score"] > 0.3  # cell types drive expression and are visible in the features
    assert test.tables[K.TABLE].uns["ridge"]["metrics"]["n_hvg"] == len(expected)
