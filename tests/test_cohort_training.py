"""Bulk training at cohort scale: bags streamed from per-slide stores, 2-process data parallel (gloo),
mixed precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import bitro_sc as bs

N_SLIDES = 5
TRAIN = {"epochs": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    """Five featurised bulk slides, one store each (tables and shapes; no image)."""
    from spatialdata import SpatialData

    slides = bs.datasets.synthetic(N_SLIDES, kind="bulk", size_um=220, seed=2, n_genes=30)
    for s in slides:
        bs.tl.segment(s, progress=False)
    bs.tl.cell_features(slides, progress=False)
    bs.tl.phenotypes(slides, n_clusters=3)
    for s in slides:
        bs.tl.cell_graph(s)
    folder = tmp_path_factory.mktemp("cohort")
    paths = []
    for i, s in enumerate(slides):
        paths.append(folder / f"b{i}.zarr")
        SpatialData(tables=dict(s.tables), shapes=dict(s.shapes), attrs=s.attrs).write(paths[-1])
    return paths


@pytest.fixture(scope="module")
def single(stores):
    torch.manual_seed(0)
    return bs.models.fit_cohort(stores, train=TRAIN, device="cpu", progress=False)


@pytest.mark.slow
def test_training_streams_slides_from_their_stores(single, stores):
    rec = single.record
    assert rec["level"] == "bulk"
    assert rec["device"] == "cpu"
    assert len(rec["history"]["train_loss"]) == TRAIN["epochs"]
    assert np.isfinite(rec["history"]["train_loss"]).all()
    streaming = rec["streaming"]
    assert streaming["slides_loaded"] == TRAIN["epochs"] * N_SLIDES  # every step read its slides again
    assert streaming["max_resident"] == 1 < N_SLIDES  # never more than one slide's tables in memory
    assert len(single.genes) == 30  # every gene of the bulk profiles
    # the model predicts a slide read back from its store like any fitted model
    from spatialdata import read_zarr

    sdata = read_zarr(stores[0], selection=("tables",))
    bs.tl.predict_bitro(sdata, single, level="bulk")
    pred = np.asarray(sdata.tables["bulk"].layers["bitro"])
    assert pred.shape[1] == sdata.tables["bulk"].n_vars
    assert np.isfinite(pred[:, sdata.tables["bulk"].var_names.get_indexer(single.genes)]).all()


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_trajectory(single, stores):
    ddp = bs.models.fit_cohort(
        stores, train=TRAIN, device="cpu", strategy="ddp", world_size=2, progress=False
    )
    np.testing.assert_allclose(
        ddp.record["history"]["train_loss"], single.record["history"]["train_loss"], rtol=1e-5
    )
    for (name, a), b in zip(single.net.state_dict().items(), ddp.net.state_dict().values(), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    streaming = ddp.record["streaming"]
    assert streaming["world_size"] == 2
    assert streaming["slides_loaded"] == TRAIN["epochs"] * N_SLIDES  # each slide read by one rank per epoch
    assert streaming["max_resident"] <= 2  # one slide per process


@pytest.mark.slow
def test_mixed_precision_runs_close_to_float32(single, stores):
    amp = bs.models.fit_cohort(stores, train=TRAIN, device="cpu", amp=True, progress=False)
    assert amp.record["streaming"]["amp"] is True
    a, b = np.asarray(amp.record["history"]["train_loss"]), np.asarray(single.record["history"]["train_loss"])
    assert not np.array_equal(a, b)  # bfloat16 forward passes really ran
    np.testing.assert_allclose(a, b, rtol=0.05)
    assert all(p.dtype == torch.float32 for p in amp.net.parameters())  # weights stay float32


def test_fit_cohort_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        bs.models.fit_cohort([], strategy="horovod")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="is not a slide store"):
        bs.models.fit_cohort([tmp_path / "missing.zarr"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(single, stores):
    gpu = bs.models.fit_cohort(stores, train=TRAIN, device="cuda", progress=False)
    assert gpu.record["device"].startswith("cuda")
    np.testing.assert_allclose(
        gpu.record["history"]["train_loss"], single.record["history"]["train_loss"], rtol=1e-3
    )
