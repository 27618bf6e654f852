"""bs.tl.cell_graph: kNN / µm-radius graphs under squidpy's keys."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K


def _slide(xy_um: np.ndarray):
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    n = len(xy_um)
    obs = pd.DataFrame(
        {
            K.CELL_ID: np.arange(1, n + 1),
            K.REGION: pd.Categorical([K.CELL_SHAPES] * n),
            K.X_UM: xy_um[:, 0],
            K.Y_UM: xy_um[:, 1],
        },
        index=[str(i) for i in range(n)],
    )
    table = ad.AnnData(np.zeros((n, 0), np.float32), obs=obs)
    table.obsm[K.SPATIAL] = xy_um
    return SpatialData(tables={K.CELLS: TableModel.parse(table)})


@pytest.fixture
def points():
    return np.random.default_rng(0).uniform(0, 300, (400, 2))


def test_knn_graph_has_k_nearest_neighbours_with_micron_distances(points):
    sdata = _slide(points)
    bs.tl.cell_graph(sdata, k=5)
    t = sdata.tables[K.CELLS]
    conn, dist = t.obsp[K.CONNECTIVITIES], t.obsp[K.DISTANCES]
    assert (np.asarray(conn.sum(1)).ravel() == 5).all()
    assert conn.diagonal().sum() == 0
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, :5]
    got = np.sort(dist.toarray(), axis=1)[:, -5:]  # the 5 non-zero entries per row
    np.testing.assert_allclose(np.sort(got, axis=1), expected, rtol=1e-9)
    assert t.uns[K.GRAPH_PARAMS]["params"]["n_neighbors"] == 5
    assert t.uns[K.GRAPH_PARAMS]["connectivities_key"] == K.CONNECTIVITIES


def test_radius_graph_connects_exactly_the_pairs_within_the_radius(points):
    sdata = _slide(points)
    bs.tl.cell_graph(sdata, radius_um=25.0)
    t = sdata.tables[K.CELLS]
    conn, dist = t.obsp[K.CONNECTIVITIES], t.obsp[K.DISTANCES]
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    expected = (d <= 25.0) & ~np.eye(len(points), dtype=bool)
    np.testing.assert_array_equal(conn.toarray() > 0, expected)
    np.testing.assert_allclose(dist.toarray()[expected], d[expected])
    assert (conn != conn.T).nnz == 0
    assert t.uns[K.GRAPH_PARAMS]["params"]["radius"] == 25.0


def test_graph_works_with_squidpy_tools(points):
    import squidpy as sq

    sdata = _slide(points)
    bs.tl.cell_graph(sdata, k=6)
    t = sdata.tables[K.CELLS]
    t.obs["cluster"] = pd.Categorical(np.where(points[:, 0] < 150, "left", "right"))
    sq.gr.nhood_enrichment(t, cluster_key="cluster", n_perms=20, seed=0, show_progress_bar=False)
    z = t.uns["cluster_nhood_enrichment"]["zscore"]
    assert z[0, 0] > 0  # spatially segregated groups: self-enriched
    assert z[0, 1] < 0


def test_tiny_tables_and_bad_arguments():
    one = _slide(np.array([[0.0, 0.0]]))
    bs.tl.cell_graph(one)
    assert one.tables[K.CELLS].obsp[K.CONNECTIVITIES].nnz == 0
    bs.tl.cell_graph(one)  # a re-run replaces its own graph
    one.tables[K.CELLS].obsp["mine_connectivities"] = one.tables[K.CELLS].obsp[K.CONNECTIVITIES]
    with pytest.raises(ValueError, match=r"obsp\['mine_connectivities'\] \(not written by bitro_sc"):
        bs.tl.cell_graph(one, key_added="mine")
    with pytest.raises(ValueError, match="radius_um"):
        bs.tl.cell_graph(one, radius_um=-1, overwrite=True)
    with pytest.raises(KeyError, match=r"bs\.tl\.segment"):
        bs.tl.cell_graph(one, cells_key="nope")


@pytest.mark.parametrize("mode", ["knn", "radius"])
def test_graph_equals_squidpys_on_the_same_micron_coordinates(points, mode):
    import squidpy as sq

    sdata = _slide(points)
    ref = ad.AnnData(shape=(len(points), 0))
    ref.obsm["spatial"] = points
    if mode == "knn":
        bs.tl.cell_graph(sdata, k=7)
        sq.gr.spatial_neighbors_knn(ref, n_neighs=7)
    else:
        bs.tl.cell_graph(sdata, radius_um=31.0)
        sq.gr.spatial_neighbors_radius(ref, radius=31.0)
    t = sdata.tables[K.CELLS]
    for key in (K.CONNECTIVITIES, K.DISTANCES):
        ours, theirs = t.obsp[key].toarray(), ref.obsp[key].toarray()
        np.fill_diagonal(theirs, 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_key_added_writes_the_graph_under_squidpy_style_keys(points):
    sdata = _slide(points)
    bs.tl.cell_graph(sdata, k=5)
    bs.tl.cell_graph(sdata, k=5, key_added="cg")
    t = sdata.tables[K.CELLS]
    assert (t.obsp["cg_connectivities"] != t.obsp[K.CONNECTIVITIES]).nnz == 0
    assert (t.obsp["cg_distances"] != t.obsp[K.DISTANCES]).nnz == 0
    assert t.uns["cg_neighbors"]["connectivities_key"] == "cg_connectivities"
    assert t.uns["cg_neighbors"]["distances_key"] == "cg_distances"
    bs.tl.cell_graph(sdata, k=3, key_added="cg")  # a re-run replaces its own graph
    assert t.obsp["cg_connectivities"].sum(1).max() == 3
