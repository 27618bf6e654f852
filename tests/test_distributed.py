"""dask.distributed: segmentation and features over tiles and over many slides at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _prepare(sdata) -> pd.DataFrame:
    bs.tl.segment(sdata, tile_um=60, progress=False)
    bs.tl.cell_features(sdata, progress=False)
    return sdata.tables["cells"]


def test_tiles_on_a_client_give_the_same_cells_and_features(client):
    reference = _prepare(bs.datasets.synthetic(kind="visium", size_um=220, seed=3))
    with client.as_current(), distributed.get_task_stream(client) as stream:
        on_cluster = _prepare(bs.datasets.synthetic(kind="visium", size_um=220, seed=3))
    keys = [str(t["key"]) for t in stream.data]
    assert sum("run_tile" in k for k in keys) >= 4  # the tiles really ran on the cluster
    assert reference.n_obs > 30
    pd.testing.assert_frame_equal(reference.obs, on_cluster.obs)
    np.testing.assert_array_equal(reference.obsm["X_bitro"], on_cluster.obsm["X_bitro"])


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory) -> list[Path]:
    import tifffile

    sdata = bs.datasets.synthetic(kind="visium", size_um=600, seed=11)
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    folder = tmp_path_factory.mktemp("dist_slides")
    paths = []
    for i in range(4):
        y, x = 300 + 260 * (i // 2), 300 + 260 * (i % 2)
        paths.append(folder / f"d{i}.tif")
        tifffile.imwrite(paths[-1], img[y : y + 260, x : x + 260], tile=(128, 128))
    return paths


def test_slides_run_in_parallel_on_a_client_with_the_same_results(client, slide_files, tmp_path):
    from spatialdata import read_zarr

    slides = [{"path": str(p), "mpp": 0.5} for p in slide_files]
    kw = {
        "steps": ["segment", "cell_features", "cell_graph"],
        "params": {"segment": {"tissue": False}},
        "progress": False,
    }
    local = bs.tl.run_batch(slides, stores=tmp_path / "local", **kw)
    spread = bs.tl.run_batch(slides, stores=tmp_path / "cluster", client=client, max_parallel=4, **kw)
    assert list(spread["status"]) == ["done"] * 4
    assert list(spread["slide"]) == list(local["slide"])
    # slides ran at the same time, not one after another: some slide started before another finished
    first_end = spread["finished"].min()
    assert (spread["started"] < first_end).sum() >= 2
    for name in local["slide"]:
        a = read_zarr(tmp_path / "local" / f"{name}.zarr").tables["cells"]
        b = read_zarr(tmp_path / "cluster" / f"{name}.zarr").tables["cells"]
        assert a.n_obs > 10
        pd.testing.assert_frame_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.obsm["X_bitro"], b.obsm["X_bitro"])
        assert (a.obsp["spatial_connectivities"] != b.obsp["spatial_connectivities"]).nnz == 0
