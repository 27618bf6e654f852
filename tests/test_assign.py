"""bs.tl.assign_cells: cells to the spot whose disc contains them."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc._sdata import micron_transformations


def _slide(cells_um: np.ndarray, spots_px: np.ndarray, radius_px: float | np.ndarray, *, mpp: float = 2.0):
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    tf = micron_transformations(mpp)
    n = len(cells_um)
    obs = pd.DataFrame(
        {
            K.CELL_ID: np.arange(1, n + 1),
            K.REGION: pd.Categorical([K.CELL_SHAPES] * n),
            K.X_PX: cells_um[:, 0] / mpp,
            K.Y_PX: cells_um[:, 1] / mpp,
            K.X_UM: cells_um[:, 0],
            K.Y_UM: cells_um[:, 1],
            K.AREA_UM2: np.full(n, 30.0),
        },
        index=[str(i) for i in range(1, n + 1)],
    )
    table = TableModel.parse(
        ad.AnnData(np.zeros((n, 0), np.float32), obs=obs),
        region=K.CELL_SHAPES,
        region_key=K.REGION,
        instance_key=K.CELL_ID,
    )
    cells = ShapesModel.parse(
        cells_um / mpp,
        geometry=0,
        radius=np.full(n, 3.0),
        index=obs[K.CELL_ID].to_numpy(),
        transformations=tf,
    )
    radius = np.broadcast_to(np.asarray(radius_px, dtype=float), (len(spots_px),)).copy()
    spots = ShapesModel.parse(
        spots_px,
        geometry=0,
        radius=radius,
        index=pd.Index(np.arange(len(spots_px)) + 100),
        transformations=tf,
    )
    return SpatialData(shapes={K.CELL_SHAPES: cells, K.SPOTS: spots}, tables={K.CELLS: table})


def test_cells_go_to_the_containing_disc_and_nearest_centre_where_discs_overlap():
    # spots (µm): 100 at (100, 100), 101 at (180, 100); radius 50 µm (25 px at 2 µm/px): overlap 130..150
    spots_px = np.array([[50.0, 50.0], [90.0, 50.0]])
    cells = np.array(
        [
            [100.0, 100.0],  # centre of 100
            [135.0, 100.0],  # in both, nearer 100
            [145.0, 100.0],  # in both, nearer 101
            [229.0, 100.0],  # inside 101 (49 µm)
            [231.0, 100.0],  # outside everything
            [100.0, 149.5],  # inside 100, near its edge
            [100.0, 151.0],  # outside
        ]
    )
    sdata = _slide(cells, spots_px, 25.0)
    bs.tl.assign_cells(sdata)
    col = sdata.tables[K.CELLS].obs[K.SPOT_ID]
    assert str(col.dtype) == "Int64"
    assert col.tolist() == [100, 100, 101, 101, pd.NA, 100, pd.NA]
    uns = sdata.tables[K.CELLS].uns[K.ASSIGN_PARAMS]
    assert uns["n_assigned"] == 5
    assert uns["n_unassigned"] == 2
    assert uns["spot_ids"].tolist() == [100, 101]
    assert uns["n_cells"].tolist() == [3, 2]


def test_matches_brute_force_on_random_cells_with_unequal_radii():
    rng = np.random.default_rng(0)
    spots_px = rng.uniform(0, 500, (60, 2))
    radius_px = rng.uniform(10, 40, 60)
    cells = rng.uniform(0, 1000, (3000, 2))  # µm, mpp 2
    sdata = _slide(cells, spots_px, radius_px)
    bs.tl.assign_cells(sdata)
    got = sdata.tables[K.CELLS].obs[K.SPOT_ID].fillna(-1).to_numpy()
    centres, radii = spots_px * 2.0, radius_px * 2.0
    d = np.linalg.norm(cells[:, None, :] - centres[None], axis=2)
    d[d > radii[None]] = np.inf
    expected = np.where(np.isfinite(d.min(1)), d.argmin(1) + 100, -1)
    np.testing.assert_array_equal(got, expected)
    assert (expected >= 0).sum() > 100  # the test exercises real assignments


def test_missing_spots_element_says_how_to_get_one():
    sdata = _slide(np.array([[10.0, 10.0]]), np.array([[5.0, 5.0]]), 10.0)
    del sdata.shapes[K.SPOTS]
    with pytest.raises(KeyError, match=r"bs\.io\.read_"):
        bs.tl.assign_cells(sdata)


def test_no_cell_in_any_spot_warns():
    sdata = _slide(np.array([[1000.0, 1000.0], [1200.0, 900.0]]), np.array([[5.0, 5.0]]), 10.0)
    with pytest.warns(UserWarning, match="No cell"):
        bs.tl.assign_cells(sdata)
    assert sdata.tables[K.CELLS].obs[K.SPOT_ID].isna().all()


def test_a_rerun_replaces_its_own_assignment_but_not_a_users_column():
    sdata = _slide(np.array([[10.0, 10.0]]), np.array([[5.0, 5.0]]), 10.0)
    bs.tl.assign_cells(sdata)
    bs.tl.assign_cells(sdata)  # re-running the notebook cell
    sdata.tables[K.CELLS].obs["mine"] = ["keep"]
    with pytest.raises(ValueError, match=r"obs\['mine'\] \(not written by bitro_sc.*overwrite=True"):
        bs.tl.assign_cells(sdata, key_added="mine")
    assert sdata.tables[K.CELLS].obs["mine"].tolist() == ["keep"]
    bs.tl.assign_cells(sdata, key_added="mine", overwrite=True)
    assert sdata.tables[K.CELLS].obs[K.SPOT_ID].tolist() == [0 + 100]


@pytest.mark.slow  # the first synthetic slide of a process compiles its renderer
def test_assignment_matches_the_synthetic_truth():
    from bitro_sc.segmentation import write_cells

    sdata, truth = bs.datasets.synthetic(size_um=400.0, seed=1, return_truth=True)
    write_cells(sdata, np.asarray(truth.labels), mpp=truth.mpp)  # the true nuclei as cells
    bs.tl.assign_cells(sdata)
    obs = sdata.tables[K.CELLS].obs
    got = obs[K.SPOT_ID].fillna(-1).to_numpy()
    expected = truth.cells.set_index(K.CELL_ID).loc[obs[K.CELL_ID].to_numpy(), "spot_id"].to_numpy()
    agreement = (got == expected).mean()
    print(f"cell -> spot agreement with the truth: {agreement:.4f} ({(expected >= 0).sum()} cells in spots)")
    assert (expected >= 0).sum() > 20
    assert agreement > 0.99
