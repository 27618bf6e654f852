import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import bitro_sc as bs


def test_normalize_expression_scales_each_profile_to_target_sum_then_log1p():
    counts = sparse.csr_matrix(np.array([[1, 3, 0], [10, 0, 10], [0, 0, 0]]))
    out = bs.pp.normalize_expression(counts)
    np.testing.assert_allclose(np.expm1(out).sum(axis=1), [1e4, 1e4, 0], rtol=1e-5)
    np.testing.assert_allclose(np.expm1(out[0]), [2500, 7500, 0], rtol=1e-5)


def test_normalize_expression_uses_given_library_size_for_gene_subsets():
    counts = np.array([[1.0, 3.0]])
    out = bs.pp.normalize_expression(counts, library_size=np.array([8.0]), log1p=False, target_sum=8)
    np.testing.assert_allclose(out, [[1.0, 3.0]])


def test_normalize_expression_rejects_negative_values():
    with pytest.raises(ValueError, match="non-negative"):
        bs.pp.normalize_expression(np.array([[-1.0, 2.0]]))


def _table(rng, n_obs, genes, variable):
    means = np.linspace(2.0, 20.0, len(genes))
    lam = np.tile(means, (n_obs, 1))
    for g in variable:  # same mean as its neighbours, far more spot-to-spot variance
        lam[:, genes.index(g)] *= rng.gamma(0.3, 1 / 0.3, size=n_obs)
    return ad.AnnData(sparse.csr_matrix(rng.poisson(lam)), var=pd.DataFrame(index=genes))


def test_highly_variable_genes_follow_training_tables_and_detection_filter():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(200)]
    variable = ["G30", "G90", "G150"]
    t1, t2 = _table(rng, 200, genes, variable), _table(rng, 150, genes, variable)
    # G20 is wildly variable but detected in < 10% of t2's spots: excluded by the HEST filter
    x1, x2 = t1.X.toarray(), t2.X.toarray()
    x1[:, 20] = rng.gamma(0.3, 50.0, size=200).round()
    x2[:, 20] = 0
    x2[:5, 20] = 100
    t1.X, t2.X = sparse.csr_matrix(x1), sparse.csr_matrix(x2)
    hvgs = bs.pp.highly_variable_genes([t1.copy(), t2.copy()], n_top=3)
    assert set(hvgs) == set(variable)
    assert "G20" not in bs.pp.highly_variable_genes([t1, t2], n_top=10)


def test_highly_variable_genes_errors_on_disjoint_gene_sets():
    a = ad.AnnData(np.ones((3, 2)), var=pd.DataFrame(index=["A", "B"]))
    b = ad.AnnData(np.ones((3, 2)), var=pd.DataFrame(index=["C", "D"]))
    with pytest.raises(ValueError, match="share no gene"):
        bs.pp.highly_variable_genes([a, b])


def test_highly_variable_genes_are_ranked_even_when_all_genes_pass():
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(30)]
    t = _table(rng, 300, genes, ["G25"])
    hvgs = bs.pp.highly_variable_genes(t, n_top=100)
    assert len(hvgs) == 30
    assert hvgs[0] == "G25"
