"""Batch runs: `bitro-sc run CONFIG` with a [batch] table (one store per slide, resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bitro_sc import _sdata, cli
from bitro_sc.tl import _batch

N_SLIDES = 20
STEPS = ["segment", "cell_features", "cell_graph"]


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory) -> Path:
    """20 small tiled TIFF files cut from the tissue of one synthetic slide (0.5 µm/px)."""
    import tifffile

    import bitro_sc as bs

    sdata = bs.datasets.synthetic(kind="visium", size_um=900, seed=7)
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    folder = tmp_path_factory.mktemp("slides")
    side = 260  # px: 130 µm, ~40 nuclei
    for i in range(N_SLIDES):
        y, x = 350 + side * (i // 5), 350 + side * (i % 5)
        tifffile.imwrite(folder / f"slide{i:02d}.tif", img[y : y + side, x : x + side], tile=(128, 128))
    (folder / "notes.txt").write_text("not a slide")
    return folder


def _config(tmp_path: Path, folder: Path, name: str, **batch) -> Path:
    raw = {
        "out": name,
        "progress": False,
        "data": {"reader": "read_wsi", "folder": str(folder), "pattern": "*.tif", "options": {"mpp": 0.5}},
        "batch": {"stores": "stores", **batch},
        "steps": {"run": STEPS},
        "params": {"segment": {"tissue": False, "write_labels": True}},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def _read(store: Path) -> dict:
    from spatialdata import read_zarr

    s = read_zarr(store)
    cells = s.tables["cells"]
    return {
        "obs": cells.obs,
        "X": np.asarray(cells.obsm["X_bitro"]),
        "graph": cells.obsp["spatial_connectivities"].toarray(),
        "dist": cells.obsp["spatial_distances"].toarray(),
        "circles": s.shapes["cell_circles"],
        "labels": np.asarray(s.labels["cell_labels"].data),
        "sample_id": _sdata.sample_id(s),
    }


def _same_outputs(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.glob("*.zarr"))
    assert names_a == sorted(p.name for p in b.glob("*.zarr"))
    assert len(names_a) == N_SLIDES
    for name in names_a:
        x, y = _read(a / name), _read(b / name)
        pd.testing.assert_frame_equal(x["obs"], y["obs"])
        for key in ("X", "graph", "dist", "labels"):
            np.testing.assert_array_equal(x[key], y[key])
        pd.testing.assert_frame_equal(x["circles"], y["circles"])
        assert x["sample_id"] == y["sample_id"] == name.split(".")[0]


class _Faults:
    """Wraps the batch step runner: records every (slide, step) run and injects faults."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        self.kill_at: tuple[str, str] | None = None
        self.fail_at: tuple[str, str] | None = None
        real = _batch._run_step

        def run_step(sdata, step, params):
            key = (_sdata.sample_id(sdata), step)
            if key == self.kill_at:
                raise KeyboardInterrupt  # the process is killed in the middle of this slide
            if key == self.fail_at:
                raise RuntimeError(f"injected failure of {step}")
            self.calls.append(key)
            real(sdata, step, params)

        monkeypatch.setattr(_batch, "_run_step", run_step)


@pytest.mark.slow
def test_batch_interrupted_and_resumed_gives_the_same_stores(tmp_path, slide_folder, monkeypatch, capsys):
    faults = _Faults(monkeypatch)
    full = _config(tmp_path, slide_folder, "full")
    assert cli.main(["run", str(full)]) == 0
    assert len(faults.calls) == N_SLIDES * len(STEPS)
    summary = pd.read_csv(tmp_path / "full" / "batch_summary.csv")
    assert list(summary["status"]) == ["done"] * N_SLIDES
    assert (summary["n_cells"] > 10).all()
    assert "slide00" in capsys.readouterr().out  # the summary table is printed

    cfg = _config(tmp_path, slide_folder, "resumed")
    stores = tmp_path / "resumed" / "stores"
    faults.calls.clear()
    faults.kill_at = ("slide07", "cell_graph")  # killed after 7 slides and 2 steps of the 8th
    with pytest.raises(KeyboardInterrupt):
        cli.main(["run", str(cfg)])
    assert len(list(stores.glob("*.zarr"))) == 7
    assert sorted(p.name for p in (stores / ".slide07.partial").iterdir()) == [
        "0_segment.pkl",
        "1_cell_features.pkl",
    ]

    faults.kill_at = None
    faults.fail_at = ("slide12", "cell_features")  # a slide that fails does not stop the run
    faults.calls.clear()
    assert cli.main(["run", str(cfg)]) == 1
    assert "slide12" in capsys.readouterr().err
    summary = pd.read_csv(tmp_path / "resumed" / "batch_summary.csv").set_index("slide")
    assert (summary.loc[[f"slide{i:02d}" for i in range(7)], "status"] == "skipped").all()
    assert summary.loc["slide07", "steps_run"] == "cell_graph"
    assert summary.loc["slide07", "steps_skipped"] == "segment,cell_features"
    assert summary.loc["slide12", "status"] == "failed"
    assert "injected failure of cell_features" in summary.loc["slide12", "error"]
    assert "RuntimeError" in (tmp_path / "resumed" / "batch_errors.txt").read_text()
    assert (summary.drop(index=[f"slide{i:02d}" for i in range(7)] + ["slide12"])["status"] == "done").all()
    assert not any(slide < "slide07" for slide, _ in faults.calls)  # finished slides are not redone
    assert ("slide07", "segment") not in faults.calls

    faults.fail_at = None
    faults.calls.clear()
    assert cli.main(["run", str(cfg)]) == 0
    assert faults.calls == [("slide12", "cell_features"), ("slide12", "cell_graph")]
    assert not list(stores.glob(".*partial"))
    _same_outputs(tmp_path / "full" / "stores", stores)


def test_batch_config_is_validated(tmp_path, slide_folder):
    cfg = cli.load_config(_config(tmp_path, slide_folder, "x"))
    assert cfg["batch"]["stores"] == str((tmp_path / "x" / "stores").resolve())
    assert [Path(s["path"]).name for s in cfg["data"]["slides"]][:2] == ["slide00.tif", "slide01.tif"]
    assert cfg["data"]["slides"][0]["mpp"] == 0.5
    assert cfg["data"]["slides"][0]["sample_id"] == "slide00"
    bad = {
        "data": {"reader": "read_st", "folder": str(tmp_path / "nowhere")},
        "batch": {"scheduler": "slurm", "colour": 1, "n_workers": 0},
        "steps": ["segment", "phenotypes", "predict"],
    }
    with pytest.raises(cli.ConfigError) as info:
        cli.validate_config(bad)
    msg = str(info.value)
    for fragment in (
        "data.folder works with the readers",
        "unknown key(s) in [batch]: ['colour']",
        "batch.scheduler must be one of",
        "batch.n_workers must be a positive integer",
        "cannot run in a batch run",
        "predict step needs params.predict.model",
    ):
        assert fragment in msg
    with pytest.raises(cli.ConfigError, match="predict needs a \\[batch\\] table"):
        cli.validate_config({"data": {"reader": "synthetic"}, "steps": ["segment", "predict"]})
    with pytest.raises(cli.ConfigError, match="matches pattern"):
        cli.validate_config(
            {
                "data": {"reader": "read_wsi", "folder": str(slide_folder), "pattern": "*.svs"},
                "batch": {},
                "steps": ["segment"],
            }
        )


def test_run_batch_rejects_bad_steps_and_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match="in the order"):
        _batch.run_batch([], stores=tmp_path, steps=["cell_graph", "segment"])
    with pytest.raises(ValueError, match="Unknown batch step"):
        _batch.run_batch([], stores=tmp_path, steps=["phenotypes"])
    with pytest.raises(ValueError, match="more than once"):
        _batch.run_batch([{"path": "a/x.tif"}, {"path": "b/x.tif"}], stores=tmp_path)
    with pytest.raises(ValueError, match="needs params\\['predict'\\]\\['model'\\]"):
        _batch.run_batch([{"path": "a.tif"}], stores=tmp_path, steps=["segment", "predict"])


@pytest.mark.slow
def test_batch_predict_step_writes_cell_level_predictions(tmp_path, slide_folder):
    import bitro_sc as bs

    train = bs.datasets.synthetic(kind="visium", size_um=300, seed=1, n_genes=20)
    bs.tl.segment(train, progress=False)
    bs.tl.cell_features(train, progress=False)
    bs.tl.assign_cells(train)
    bs.tl.cell_graph(train)
    model = bs.tl.fit_bitro(train, epochs=1, validation=None, progress=False)
    model.save(tmp_path / "model")
    slides = [{"path": str(slide_folder / f"slide0{i}.tif"), "mpp": 0.5} for i in range(2)]
    steps = ["segment", "cell_features", "cell_graph", "predict"]
    params = {"segment": {"tissue": False}, "predict": {"model": str(tmp_path / "model")}}
    table = bs.tl.run_batch(slides, stores=tmp_path / "stores", steps=steps, params=params, progress=False)
    assert list(table["status"]) == ["done", "done"], table["error"].tolist()
    from spatialdata import read_zarr

    cells = read_zarr(tmp_path / "stores" / "slide00.zarr").tables["cells"]
    pred = np.asarray(cells.layers["bitro"])
    assert pred.shape == (cells.n_obs, len(model.genes))
    assert np.isfinite(pred).all()
    assert (pred >= 0).all()
    assert not (tmp_path / "stores" / ".slide00.partial").exists()  # the on-disk predictions: removed

    # interrupted after the predict checkpoint, before the store was written: resumed from the
    # checkpoint, whose layer reads the predictions array kept in the partial folder
    calls = {"n": 0}
    write = _batch._write

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        write(*args, **kwargs)

    import unittest.mock

    again = tmp_path / "again"
    with unittest.mock.patch.object(_batch, "_write", interrupted), pytest.raises(KeyboardInterrupt):
        bs.tl.run_batch(slides[:1], stores=again, steps=steps, params=params, progress=False)
    assert (again / ".slide00.partial" / "predictions.zarr").is_dir()
    with unittest.mock.patch.object(_batch, "_write", interrupted):
        table = bs.tl.run_batch(slides[:1], stores=again, steps=steps, params=params, progress=False)
    assert table["steps_run"].tolist() == [""]  # every step came from the checkpoints
    resumed = read_zarr(again / "slide00.zarr").tables["cells"]
    np.testing.assert_array_equal(np.asarray(resumed.layers["bitro"]), pred)


@pytest.mark.slow
def test_distributed_scheduler_in_a_config_runs_slides_on_worker_processes(tmp_path, slide_folder):
    pytest.importorskip("distributed")
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        (folder / f"slide0{i}.tif").write_bytes((slide_folder / f"slide0{i}.tif").read_bytes())
    cfg = _config(tmp_path, folder, "dist", scheduler="distributed", n_workers=2, write_image=True)
    assert cli.main(["run", str(cfg)]) == 0
    summary = pd.read_csv(tmp_path / "dist" / "batch_summary.csv")
    assert list(summary["status"]) == ["done"] * 3
    local = _config(tmp_path, folder, "local")
    assert cli.main(["run", str(local)]) == 0
    from spatialdata import read_zarr

    for i in range(3):
        name = f"slide0{i}.zarr"
        a = _read(tmp_path / "local" / "stores" / name)
        b = _read(tmp_path / "dist" / "stores" / name)
        pd.testing.assert_frame_equal(a["obs"], b["obs"])
        np.testing.assert_array_equal(a["X"], b["X"])
        with_image = read_zarr(tmp_path / "dist" / "stores" / name)
        assert "he" in with_image.images  # write_image = true copies the image into the store
        assert "he" not in read_zarr(tmp_path / "local" / "stores" / name).images
