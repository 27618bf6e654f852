"""bs.io.read_wsi on tiled pyramidal (OME-)TIFFs written by the tests."""

from __future__ import annotations

import pickle
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata

H, W = 2100, 1800  # full-resolution size (px) of the test slide


def _slide(h: int = H, w: int = W) -> np.ndarray:
    """A smooth RGB pattern with per-pixel detail, so misplaced tiles are detected."""
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([(xx * 7 + yy) % 251, (yy * 5 + xx * 3) % 241, (xx ^ yy) % 239], axis=-1)
    return rgb.astype(np.uint8)


def _write_pyramid(path: Path, img: np.ndarray, *, mpp: float | None, levels: int = 3, **kwargs) -> list:
    """Tiled pyramidal TIFF (SubIFDs), resolution tags in px/cm when ``mpp`` is given."""
    pyramid = [img]
    for _ in range(levels - 1):
        pyramid.append(pyramid[-1][::2, ::2])
    opts = {"tile": (256, 256), "photometric": "rgb", **kwargs}
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(pyramid):
            res = (
                {}
                if mpp is None
                else {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            )
            extra = {"subifds": levels - 1} if i == 0 else {"subfiletype": 1}
            tw.write(lv, **res, **extra, **opts)
    return pyramid


@pytest.fixture(scope="module")
def slide_tif(tmp_path_factory) -> tuple[Path, list]:
    path = tmp_path_factory.mktemp("wsi") / "slide_01.tif"
    return path, _write_pyramid(path, _slide(), mpp=0.5)


def test_levels_pixels_and_mpp_come_from_the_file(slide_tif):
    path, pyramid = slide_tif
    sdata = bs.io.read_wsi(path)
    tree = sdata.images[K.IMAGE]
    shapes = [tuple(next(iter(tree[k].values())).shape) for k in tree]
    assert shapes == [(3, *lv.shape[:2]) for lv in pyramid]
    full = _sdata.get_image(sdata, K.IMAGE)
    assert full.dtype == np.uint8
    window = full.isel(y=slice(700, 1300), x=slice(1000, 1700)).values
    np.testing.assert_array_equal(window, pyramid[0][700:1300, 1000:1700].transpose(2, 0, 1))
    coarsest = next(iter(tree["scale2"].values())).values
    np.testing.assert_array_equal(coarsest, pyramid[2].transpose(2, 0, 1))
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(0.5)
    assert _sdata.mpp_source(sdata, K.IMAGE) == "metadata"
    assert _sdata.slide_info(sdata)[K.SAMPLE_ID] == "slide_01"


def test_reading_is_lazy(slide_tif):
    path, _ = slide_tif
    tracemalloc.start()
    sdata = bs.io.read_wsi(path, chunk_px=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < H * W * 3 / 10  # far less than the full-resolution pixels (11 MB)
    data = _sdata.get_image(sdata, K.IMAGE).data
    assert data.npartitions == 9 * 8  # 256 px chunks over 2100 × 1800
    assert any(str(k).startswith("tiff-") for k in data.dask.layers)  # read from the file on compute
    again = pickle.loads(pickle.dumps(data))  # tasks can go to the worker processes of a dask cluster
    np.testing.assert_array_equal(again[:, 100:300, 200:260].compute(), data[:, 100:300, 200:260].compute())


def test_single_level_large_tiff_gets_a_lazy_pyramid(tmp_path):
    img = _slide(300, 4200)  # long side > 4096 px
    tifffile.imwrite(tmp_path / "flat.tif", img, tile=(256, 256), photometric="rgb")
    sdata = bs.io.read_wsi(tmp_path / "flat.tif", mpp=0.25)
    tree = sdata.images[K.IMAGE]
    assert len(tree.children) == 3  # 4200 -> 2100 -> 1050
    level1 = next(iter(tree["scale1"].values())).values
    expected = img[:300:2, :4200:2].astype(np.uint16) + img[1::2, ::2] + img[::2, 1::2] + img[1::2, 1::2] + 2
    np.testing.assert_array_equal(level1, (expected // 4).astype(np.uint8).transpose(2, 0, 1))
    assert _sdata.get_mpp(sdata, K.IMAGE) == 0.25
    assert _sdata.mpp_source(sdata, K.IMAGE) == "user"


def test_ome_physical_size_is_read(tmp_path):
    img = _slide(600, 500)
    tifffile.imwrite(
        tmp_path / "s.ome.tif",
        img,
        photometric="rgb",
        tile=(256, 256),
        metadata={"axes": "YXS", "PhysicalSizeX": 0.2425, "PhysicalSizeY": 0.2425},
    )
    sdata = bs.io.read_wsi(tmp_path / "s.ome.tif")
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(0.2425)
    assert _sdata.slide_info(sdata)[K.SAMPLE_ID] == "s"
    np.testing.assert_array_equal(_sdata.get_image(sdata, K.IMAGE).values, img.transpose(2, 0, 1))


def test_unknown_pixel_size_asks_for_mpp(tmp_path):
    _write_pyramid(tmp_path / "nores.tif", _slide(600, 500), mpp=None, levels=2)
    with pytest.raises(ValueError, match=r"no usable pixel size .* Pass `mpp=`"):
        bs.io.read_wsi(tmp_path / "nores.tif")
    sdata = bs.io.read_wsi(tmp_path / "nores.tif", mpp=0.3)
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(0.3)


def test_default_72_dpi_is_not_taken_as_pixel_size(tmp_path):
    img = _slide(400, 300)
    tifffile.imwrite(tmp_path / "dpi.tif", img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(ValueError, match=r"72 px per inch = 352\.8 µm/px, implausible"):
        bs.io.read_wsi(tmp_path / "dpi.tif")


def test_user_mpp_conflicting_with_the_file_warns(slide_tif):
    with pytest.warns(UserWarning, match=r"differs from the file's 0\.5 µm/px"):
        sdata = bs.io.read_wsi(slide_tif[0], mpp=0.25)
    assert _sdata.get_mpp(sdata, K.IMAGE) == 0.25


def test_missing_file_and_grey_image_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"slide file .* does not exist"):
        bs.io.read_wsi(tmp_path / "missing.tif", mpp=0.5)
    tifffile.imwrite(tmp_path / "grey.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"is greyscale.*RGB H&E image is needed"):
        bs.io.read_wsi(tmp_path / "grey.tif", mpp=0.5)


def test_other_formats_without_openslide_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "slide.mrxs").write_bytes(b"not a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'bitro-sc\[wsi\]'"):
        bs.io.read_wsi(tmp_path / "slide.mrxs")


def test_openslide_backend_reads_the_same_pixels(tmp_path):
    openslide = pytest.importorskip("openslide")
    path = tmp_path / "pages.tif"  # OpenSlide's generic TIFF pyramid: one page per level
    pyramid = [_slide()]
    for _ in range(2):
        pyramid.append(pyramid[-1][::2, ::2])
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(pyramid):
            tw.write(lv, tile=(256, 256), photometric="rgb", subfiletype=int(i > 0))
    try:
        openslide.OpenSlide(str(path)).close()
    except openslide.OpenSlideError as err:  # pragma: no cover - depends on the OpenSlide build
        pytest.skip(f"this OpenSlide build cannot open generic tiled TIFFs: {err}")
    sdata = bs.io.read_wsi(path, backend="openslide", mpp=0.5)
    tree = sdata.images[K.IMAGE]
    assert [next(iter(tree[k].values())).shape for k in tree] == [(3, *lv.shape[:2]) for lv in pyramid]
    full = _sdata.get_image(sdata, K.IMAGE)
    window = full.isel(y=slice(900, 1400), x=slice(1000, 1300)).values
    np.testing.assert_array_equal(window, pyramid[0][900:1400, 1000:1300].transpose(2, 0, 1))
    coarsest = next(iter(tree["scale2"].values())).values
    np.testing.assert_array_equal(coarsest, pyramid[2].transpose(2, 0, 1))


def test_survives_zarr_round_trip(slide_tif, zarr_roundtrip):
    sdata = bs.io.read_wsi(slide_tif[0], patient_id="p7")
    back = zarr_roundtrip(sdata)
    assert _sdata.get_mpp(back, K.IMAGE) == pytest.approx(0.5)
    assert _sdata.slide_info(back) == {K.SAMPLE_ID: "slide_01", K.PATIENT_ID: "p7"}


def test_decoded_regions_are_cached_and_each_read_is_its_own_copy(slide_tif):
    from bitro_sc.io import _wsi

    path, pyramid = slide_tif
    level = _wsi.tiff_levels(path, chunk_px=256)[0]
    arr = next(a for a in level.dask.values() if isinstance(a, _wsi._TiffLevel))
    first = arr[0:256, 256:512]

    class Counting:  # the file reader, counting what it decodes
        def __init__(self, z):
            self.z, self.n = z, 0

        def __getitem__(self, index):
            self.n += 1
            return self.z[index]

    arr._zarr = reader = Counting(arr._zarr)
    first[:] = 0  # the caller owns what it gets: writing into it never reaches the cache
    second = arr[0:256, 256:512]
    assert reader.n == 0  # served from the cache, not decoded again
    np.testing.assert_array_equal(second, pyramid[0][0:256, 256:512])
    arr.cache_bytes = 256 * 256 * 3 * 2  # room for two regions: the least recently used goes
    for x0 in (0, 256, 512, 768):
        arr[0:256, x0 : x0 + 256]
    assert reader.n == 3
    assert arr._cached <= arr.cache_bytes
    assert len(arr._cache) == 2
    again = pickle.loads(pickle.dumps(arr))  # a worker process starts with an empty cache
    assert not again._cache
    np.testing.assert_array_equal(again[256:512, 0:256], pyramid[0][256:512, 0:256])
