"""Tests of `bs.tl.segment`, the segmentation backends and the cell writer."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata

NUCLEUS = np.array([88, 60, 150], np.float32)  # nucleus RGB of the "image" toy slides


def match_f1(truth: np.ndarray, pred: np.ndarray, *, iou: float = 0.5) -> tuple[float, float, float]:
    """Detection F1, precision, recall: a truth nucleus is found when a predicted one has IoU > ``iou``."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    n_true = len(np.unique(t[t > 0]))
    n_pred = len(np.unique(p[p > 0]))
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
    area_t = np.bincount(t, minlength=t.max() + 1)
    area_p = np.bincount(p, minlength=p.max() + 1)
    ious = inter / (area_t[pairs[0]] + area_p[pairs[1]] - inter)
    tp = int((ious > iou).sum())  # IoU > 0.5 makes the matching one-to-one
    precision = tp / max(n_pred, 1)
    recall = tp / max(n_true, 1)
    return 2 * precision * recall / max(precision + recall, 1e-12), precision, recall


# --- the writer -----------------------------------------------------------------------------------


def test_write_cells_follows_the_contract():
    sdata, labels = bs.datasets.toy("image", return_truth=True, n=12)
    bs.segmentation.write_cells(sdata, labels, mpp=0.5)
    table = sdata.tables[K.CELLS]
    shapes = sdata.shapes[K.CELL_SHAPES]
    assert table.n_obs == 12 == len(shapes)
    assert list(table.obs.columns) == list(bs.segmentation.CELL_OBS)
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (
        K.CELL_SHAPES,
        K.REGION,
        K.CELL_ID,
    )
    np.testing.assert_array_equal(shapes.index.to_numpy(), table.obs[K.CELL_ID].to_numpy())
    # centroid in px and µm, area in µm², equivalent radius in px
    ys, xs = np.nonzero(labels == 5)
    row = table.obs.set_index(K.CELL_ID).loc[5]
    assert row[K.X_PX] == pytest.approx(xs.mean())
    assert row[K.Y_PX] == pytest.approx(ys.mean())
    assert row[K.X_UM] == pytest.approx(xs.mean() * 0.5)
    assert row[K.AREA_UM2] == pytest.approx(len(ys) * 0.25)
    assert shapes.loc[5, "radius"] == pytest.approx(np.sqrt(len(ys) / np.pi))
    np.testing.assert_allclose(table.obsm[K.SPATIAL], table.obs[[K.X_PX, K.Y_PX]].to_numpy())
    assert table.X.shape == (12, 0)
    assert set(table.obs[K.SAMPLE_ID]) == {"toy"}
    assert set(table.obs[K.PATIENT_ID]) == {"p0"}
    lab = np.asarray(sdata.labels[K.CELL_LABELS])
    assert lab.dtype == np.uint32
    np.testing.assert_array_equal(lab, labels)
    for element in (shapes, sdata.labels[K.CELL_LABELS]):
        t = get_transformation(element, get_all=True)
        assert set(t) == {K.PIXEL_CS, K.MICRON_CS}
    assert _sdata.get_mpp(sdata, K.CELL_SHAPES) == pytest.approx(0.5)


def test_write_cells_with_offset_places_a_crop():
    sdata, labels = bs.datasets.toy("image", return_truth=True, n=5)
    bs.segmentation.write_cells(sdata, labels[100:300, 50:250], mpp=0.5, offset_px=(100, 50))
    obs = sdata.tables[K.CELLS].obs
    ys, xs = np.nonzero(labels[100:300, 50:250] == obs[K.CELL_ID].iloc[0])
    assert obs[K.Y_PX].iloc[0] == pytest.approx(ys.mean() + 100)
    assert obs[K.X_PX].iloc[0] == pytest.approx(xs.mean() + 50)
    t = get_transformation(sdata.labels[K.CELL_LABELS], K.PIXEL_CS)
    np.testing.assert_allclose(t.to_affine_matrix(("y", "x"), ("y", "x"))[:2, 2], [100, 50])


def test_write_cells_replaces_its_own_output_but_never_another_writers():
    sdata, labels = bs.datasets.toy("image", return_truth=True, n=5)
    bs.segmentation.write_cells(sdata, labels, mpp=0.5)
    bs.segmentation.write_cells(sdata, labels[:, :200], mpp=0.5)  # a re-run replaces its own cells
    assert sdata.tables[K.CELLS].n_obs == len(np.unique(labels[:, :200])) - 1
    assert _sdata.written_by(sdata, K.CELLS) == "bs.segmentation.write_cells"
    with pytest.raises(ValueError, match=r"written by `bs.segmentation.write_cells`.*overwrite=True"):
        bs.segmentation.write_cells(sdata, labels, mpp=0.5, writer="bs.tl.segment")
    bs.segmentation.write_cells(sdata, labels, mpp=0.5, overwrite=True, writer="bs.tl.segment")
    assert sdata.tables[K.CELLS].n_obs == len(np.unique(labels)) - 1


def test_cell_props_match_regionprops():
    from skimage.measure import regionprops_table

    _, labels = bs.datasets.toy("image", return_truth=True, n=30, seed=3)
    ours = bs.segmentation.cell_props(labels)
    ref = pd.DataFrame(
        regionprops_table(
            labels.astype(np.int64),
            properties=(
                *("label", "centroid", "area", "perimeter", "eccentricity", "solidity"),
                *("axis_major_length", "axis_minor_length", "orientation"),
            ),
        )
    )
    np.testing.assert_array_equal(ours["cell_id"], ref["label"])
    for a, b in [
        ("x_px", "centroid-1"),
        ("y_px", "centroid-0"),
        ("area_px", "area"),
        ("eccentricity", "eccentricity"),
        ("major_axis_px", "axis_major_length"),
        ("minor_axis_px", "axis_minor_length"),
        ("orientation", "orientation"),
    ]:
        np.testing.assert_allclose(ours[a], ref[b], atol=1e-6, err_msg=a)
    # estimated measures: close to regionprops' own estimates
    np.testing.assert_allclose(ours["perimeter_px"], ref["perimeter"], rtol=0.08)
    np.testing.assert_allclose(ours["solidity"], ref["solidity"], atol=0.08)
    assert (ours["solidity"] <= 1).all()


# --- segmentation quality -------------------------------------------------------------------------


@pytest.mark.parametrize("block", [2, 3])
def test_cell_props_of_binned_labels_equal_those_of_the_repeated_image(block):
    from bitro_sc._cells import cell_props

    rng = np.random.default_rng(block)
    small = rng.integers(0, 7, (23, 31)).astype(np.int32)
    small[rng.random(small.shape) < 0.4] = 0
    h, w = 23 * block - 1, 31 * block - (block - 1)  # the last row and column of blocks cut
    full = np.repeat(np.repeat(small, block, 0), block, 1)[:h, :w]
    expected = cell_props(full, offset_px=(4.0, 9.0))
    got = cell_props(small, offset_px=(4.0, 9.0), block=block, shape=(h, w))
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    with pytest.raises(ValueError, match="must be covered"):
        cell_props(small, block=block, shape=(h + block + 1, w))


def test_whole_slide_cells_equal_those_measured_on_the_label_image():
    sdata = bs.datasets.toy("image", n=80, size_px=500)
    tables = []
    for write_labels in (False, True):  # binned measures vs the full-resolution label image
        bs.tl.segment(
            sdata, progress=False, tissue=False, tile_um=61.0, write_labels=write_labels, overwrite=True
        )
        tables.append(sdata.tables[K.CELLS].obs.select_dtypes("number").reset_index(drop=True))
    assert len(tables[0]) > 60
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)


def test_watershed_finds_toy_nuclei():
    sdata, truth = bs.datasets.toy("image", return_truth=True, n=60)
    bs.tl.segment(sdata, progress=False, tissue=False)
    pred = np.asarray(sdata.labels[K.CELL_LABELS])
    f1, precision, recall = match_f1(truth, pred)
    print(f"toy slide: F1 {f1:.3f} (precision {precision:.3f}, recall {recall:.3f})")
    assert f1 >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "mpp"), [(0, 0.5), (1, 0.5), (0, 0.69)])
def test_watershed_f1_on_synthetic_slides(seed, mpp):
    sdata, truth = bs.datasets.synthetic(size_um=400, return_truth=True, seed=seed, mpp=mpp)
    bs.tl.segment(sdata, progress=False, write_labels=True)
    f1, precision, recall = match_f1(truth.labels, np.asarray(sdata.labels[K.CELL_LABELS]))
    print(
        f"synthetic seed {seed} at {mpp} µm/px: F1 {f1:.3f} (precision {precision:.3f}, "
        f"recall {recall:.3f}) at IoU > 0.5"
    )
    assert f1 >= 0.85


def test_border_cells_kept_once_for_any_tile_size():
    sdata = bs.datasets.toy("image", n=80, size_px=500)
    results = []
    for tile_um in (37.0, 61.0, 1000.0):  # 74 px, 122 px, one tile
        bs.tl.segment(sdata, progress=False, tissue=False, tile_um=tile_um, overwrite=True)
        obs = sdata.tables[K.CELLS].obs
        results.append(obs.sort_values([K.Y_PX, K.X_PX])[[K.Y_PX, K.X_PX, K.AREA_UM2]].to_numpy())
        assert sdata.tables[K.CELLS].uns["bitro_segmentation"]["tile_um"] == tile_um
    assert len(results[0]) > 60
    for other in results[1:]:
        assert other.shape == results[0].shape
        np.testing.assert_allclose(other, results[0], atol=1e-9)
    # the label image written for small tiles has each cell exactly once, with its own id
    lab = np.asarray(sdata.labels[K.CELL_LABELS])
    assert len(np.unique(lab)) - 1 == sdata.tables[K.CELLS].n_obs


def test_only_tissue_is_segmented_and_glass_gives_no_cells():
    sdata, truth = bs.datasets.toy("image", return_truth=True, n=50, glass_frac=0.4)
    # isolated "nuclei" lying on glass (debris) must not become cells
    rgb = np.moveaxis(np.asarray(sdata.images[K.IMAGE]), 0, -1).copy()
    rgb[50:60, 350:360] = NUCLEUS.astype(np.uint8)
    rgb[300:310, 330:340] = NUCLEUS.astype(np.uint8)
    sdata.images[K.IMAGE] = Image2DModel.parse(
        np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), transformations=_sdata.micron_transformations(0.5)
    )
    bs.tl.segment(sdata, progress=False)
    assert K.TISSUE in sdata.shapes  # computed and written
    obs = sdata.tables[K.CELLS].obs
    assert obs[K.X_PX].max() < 400 * 0.6 + 5
    assert len(obs) >= 0.9 * (len(np.unique(truth)) - 1)

    glass = bs.datasets.toy("image", n=0)
    glass.images[K.IMAGE] = Image2DModel.parse(
        np.full((3, 300, 300), 244, np.uint8),
        dims=("c", "y", "x"),
        transformations=_sdata.micron_transformations(0.5),
    )
    with pytest.warns(UserWarning, match="No"):
        bs.tl.segment(glass, progress=False)
    assert glass.tables[K.CELLS].n_obs == 0


def test_given_tissue_polygons_are_used():
    import geopandas as gpd
    import shapely

    sdata, truth = bs.datasets.toy("image", return_truth=True, n=60)
    left = gpd.GeoDataFrame({"geometry": [shapely.box(0, 0, 199.5, 399.5)]})
    bs.tl.segment(sdata, progress=False, tissue=left)
    obs = sdata.tables[K.CELLS].obs
    assert obs[K.X_PX].max() < 200
    ys, xs = np.nonzero(truth)
    cx = np.bincount(truth[ys, xs], xs) / np.maximum(np.bincount(truth[ys, xs]), 1)
    assert abs(len(obs) - int((cx[1:] < 200).sum())) <= 2


# --- other methods --------------------------------------------------------------------------------


def test_tissue_raster_is_the_pixel_centres_in_the_polygons():
    """Each raster pixel is tissue exactly when its centre is in a polygon (holes, islands in holes,
    multipolygons), checked pixel by pixel against an independent point-in-polygon test."""
    import geopandas as gpd
    from matplotlib.path import Path as MplPath
    from shapely.geometry import MultiPolygon, Polygon

    from bitro_sc.pp._tissue import rasterize_tissue

    ring = Polygon(
        [(13.3, 9.1), (301.7, 40.2), (250.4, 287.9), (30.6, 260.2)],
        holes=[[(90.2, 90.7), (180.9, 95.3), (140.1, 190.6)]],
    )
    island = Polygon([(120.3, 110.2), (150.8, 112.9), (140.6, 140.1)])  # inside the hole
    far = Polygon([(400.2, 10.7), (470.9, 20.1), (430.3, 90.6)])
    shapes = gpd.GeoDataFrame(geometry=[MultiPolygon([ring, far]), island])
    scale, shape = 4.0, (80, 130)
    got = rasterize_tissue(shapes, shape, scale=scale)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    # raster pixel centre (r, c) is full-resolution point ((c + 0.5) * scale - 0.5, (r + 0.5) * scale - 0.5)
    pts = np.column_stack([(cols.ravel() + 0.5) * scale - 0.5, (rows.ravel() + 0.5) * scale - 0.5])

    def inside(poly: Polygon) -> np.ndarray:
        hit = MplPath(np.asarray(poly.exterior.coords)).contains_points(pts)
        for hole in poly.interiors:
            hit &= ~MplPath(np.asarray(hole.coords)).contains_points(pts)
        return hit

    want = (inside(ring) | inside(far) | inside(island)).reshape(shape)
    assert want.sum() > 1000
    assert (~want).sum() > 1000
    np.testing.assert_array_equal(got, want)


def test_a_callable_method_is_used_per_tile():
    from scipy import ndimage as ndi

    sdata, truth = bs.datasets.toy("image", return_truth=True, n=40)
    seen = []

    def dark_blobs(tile, mpp):
        seen.append(mpp)
        return ndi.label(tile.mean(-1) < 140)[0]

    bs.tl.segment(sdata, method=dark_blobs, progress=False, tissue=False, tile_um=60)
    assert set(seen) == {0.5}
    assert len(seen) == 16
    assert sdata.tables[K.CELLS].n_obs == len(np.unique(truth)) - 1
    assert sdata.tables[K.CELLS].uns["bitro_segmentation"]["method"] == "dark_blobs"


def test_method_file_reads_polygons(tmp_path: Path):
    from skimage.measure import find_contours

    sdata, truth = bs.datasets.toy("image", return_truth=True, n=25)
    features = []
    for i in range(1, int(truth.max()) + 1):
        ring = max(find_contours((truth == i).astype(float), 0.5), key=len)[:, ::-1]  # (x, y)
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]}})
    path = tmp_path / "cellvit.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    bs.tl.segment(sdata, method="file", path=path, progress=False)
    obs = sdata.tables[K.CELLS].obs
    assert len(obs) == truth.max()
    ref = bs.segmentation.cell_props(truth)
    np.testing.assert_allclose(obs[K.X_PX], ref["x_px"], atol=0.3)
    np.testing.assert_allclose(obs[K.AREA_UM2], ref["area_px"] * 0.25, rtol=0.15)
    lab = np.asarray(sdata.labels[K.CELL_LABELS])
    assert match_f1(truth, lab)[0] == 1.0
    # the same polygons as GeoParquet
    import geopandas as gpd

    gpd.read_file(path).to_parquet(tmp_path / "cells.parquet")
    bs.tl.segment(sdata, method="file", path=tmp_path / "cells.parquet", overwrite=True, progress=False)
    assert sdata.tables[K.CELLS].n_obs == truth.max()


def test_cellvit_and_hovernet_polygon_files(tmp_path: Path):
    from bitro_sc.segmentation._external import read_polygons

    sq = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    tri = [[20, 20], [30, 20], [20, 30], [20, 20]]
    cellvit = [  # CellViT: a JSON list, one MultiPolygon feature per class
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[sq], [tri]]}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[tri]]}},
    ]
    (tmp_path / "cellvit.json").write_text(json.dumps(cellvit))
    polys = read_polygons(tmp_path / "cellvit.json")
    assert len(polys) == 3
    hovernet = {"nuc": {"1": {"contour": sq[:-1]}, "2": {"contour": tri[:-1]}}}
    (tmp_path / "hovernet.json").write_text(json.dumps(hovernet))
    cells = bs.segmentation.polygons_to_cells(read_polygons(tmp_path / "hovernet.json"))
    np.testing.assert_allclose(cells["area_px"], [100.0, 50.0])
    np.testing.assert_allclose(cells[["x_px", "y_px"]].to_numpy(), [[5, 5], [20 + 10 / 3, 20 + 10 / 3]])
    np.testing.assert_allclose(cells["solidity"], [1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="path="):
        read_polygons(tmp_path / "missing.geojson")


@pytest.mark.parametrize(("method", "extra"), [("stardist", "stardist"), ("cellpose", "cellpose")])
def test_optional_methods_name_their_extra(method, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, method, None)  # make the package unimportable
    sdata = bs.datasets.toy("image", n=3)
    with pytest.raises(ImportError, match=rf"bitro-sc\[{extra}\]"):
        bs.tl.segment(sdata, method=method, model_path="/nonexistent", progress=False, tissue=False)


def test_stardist_plumbing_with_a_stub(monkeypatch, tmp_path):
    from scipy import ndimage as ndi

    created = []

    class StarDist2D:
        def __init__(self, config, name, basedir):
            created.append((name, basedir))

        def predict_instances(self, img, scale=None, prob_thresh=None, nms_thresh=None):
            return ndi.label(img.mean(-1) < 140)[0], {}

    stardist = types.ModuleType("stardist")
    models = types.ModuleType("stardist.models")
    models.StarDist2D = StarDist2D
    csbdeep = types.ModuleType("csbdeep")
    utils = types.ModuleType("csbdeep.utils")
    utils.normalize = lambda x, lo, hi, axis: x.astype(np.float32)
    for name, mod in [
        ("stardist", stardist),
        ("stardist.models", models),
        ("csbdeep", csbdeep),
        ("csbdeep.utils", utils),
    ]:
        monkeypatch.setitem(sys.modules, name, mod)
    sdata, truth = bs.datasets.toy("image", return_truth=True, n=20)
    with pytest.raises(ValueError, match="model_path"):
        bs.tl.segment(sdata, method="stardist", progress=False, tissue=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bs.tl.segment(sdata, method="stardist", model_path=tmp_path / "nope", progress=False, tissue=False)
    (tmp_path / "he_model").mkdir()
    bs.tl.segment(sdata, method="stardist", model_path=tmp_path / "he_model", progress=False, tissue=False)
    assert created == [("he_model", str(tmp_path))]  # loaded once, reused for every tile
    assert sdata.tables[K.CELLS].n_obs == truth.max()


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_method_lists_the_registered_ones():
    sdata = bs.datasets.toy("image", n=3)
    with pytest.raises(ValueError, match="watershed"):
        bs.tl.segment(sdata, method="nope")
    with pytest.raises(TypeError, match="min_area_um2"):
        bs.tl.segment(sdata, min_area=3)


def test_too_coarse_image_is_refused_with_advice():
    sdata = bs.datasets.toy("image", n=3)
    with pytest.raises(ValueError, match=r"too coarse.*full-resolution"):
        bs.tl.segment(sdata, mpp=4.0)


def test_input_errors_are_clear():
    sdata = bs.datasets.toy("image", n=3)
    with pytest.raises(ValueError, match="no image element"):
        bs.tl.segment(sd.SpatialData())
    bad = sd.SpatialData(
        images={"he": Image2DModel.parse(np.zeros((4, 20, 20), np.uint8), dims=("c", "y", "x"))}
    )
    with pytest.raises(ValueError, match="4 channel"):
        bs.tl.segment(bad, mpp=0.5)
    nompp = sd.SpatialData(
        images={"he": Image2DModel.parse(np.zeros((3, 20, 20), np.uint8), dims=("c", "y", "x"))}
    )
    with pytest.raises(ValueError, match="pixel size"):
        bs.tl.segment(nompp)
    sdata.tables["cells"] = sd.models.TableModel.parse(ad.AnnData(np.zeros((2, 1))))  # the user's own
    with pytest.raises(ValueError, match=r"not written by bitro_sc.*overwrite=True"):
        bs.tl.segment(sdata, progress=False, tissue=False)
    bs.tl.segment(sdata, progress=False, tissue=False, overwrite=True)
    bs.tl.segment(sdata, progress=False, tissue=False)  # a re-run replaces segment's own output
