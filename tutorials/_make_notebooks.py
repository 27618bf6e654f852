"""Generate (and optionally execute) the tutorial notebooks.

The notebooks are written from the cell lists below, so that they are easy to review and
regenerate::

    python tutorials/_make_notebooks.py                 # write the three notebooks, no outputs
    python tutorials/_make_notebooks.py --execute       # write, execute in place, store outputs
    python tutorials/_make_notebooks.py --execute 01    # only the quickstart

Execution uses nbclient with the ``python3`` kernel, in the ``tutorials/`` folder, and prints
each notebook's wall time. ``BITRO_SC_QUICK=1`` in the environment makes the notebooks shrink
their sizes and epochs (what the test suite runs).
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str, *, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


# ---------------------------------------------------------------------------------------------
# 01 quickstart
# ---------------------------------------------------------------------------------------------
def quickstart() -> list[nbformat.NotebookNode]:
    return [
        md(r"""
# Quickstart: from an H&E image to cell-level expression

This tutorial runs the whole BiTro pipeline on **simulated** slides, where the expression of
every single cell is known, so that the cell-level prediction can be checked against the truth:

1. simulate a few Visium-like slides (H&E image + spot counts + hidden cell-level truth);
2. segment the nuclei (`bs.tl.segment`);
3. describe each cell (`bs.tl.cell_features`), cluster cells into phenotypes (`bs.tl.phenotypes`);
4. assign cells to spots (`bs.tl.assign_cells`) and connect neighbouring cells (`bs.tl.cell_graph`);
5. train BiTro on the training slides (`bs.tl.fit_bitro`);
6. predict spots and cells of a held-out slide (`bs.tl.predict_bitro`);
7. score it against a ridge baseline (`bs.tl.evaluate`, `bs.tl.fit_baseline`);
8. look at the results (`bs.pl.*`), with the true cell-level expression next to the prediction.

Everything lives in one `spatialdata.SpatialData` per slide; each step writes its result back
into it. Lengths are in micrometres (µm) unless a name ends in `_px` (pixels of the H&E image).
It runs on a laptop CPU in a few minutes.
"""),
        code(r"""
import json
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import sparse

import bitro_sc as bs

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
# BITRO_SC_QUICK=1 (set by the test suite) shrinks the slides and the training to a smoke test.
QUICK = os.environ.get("BITRO_SC_QUICK", "0") == "1"
N_SLIDES = 3 if QUICK else 4  # the last slide is held out for testing
SIZE_UM = 700 if QUICK else 1200  # side of each square slide (µm)
EPOCHS = 4 if QUICK else 30
print(f"bitro_sc {bs.__version__}; quick mode: {QUICK}")
"""),
        md(r"""
## 1. Simulated slides with cell-level truth

`bs.datasets.synthetic` renders breast-carcinoma-like H&E tissue (tumour nests, stroma, immune
infiltrate; five cell types) at 0.5 µm/px and simulates Visium counts: 55 µm spots on a 100 µm
grid, each spot's counts the sum over the cells whose nucleus centre lies in it. With
`return_truth=True` each slide comes with a `SyntheticTruth`: the nucleus label image, the cell
types and the **expression of every cell** — information a real experiment never gives you,
used here only to check the result.

Each slide is its own patient (`n_patients=N_SLIDES`), so the held-out slide shares no patient
with the training slides.
"""),
        code(r"""
pairs = bs.datasets.synthetic(
    N_SLIDES, kind="visium", size_um=SIZE_UM, n_patients=N_SLIDES, seed=0, return_truth=True
)
slides = [sdata for sdata, _ in pairs]
truths = [truth for _, truth in pairs]
train, test, test_truth = slides[:-1], slides[-1], truths[-1]

pd.DataFrame(
    {
        "sample_id": [t.sample_id for t in truths],
        "patient_id": [t.patient_id for t in truths],
        "spots": [s.tables["table"].n_obs for s in slides],
        "genes": [s.tables["table"].n_vars for s in slides],
        "true cells": [len(t.cells) for t in truths],
        "role": ["train"] * len(train) + ["test"],
    }
)
"""),
        code(r"""
test
"""),
        md(r"""
The measured expression of the held-out slide: discs of the true spot size (55 µm) coloured by
`log1p` counts per 10,000 (CP10k), over the H&E image. EPCAM marks tumour cells, COL1A2
fibroblasts, PTPRC immune cells.
"""),
        code(r"""
bs.pl.expression(test, ["EPCAM", "COL1A2", "PTPRC"], layer=None)
plt.show()
"""),
        md(r"""
## 2. Segment nuclei

`bs.tl.segment` finds the tissue, cuts it into overlapping tiles (600 µm by default) and
segments nuclei with a haematoxylin watershed (no model weights needed; StarDist, Cellpose or
precomputed CellViT/HoVer-Net polygons plug in through `method=`). It writes the table `"cells"`
(one row per nucleus: centroid in px and µm, `area_um2`, shape measures), the circles
`"cell_circles"` and the label image `"cell_labels"`.
"""),
        code(r"""
for sdata in slides:
    bs.tl.segment(sdata, progress=False)

pd.DataFrame(
    {
        "sample_id": [t.sample_id for t in truths],
        "segmented nuclei": [s.tables["cells"].n_obs for s in slides],
        "true nuclei": [len(t.cells) for t in truths],
    }
)
"""),
        md(r"""
## 3. Describe and cluster the cells

`bs.tl.cell_features` measures each nucleus (shape, haematoxylin/eosin intensities in the
nucleus and a ring around it, texture, local density, context in a fixed 48 µm field of view)
into `tables["cells"].obsm["X_bitro"]`. The standardisation is fitted **once over the training
slides** and re-applied to the test slide (`scaler=`), so features mean the same on every slide.
Deep encoders (`encoder="timm:<name>"` with local `weights=`) fit in the same place.

`bs.tl.phenotypes` clusters cells with one k-means model fitted on the training slides and
applied to the test slide (`model=`), written to `obs["bitro_phenotype"]`.
"""),
        code(r"""
bs.tl.cell_features(train, progress=False)  # one scaler over all training slides
bs.tl.cell_features(test, scaler=train[0], progress=False)  # ... re-used on the test slide
kmeans = bs.tl.phenotypes(train, n_clusters=7)
bs.tl.phenotypes(test, model=kmeans)

cells = test.tables["cells"]
names = cells.uns["bitro_features"]["feature_names"]
print(f"{cells.obsm['X_bitro'].shape[1]} features per cell, e.g. {list(names[:6])}")
"""),
        md(r"""
Because this slide is simulated, each segmented nucleus can be matched to the true cell under
its centroid (value of the truth label image there) and the phenotypes compared with the true
cell types. The phenotypes are unsupervised clusters of nucleus appearance, so they need not map
one to one, but tumour, lymphocyte and fibroblast nuclei should dominate different clusters.
"""),
        code(r"""
labels = np.asarray(test_truth.labels)
ys = np.clip(np.rint(cells.obs["y_px"].to_numpy()).astype(int), 0, labels.shape[0] - 1)
xs = np.clip(np.rint(cells.obs["x_px"].to_numpy()).astype(int), 0, labels.shape[1] - 1)
true_id = labels[ys, xs]  # 0 where a segmented object lies on no true nucleus
true_cells = test_truth.cells.set_index("cell_id")
cells.obs["true_cell_type"] = pd.Categorical(
    true_cells["cell_type"].reindex(true_id).to_numpy(), categories=true_cells["cell_type"].cat.categories
)
print(f"{(true_id > 0).mean():.1%} of segmented nuclei lie on a true nucleus")
pd.crosstab(cells.obs["bitro_phenotype"], cells.obs["true_cell_type"])
"""),
        code(r"""
x0, y0 = cells.obs[["x_um", "y_um"]].median()  # a point in the middle of the tissue (µm)
crop = (x0 - 150, y0 - 150, x0 + 150, y0 + 150)  # (x_min, y_min, x_max, y_max) in µm
fig, axes = plt.subplots(1, 2, figsize=(14, 6))
fig.subplots_adjust(wspace=0.45)
bs.pl.cells(test, color="bitro_phenotype", crop_um=crop, ax=axes[0], title="BiTro phenotype")
bs.pl.cells(test, color="true_cell_type", crop_um=crop, ax=axes[1], title="true cell type")
plt.show()
"""),
        md(r"""
## 4. Cells → spots, and the cell graph

`bs.tl.assign_cells` gives each cell the id of the spot whose disc contains its centroid
(`obs["spot_id"]`, missing outside spots). `bs.tl.cell_graph` connects each cell to its 8
nearest neighbours (distances in µm), stored under squidpy's keys
(`obsp["spatial_connectivities"]`, `obsp["spatial_distances"]`).
"""),
        code(r"""
for sdata in slides:
    bs.tl.assign_cells(sdata)
    bs.tl.cell_graph(sdata, k=8)

per_spot = cells.obs["spot_id"].value_counts()
print(
    f"test slide: {cells.obs['spot_id'].notna().sum()} of {cells.n_obs} cells in spots, "
    f"{per_spot.mean():.1f} cells per occupied spot (median {per_spot.median():.0f})"
)
"""),
        md(r"""
## 5. Train BiTro

`bs.tl.fit_bitro` pools the cells of each spot into a bag: cell features + phenotype embedding +
µm position encoding → graph attention over the cell graph → Transformer over the cells of the
bag → a non-negative expression per cell → summed into the spot and compared with the measured
spot (log1p counts per 10k). By default it predicts the 250 most highly variable genes of the
training spots; here we ask for all 200 simulated genes. Early stopping uses a validation split
of the *training* slides (here the 20 % of spots with the largest x of each slide, since there
are fewer than five patients); the test slide is never seen.
"""),
        code(r"""
genes = list(train[0].tables["table"].var_names)  # all 200 simulated genes
model = bs.tl.fit_bitro(train, genes=genes, epochs=EPOCHS, seed=0, progress=False)
model
"""),
        code(r"""
bs.pl.history(model)
plt.show()
"""),
        md(r"""
## 6. Predict the held-out slide

`level="spot"` writes `tables["table"].layers["bitro"]` (spots × genes); `level="cell"` turns
`tables["cells"]` into a cells × genes table with the prediction in `layers["bitro"]`. Values are
counts per 10,000 (library-normalised, not log-transformed). Each cell's value is its own
expression (a spot model also learns every cell's RNA content, from the spots' library sizes,
written to `obs["bitro_rna_content"]`); a spot's prediction is its cells' summed expression
divided by their summed RNA content (times a per-gene depth factor).
"""),
        code(r"""
bs.tl.predict_bitro(test, model)  # spots
bs.tl.predict_bitro(test, model, level="cell")  # cells
test.tables["cells"]
"""),
        md(r"""
## 7. Scores against a ridge baseline

The baseline (`bs.tl.fit_baseline`, HEST-style) is a ridge regression from the mean cell
features of each spot to its expression, fitted on the same training slides and genes.
`bs.tl.evaluate` gives one row per gene with the Pearson and Spearman correlation across the
spots of the held-out slide (both sides as log1p CP10k); its summary `hest_score` is the mean
Pearson over the top-50 highly variable genes **of the training data** (recorded at fit time,
never chosen on the test slide). With only a few dozen test spots, one gene's r has a standard
error near 0.1–0.15, so look at the averages.
"""),
        code(r"""
ridge = bs.tl.fit_baseline(train, method="ridge", genes=model.genes)
bs.tl.predict_bitro(test, ridge, key_added="ridge")

scores = {"bitro": bs.tl.evaluate(test), "ridge": bs.tl.evaluate(test, layer="ridge")}
spot_summary = pd.DataFrame({name: df.attrs for name, df in scores.items()}).T
spot_summary[["hest_score", "mean_spearman", "n_genes", "n_observations"]]
"""),
        code(r"""
bs.pl.gene_correlation(scores)
plt.show()
"""),
        md(r"""
Predicted next to measured, per spot (left: BiTro, right: the measured counts):
"""),
        code(r"""
bs.pl.expression(test, ["EPCAM", "COL1A2"])
plt.show()
"""),
        md(r"""
## 8. Cell level: prediction against the truth

Here the simulation pays off: each segmented nucleus matched to a true cell (step 3) has a known
expected expression (`truth.expression.layers["rate"]`, counts before sampling noise). We put it,
rescaled to the prediction's total, into a `"truth"` layer of the cells table, so that
`bs.pl.expression` draws both the same way.

As a reference for what *super-resolution* adds, the spot prediction is also spread evenly over
the cells of each spot ("spot → cells"): that is all one could say about cells from spot data
alone. BiTro's per-cell prediction should correlate better with the true cell expression.
"""),
        code(r"""
cells = test.tables["cells"]
genes = list(cells.var_names)
pred = np.asarray(cells.layers["bitro"], dtype=float)

truth_expr = test_truth.expression
rate = truth_expr.layers["rate"]
rate = rate.toarray() if sparse.issparse(rate) else np.asarray(rate)
rate = pd.DataFrame(rate, index=truth_expr.obs["cell_id"].to_numpy(), columns=truth_expr.var_names)[genes]

matched = true_id > 0
true = np.full(pred.shape, np.nan)
true[matched] = rate.loc[true_id[matched]].to_numpy()
true *= np.nansum(pred[matched]) / np.nansum(true[matched])  # same total as the prediction
cells.layers["truth"] = true.astype(np.float32)

# "spot -> cells": every cell of a spot gets the spot's prediction / number of its cells
spot_pred = test.tables["table"].to_df(layer="bitro")[genes]
spot_pred.index = test.tables["table"].obs["spot_id"].to_numpy()
in_spot = cells.obs["spot_id"].notna().to_numpy()
sid = cells.obs["spot_id"].to_numpy()[in_spot].astype(int)
n_in_spot = pd.Series(sid).value_counts()
spread = np.full(pred.shape, np.nan)
spread[in_spot] = spot_pred.loc[sid].to_numpy() / n_in_spot.loc[sid].to_numpy()[:, None]


def per_gene_pearson(a, b, rows):
    a, b = np.log1p(a[rows]), np.log1p(b[rows])
    out = {}
    for j, gene in enumerate(genes):
        ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j])
        if ok.sum() > 2 and a[ok, j].std() > 0 and b[ok, j].std() > 0:
            out[gene] = np.corrcoef(a[ok, j], b[ok, j])[0, 1]
    return pd.Series(out)


rows = matched & in_spot  # cells both methods can predict
cell_scores = pd.DataFrame(
    {
        "BiTro cells": per_gene_pearson(pred, true, rows),
        "spot -> cells": per_gene_pearson(spread, true, rows),
    }
)
print(f"{rows.sum()} matched cells inside spots, {len(genes)} genes")
cell_scores.describe().loc[["count", "mean", "50%"]]
"""),
        code(r"""
gene = "EPCAM"
j = genes.index(gene)
types = cells.obs["true_cell_type"]
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
for t in types.cat.categories:
    sel = rows & (types == t).to_numpy()
    axes[0].scatter(np.log1p(true[sel, j]), np.log1p(pred[sel, j]), s=6, alpha=0.6, label=t)
axes[0].set(
    xlabel=f"true {gene} (log1p, rescaled)",
    ylabel=f"predicted {gene} (log1p CP10k)",
    title=f"{gene} per cell: r = {cell_scores.loc[gene, 'BiTro cells']:.2f}",
)
axes[0].legend(markerscale=3, fontsize=8)
axes[1].scatter(cell_scores["spot -> cells"], cell_scores["BiTro cells"], s=10)
lim = [np.nanmin(cell_scores.to_numpy()) - 0.05, 1]
axes[1].plot(lim, lim, color="grey", lw=1)
axes[1].set(
    xlabel="Pearson, spot prediction spread over cells",
    ylabel="Pearson, BiTro per cell",
    title=f"per gene: BiTro better for {(cell_scores.iloc[:, 0] > cell_scores.iloc[:, 1]).sum()} "
    f"of {len(cell_scores)}",
)
plt.tight_layout()
plt.show()
"""),
        md(r"""
The same cells on the tissue: the prediction (left) and the truth (right), for a tumour and a
fibroblast gene, on a 400 µm window.
"""),
        code(r"""
crop = (x0 - 200, y0 - 200, x0 + 200, y0 + 200)  # 400 µm around the middle of the tissue
fig, axes = plt.subplots(2, 2, figsize=(12.5, 11))
fig.subplots_adjust(wspace=0.4, hspace=0.15)
for row, gene in zip(axes, ["EPCAM", "COL1A2"], strict=True):
    bs.pl.expression(test, gene, level="cell", layer="bitro", compare=False, crop_um=crop, ax=row[0])
    bs.pl.expression(test, gene, level="cell", layer="truth", compare=False, crop_um=crop, ax=row[1])
    row[0].set_title(f"{gene}: BiTro prediction per cell")
    row[1].set_title(f"{gene}: true expression per cell")
    colorbar = next(c.colorbar for c in row[1].collections if c.colorbar is not None)
    colorbar.set_label("true expression (rescaled), log1p")
plt.show()
"""),
        md(r"""
## Summary

The numbers of this run (spot-level scores on the held-out slide, cell-level scores against the
truth):
"""),
        code(
            r"""
summary = {
    "spot_hest_score_bitro": float(scores["bitro"].attrs["hest_score"]),
    "spot_hest_score_ridge": float(scores["ridge"].attrs["hest_score"]),
    "cell_mean_pearson_bitro": float(cell_scores["BiTro cells"].mean()),
    "cell_mean_pearson_spot_spread": float(cell_scores["spot -> cells"].mean()),
    "n_test_spots": int(test.tables["table"].n_obs),
    "n_test_cells": int(cells.n_obs),
}
print(json.dumps(summary, indent=1))
""",
            tags=("summary",),
        ),
        md(r"""
Next: `02_her2st.ipynb` runs the same steps on real HER2+ breast cancer sections, and
`03_transfer.ipynb` transfers a model between bulk and spatial data.
"""),
    ]


# ---------------------------------------------------------------------------------------------
# 02 HER2ST
# ---------------------------------------------------------------------------------------------
def her2st() -> list[nbformat.NotebookNode]:
    return [
        md(r"""
# Real data: HER2-positive breast cancer (HER2ST)

This tutorial predicts gene expression from the H&E images of four serial sections of a
HER2-positive breast tumour measured with legacy spatial transcriptomics (ST: 100 µm spots on a
200 µm grid):

- reading the sections (`bs.io.read_st`), segmenting nuclei and describing cells;
- **cross-validated** scores (leave one section out) against a ridge regression and the mean
  profile (`bs.tl.cross_validate`), with the settings of the project's accuracy benchmark, so the
  numbers can be compared with the README's status section;
- a model with the **default settings** trained on three sections, scored on the fourth for a
  panel of markers (ERBB2, EPCAM, KRT19, SCGB2A2, FN1, COL1A2, COL3A1, CD74, IGKC);
- spot-level predicted vs measured maps and **cell-level super-resolution** maps of the held-out
  section.

**Data.** Sections C2–C5 of patient C from the HER2ST data set: Andersson et al., *Spatial
deconvolution of HER2-positive breast cancer delineates tumor-associated cell type interactions*,
Nat Commun 12, 6012 (2021), repository [almaan/her2st](https://github.com/almaan/her2st) (cite the
paper; the repository has no licence file). Per section: `<S>_HE.jpg` (H&E, ~9,300 × 9,900 px),
`<S>_counts.tsv.gz` (spots × genes, raw counts, index `"XxY"` = array position) and
`<S>_selection.tsv` (spot centres in image pixels; `selected == 1` under tissue).

**Where the files are.** The notebook looks in `$BITRO_SC_DATA/her2st` when the environment
variable `BITRO_SC_DATA` is set, else in `../shared/data/her2st` relative to the repository root.
To use your own copy, download the files above (from the repository's `data/ST-cnts`,
`data/ST-imgs` and `data/ST-spotfiles` folders, renamed as above), put them in one folder
`<root>/her2st/`, and start Jupyter with `BITRO_SC_DATA=<root>`. The data is only read, never written.
"""),
        code(r"""
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from spatialdata.transformations import get_transformation

import bitro_sc as bs

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets


def find_her2st() -> Path:
    candidates = [Path(os.environ["BITRO_SC_DATA"])] if os.environ.get("BITRO_SC_DATA") else []
    candidates += [Path("../../shared/data"), Path("../shared/data")]  # from tutorials/ or the repo root
    for root in candidates:
        if (root / "her2st").is_dir():
            return (root / "her2st").resolve()
    raise FileNotFoundError(
        f"HER2ST data not found in {[str(c) for c in candidates]}: set $BITRO_SC_DATA to the folder "
        "that holds her2st/ (see the text above)."
    )


HER2ST = find_her2st()
SECTIONS = ["C2", "C3", "C4", "C5"]
MARKERS = ["ERBB2", "EPCAM", "KRT19", "SCGB2A2", "FN1", "COL1A2", "COL3A1", "CD74", "IGKC"]
print(HER2ST)
"""),
        md(r"""
## 1. Read the sections

`bs.io.read_st` builds one SpatialData per section: the H&E image `"he"` (a lazy multiscale
pyramid), the spots `"spots"` (100 µm discs) and the counts table `"table"`. The files give no
pixel size, so it is **estimated from the array pitch** (200 µm between neighbouring spots)
by a similarity fit of the spot pixel positions against their array positions; the fit and its
residual are recorded. A few selected spots without counts are dropped with a warning.
"""),
        code(r"""
slides = []
for name in SECTIONS:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*selected spots have no counts.*")
        slides.append(
            bs.io.read_st(
                HER2ST / f"{name}_HE.jpg",
                HER2ST / f"{name}_counts.tsv.gz",
                HER2ST / f"{name}_selection.tsv",
                sample_id=name,
                patient_id="C",
            )
        )

pd.DataFrame(
    {
        "spots": [s.tables["table"].n_obs for s in slides],
        "genes": [s.tables["table"].n_vars for s in slides],
        "µm per px": [get_transformation(s["he"], "um").scale[-1] for s in slides],
        "pixel size from": [s.attrs["bitro_sc"]["mpp_source"]["he"] for s in slides],
    },
    index=SECTIONS,
)
"""),
        code(r"""
c5 = slides[-1]
bs.pl.expression(c5, ["ERBB2", "EPCAM", "COL1A2", "CD74"], layer=None, ncols=4, panel_size=(4.2, 4.0))
plt.show()
"""),
        md(r"""
## 2. Segment, describe, relate

Same steps as in the quickstart, with their defaults but one. Segmentation only runs on tissue (the mask
is computed and stored as shapes `"tissue"`). Each cell is described by the `"niche"` encoder
(the package default is `"morphology"`, the cell alone): its 19 nucleus-morphology features and their mean over the cells in the 300 µm square
around it, the tissue at the scale of a spot — the best encoder on these sections among those
that need no weights or GPU (`docs/encoders.md`: over the four folds BiTro 0.163 HEST score and
0.372 on the marker panel, against 0.145 and 0.334 with the morphology alone,
`encoder="morphology"`). The feature standardisation and the k-means
phenotypes are fitted over all four sections at once: they use the images only, never
expression, so no expression of a held-out section leaks into training.
"""),
        code(r"""
for sdata in slides:
    bs.tl.segment(sdata, progress=False)
bs.tl.cell_features(slides, encoder="niche", progress=False)
bs.tl.phenotypes(slides)
for sdata in slides:
    bs.tl.assign_cells(sdata)
    bs.tl.cell_graph(sdata)

summary = pd.DataFrame(
    {
        "nuclei": [s.tables["cells"].n_obs for s in slides],
        "nuclei in spots": [int(s.tables["cells"].obs["spot_id"].notna().sum()) for s in slides],
    },
    index=SECTIONS,
)
summary["nuclei per spot"] = summary["nuclei in spots"] / [s.tables["table"].n_obs for s in slides]
summary.round(1)
"""),
        code(r"""
x0, y0 = c5.tables["cells"].obs[["x_um", "y_um"]].median()  # middle of the tissue (µm)
fig, axes = plt.subplots(1, 2, figsize=(14, 6))
fig.subplots_adjust(wspace=0.35)
small, large = (x0 - 75, y0 - 75, x0 + 75, y0 + 75), (x0 - 150, y0 - 150, x0 + 150, y0 + 150)
bs.pl.cells(c5, color=None, crop_um=small, ax=axes[0], title="C5: segmented nuclei (150 µm)")
bs.pl.cells(c5, crop_um=large, ax=axes[1], title="C5: phenotypes (300 µm)")
plt.show()
"""),
        md(r"""
## 3. Cross-validated scores

`bs.tl.cross_validate` holds out one section at a time, fits every method on the other three
only (same genes, same folds) and scores the held-out section with per-gene Pearson correlation
across its spots (`log1p` counts per 10k on both sides). The genes of each fold are the top 50
highly variable genes of *its training sections*, and the summary is the HEST-style score: the
mean Pearson over those genes. `"ridge"` is the HEST-style baseline on the same cell features;
`"mean"` predicts the average training profile everywhere (its correlation is undefined, shown
as NaN, since it is constant).

These are the settings of the project's accuracy benchmark
(`python benchmarks/bench_accuracy.py --sections her2st`: up to 30 epochs with early stopping,
model seed 0), whose result is in `benchmarks/results/accuracy.md` and in the README's status
section: BiTro 0.157 against ridge's 0.144 (0.147–0.157 over three model seeds), measured with
the morphology features and the model defaults of before 2026-12-05. The run stored here uses
the `"niche"` encoder and the current model defaults (the bag-level ridge term chosen by validation) and
gives BiTro 0.161 against ridge's 0.171 (seed 0): the niche features lift ridge more than BiTro
on these 50 genes.

Two caveats for reading the numbers. These are **serial sections of one patient**, so
leave-one-section-out measures generalisation across sections, not across patients (expect
lower scores on new patients). And with ~180 spots per section, one gene's r has a standard
error near 0.07: differences under ~0.05 per gene are noise; compare averages over genes and folds.
"""),
        code(r"""
EPOCHS = 30  # the benchmark's setting (fit_bitro's default is 50; early stopping ends sooner)
cv = bs.tl.cross_validate(
    slides,
    methods=("bitro", "ridge", "mean"),
    top_hvg=50,
    fit_kwargs={"bitro": {"epochs": EPOCHS, "seed": 0, "progress": False}},
    progress=False,
)
hvg_rows = cv[cv["is_hvg"]]
per_fold = hvg_rows.groupby(["test_group", "method"], sort=False)["pearson"].mean().unstack("method")
per_fold.loc["mean over folds"] = per_fold.mean()
per_fold.round(3)
"""),
        code(r"""
pd.DataFrame(cv.attrs["summary"]).T[["hest_score", "hest_score_sd", "mean_spearman", "n_folds"]].round(3)
"""),
        code(r"""
bs.pl.gene_correlation(cv, methods=["bitro", "ridge"])
plt.show()
"""),
        md(r"""
Left: each gene's Pearson (mean over the folds that predicted it) per method; right: BiTro
against ridge, gene by gene. The two methods are close: on a few hundred ST spots the ridge on
mean cell features is a strong baseline, and neither is ahead on every gene or every fold.

## 4. A default model and the marker panel

Now the calls a user makes: `bs.tl.fit_bitro` with its defaults (the top 250 highly variable
genes of the training spots plus the marker panel `bs.pp.MARKER_GENES`, up to 50 epochs with
early stopping on a validation split of the training spots, then a refit on all of them),
trained on C2–C4 and applied to C5. A ridge regression on the same genes and sections is the
reference. The marker panel is scored on C5 only, so each number is one section's correlation.
"""),
        code(r"""
train = slides[:-1]
model = bs.tl.fit_bitro(train, progress=False)
ridge = bs.tl.fit_baseline(train, method="ridge", genes=model.genes)
bs.tl.predict_bitro(c5, model)  # spots
bs.tl.predict_bitro(c5, model, level="cell")  # cells
bs.tl.predict_bitro(c5, ridge, key_added="ridge")
print(f"{model}: {len(model.genes)} genes, all {len(MARKERS)} markers: {set(MARKERS) <= set(model.genes)}")
bs.pl.history(model)
plt.show()
"""),
        code(r"""
scores = {
    "bitro": bs.tl.evaluate(c5, genes=MARKERS, store=False),
    "ridge": bs.tl.evaluate(c5, layer="ridge", genes=MARKERS, store=False),
}
markers = pd.DataFrame({name: df["pearson"] for name, df in scores.items()}).loc[MARKERS]
markers.loc["mean over markers"] = markers.mean()
hvg50 = {
    name: bs.tl.evaluate(c5, layer=layer, store=False).attrs["hest_score"]
    for name, layer in [("bitro", "bitro"), ("ridge", "ridge")]
}
markers.loc["HEST score (top-50 training HVGs)"] = pd.Series(hvg50)
markers.round(3)
"""),
        md(r"""
On C5 the default model is level with ridge on the HEST score (0.147 vs 0.148 in the stored run)
and behind it on most markers (mean 0.329 vs 0.388; ahead on ERBB2 only): with one section
of ~180 spots per gene, these single-section differences are within the noise, and the
four-fold averages of section 3 are the better guide.

**ERBB2.** HER2 (*ERBB2*) amplification is a genomic event that is **not visible in H&E**:
there is no morphological signature of the amplification itself. A model can only learn
"epithelium is here" — and in this HER2-positive tumour the epithelium is what over-expresses
ERBB2 — so its ERBB2 prediction is really an epithelial-content prediction. It cannot tell a
HER2-positive tumour from a HER2-negative one; that still needs IHC or ISH.

## 5. Maps of the held-out section

Spot level, predicted next to measured (each pair on one colour scale):
"""),
        code(r"""
bs.pl.expression(c5, ["ERBB2", "EPCAM", "COL1A2", "CD74"])
plt.show()
"""),
        md(r"""
**Cell-level super-resolution.** Each cell gets its own prediction from what the model sees in
it and around it; cells between spots (ST spots cover only a fifth of the tissue) are predicted
too. Over the whole section, ~24,000 cells are too many to see one by one, so `style="smooth"`
draws the per-cell values smoothed into a field; then a 600 µm window with every cell at full
resolution:
"""),
        code(r"""
bs.pl.expression(
    c5,
    ["EPCAM", "COL1A2", "CD74"],
    level="cell",
    style="smooth",
    compare=False,
    ncols=3,
    panel_size=(4.6, 4.2),
)
plt.show()
"""),
        code(r"""
crop = (x0 - 300, y0 - 300, x0 + 300, y0 + 300)
bs.pl.expression(
    c5,
    ["EPCAM", "COL1A2", "CD74"],
    level="cell",
    compare=False,
    crop_um=crop,
    ncols=3,
    panel_size=(4.6, 4.2),
    vmin="p1",
    vmax="p99",
)
plt.show()
"""),
        md(r"""
Every cell of the section now has a predicted profile in `c5.tables["cells"].layers["bitro"]`
(counts per 10k), ready for the usual single-cell tools. Remember what the scores above say:
on these sections the per-spot correlation is modest (a HEST score near 0.15), so treat the maps
as a guide to where expression is high, not as measurements.
"""),
    ]


# ---------------------------------------------------------------------------------------------
# 03 transfer
# ---------------------------------------------------------------------------------------------
def transfer() -> list[nbformat.NotebookNode]:
    return [
        md(r"""
# Bulk ↔ spatial transfer with LoRA

Bulk RNA-seq with matched H&E exists for thousands of tumours (TCGA-like cohorts); spatial
transcriptomics for a handful. BiTro's cell-level model is the same for both: a bulk profile is
the sum over all cells of a slide, a spot the sum over the cells in it. So a model trained on
many bulk slides can be **adapted** to a few spatial slides, and the other way round, by
training small LoRA adapters (low-rank updates of the projection, attention and feed-forward
weights, through `peft`) plus the gene head while the base weights stay frozen.

This notebook, on simulated slides:

1. trains a base model on **bulk** slides (`fit_bitro(level="bulk")`);
2. adapts it to **one** spatial slide (`transfer="bulk"`, `base=`), against training from
   scratch on that slide, scored on held-out spatial slides;
3. goes **back**: adapts a spot-trained model to a few bulk slides (`transfer="spatial"`),
   scored on held-out bulk slides.

Lengths are in µm; expression is compared as `log1p` counts per 10k.
"""),
        code(r"""
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import bitro_sc as bs

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
QUICK = os.environ.get("BITRO_SC_QUICK", "0") == "1"
N_BULK = 8 if QUICK else 16  # bulk-only slides
N_SPATIAL = 3  # one to train on (scarce), the others held out
SIZE_UM = 500 if QUICK else 600
EPOCHS = 3 if QUICK else 12
"""),
        md(r"""
## 1. Simulated cohort

`bs.datasets.synthetic(kind="bulk")` makes bulk-only slides (an H&E image and a one-row
`"bulk"` table). Here all slides come from **one** call with `with_bulk=True`, so that the bulk
and the spatial slides share one gene model (the same biology) and are all different patients;
the first `N_BULK` slides then lose their spots and spot table, which makes them exactly
bulk-only slides. Each bulk slide is a small 600 µm piece of tissue; the spatial slides are
Visium-like (55 µm spots, 100 µm apart).
"""),
        code(r"""
n = N_BULK + N_SPATIAL
slides = bs.datasets.synthetic(n, kind="visium", with_bulk=True, size_um=SIZE_UM, n_patients=n, seed=0)
bulk_slides, spatial = slides[:N_BULK], slides[N_BULK:]
for sdata in bulk_slides:  # bulk only: no spots, no spot table
    del sdata.tables["table"]
    del sdata.shapes["spots"]
spatial_train, spatial_test = spatial[:1], spatial[1:]
genes = list(spatial_train[0].tables["table"].var_names)
print(bulk_slides[0])
print(
    f"{N_BULK} bulk slides; spatial: {spatial_train[0].tables['table'].n_obs} training spots on one slide, "
    f"{sum(s.tables['table'].n_obs for s in spatial_test)} test spots on {len(spatial_test)} slides"
)
"""),
        md(r"""
Cells are segmented and described on every slide; the feature scaling and the phenotypes are
fitted on the training slides (bulk + the spatial training slide) and re-applied to the
held-out ones.
"""),
        code(r"""
for sdata in slides:
    bs.tl.segment(sdata, progress=False)
    bs.tl.cell_graph(sdata, k=8)
fit_on = bulk_slides + spatial_train
bs.tl.cell_features(fit_on, progress=False)
bs.tl.cell_features(spatial_test, scaler=fit_on[0], progress=False)
kmeans = bs.tl.phenotypes(fit_on, n_clusters=7)
bs.tl.phenotypes(spatial_test, model=kmeans)
for sdata in spatial:
    bs.tl.assign_cells(sdata)
print("cells per bulk slide:", [s.tables["cells"].n_obs for s in bulk_slides])
"""),
        md(r"""
## 2. Base model on bulk

At `level="bulk"` a whole slide is one bag: all its cells are encoded (attention in windows of
`chunk_cells` cells, so memory stays bounded on whole slides) and summed into the slide's
profile. Early stopping holds out 20 % of the patients.
"""),
        code(r"""
base = bs.tl.fit_bitro(bulk_slides, level="bulk", genes=genes, epochs=EPOCHS, seed=0, progress=False)
print(base, "| validation slides:", base.record["split"]["validation"])
bs.pl.history(base, title="bulk base model")
plt.show()
"""),
        md(r"""
## 3. Bulk → spatial: adapt to one spatial slide

Five ways to get a spot model from one slide of spots:

- **scratch**: `fit_bitro` on the slide alone;
- **auto** (`transfer="bulk", base=base`, the default `policy="auto"`): the route below (or
  scratch, or the base as it is) that scores best on held-out spots of the target slide;
- **LoRA** (`policy="lora"`): the base weights, GAT included, are frozen; LoRA adapters and the
  gene head are trained;
- **head**: only the gene head is trained (`policy="head"`);
- **full**: all weights fine-tuned starting from the base (`policy="full"`).

Genes are matched by name between the base and the spatial table; the record says what was
matched, added and frozen. All five are scored on the held-out spatial slides over the same
genes: the top-50 highly variable genes of the spatial training slide.
"""),
        code(r"""
models = {
    "scratch": bs.tl.fit_bitro(spatial_train, genes=genes, epochs=EPOCHS, seed=0, progress=False),
    "auto": bs.tl.fit_bitro(spatial_train, transfer="bulk", base=base, epochs=EPOCHS, seed=0, progress=False),
    "LoRA": bs.tl.fit_bitro(
        spatial_train, transfer="bulk", base=base, policy="lora", epochs=EPOCHS, seed=0, progress=False
    ),
    "head": bs.tl.fit_bitro(
        spatial_train, transfer="bulk", base=base, policy="head", epochs=EPOCHS, seed=0, progress=False
    ),
    "full": bs.tl.fit_bitro(
        spatial_train, transfer="bulk", base=base, policy="full", epochs=EPOCHS, seed=0, progress=False
    ),
}
eval_genes = models["scratch"].record["hvgs"][:50]  # training HVGs, never chosen on the test slides

rows, evals = {}, {}
for name, model in models.items():
    for sdata in spatial_test:
        bs.tl.predict_bitro(sdata, model, key_added=name)
    scores = [bs.tl.evaluate(s, layer=name, genes=eval_genes, store=False) for s in spatial_test]
    evals[name] = scores
    rows[name] = {
        "trainable parameters": model.record.get("n_trainable"),
        "frozen parameters": model.record.get("n_frozen"),
        **{
            f"Pearson {s.attrs['bitro_sc']['sample_id']}": df.attrs["mean_pearson"]
            for s, df in zip(spatial_test, scores, strict=True)
        },
        "mean Pearson": np.mean([df.attrs["mean_pearson"] for df in scores]),
    }
to_spatial = pd.DataFrame(rows).T.astype({"trainable parameters": int, "frozen parameters": int})
to_spatial.round(3)
"""),
        md(r"""
Gene by gene on the first test slide, LoRA against scratch (one point per gene; above the
diagonal = better after transfer):
"""),
        code(r"""
bs.pl.gene_correlation(
    {name: evals[name][0] for name in ["LoRA", "scratch", "head", "full"]}, pair=("scratch", "LoRA")
)
plt.show()
"""),
        code(r"""
lora = models["LoRA"]
print("matched genes:", len(lora.record["matched_genes"]), "| new genes:", len(lora.record["new_genes"]))
print("frozen:", lora.record["base"]["frozen_modules"])
print("LoRA targets:", lora.record["base"]["lora_targets"])
print("policy='auto' chose:", models["auto"].record["route"]["chosen"])
"""),
        code(r"""
test0 = spatial_test[0]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
fig.subplots_adjust(wspace=0.45)
bs.pl.expression(test0, "EPCAM", layer="scratch", compare=False, ax=axes[0])
bs.pl.expression(test0, "EPCAM", layer="LoRA", compare=False, ax=axes[1])
bs.pl.expression(test0, "EPCAM", layer=None, ax=axes[2])
axes[0].set_title("EPCAM: scratch (1 slide)")
axes[1].set_title("EPCAM: bulk base + LoRA")
axes[2].set_title("EPCAM: measured")
plt.show()
"""),
        md(r"""
## 4. Spatial → bulk: and back

Now the opposite situation: a model trained on spots (all three spatial slides), and only a
few bulk slides of a new cohort. The spot model is adapted to four bulk slides
(`transfer="spatial"`, LoRA) and compared with a bulk model trained from scratch on the same
four slides and with the spot model used as is (a bulk profile is just the sum over all cells).
Scores: per-gene Pearson **across** the remaining bulk slides (`bs.tl.evaluate(level="bulk")`),
over all genes.
"""),
        code(r"""
spot_model = bs.tl.fit_bitro(spatial, genes=genes, epochs=EPOCHS, seed=0, progress=False, overwrite=True)
bulk_train, bulk_test = bulk_slides[:4], bulk_slides[4:]

back = {
    "spot model as is": spot_model,
    "scratch (4 bulk slides)": bs.tl.fit_bitro(
        bulk_train, level="bulk", genes=genes, epochs=EPOCHS, seed=0, progress=False, overwrite=True
    ),
    "spot model + LoRA": bs.tl.fit_bitro(
        bulk_train, transfer="spatial", base=spot_model, policy="lora", epochs=EPOCHS, seed=0, progress=False,
        overwrite=True,
    ),
    "spot model, auto route": bs.tl.fit_bitro(
        bulk_train, transfer="spatial", base=spot_model, epochs=EPOCHS, seed=0, progress=False, overwrite=True
    ),
}
rows = {}
for name, model in back.items():
    for sdata in bulk_test:
        bs.tl.predict_bitro(sdata, model, level="bulk", key_added="bulk_pred", overwrite=True)
    df = bs.tl.evaluate(bulk_test, level="bulk", layer="bulk_pred", top_hvg=None, store=False)
    rows[name] = {
        "mean Pearson": df.attrs["mean_pearson"],
        "genes with r > 0 (q < 0.05)": df.attrs["n_significant"],
        "slides": df.attrs["n_observations"],
    }
to_bulk = pd.DataFrame(rows).T
to_bulk
"""),
        md(r"""
## What to take from these tables

- **Cost.** LoRA trains a fraction of the parameters (the `trainable parameters` column:
  adapters + gene head) and leaves the base untouched, so one bulk base can serve many spatial
  data sets, each with its own small adapter.
- **Benefit depends on the base, and on how scarce the target is.** Transfer can only pass on
  what the base learned. Here the base sees 16 small simulated slides (13 for training); this
  simulation is deliberately small so that the notebook runs in minutes: it demonstrates the
  recipe, and the gain in this one run can go either way. Measured at a larger size
  (`benchmarks/results/transfer.md`: 3 synthetic draws × 3 model seeds, `policy="auto"`), bulk →
  spot from a base on 40 bulk slides scored 0.412 ± 0.011 mean spot Pearson on one spot slide
  against 0.394 from scratch (`linear_start="constant"`; 0.368 with the default) and 0.365 for
  the base alone (it won 9 of 9 runs, by +0.012 to +0.031 per draw); with 3 spot slides scratch
  caught up (0.455 against transfer's 0.451).
  Spot → bulk: the spot base as is (0.247) was not improved by adapting it on 4, 8 or 16 bulk
  slides; training on the bulk slides alone scored 0.03 (4 slides) to 0.15 (16). On 5-12 bulk
  slides the default split would hold out only 1-2 slides, too few for the route choice's noise
  margin (on 8 slides it adapted to a worse model in 4 of 9 runs); the route is chosen there by
  leave-one-slide-out folds with the margin, which kept the base in 9 of 9 runs.
- **`policy="auto"` chooses on held-out target data only** (the record's `route`): zero-shot,
  head, LoRA, full fine-tuning, each also shrunk halfway toward the base, and scratch when the
  target has at least 100 spots or 8 bulk slides (here it has 20 spots and 4 bulk slides, so
  scratch is left out and the record says why). With so few target bags the validation is itself
  noisy: compare its row with the named policies above, and read its choice as one draw.
- **Spot → bulk.** A spot model is already a bulk model (the sum over all cells of a slide),
  so compare adaptations with the "as is" row.
- **Noise.** With a few dozen test spots or a dozen test slides, one gene's r has a standard
  error of 0.15–0.3; only averages over many genes, as in these tables, mean anything.

For a real cohort: train the base on all bulk slides with more epochs, keep the feature scaler
and the k-means of the training slides (`scaler=`, `model=`), and save the base with
`base.save(path)` to re-use it as `base=path`.
"""),
    ]


NOTEBOOKS = {
    "01": ("01_quickstart.ipynb", quickstart),
    "02": ("02_her2st.ipynb", her2st),
    "03": ("03_transfer.ipynb", transfer),
}


def build(name: str) -> nbformat.NotebookNode:
    _, cells = NOTEBOOKS[name]
    nb = new_notebook(cells=cells())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, *, timeout: int = 900) -> float:
    """Execute ``nb`` in place in ``tutorials/``; return the wall time in seconds."""
    from nbclient import NotebookClient

    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    seconds = time.perf_counter() - start
    compress_figures(nb)
    return seconds


def compress_figures(nb: nbformat.NotebookNode, *, quality: int = 85) -> None:
    """Store figure outputs as JPEG (a fifth of the PNG size; keeps the repository small)."""
    import base64
    import io

    from PIL import Image

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" not in data:
                continue
            im = Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGBA")
            flat = Image.new("RGB", im.size, "white")
            flat.paste(im, mask=im.split()[-1])
            buf = io.BytesIO()
            flat.save(buf, "JPEG", quality=quality, optimize=True)
            del data["image/png"]
            data["image/jpeg"] = base64.b64encode(buf.getvalue()).decode()


def keep_outputs(nb: nbformat.NotebookNode, stored_path: Path) -> None:
    """Copy the outputs of ``stored_path`` into ``nb`` where only markdown or code *layout* changed.

    For re-wrapping text or re-formatting code without re-running: a code cell keeps its stored
    outputs only when its source parses to the same Python syntax tree as the stored one;
    anything else is an error (execute instead).
    """
    stored = nbformat.read(stored_path, as_version=4)
    new_code = [c for c in nb.cells if c.cell_type == "code"]
    old_code = [c for c in stored.cells if c.cell_type == "code"]
    if len(new_code) != len(old_code):
        raise ValueError(f"{stored_path.name}: code cells were added or removed; use --execute.")
    for new, old in zip(new_code, old_code, strict=True):
        if ast.dump(ast.parse(new.source)) != ast.dump(ast.parse(old.source)):
            raise ValueError(f"{stored_path.name}: code changed in\n{new.source}\nuse --execute.")
        new.outputs, new.execution_count = old.outputs, old.execution_count
    nb.metadata = stored.metadata


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", default=list(NOTEBOOKS), help="notebooks to build (01, 02, 03)")
    parser.add_argument("--execute", action="store_true", help="execute and store outputs")
    parser.add_argument(
        "--keep-outputs", action="store_true", help="re-use stored outputs (text or code layout changes only)"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to (default: tutorials/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        filename, _ = NOTEBOOKS[name]
        nb = build(name)
        if args.keep_outputs and not args.execute:
            keep_outputs(nb, args.out / filename)
        try:
            if args.execute:
                seconds = execute(nb)
                print(f"{filename}: executed in {seconds:.0f} s")
        finally:  # a failed run is written too, with the error in its outputs
            nbformat.write(nb, args.out / filename)
            print(f"wrote {args.out / filename}")


if __name__ == "__main__":
    main()
