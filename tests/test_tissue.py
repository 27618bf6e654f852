"""Tests of `bs.pp.tissue_mask`."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata


def slide_with_disc(*, size_px: int = 600, mpp: float = 2.0, radius_px: int = 180, hole_px: int = 0):
    """Glass with a pink disc of tissue (optionally with a hole); returns the slide and the truth mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size_px, :size_px]
    tissue = (yy - 300) ** 2 + (xx - 280) ** 2 < radius_px**2
    if hole_px:
        tissue &= (yy - 300) ** 2 + (xx - 280) ** 2 >= hole_px**2
    img = np.where(tissue[..., None], [220, 150, 200], [243, 240, 244]).astype(np.float32)
    img += rng.normal(0, 4, img.shape)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    sdata = sd.SpatialData(
        images={
            K.IMAGE: Image2DModel.parse(
                np.moveaxis(rgb, -1, 0),
                dims=("c", "y", "x"),
                transformations=_sdata.micron_transformations(mpp),
            )
        }
    )
    return sdata, tissue


def test_tissue_polygon_matches_the_tissue():
    sdata, truth = slide_with_disc()
    gdf = bs.pp.tissue_mask(sdata, level_um=8.0)
    assert K.TISSUE in sdata.shapes
    assert len(gdf) == 1
    area_px = float(gdf.geometry.area.sum())
    assert area_px == pytest.approx(truth.sum(), rel=0.03)
    assert gdf["area_um2"].sum() == pytest.approx(truth.sum() * 4.0, rel=0.03)
    cx, cy = gdf.geometry.iloc[0].centroid.coords[0]
    assert (cx, cy) == (pytest.approx(280, abs=3), pytest.approx(300, abs=3))
    t = get_transformation(sdata.shapes[K.TISSUE], get_all=True)
    assert set(t) == {K.PIXEL_CS, K.MICRON_CS}


def test_large_holes_stay_small_holes_fill():
    sdata, truth = slide_with_disc(hole_px=60)  # 60 px radius at 2 µm/px: 45,000 µm², kept
    gdf = bs.pp.tissue_mask(sdata, max_hole_um2=5_000)
    assert len(gdf.geometry.iloc[0].interiors) == 1
    assert float(gdf.geometry.area.sum()) == pytest.approx(truth.sum(), rel=0.05)
    sdata2, _ = slide_with_disc(hole_px=60)
    gdf2 = bs.pp.tissue_mask(sdata2, max_hole_um2=100_000)
    assert len(gdf2.geometry.iloc[0].interiors) == 0


def test_small_debris_is_not_tissue():
    sdata, _ = slide_with_disc(radius_px=30)  # 30 px at 2 µm/px: ~11,000 µm² < 20,000 µm²
    with pytest.warns(UserWarning, match="No tissue"):
        gdf = bs.pp.tissue_mask(sdata)
    assert len(gdf) == 0
    assert K.TISSUE not in sdata.shapes


def test_tissue_mask_refuses_to_overwrite_and_can_return_only():
    sdata, _ = slide_with_disc()
    bs.pp.tissue_mask(sdata)
    bs.pp.tissue_mask(sdata)  # a re-run replaces its own mask
    sdata.shapes["mine"] = sdata.shapes["tissue"].copy()
    with pytest.raises(ValueError, match=r"'mine' \(not written by bitro_sc.*overwrite=True"):
        bs.pp.tissue_mask(sdata, key_added="mine")
    gdf = bs.pp.tissue_mask(sdata, key_added="other", inplace=False)
    assert len(gdf) == 1
    assert "other" not in sdata.shapes
    bs.pp.tissue_mask(sdata, overwrite=True)


def test_tissue_mask_needs_a_pixel_size():
    sdata = sd.SpatialData(
        images={"he": Image2DModel.parse(np.zeros((3, 50, 50), np.uint8), dims=("c", "y", "x"))}
    )
    with pytest.raises(ValueError, match="pixel size"):
        bs.pp.tissue_mask(sdata)


def test_tissue_mask_reads_the_pyramid_level_not_the_full_resolution_image():
    from bitro_sc.pp._tissue import thumbnail

    sdata, _ = slide_with_disc(mpp=0.5, size_px=600)
    img = _sdata.get_image(sdata, K.IMAGE)
    rgb = np.moveaxis(img.values, 0, -1)
    levels = [rgb, rgb[::2, ::2], rgb[::4, ::4]]
    sdata = sd.SpatialData(images={K.IMAGE: bs.io._common.image_element(levels, mpp=0.5)})
    thumb, scale = thumbnail(sdata, K.IMAGE, mpp=0.5, target_um=4.0)
    assert scale == 8.0  # the 4x level (2 µm/px), then 2 x 2 block means
    np.testing.assert_array_equal(thumb.shape, (75, 75, 3))
    coarse = levels[2][:150, :150].astype(np.float32).reshape(75, 2, 75, 2, 3).mean((1, 3))
    np.testing.assert_array_equal(thumb, np.clip(np.rint(coarse), 0, 255).astype(np.uint8))
