"""Model files: atomic writes, a checksum of the weights, and errors that name the file and the cause.

A saved model is a folder with ``model.safetensors`` (weights) and ``config.json`` (everything else,
including ``weights_sha256``, the package version that wrote it and the file format). Each file is
written to a temporary file in the same folder and moved into place with :func:`os.replace`, so a
reader never sees half a file; the weights go first, so a folder whose config names other weights
(an interrupted save over an older model) is caught by the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_model(
    folder: Path, state: Mapping[str, torch.Tensor], config: dict[str, Any], *, weights: str, config_name: str
) -> None:
    """Write the weights, then the config with their checksum, each atomically."""
    from safetensors.torch import save_file

    checksum: dict[str, str] = {}

    def write_weights(tmp: Path) -> None:
        save_file(dict(state), str(tmp), metadata={"format": str(config.get("format", ""))})
        checksum["sha256"] = sha256(tmp)

    atomic_write(folder / weights, write_weights)
    text = json.dumps({**config, "weights_sha256": checksum["sha256"]}, indent=1)

    def write_config(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(folder / config_name, write_config)


def read_config(path: Path) -> dict[str, Any]:
    """The JSON config at ``path``; a truncated or corrupted file is named with the cause."""
    try:
        text = path.read_text()
        cfg = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({type(err).__name__}: {err}); the file is truncated or corrupted. "
            "Save the model again (`model.save(path, overwrite=True)`) or restore the file from a copy."
        ) from err
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path} holds a JSON {type(cfg).__name__}, not a model config; the file is damaged."
        )
    return cfg


def read_weights(path: Path, *, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its checksum when one was recorded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if expected_sha256 is not None:
        actual = sha256(path)
        if actual != expected_sha256:
            raise ValueError(
                f"{path} does not match the checksum recorded in its config.json (sha256 {actual[:12]}… vs "
                f"{str(expected_sha256)[:12]}…): the weights were corrupted, or replaced by another save. "
                "Save the model again or restore both files from a copy."
            )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read as safetensors weights ({type(err).__name__}: {err}); the file is "
            "truncated or corrupted. Save the model again or restore the file from a copy."
        ) from err


def _release(version: str) -> tuple[int, ...] | None:
    """``(major, minor, patch, …)`` of a version string, ``None`` when it has no leading release."""
    import re

    m = re.match(r"v?(\d+(?:\.\d+)*)", str(version).strip())
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def check_version(path: Path, written_by: str | None, installed: str) -> None:
    """Refuse a config written by a newer bitro_sc release than the installed one."""
    if not written_by:
        return  # written before versions were recorded: older than this one
    saved, have = _release(written_by), _release(installed)
    if saved is None:
        raise ValueError(
            f"{path}: unreadable package version {written_by!r} in the config; the file is damaged."
        )
    if have is not None and saved > have:
        raise ValueError(
            f"{path} was written by bitro_sc {written_by}, newer than the installed {installed}; its "
            "config may hold fields this version reads wrongly. Upgrade bitro_sc "
            f"(`pip install -U 'bitro_sc>={written_by}'`) to load it."
        )


def load_bitro(cls: Any, path: Path, *, device: Any, weights: str, config_name: str, fmt: str) -> Any:
    """The body of :meth:`BiTroModel.load`: read and check the config, then the weights."""
    import numpy as np

    from ._data import FeatureStats
    from ._model import _package_version, build_net, resolve_device
    from ._params import ModelParams, TrainParams
    from ._preprocess import Preprocessing

    if not (path / config_name).is_file() or not (path / weights).is_file():
        raise FileNotFoundError(f"{path} is not a saved BiTroModel (needs {config_name} and {weights}).")
    cfg = read_config(path / config_name)
    if cfg.get("format") != fmt:
        raise ValueError(
            f"{path / config_name}: unknown model format {cfg.get('format')!r} (expected {fmt!r}): it was "
            "written for another architecture or by an incompatible bitro_sc. Load it with the class "
            "and version that wrote it, or re-train the model."
        )
    check_version(path / config_name, cfg.get("package_version"), _package_version())
    missing = [
        k
        for k in (
            "genes",
            "level",
            "n_features",
            "phenotypes",
            "feature_mean",
            "feature_std",
            "model",
            "train",
            "bag_cells",
            "lora",
        )
        if k not in cfg
    ]
    if missing:
        raise ValueError(
            f"{path / config_name} lacks {missing}: the config is damaged; save the model again."
        )
    model_cfg = dict(cfg["model"])
    model_cfg.setdefault("rna_head", False)  # checkpoints written before the RNA-content head
    model_cfg.setdefault("phenotype_profiles", False)  # ... before phenotype profiles
    model_cfg.setdefault("slide_size_norm", False)  # ... and before slide-size normalisation
    model_cfg.setdefault("bag_linear", False)  # ... and before the bag-level linear term
    try:
        params = ModelParams.coerce(model_cfg)
        train_params = TrainParams.coerce(cfg["train"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{path / config_name} describes another architecture than this bitro_sc builds ({err}). Load it "
            "with the bitro_sc version that wrote it, or re-train the model."
        ) from err
    n_features = int(cfg["n_features"])
    mean = np.asarray(cfg["feature_mean"], dtype=np.float32)
    std = np.asarray(cfg["feature_std"], dtype=np.float32)
    prep = Preprocessing.from_dict(cfg.get("preprocessing"))
    scaler = (prep.features.get("scaler") or {}) if prep is not None else {}
    lengths = {"feature_mean": mean.size, "feature_std": std.size}
    if scaler:
        lengths |= {"preprocessing scaler mean": len(scaler["mean"]), "scale": len(scaler["scale"])}
    wrong = {k: n for k, n in lengths.items() if n != n_features}
    if wrong or mean.ndim != 1 or std.ndim != 1:
        raise ValueError(
            f"{path / config_name}: the feature statistics have the wrong length ({wrong or 'not vectors'}; "
            f"the model reads {n_features} features). The config is damaged or edited; save the model again."
        )
    net = build_net(
        n_features=n_features,
        n_phenotypes=len(cfg["phenotypes"]),
        n_genes=len(cfg["genes"]),
        params=params,
        lora=cfg["lora"],
    )
    state = read_weights(path / weights, expected_sha256=cfg.get("weights_sha256"))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path / weights} does not fit the architecture in {config_name} ({str(err)[:300]}): the two "
            "files come from different models. Save the model again."
        ) from err
    net.to(resolve_device(device)).eval()
    return cls(  # type: ignore[no-any-return]
        net,
        genes=cfg["genes"],
        level=cfg["level"],
        stats=FeatureStats(mean, std),
        phenotypes=cfg["phenotypes"],
        params=params,
        train_params=train_params,
        bag_cells=float(cfg["bag_cells"]),
        lora=cfg["lora"],
        meta=cfg.get("meta") or {},
        record=cfg.get("record") or {},
        preprocessing=prep,
    )
