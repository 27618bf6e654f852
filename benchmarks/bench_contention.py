"""Fit time on one real HER2ST section, alone and beside two competing CPU-bound processes.

Each fit runs in its own subprocess, in one of two modes:

- ``before``: PyTorch imported *before* bitro_sc, so bitro_sc's thread settings (passive OpenMP
  waiting, ``bs.settings.n_jobs``) do not apply: the behaviour of bitro_sc before they existed;
- ``after``: ``import bitro_sc`` first, as users do (the defaults of :mod:`bitro_sc._settings`).

Each mode is timed idle and with two competitors (``python -c "while True: pass"``) started just
before the fit and stopped after it. The fit is ``bs.tl.fit_bitro(sdata, train={"epochs": E})``
(default genes and model, E epochs then the refit of E epochs), on a section prepared once with
the public API (read_st, segment, cell_features, phenotypes, assign_cells, cell_graph). With
``--full`` the ``after`` mode also runs the default fit (early stopping, no epoch cap) idle.

The machine may be shared: the 1-minute load average is recorded before each fit, and the modes
alternate so that both see similar background load.

Usage (from the repository root)::

    python benchmarks/bench_contention.py --out benchmarks/results/contention.md
    python benchmarks/bench_contention.py --epochs 3 --repeats 1        # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_FIT = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
mode, path, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "before":
    import torch  # first: bitro_sc's thread settings come too late to apply
import bitro_sc as bs
import torch
from spatialdata import read_zarr

sdata = read_zarr(path)
train = {"epochs": epochs} if epochs > 0 else None
t0 = time.perf_counter()
model = bs.tl.fit_bitro(sdata, train=train, progress=False)
wall = time.perf_counter() - t0
rec = model.record
n = len(rec["history"]["train_loss"]) + (rec["refit"]["epochs"] if rec["refit"] else 0)
print(json.dumps({"wall_s": wall, "epochs": n, "threads": torch.get_num_threads(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "genes": len(model.genes)}))
"""


def prepare(data: Path, section: str, out: Path) -> None:
    import bitro_sc as bs

    sdata = bs.io.read_st(
        data / f"{section}_HE.jpg", data / f"{section}_counts.tsv.gz", data / f"{section}_selection.tsv"
    )
    bs.tl.segment(sdata, progress=False)
    bs.tl.cell_features(sdata, progress=False)
    bs.tl.phenotypes(sdata)
    bs.tl.assign_cells(sdata)
    bs.tl.cell_graph(sdata)
    sdata.write(out)


def run_fit(mode: str, path: Path, epochs: int, competitors: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        load = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, "-c", _FIT, mode, str(path), str(epochs)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    finally:
        for p in busy:
            p.terminate()
            p.wait()
    if out.returncode != 0:
        raise RuntimeError(f"fit subprocess failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return row | {"mode": mode, "competitors": competitors, "load_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="HER2ST folder (default: $BITRO_SC_DATA/her2st)"
    )
    parser.add_argument("--section", default="C2")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each fit (then a refit as long)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also time the default fit (idle, after)")
    parser.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = parser.parse_args()
    data = args.data or Path(os.environ.get("BITRO_SC_DATA", "../shared/data")) / "her2st"
    command = "python benchmarks/bench_contention.py " + " ".join(sys.argv[1:])

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.section}.zarr"
        t0 = time.perf_counter()
        prepare(data, args.section, path)
        prep_s = time.perf_counter() - t0
        print(f"prepared {args.section} in {prep_s:.0f} s", flush=True)
        for rep in range(args.repeats):
            for competitors in (0, 2):
                for mode in ("before", "after") if rep % 2 == 0 else ("after", "before"):
                    row = run_fit(mode, path, args.epochs, competitors)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        full = run_fit("after", path, 0, 0) if args.full else None
        if full is not None:
            print(json.dumps(full), flush=True)
    if args.out is not None:
        args.out.write_text(report(rows, full, args, command, prep_s))


def report(rows: list[dict], full: dict | None, args: argparse.Namespace, command: str, prep_s: float) -> str:
    import torch

    def med(mode: str, comp: int) -> float:
        return float(np.median([r["wall_s"] for r in rows if r["mode"] == mode and r["competitors"] == comp]))

    lines = [
        "# Fit time under CPU contention",
        "",
        f"Produced by `benchmarks/bench_contention.py`. Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}. HER2ST section "
        f"{args.section} (prepared in {prep_s:.0f} s), default genes and model, "
        f"`train={{'epochs': {args.epochs}}}` (+ refit).",
        "",
        "`before`: torch imported before bitro_sc (OpenMP's default spinning wait, torch's default "
        "threads); `after`: bitro_sc's defaults (`OMP_WAIT_POLICY=PASSIVE`, `bs.settings.n_jobs`). "
        'Competitors: `python -c "while True: pass"`. The load average is the machine\'s 1-minute '
        "load just before each fit (other users' jobs included).",
        "",
        "| mode | competitors | threads | OMP_WAIT_POLICY | wall s | epochs | load before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['competitors']} | {r['threads']} | {r['omp_wait_policy']} | "
            f"{r['wall_s']:.1f} | {r['epochs']} | {r['load_1min']:.2f} |"
        )
    lines += ["", "Median wall time and slowdown (2 competitors / none):", ""]
    lines += ["| mode | idle s | 2 competitors s | slowdown |", "|---|---|---|---|"]
    for mode in ("before", "after"):
        idle, busy = med(mode, 0), med(mode, 2)
        lines.append(f"| {mode} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f}× |")
    if full is not None:
        lines += [
            "",
            f"Default fit (`bs.tl.fit_bitro(sdata)`, early stopping), `after`, no competitors: "
            f"{full['wall_s']:.1f} s, {full['epochs']} epochs, {full['genes']} genes, load before "
            f"{full['load_1min']:.2f}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
