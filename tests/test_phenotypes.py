"""bs.tl.phenotypes: k-means fitted once and shared by every slide."""

from __future__ import annotations

import numpy as np
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K


@pytest.fixture(scope="module")
def slides():
    pairs = [bs.datasets.toy("nuclei", return_truth=True, seed=s, size_px=200) for s in (10, 11, 12)]
    # the cell's own features: with "niche" features (half of them window means) k-means
    # with 2 clusters splits these two small toy slides from each other, not the two cell types
    bs.tl.cell_features([p[0] for p in pairs[:2]], encoder="morphology", progress=False)
    bs.tl.cell_features(pairs[2][0], encoder="morphology", scaler=pairs[0][0], progress=False)
    return pairs


def test_phenotypes_recover_the_true_cell_types(slides):
    from sklearn.metrics import adjusted_rand_score

    train = [s for s, _ in slides[:2]]
    bs.tl.phenotypes(train, n_clusters=2, overwrite=True)
    for s, truth in slides[:2]:
        col = s.tables[K.CELLS].obs[K.PHENOTYPE]
        assert adjusted_rand_score(truth, col) > 0.95


def test_one_model_means_the_same_cluster_on_every_slide(slides):
    train = [s for s, _ in slides[:2]]
    test, truth = slides[2]
    km = bs.tl.phenotypes(train, n_clusters=2, overwrite=True, seed=3)
    bs.tl.phenotypes(test, model=km, overwrite=True)
    obs = test.tables[K.CELLS].obs
    expected = km.predict(test.tables[K.CELLS].obsm[K.FEATURES])
    np.testing.assert_array_equal(obs[K.PHENOTYPE].astype(int).to_numpy(), expected)
    assert list(obs[K.PHENOTYPE].cat.categories) == ["0", "1"]
    # cluster of the dark nuclei on the training slide is the cluster of the dark nuclei here
    s0, t0 = slides[0]
    dark_train = s0.tables[K.CELLS].obs[K.PHENOTYPE][t0 == 0].mode()[0]
    assert (obs[K.PHENOTYPE][truth == 0] == dark_train).mean() > 0.95
    uns = test.tables[K.CELLS].uns[K.PHENOTYPE_PARAMS]
    assert uns["n_cells_fitted"] == 0
    assert uns["counts"].sum() == test.tables[K.CELLS].n_obs
    np.testing.assert_allclose(uns["cluster_centers"], km.cluster_centers_, rtol=1e-6)


def test_fit_on_a_list_pools_all_cells(slides):
    train = [s for s, _ in slides[:2]]
    km = bs.tl.phenotypes(train, n_clusters=3, overwrite=True, algorithm="minibatch")
    n = sum(s.tables[K.CELLS].n_obs for s in train)
    assert train[0].tables[K.CELLS].uns[K.PHENOTYPE_PARAMS]["n_cells_fitted"] == n
    assert type(km).__name__ == "MiniBatchKMeans"
    assert list(km.bitro_feature_names_) == list(
        train[0].tables[K.CELLS].uns[K.FEATURES_PARAMS]["feature_names"]
    )
    # every slide lists every cluster, present or not
    for s in train:
        assert list(s.tables[K.CELLS].obs[K.PHENOTYPE].cat.categories) == ["0", "1", "2"]


def test_existing_column_is_not_overwritten(slides):
    s = slides[0][0]
    bs.tl.phenotypes(s, n_clusters=2, overwrite=True)
    bs.tl.phenotypes(s, n_clusters=3)  # a re-run replaces its own column
    assert len(s.tables["cells"].obs["bitro_phenotype"].cat.categories) == 3
    s.tables["cells"].obs["mine"] = "x"
    with pytest.raises(ValueError, match=r"obs\['mine'\] \(not written by bitro_sc.*overwrite=True"):
        bs.tl.phenotypes(s, n_clusters=2, key_added="mine")


def test_missing_features_name_the_step(nuclei_slide):
    s = nuclei_slide
    with pytest.raises(KeyError, match=r"bs\.tl\.cell_features"):
        bs.tl.phenotypes(s)


def test_per_slide_scaling_is_warned_about():
    a = bs.datasets.toy("nuclei", seed=20, size_px=120)
    b = bs.datasets.toy("nuclei", seed=21, size_px=120)
    bs.tl.cell_features(a, progress=False)
    bs.tl.cell_features(b, progress=False)  # two separately fitted scalers
    with pytest.warns(UserWarning, match="per-slide scaling"):
        bs.tl.phenotypes([a, b], n_clusters=2)


def test_bad_algorithm_and_model_are_rejected(slides):
    s = slides[0][0]
    with pytest.raises(ValueError, match="algorithm"):
        bs.tl.phenotypes(s, algorithm="dbscan", overwrite=True)
    with pytest.raises(TypeError, match="fitted"):
        bs.tl.phenotypes(s, model=object(), overwrite=True)
