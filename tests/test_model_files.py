"""Model files (issue 13, point 3): damaged files are named with the cause, the weights' checksum is
checked, foreign or newer configs are refused, and ``save`` writes atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bitro_sc as bs
from bitro_sc.datasets import toy
from bitro_sc.models import BiTroModel

torch.set_num_threads(1)
TINY = {"hidden": 16, "phenotype_dim": 4, "gat_heads": 2, "transformer_heads": 2}


@pytest.fixture(scope="module")
def model() -> BiTroModel:
    slides = [toy(seed=i, grid=3) for i in range(2)]
    return bs.tl.fit_bitro(
        slides, epochs=1, model=TINY, genes=[f"gene{g}" for g in range(6)], progress=False, validation=None
    )


@pytest.fixture
def saved(model: BiTroModel, tmp_path: Path) -> Path:
    return model.save(tmp_path / "m")


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, cfg: dict) -> None:
    (path / "config.json").write_text(json.dumps(cfg))


def test_save_records_the_checksum_and_leaves_no_temporary_file(model: BiTroModel, saved: Path) -> None:
    import hashlib

    cfg = _config(saved)
    assert cfg["weights_sha256"] == hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    assert cfg["package_version"] == bs.__version__
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    slide = toy(seed=5, grid=3)
    pd.testing.assert_frame_equal(BiTroModel.load(saved).predict_frame(slide), model.predict_frame(slide))


def test_flipped_bytes_in_the_weights_fail_the_checksum(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    rng = np.random.default_rng(0)
    header = 8 + int.from_bytes(data[:8], "little")
    for i in rng.choice(np.arange(header, len(data)), size=min(1000, len(data) - header), replace=False):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the checksum") as err:
        BiTroModel.load(saved)
    assert str(saved) in str(err.value)


def test_truncated_weights_name_the_file_and_the_cause(saved: Path) -> None:
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="checksum"):
        BiTroModel.load(saved)
    cfg = _config(saved)
    del cfg["weights_sha256"]  # a file written before checksums were recorded
    _write_config(saved, cfg)
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read .*truncated or corrupted"):
        BiTroModel.load(saved)


def test_truncated_config_names_the_file_and_the_cause(saved: Path) -> None:
    text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*truncated or corrupted"):
        BiTroModel.load(saved)


def test_weights_of_another_model_are_refused(model: BiTroModel, saved: Path, tmp_path: Path) -> None:
    other = bs.tl.fit_bitro(
        [toy(seed=3, grid=3)],
        epochs=1,
        model={**TINY, "hidden": 8},
        genes=["gene1"],
        progress=False,
        validation=None,
    ).save(tmp_path / "other")
    (saved / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        BiTroModel.load(saved)
    cfg = _config(saved)
    del cfg["weights_sha256"]
    _write_config(saved, cfg)
    with pytest.raises(ValueError, match="does not fit the architecture"):
        BiTroModel.load(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format="bitro_sc.BaselineModel/1"), "unknown model format"),
        (lambda c: c["model"].update(gat_layers_v2=3), "another architecture"),
        (lambda c: c["model"].update(pooling="max"), "another architecture"),
        (lambda c: c.update(package_version="99.0.0"), "newer than the installed"),
        (lambda c: c.update(feature_mean=c["feature_mean"][:-1]), "wrong length"),
        (
            lambda c: c["preprocessing"]["features"].update(scaler={"mean": [0.0], "scale": [1.0]}),
            "wrong length",
        ),
        (lambda c: c.pop("genes"), "lacks"),
    ],
)
def test_foreign_or_damaged_configs_are_refused_with_the_reason(saved: Path, edit, message) -> None:
    cfg = _config(saved)
    edit(cfg)
    _write_config(saved, cfg)
    with pytest.raises(ValueError, match=message) as err:
        BiTroModel.load(saved)
    assert "config.json" in str(err.value)


def test_an_interrupted_save_keeps_the_previous_model(
    model: BiTroModel, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temporary file left either
    BiTroModel.load(saved)
