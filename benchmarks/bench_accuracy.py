"""Prediction accuracy: BiTro against the ridge and mean baselines, on synthetic and real data.

Sections (choose with ``--sections``; all run side by side on the same folds, genes and features):

``spot``
    Synthetic spatial slides (``bs.datasets.synthetic(kind="visium")``), leave-one-slide-out:
    spot-level per-gene Pearson on the held-out slide (BiTro, ridge, mean) and cell-level Pearson
    against the simulated truth (only spots were supervised).
``bulk``
    Synthetic slides with bulk tables (``with_bulk=True``); train on most slides, test on the rest:
    per-gene Pearson across held-out slides, number of significantly predicted genes (one-sided
    Pearson test, Benjamini-Hochberg q < 0.05), cell-level maps from bulk-only training vs truth.
``transfer``
    Scarce targets: one slide of spots, with and without a bulk-trained base (LoRA,
    ``transfer="bulk"``); and a few bulk slides with and without a spot-trained base
    (``transfer="spatial"``). Both cohorts share one gene model; several model seeds.
``her2st``
    Leave-one-section-out over the HER2ST sections C2-C5 (``bs.io.read_st``): HEST-style score
    (mean Pearson over the top-50 HVGs of the training sections) per method and fold.

Run: ``python benchmarks/bench_accuracy.py [--quick] [--sections spot,bulk,transfer,her2st]``;
results go to ``benchmarks/results/accuracy.md`` (with the command). ``--quick`` is a smoke-test
size (numbers are not meaningful). Real data from ``$BITRO_SC_DATA`` or ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "accuracy.md"
SECTIONS = ("spot", "bulk", "transfer", "her2st")
METHODS = ("bitro", "ridge", "mean")


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def _md_table(df: pd.DataFrame) -> str:
    try:
        return df.to_markdown(floatfmt=".3f")
    except ImportError:  # tabulate missing: fixed-width text in a code block
        return "```\n" + df.to_string(float_format=lambda v: f"{v:.3f}") + "\n```"


PREP_STEPS = ("segment", "cell_features", "phenotypes", "assign_cells", "cell_graph")


def prepare(slides: list, *, steps: Sequence[str] = PREP_STEPS) -> None:
    """The per-slide steps, as ``bitro-sc run`` runs them: ``cell_features`` and ``phenotypes`` on
    all slides together (one feature scaling, one k-means), the others slide by slide."""
    import bitro_sc as bs

    for step in [s for s in PREP_STEPS if s in steps]:
        fn = getattr(bs.tl, step)
        kw = {"progress": False} if step in ("segment", "cell_features") else {}
        if step in ("cell_features", "phenotypes"):
            fn(slides, **kw)
        else:
            for s in slides:
                fn(s, **kw)


def _synthetic(n: int, *, seed: int, size_um: float, n_genes: int, **kw: Any) -> tuple[list, list]:
    import bitro_sc as bs

    pairs = bs.datasets.synthetic(n, seed=seed, size_um=size_um, n_genes=n_genes, return_truth=True, **kw)
    pairs = [pairs] if isinstance(pairs, tuple) else list(pairs)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _spot_fold_scores(model: Any, test: Any, name: str) -> pd.DataFrame:
    """Spot-level per-gene scores of ``model`` on ``test`` (light copy of the table, nothing written)."""
    import bitro_sc as bs

    light = bs.tl.prediction_table(model, test, key_added=name)
    return bs.tl.evaluate(light, layer=name, top_hvg=None, store=False)


# ----------------------------------------------------------------------------------------------
def bench_spot(args: argparse.Namespace, t0: float) -> str:
    import bitro_sc as bs

    n, size, genes_n = (3, 400.0, 60) if args.quick else (args.n_slides, args.size_um, 150)
    epochs = 3 if args.quick else args.epochs
    slides, truths = _synthetic(n, seed=args.seed, size_um=size, n_genes=genes_n)
    prepare(slides)
    ids = [str(bs.slide_info(s)["sample_id"]) for s in slides]
    rows = []
    folds = list(range(n))[-(args.folds or n) :] if not args.quick else [n - 1]
    for k in folds:
        res = bs.tl.holdout(
            slides,
            test=[ids[k]],
            top_hvg=50,
            fit_kwargs={"bitro": {"epochs": epochs, "seed": args.seed, "model": args.bitro_model}},
            truths=truths,
            progress=False,
        )
        summary = res.summary()
        for name in res.models:
            sub = res.scores[res.scores["method"] == name]
            rows.append(
                {
                    "fold": ids[k],
                    "method": name,
                    "spot_mean_pearson": sub["pearson"].mean(),
                    "hest_score": summary.loc[name, "hest_score"],
                    "n_nan": int(sub["pearson"].isna().sum()),
                    "cell_median_pearson": summary.loc[name, "cell_median_pearson"],
                }
            )
        _log(f"spot fold {ids[k]} done", t0)
    res = pd.DataFrame(rows)
    mean = res.groupby("method", sort=False)[
        ["spot_mean_pearson", "hest_score", "cell_median_pearson"]
    ].mean()
    return (
        f"### Synthetic spot level ({n} slides of {size:.0f} µm, {genes_n} genes, BiTro {epochs} epochs"
        f"{f', model {json.dumps(args.bitro_model)}' if args.bitro_model else ''})\n\n"
        f"Leave-one-slide-out ({len(folds)} of {n} slides held out in turn, the model trained on "
        f"the other {n - 1}; `bs.tl.holdout`); 50 training HVGs per fold; cell level = median over "
        f"genes of the per-gene Pearson against the simulated truth (`bs.metrics.cell_truth_scores`).\n\n"
        f"{_md_table(res.set_index(['fold', 'method']))}\n\nMean over folds:\n\n{_md_table(mean)}\n"
    )


def bench_bulk(args: argparse.Namespace, t0: float) -> str:
    import anndata as ad

    import bitro_sc as bs

    n, n_test, size, genes_n = (8, 3, 300.0, 40) if args.quick else (40, 10, 500.0, 100)
    epochs = 3 if args.quick else args.epochs
    slides, truths = _synthetic(n, seed=args.seed + 100, size_um=size, n_genes=genes_n, with_bulk=True)
    prepare(slides, steps=("segment", "cell_features", "phenotypes", "cell_graph"))
    train = slides[:-n_test]
    genes = bs.pp.highly_variable_genes([ad.concat([s.tables["bulk"] for s in train])], n_top=50)
    res = bs.tl.holdout(
        slides,
        test=[str(bs.slide_info(s)["sample_id"]) for s in slides[-n_test:]],
        level="bulk",
        genes=genes,
        fit_kwargs={"bitro": {"epochs": epochs, "seed": args.seed}},
        truths=truths,
        progress=False,
    )
    _log("bulk models fitted and scored", t0)
    summary = res.summary()
    assert res.cell_scores is not None
    cell_r = res.cell_scores.groupby(["method", "sample"], sort=False)["pearson"].median()
    rows = [
        {
            "method": name,
            "mean_pearson_across_slides": res.scores.loc[res.scores["method"] == name, "pearson"].mean(),
            "n_significant": int(summary.loc[name, "n_significant"]),
            "n_genes": int(summary.loc[name, "n_genes"]),
            "cell_median_pearson": float(np.nanmean(cell_r.loc[name].to_numpy())),
        }
        for name in res.models
    ]
    res_table = pd.DataFrame(rows).set_index("method")
    return (
        f"### Synthetic bulk ({n - n_test} training / {n_test} test slides of {size:.0f} µm, "
        f"BiTro {epochs} epochs)\n\n"
        'Per-gene Pearson across the held-out slides (log1p CP10k; `bs.tl.holdout(level="bulk")`); '
        "significant = one-sided Pearson test, Benjamini-Hochberg q < 0.05; cell level = median per-gene "
        f"Pearson vs truth, mean over test slides.\n\n{_md_table(res_table)}\n"
    )


def bench_transfer(args: argparse.Namespace, t0: float) -> str:
    import anndata as ad

    import bitro_sc as bs

    if args.quick:
        sizes, size, genes_n, epochs, seeds = [8], 300.0, 40, 3, [args.seed]
    else:
        sizes = sorted({int(v) for v in args.transfer_bulk.split(",")})
        size, genes_n, epochs = 500.0, 100, args.epochs
        seeds = [args.seed + k for k in range(args.transfer_seeds)]
    # one biology (gene model) for both cohorts: different patients, slides and platforms
    biology = args.seed + 200
    bulk_slides, _ = _synthetic(
        max(sizes), seed=args.seed + 200, size_um=size, n_genes=genes_n, with_bulk=True, gene_seed=biology
    )
    spot_slides, _ = _synthetic(
        3, seed=args.seed + 300, size_um=size * 1.5, n_genes=genes_n, gene_seed=biology
    )
    prepare(bulk_slides + spot_slides)
    scarce, tests = spot_slides[:1], spot_slides[1:]
    few, held = bulk_slides[:4], bulk_slides[4:]
    genes = bs.pp.highly_variable_genes([s.tables["table"] for s in scarce], n_top=50)

    def spot_score(model: Any) -> float:
        return float(np.mean([_spot_fold_scores(model, s, "x")["pearson"].mean() for s in tests]))

    def bulk_score(model: Any) -> float:
        light = [bs.tl.prediction_table(model, s, level="bulk", key_added="x") for s in held]
        df = bs.tl.evaluate(
            ad.concat(light, merge="first"), layer="x", genes=genes, top_hvg=None, level="bulk"
        )
        return float(df["pearson"].mean())

    b2s: dict[tuple[str, int], float] = {}
    s2b: dict[tuple[str, int], float] = {}
    ridge = spot_score(bs.tl.fit_baseline(scarce, method="ridge", genes=genes))  # no seed: fitted once
    for seed in seeds:
        kw = {"epochs": epochs, "seed": seed, "progress": False}
        b2s["scratch (1 spot slide)", seed] = spot_score(bs.tl.fit_bitro(scarce, genes=genes, **kw))
        b2s["ridge (1 spot slide)", seed] = ridge
        for n in sizes:
            base = bs.tl.fit_bitro(bulk_slides[:n], level="bulk", genes=genes, **kw)
            b2s[f"bulk base ({n} slides), no spot training", seed] = spot_score(base)
            lora = bs.tl.fit_bitro(scarce, transfer="bulk", base=base, genes=genes, **kw)
            b2s[f"LoRA from bulk base ({n} slides)", seed] = spot_score(lora)
        _log(f"transfer bulk -> spot, seed {seed} done", t0)
        spot_base = bs.tl.fit_bitro(spot_slides, genes=genes, **kw)
        s2b["spot base (3 slides), no bulk training", seed] = bulk_score(spot_base)
        s2b["scratch (4 bulk slides)", seed] = bulk_score(
            bs.tl.fit_bitro(few, level="bulk", genes=genes, **kw)
        )
        lora = bs.tl.fit_bitro(few, transfer="spatial", base=spot_base, genes=genes, **kw)
        s2b["LoRA from spot base", seed] = bulk_score(lora)
        _log(f"transfer spot -> bulk, seed {seed} done", t0)

    def table(scores: dict[tuple[str, int], float]) -> pd.DataFrame:
        df = pd.Series(scores).unstack()
        df.columns = [f"model seed {c}" for c in df.columns]
        df["mean"] = df.mean(axis=1)
        return df.loc[list(dict.fromkeys(k for k, _ in scores))]

    return (
        f"### Transfer with scarce targets (BiTro {epochs} epochs, model seeds {seeds})\n\n"
        f"Both cohorts share one gene model (`gene_seed={biology}`) and differ in patients and slides. "
        f"bulk -> spot: bases on the first {sizes} of {max(sizes)} bulk slides of {size:.0f} µm, target "
        f"1 spot slide of {size * 1.5:.0f} µm ({scarce[0].tables['table'].n_obs} spots), scored on 2 "
        f"held-out spot slides (mean per-gene Pearson over the {len(genes)} genes):\n\n"
        f"{_md_table(table(b2s))}\n\n"
        f"spot -> bulk: base on the 3 spot slides, target 4 bulk slides, per-gene Pearson across the "
        f"{len(held)} other bulk slides:\n\n{_md_table(table(s2b))}\n"
    )


def her2st_slides() -> list | None:
    """The HER2ST sections C2-C5 read with ``bs.io.read_st`` (patient "C"), or ``None`` when the data
    are not found ($BITRO_SC_DATA or ../shared/data)."""
    import bitro_sc as bs

    env = os.environ.get("BITRO_SC_DATA")
    data = next(
        (
            c / "her2st"
            for c in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]
            if (c / "her2st").is_dir()
        ),
        None,
    )
    if data is None:
        return None
    return [
        bs.io.read_st(
            data / f"{s}_HE.jpg",
            data / f"{s}_counts.tsv.gz",
            data / f"{s}_selection.tsv",
            sample_id=s,
            patient_id="C",
        )
        for s in ("C2", "C3", "C4", "C5")
    ]


def bench_her2st(args: argparse.Namespace, t0: float) -> str:
    import bitro_sc as bs

    slides = her2st_slides()
    if slides is None:
        return "### HER2ST\n\nskipped: data not found ($BITRO_SC_DATA or ../shared/data).\n"
    prepare(slides)
    epochs = 3 if args.quick else args.epochs
    df = bs.tl.cross_validate(
        slides,
        methods=METHODS,
        top_hvg=50,
        fit_kwargs={"bitro": {"epochs": epochs, "seed": args.seed, "progress": False}},
        progress=False,
    )
    per_fold = (
        df[df["is_hvg"]].groupby(["test_group", "method"], sort=False)["pearson"].mean().unstack("method")
    )
    summary = pd.DataFrame.from_dict(df.attrs["summary"], orient="index")
    return (
        f"### HER2ST leave-one-section-out (C2-C5, BiTro {epochs} epochs)\n\n"
        "HEST-style score (mean Pearson over the top-50 HVGs of the training sections) per held-out "
        f"section:\n\n{_md_table(per_fold)}\n\nSummary:\n\n{_md_table(summary)}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers not meaningful)")
    p.add_argument("--epochs", type=int, default=30, help="BiTro training epochs (full runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-slides", type=int, default=4, help="synthetic spot section: slides")
    p.add_argument("--size-um", type=float, default=2000.0, help="synthetic spot section: slide side (µm)")
    p.add_argument("--folds", type=int, default=None, help="synthetic spot section: held-out slides (last N)")
    p.add_argument(
        "--bitro-model",
        type=json.loads,
        default=None,
        help='synthetic spot section: BiTro model options as JSON, e.g. \'{"linear_start": "ridge"}\'',
    )
    p.add_argument(
        "--transfer-bulk", default="80", help="transfer section: bulk slides of the bases (comma-separated)"
    )
    p.add_argument("--transfer-seeds", type=int, default=3, help="transfer section: model seeds")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    parts = []
    for name in chosen:
        start = time.perf_counter()
        text = {"spot": bench_spot, "bulk": bench_bulk, "transfer": bench_transfer, "her2st": bench_her2st}[
            name
        ](args, t0)
        parts.append(text + f"\n({name}: {time.perf_counter() - start:.0f} s)\n")
        _log(f"section {name} done", t0)
        print(text, flush=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    machine = platform.processor() or platform.machine()
    header = (
        "# Accuracy benchmark\n\n"
        f"Command: `python benchmarks/bench_accuracy.py {command}`  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine}, "
        f"{torch.get_num_threads()} torch threads; total {time.perf_counter() - t0:.0f} s.\n"
        + ("\n**--quick: smoke-test sizes, the numbers are not meaningful.**\n" if args.quick else "")
        + "\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        header = "\n---\n\n" + header.replace("# Accuracy benchmark\n\n", "")
        out.write_text(out.read_text() + header + "\n".join(parts))
    else:
        out.write_text(header + "\n".join(parts))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
