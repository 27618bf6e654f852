"""The ``bitro-sc`` command line: ``bitro-sc demo`` and ``bitro-sc run CONFIG``.

``bitro-sc demo`` runs the whole method on synthetic slides (image -> cells -> features ->
BiTro and baselines -> spot- and cell-level predictions -> metrics) and writes a figure.
``bitro-sc run CONFIG`` runs the same steps on data named in a TOML / JSON / YAML file::

    out = "bitro_out"                  # results folder (relative to the config file)
    seed = 0

    [data]
    reader = "read_st"                 # read_visium | read_st | read_hest | read_wsi | synthetic
    slides = [                         # keyword arguments of the reader, one table per slide;
      { image = "C2_HE.jpg", counts = "C2_counts.tsv.gz", spots = "C2_selection.tsv", sample_id = "C2" },
      { image = "C3_HE.jpg", counts = "C3_counts.tsv.gz", spots = "C3_selection.tsv", sample_id = "C3" },
    ]                                  # relative paths are read relative to the config file

    [steps]
    run = ["segment", "cell_features", "phenotypes", "assign_cells", "cell_graph", "cross_validate"]

    [params.segment]                   # keyword arguments of each step (`bs.tl.<step>`)
    method = "watershed"
    [params.cross_validate]
    methods = ["bitro", "ridge", "mean"]
    fit_kwargs = { bitro = { epochs = 20 } }

With ``reader = "synthetic"``, ``[data]`` holds the arguments of ``bs.datasets.synthetic``
instead of ``slides``. The ``holdout`` step fits on all slides but those listed in
``[params.holdout] test = [...]`` and predicts and evaluates on those.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
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


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
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
# pipeline pieces shared by `demo` and `run`
# ----------------------------------------------------------------------------------------------
def _log(msg: str, *, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def read_slides(cfg: Mapping[str, Any]) -> tuple[list[SpatialData], list[Any] | None]:
    """The slides of a validated config (and the synthetic truth, for ``reader = "synthetic"``)."""
    import bitro_sc as bs

    data = cfg["data"]
    if data["reader"] == "synthetic":
        kwargs = {"n_slides": 2, **data["kwargs"], "return_truth": True}
        pairs = bs.datasets.synthetic(**kwargs)
        pairs = [pairs] if isinstance(pairs, tuple) else list(pairs)
        return [p[0] for p in pairs], [p[1] for p in pairs]
    reader = getattr(bs.io, data["reader"])
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
    import bitro_sc as bs

    params = params or {}
    t0 = time.perf_counter() if t0 is None else t0
    for step in [s for s in PREP_STEPS if s in steps]:
        kw = dict(params.get(step, {}))
        fn = getattr(bs.tl, step)
        if step in ("segment", "cell_features"):
            kw.setdefault("progress", progress)
        if step in ("cell_features", "phenotypes"):
            fn(list(slides), **kw)
        else:
            for s in slides:
                fn(s, **kw)
        n_cells = sum(s.tables["cells"].n_obs for s in slides if "cells" in s.tables)
        _log(f"{step}: done ({n_cells} cells on {len(slides)} slides)", t0=t0)


def sample_ids(slides: Sequence[SpatialData]) -> list[str]:
    from ._sdata import slide_info

    return [str(slide_info(s).get("sample_id") or f"slide_{i}") for i, s in enumerate(slides)]


def fit_methods(
    train: Sequence[SpatialData],
    *,
    methods: Sequence[str] = METHODS,
    level: str = "spot",
    genes: Sequence[str] | None = None,
    fit_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit each method on the training slides with the same genes (HVGs of the training slides)."""
    import bitro_sc as bs

    fit_kwargs = fit_kwargs or {}
    models: dict[str, Any] = {}
    for m in methods:
        kw = dict(fit_kwargs.get(m, {}))
        if m == "bitro":
            kw.setdefault("progress", progress)
            models[m] = bs.tl.fit_bitro(list(train), level=level, genes=genes, **kw)
        else:
            models[m] = bs.tl.fit_baseline(list(train), method=m, level=level, genes=genes, **kw)
    return models


def cell_truth_scores(frame: pd.DataFrame, sdata: SpatialData, truth: Any) -> pd.DataFrame:
    """Per-gene Pearson of cell-level predictions against the synthetic truth.

    Each segmented cell is matched to the true nucleus under its centroid (``truth.labels``);
    unmatched cells are dropped. Both sides are compared as ``log1p`` of counts per 10k of the
    cell: the prediction (a cell's share of its spot, counts-per-10k scale) and the noise-free
    expected counts ``truth.expression.layers["rate"]`` rescaled so that the average cell has the
    same total as the average predicted cell over these genes.
    """
    import numpy as np
    import pandas as pd

    from . import _keys as K
    from .metrics import pearson, spearman

    cells = sdata.tables[K.CELLS]
    labels = np.asarray(truth.labels)
    y = np.clip(np.round(cells.obs[K.Y_PX].to_numpy()).astype(int), 0, labels.shape[0] - 1)
    x = np.clip(np.round(cells.obs[K.X_PX].to_numpy()).astype(int), 0, labels.shape[1] - 1)
    true_id = labels[y, x]
    expr = truth.expression
    row_of = pd.Index(expr.obs[K.CELL_ID].to_numpy()).get_indexer(true_id)
    ok = (true_id > 0) & (row_of >= 0)
    genes = [g for g in frame.columns if g in expr.var_names]
    rate = expr.layers.get("rate", expr.X)
    rate = rate.toarray() if hasattr(rate, "toarray") else np.asarray(rate)
    truth_vals = rate[row_of[ok]][:, expr.var_names.get_indexer(genes)].astype(np.float64)
    pred = frame.loc[cells.obs_names[ok], genes].to_numpy(dtype=np.float64)
    scale = pred.sum(axis=1).mean() / max(truth_vals.sum(axis=1).mean(), 1e-12)
    t, p = np.log1p(truth_vals * scale), np.log1p(pred)
    out = pd.DataFrame(
        {"pearson": pearson(t, p), "spearman": spearman(t, p)}, index=pd.Index(genes, name="gene")
    )
    out.attrs["n_cells_matched"] = int(ok.sum())
    out.attrs["n_cells"] = int(cells.n_obs)
    return out


def holdout(
    slides: Sequence[SpatialData],
    *,
    test: Sequence[str],
    methods: Sequence[str] = METHODS,
    level: str = "spot",
    top_hvg: int = 50,
    genes: Sequence[str] | None = None,
    fit_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    cell_level: bool = True,
    truths: Sequence[Any] | None = None,
    progress: bool = True,
    t0: float | None = None,
) -> dict[str, Any]:
    """Fit every method on the non-test slides, predict the test slides, evaluate.

    Genes are the top ``top_hvg`` HVGs of the training slides (``genes`` overrides). Predictions
    go to ``layers[<method>]`` of the test slides (never ``"bitro"``'s default for baselines);
    cell-level predictions are compared with the truth when ``truths`` are given (synthetic data).
    Returns ``{"spot": {method: evaluate table}, "cell": {method: table}, "models": ...}``.
    """
    import bitro_sc as bs

    t0 = time.perf_counter() if t0 is None else t0
    ids = sample_ids(slides)
    unknown = [t for t in test if t not in ids]
    if unknown:
        raise ValueError(f"Test sample(s) {unknown} are not among the slides {ids}.")
    train = [s for s, i in zip(slides, ids, strict=True) if i not in test]
    test_idx = [k for k, i in enumerate(ids) if i in test]
    if not train:
        raise ValueError("Every slide is a test slide; leave at least one for training.")
    if genes is None:
        key = "table" if level == "spot" else "bulk"
        genes = bs.pp.highly_variable_genes([s.tables[key] for s in train], n_top=top_hvg)
    models = fit_methods(
        train, methods=methods, level=level, genes=genes, fit_kwargs=fit_kwargs, progress=progress
    )
    _log(f"fitted {', '.join(models)} on {len(train)} slide(s), {len(genes)} genes", t0=t0)
    spot: dict[str, list[pd.DataFrame]] = {m: [] for m in models}
    cell: dict[str, list[pd.DataFrame]] = {m: [] for m in models}
    for k in test_idx:
        s = slides[k]
        for m, model in models.items():
            bs.tl.predict_bitro(s, model, level=level, key_added=m, overwrite=True)
            df = bs.tl.evaluate(s, layer=m, top_hvg=None, level=level) if level == "spot" else None
            if df is not None:
                spot[m].append(df.assign(sample=ids[k]))
            if cell_level and truths is not None and "cell" in model.levels:
                frame = model.predict_frame(s, level="cell")
                cell[m].append(cell_truth_scores(frame, s, truths[k]).assign(sample=ids[k]))
        if cell_level and "bitro" in models:
            bs.tl.predict_bitro(s, models["bitro"], level="cell", overwrite=True)
    _log("predicted and evaluated the test slide(s)", t0=t0)
    import pandas as pd

    return {
        "spot": {m: pd.concat(v) for m, v in spot.items() if v},
        "cell": {m: pd.concat(v) for m, v in cell.items() if v},
        "models": models,
        "genes": list(genes),
        "train": [i for i in ids if i not in test],
        "test": list(test),
    }


def summary_table(result: Mapping[str, Any]) -> pd.DataFrame:
    """One row per method: spot-level mean / median Pearson, HEST score, cell-level median Pearson."""
    import numpy as np
    import pandas as pd

    rows = {}
    for m in result["models"]:
        row: dict[str, float] = {}
        sp = result["spot"].get(m)
        if sp is not None:
            row["spot_mean_pearson"] = (
                float(np.nanmean(sp["pearson"])) if sp["pearson"].notna().any() else np.nan
            )
            row["spot_median_pearson"] = float(sp["pearson"].median())
            hv = sp.loc[sp["is_hvg"], "pearson"]
            row["hest_score"] = float(hv.mean()) if hv.notna().any() else np.nan
            row["n_genes"] = float(len(sp))
        ce = result["cell"].get(m)
        if ce is not None:
            row["cell_median_pearson"] = float(ce["pearson"].median())
        rows[m] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def write_figure(result: Mapping[str, Any], path: Path, *, title: str = "") -> Path:
    """Spot-level per-gene Pearson by method (left) and cell-level Pearson against the truth (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import bitro_sc as bs

    has_cell = bool(result["cell"])
    fig, axes = plt.subplots(1, 2 if has_cell else 1, figsize=(11 if has_cell else 6, 4.2), squeeze=False)
    if result["spot"]:
        bs.pl.gene_correlation(dict(result["spot"]), kind="box", ax=axes[0, 0])
        axes[0, 0].set_title("spot level: per-gene Pearson, held-out slide")
    if has_cell:
        ax = axes[0, 1]
        names = list(result["cell"])
        vals = [result["cell"][m]["pearson"].dropna().to_numpy() for m in names]
        ax.boxplot(vals, tick_labels=names)
        for i, v in enumerate(vals, start=1):
            if v.size:
                ax.scatter(np.full(v.size, i) + np.linspace(-0.12, 0.12, v.size), v, s=6, alpha=0.5)
                ax.text(i, 1.02, f"median {np.median(v):.2f}", ha="center", fontsize=8)
        ax.set_ylim(-0.5, 1.1)
        ax.set_ylabel("Pearson r vs truth (per gene)")
        ax.set_title("cell level (only spots supervised)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_outputs(
    result: Mapping[str, Any], out: Path, *, name: str, extra: Mapping[str, Any]
) -> pd.DataFrame:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(result)
    frames = [df.assign(method=m) for m, df in result["spot"].items()]
    if frames:
        pd.concat(frames).to_csv(out / f"{name}_spot_metrics.csv")
    frames = [df.assign(method=m) for m, df in result["cell"].items()]
    if frames:
        pd.concat(frames).to_csv(out / f"{name}_cell_metrics.csv")
    summary = {
        **extra,
        "train": result["train"],
        "test": result["test"],
        "n_genes": len(result["genes"]),
        "methods": json.loads(table.to_json(orient="index")),
    }
    (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=2))
    return table


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def demo(
    *,
    out: str | Path = "bitro_demo",
    quick: bool = False,
    seed: int = 0,
    n_slides: int | None = None,
    epochs: int | None = None,
    size_um: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Synthetic data end to end; returns the per-method summary table (also printed and written).

    Slides from ``bs.datasets.synthetic`` -> ``segment`` -> ``cell_features`` -> ``phenotypes`` ->
    ``assign_cells`` -> ``cell_graph``; BiTro, ridge and mean fitted on all slides but the last;
    spot- and cell-level predictions on the last slide; per-gene metrics (spot level against
    the measured counts, cell level against the simulated truth). Writes
    ``demo_spot_metrics.csv``, ``demo_cell_metrics.csv``, ``demo_summary.json`` and ``demo.png``
    to ``out``. ``quick=True`` uses tiny slides and few epochs (CI size).
    """
    import pandas as pd
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    n_slides = n_slides or (3 if quick else 4)
    if n_slides < 2:
        raise ValueError("The demo needs at least 2 slides (training and test).")
    size = size_um or (400.0 if quick else 900.0)
    epochs = epochs or (3 if quick else 30)
    cfg = {
        "data": {
            "reader": "synthetic",
            "kwargs": {"n_slides": n_slides, "seed": seed, "size_um": size, "n_genes": 60 if quick else 120},
        }
    }
    slides, truths = read_slides(cfg)
    _log(f"synthetic: {n_slides} slides of {size:.0f} µm, {slides[0].tables['table'].n_vars} genes", t0=t0)
    prepare(slides, progress=progress, t0=t0)
    ids = sample_ids(slides)
    result = holdout(
        slides,
        test=[ids[-1]],
        top_hvg=50,
        fit_kwargs={"bitro": {"epochs": epochs, "seed": seed}},
        truths=truths,
        progress=progress,
        t0=t0,
    )
    out = Path(out)
    table = _write_outputs(result, out, name="demo", extra={"epochs": epochs, "size_um": size, "seed": seed})
    fig = write_figure(
        result, out / "demo.png", title=f"bitro-sc demo: train {result['train']}, test {result['test']}"
    )
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(table.to_string())
    _log(f"wrote {out}/demo_*.csv, demo_summary.json and {fig.name}", t0=t0)
    return table


def run(config: str | Path, *, out: str | Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run the steps of a config file (see the module docstring); ``dry_run`` only validates it."""
    import pandas as pd

    cfg = load_config(config)
    if out is not None:
        cfg["out"] = str(Path(out).resolve())
    if dry_run:
        print(json.dumps(cfg, indent=2))
        return cfg
    t0 = time.perf_counter()
    slides, truths = read_slides(cfg)
    _log(f"read {len(slides)} slide(s) with {cfg['data']['reader']}", t0=t0)
    prepare(slides, steps=cfg["steps"], params=cfg["params"], progress=cfg["progress"], t0=t0)
    out_dir = Path(cfg["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if "cross_validate" in cfg["steps"]:
        import bitro_sc as bs

        kw = {"progress": cfg["progress"], **cfg["params"].get("cross_validate", {})}
        df = bs.tl.cross_validate(slides, **kw)
        df.to_csv(out_dir / "cross_validate.csv", index=False)
        summary = pd.DataFrame.from_dict(df.attrs["summary"], orient="index")
        (out_dir / "cross_validate_summary.json").write_text(summary.to_json(orient="index", indent=2))
        with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
            print(summary.to_string())
        results["cross_validate"] = df
    if "holdout" in cfg["steps"]:
        kw = dict(cfg["params"]["holdout"])
        res = holdout(slides, truths=truths, progress=cfg["progress"], t0=t0, **kw)
        table = _write_outputs(res, out_dir, name="holdout", extra={"config": str(config)})
        write_figure(res, out_dir / "holdout.png", title=f"train {res['train']}, test {res['test']}")
        with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
            print(table.to_string())
        results["holdout"] = table
    _log(f"results in {out_dir}", t0=t0)
    return results


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="bitro-sc",
        description="Predict gene expression from H&E per spot, per slide and per cell (BiTro).",
    )
    p.add_argument("--version", action="version", version=f"bitro-sc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,run}")
    d = sub.add_parser("demo", help="synthetic slides end to end: segment, features, fit, predict, evaluate")
    d.add_argument("--out", default="bitro_demo", help="folder for the metrics tables and the figure")
    d.add_argument("--quick", action="store_true", help="tiny slides and few epochs (CI size, ~1 min)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-slides", type=int, default=None, help="slides to simulate (the last one is the test)")
    d.add_argument("--epochs", type=int, default=None, help="BiTro training epochs")
    d.add_argument("--size-um", type=float, default=None, help="side of each simulated slide in µm")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = sub.add_parser("run", help="run the steps of a TOML / JSON / YAML config (see `bitro_sc.cli`)")
    r.add_argument("config", help="config file (.toml, .json, .yaml)")
    r.add_argument("--out", default=None, help="results folder (overrides `out` in the config)")
    r.add_argument("--dry-run", action="store_true", help="validate the config and print it; run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bitro-sc``; returns the exit status (2 for a bad config)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo(
                out=args.out,
                quick=args.quick,
                seed=args.seed,
                n_slides=args.n_slides,
                epochs=args.epochs,
                size_um=args.size_um,
                progress=not args.no_progress,
            )
        else:
            run(args.config, out=args.out, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"bitro-sc: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
