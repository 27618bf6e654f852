import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bitro_sc import metrics


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.normal(size=(40, 6))
    pred = 0.5 * y + rng.normal(size=y.shape)
    pred[:, 5] = -y[:, 5] + 0.3 * rng.normal(size=40)
    return y, pred


def test_pearson_matches_scipy_per_gene(pair):
    y, pred = pair
    expected = [stats.pearsonr(y[:, j], pred[:, j]).statistic for j in range(y.shape[1])]
    np.testing.assert_allclose(metrics.pearson(y, pred), expected, rtol=1e-10, atol=1e-12)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    y = rng.poisson(1.0, size=(30, 4)).astype(float)  # many ties
    pred = y + rng.poisson(1.0, size=y.shape)
    expected = [stats.spearmanr(y[:, j], pred[:, j]).statistic for j in range(4)]
    np.testing.assert_allclose(metrics.spearman(y, pred), expected, rtol=1e-10)


def test_constant_gene_gives_nan_not_zero(pair):
    y, pred = pair
    y = y.copy()
    pred = pred.copy()
    y[:, 0] = 3.0  # never varies in the measurement
    pred[:, 1] = 7.0  # predicted identically everywhere (like the mean baseline)
    r = metrics.pearson(y, pred)
    rho = metrics.spearman(y, pred)
    assert np.isnan(r[:2]).all()
    assert np.isnan(rho[:2]).all()
    assert np.isfinite(r[2:]).all()


def test_one_dimensional_inputs_are_one_gene():
    r = metrics.pearson(np.arange(5.0), np.arange(5.0) ** 2)
    assert r.shape == (1,)
    assert r[0] == pytest.approx(stats.pearsonr(np.arange(5.0), np.arange(5.0) ** 2).statistic)


def test_bad_inputs_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="same shape"):
        metrics.pearson(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"y_pred.*NaN"):
        metrics.pearson(np.zeros((3, 1)), np.array([[1.0], [np.nan], [2.0]]))


def test_pearson_pvalues_match_scipy_one_and_two_sided(pair):
    y, pred = pair
    r = metrics.pearson(y, pred)
    for alt in ("greater", "two-sided", "less"):
        expected = [stats.pearsonr(y[:, j], pred[:, j], alternative=alt).pvalue for j in range(6)]
        np.testing.assert_allclose(metrics.pearson_pvalues(r, 40, alternative=alt), expected, rtol=1e-8)
    with pytest.raises(ValueError, match="alternative"):
        metrics.pearson_pvalues(r, 40, alternative="bigger")


def test_benjamini_hochberg_matches_scipy_and_keeps_nan():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=50) ** 3
    np.testing.assert_allclose(
        metrics.benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"), rtol=1e-12
    )
    q = metrics.benjamini_hochberg(np.array([0.01, np.nan, 0.04]))
    assert np.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2]], stats.false_discovery_control([0.01, 0.04], method="bh"))


def test_significant_genes_counts_positive_correlations_after_fdr():
    rng = np.random.default_rng(3)
    n = 40
    y = rng.normal(size=(n, 30))
    pred = rng.normal(size=(n, 30))
    pred[:, :10] = y[:, :10] + 0.3 * rng.normal(size=(n, 10))  # 10 well-predicted genes
    pred[:, 10] = -y[:, 10]  # anti-correlated: significant two-sided, never here
    count, _r, _p, q = metrics.significant_genes(y, pred)
    expected_q = stats.false_discovery_control(
        [stats.pearsonr(y[:, j], pred[:, j], alternative="greater").pvalue for j in range(30)]
    )
    np.testing.assert_allclose(q, expected_q, rtol=1e-8)
    assert count == int(np.sum(expected_q < 0.05))
    assert 10 <= count <= 12  # the 10 true genes, at most a chance hit or two
    assert q[10] > 0.5


def test_hest_score_uses_only_the_first_k_training_hvgs():
    per_gene = pd.Series({"a": 0.5, "b": 0.1, "c": np.nan, "d": 0.9})
    assert metrics.hest_score(per_gene, ["a", "b", "c", "d"], top_k=3) == pytest.approx(0.3)
    assert metrics.hest_score(per_gene, ["x", "d"], top_k=50) == pytest.approx(0.9)
    assert np.isnan(metrics.hest_score(per_gene, ["c"]))


def test_summarize_skips_and_counts_nan_genes():
    df = pd.DataFrame({"pearson": [0.2, np.nan, 0.4], "spearman": [0.1, 0.3, np.nan]})
    s = metrics.summarize(df)
    assert s["n_genes"] == 3
    assert s["n_nan"] == 1
    assert s["mean_pearson"] == pytest.approx(0.3)
    assert s["mean_spearman"] == pytest.approx(0.2)


def test_cell_truth_scores_matches_cells_to_true_nuclei():
    from types import SimpleNamespace

    import anndata as ad

    rng = np.random.default_rng(0)
    labels = np.zeros((20, 20), dtype=np.int32)
    centres = [(2, 2), (2, 12), (12, 2), (12, 12), (7, 7)]
    for lab, (y, x) in enumerate(centres, start=1):
        labels[y : y + 3, x : x + 3] = lab
    rate = rng.uniform(1, 10, size=(5, 3))
    truth = SimpleNamespace(
        labels=labels,
        expression=ad.AnnData(
            np.zeros((5, 3)),
            obs=pd.DataFrame({"cell_id": np.arange(1, 6)}, index=[f"t{i}" for i in range(5)]),
            var=pd.DataFrame(index=["A", "B", "C"]),
            layers={"rate": rate},
        ),
    )
    # four segmented cells on true nuclei 1-4 and one on background
    obs = pd.DataFrame(
        {"x_px": [3.0, 13.0, 3.0, 13.0, 18.0], "y_px": [3.0, 3.0, 13.0, 13.0, 18.0]},
        index=[f"c{i}" for i in range(5)],
    )
    sdata = SimpleNamespace(tables={"cells": ad.AnnData(obs=obs)})
    frame = pd.DataFrame(
        np.vstack([rate[:4] * 7.0, np.ones((1, 3))]), index=obs.index, columns=["A", "B", "X"]
    )
    out = metrics.cell_truth_scores(frame, sdata, truth)
    assert list(out.index) == ["A", "B"]  # genes the truth has
    np.testing.assert_allclose(out["pearson"], 1.0)  # predictions proportional to the truth
    assert out.attrs["n_cells_matched"] == 4
    assert out.attrs["n_cells"] == 5
