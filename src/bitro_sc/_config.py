"""Run configurations of ``bitro-sc run``: loading, validation, reading the slides, preparing them.

The format is described in :mod:`bitro_sc.cli` (``bitro-sc run --help``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import datasets, io, tl
from .tl._batch import BATCH_STEPS

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

READERS = ("read_visium", "read_st", "read_hest", "read_wsi", "synthetic")
#: per-slide preparation, in this order
PREP_STEPS = ("segment", "cell_features", "phenotypes", "assign_cells", "cell_graph")
ANALYSIS_STEPS = ("cross_validate", "holdout")
STEPS = PREP_STEPS + ANALYSIS_STEPS
METHODS = ("bitro", "ridge", "mean")
SCHEDULERS = ("local", "distributed")
_TOP_KEYS = {"out", "seed", "data", "steps", "params", "progress", "batch"}
_BATCH_KEYS = {
    "stores",
    "write_image",
    "scheduler",
    "address",
    "n_workers",
    "threads_per_worker",
    "max_parallel",
}
#: readers whose slide is one `path` (file or folder): `[data] folder = ...` lists them
_PATH_READERS = ("read_wsi", "read_visium")
_PATH_ARGS = {"image", "counts", "spots", "path", "root", "fullres_image"}
_HOLDOUT_KEYS = {"test", "methods", "level", "top_hvg", "fit_kwargs", "genes", "cell_level"}


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message says what to change."""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a run configuration (``.toml``, ``.json``, ``.yaml`` / ``.yml``).

    Relative paths (``out`` and reader path arguments) are resolved against the config file's
    folder. Raises :class:`ConfigError` naming every problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path.name}: invalid TOML: {err}") from err
    elif suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path.name}: invalid JSON: {err}") from err
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ConfigError("YAML configs need PyYAML (`pip install pyyaml`); or use TOML / JSON.") from err
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path.name}: invalid YAML: {err}") from err
    else:
        raise ConfigError(f"Unknown config format {suffix!r}: use .toml, .json, .yaml or .yml.")
    return validate_config(raw, base_dir=path.parent)


def validate_config(raw: Any, *, base_dir: str | Path = ".") -> dict[str, Any]:
    """Check a configuration mapping and return a normalised copy (paths resolved).

    Raises :class:`ConfigError` listing every problem (unknown keys, readers, steps, missing
    files, steps out of order, parameters for steps that are not run).
    """
    base = Path(base_dir)
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"The config must be a mapping (table) at the top level, got {type(raw).__name__}.")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        problems.append(f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    cfg: dict[str, Any] = {
        "out": str((base / str(raw.get("out", "bitro_out"))).resolve()),
        "seed": raw.get("seed", 0),
        "progress": bool(raw.get("progress", True)),
    }
    if not isinstance(cfg["seed"], int):
        problems.append(f"`seed` must be an integer, got {cfg['seed']!r}")

    data = raw.get("data")
    if not isinstance(data, Mapping):
        problems.append("missing [data] table with `reader = ...` (one of " + ", ".join(READERS) + ")")
        data = {}
    reader = data.get("reader")
    if data and reader not in READERS:
        problems.append(f"data.reader must be one of {list(READERS)}, got {reader!r}")
    norm_data: dict[str, Any] = {"reader": reader}
    if reader == "synthetic":
        norm_data["kwargs"] = {k: v for k, v in data.items() if k != "reader"}
        if "slides" in data:
            problems.append("data.slides is not used with reader = 'synthetic'; use n_slides = N")
    elif reader in READERS:
        extra = set(data) - {"reader", "slides", "folder", "pattern", "options"}
        if extra:
            problems.append(f"unknown key(s) in [data]: {sorted(extra)} (use `slides = [{{...}}, ...]`)")
        slides = data.get("slides") if "folder" not in data else _folder_slides(data, base, reader, problems)
        if "folder" in data and "slides" in data:
            problems.append("give either data.slides (a list) or data.folder, not both")
        if not isinstance(slides, list) or not slides or not all(isinstance(s, Mapping) for s in slides):
            if "folder" not in data:
                problems.append("data.slides must be a non-empty list of tables of reader arguments")
            slides = []
        options = data.get("options", {})
        if not isinstance(options, Mapping):
            problems.append("data.options must be a table of reader arguments shared by every slide")
            options = {}
        norm_slides = []
        for i, s in enumerate(slides):
            entry = {**options, **s}
            for k in _PATH_ARGS & set(entry):
                p = Path(str(entry[k]))
                p = p if p.is_absolute() else (base / p)
                if not p.exists():
                    problems.append(f"data.slides[{i}].{k}: {str(p)!r} does not exist")
                entry[k] = str(p)
            norm_slides.append(entry)
        norm_data["slides"] = norm_slides
    cfg["data"] = norm_data
    cfg["batch"] = _batch_table(raw.get("batch"), reader, problems)
    known = BATCH_STEPS if cfg["batch"] is not None else STEPS

    steps_tbl = raw.get("steps", {})
    steps = steps_tbl.get("run") if isinstance(steps_tbl, Mapping) else steps_tbl
    if not isinstance(steps, list) or not steps:
        problems.append(f"steps.run must be a non-empty list of step names from {list(known)}")
        steps = []
    bad = [s for s in steps if s not in known]
    if bad and cfg["batch"] is not None:
        problems.append(
            f"step(s) {bad} cannot run in a batch run ([batch]); its per-slide steps are {list(BATCH_STEPS)} "
            "(phenotypes, cross_validate and holdout pool all slides: run them in a config without [batch])"
        )
    elif bad:
        problems.append(f"unknown step(s) {bad}; known: {list(STEPS)} (predict needs a [batch] table)")
    order = [known.index(s) for s in steps if s in known]
    if order != sorted(order) or len(set(order)) != len(order):
        problems.append(f"steps must appear once each, in the order {list(known)}")
    cfg["steps"] = [s for s in steps if s in known]

    params = raw.get("params", {})
    if not isinstance(params, Mapping):
        problems.append("[params] must be a table of per-step tables")
        params = {}
    for name, p in params.items():
        if name not in known:
            problems.append(f"params.{name}: not a step; known: {list(known)}")
        elif name not in cfg["steps"]:
            problems.append(f"params.{name} is given but {name!r} is not in steps.run")
        if not isinstance(p, Mapping):
            problems.append(f"params.{name} must be a table of keyword arguments")
    cfg["params"] = {k: dict(v) for k, v in params.items() if isinstance(v, Mapping)}
    for name in ANALYSIS_STEPS:
        methods = cfg["params"].get(name, {}).get("methods", list(METHODS))
        wrong = [m for m in methods if m not in METHODS]
        if wrong:
            problems.append(f"params.{name}.methods: unknown {wrong}; known: {list(METHODS)}")
    if "holdout" in cfg["steps"]:
        hold = cfg["params"].get("holdout", {})
        extra = set(hold) - _HOLDOUT_KEYS
        if extra:
            problems.append(
                f"params.holdout: unknown key(s) {sorted(extra)}; allowed: {sorted(_HOLDOUT_KEYS)}"
            )
        test = hold.get("test")
        if not isinstance(test, list) or not test:
            problems.append("the holdout step needs params.holdout.test = [sample ids held out for testing]")
    _batch_params(cfg, base, problems)
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


def _folder_slides(
    data: Mapping[str, Any], base: Path, reader: str, problems: list[str]
) -> list[dict[str, Any]]:
    """``[data] folder = ..., pattern = ...``: one slide per matching entry, named by its stem."""
    if reader not in _PATH_READERS:
        problems.append(
            f"data.folder works with the readers {list(_PATH_READERS)}; use data.slides with {reader}"
        )
        return []
    folder = Path(str(data["folder"]))
    folder = folder if folder.is_absolute() else base / folder
    pattern = str(data.get("pattern", "*"))
    if not folder.is_dir():
        problems.append(f"data.folder: {str(folder)!r} is not a folder")
        return []
    found = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
    if not found:
        problems.append(f"data.folder: nothing in {str(folder)!r} matches pattern {pattern!r}")
    return [{"path": str(p), "sample_id": p.name.split(".")[0]} for p in found]


def _batch_table(batch: Any, reader: Any, problems: list[str]) -> dict[str, Any] | None:
    """The normalised ``[batch]`` table (``None`` without one: all slides in memory, as before)."""
    if batch is None:
        return None
    if not isinstance(batch, Mapping):
        problems.append("[batch] must be a table (it may be empty: `[batch]`)")
        return None
    extra = set(batch) - _BATCH_KEYS
    if extra:
        problems.append(f"unknown key(s) in [batch]: {sorted(extra)}; allowed: {sorted(_BATCH_KEYS)}")
    if reader == "synthetic":
        problems.append("a batch run reads slide files: use a file reader, not reader = 'synthetic'")
    out = {
        "stores": str(batch.get("stores", "slides")),
        "write_image": bool(batch.get("write_image", False)),
        "scheduler": batch.get("scheduler", "local"),
        "address": batch.get("address"),
        "n_workers": batch.get("n_workers", 2),
        "threads_per_worker": batch.get("threads_per_worker", 1),
        "max_parallel": batch.get("max_parallel"),
    }
    if out["scheduler"] not in SCHEDULERS:
        problems.append(f"batch.scheduler must be one of {list(SCHEDULERS)}, got {out['scheduler']!r}")
    if out["address"] is not None and out["scheduler"] != "distributed":
        problems.append("batch.address is only used with batch.scheduler = 'distributed'")
    for key in ("n_workers", "threads_per_worker", "max_parallel"):
        v = out[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"batch.{key} must be a positive integer, got {v!r}")
    return out


def _batch_params(cfg: dict[str, Any], base: Path, problems: list[str]) -> None:
    """Resolve the paths of a batch run: the stores folder, the predict model, a reference scaler store."""
    if cfg["batch"] is None:
        return
    stores = Path(cfg["batch"]["stores"])
    cfg["batch"]["stores"] = str(stores if stores.is_absolute() else Path(cfg["out"]) / stores)
    for step, key in (("predict", "model"), ("cell_features", "scaler")):
        value = cfg["params"].get(step, {}).get(key)
        if value is None:
            if step == "predict" and step in cfg["steps"]:
                problems.append("the predict step needs params.predict.model = path of a saved model")
            continue
        p = Path(str(value))
        p = p if p.is_absolute() else base / p
        if not p.exists():
            problems.append(f"params.{step}.{key}: {str(p)!r} does not exist")
        cfg["params"][step][key] = str(p)


# ----------------------------------------------------------------------------------------------
# steps shared by `demo` and `run`
# ----------------------------------------------------------------------------------------------
def log(msg: str, *, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def read_slides(cfg: Mapping[str, Any]) -> tuple[list[SpatialData], list[Any] | None]:
    """The slides of a validated config (and the synthetic truth, for ``reader = "synthetic"``)."""
    data = cfg["data"]
    if data["reader"] == "synthetic":
        kwargs = {"n_slides": 2, **data["kwargs"], "return_truth": True}
        pairs = datasets.synthetic(**kwargs)
        pairs = [pairs] if isinstance(pairs, tuple) else list(pairs)
        return [p[0] for p in pairs], [p[1] for p in pairs]
    reader = getattr(io, data["reader"])
    return [reader(**s) for s in data["slides"]], None


def prepare(
    slides: Sequence[SpatialData],
    *,
    steps: Sequence[str] = PREP_STEPS,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    t0: float | None = None,
) -> None:
    """Run the per-slide steps (segment -> cell_features -> phenotypes -> assign_cells -> cell_graph).

    ``cell_features`` and ``phenotypes`` see all slides together (one feature scaling, one
    k-means), the other steps run slide by slide.
    """
    params = params or {}
    t0 = time.perf_counter() if t0 is None else t0
    for step in [s for s in PREP_STEPS if s in steps]:
        kw = dict(params.get(step, {}))
        fn = getattr(tl, step)
        if step in ("segment", "cell_features"):
            kw.setdefault("progress", progress)
        if step in ("cell_features", "phenotypes"):
            fn(list(slides), **kw)
        else:
            for s in slides:
                fn(s, **kw)
        n_cells = sum(s.tables["cells"].n_obs for s in slides if "cells" in s.tables)
        log(f"{step}: done ({n_cells} cells on {len(slides)} slides)", t0=t0)
