"""Shared fixtures.

Real data lives in ``../shared/data`` (from the repository root) or ``$BITRO_SC_DATA``. Tests that
need it skip with a reason when it is absent, and fail when it is absent under ``CI=true``.
The data is read-only: never write into it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bitro_sc as bs

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("BITRO_SC_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data; skip (or fail under CI) when it is absent."""
    root = _shared_data_dir()
    if root is None:
        msg = "real data not found: set $BITRO_SC_DATA or place it at ../shared/data"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def her2st_dir(shared_data: Path) -> Path:
    path = shared_data / "her2st"
    if not path.is_dir():
        pytest.fail(f"{path} is missing from the shared data")
    return path


@pytest.fixture(scope="session")
def visium_sr1_dir(shared_data: Path) -> Path:
    path = shared_data / "visium_spaceranger1"
    if not path.is_dir():
        pytest.fail(f"{path} is missing from the shared data")
    return path


@pytest.fixture
def nuclei_slide():
    """A fresh small ``bs.datasets.toy("nuclei")`` slide: 100 px image, cells from the true labels, spots."""
    return bs.datasets.toy("nuclei", seed=0, size_px=100)


@pytest.fixture
def zarr_roundtrip(tmp_path: Path):
    """``check(sdata, full_images=True) -> read_back``: write to zarr, read back, assert nothing changed.

    Compares every element and ``attrs`` with spatialdata's testing helper, and the transformations
    as affine (x, y) matrices (spatialdata adds the channel axis to an image's scale on write). With
    ``full_images=False`` (large real images) image pixels are compared on the coarsest level and on
    a 1024 px window of the finest level only; shapes, dtypes and transformations of every level in full.
    """
    import numpy as np

    def check(sdata, *, full_images: bool = True):
        import xarray as xr
        from spatialdata import read_zarr
        from spatialdata.testing import assert_elements_are_identical
        from spatialdata.transformations import get_transformation

        path = tmp_path / f"roundtrip_{len(list(tmp_path.glob('roundtrip_*')))}.zarr"
        sdata.write(path)
        back = read_zarr(path)
        names = sorted(name for _, name, _ in sdata.gen_elements())
        assert names == sorted(name for _, name, _ in back.gen_elements())
        assert sdata.attrs == back.attrs
        for _, name, element in sdata.gen_elements():
            other = back[name]
            if name in sdata.images and not full_images:
                levels0 = (
                    [element]
                    if isinstance(element, xr.DataArray)
                    else [next(iter(element[k].values())) for k in element]
                )
                levels1 = (
                    [other]
                    if isinstance(other, xr.DataArray)
                    else [next(iter(other[k].values())) for k in other]
                )
                assert [lv.shape for lv in levels0] == [lv.shape for lv in levels1], name
                assert [lv.dtype for lv in levels0] == [lv.dtype for lv in levels1], name
                np.testing.assert_array_equal(levels0[-1].values, levels1[-1].values)
                window = {"y": slice(1024, 2048), "x": slice(1024, 2048)}
                np.testing.assert_array_equal(levels0[0].isel(window).values, levels1[0].isel(window).values)
            else:
                assert_elements_are_identical(element, other, check_transformations=False)
            if name in sdata.tables:
                continue
            before = get_transformation(element, get_all=True)
            after = get_transformation(other, get_all=True)
            assert before.keys() == after.keys(), name
            for cs, t in before.items():
                m0 = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
                m1 = after[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
                np.testing.assert_allclose(m0, m1, err_msg=f"{name} -> {cs}")
        return back

    return check
