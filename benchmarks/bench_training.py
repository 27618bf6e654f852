"""BiTro training steps: spot-level throughput and whole-slide (bulk) steps from 10k to 1M cells.

Each case runs in its own subprocess so that its peak resident memory (``ru_maxrss``, the whole
Python process: interpreter, torch, data and model) is measured alone.

- ``spot``: the reference BiTro setting: batches of 128 spots × ~30 cells, 128-d cell features,
  785 genes, default :class:`~bitro_sc.models.ModelParams` (2 GAT + 2 Transformer layers; hidden 64
  since 2026-11-30 08:40, 128 before),
  AdamW. One epoch of ``bitro_sc.models.train`` over 1,280 spots (10 steps) after a warm-up
  epoch; reported as spots per second. Reference BiTro code: 61 spots/s, 2.35 GB peak.
- ``slide``: one training step on a whole slide as one bag (exact chunked gradient, 256-cell
  attention chunks, kNN graph k=8), 128-d features, 785 genes. Reference BiTro code: out of memory
  at 10k cells, 352 s per step at 50k cells.

Usage (from the repository root)::

    python benchmarks/bench_training.py --out benchmarks/results/training.md
    python benchmarks/bench_training.py --cells 10000 100000      # fewer slide sizes
    python benchmarks/bench_training.py --case slide --n 100000   # one case, prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import peak_rss_gib  # one definition: VmHWM, not the forking parent's ru_maxrss

N_FEATURES, N_GENES = 128, 785


def _slide_cells(n_cells: int, seed: int, *, spots: bool):
    from scipy import sparse
    from scipy.spatial import cKDTree

    from bitro_sc.models import SlideCells

    rng = np.random.default_rng(seed)
    if spots:  # ~30 cells inside each spot (55 µm diameter) of a 100 µm grid
        n_spots = n_cells // 30
        side = int(np.ceil(np.sqrt(n_spots)))
        centres = (
            np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_spots] + 0.5
        ) * 100
        per = rng.poisson(30, n_spots)
        spot = np.repeat(np.arange(n_spots), per)
        r = 27.5 * np.sqrt(rng.uniform(size=spot.size))
        a = rng.uniform(0, 2 * np.pi, spot.size)
        xy = (centres[spot] + np.column_stack([r * np.cos(a), r * np.sin(a)])).astype(np.float32)
    else:
        side_um = float(np.sqrt(n_cells * 225.0))
        xy = rng.uniform(0, side_um, size=(n_cells, 2)).astype(np.float32)
        spot = np.full(n_cells, -1)
    n = xy.shape[0]
    feats = rng.standard_normal((n, N_FEATURES), dtype=np.float32)
    _, nbr = cKDTree(xy).query(xy, k=9)  # kNN graph, k=8 (column 0 is the cell itself)
    rows, cols = np.repeat(np.arange(n), 8), nbr[:, 1:].ravel()
    conn = sparse.csr_matrix((np.ones(n * 8, np.float32), (rows, cols)), shape=(n, n))
    conn = conn.maximum(conn.T).tocsr()
    return SlideCells(feats, rng.integers(1, 9, n), xy, conn, spot.astype(np.int64))


def case_spot(seed: int = 0, hidden: int | None = None) -> dict[str, float]:
    import torch

    from bitro_sc.models import BiTroNet, ModelParams, SpotSet, TrainParams, train

    slide = _slide_cells(1536 * 30, seed, spots=True)
    n_spots = int(slide.spot_index.max()) + 1
    part = slide.spot_partition(n_spots)
    rng = np.random.default_rng(seed)
    target = rng.gamma(0.5, 20.0, size=(n_spots, N_GENES)).astype(np.float32)
    lib = np.full(n_spots, 5000.0, dtype=np.float32)

    def spot_set(rows: np.ndarray) -> SpotSet:
        return SpotSet(slide, part, rows, target[rows], lib[rows])

    torch.manual_seed(seed)
    params = ModelParams() if hidden is None else ModelParams(hidden=hidden)
    net = BiTroNet(n_features=N_FEATURES, n_phenotypes=8, n_genes=N_GENES, params=params)
    tp = TrainParams(epochs=1, batch_size=128, patience=0)
    dev = torch.device("cpu")
    train(net, [spot_set(np.arange(256))], [], params=tp, device=dev, seed=seed, progress=False)  # warm-up
    rows = np.arange(256, 256 + 1280)
    t0, c0 = time.perf_counter(), time.process_time()
    train(net, [spot_set(rows)], [], params=tp, device=dev, seed=seed, progress=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "spots_per_s": rows.size / dt,
        "spots_per_cpu_s": rows.size / cpu,
        "seconds": dt,
        "cpu_seconds": cpu,
        "cells_per_spot": float(part.sizes()[rows].mean()),
        "peak_rss_gib": peak_rss_gib(),
    }


def case_slide(n_cells: int, seed: int = 0) -> dict[str, float]:
    import torch

    from bitro_sc.models import BiTroNet, BulkSlide, ModelParams, slide_step

    t0 = time.perf_counter()
    slide = _slide_cells(n_cells, seed, spots=False)
    part = slide.chunk_partition(256)
    setup = time.perf_counter() - t0
    target = np.random.default_rng(seed).gamma(0.5, 20.0, size=N_GENES).astype(np.float32)
    torch.manual_seed(seed)
    net = BiTroNet(n_features=N_FEATURES, n_phenotypes=8, n_genes=N_GENES, params=ModelParams())
    net.set_gene_bias(torch.from_numpy(target / n_cells))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    warm = _slide_cells(2000, seed + 1, spots=False)  # first-call costs (kernels, allocator) untimed
    slide_step(net, BulkSlide(warm, warm.chunk_partition(256), target, 1e6), loss="mse",
               device=torch.device("cpu"), seed=seed)  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad()
    loss = slide_step(
        net, BulkSlide(slide, part, target, 1e6), loss="mse", device=torch.device("cpu"), seed=seed
    )
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    step, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "cpu_s": cpu,
        "cells": n_cells,
        "setup_s": setup,
        "step_s": step,
        "us_per_cell": step / n_cells * 1e6,
        "loss": loss,
        "peak_rss_gib": peak_rss_gib(),
    }


def _run_child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, env={**os.environ}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--case", choices=["spot", "slide"], help="run one case in this process (prints JSON)"
    )
    parser.add_argument("--n", type=int, default=10_000, help="cells of the slide case")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="torch threads (spot case)")
    parser.add_argument("--slide-threads", type=int, default=1, help="torch threads (slide cases)")
    parser.add_argument("--cells", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--no-spot", action="store_true")
    parser.add_argument("--hidden", type=int, default=None, help="model width of the spot case")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.case is not None:
        import torch

        torch.set_num_threads(args.threads[0])
    if args.case == "spot":
        print(json.dumps(case_spot(hidden=args.hidden)))
        return
    if args.case == "slide":
        print(json.dumps(case_slide(args.n)))
        return

    import torch

    lines = [
        "# BiTro training steps",
        "",
        f"Command: `python benchmarks/bench_training.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average at start {os.getloadavg()[0]:.1f} "
        "(CPUs shared with other work: wall times are upper bounds; CPU = process CPU seconds, all threads).",
        "Peak memory = peak RSS of the whole Python process running the case (its own subprocess).",
        "",
    ]
    if not args.no_spot:
        lines += [
            "## Spot-level training (128 spots × ~30 cells per step, 128-d features, 785 genes)",
            "",
            "| implementation | torch threads | spots/s (wall) | spots per CPU-second | peak memory "
            "| ratio vs reference (wall spots/s, memory) |",
            "|---|---|---|---|---|---|",
            "| reference BiTro code (issue anchor) | – | 61 | – | 2.35 GB | 1×, 1× |",
        ]
        for threads in args.threads:
            r = _run_child(["--case", "spot", "--threads", str(threads)])
            print("spot", threads, r, flush=True)
            lines.append(
                f"| bitro_sc ({r['cells_per_spot']:.1f} cells/spot) | {threads} | {r['spots_per_s']:.0f} | "
                f"{r['spots_per_cpu_s']:.0f} | {r['peak_rss_gib']:.2f} GiB | {r['spots_per_s'] / 61:.2f}×, "
                f"{r['peak_rss_gib'] * 2**30 / 2.35e9:.2f}× |"
            )
        lines.append("")
    rows = []
    for n in args.cells:
        r = _run_child(["--case", "slide", "--n", str(n), "--threads", str(args.slide_threads)])
        print("slide", r, flush=True)
        rows.append(
            f"| {n:,} | {r['step_s']:.1f} | {r['cpu_s']:.1f} | {r['us_per_cell']:.0f} | "
            f"{r['peak_rss_gib']:.2f} | {r['setup_s']:.1f} |"
        )
    if rows:
        lines += [
            "## Whole slide as one bag (bulk level): one training step",
            "",
            "Exact chunked gradient (two passes), 256-cell attention chunks along a Z-order curve, kNN graph",
            "(k = 8) cut at chunk borders; 128-d features, 785 genes, default model. Setup = graph + chunks.",
            f"torch threads: {args.slide_threads}.",
            "Reference BiTro code: out of memory at 10k cells, 352 s per step at 50k cells.",
            "",
            "| cells | step, wall (s) | step, CPU (s) | µs per cell (wall) | peak memory (GiB) | setup (s) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
