"""``bs.tl.fit_bitro(..., strategy="ddp")``: the high-level API trains data parallel (2 gloo processes)
along the single-process trajectory; bad strategies and unsupported combinations are refused
before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitro_sc as bs

TRAIN = {"epochs": 2, "batch_size": 2}


def _slides(n: int = 3, seed: int = 2) -> list:
    slides = bs.datasets.synthetic(n, kind="bulk", size_um=220, seed=seed, n_genes=25)
    for s in slides:
        bs.tl.segment(s, progress=False)
    return slides


@pytest.fixture(scope="module")
def slides() -> list:
    return _slides()


def test_a_bad_strategy_is_refused_with_the_options(slides):
    with pytest.raises(ValueError, match=r"`strategy` must be one of \['single', 'ddp'\], got 'DDP'"):
        bs.tl.fit_bitro(slides, level="bulk", strategy="DDP", validation=None, progress=False)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"level": "spot"}, "bulk-level model from scratch"),
        ({"level": "bulk", "validation": [0]}, "match no slide"),
        ({"level": "bulk", "world_size": 0}, "world_size"),
    ],
)
def test_unsupported_ddp_runs_fail_before_writing(kw, match):
    fresh = _slides(2, seed=8)
    if kw.get("validation") == [0]:  # hold out a real slide
        kw = {**kw, "validation": [bs._sdata.sample_id(fresh[0], 0, table_key="cells")]}
        match = "holds out 1 slide"
    with pytest.raises(ValueError, match=match):
        bs.tl.fit_bitro(fresh, strategy="ddp", progress=False, **{"validation": None, **kw})
    assert all("X_bitro" not in s.tables["cells"].obsm for s in fresh)  # nothing was written


@pytest.mark.slow
def test_fit_bitro_ddp_follows_the_single_process_trajectory(slides, tmp_path):
    from spatialdata import SpatialData

    ddp = bs.tl.fit_bitro(
        slides, level="bulk", strategy="ddp", world_size=2, validation=None, train=TRAIN, device="cpu",
        n_top_genes=10, progress=False,
    )  # fmt: skip
    rec = ddp.record
    assert rec["level"] == "bulk"
    assert rec["streaming"]["world_size"] == 2
    assert rec["streaming"]["strategy"] == "ddp"
    assert slides[0].tables["bulk"].uns["bitro"]["streaming"]["world_size"] == 2
    # the same slides' tables, one process: the reference trajectory
    stores = []
    for i, s in enumerate(slides):
        stores.append(tmp_path / f"s{i}.zarr")
        SpatialData(tables=dict(s.tables), shapes=dict(s.shapes), attrs=s.attrs).write(stores[-1])
    torch.manual_seed(0)
    single = bs.models.fit_cohort(stores, genes=ddp.genes, train=TRAIN, device="cpu", progress=False)
    losses = ddp.record["history"]["train_loss"]
    assert len(losses) == TRAIN["epochs"]
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, single.record["history"]["train_loss"], rtol=1e-5)
    for (name, a), b in zip(single.net.state_dict().items(), ddp.net.state_dict().values(), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    bs.tl.predict_bitro(slides[0], ddp, level="bulk")
    bulk = slides[0].tables["bulk"]
    pred = np.asarray(bulk.layers["bitro"])[:, bulk.var_names.get_indexer(ddp.genes)]
    assert np.isfinite(pred).all()
