"""Render the ``pl_*.png`` figures of the documentation from real pipeline outputs.

    python docs/_static/make_pl_figures.py [synthetic] [cv] [her2st] [segmentation]   # default: all

Synthetic: three simulated Visium slides (800 µm, seed 0) → segment → features → phenotypes →
cells to spots → graph; BiTro is fitted on two slides and predicts the third per spot and per
cell; `cross_validate` (leave-one-slide-out) scores BiTro against the ridge and mean baselines.
HER2ST (``../shared/data/her2st`` or ``$BITRO_SC_DATA/her2st``): section C2, measured expression
over the whole slide, and the segmentation around the spot with the most EPCAM (a 200 µm
view); segmentation: the default watershed on a 400 × 400 px crop of C2. Roughly 5–10 minutes
on 2 CPU cores; most of it is the cross-validation (BiTro fitted three times).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import bitro_sc as bs

OUT = Path(__file__).resolve().parent
ROOT = OUT.parents[1]
T0 = time.time()


def log(msg: str) -> None:
    print(f"{time.time() - T0:6.1f} s  {msg}", flush=True)


def _synthetic_slides() -> list:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pairs = bs.datasets.synthetic(3, kind="visium", seed=0, return_truth=True, size_um=800, n_genes=100)
    slides = [s for s, _ in pairs]
    for s in slides:
        bs.tl.segment(s, progress=False)
    bs.tl.cell_features(slides, progress=False)
    bs.tl.phenotypes(slides)
    for s in slides:
        bs.tl.assign_cells(s)
        bs.tl.cell_graph(s)
    log("synthetic slides: cells, features, phenotypes, graph")
    return slides


def synthetic_figures() -> None:
    slides = _synthetic_slides()
    model = bs.tl.fit_bitro(slides[:2], level="spot", epochs=30, seed=0, progress=False)
    test = slides[2]
    bs.tl.predict_bitro(test, model, level="spot")
    bs.tl.predict_bitro(test, model, level="cell")
    log("fit + predict")
    bs.pl.expression(test, ["EPCAM", "CD74"], save=OUT / "pl_expression.png")
    bs.pl.expression(test, "EPCAM", level="cell", save=OUT / "pl_expression_cells.png")
    bs.pl.cells(test, crop_um=(200, 200, 500, 500), save=OUT / "pl_cells_synthetic.png")
    bs.pl.history(model, save=OUT / "pl_history.png")
    plt.close("all")
    log("expression, cells, history figures")


def cv_figure() -> None:
    slides = _synthetic_slides()
    cv = bs.tl.cross_validate(
        slides, groups="sample_id", fit_kwargs={"bitro": {"epochs": 30, "seed": 0}}, progress=False
    )
    bs.pl.gene_correlation(cv, save=OUT / "pl_gene_correlation.png")
    plt.close("all")
    summary = cv.groupby("method")["pearson"].mean()
    log(f"cross-validation: mean Pearson per method {summary.round(3).to_dict()}")


def her2st_figures() -> None:
    import geopandas as gpd
    from shapely.geometry import box

    env = os.environ.get("BITRO_SC_DATA")
    root = Path(env) if env else ROOT.parent / "shared" / "data"
    d = root / "her2st"
    if not d.is_dir():
        log(f"HER2ST not found at {d}: skipped; pl_cells.png shows the synthetic slide")
        synthetic = OUT / "pl_cells_synthetic.png"
        if synthetic.is_file():
            (OUT / "pl_cells.png").write_bytes(synthetic.read_bytes())
        return
    sdata = bs.io.read_st(d / "C2_HE.jpg", d / "C2_counts.tsv.gz", d / "C2_selection.tsv", sample_id="C2")
    log("HER2ST C2 read")
    bs.pl.expression(
        sdata, ["ERBB2", "EPCAM", "CD74"], layer=None, vmax="p99", save=OUT / "pl_expression_her2st.png"
    )
    plt.close("all")
    log("HER2ST measured expression")

    mpp = bs.get_mpp(sdata, "he")
    table = sdata.tables["table"]
    epcam = table[:, "EPCAM"].X.toarray().ravel() / table.X.sum(axis=1).A1
    cx, cy = (float(v) for v in table.obsm["spatial"][epcam.argmax()])  # tumour: the top EPCAM spot
    half = 150.0 / mpp  # segment a 300 µm square around it
    region = gpd.GeoDataFrame(geometry=[box(cx - half, cy - half, cx + half, cy + half)])
    bs.tl.segment(sdata, tissue=region, progress=False)
    bs.tl.cell_features(sdata, progress=False)
    bs.tl.phenotypes(sdata, n_clusters=5)
    log(f"HER2ST crop segmented: {sdata.tables['cells'].n_obs} cells")
    x_um, y_um = cx * mpp, cy * mpp
    bs.pl.cells(sdata, crop_um=(x_um - 100, y_um - 100, x_um + 100, y_um + 100), save=OUT / "pl_cells.png")
    plt.close("all")
    log("HER2ST cells figure")


def segmentation_figure(y0: int = 5150, x0: int = 4600, size: int = 400) -> None:
    """``segmentation_her2st.png``: H&E crop of HER2ST C2 and the default watershed's outlines."""
    import geopandas as gpd
    import numpy as np
    from shapely.geometry import box
    from skimage.segmentation import find_boundaries

    env = os.environ.get("BITRO_SC_DATA")
    d = (Path(env) if env else ROOT.parent / "shared" / "data") / "her2st"
    if not d.is_dir():
        log(f"HER2ST not found at {d}: segmentation figure skipped")
        return
    sdata = bs.io.read_st(d / "C2_HE.jpg", d / "C2_counts.tsv.gz", d / "C2_selection.tsv", sample_id="C2")
    pad = 60  # segment a margin around the crop so that nuclei on its border are whole
    region = gpd.GeoDataFrame(geometry=[box(x0 - pad, y0 - pad, x0 + size + pad, y0 + size + pad)])
    bs.tl.segment(sdata, tissue=region, write_labels=True, progress=False)
    mpp = bs.get_mpp(sdata, "he")
    he = sdata.images["he"]
    he = he["scale0"].ds["image"] if hasattr(he, "keys") else he  # multiscale pyramid: full resolution
    rgb = np.moveaxis(np.asarray(he[:, y0 : y0 + size, x0 : x0 + size]), 0, -1)
    labels = sdata.labels["cell_labels"]
    labels = labels["scale0"].ds["image"] if hasattr(labels, "keys") else labels
    lab = np.asarray(labels[y0 : y0 + size, x0 : x0 + size])
    n = len(np.setdiff1d(np.unique(lab), [0]))
    density = n / (size * mpp / 1000) ** 2
    outlined = rgb.copy()
    outlined[find_boundaries(lab, mode="inner")] = (0, 230, 0)
    fig, axes = plt.subplots(1, 2, figsize=(13.2, 7.4), layout="constrained")
    fig.suptitle(f"HER2ST C2, {size}×{size} px at {mpp:.2f} µm/px (y={y0}, x={x0})")
    axes[0].imshow(rgb)
    axes[0].set_title("H&E")
    axes[1].imshow(outlined)
    axes[1].set_title(f"bs.tl.segment: {n} nuclei ({density:.0f} / mm²)")
    bar = 50 / mpp
    axes[0].plot([20, 20 + bar], [size - 20, size - 20], color="black", lw=3)
    axes[0].text(20 + bar / 2, size - 28, "50 µm", ha="center", va="bottom")
    for ax in axes:
        ax.set_axis_off()
    fig.savefig(OUT / "segmentation_her2st.png", dpi=100)
    plt.close("all")
    log(f"HER2ST segmentation figure: {n} nuclei in the crop")


if __name__ == "__main__":
    which = sys.argv[1:] or ["synthetic", "cv", "her2st", "segmentation"]
    if "synthetic" in which:
        synthetic_figures()
    if "cv" in which:
        cv_figure()
    if "her2st" in which:
        her2st_figures()
    if "segmentation" in which:
        segmentation_figure()
