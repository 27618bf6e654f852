"""Nucleus segmentation: bitro_sc vs squidpy's watershed, side by side in one run.

Measures, on the same HER2ST crop, the throughput (MP/s) of ``bs.tl.segment`` (default
"watershed": tissue mask, calibration, tiled segmentation, per-cell measures, writing) and of
``squidpy.im.segment(method="watershed")`` (its H&E recipe: smooth, then Otsu on channel 0 with
``geq=False``; labels only), and the detection F1 (IoU > 0.5) of both on the same synthetic slides.
Optionally the density of nuclei on whole HER2ST sections and the peak memory of segmenting one.

Usage (from the repository root)::

    python benchmarks/bench_segmentation.py --crop 4096 --out benchmarks/results/segmentation.md
    python benchmarks/bench_segmentation.py --whole C2 --no-squidpy   # under /usr/bin/time -v
    python benchmarks/bench_segmentation.py --density C2 C3 C4 C5 --no-squidpy
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HER2ST_MPP = 0.69  # µm/px of the HER2ST JPEGs (see ../shared/data/README.md)


def data_dir() -> Path:
    env = os.environ.get("BITRO_SC_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (root / "her2st").is_dir():
        sys.exit(f"HER2ST data not found under {root}; set $BITRO_SC_DATA.")
    return root / "her2st"


def load_rgb(section: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return np.asarray(Image.open(data_dir() / f"{section}_HE.jpg").convert("RGB"))


def slide_from_rgb(rgb: np.ndarray, mpp: float):
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    import bitro_sc as bs

    image = Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), chunks=(3, 4096, 4096))
    sdata = sd.SpatialData(images={"he": image})
    bs.set_mpp(sdata, "he", mpp, source="benchmark")
    return sdata


def match_f1(truth: np.ndarray, pred: np.ndarray, *, iou: float = 0.5) -> tuple[float, float, float]:
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    n_true, n_pred = len(np.unique(t[t > 0])), len(np.unique(p[p > 0]))
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
    at, ap = np.bincount(t, minlength=t.max() + 1), np.bincount(p, minlength=p.max() + 1)
    tp = int((inter / (at[pairs[0]] + ap[pairs[1]] - inter) > iou).sum())
    prec, rec = tp / max(n_pred, 1), tp / max(n_true, 1)
    return 2 * prec * rec / max(prec + rec, 1e-12), prec, rec


def squidpy_segment(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """squidpy's H&E watershed recipe; returns labels and seconds (smoothing + segmentation)."""
    import squidpy as sq

    img = sq.im.ImageContainer(rgb, layer="image")
    t0 = time.perf_counter()
    sq.im.process(img, layer="image", method="smooth")
    sq.im.segment(img, layer="image_smooth", method="watershed", channel=0, geq=False)
    dt = time.perf_counter() - t0
    return np.asarray(img["segmented_watershed"]).squeeze().astype(np.int64), dt


def ours_segment(rgb: np.ndarray, mpp: float, **kwargs) -> tuple[object, float]:
    import bitro_sc as bs

    sdata = slide_from_rgb(rgb, mpp)
    t0 = time.perf_counter()
    bs.tl.segment(sdata, progress=False, **kwargs)
    return sdata, time.perf_counter() - t0


def tissue_area_mm2(sdata) -> float:
    import bitro_sc as bs

    if "tissue" not in sdata.shapes:
        bs.pp.tissue_mask(sdata)
    return float(sdata.shapes["tissue"]["area_um2"].sum()) / 1e6


def save_figure(section: str, path: Path, *, y0: int = 5150, x0: int = 4600, size: int = 400) -> None:
    """H&E crop and the default segmentation's nucleus outlines, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    rgb = load_rgb(section)
    pad = 100  # segment with context, show the centre
    crop = np.ascontiguousarray(rgb[y0 - pad : y0 + size + pad, x0 - pad : x0 + size + pad])
    sdata, _ = ours_segment(crop, HER2ST_MPP, tissue=False)
    lab = np.asarray(sdata.labels["cell_labels"])[pad:-pad, pad:-pad]
    view = crop[pad:-pad, pad:-pad]
    over = view.copy()
    over[find_boundaries(lab, mode="inner")] = (0, 230, 0)
    n = len(np.unique(lab)) - 1
    area_mm2 = size * size * HER2ST_MPP**2 / 1e6
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.3))
    for ax, im, title in zip(
        axes, (view, over), ("H&E", f"bs.tl.segment: {n} nuclei ({n / area_mm2:.0f} / mm²)"), strict=True
    ):
        ax.imshow(im)
        ax.set_title(title)
        ax.set_axis_off()
    bar = 50 / HER2ST_MPP
    axes[0].plot([20, 20 + bar], [size - 25, size - 25], color="k", lw=3)
    axes[0].text(20, size - 35, "50 µm", fontsize=10)
    fig.suptitle(f"HER2ST {section}, {size}×{size} px at {HER2ST_MPP} µm/px (y={y0}, x={x0})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default="C2")
    ap.add_argument("--crop", type=int, default=4096, help="side of the centred crop (px)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-squidpy", action="store_true")
    ap.add_argument("--synthetic-seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--synthetic-mpp", type=float, default=HER2ST_MPP)
    ap.add_argument("--whole", default=None, help="segment this whole section once (peak memory)")
    ap.add_argument("--density", nargs="*", default=[], help="sections to report nuclei per mm² of tissue")
    ap.add_argument("--out", default=None, help="append a markdown report to this file")
    ap.add_argument("--figure", default=None, help="save an overlay figure of a crop to this path")
    ap.add_argument(
        "--full-res", action="store_true", help="also time work_mpp=1.0 (no binning at 0.69 µm/px)"
    )
    args = ap.parse_args()

    import bitro_sc as bs

    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    say(f"## Segmentation benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    say()
    say(f"Command: `python {' '.join(sys.argv)}`  ")
    say(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    say()

    if args.figure:
        save_figure(args.section, Path(args.figure))
        return

    if args.whole:
        import resource

        import psutil

        rgb = load_rgb(args.whole)
        sdata = slide_from_rgb(rgb, HER2ST_MPP)
        del rgb
        rss0 = psutil.Process().memory_info().rss
        peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
        t0 = time.perf_counter()
        bs.tl.segment(sdata, progress=False)
        dt = time.perf_counter() - t0
        n = sdata.tables["cells"].n_obs
        area = tissue_area_mm2(sdata)
        h, w = sdata.images["he"].shape[1:]
        say(
            f"Whole section {args.whole}: {h}x{w} px ({h * w / 1e6:.1f} MP), {dt:.1f} s, "
            f"{h * w / 1e6 / dt:.2f} MP/s, {n} nuclei, {area:.2f} mm² tissue, {n / area:.0f} nuclei/mm²; "
            f"RSS before segment {rss0 / 2**30:.2f} GiB (image in memory), peak RSS before segment "
            f"{peak0 / 2**30:.2f} GiB (JPEG decoding), peak RSS of the process after segment "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30:.2f} GiB"
        )
        if args.out:
            with open(args.out, "a") as fh:
                fh.write("\n".join(lines) + "\n\n")
        return

    if args.density:
        import pandas as pd
        from scipy.spatial import cKDTree

        say(
            "| section | MP | tissue mm² | nuclei | nuclei / mm² tissue "
            "| nuclei per 100 µm spot (mean, median) | seconds |"
        )
        say("|---|---|---|---|---|---|---|")
        for sec in args.density:
            rgb = load_rgb(sec)
            sdata, dt = ours_segment(rgb, HER2ST_MPP)
            obs = sdata.tables["cells"].obs
            n = len(obs)
            area = tissue_area_mm2(sdata)
            spots = pd.read_csv(data_dir() / f"{sec}_selection.tsv", sep="\t")
            spots = spots[spots["selected"] == 1][["pixel_x", "pixel_y"]].to_numpy()
            tree = cKDTree(obs[["x_px", "y_px"]].to_numpy())
            per_spot = np.array([len(v) for v in tree.query_ball_point(spots, r=50.0 / HER2ST_MPP)])
            say(
                f"| {sec} | {rgb.shape[0] * rgb.shape[1] / 1e6:.1f} | {area:.2f} | {n} "
                f"| {n / area:.0f} | {per_spot.mean():.1f}, {np.median(per_spot):.0f} ({len(spots)} spots) "
                f"| {dt:.1f} |"
            )
            del sdata, rgb
        say()
        if args.out:
            with open(args.out, "a") as fh:
                fh.write("\n".join(lines) + "\n\n")
        return

    # --- throughput on the same crop ---------------------------------------------------------
    rgb = load_rgb(args.section)
    cy, cx = rgb.shape[0] // 2, rgb.shape[1] // 2
    half = args.crop // 2
    crop = np.ascontiguousarray(rgb[max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half])
    del rgb
    mp = crop.shape[0] * crop.shape[1] / 1e6
    say(f"Crop: {args.section}, {crop.shape[0]}x{crop.shape[1]} px ({mp:.1f} MP) centred, {HER2ST_MPP} µm/px")
    say()
    configs: dict[str, dict] = {"bitro_sc `bs.tl.segment` (default)": {}}
    if args.full_res:
        configs["bitro_sc `bs.tl.segment(work_mpp=1.0)` (no binning at 0.69 µm/px)"] = {"work_mpp": 1.0}
    ours_segment(crop[:512, :512], HER2ST_MPP)  # compile numba kernels, warm imports
    if not args.no_squidpy:
        squidpy_segment(crop[:256, :256])
    times: dict[str, list[float]] = {name: [] for name in configs}
    counts: dict[str, int] = {}
    sq_times: list[float] = []
    for r in range(args.repeats):  # interleaved, so that both see the same machine load
        for name, kw in configs.items():
            sdata, dt = ours_segment(crop, HER2ST_MPP, **kw)
            times[name].append(dt)
            counts[name] = sdata.tables["cells"].n_obs
            del sdata
            say(f"repeat {r}: {name} {dt:.2f} s ({counts[name]} nuclei)")
        if not args.no_squidpy:
            lab, dt = squidpy_segment(crop)
            sq_times.append(dt)
            counts["squidpy"] = int(len(np.unique(lab)) - 1)
            say(f"repeat {r}: squidpy {dt:.2f} s ({counts['squidpy']} objects)")
            del lab
    say()
    say(f"| method | seconds (best of {args.repeats}) | MP/s | objects on the crop | ratio to squidpy |")
    say("|---|---|---|---|---|")
    t_sq = min(sq_times) if sq_times else float("nan")
    for name in configs:
        t = min(times[name])
        say(f"| {name} | {t:.2f} | {mp / t:.2f} | {counts[name]} | {t_sq / t:.2f}x |")
    if sq_times:
        say(
            f"| squidpy `im.process(smooth)` + `im.segment(watershed)` | {t_sq:.2f} | {mp / t_sq:.2f} "
            f"| {counts['squidpy']} | 1.00x |"
        )
    say()

    # --- quality on synthetic truth -------------------------------------------------------------
    if args.synthetic_seeds:
        names = [*configs, *([] if args.no_squidpy else ["squidpy"])]
        say(
            "Detection on synthetic slides "
            f"(`bs.datasets.synthetic(size_um=400, mpp={args.synthetic_mpp})`), "
            "F1 (precision / recall) at IoU > 0.5:"
        )
        say()
        say("| seed | " + " | ".join(names) + " |")
        say("|---" * (len(names) + 1) + "|")
        for seed in args.synthetic_seeds:
            sdata, truth = bs.datasets.synthetic(
                size_um=400, return_truth=True, seed=seed, mpp=args.synthetic_mpp
            )
            cells = []
            for kw in configs.values():
                bs.tl.segment(sdata, progress=False, write_labels=True, overwrite=True, **kw)
                f = match_f1(truth.labels, np.asarray(sdata.labels["cell_labels"]))
                cells.append(f"{f[0]:.3f} ({f[1]:.3f} / {f[2]:.3f})")
            if not args.no_squidpy:
                img = np.moveaxis(np.asarray(sdata.images["he"]), 0, -1)
                lab, _ = squidpy_segment(np.ascontiguousarray(img))
                f = match_f1(truth.labels, lab)
                cells.append(f"{f[0]:.3f} ({f[1]:.3f} / {f[2]:.3f})")
            say(f"| {seed} | " + " | ".join(cells) + " |")
        say()
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
