"""Property tests (hypothesis) of the geometry: tiling, spot assignment, µm ↔ px conversions."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bitro_sc as bs  # noqa: E402
from bitro_sc import _keys as K  # noqa: E402
from bitro_sc._sdata import get_mpp, micron_transformations, set_mpp  # noqa: E402
from bitro_sc.segmentation._tiling import segment_image  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: the largest nucleus of the coded image (px): tiles overlap by at least this
MAX_DIAMETER_PX = 12


def coded_image(seed: int, size: int = 160, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A ``(3, y, x)`` image whose pixels spell the id of the disc they belong to, and the true labels.

    Discs of diameter ≤ :data:`MAX_DIAMETER_PX` px, not touching each other nor the border.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.uint32)
    yy, xx = np.mgrid[:size, :size]
    placed = 0
    for _ in range(2000):
        if placed == n:
            break
        r = rng.uniform(2.0, MAX_DIAMETER_PX / 2)
        cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 1.5) ** 2
        if disc.sum() and not labels[grown].any():
            placed += 1
            labels[disc] = placed
    rgb = np.zeros((3, size, size), np.uint8)
    rgb[0] = labels % 256
    rgb[1] = labels // 256
    rgb[2] = np.where(labels > 0, 255, 0)
    return rgb, labels


def decode(tile: np.ndarray) -> np.ndarray:
    """The "segmenter": reads the ids back from the pixels (a tile of ``(y, x, 3)`` uint8)."""
    ids = tile[..., 0].astype(np.uint32) + 256 * tile[..., 1].astype(np.uint32)
    return np.where(tile[..., 2] == 255, ids, 0).astype(np.uint32)


def centroids(labels: np.ndarray) -> set[tuple[float, float]]:
    from scipy import ndimage as ndi

    ids = np.unique(labels[labels > 0])
    return {(round(float(y), 6), round(float(x), 6)) for y, x in ndi.center_of_mass(labels > 0, labels, ids)}


@SETTINGS
@given(
    seed=st.integers(0, 5),
    tile_px=st.integers(MAX_DIAMETER_PX, 200),
    overlap_px=st.integers(MAX_DIAMETER_PX, 40),
)
def test_tiling_keeps_every_cell_exactly_once_for_any_tile_size(
    seed: int, tile_px: int, overlap_px: int
) -> None:
    rgb, truth = coded_image(seed)
    props, labels = segment_image(
        rgb, decode, mpp=0.5, tile_px=tile_px, overlap_px=overlap_px, return_labels=True, progress=False
    )
    n_true = int(truth.max())
    assert len(props) == n_true
    assert {
        (round(y, 6), round(x, 6)) for y, x in zip(props["y_px"], props["x_px"], strict=True)
    } == centroids(truth)
    assert labels is not None
    assert np.array_equal(labels > 0, truth > 0)  # every nucleus pixel kept, once


def _cells_and_spots(seed: int, n_cells: int) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    cells_um = rng.uniform(0, 400, size=(n_cells, 2))
    spots_px = np.array([[x, y] for x in range(20, 200, 40) for y in range(20, 200, 40)], float)
    return cells_um, spots_px, 22.0


def _slide(cells_um: np.ndarray, spots_px: np.ndarray, radius_px: float, *, mpp: float = 2.0):
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    n = len(cells_um)
    ids = np.arange(1, n + 1)
    obs = pd.DataFrame(
        {
            K.CELL_ID: ids,
            K.REGION: pd.Categorical([K.CELL_SHAPES] * n),
            K.X_UM: cells_um[:, 0],
            K.Y_UM: cells_um[:, 1],
        },
        index=[str(i) for i in ids],
    )
    table = TableModel.parse(
        ad.AnnData(np.zeros((n, 0), np.float32), obs=obs),
        region=K.CELL_SHAPES,
        region_key=K.REGION,
        instance_key=K.CELL_ID,
    )
    tf = micron_transformations(mpp)
    shapes = ShapesModel.parse(
        cells_um / mpp, geometry=0, radius=np.full(n, 3.0), index=ids, transformations=tf
    )
    spots = ShapesModel.parse(
        spots_px, geometry=0, radius=np.full(len(spots_px), radius_px), transformations=tf
    )
    return SpatialData(shapes={K.CELL_SHAPES: shapes, K.SPOTS: spots}, tables={K.CELLS: table})


@SETTINGS
@given(seed=st.integers(0, 10_000), n_cells=st.integers(1, 150), order_seed=st.integers(0, 10_000))
def test_spot_assignment_is_invariant_to_cell_order(seed: int, n_cells: int, order_seed: int) -> None:
    cells_um, spots_px, radius = _cells_and_spots(seed, n_cells)
    order = np.random.default_rng(order_seed).permutation(n_cells)
    a = _slide(cells_um, spots_px, radius)
    b = _slide(cells_um, spots_px, radius)
    b.tables[K.CELLS] = b.tables[K.CELLS][order].copy()
    bs.tl.assign_cells(a)
    bs.tl.assign_cells(b)
    left = a.tables[K.CELLS].obs[K.SPOT_ID].fillna(-1).astype(int)
    right = b.tables[K.CELLS].obs[K.SPOT_ID].fillna(-1).astype(int)
    assert left.to_dict() == right.to_dict()  # same spot for every cell (obs names = cell ids)


@SETTINGS
@given(
    mpp=st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False),
    xy=st.lists(st.tuples(st.floats(-1e5, 1e5), st.floats(-1e5, 1e5)), min_size=1, max_size=20),
    offset=st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)),
)
def test_um_px_conversions_round_trip(
    mpp: float, xy: list[tuple[float, float]], offset: tuple[float, float]
) -> None:
    px = np.asarray(xy, dtype=np.float64)
    tf = micron_transformations(mpp, offset_px=offset)
    to_um = tf[K.MICRON_CS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    to_px = tf[K.PIXEL_CS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    homog = np.c_[px, np.ones(len(px))]
    um = homog @ to_um.T
    full_px = homog @ to_px.T  # pixels of the full image
    back = np.c_[um[:, :2], np.ones(len(px))] @ np.linalg.inv(to_um).T
    np.testing.assert_allclose(back[:, :2], px, rtol=1e-9, atol=1e-6 * max(1.0, np.abs(px).max()))
    np.testing.assert_allclose(
        um[:, :2], full_px[:, :2] * mpp, rtol=1e-9, atol=1e-9 * np.abs(um).max() + 1e-9
    )


@SETTINGS
@given(mpp=st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False))
def test_pixel_size_round_trips_through_the_image_element(mpp: float) -> None:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    sdata = SpatialData(
        images={"he": Image2DModel.parse(np.zeros((3, 4, 4), np.uint8), dims=("c", "y", "x"))}
    )
    set_mpp(sdata, "he", mpp, source="user")
    assert get_mpp(sdata, "he") == pytest.approx(mpp, rel=1e-12)
