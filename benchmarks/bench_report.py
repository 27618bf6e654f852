"""One benchmark run, one results file (``nox -s bench``): scaling curves and peers side by side.

- **Scaling, real files**: pyramidal tiled JPEG TIFFs of dense HER2ST tissue (``bench_scale.py``)
  at 16, 64, 256 and 1024 MP: read -> tissue mask + segment -> features -> graph, per-stage times,
  peak RSS, load average around each run.
- **Scaling, bulk training**: one whole-slide training step (exact chunked gradient) at 10k, 100k
  and 1M cells (``bench_training.py --case slide``, 1 torch thread).
- **Peers, in the same run**: squidpy's H&E watershed segmentation and its image features
  (``summary`` + ``texture``) on the same HER2ST crop as ours; the spot training step at the reference
  BiTro width (hidden 256) and at our default width, 1 torch thread, against the reference BiTro
  code's published figures (61 spots/s, 2.35 GB; its code is not installed here).

Every case runs in its own subprocess (its peak RSS is its own). The results file holds the
machine, the versions, the command and every figure; a PNG beside it plots the scaling curves.

    nice -n 5 python benchmarks/bench_report.py                 # full run -> results/bench.md
    nice -n 5 python benchmarks/bench_report.py --quick         # reduced run -> results/bench_quick.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FULL = {"mp": [16, 64, 256, 1024], "cells": [10_000, 100_000, 1_000_000], "crop": 4096, "sq_cells": 1000}
QUICK = {"mp": [4, 16], "cells": [10_000, 50_000], "crop": 1024, "sq_cells": 200}
REFERENCE_SPOT = {"spots_per_s": 61.0, "peak_gib": 2.35 / 1.073741824}  # 2.35 GB, the anchor


def child(name: str, arg: dict[str, Any]) -> dict[str, Any]:
    """Run ``name`` in a fresh process (its own peak RSS) and return its JSON result."""
    cmd = [sys.executable, __file__, "--child", name, json.dumps(arg)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark case {name} {arg} failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    return json.loads(line[7:])


def _peak_gib() -> float:
    from bench_scale import peak_rss_gib

    return peak_rss_gib()


def case_segment_peer(crop: int) -> dict[str, Any]:
    """bitro_sc vs squidpy segmentation of the same centred crop of HER2ST C2 (warm, interleaved)."""
    import numpy as np
    from bench_segmentation import HER2ST_MPP, load_rgb, ours_segment, squidpy_segment

    rgb = load_rgb("C2")
    cy, cx = rgb.shape[0] // 2, rgb.shape[1] // 2
    img = np.ascontiguousarray(rgb[cy - crop // 2 : cy + crop // 2, cx - crop // 2 : cx + crop // 2])
    del rgb
    ours_segment(img[:512, :512], HER2ST_MPP, tissue=False)  # compile kernels, warm imports
    squidpy_segment(img[:256, :256])
    sdata, ours_s = ours_segment(img, HER2ST_MPP, tissue=False)
    labels, sq_s = squidpy_segment(img)
    return {
        "mp": img.shape[0] * img.shape[1] / 1e6,
        "ours_s": ours_s,
        "ours_objects": int(sdata.tables["cells"].n_obs),
        "squidpy_s": sq_s,
        "squidpy_objects": int(len(np.unique(labels)) - 1),
    }


def case_features_peer(crop: int, n_squidpy: int) -> dict[str, Any]:
    """bitro_sc morphology features of every cell of a crop vs squidpy image features of a subset."""
    import numpy as np
    from bench_features import FOV_UM, _crop_slide, _squidpy_features, _warm_up, image_of

    import bitro_sc as bs

    sdata, mpp, _ = _crop_slide("C2", crop)
    _warm_up()
    n = int(sdata.tables["cells"].n_obs)
    t0 = time.perf_counter()
    bs.tl.cell_features(sdata, fov_um=FOV_UM, progress=False)
    ours_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(n, size=min(n_squidpy, n), replace=False))
    rgb = np.moveaxis(np.asarray(image_of(sdata)), 0, -1)
    xy = sdata.tables["cells"].obs[["x_px", "y_px"]].to_numpy()[subset]
    _, sq_s = _squidpy_features(rgb, xy, FOV_UM / mpp)
    return {
        "cells": n,
        "ours_us_per_cell": 1e6 * ours_s / n,
        "squidpy_cells": int(subset.size),
        "squidpy_us_per_cell": 1e6 * sq_s / subset.size,
    }


def case_training(args: list[str]) -> dict[str, Any]:
    import bench_training

    return bench_training._run_child(args)


def machine() -> list[str]:
    import numpy
    import torch

    import bitro_sc

    versions = {"bitro_sc": bitro_sc.__version__, "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("dask", "spatialdata", "tifffile", "squidpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, check=False
    ).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM",
        f"- Python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Commit: {commit or 'unknown'}",
    ]


def plot(scale: list[dict], steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    mp = [r["mp"] for r in scale]
    for key, label in (("segment_s", "tissue + segment"), ("features_s", "features"), ("total_s", "total")):
        a.loglog(mp, [r[key] for r in scale], "o-", label=label)
    a.set(xlabel="slide size (MP)", ylabel="seconds", title="Real TIFF files: segment + features")
    a.legend()
    cells = [r["cells"] for r in steps]
    b.loglog(cells, [r["step_s"] for r in steps], "o-", label="one training step")
    b.set(xlabel="cells in the bag", ylabel="seconds", title="Bulk step (whole slide, 1 thread)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(cfg: dict[str, Any], quick: bool, out: Path) -> list[str]:
    import bench_scale

    cmd = "nice -n 5 python benchmarks/bench_report.py" + (" --quick" if quick else "")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Benchmarks ({'reduced run, --quick' if quick else 'full run'})",
        "",
        f"- Command: `{cmd}` (or `nox -s bench{' -- --quick' if quick else ''}`)",
        f"- Started {started}, load average (1/5/15 min) at start "
        + "/".join(f"{v:.1f}" for v in os.getloadavg()),
        *machine(),
        "- The CPUs may be shared with other work: wall times under load are upper bounds, not idle "
        "figures; the load average is given next to each measurement. Peak memory = peak RSS of the "
        "case's own process.",
        "",
    ]
    scale = bench_scale.measure(cfg["mp"], ["tiff"])
    lines += [
        "## Segment + features on real files (scaling)",
        "",
        "Pyramidal tiled JPEG TIFF mosaics of the ≥ 90%-tissue 512 px tiles of HER2ST C2–C5 at "
        f"{bench_scale.HER2ST_MPP} µm/px, streamed from the file; read → tissue mask + segment → "
        "morphology features → kNN graph (torch threads = all CPUs).",
        "",
        *bench_scale.table(scale),
        "",
    ]
    steps = []
    for n in cfg["cells"]:
        load0 = os.getloadavg()[0]
        r = case_training(["--case", "slide", "--n", str(n), "--threads", "1"])
        steps.append({**r, "load": load0})
    lines += [
        "## Bulk training step (scaling)",
        "",
        "One whole-slide step (exact chunked gradient, 256-cell chunks, kNN k = 8), 128-d features, "
        "785 genes, default model, 1 torch thread.",
        "",
        "| cells | step (s) | CPU (s) | µs per cell | setup (s) | peak RSS (GiB) | load 1 min |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['cells']:,} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['us_per_cell']:.0f} | "
            f"{r['setup_s']:.2f} | {r['peak_rss_gib']:.2f} | {r['load']:.1f} |"
            for r in steps
        ),
        "",
    ]
    png = out.with_suffix(".png")
    plot(scale, steps, png)
    lines += [f"![scaling curves]({png.name})", ""]

    load0 = os.getloadavg()[0]
    seg = child("segment_peer", {"crop": cfg["crop"]})
    feat = child("features_peer", {"crop": min(cfg["crop"], 2048), "n_squidpy": cfg["sq_cells"]})
    spots = {
        h: {**case_training(["--case", "spot", "--threads", "1", *(["--hidden", str(h)] if h else [])])}
        for h in (256, 0)
    }
    ref = REFERENCE_SPOT
    lines += [
        "## Peers, in the same run",
        "",
        f"Load average at the start of this section: {load0:.1f}.",
        "",
        f"Segmentation of a centred {cfg['crop']} px crop of HER2ST C2 ({seg['mp']:.1f} MP), warm, "
        "one run each:",
        "",
        "| method | seconds | MP/s | objects | speed vs squidpy |",
        "|---|---|---|---|---|",
        f"| bitro_sc `bs.tl.segment` | {seg['ours_s']:.2f} | {seg['mp'] / seg['ours_s']:.2f} | "
        f"{seg['ours_objects']} | {seg['squidpy_s'] / seg['ours_s']:.1f}× |",
        f"| squidpy `im.process(smooth)` + `im.segment(watershed)` | {seg['squidpy_s']:.2f} | "
        f"{seg['mp'] / seg['squidpy_s']:.2f} | {seg['squidpy_objects']} | 1× |",
        "",
        f"Image features per cell ({feat['cells']} cells; squidpy on {feat['squidpy_cells']} of them):",
        "",
        "| method | µs per cell | speed vs squidpy |",
        "|---|---|---|",
        f"| bitro_sc `bs.tl.cell_features` (morphology) | {feat['ours_us_per_cell']:.0f} | "
        f"{feat['squidpy_us_per_cell'] / feat['ours_us_per_cell']:.1f}× |",
        f"| squidpy `calculate_image_features(summary, texture)` | {feat['squidpy_us_per_cell']:.0f} | 1× |",
        "",
        "Spot training step (128 spots × ~30 cells per step, 128-d features, 785 genes, 1 torch thread):",
        "",
        "| implementation | hidden | spots/s | peak RSS (GiB) | speed, memory vs reference |",
        "|---|---|---|---|---|",
        f"| reference BiTro code (published figures, not run here) | 256 | {ref['spots_per_s']:.0f} | "
        f"{ref['peak_gib']:.2f} | 1×, 1× |",
        *(
            f"| bitro_sc | {h or 'default (64)'} | {r['spots_per_s']:.0f} | {r['peak_rss_gib']:.2f} | "
            f"{r['spots_per_s'] / ref['spots_per_s']:.1f}×, {r['peak_rss_gib'] / ref['peak_gib']:.2f}× |"
            for h, r in spots.items()
        ),
        "",
        f"Finished {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, load average at the end "
        f"{os.getloadavg()[0]:.1f}. Raw figures: the JSON block below.",
        "",
        "```json",
        json.dumps(
            {
                "scale": scale,
                "bulk_steps": steps,
                "segment_peer": seg,
                "features_peer": feat,
                "spot": {str(h): r for h, r in spots.items()},
            },
            indent=1,
        ),
        "```",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sizes (minutes, not hours)")
    p.add_argument("--out", type=Path, default=None, help="default results/bench.md (bench_quick.md)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, arg = args.child[0], json.loads(args.child[1])
        fn = {"segment_peer": case_segment_peer, "features_peer": case_features_peer}[name]
        res = fn(**arg)
        print("RESULT " + json.dumps({**res, "peak_rss_gib": _peak_gib()}))
        return
    out = args.out or HERE / "results" / ("bench_quick.md" if args.quick else "bench.md")
    lines = report(QUICK if args.quick else FULL, args.quick, out)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
