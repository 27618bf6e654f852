"""bs.io.read_visium on the real Space Ranger 1.0 folder and on Space Ranger 2/3 folders the tests write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata

COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _saturation(rgb_cyx: np.ndarray) -> np.ndarray:
    rgb = rgb_cyx.astype(np.int16)
    return rgb.max(axis=0) - rgb.min(axis=0)


# --- real data: Space Ranger 1.0 ---------------------------------------------------------------


def test_sr1_reads_in_tissue_spots_with_integer_counts(visium_sr1_dir):
    sdata = bs.io.read_visium(visium_sr1_dir)
    table = sdata.tables[K.TABLE]
    assert table.shape == (100, 100)
    assert table.X.format == "csr"
    assert np.issubdtype(table.X.dtype, np.integer)
    assert table.obs[K.IN_TISSUE].all()
    assert table.obs_names[0] == "AAACAAGTATCTCCCA-1"
    assert list(table.obs.loc["AAACAAGTATCTCCCA-1", ["array_row", "array_col"]]) == [50, 102]
    assert "gene_ids" in table.var.columns
    assert _sdata.slide_info(sdata)[K.SAMPLE_ID] == "visium_spaceranger1"
    # default image: hires (2000 px), spots scaled by tissue_hires_scalef
    assert dict(_sdata.get_image(sdata, K.IMAGE).sizes) == {"c": 3, "y": 2000, "x": 2000}
    scalef = json.loads((visium_sr1_dir / "spatial" / "scalefactors_json.json").read_text())
    s, d = scalef["tissue_hires_scalef"], scalef["spot_diameter_fullres"]
    np.testing.assert_allclose(table.obsm[K.SPATIAL][0], [9811 * s, 8513 * s])
    spots = sdata.shapes[K.SPOTS]
    np.testing.assert_allclose(spots["radius"], d * s / 2)
    np.testing.assert_allclose(np.c_[spots.geometry.x, spots.geometry.y], table.obsm[K.SPATIAL])
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(55.0 / d / s)
    assert _sdata.mpp_source(sdata, K.IMAGE) == "scalefactors (55 µm spot diameter)"


def test_sr1_counts_equal_scanpy(visium_sr1_dir):
    import scanpy as sc

    ref = sc.read_10x_h5(visium_sr1_dir / "filtered_feature_bc_matrix.h5")
    table = bs.io.read_visium(visium_sr1_dir).tables[K.TABLE]
    np.testing.assert_array_equal(table.X.toarray(), ref[table.obs_names, table.var_names].X.toarray())


def test_sr1_lowres_spots_sit_on_tissue(visium_sr1_dir):
    sdata = bs.io.read_visium(visium_sr1_dir, image="lowres")
    img = np.asarray(_sdata.get_image(sdata, K.IMAGE).data)
    assert img.shape == (3, 600, 600)
    sat = _saturation(img)
    glass = np.median(sat[:60, :60])  # top-left corner: glass
    xy = np.round(sdata.tables[K.TABLE].obsm[K.SPATIAL]).astype(int)
    under = np.array([sat[y - 3 : y + 4, x - 3 : x + 4].mean() for x, y in xy])  # 7 px ≈ 2 spot diameters
    assert glass < 10
    assert (under > glass + 10).mean() > 0.9  # pink/purple stain, not grey glass


def test_sr1_survives_zarr_round_trip(visium_sr1_dir, zarr_roundtrip):
    sdata = bs.io.read_visium(visium_sr1_dir, patient_id="p1")
    back = zarr_roundtrip(sdata)
    assert _sdata.get_mpp(back, K.IMAGE) == pytest.approx(_sdata.get_mpp(sdata, K.IMAGE))
    assert _sdata.slide_info(back) == {K.SAMPLE_ID: "visium_spaceranger1", K.PATIENT_ID: "p1"}


# --- Space Ranger 2.x / 3.x folders written by the test ---------------------------------------

FULL = 1200  # px, side of the synthetic full-resolution image


def _write_sr_folder(src: Path, dst: Path, *, layout: str) -> Path:
    """A Space Ranger folder with the real SR1 counts, positions rescaled to a 1200 px image.

    The images are white glass with a dark disc under every spot, so landing is checkable.
    ``layout``: "sr1" (headerless list), "sr2" (headered csv) or "sr3" (parquet).
    """
    spatial = dst / "outs" / "spatial"
    spatial.mkdir(parents=True)
    shutil.copy(src / "filtered_feature_bc_matrix.h5", dst / "outs")
    pos = pd.read_csv(src / "spatial" / "tissue_positions_list.csv", header=None, names=COLUMNS)
    k = FULL / 13333.0
    pos["pxl_row_in_fullres"] = (pos["pxl_row_in_fullres"] * k).round().astype(int)
    pos["pxl_col_in_fullres"] = (pos["pxl_col_in_fullres"] * k).round().astype(int)
    pos.loc[1, "in_tissue"] = 0  # one spot of the counts off tissue
    extra = pos.iloc[:3].copy()
    extra["barcode"] = ["NOTINCOUNTS-1", "NOTINCOUNTS-2", "NOTINCOUNTS-3"]
    extra["in_tissue"] = 0
    pos = pd.concat([pos, extra], ignore_index=True)
    if layout == "sr1":
        pos.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif layout == "sr2":
        pos.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        pos.to_parquet(spatial / "tissue_positions.parquet", index=False)
    diameter = 89.42751063343188 * k
    scalefactors = {
        "spot_diameter_fullres": diameter,
        "tissue_hires_scalef": 0.5,
        "fiducial_diameter_fullres": 144.0 * k,
        "tissue_lowres_scalef": 0.25,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    full = np.full((FULL, FULL, 3), 240, np.uint8)
    r = 12  # disc radius (px): 3 px in the lowres image
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx**2 + dy**2 <= r**2
    for x, y in zip(pos["pxl_col_in_fullres"], pos["pxl_row_in_fullres"], strict=True):
        full[y - r : y + r + 1, x - r : x + r + 1][disc] = (90, 40, 120)
    tifffile.imwrite(dst / "fullres.tif", full, photometric="rgb")
    Image.fromarray(full).resize((FULL // 2, FULL // 2), Image.BOX).save(spatial / "tissue_hires_image.png")
    Image.fromarray(full).resize((FULL // 4, FULL // 4), Image.BOX).save(spatial / "tissue_lowres_image.png")
    return dst


@pytest.fixture(scope="module")
def sr_folders(visium_sr1_dir, tmp_path_factory) -> dict[str, Path]:
    """One folder per layout, written once (read-only for the tests that use them)."""
    root = tmp_path_factory.mktemp("visium")
    return {lay: _write_sr_folder(visium_sr1_dir, root / f"sample_{lay}", layout=lay) for lay in LAYOUTS}


LAYOUTS = ("sr1", "sr2", "sr3")


@pytest.fixture(params=LAYOUTS)
def sr_folder(request, sr_folders) -> Path:
    return sr_folders[request.param]


@pytest.mark.parametrize(("image", "side"), [("hires", FULL // 2), ("lowres", FULL // 4), ("fullres", FULL)])
def test_every_layout_and_image_puts_spots_on_their_discs(sr_folder, image, side):
    sdata = bs.io.read_visium(sr_folder, image=image, fullres_image=sr_folder / "fullres.tif")
    table = sdata.tables[K.TABLE]
    assert table.n_obs == 99  # in-tissue spots of the counts
    assert "AAACACCAATAACTGC-1" not in table.obs_names  # set off tissue
    assert _sdata.slide_info(sdata)[K.SAMPLE_ID] == sr_folder.name  # parent of outs/
    img = np.asarray(_sdata.get_image(sdata, K.IMAGE).data)
    assert img.shape == (3, side, side)
    xy = np.round(table.obsm[K.SPATIAL]).astype(int)
    grey = img.mean(axis=0)
    assert grey[xy[:, 1], xy[:, 0]].max() < 150  # every centre on a dark disc
    assert np.median(grey) > 200
    radius = sdata.shapes[K.SPOTS]["radius"].iloc[0]
    mpp = _sdata.get_mpp(sdata, K.IMAGE)
    assert 2 * radius * mpp == pytest.approx(55.0)  # the spot is 55 µm in every image


def test_layouts_give_identical_tables(sr_folders):
    tables = [bs.io.read_visium(sr_folders[lay]).tables[K.TABLE] for lay in LAYOUTS]
    for t in tables[1:]:
        assert list(t.obs_names) == list(tables[0].obs_names)
        np.testing.assert_array_equal(t.obsm[K.SPATIAL], tables[0].obsm[K.SPATIAL])
        assert (t.X != tables[0].X).nnz == 0
        drop = [K.SAMPLE_ID]
        pd.testing.assert_frame_equal(t.obs.drop(columns=drop), tables[0].obs.drop(columns=drop))


def test_in_tissue_only_false_keeps_off_tissue_spots(sr_folders):
    table = bs.io.read_visium(sr_folders["sr2"], in_tissue_only=False).tables[K.TABLE]
    assert table.n_obs == 100
    assert table.obs[K.IN_TISSUE].sum() == 99


def test_user_mpp_is_of_the_fullres_image(sr_folders):
    sdata = bs.io.read_visium(sr_folders["sr3"], mpp=0.5)  # hires: scale factor 0.5
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(1.0)
    assert _sdata.mpp_source(sdata, K.IMAGE) == "user"


def test_sr3_with_fullres_survives_zarr_round_trip(sr_folders, zarr_roundtrip):
    zarr_roundtrip(bs.io.read_visium(sr_folders["sr3"], fullres_image="../fullres.tif"))


def test_missing_folder_and_files_are_named(visium_sr1_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Space Ranger directory .* does not exist"):
        bs.io.read_visium(tmp_path / "nope")
    folder = _write_sr_folder(visium_sr1_dir, tmp_path / "s", layout="sr2")
    with pytest.raises(FileNotFoundError, match=r"full-resolution image file .*missing\.tif' does not exist"):
        bs.io.read_visium(folder, fullres_image="missing.tif")
    with pytest.raises(ValueError, match="pass `fullres_image=`"):
        bs.io.read_visium(folder, image="fullres")
    (folder / "outs" / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="No tissue positions"):
        bs.io.read_visium(folder)


def test_barcodes_without_positions_are_rejected(visium_sr1_dir, tmp_path):
    folder = _write_sr_folder(visium_sr1_dir, tmp_path / "s", layout="sr2")
    path = folder / "outs" / "spatial" / "tissue_positions.csv"
    pd.read_csv(path).iloc[10:].to_csv(path, index=False)
    with pytest.raises(ValueError, match="10 of 100 barcodes of the counts have no row"):
        bs.io.read_visium(folder)


def test_image_smaller_than_spot_coordinates_is_rejected(visium_sr1_dir, tmp_path):
    folder = _write_sr_folder(visium_sr1_dir, tmp_path / "s", layout="sr2")
    path = folder / "outs" / "spatial" / "scalefactors_json.json"
    sf = json.loads(path.read_text())
    sf["tissue_hires_scalef"] = 2.0  # wrong scale factor: spots beyond the 600 px hires image
    path.write_text(json.dumps(sf))
    with pytest.raises(ValueError, match="outside the image"):
        bs.io.read_visium(folder)
