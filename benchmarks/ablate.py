"""Ablations: BiTro with other settings on the benchmark's data, without re-preparing it each time.

The numbers in the ablation tables of ``benchmarks/results/accuracy.md`` come from this logic
(first as scratch scripts, then committed here). Scoring is the benchmark's: spot-level mean
Pearson over the 50 training HVGs on each held-out slide, and the median over genes of the
cell-level Pearson against the simulated truth (``bs.metrics.cell_truth_scores``).

Usage::

    python benchmarks/ablate.py prepare --seed 0 --out /tmp/ablate_s0       # 4 synthetic slides
    python benchmarks/ablate.py spot --data /tmp/ablate_s0 --config '{"model": {"rna_head": true}}'
    python benchmarks/ablate.py her2st --config '{"model": {"transformer_layers": 0}}'

``--config`` is a JSON object of extra ``bs.tl.fit_bitro`` keyword arguments (``"model"``,
``"train"``, ``"seed"``, ...); ``{"method": "ridge"}`` scores the ridge baseline instead. Prepared
data are written where ``--out`` says (never into the shared data folder).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def prepare(seed: int, out: Path, *, n_slides: int = 4, size_um: float = 800.0, n_genes: int = 150) -> None:
    """Simulate and prepare (segment, features, phenotypes, spots, graph) the spot benchmark's slides."""
    import bitro_sc as bs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_accuracy import prepare as prepare_slides

    pairs = bs.datasets.synthetic(n_slides, seed=seed, size_um=size_um, n_genes=n_genes, return_truth=True)
    slides, truths = [p[0] for p in pairs], [p[1] for p in pairs]
    prepare_slides(slides)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(slides):
        s.write(out / f"s{i}.zarr", overwrite=True)
    with open(out / "truths.pkl", "wb") as f:
        pickle.dump(truths, f)


def _fit(train: list, genes: list[str], config: dict[str, Any]) -> Any:
    import bitro_sc as bs

    cfg = dict(config)
    method = cfg.pop("method", "bitro")
    if method == "bitro":
        return bs.tl.fit_bitro(train, genes=genes, **{"epochs": 30, "seed": 0, "progress": False, **cfg})
    return bs.tl.fit_baseline(train, method=method, genes=genes)


def _true_types(sdata: Any, truth: Any) -> None:
    """Diagnosis only: replace the k-means phenotypes with each cell's simulated type (the nucleus
    under its centroid; "none" where no true nucleus is), i.e. a perfect cell typing."""
    import pandas as pd

    cells = sdata.tables["cells"]
    labels = np.asarray(truth.labels)
    y = np.clip(np.round(cells.obs["y_px"].to_numpy()).astype(int), 0, labels.shape[0] - 1)
    x = np.clip(np.round(cells.obs["x_px"].to_numpy()).astype(int), 0, labels.shape[1] - 1)
    true_id = labels[y, x]
    expr = truth.expression
    row = pd.Index(expr.obs["cell_id"].to_numpy()).get_indexer(true_id)
    types = expr.obs["cell_type"].astype(str).to_numpy()[np.maximum(row, 0)]
    cells.obs["bitro_phenotype"] = pd.Categorical(np.where((true_id > 0) & (row >= 0), types, "none"))


def spot(
    data: Path, config: dict[str, Any], folds: list[int], *, true_types: bool = False
) -> dict[str, float]:
    """Leave-one-slide-out over the prepared slides; returns the mean spot and cell scores.
    ``true_types``: phenotypes = the simulated cell types (a perfect typing; diagnosis only)."""
    import spatialdata as sd

    import bitro_sc as bs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_accuracy import _spot_fold_scores

    paths = sorted(data.glob("s*.zarr"), key=lambda p: int(p.stem[1:]))
    if not paths:
        raise FileNotFoundError(f"No prepared slides in {data}: run `ablate.py prepare --out {data}` first.")
    slides = [sd.read_zarr(p) for p in paths]
    with open(data / "truths.pkl", "rb") as f:
        truths = pickle.load(f)
    if true_types:
        for sdata, truth in zip(slides, truths, strict=True):
            _true_types(sdata, truth)
    rows = []
    for k in folds:
        t0 = time.perf_counter()
        train = [s for i, s in enumerate(slides) if i != k]
        genes = list(bs.pp.highly_variable_genes([s.tables["table"] for s in train], n_top=50))
        model = _fit(train, genes, config)
        spot_r = float(_spot_fold_scores(model, slides[k], "x")["pearson"].mean())
        frame = model.predict_frame(slides[k], level="cell")
        cells = bs.metrics.cell_truth_scores(frame, slides[k], truths[k])
        rows.append({"fold": k, "spot": spot_r, "cell": float(cells["pearson"].median())})
        print(json.dumps({**rows[-1], "s": round(time.perf_counter() - t0, 1)}), flush=True)
    return {key: float(np.mean([r[key] for r in rows])) for key in ("spot", "cell")}


def her2st(config: dict[str, Any]) -> dict[str, float]:
    """Leave-one-section-out over HER2ST C2-C5 (``bs.tl.cross_validate``): mean HEST score per method."""
    import bitro_sc as bs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_accuracy import her2st_slides
    from bench_accuracy import prepare as prepare_slides

    slides = her2st_slides()
    if slides is None:
        raise FileNotFoundError("HER2ST not found ($BITRO_SC_DATA or ../shared/data).")
    prepare_slides(slides)
    cfg = dict(config)
    method = cfg.pop("method", "bitro")
    fit = {"bitro": {"epochs": 30, "seed": 0, "progress": False, **cfg}} if method == "bitro" else {}
    df = bs.tl.cross_validate(slides, methods=(method,), top_hvg=50, fit_kwargs=fit, progress=False)
    per = df[df["is_hvg"]].groupby(["test_group", "method"], sort=False)["pearson"].mean().unstack("method")
    print(per.round(3).to_string(), flush=True)
    return {m: float(v) for m, v in per.mean().items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("prepare", help="simulate and prepare the spot benchmark's slides")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--size-um", type=float, default=800.0, help="slide side (µm)")
    a.add_argument("--n-slides", type=int, default=4)
    b = sub.add_parser("spot", help="leave-one-slide-out on prepared slides")
    b.add_argument("--data", type=Path, required=True)
    b.add_argument("--config", default="{}")
    b.add_argument("--folds", default="0,1,2,3")
    b.add_argument("--true-types", action="store_true", help="phenotypes = simulated cell types (diagnosis)")
    c = sub.add_parser("her2st", help="leave-one-section-out on HER2ST")
    c.add_argument("--config", default="{}")
    args = p.parse_args(argv)
    if args.what == "prepare":
        prepare(args.seed, args.out, n_slides=args.n_slides, size_um=args.size_um)
        return 0
    config = json.loads(args.config)
    if args.what == "spot":
        result = spot(args.data, config, [int(f) for f in args.folds.split(",")], true_types=args.true_types)
    else:
        result = her2st(config)
    print("SUMMARY", json.dumps(config), json.dumps({k: round(v, 4) for k, v in result.items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
