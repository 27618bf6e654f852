"""bs.io.read_hest on a tiny HEST-1k folder written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata

SID = "TENX999"
MPP = 0.5
H, W = 1200, 1000


def _cellvit_features() -> list[dict]:
    """CellViT's GeoJSON: one MultiPolygon feature per nucleus class."""
    square = [[[100, 200], [110, 200], [110, 210], [100, 210], [100, 200]]]  # 10 × 10 px at (105, 205)
    rect = [[[300, 300], [320, 300], [320, 305], [300, 305], [300, 300]]]  # 20 × 5 px, horizontal
    tri = [[[500, 500], [512, 500], [500, 509], [500, 500]]]
    return [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": [square, rect]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Neoplastic", "color": [1, 2, 3]},
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": [tri]},
            "properties": {"objectType": "annotation", "classification": {"name": "Inflammatory"}},
        },
    ]


def _write_hest(root: Path, *, cellvit: str | None = "geojson", meta_extra: dict | None = None) -> Path:
    for d in ("st", "wsis", "metadata", "cellvit_seg"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    n, g = 30, 12
    xy = np.c_[rng.uniform(100, W - 100, n), rng.uniform(100, H - 100, n)]
    adata = ad.AnnData(
        X=rng.poisson(3.0, (n, g)).astype(np.float32),  # HEST stores counts as floats
        obs=pd.DataFrame(
            {
                "in_tissue": np.ones(n, int),
                "array_row": np.arange(n),
                "array_col": np.arange(n) * 2,
                "pxl_col_in_fullres": xy[:, 0],
                "pxl_row_in_fullres": xy[:, 1],
            },
            index=[f"BC{i:03d}-1" for i in range(n)],
        ),
        var=pd.DataFrame(index=[f"G{j}" for j in range(g)]),
    )
    adata.obsm["spatial"] = xy
    adata.write_h5ad(root / "st" / f"{SID}.h5ad")
    img = np.full((H, W, 3), 230, np.uint8)
    img[200:900, 150:850] = (150, 80, 160)
    with tifffile.TiffWriter(root / "wsis" / f"{SID}.tif") as tw:
        tw.write(img, subifds=1, tile=(256, 256), photometric="rgb")
        tw.write(img[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb")
    meta = {
        "pixel_size_um_estimated": MPP,
        "pixel_size_um_embedded": 0.2738,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "patient": "Patient 4",
        "st_technology": "Visium",
        **(meta_extra or {}),
    }
    (root / "metadata" / f"{SID}.json").write_text(json.dumps(meta))
    if cellvit == "geojson":
        (root / "cellvit_seg" / f"{SID}_cellvit_seg.geojson").write_text(json.dumps(_cellvit_features()))
    elif cellvit == "parquet":
        import geopandas as gpd
        import shapely

        rows = []
        for f in _cellvit_features():
            for poly in shapely.geometry.shape(f["geometry"]).geoms:
                rows.append({"geometry": poly, "class": f["properties"]["classification"]["name"]})
        gpd.GeoDataFrame(rows, geometry="geometry").to_parquet(
            root / "cellvit_seg" / f"{SID}_cellvit_seg.parquet"
        )
    return root


@pytest.fixture
def hest_root(tmp_path) -> Path:
    return _write_hest(tmp_path / "hest")


def test_spots_counts_and_metadata(hest_root):
    sdata = bs.io.read_hest(hest_root, SID)
    src = ad.read_h5ad(hest_root / "st" / f"{SID}.h5ad")
    table = sdata.tables[K.TABLE]
    assert table.shape == (30, 12)
    assert np.issubdtype(table.X.dtype, np.integer)
    np.testing.assert_array_equal(table.X.toarray(), src.X.astype(int))
    np.testing.assert_allclose(table.obsm[K.SPATIAL], src.obsm["spatial"])
    assert list(table.obs["array_col"][:3]) == [0, 2, 4]
    assert _sdata.get_mpp(sdata, K.IMAGE) == MPP  # estimated, not embedded
    assert _sdata.mpp_source(sdata, K.IMAGE) == "metadata"
    np.testing.assert_allclose(sdata.shapes[K.SPOTS]["radius"], 55.0 / 2 / MPP)
    assert _sdata.slide_info(sdata) == {K.SAMPLE_ID: SID, K.PATIENT_ID: "Patient 4"}
    assert set(table.obs[K.PATIENT_ID]) == {"Patient 4"}
    tree = sdata.images[K.IMAGE]
    assert [next(iter(tree[k].values())).shape for k in tree] == [(3, H, W), (3, H // 2, W // 2)]
    img = np.asarray(_sdata.get_image(sdata, K.IMAGE).data)
    x, y = np.round(table.obsm[K.SPATIAL]).astype(int).T
    inside = (x >= 150) & (x < 850) & (y >= 200) & (y < 900)
    np.testing.assert_array_equal(img[0, y, x] == 150, inside)  # spots read the pixel under them


def test_cellvit_nuclei_become_cells(hest_root):
    sdata = bs.io.read_hest(hest_root, SID)
    cells = sdata.tables[K.CELLS]
    assert cells.n_obs == 3
    obs = cells.obs
    assert list(obs[K.CELL_ID]) == [1, 2, 3]
    assert list(obs["cellvit_class"]) == ["Neoplastic", "Neoplastic", "Inflammatory"]
    np.testing.assert_allclose(obs[[K.X_PX, K.Y_PX]].to_numpy()[0], [105.0, 205.0])
    np.testing.assert_allclose(obs[K.AREA_UM2].to_numpy(), np.array([100.0, 100.0, 54.0]) * MPP**2)
    np.testing.assert_allclose(obs[[K.X_UM, K.Y_UM]].to_numpy()[0], [105.0 * MPP, 205.0 * MPP])
    # 20 × 5 rectangle: regionprops-style axes 4·sqrt(var) = 20/sqrt(3)·2 and 5/sqrt(3)·2; horizontal
    np.testing.assert_allclose(obs["major_axis_um"].iloc[1], 4 * np.sqrt(20**2 / 12) * MPP)
    np.testing.assert_allclose(obs["minor_axis_um"].iloc[1], 4 * np.sqrt(5**2 / 12) * MPP)
    assert abs(abs(obs["orientation"].iloc[1]) - np.pi / 2) < 1e-9
    shapes = sdata.shapes[K.CELL_SHAPES]
    np.testing.assert_allclose(shapes["radius"].iloc[0], np.sqrt(100 / np.pi))


def test_moments_match_skimage_regionprops_on_a_rasterised_ellipse():
    import shapely
    from skimage.draw import ellipse
    from skimage.measure import find_contours, regionprops

    from bitro_sc.io._hest import polygon_props

    mask = np.zeros((80, 80), np.uint8)
    rr, cc = ellipse(40, 38, 12, 25, rotation=np.deg2rad(30))
    mask[rr, cc] = 1
    ref = regionprops(mask)[0]
    contour = find_contours(np.pad(mask, 1), 0.5)[0] - 1  # (row, col), sub-pixel
    rec = polygon_props([shapely.Polygon(contour[:, ::-1])]).iloc[0]
    assert rec["x_px"] == pytest.approx(ref.centroid[1], abs=0.1)
    assert rec["y_px"] == pytest.approx(ref.centroid[0], abs=0.1)
    assert rec["major_axis_px"] == pytest.approx(ref.axis_major_length, rel=0.03)
    assert rec["minor_axis_px"] == pytest.approx(ref.axis_minor_length, rel=0.05)
    assert rec["orientation"] == pytest.approx(ref.orientation, abs=0.03)
    assert rec["eccentricity"] == pytest.approx(ref.eccentricity, abs=0.02)


def test_cellvit_parquet_gives_the_same_cells(tmp_path, hest_root):
    other = _write_hest(tmp_path / "hest_pq", cellvit="parquet")
    a = bs.io.read_hest(hest_root, SID).tables[K.CELLS].obs
    b = bs.io.read_hest(other, SID).tables[K.CELLS].obs
    pd.testing.assert_frame_equal(a, b)


def test_cells_false_and_absent_segmentation_write_no_cells(tmp_path, hest_root):
    assert K.CELLS not in bs.io.read_hest(hest_root, SID, cells=False).tables
    assert K.CELLS not in bs.io.read_hest(_write_hest(tmp_path / "nocells", cellvit=None), SID).tables


def test_user_mpp_and_patient_override_metadata(hest_root):
    sdata = bs.io.read_hest(hest_root, SID, mpp=0.25, patient_id="P9")
    assert _sdata.get_mpp(sdata, K.IMAGE) == 0.25
    assert _sdata.mpp_source(sdata, K.IMAGE) == "user"
    np.testing.assert_allclose(sdata.shapes[K.SPOTS]["radius"], 55.0 / 2 / 0.25)
    assert _sdata.slide_info(sdata)[K.PATIENT_ID] == "P9"


def test_survives_zarr_round_trip(hest_root, zarr_roundtrip):
    sdata = bs.io.read_hest(hest_root, SID)
    back = zarr_roundtrip(sdata)
    assert list(back.tables[K.CELLS].obs["cellvit_class"]) == ["Neoplastic", "Neoplastic", "Inflammatory"]


@pytest.mark.parametrize(
    ("missing", "what"),
    [
        ("st/TENX999.h5ad", "HEST expression"),
        ("wsis/TENX999.tif", "HEST WSI"),
        ("metadata/TENX999.json", "metadata"),
    ],
)
def test_missing_files_are_named(hest_root, missing, what):
    (hest_root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=what):
        bs.io.read_hest(hest_root, SID)


def test_unknown_pixel_size_or_spot_diameter_is_an_error(tmp_path):
    root = _write_hest(
        tmp_path / "a", meta_extra={"pixel_size_um_estimated": None, "pixel_size_um_embedded": None}
    )
    with pytest.raises(ValueError, match=r"no `pixel_size_um_estimated`.*pass `mpp=`"):
        bs.io.read_hest(root, SID)
    root = _write_hest(tmp_path / "b", meta_extra={"spot_diameter": None, "st_technology": "Slide-seq"})
    with pytest.raises(ValueError, match="no `spot_diameter`"):
        bs.io.read_hest(root, SID)


def test_spots_outside_the_wsi_are_an_error(hest_root):
    path = hest_root / "st" / f"{SID}.h5ad"
    adata = ad.read_h5ad(path)
    adata.obsm["spatial"] = adata.obsm["spatial"] * 3  # e.g. coordinates of another resolution
    adata.write_h5ad(path)
    with pytest.raises(ValueError, match="outside the image"):
        bs.io.read_hest(hest_root, SID)
