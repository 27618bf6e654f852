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

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

READERS = ("read_visium", "read_st", "read_hest", "read_wsi", "synthetic")
#: per-slide preparation, in this order
PREP_STEPS = ("segment", "cell_features", "phenotypes", "assign_cells", "cell_graph")
ANALYSIS_STEPS = ("cross_validate", "holdout")
STEPS = PREP_STEPS + ANALYSIS_STEPS
METHODS = ("bitro", "ridge", "mean")
_TOP_KEYS = {"out", "seed", "data", "steps", "params", "progress"}
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
        slides = data.get("slides")
        extra = set(data) - {"reader", "slides"}
        if extra:
            problems.append(f"unknown key(s) in [data]: {sorted(extra)} (use `slides = [{{...}}, ...]`)")
        if not isinstance(slides, list) or not slides or not all(isinstance(s, Mapping) for s in slides):
            problems.append("data.slides must be a non-empty list of tables of reader arguments")
            slides = []
        norm_slides = []
        for i, s in enumerate(slides):
            entry = dict(s)
            for k in _PATH_ARGS & set(entry):
                p = Path(str(entry[k]))
                p = p if p.is_absolute() else (base / p)
                if not p.exists():
                    problems.append(f"data.slides[{i}].{k}: {str(p)!r} does not exist")
                entry[k] = str(p)
            norm_slides.append(entry)
        norm_data["slides"] = norm_slides
    cfg["data"] = norm_data

    steps_tbl = raw.get("steps", {})
    steps = steps_tbl.get("run") if isinstance(steps_tbl, Mapping) else steps_tbl
    if not isinstance(steps, list) or not steps:
        problems.append(f"steps.run must be a non-empty list of step names from {list(STEPS)}")
        steps = []
    bad = [s for s in steps if s not in STEPS]
    if bad:
        problems.append(f"unknown step(s) {bad}; known: {list(STEPS)}")
    order = [STEPS.index(s) for s in steps if s in STEPS]
    if order != sorted(order) or len(set(order)) != len(order):
        problems.append(f"steps must appear once each, in the order {list(STEPS)}")
    cfg["steps"] = [s for s in steps if s in STEPS]

    params = raw.get("params", {})
    if not isinstance(params, Mapping):
        problems.append("[params] must be a table of per-step tables")
        params = {}
    for name, p in params.items():
        if name not in STEPS:
            problems.append(f"params.{name}: not a step; known: {list(STEPS)}")
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
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


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
