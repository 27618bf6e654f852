"""Render the default synthetic Visium slide with its spots (``synthetic_slide.png``) and a zoomed crop
(``synthetic_slide_crop.png``) next to this script.

Run: ``python docs/_static/make_synthetic_figure.py``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.patches import Circle

import bitro_sc as bs

HERE = Path(__file__).resolve().parent


def main() -> None:
    sdata, truth = bs.datasets.synthetic(seed=0, return_truth=True)
    img = np.moveaxis(sdata.images["he"].values, 0, -1)
    spots = sdata.shapes["spots"]
    table = sdata.tables["table"]
    epcam = np.asarray(table[:, "EPCAM"].X.todense()).ravel()

    fig, axes = plt.subplots(1, 2, figsize=(14, 7), dpi=80)
    axes[0].imshow(img)
    axes[0].set_title(f"synthetic H&E ({img.shape[1]}×{img.shape[0]} px, 0.5 µm/px), Visium spots")
    axes[1].imshow(img)
    circles = [Circle((p.x, p.y), r) for p, r in zip(spots.geometry, spots["radius"], strict=True)]
    pc = PatchCollection(circles, cmap="viridis", alpha=0.75)
    pc.set_array(np.log1p(epcam))
    axes[1].add_collection(pc)
    axes[1].set_title("log1p EPCAM counts per spot")
    fig.colorbar(pc, ax=axes[1], fraction=0.04)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(HERE / "synthetic_slide.png")
    plt.close(fig)

    # zoomed crop (400 × 400 px = 200 µm) around the median cell position, with the spot outlines
    cells = truth.cells
    cx, cy = np.median(cells["x_px"]), np.median(cells["y_px"])
    y0, x0 = int(max(cy - 200, 0)), int(max(cx - 200, 0))
    crop = img[y0 : y0 + 400, x0 : x0 + 400]
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(crop, extent=(x0 - 0.5, x0 + crop.shape[1] - 0.5, y0 + crop.shape[0] - 0.5, y0 - 0.5))
    for p, r in zip(spots.geometry, spots["radius"], strict=True):
        ax.add_patch(Circle((p.x, p.y), r, fill=False, ec="k", lw=0.8, alpha=0.6))
    ax.set_xlim(x0, x0 + crop.shape[1])
    ax.set_ylim(y0 + crop.shape[0], y0)
    ax.set_axis_off()
    ax.set_title("zoom: 200 µm, 55 µm spots outlined")
    fig.tight_layout()
    fig.savefig(HERE / "synthetic_slide_crop.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
