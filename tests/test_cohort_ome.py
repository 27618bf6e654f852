"""OME-TIFF slides: a tiled JPEG OME pyramid (levels in SubIFDs, pixel size in the OME-XML) is read
lazily with its pixel size and levels, and segments like the same pixels in a plain TIFF."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs

tifffile = pytest.importorskip("tifffile")


def _write(path, img: np.ndarray, *, ome: bool, mpp: float = 0.5) -> None:
    half = img[::2, ::2]
    kw = {"tile": (128, 128), "photometric": "rgb", "compression": "jpeg"}
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    meta |= {"PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, ome=ome) as tif:
        tif.write(img, subifds=1, **kw, **({"metadata": meta} if ome else res))
        tif.write(half, subfiletype=1, **kw)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    sdata = bs.datasets.synthetic(kind="visium", size_um=300, seed=4)
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    return np.ascontiguousarray(img[:512, :512])


def test_an_ome_pyramid_is_read_lazily_with_its_pixel_size(image, tmp_path):
    path = tmp_path / "slide.ome.tif"
    _write(path, image, ome=True, mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert len(tif.series[0].levels) == 2
    sdata = bs.io.read_wsi(path)
    assert bs._sdata.get_mpp(sdata, "he") == pytest.approx(0.5)  # from the OME-XML, µm
    he = sdata.images["he"]
    assert list(he.keys()) == ["scale0", "scale1"]
    full = he["scale0"]["image"].data
    assert full.shape == (3, 512, 512)
    expected = tifffile.imread(path)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(full[:, 100:300, 50:250]), 0, -1),
                                  expected[100:300, 50:250])  # fmt: skip
    # the lazy graph holds a path, not pixels: it pickles small and reads the same region back
    blob = pickle.dumps(full[:, :128, :128])
    assert len(blob) < 50_000
    np.testing.assert_array_equal(np.asarray(pickle.loads(blob)), np.asarray(full[:, :128, :128]))


def test_ome_and_plain_tiff_of_the_same_pixels_give_the_same_cells(image, tmp_path):
    cells = []
    for ome in (False, True):
        path = tmp_path / ("s.ome.tif" if ome else "s.tif")
        _write(path, image, ome=ome)
        sdata = bs.io.read_wsi(path)
        bs.tl.segment(sdata, tissue=False, tile_um=100, progress=False)
        cells.append(sdata.tables["cells"].obs)
    assert cells[0].shape[0] > 20
    pd.testing.assert_frame_equal(cells[0], cells[1])
