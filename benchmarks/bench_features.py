"""Per-cell feature throughput and quality: bitro_sc's morphology encoder vs squidpy's image features.

Side by side, in one run, on the same cells:

1. **Speed** on a crop of a real HER2ST section (segmented with ``bs.tl.segment``): cells/s of
   ``bs.tl.cell_features`` (default ``"morphology"`` encoder, 48 µm field of view) and of
   ``squidpy.im.calculate_image_features`` with ``features=["summary", "texture"]`` on a crop of the
   same 48 µm around each cell (squidpy's per-observation crops, ``spot_diameter_fullres`` = field
   of view in pixels, ``n_jobs=1``). squidpy runs on a random subset of cells (it is the slow side);
   rates are per cell.
2. **Quality** on a synthetic slide with known cell types (``bs.datasets.synthetic``): the cells
   found by ``bs.tl.segment`` are matched to the true nucleus under their centroid, and each feature
   set predicts the true cell type with a 5-fold cross-validated logistic regression (balanced
   accuracy).
3. **Memory** (``--whole``): a whole HER2ST section (92 MP) read, segmented and featurised in a
   child process; its peak resident memory (``ru_maxrss``).

4. **Cell graph** (``--graph N``): kNN and 30 µm radius graphs of N random cells, bitro_sc's
   KD-tree builder vs squidpy's ``spatial_neighbors_knn`` / ``_radius`` (CPU seconds).

Run: ``python benchmarks/bench_features.py`` (add ``--whole`` for the memory run, ``--graph 1000000``
for the graph); results go to ``benchmarks/results/features.md``. Real data from ``$BITRO_SC_DATA``
or ``../shared/data``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "features.md"
FOV_UM = 48.0


def _data_dir() -> Path:
    env = os.environ.get("BITRO_SC_DATA")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (cand / "her2st").is_dir():
            return cand / "her2st"
    sys.exit("HER2ST data not found: set $BITRO_SC_DATA or place it at ../shared/data")


def _read_section(section: str):
    import bitro_sc as bs

    d = _data_dir()
    return bs.io.read_st(
        d / f"{section}_HE.jpg", d / f"{section}_counts.tsv.gz", d / f"{section}_selection.tsv"
    )


def image_of(sdata):
    """The full-resolution ``(c, y, x)`` H&E of a slide (the first level of a pyramid)."""
    import spatialdata as sd
    import xarray as xr

    image = sdata.images["he"]
    return sd.get_pyramid_levels(image, n=0) if isinstance(image, xr.DataTree) else image


def _crop_slide(section: str, crop_px: int):
    """A ``crop_px``² crop of the section centred on its tissue spots, as a SpatialData at the same mpp."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    import bitro_sc as bs

    full = _read_section(section)
    mpp = bs.get_mpp(full, "he")
    image = image_of(full)
    spots = full.tables["table"]
    xy = np.asarray(spots.obsm["spatial"])[spots.obs["in_tissue"].to_numpy().astype(bool)]
    cx, cy = np.median(xy, axis=0).round().astype(int)
    y0 = int(np.clip(cy - crop_px // 2, 0, image.sizes["y"] - crop_px))
    x0 = int(np.clip(cx - crop_px // 2, 0, image.sizes["x"] - crop_px))
    arr = np.asarray(image.data[:, y0 : y0 + crop_px, x0 : x0 + crop_px])
    crop = SpatialData(images={"he": Image2DModel.parse(arr, dims=("c", "y", "x"))})
    bs.set_mpp(crop, "he", mpp, source="crop of the HER2ST section")
    bs.tl.segment(crop, tissue=False, progress=False)
    return crop, mpp, (y0, x0)


def _squidpy_features(
    rgb_yxc: np.ndarray, xy_px: np.ndarray, fov_px: float, features: tuple[str, ...] = ("summary", "texture")
) -> tuple[np.ndarray, float]:
    """squidpy image features of a ``fov_px`` crop around each point; (features, seconds)."""
    import anndata as ad
    import squidpy as sq

    img = sq.im.ImageContainer(rgb_yxc, layer="image")
    adata = ad.AnnData(np.zeros((len(xy_px), 1), np.float32))
    adata.obsm["spatial"] = xy_px.astype(np.float64)
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": float(fov_px)}}}
    t = time.perf_counter()
    df = sq.im.calculate_image_features(
        adata,
        img,
        layer="image",
        features=list(features),
        n_jobs=1,
        show_progress_bar=False,
        copy=True,
    )
    return df.to_numpy(dtype=np.float64), time.perf_counter() - t


def _warm_up() -> None:
    """Compile numba kernels and import modules once, so the timings measure steady state."""
    import bitro_sc as bs

    toy = bs.datasets.toy("nuclei", size_px=96, labels=False)
    bs.tl.cell_features(toy, progress=False)


def bench_speed(section: str, crop_px: int, n_squidpy: int, seed: int) -> dict:
    import bitro_sc as bs

    crop, mpp, origin = _crop_slide(section, crop_px)
    _warm_up()
    n_cells = crop.tables["cells"].n_obs
    t = time.perf_counter()
    bs.tl.cell_features(crop, fov_um=FOV_UM, progress=False)
    ours_s = time.perf_counter() - t

    obs = crop.tables["cells"].obs
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n_cells, size=min(n_squidpy, n_cells), replace=False))
    rgb = np.moveaxis(np.asarray(image_of(crop)), 0, -1)
    xy = obs[["x_px", "y_px"]].to_numpy()[subset]
    _, sq_s = _squidpy_features(rgb, xy, FOV_UM / mpp)
    _, sq_summary_s = _squidpy_features(rgb, xy, FOV_UM / mpp, ("summary",))
    return {
        "squidpy_summary_cells_s": len(subset) / sq_summary_s,
        "squidpy_summary_s": sq_summary_s,
        "section": section,
        "crop": f"{crop_px}×{crop_px} px at ({origin[1]}, {origin[0]}), {mpp:.3f} µm/px",
        "n_cells": n_cells,
        "ours_cells_s": n_cells / ours_s,
        "ours_s": ours_s,
        "n_squidpy": len(subset),
        "squidpy_cells_s": len(subset) / sq_s,
        "squidpy_s": sq_s,
        "mpp": mpp,
    }


def bench_quality(seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import bitro_sc as bs

    sdata, truth = bs.datasets.synthetic(size_um=800.0, seed=seed, return_truth=True)
    bs.tl.segment(sdata, progress=False)
    bs.tl.cell_features(sdata, fov_um=FOV_UM, progress=False)
    obs = sdata.tables["cells"].obs
    lab = np.asarray(truth.labels)
    yy = np.clip(obs["y_px"].round().astype(int).to_numpy(), 0, lab.shape[0] - 1)
    xx = np.clip(obs["x_px"].round().astype(int).to_numpy(), 0, lab.shape[1] - 1)
    true_id = lab[yy, xx]
    matched = true_id > 0
    types = truth.cells.set_index("cell_id").loc[true_id[matched], "cell_type"].astype(str).to_numpy()
    keep_types = pd.Series(types).value_counts()
    keep_types = keep_types[keep_types >= 10].index
    sel = np.isin(types, keep_types)
    y = types[sel]
    ours = sdata.tables["cells"].obsm["X_bitro"][matched][sel]
    rgb = np.moveaxis(np.asarray(image_of(sdata)), 0, -1)
    mpp = bs.get_mpp(sdata, "he")
    xy = obs[["x_px", "y_px"]].to_numpy()[matched][sel]
    theirs, _ = _squidpy_features(rgb, xy, FOV_UM / mpp)
    theirs = np.nan_to_num(theirs)
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)

    def score(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return float(cross_val_score(model, x, y, cv=cv, scoring="balanced_accuracy").mean())

    return {
        "n_cells": len(y),
        "types": ", ".join(f"{t} {int((y == t).sum())}" for t in sorted(keep_types)),
        "ours_bacc": score(ours),
        "squidpy_bacc": score(theirs),
        "n_ours": ours.shape[1],
        "n_squidpy": theirs.shape[1],
        "chance": 1.0 / len(keep_types),
    }


_WHOLE = """
import resource, sys, time
import bitro_sc as bs
sys.path.insert(0, {bench_dir!r})
from bench_features import _read_section
t = time.perf_counter()
sd = _read_section({section!r})
bs.tl.segment(sd, progress=False)
t_seg = time.perf_counter() - t
t = time.perf_counter()
bs.tl.cell_features(sd, progress=False)
t_feat = time.perf_counter() - t
n = sd.tables["cells"].n_obs
print(n, t_seg, t_feat, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
"""


def bench_whole(section: str) -> dict:
    code = _WHOLE.format(bench_dir=str(Path(__file__).parent), section=section)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, t_seg, t_feat, peak_gib = out.stdout.strip().splitlines()[-1].split()
    return {
        "section": section,
        "n_cells": int(n),
        "segment_s": float(t_seg),
        "features_s": float(t_feat),
        "peak_gib": float(peak_gib),
    }


def bench_graph(n: int, seed: int) -> dict:
    """Cell graph of ``n`` random cells (2,500 per mm²): bitro_sc's KD-tree builder vs squidpy's."""
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    import squidpy as sq

    import bitro_sc as bs

    side = float(np.sqrt(n / 2500.0) * 1000.0)
    xy = np.random.default_rng(seed).uniform(0, side, (n, 2))
    ref = ad.AnnData(shape=(n, 0))
    ref.obsm["spatial"] = xy
    # a cells table as bs.tl.segment writes it (centroids in µm), for the public bs.tl.cell_graph
    cells = ad.AnnData(obs=pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1]}, index=np.arange(n).astype(str)))
    ours = sd.SpatialData(tables={"cells": cells})

    def clock(fn) -> float:
        t = time.process_time()
        fn()
        return time.process_time() - t

    return {
        "n": n,
        "ours_knn": clock(lambda: bs.tl.cell_graph(ours, k=8, overwrite=True)),
        "squidpy_knn": clock(lambda: sq.gr.spatial_neighbors_knn(ref, n_neighs=8)),
        "ours_radius": clock(lambda: bs.tl.cell_graph(ours, radius_um=30.0, overwrite=True)),
        "squidpy_radius": clock(lambda: sq.gr.spatial_neighbors_radius(ref, radius=30.0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="C2")
    parser.add_argument("--crop-px", type=int, default=2048)
    parser.add_argument("--squidpy-cells", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whole", action="store_true", help="also run the whole-section memory check")
    parser.add_argument("--graph", type=int, default=0, help="also time the cell graph on this many cells")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import squidpy

    import bitro_sc as bs

    speed = bench_speed(args.section, args.crop_px, args.squidpy_cells, args.seed)
    print(speed, flush=True)
    quality = bench_quality(args.seed)
    print(quality, flush=True)
    whole = bench_whole(args.section) if args.whole else None
    print(whole, flush=True)
    graph = bench_graph(args.graph, args.seed) if args.graph else None
    print(graph, flush=True)

    cmd = "python benchmarks/bench_features.py " + " ".join(sys.argv[1:])
    ratio = speed["ours_cells_s"] / speed["squidpy_cells_s"]
    lines = [
        "# Per-cell features: bitro_sc morphology encoder vs squidpy image features",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"Python {platform.python_version()}, bitro_sc {bs.__version__}, squidpy {squidpy.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Wall-clock timings on a machine shared with other jobs inflate both sides; compare the ratios "
        "measured in the same run.",
        "",
        "## Speed (same cells, same 48 µm field of view)",
        "",
        f"HER2ST {speed['section']}, crop {speed['crop']}, {speed['n_cells']} cells from `bs.tl.segment`.",
        "",
        "| method | cells | seconds | cells/s |",
        "|---|---:|---:|---:|",
        f"| bitro_sc `cell_features` (morphology, 19 features) | {speed['n_cells']} | "
        f"{speed['ours_s']:.2f} | {speed['ours_cells_s']:.0f} |",
        f"| squidpy `calculate_image_features` (summary + texture) | {speed['n_squidpy']} | "
        f"{speed['squidpy_s']:.2f} | {speed['squidpy_cells_s']:.1f} |",
        f"| squidpy `calculate_image_features` (summary only) | {speed['n_squidpy']} | "
        f"{speed['squidpy_summary_s']:.2f} | {speed['squidpy_summary_cells_s']:.1f} |",
        "",
        f"**Ratio: {ratio:.0f}×** the cells/s of squidpy summary + texture, "
        f"**{speed['ours_cells_s'] / speed['squidpy_summary_cells_s']:.0f}×** of squidpy summary only "
        "(target ≥ 2×). bitro_sc timed after a warm-up (numba kernels compiled and cached once per "
        "install); squidpy timed on a random subset of the same cells.",
        "",
        f"## Quality: predicting the true cell type (synthetic slide, 800 µm, seed {args.seed})",
        "",
        f"{quality['n_cells']} segmented cells matched to a true nucleus ({quality['types']}); 5-fold "
        "cross-validated logistic regression, balanced accuracy (chance "
        f"{quality['chance']:.2f}).",
        "",
        "| features | dims | balanced accuracy |",
        "|---|---:|---:|",
        f"| bitro_sc morphology | {quality['n_ours']} | {quality['ours_bacc']:.3f} |",
        f"| squidpy summary + texture | {quality['n_squidpy']} | {quality['squidpy_bacc']:.3f} |",
        "",
    ]
    if whole is not None:
        lines += [
            "## Memory: whole section, read + segment + features in one process",
            "",
            f"HER2ST {whole['section']} (9274 × 9911 px): {whole['n_cells']} cells; segmentation "
            f"{whole['segment_s']:.0f} s, features {whole['features_s']:.0f} s; **peak resident memory "
            f"{whole['peak_gib']:.2f} GiB** (target < 3 GiB).",
            "",
        ]
    if graph is not None:
        lines += [
            f"## Cell graph: {graph['n']:,} random cells (2,500 per mm²), CPU seconds",
            "",
            "| graph | bitro_sc `cell_graph` (cKDTree) | squidpy `spatial_neighbors_*` | ratio |",
            "|---|---:|---:|---:|",
            f"| kNN, k = 8 | {graph['ours_knn']:.1f} | {graph['squidpy_knn']:.1f} | "
            f"{graph['squidpy_knn'] / graph['ours_knn']:.1f}× |",
            f"| radius 30 µm | {graph['ours_radius']:.1f} | {graph['squidpy_radius']:.1f} | "
            f"{graph['squidpy_radius'] / graph['ours_radius']:.1f}× |",
            "",
            "Same graphs (tests/test_graph.py checks equality with squidpy's on the same µm coordinates).",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
