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
instead of ``slides``. The ``holdout`` step (``bs.tl.holdout``) fits on all slides but those
listed in ``[params.holdout] test = [...]`` and predicts and evaluates on those.

Batch runs (a ``[batch]`` table) prepare each slide on its own, one zarr store per slide, and can
be interrupted and resumed::

    out = "cohort_out"
    [data]
    reader = "read_wsi"
    folder = "slides"                  # every file matching `pattern` (or `slides = [...]`)
    pattern = "*.svs"
    options = { mpp = 0.25 }           # reader arguments shared by every slide
    [batch]
    stores = "stores"                  # one `<sample_id>.zarr` per slide (relative to `out`)
    scheduler = "local"                # or "distributed": slides in parallel on a dask cluster,
    # address = "tcp://10.0.0.1:8786"  # at this scheduler address (else a LocalCluster of n_workers)
    [steps]
    run = ["segment", "cell_features", "cell_graph", "predict"]
    [params.predict]
    model = "bitro_model"              # a saved BiTroModel; level = "cell" by default

Finished slides and steps are skipped on a re-run, an interrupted slide goes on from its last
finished step, and a slide that fails is reported (``batch_summary.csv``, ``batch_errors.txt``)
without stopping the others; the exit status is then 1. See :func:`bitro_sc.tl.run_batch`.

The commands only read the config and call the public API; configs are read and checked by
:func:`load_config` / :func:`validate_config`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _sdata, pl, tl
from ._config import ConfigError, load_config, log, prepare, read_slides, validate_config

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .tl import Holdout

__all__ = ["ConfigError", "demo", "load_config", "main", "run", "validate_config"]

_EPILOG = """\
config (TOML / JSON / YAML; relative paths are read relative to the config file):
  out = "bitro_out"     seed = 0     progress = true
  [data]            reader = read_visium | read_st | read_hest | read_wsi | synthetic
                    slides = [{ reader arguments of slide 1 }, ...]   (synthetic: n_slides = N, ...)
  [steps]           run = [segment, cell_features, phenotypes, assign_cells, cell_graph,
                           cross_validate | holdout]   (in this order)
  [params.<step>]   keyword arguments of bs.tl.<step>, e.g. [params.holdout] test = ["C3"]
batch run (one zarr store per slide, resumable; slides may fail without stopping the run):
  [data]            folder = "slides"   pattern = "*.tif"   options = { mpp = 0.5 }   (or slides = [...])
  [batch]           stores = "stores"   scheduler = local | distributed   address = "tcp://host:8786"
                    n_workers = 2   threads_per_worker = 1   max_parallel = N   write_image = false
  [steps]           run = [segment, cell_features, assign_cells, cell_graph, predict]   (in this order)
  [params.predict]  model = "saved_model_dir"   level = "cell"
  exit status: 0 all slides done, 1 some slide failed (see <out>/batch_summary.csv), 2 bad config
see `python -c "import bitro_sc.cli; help(bitro_sc.cli)"` for a full example.
"""


def _print_table(table: pd.DataFrame) -> None:
    import pandas as pd

    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(table.to_string())


def _write_holdout(result: Holdout, out: Path, *, name: str, extra: dict[str, Any]) -> pd.DataFrame:
    """Write ``<name>_{spot,bulk,cell}_metrics.csv``, ``<name>_summary.json``, ``<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    table = result.summary()
    result.scores.to_csv(out / f"{name}_{result.level}_metrics.csv", index=False)
    if result.cell_scores is not None:
        result.cell_scores.to_csv(out / f"{name}_cell_metrics.csv", index=False)
    summary = {
        **extra,
        "train": result.train,
        "test": result.test,
        "n_genes": len(result.genes),
        "methods": json.loads(table.to_json(orient="index")),
    }
    (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=2))
    title = f"train {result.train}, test {result.test}"
    fig = pl.holdout(
        result, title=f"bitro-sc {name}: {title}" if name == "demo" else title, save=out / f"{name}.png"
    )
    plt.close(fig)
    _print_table(table)
    return table


def demo(
    *,
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    n_slides: int | None = None,
    epochs: int | None = None,
    size_um: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Synthetic data end to end; returns the per-method summary table (also printed and written).

    Slides from ``bs.datasets.synthetic`` -> ``segment`` -> ``cell_features`` -> ``phenotypes`` ->
    ``assign_cells`` -> ``cell_graph``; BiTro, ridge and mean fitted on all slides but the last
    and evaluated on the last (``bs.tl.holdout``): spot level against the measured counts, cell
    level against the simulated truth. Writes ``demo_spot_metrics.csv``, ``demo_cell_metrics.csv``,
    ``demo_summary.json`` and ``demo.png`` (``bs.pl.holdout``) to ``out`` (``None``: a new
    temporary folder, whose path is printed). ``quick=True`` uses tiny slides and few epochs (CI
    size, about 15 s on an idle 2-core machine).
    """
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    n_slides = n_slides or (3 if quick else 4)
    if n_slides < 2:
        raise ValueError("The demo needs at least 2 slides (training and test).")
    size = size_um or (400.0 if quick else 900.0)
    epochs = epochs or (3 if quick else 30)
    kwargs = {"n_slides": n_slides, "seed": seed, "size_um": size, "n_genes": 60 if quick else 120}
    slides, truths = read_slides({"data": {"reader": "synthetic", "kwargs": kwargs}})
    log(f"synthetic: {n_slides} slides of {size:.0f} µm, {slides[0].tables['table'].n_vars} genes", t0=t0)
    prepare(slides, progress=progress, t0=t0)
    result = tl.holdout(
        slides,
        test=_sdata.sample_ids(slides)[-1:],
        top_hvg=50,
        fit_kwargs={"bitro": {"epochs": epochs, "seed": seed}},
        truths=truths,
        progress=progress,
    )
    log(f"fitted {', '.join(result.models)} on {len(result.train)} slide(s), evaluated {result.test}", t0=t0)
    out = Path(tempfile.mkdtemp(prefix="bitro_demo_")) if out is None else Path(out)
    table = _write_holdout(result, out, name="demo", extra={"epochs": epochs, "size_um": size, "seed": seed})
    log(f"wrote {out}/demo_*.csv, demo_summary.json and demo.png", t0=t0)
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
    if cfg.get("batch") is not None:
        return {"batch": _run_batch(cfg, t0=t0)}
    slides, truths = read_slides(cfg)
    log(f"read {len(slides)} slide(s) with {cfg['data']['reader']}", t0=t0)
    if "holdout" in cfg["steps"]:  # before the (long) preparation, not after it
        from ._validate import check_test_ids

        check_test_ids(slides, cfg["params"]["holdout"]["test"])
    prepare(slides, steps=cfg["steps"], params=cfg["params"], progress=cfg["progress"], t0=t0)
    out_dir = Path(cfg["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if "cross_validate" in cfg["steps"]:
        kw = {"progress": cfg["progress"], **cfg["params"].get("cross_validate", {})}
        df = tl.cross_validate(slides, **kw)
        df.to_csv(out_dir / "cross_validate.csv", index=False)
        summary = pd.DataFrame.from_dict(df.attrs["summary"], orient="index")
        (out_dir / "cross_validate_summary.json").write_text(summary.to_json(orient="index", indent=2))
        _print_table(summary)
        results["cross_validate"] = df
    if "holdout" in cfg["steps"]:
        kw = dict(cfg["params"]["holdout"])
        cell_level = kw.pop("cell_level", True)
        res = tl.holdout(slides, truths=truths if cell_level else None, progress=cfg["progress"], **kw)
        results["holdout"] = _write_holdout(res, out_dir, name="holdout", extra={"config": str(config)})
    log(f"results in {out_dir}", t0=t0)
    return results


def _run_batch(cfg: dict[str, Any], *, t0: float) -> pd.DataFrame:
    """The ``[batch]`` form of ``run``: one store per slide, resumable, locally or on a dask cluster."""
    from .tl import run_batch

    batch = cfg["batch"]
    out_dir = Path(cfg["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = cfg["data"]["slides"]
    log(f"batch of {len(slides)} slide(s) with {cfg['data']['reader']}, stores in {batch['stores']}", t0=t0)
    kwargs = {
        "stores": batch["stores"],
        "steps": cfg["steps"],
        "params": cfg["params"],
        "reader": cfg["data"]["reader"],
        "write_image": batch["write_image"],
        "max_parallel": batch["max_parallel"],
        "progress": cfg["progress"],
    }
    if batch["scheduler"] == "distributed":
        try:
            from distributed import Client, LocalCluster
        except ImportError as err:
            raise ConfigError(
                "batch.scheduler = 'distributed' needs dask.distributed: `pip install bitro-sc[distributed]`."
            ) from err

        if batch["address"] is not None:
            with Client(batch["address"]) as client:
                table = run_batch(slides, client=client, **kwargs)
        else:
            with (
                LocalCluster(
                    n_workers=batch["n_workers"], threads_per_worker=batch["threads_per_worker"]
                ) as cluster,
                Client(cluster) as client,
            ):
                table = run_batch(slides, client=client, **kwargs)
    else:
        table = run_batch(slides, **kwargs)
    errors = table[table["status"] == "failed"]
    table.drop(columns=["traceback"], errors="ignore").to_csv(out_dir / "batch_summary.csv", index=False)
    if len(errors):
        text = "\n\n".join(f"== {r.slide}\n{r.traceback}" for r in errors.itertuples())
        (out_dir / "batch_errors.txt").write_text(text)
    shown = table[["slide", "status", "steps_run", "steps_skipped", "n_cells", "seconds", "error"]]
    _print_table(shown.set_index("slide"))
    counts = table["status"].value_counts().to_dict()
    log(f"batch: {counts}; summary in {out_dir / 'batch_summary.csv'}", t0=t0)
    return table


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="bitro-sc",
        description="Predict gene expression from H&E per spot, per slide and per cell (BiTro).",
    )
    p.add_argument("--version", action="version", version=f"bitro-sc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,run}")
    d = sub.add_parser("demo", help="synthetic slides end to end: segment, features, fit, predict, evaluate")
    d.add_argument(
        "--out",
        default=None,
        help="folder for the metrics tables and the figure (default: a new temporary one)",
    )
    d.add_argument("--quick", action="store_true", help="tiny slides and few epochs (CI size, ~15 s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-slides", type=int, default=None, help="slides to simulate (the last one is the test)")
    d.add_argument("--epochs", type=int, default=None, help="BiTro training epochs")
    d.add_argument("--size-um", type=float, default=None, help="side of each simulated slide in µm")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = sub.add_parser(
        "run",
        help="run the steps of a TOML / JSON / YAML config (see `bitro-sc run --help`)",
        description="Read slides, prepare them and evaluate methods, as a config file says.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("config", help="config file (.toml, .json, .yaml)")
    r.add_argument("--out", default=None, help="results folder (overrides `out` in the config)")
    r.add_argument("--dry-run", action="store_true", help="validate the config and print it; run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bitro-sc``; the exit status: 1 when a batch slide failed, 2 for a bad config."""
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
            results = run(args.config, out=args.out, dry_run=args.dry_run)
            batch = results.get("batch") if not args.dry_run else None
            if batch is not None and (batch["status"] == "failed").any():
                failed = ", ".join(batch.loc[batch["status"] == "failed", "slide"])
                print(f"bitro-sc: slide(s) failed: {failed}; re-run to retry them", file=sys.stderr)
                return 1
    except ConfigError as err:
        print(f"bitro-sc: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
