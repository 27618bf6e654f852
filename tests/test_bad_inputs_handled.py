"""Inputs that are unusual but unambiguous: converted correctly with a warning, the one documented way.

Also the overwrite rule (a re-run replaces a function's own output) and the zarr integrity check.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata
from bitro_sc._validate import to_rgb_uint8

RGB = np.array([[[200, 120, 180], [40, 30, 90]]], np.uint8)  # (1, 2, 3): pink and purple


def _converted(arr: np.ndarray, note: str) -> np.ndarray:
    with pytest.warns(UserWarning, match=note):
        return np.asarray(to_rgb_uint8(arr))


def test_float_image_in_0_255_is_rounded_not_clipped_to_white():
    out = _converted(RGB.astype(np.float32), r"float values in \[0, 255\]")
    np.testing.assert_array_equal(out, RGB)


def test_float_image_in_0_1_is_scaled_by_255():
    out = _converted(RGB.astype(np.float64) / 255.0, r"float values in \[0, 1\]")
    np.testing.assert_array_equal(out, RGB)


def test_uint16_holding_12_bit_values_is_scaled_by_its_bit_depth():
    twelve = (RGB.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    out = _converted(twelve, "holding 12-bit values")
    assert np.abs(out.astype(int) - RGB).max() <= 1  # not all black (÷257 would give ≤ 15)


def test_uint16_holding_8_bit_values_is_cast():
    out = _converted(RGB.astype(np.uint16), "holding 8-bit values")
    np.testing.assert_array_equal(out, RGB)


def test_uint16_full_range_is_divided_by_257():
    out = _converted(RGB.astype(np.uint16) * 257, "holding 16-bit values")
    np.testing.assert_array_equal(out, RGB)


def test_channel_first_array_is_read_channel_last():
    out = _converted(np.moveaxis(RGB, -1, 0).copy(), "channel-first")
    np.testing.assert_array_equal(out, RGB)


def test_rgba_is_composited_over_white():
    rgba = np.concatenate([RGB, np.array([[[255], [0]]], np.uint8)], axis=-1)
    out = _converted(rgba, "alpha channel; composited over white")
    np.testing.assert_array_equal(out[0, 0], RGB[0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # transparent = glass


def test_opaque_uint8_rgb_passes_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb_uint8(RGB) is RGB


def test_read_wsi_scales_a_12_bit_tiff(tmp_path: Path):
    img = np.tile((RGB.astype(np.uint32) * 4095 // 255).astype(np.uint16), (32, 16, 1))
    tifffile.imwrite(tmp_path / "s.tif", img, photometric="rgb")
    with pytest.warns(UserWarning, match="12-bit"):
        sdata = bs.io.read_wsi(tmp_path / "s.tif", mpp=0.5)
    he = _sdata.get_image(sdata, "he").transpose("y", "x", "c").values
    assert np.abs(he[:1, :2].astype(int) - RGB).max() <= 1


def test_read_wsi_reads_a_png_with_its_pixel_size(tmp_path: Path):
    from PIL import Image

    Image.fromarray(np.tile(RGB, (8, 8, 1))).save(tmp_path / "s.png")
    sdata = bs.io.read_wsi(tmp_path / "s.png", mpp=0.5)
    assert _sdata.get_mpp(sdata, "he") == 0.5
    with pytest.raises(ValueError, match=r"records no usable pixel size.*mpp="):
        bs.io.read_wsi(tmp_path / "s.png")


def test_read_st_sums_duplicated_gene_columns(tmp_path: Path):
    grid = [(x, y) for x in range(1, 5) for y in range(1, 4)]
    spots = pd.DataFrame(
        [{"x": x, "y": y, "pixel_x": 20.0 * x + 5, "pixel_y": 20.0 * y + 7} for x, y in grid]
    )
    counts = pd.DataFrame(
        np.arange(len(grid) * 3).reshape(-1, 3), index=[f"{x}x{y}" for x, y in grid], columns=["A", "B", "A"]
    )
    counts.to_csv(tmp_path / "c.tsv", sep="\t")
    with pytest.warns(UserWarning, match=r"\['A'\]\); their counts are summed"):
        sdata = bs.io.read_st(np.full((120, 110, 3), 200, np.uint8), tmp_path / "c.tsv", spots, sample_id="S")
    t = sdata.tables[K.TABLE]
    assert list(t.var_names) == ["A", "B"]
    expected = counts.iloc[:, 0].to_numpy() + counts.iloc[:, 2].to_numpy()
    assert t[:, "A"].X.toarray().ravel().tolist() == expected.tolist()


def test_sum_duplicate_genes_sums_x_and_every_layer():
    a = ad.AnnData(
        np.array([[1, 2, 3], [4, 5, 6]]),
        var=pd.DataFrame({"id": ["e1", "e2", "e3"]}, index=["A", "B", "A"]),
        layers={"counts": np.array([[1, 0, 1], [0, 1, 0]])},
    )
    b = bs.pp.sum_duplicate_genes(a, warn=False)
    assert list(b.var_names) == ["A", "B"]
    assert b.var["id"].tolist() == ["e1", "e2"]
    np.testing.assert_array_equal(b.X, [[4, 2], [10, 5]])
    np.testing.assert_array_equal(b.layers["counts"], [[2, 0], [0, 1]])
    assert bs.pp.sum_duplicate_genes(b) is b  # unique genes: nothing to do


def test_every_step_can_be_rerun_like_a_notebook_cell():
    """Each function re-run with the same key replaces its own output, and records itself as writer."""
    sdata = bs.datasets.toy("nuclei", seed=0, size_px=100)
    for _ in range(2):
        bs.segmentation.write_cells(sdata, sdata.labels[K.CELL_LABELS].values, mpp=0.5, overwrite=True)
        bs.tl.cell_features(sdata, progress=False)
        bs.tl.assign_cells(sdata)
        bs.tl.cell_graph(sdata, k=4)
    cells = sdata.tables[K.CELLS]
    assert K.FEATURES in cells.obsm
    assert K.CONNECTIVITIES in cells.obsp
    assert K.SPOT_ID in cells.obs
    assert _sdata.written_by(sdata, "cells/obsm/X_bitro") == "bs.tl.cell_features"
    assert _sdata.written_by(sdata, "cells/obs/spot_id") == "bs.tl.assign_cells"
    assert _sdata.written_by(sdata, "cells/obsp/spatial_connectivities") == "bs.tl.cell_graph"


def test_rewriting_the_cells_forgets_the_provenance_of_their_parts():
    sdata = bs.datasets.toy("nuclei", seed=0, size_px=100)
    bs.tl.assign_cells(sdata, overwrite=True)
    assert _sdata.written_by(sdata, "cells/obs/spot_id") == "bs.tl.assign_cells"
    bs.segmentation.write_cells(sdata, sdata.labels[K.CELL_LABELS].values, mpp=0.5, overwrite=True)
    assert _sdata.written_by(sdata, "cells/obs/spot_id") is None


def test_cell_level_overwrite_replaces_only_its_own_layer():
    import warnings as w

    slide = bs.datasets.toy("cells", grid=3)
    with w.catch_warnings():
        w.simplefilter("ignore")
        model = bs.tl.fit_baseline(slide, method="mean", genes=["gene0", "gene1"])
    bs.tl.predict_bitro(slide, model, level="cell")
    first = slide.tables[K.CELLS].layers["bitro"].copy()
    bs.tl.predict_bitro(slide, model, level="cell", key_added="again")
    bs.tl.predict_bitro(slide, model, level="cell", key_added="again", overwrite=True)
    cells = slide.tables[K.CELLS]
    assert set(cells.layers) == {"bitro", "again"}
    np.testing.assert_array_equal(cells.layers["bitro"], first)
    assert K.FEATURES in cells.obsm
    assert K.PHENOTYPE in cells.obs


def test_provenance_and_zarr_round_trip_through_write_zarr(tmp_path: Path):
    sdata = bs.datasets.toy("nuclei", seed=0, size_px=100)
    bs.tl.assign_cells(sdata, overwrite=True)
    back = bs.io.read_zarr(bs.io.write_zarr(sdata, tmp_path / "s.zarr"))
    assert back.attrs == sdata.attrs
    assert _sdata.written_by(back, "cells/obs/spot_id") == "bs.tl.assign_cells"
    from spatialdata.testing import assert_elements_are_identical

    for _, name, element in sdata.gen_elements():
        assert_elements_are_identical(element, back[name], check_transformations=False)


def test_a_store_without_manifest_warns_about_missing_chunks(tmp_path: Path):
    sdata = bs.datasets.toy("cells", grid=3)
    sdata.tables[K.TABLE].layers["zeros"] = np.zeros(sdata.tables[K.TABLE].shape, np.float32)
    sdata.write(tmp_path / "plain.zarr")  # zarr skips all-zero chunks
    with pytest.warns(UserWarning, match="no manifest and lacks chunks.*layers/zeros"):
        bs.io.read_zarr(tmp_path / "plain.zarr")
