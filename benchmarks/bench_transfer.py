"""Transfer with scarce targets, over several synthetic draws and model seeds (issue 17).

One draw (``--draws``) is one biology (``gene_seed``) shared by a bulk cohort (80 slides of 500 µm
with a bulk table) and a spot cohort (5 slides of 750 µm); the draw's slides are prepared once and
cached under ``--cache`` (default ``/tmp/bitro_transfer``). For every model seed:

bulk -> spot
    bases on the first 20 / 40 / 80 bulk slides (20 and 80, and the larger targets, only for the
    ``--full-seeds``); targets: the first 1 or 3 spot slides; scored on
    spot slides 4-5 (mean per-gene Pearson over 50 HVGs of spot slide 1). Methods: scratch on the
    target, the bulk base zero-shot, ``transfer="bulk"`` (``policy="auto"``: route chosen by
    validation).
spot -> bulk
    base on spot slides 1-3; targets: the first 4 or 16 bulk slides; scored across the last 24
    bulk slides (per-gene Pearson). Methods: scratch on the target, the spot base zero-shot,
    ``transfer="spatial"``.

``python benchmarks/bench_transfer.py run --draws 7 --seeds 0,1,2`` appends one CSV row per score
to ``--out`` (default ``/tmp/bitro_transfer/scores.csv``); ``python benchmarks/bench_transfer.py
report`` writes ``benchmarks/results/transfer.md`` from it (mean, spread, per-draw means, wins).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "transfer.md"
N_BULK, N_SPOT, TEST_BULK = 80, 5, 24
#: Benchmark-only rows: the mean of two models' predictions (equal weights, fixed in advance), not
#: a route of ``fit_bitro``.
ENSEMBLE = {
    "bulk->spot": "ensemble: mean of transfer + scratch",
    "spot->bulk": "ensemble: mean of transfer + zero-shot base",
}
#: Scratch on the spot target with ``ModelParams.linear_start="constant"`` (the default is
#: ``"ridge"``, which scored lower on one spot slide): the stronger of the two scratch baselines.
SCRATCH_CONSTANT = "scratch (linear_start=constant)"
#: A win is a lead of more than this (mean Pearson); smaller differences are ties.
TIE = 0.001
FIELDS = ("draw", "seed", "direction", "base_n", "target_n", "method", "score", "route", "seconds")


def _md(df: pd.DataFrame, *, index: bool = False) -> str:
    """A pipe table of ``df`` (floats with 3 decimals), without the optional ``tabulate``."""
    if index:
        df = df.reset_index()
    cells = [
        [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)
    ]
    head = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def draw_slides(draw: int, cache: Path, t0: float) -> tuple[list, list]:
    """The draw's bulk and spot slides, prepared (segment ... cell_graph) and cached as zarr."""
    import spatialdata as sd

    import bitro_sc as bs

    folder = cache / f"d{draw}"
    if not (folder / "DONE").exists():
        from bench_accuracy import _synthetic, prepare

        biology = draw + 200
        bulk, _ = _synthetic(
            N_BULK, seed=draw + 200, size_um=500.0, n_genes=100, with_bulk=True, gene_seed=biology
        )
        spots, _ = _synthetic(N_SPOT, seed=draw + 300, size_um=750.0, n_genes=100, gene_seed=biology)
        prepare(bulk + spots)
        folder.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(bulk):
            s.write(folder / f"bulk{i:03d}.zarr", overwrite=True)
        for i, s in enumerate(spots):
            s.write(folder / f"spot{i}.zarr", overwrite=True)
        (folder / "DONE").write_text("prepared\n")
        _log(f"draw {draw}: prepared and cached in {folder}", t0)
    bulk = [sd.read_zarr(p) for p in sorted(glob.glob(str(folder / "bulk*.zarr")))]
    spots = [sd.read_zarr(p) for p in sorted(glob.glob(str(folder / "spot*.zarr")))]
    del bs
    return bulk, spots


def run(args: argparse.Namespace) -> None:
    import anndata as ad
    import torch

    import bitro_sc as bs

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    handle = out.open("a", newline="")
    writer = csv.DictWriter(handle, fieldnames=FIELDS)
    if new:
        writer.writeheader()
    seeds = [int(v) for v in args.seeds.split(",")]
    bases = [int(v) for v in args.bases.split(",")]
    spot_targets = [int(v) for v in args.spot_targets.split(",")]
    bulk_targets = [int(v) for v in args.bulk_targets.split(",")]
    for draw in [int(v) for v in args.draws.split(",")]:
        bulk, spots = draw_slides(draw, Path(args.cache), t0)
        memo: dict[str, Any] = {}
        only = args.spot_bulk or args.bulk_spot  # these modes run every size for every seed
        full = [] if only else [int(v) for v in args.full_seeds.split(",") if v]
        # the core grid first (every seed), then the other sizes for the --full-seeds
        for seed, core in [*[(sd_, True) for sd_ in seeds], *[(sd_, False) for sd_ in full]]:
            sizes = (
                ([40], [1], [4])
                if core
                else ([b for b in bases if b != 40], spot_targets[1:], bulk_targets[1:])
            )
            if args.transfer_only or args.spot_bulk or args.bulk_spot:
                sizes = (bases, spot_targets, bulk_targets)
            _run_seed(bs, ad, writer, handle, args, draw, seed, bulk, spots, *sizes, memo, t0)
    handle.close()


def _run_seed(
    bs: Any,
    ad: Any,
    writer: csv.DictWriter,
    handle: Any,
    args: argparse.Namespace,
    draw: int,
    seed: int,
    bulk: list,
    spots: list,
    bases: list[int],
    spot_targets: list[int],
    bulk_targets: list[int],
    memo: dict[str, Any],
    t0: float,
) -> None:
    """Scores of one draw and model seed, one CSV row each. The core call (base 40, 1 spot slide,
    4 bulk slides) keeps its bases in ``memo``; a later call for the other sizes runs the other
    bases with 1 spot slide, the larger spot targets with the 40-slide base, the larger bulk
    targets with the same spot base."""
    genes = bs.pp.highly_variable_genes([spots[0].tables["table"]], n_top=50)
    tests, held = spots[3:], bulk[-TEST_BULK:]

    def table(model: Any, s: Any, **kw: Any) -> Any:
        """Prediction table of ``model``; of a tuple of models: their mean prediction (an ensemble)."""
        models = model if isinstance(model, tuple) else (model,)
        light = bs.tl.prediction_table(models[0], s, key_added="x", **kw)
        if len(models) > 1:
            more = [bs.tl.prediction_table(m, s, key_added="x", **kw) for m in models[1:]]
            light.layers["x"] = np.mean([np.asarray(t.layers["x"]) for t in [light, *more]], axis=0)
        return light

    def spot_score(model: Any) -> float:
        vals = []
        for s in tests:
            light = table(model, s)
            vals.append(bs.tl.evaluate(light, layer="x", top_hvg=None, store=False)["pearson"].mean())
        return float(np.mean(vals))

    def bulk_score(model: Any) -> float:
        light = [table(model, s, level="bulk") for s in held]
        df = bs.tl.evaluate(
            ad.concat(light, merge="first"), layer="x", genes=genes, top_hvg=None, level="bulk"
        )
        return float(df["pearson"].mean())

    def row(direction: str, base_n: int, target_n: int, method: str, slides: list | None, **kw: Any) -> Any:
        """Fit on ``slides`` (or score ``kw["base"]`` zero-shot) and write the score."""
        t = time.perf_counter()
        score = spot_score if direction == "bulk->spot" else bulk_score
        model = None
        if slides is None:
            value = score(kw["base"])
        else:
            model = bs.tl.fit_bitro(slides, epochs=args.epochs, seed=seed, progress=False, genes=genes, **kw)
            value = score(model)
        route = (model.record.get("route") or {}) if model is not None else {}
        writer.writerow(
            {
                "draw": draw,
                "seed": seed,
                "direction": direction,
                "base_n": base_n,
                "target_n": target_n,
                "method": method,
                "score": round(value, 5),
                "route": json.dumps(
                    {k: route.get(k) for k in ("chosen", "epochs", "scores", "cv_pearson", "margin")}
                    if route
                    else {}
                ),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        handle.flush()
        return model

    core = f"{seed}" not in memo
    if args.bulk_spot:  # bulk -> spot only: every base size x every spot target size
        for k in spot_targets:
            row("bulk->spot", 0, k, "scratch", spots[:k])
            row("bulk->spot", 0, k, SCRATCH_CONSTANT, spots[:k], model={"linear_start": "constant"})
        for n in bases:
            base = bs.tl.fit_bitro(
                bulk[:n], level="bulk", epochs=args.epochs, seed=seed, progress=False, genes=genes
            )
            row("bulk->spot", n, 0, "zero-shot", None, base=base)
            for k in spot_targets:
                row("bulk->spot", n, k, "transfer", spots[:k], transfer="bulk", base=base)
        return
    if args.spot_bulk:  # spot -> bulk only: zero-shot, and scratch / transfer at every bulk target size
        spot_base = bs.tl.fit_bitro(spots[:3], epochs=args.epochs, seed=seed, progress=False, genes=genes)
        row("spot->bulk", 3, 0, "zero-shot", None, base=spot_base)
        for n in bulk_targets:
            row("spot->bulk", 0, n, "scratch", bulk[:n], level="bulk")
            adapted = row("spot->bulk", 3, n, "transfer", bulk[:n], transfer="spatial", base=spot_base)
            row("spot->bulk", 3, n, ENSEMBLE["spot->bulk"], None, base=(adapted, spot_base))
        return
    if args.scratch_constant_only:  # scratch on the spot targets with the constant linear start
        for k in spot_targets:
            row("bulk->spot", 0, k, SCRATCH_CONSTANT, spots[:k], model={"linear_start": "constant"})
        return
    if args.transfer_only:  # spot -> bulk transfer rows only (a re-run after a method change)
        spot_base = bs.tl.fit_bitro(spots[:3], epochs=args.epochs, seed=seed, progress=False, genes=genes)
        for n in bulk_targets:
            adapted = row("spot->bulk", 3, n, "transfer", bulk[:n], transfer="spatial", base=spot_base)
            row("spot->bulk", 3, n, ENSEMBLE["spot->bulk"], None, base=(adapted, spot_base))
        return
    scratch_spot = {k: row("bulk->spot", 0, k, "scratch", spots[:k]) for k in spot_targets}
    for n in bases:
        base = bs.tl.fit_bitro(
            bulk[:n], level="bulk", epochs=args.epochs, seed=seed, progress=False, genes=genes
        )
        row("bulk->spot", n, 0, "zero-shot", None, base=base)
        for k in spot_targets if core else [1]:
            adapted = row("bulk->spot", n, k, "transfer", spots[:k], transfer="bulk", base=base)
            if k in scratch_spot:  # an ensemble, not a route: the mean of two models' predictions
                row("bulk->spot", n, k, ENSEMBLE["bulk->spot"], None, base=(adapted, scratch_spot[k]))
        if core:
            memo[f"{seed}"] = {"base40": base}
        _log(f"draw {draw} seed {seed}: bulk -> spot, base {n} done", t0)
    if core:
        spot_base = bs.tl.fit_bitro(spots[:3], epochs=args.epochs, seed=seed, progress=False, genes=genes)
        memo[f"{seed}"]["spot"] = spot_base
        row("spot->bulk", 3, 0, "zero-shot", None, base=spot_base)
    else:
        for k in spot_targets:
            row("bulk->spot", 40, k, "transfer", spots[:k], transfer="bulk", base=memo[f"{seed}"]["base40"])
        spot_base = memo[f"{seed}"]["spot"]
    for n in bulk_targets:
        if not args.transfer_only:
            row("spot->bulk", 0, n, "scratch", bulk[:n], level="bulk")
        adapted = row("spot->bulk", 3, n, "transfer", bulk[:n], transfer="spatial", base=spot_base)
        row("spot->bulk", 3, n, ENSEMBLE["spot->bulk"], None, base=(adapted, spot_base))
    _log(f"draw {draw} seed {seed}: spot -> bulk done", t0)


# ----------------------------------------------------------------------------------------------
def her2st(args: argparse.Namespace) -> None:
    """Spot -> pseudo-bulk -> spot round trip on the HER2ST sections C2-C5 (one patient)."""
    import spatialdata as sd
    import torch

    import bitro_sc as bs

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    names = ("C2", "C3", "C4", "C5")
    folder = Path(args.cache) / "her2st"
    if (folder / "DONE").exists():
        slides = [sd.read_zarr(folder / f"{n}.zarr") for n in names]
    else:
        from bench_accuracy import her2st_slides, prepare

        found = her2st_slides()
        if found is None:
            raise SystemExit("HER2ST data not found ($BITRO_SC_DATA or ../shared/data).")
        slides = found
        prepare(slides)
        folder.mkdir(parents=True, exist_ok=True)
        for s, n in zip(slides, names, strict=True):
            s.write(folder / f"{n}.zarr", overwrite=True)
        (folder / "DONE").write_text("prepared\n")
    for s, n in zip(slides, names, strict=True):  # pseudo-bulk: the section's spots summed
        spots = s.tables["table"]
        x = np.asarray(spots.X.sum(axis=0)).reshape(1, -1)
        s.tables["bulk"] = bs.io.read_bulk(pd.DataFrame(x, index=[n], columns=spots.var_names))
    _log("HER2ST sections loaded, pseudo-bulk tables added", t0)
    genes = bs.pp.highly_variable_genes([s.tables["table"] for s in slides[:2]], n_top=50)
    test = slides[3]

    def spot_score(model: Any) -> float:
        light = bs.tl.prediction_table(model, test, key_added="x")
        return float(
            bs.tl.evaluate(light, layer="x", genes=genes, top_hvg=None, store=False)["pearson"].mean()
        )

    def bulk_fit(model: Any) -> tuple[float, float]:
        """(Pearson across genes, mean |log1p error|) of the held-out section's pseudo-bulk."""
        pred = bs.tl.prediction_table(model, test, level="bulk", key_added="x")
        p = np.log1p(np.asarray(pred[:, genes].layers["x"], dtype=float).ravel())
        t = test.tables["bulk"][:, genes].X
        t = np.asarray(t, dtype=float).ravel()
        t = np.log1p(t / test.tables["bulk"].X.sum() * 1e4)
        return float(np.corrcoef(p, t)[0, 1]), float(np.abs(p - t).mean())

    def row(seed: int, step: str, model: Any) -> dict[str, Any]:
        r, err = bulk_fit(model)
        return {
            "seed": seed,
            "step": step,
            "C5 spots": spot_score(model),
            "C5 pseudo-bulk r (genes)": r,
            "C5 pseudo-bulk mean abs log1p error": err,
        }

    rows = []
    for seed in [int(v) for v in args.seeds.split(",")]:
        kw = {"epochs": args.epochs, "seed": seed, "progress": False, "genes": genes}
        base = bs.tl.fit_bitro(slides[:2], **kw)
        rows.append(row(seed, "spot base (C2, C3)", base))
        pb = bs.tl.fit_bitro(slides[:3], transfer="spatial", base=base, policy=args.policy, **kw)
        route = pb.record["route"]
        rows.append(row(seed, f"-> pseudo-bulk C2-C4 ({route['chosen']}, {route['epochs']} ep)", pb))
        scratch_pb = bs.tl.fit_bitro(slides[:3], level="bulk", **kw)
        rows.append(row(seed, "pseudo-bulk scratch (C2-C4)", scratch_pb))
        back = bs.tl.fit_bitro(slides[2], transfer="bulk", base=pb, policy=args.policy, **kw)
        route = back.record["route"]
        rows.append(
            {
                "seed": seed,
                "step": f"-> spots C4 ({route['chosen']}, {route['epochs']} ep)",
                "C5 spots": spot_score(back),
            }
        )
        scratch = bs.tl.fit_bitro(slides[2], **kw)
        rows.append({"seed": seed, "step": "spot scratch (C4 only)", "C5 spots": spot_score(scratch)})
        _log(f"HER2ST round trip, seed {seed} done", t0)
    table = pd.DataFrame(rows)
    text = (
        "\n## HER2ST round trip: spots → pseudo-bulk → spots\n\n"
        f"`{args.command}`. Sections C2-C5 (one patient, legacy ST); pseudo-bulk = the section's spots "
        "summed, paired with all cells of the section image. C5 is held out; `C5 spots`: mean "
        "per-gene Pearson over 50 HVGs of C2-C3 on C5's spots; pseudo-bulk: Pearson across the 50 "
        "genes of C5's predicted vs true log1p profile, and the mean absolute log1p error.\n\n"
        + _md(table)
        + "\n"
    )
    (Path(args.cache) / "her2st.md").write_text(text)
    print(text)


def report(args: argparse.Namespace) -> None:
    key = ["draw", "seed", "direction", "base_n", "target_n", "method"]
    df = pd.concat([pd.read_csv(p) for p in args.out.split(",")], ignore_index=True)
    df = df.drop_duplicates(subset=key, keep="last")  # a row measured again (e.g. a base's zero-shot)
    old = args.rerun_label
    if args.rerun:  # newer rows replace the older ones; older transfer rows stay for comparison
        new = pd.concat([pd.read_csv(p) for p in args.rerun.split(",")], ignore_index=True)
        hit = df.set_index(key).index.isin(new.set_index(key).index)
        df.loc[hit & (df["method"] == "transfer"), "method"] = old
        df = pd.concat([df[~hit | (df["method"] == old)], new], ignore_index=True)
    parts = [
        "# Transfer with scarce targets (issue 17)\n",
        f"Written by `python benchmarks/bench_transfer.py report` from `{args.out}`, produced by\n"
        f"`{args.command}`.\n",
        "Synthetic draws (one biology each: a bulk cohort of 80 slides of 500 µm and a spot cohort of "
        "5 slides of 750 µm, 100 genes); scores: mean per-gene Pearson over 50 HVGs of spot slide 1, "
        "on spot slides 4-5 (bulk -> spot) or across the last 24 bulk slides (spot -> bulk). "
        f'BiTro {args.epochs_note}. `transfer` is `fit_bitro(..., transfer=..., policy="auto")`: '
        "route and epochs chosen by validation on the target alone. "
        "`mean ± sd` over all draws × model seeds; `by draw`: the draw means; `wins`: runs where "
        f"transfer beats the row's method by more than {TIE} (same draw, seed and sizes; smaller "
        "differences count as ties). Rows named `ensemble: ...` are the mean of two models' "
        "predictions (equal weights fixed in advance), not a route of `fit_bitro`.\n",
    ]
    for direction, base_col, tgt_col in (
        ("bulk->spot", "base_n", "target_n"),
        ("spot->bulk", "base_n", "target_n"),
    ):
        sub = df[df["direction"] == direction]
        parts.append(f"\n## {direction.replace('->', ' → ')}\n")
        rows = []
        trans = sub[sub["method"] == "transfer"]
        for (b, t), tr in trans.groupby([base_col, tgt_col]):
            tr = tr.set_index(["draw", "seed"])["score"]
            comps = {
                "transfer": tr,
                "zero-shot": sub[(sub["method"] == "zero-shot") & (sub[base_col] == b)].set_index(
                    ["draw", "seed"]
                )["score"],
                "scratch": sub[(sub["method"] == "scratch") & (sub[tgt_col] == t)].set_index(
                    ["draw", "seed"]
                )["score"],
            }
            const = sub[(sub["method"] == SCRATCH_CONSTANT) & (sub[tgt_col] == t)]
            if len(const):
                comps[SCRATCH_CONSTANT] = const.set_index(["draw", "seed"])["score"]
            ens = sub[(sub["method"] == ENSEMBLE[direction]) & (sub[base_col] == b) & (sub[tgt_col] == t)]
            if len(ens):
                comps[ENSEMBLE[direction]] = ens.set_index(["draw", "seed"])["score"]
            for other in sub["method"].unique():  # older or variant transfer rows, for comparison
                prev = sub[(sub["method"] == other) & (sub[base_col] == b) & (sub[tgt_col] == t)]
                if other not in comps and other != "scratch" and len(prev):
                    comps[other] = prev.set_index(["draw", "seed"])["score"]
            for name, s in comps.items():
                s = s.reindex(tr.index)
                by_draw = s.groupby(level="draw").mean()
                wins = "" if name == "transfer" else f"{int((tr > s + TIE).sum())}/{int(s.notna().sum())}"
                draw_wins = (
                    ""
                    if name == "transfer"
                    else f"{int((tr.groupby(level='draw').mean() > by_draw + TIE).sum())}/{len(by_draw)}"
                )
                rows.append(
                    {
                        "base slides": b,
                        "target slides": t,
                        "method": name,
                        "mean": s.mean(),
                        "sd": s.std(),
                        "by draw": " / ".join(f"{v:.3f}" for v in by_draw),
                        "transfer wins (runs)": wins,
                        "transfer wins (draw means)": draw_wins,
                    }
                )
        table = pd.DataFrame(rows)
        parts.append(_md(table))
        routes = trans.assign(chosen=[json.loads(r).get("chosen") for r in trans["route"]])
        counts = routes.groupby([base_col, tgt_col])["chosen"].value_counts().unstack(fill_value=0)
        parts.append("\nRoutes chosen by validation (runs):\n\n" + _md(counts, index=True))
    if args.notes:
        parts.append("\n" + Path(args.notes).read_text())
    extra = Path(args.cache) / "her2st.md"
    if extra.exists():
        parts.append(extra.read_text())
    RESULTS.write_text("\n".join(parts) + "\n")
    print(RESULTS.read_text())


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("run", "report", "her2st"))
    p.add_argument("--draws", default="7,8,9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bases", default="20,40,80")
    p.add_argument("--spot-targets", default="1,3")
    p.add_argument("--bulk-targets", default="4,16")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--full-seeds", default="0", help="seeds that run every base and target size")
    p.add_argument("--policy", default="auto", help="her2st: transfer policy (auto, lora, head, full)")
    p.add_argument("--notes", default="", help="report: a markdown file to include")
    p.add_argument("--rerun", default="", help="report: CSVs of re-run transfer rows (replace older)")
    p.add_argument(
        "--rerun-label",
        default="transfer (route by val. loss)",
        help="report: the method name of the older transfer rows that --rerun replaced",
    )
    p.add_argument("--transfer-only", action="store_true", help="only spot -> bulk transfer rows")
    p.add_argument("--spot-bulk", action="store_true", help="only spot -> bulk rows, at every --bulk-targets")
    p.add_argument(
        "--bulk-spot", action="store_true", help="only bulk -> spot rows, every --bases x --spot-targets"
    )
    p.add_argument(
        "--scratch-constant-only",
        action="store_true",
        help="only bulk -> spot scratch rows with linear_start='constant'",
    )
    p.add_argument("--cache", default=os.environ.get("BITRO_TRANSFER_CACHE", "/tmp/bitro_transfer"))
    p.add_argument("--out", default=None, help="CSV of scores (report: several, comma-separated)")
    p.add_argument("--command", default="see the header of benchmarks/bench_transfer.py")
    p.add_argument("--epochs-note", default="at most 30 epochs (early stopping)")
    args = p.parse_args()
    args.out = args.out or str(Path(args.cache) / "scores.csv")
    {"run": run, "report": report, "her2st": her2st}[args.mode](args)


if __name__ == "__main__":
    main()
