"""Plots: render with Agg and check what the figure contains (artists, positions, colour limits)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import dataclasses

import anndata as ad
import dask.array as da
import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import EllipseCollection, PathCollection
from matplotlib.image import AxesImage
from scipy import sparse
from shapely.geometry import Point

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc._sdata import micron_transformations
from bitro_sc.pl import _utils as U

MPP = 0.5
H, W = 300, 400
GENES = ["EPCAM", "ERBB2", "CD74", "KRT19", "COL1A2"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _slide(*, multiscale: bool = False, cells: bool = True, labels: bool = True, seed: int = 0):
    """A 400 x 300 px slide (0.5 µm/px): 15 spots of radius 20 px, 40 round cells, labels."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel

    rng = np.random.default_rng(seed)
    img = np.full((3, H, W), 240, np.uint8)
    img[:, 50:250, 50:350] = np.array([200, 120, 190], np.uint8)[:, None, None]  # pink "tissue"
    tf = micron_transformations(MPP)
    image = Image2DModel.parse(
        da.from_array(img, chunks=(3, 128, 128)),
        dims=("c", "y", "x"),
        transformations=tf,
        scale_factors=[2, 2] if multiscale else None,
    )
    xs, ys = np.meshgrid(np.arange(80, 360, 60, dtype=float), np.arange(80, 260, 60, dtype=float))
    xs, ys = xs.ravel(), ys.ravel()
    n = len(xs)
    spots = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": np.full(n, 20.0)}, geometry=[Point(x, y) for x, y in zip(xs, ys, strict=True)]
        ),
        transformations=tf,
    )
    counts = rng.poisson(5, size=(n, len(GENES))).astype(np.float32)
    counts[:, 0] = xs // 10
    obs = pd.DataFrame(
        {K.SPOT_ID: np.arange(n), K.REGION: pd.Categorical([K.SPOTS] * n)}, index=[f"s{i}" for i in range(n)]
    )
    t = ad.AnnData(
        sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES), obsm={K.SPATIAL: np.c_[xs, ys]}
    )
    t.layers[K.PREDICTION] = counts * 100 + 1
    table = TableModel.parse(t, region=K.SPOTS, region_key=K.REGION, instance_key=K.SPOT_ID)
    sdata = SpatialData(images={K.IMAGE: image}, shapes={K.SPOTS: spots}, tables={K.TABLE: table})
    if not cells:
        return sdata
    m = 40
    cx, cy, r = rng.uniform(60, 340, m), rng.uniform(60, 240, m), rng.uniform(4, 8, m)
    ids = np.arange(1, m + 1)
    yy, xx = np.mgrid[0:H, 0:W]
    lab = np.zeros((H, W), np.uint32)
    for i in range(m):
        lab[(xx - cx[i]) ** 2 + (yy - cy[i]) ** 2 <= r[i] ** 2] = ids[i]
    sdata.shapes[K.CELL_SHAPES] = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": r}, geometry=[Point(x, y) for x, y in zip(cx, cy, strict=True)], index=ids
        ),
        transformations=tf,
    )
    if labels:
        sdata.labels[K.CELL_LABELS] = Labels2DModel.parse(lab, dims=("y", "x"), transformations=tf)
    cobs = pd.DataFrame(
        {
            K.CELL_ID: ids,
            K.REGION: pd.Categorical([K.CELL_SHAPES] * m),
            K.X_PX: cx,
            K.Y_PX: cy,
            K.AREA_UM2: np.pi * (r * MPP) ** 2,
            K.PHENOTYPE: pd.Categorical(np.array(["a", "b", "c"])[np.arange(m) % 3]),
        },
        index=ids.astype(str),
    )
    ct = ad.AnnData(np.zeros((m, len(GENES)), np.float32), obs=cobs, var=pd.DataFrame(index=GENES))
    ct.layers[K.PREDICTION] = np.outer(cx, np.arange(1, len(GENES) + 1)).astype(np.float32) / 10
    sdata.tables[K.CELLS] = TableModel.parse(
        ct, region=K.CELL_SHAPES, region_key=K.REGION, instance_key=K.CELL_ID
    )
    return sdata


def _discs(ax) -> EllipseCollection:
    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    return coll


def _measured(sdata, gene):
    t = sdata.tables[K.TABLE]
    x = t.X.toarray()
    return np.log1p(x[:, GENES.index(gene)] / x.sum(1) * 1e4)


# --------------------------------------------------------------------------------------------
# expression
# --------------------------------------------------------------------------------------------
def test_expression_compares_prediction_and_measurement_with_data_colour_limits():
    sdata = _slide(cells=False)
    axes = bs.pl.expression(sdata, "EPCAM")
    assert [a.get_title() for a in axes] == ["EPCAM — predicted", "EPCAM — measured"]
    pred = np.log1p(sdata.tables[K.TABLE].layers[K.PREDICTION][:, 0])
    meas = _measured(sdata, "EPCAM")
    both = np.concatenate([pred, meas])
    for a, expected in zip(axes, [pred, meas], strict=True):
        coll = _discs(a)
        np.testing.assert_allclose(np.asarray(coll.get_array()), expected, rtol=1e-6)
        # spot panels of one gene share one colour scale by default
        np.testing.assert_allclose(coll.get_clim(), (both.min(), both.max()), rtol=1e-6)
        assert any(isinstance(im, AxesImage) for im in a.get_images())
    labels = [a.child_axes[0].get_ylabel() for a in axes]  # colour bars
    assert labels == ["predicted (bitro), log1p CP10k", "measured, log1p CP10k"]
    axes = bs.pl.expression(sdata, "EPCAM", share_scale=False)
    for a, expected in zip(axes, [pred, meas], strict=True):
        np.testing.assert_allclose(_discs(a).get_clim(), (expected.min(), expected.max()), rtol=1e-6)


def test_spots_are_drawn_at_their_centres_with_their_true_radius():
    sdata = _slide(cells=False)
    ax = bs.pl.expression(sdata, "CD74", compare=False)
    coll = _discs(ax)
    shapes = sdata.shapes[K.SPOTS]
    np.testing.assert_allclose(coll.get_offsets(), np.c_[shapes.geometry.x, shapes.geometry.y])
    np.testing.assert_allclose(coll.get_widths(), 2 * shapes["radius"].to_numpy())  # diameters


def test_vmax_number_and_percentile_set_the_colour_limit():
    sdata = _slide(cells=False)
    ax = bs.pl.expression(sdata, "CD74", compare=False, vmin=0, vmax=5.0)
    assert _discs(ax).get_clim() == (0.0, 5.0)
    ax = bs.pl.expression(sdata, "CD74", layer=None, vmax="p50")
    assert _discs(ax).get_clim()[1] == pytest.approx(np.percentile(_measured(sdata, "CD74"), 50))


def test_several_genes_make_a_grid_one_panel_each():
    axes = bs.pl.expression(_slide(cells=False), ["EPCAM", "CD74", "KRT19"], compare=False, ncols=2)
    assert [a.get_title() for a in axes] == [f"{g} — predicted" for g in ("EPCAM", "CD74", "KRT19")]
    assert len(axes[0].get_figure().axes) == 3
    assert [len(a.child_axes) for a in axes] == [1, 1, 1]  # one colour bar each
    axes = bs.pl.expression(_slide(cells=False), ["EPCAM", "CD74"])
    assert len(axes) == 4  # predicted and measured per gene


def test_unknown_gene_error_lists_close_matches():
    with pytest.raises(KeyError, match="EPCAM"):
        bs.pl.expression(_slide(cells=False), "EPCM")
    with pytest.raises(KeyError, match="'ERBB2'"):
        bs.pl.expression(_slide(cells=False), "erbb2")


def test_missing_prediction_layer_names_predict_bitro():
    sdata = _slide(cells=False)
    del sdata.tables[K.TABLE].layers[K.PREDICTION]
    with pytest.raises(KeyError, match="predict_bitro"):
        bs.pl.expression(sdata, "EPCAM")
    ax = bs.pl.expression(sdata, "EPCAM", layer=None)  # measured still works
    assert ax.get_title() == "EPCAM — measured"


def test_crop_um_limits_the_view_and_the_spots_drawn():
    sdata = _slide(cells=False)
    ax = bs.pl.expression(sdata, "EPCAM", compare=False, crop_um=(20, 20, 80, 80))  # px 40..160
    assert ax.get_xlim() == (40.0, 160.0)
    assert ax.get_ylim() == (160.0, 40.0)  # image orientation
    offsets = _discs(ax).get_offsets()
    assert len(offsets) == 4  # spots at x, y in {80, 140}
    assert set(np.unique(offsets)) == {80.0, 140.0}


def test_cell_level_draws_every_cell_and_rejects_measured():
    sdata = _slide()
    axes = bs.pl.expression(sdata, "ERBB2", level="cell")
    assert [a.get_title() for a in axes] == ["ERBB2 — predicted (cells)", "ERBB2 — measured (spots)"]
    cells = sdata.tables[K.CELLS]
    coll = _discs(axes[0])
    np.testing.assert_allclose(coll.get_offsets(), cells.obs[[K.X_PX, K.Y_PX]].to_numpy())
    np.testing.assert_allclose(
        np.asarray(coll.get_array()), np.log1p(cells.layers[K.PREDICTION][:, 1]), rtol=1e-6
    )
    ax = bs.pl.expression(sdata, "ERBB2", level="cell", style="point", compare=False)
    assert isinstance(ax.collections[0], PathCollection)
    with pytest.raises(ValueError, match="no measured expression"):
        bs.pl.expression(sdata, "ERBB2", level="cell", layer=None)


def test_given_axes_and_save(tmp_path):
    sdata = _slide(cells=False)
    _fig, ax = plt.subplots()
    out = bs.pl.expression(sdata, "EPCAM", ax=ax, save=tmp_path / "e.png")
    assert out is ax
    assert len(ax.collections) == 1
    assert (tmp_path / "e.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="2 panel"):
        bs.pl.expression(sdata, "EPCAM", ax=[ax], compare=True)


# --------------------------------------------------------------------------------------------
# image background
# --------------------------------------------------------------------------------------------
def test_image_region_is_downsampled_to_max_px_and_keeps_its_extent():
    sdata = _slide(cells=False)
    data, extent = U.read_region(sdata, K.IMAGE, None, max_px=100)
    assert max(data.shape[:2]) <= 100
    assert data.shape[2] == 3
    assert data.dtype == np.uint8
    assert extent == (0.0, 0.0, 400.0, 300.0)
    assert tuple(data[50, 50]) == (200, 120, 190)  # tissue colour survives block averaging


def test_pyramid_level_is_chosen_instead_of_reading_full_resolution():
    sdata = _slide(multiscale=True, cells=False)
    # levels 400, 200, 100 px wide: scale1 (200 px) is the coarsest with >= max_px / 2 = 150 px
    data, extent = U.read_region(sdata, K.IMAGE, None, max_px=300)
    assert data.shape[:2] == (150, 200)
    assert extent == (0.0, 0.0, 400.0, 300.0)
    data, extent = U.read_region(sdata, K.IMAGE, (100, 100, 200, 150), max_px=2000)
    assert data.shape[:2] == (50, 100)
    assert extent == (100.0, 100.0, 200.0, 150.0)


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------
def test_cells_outlines_take_their_category_colour_and_legend_lists_categories():
    sdata = _slide()
    ax = bs.pl.cells(sdata, crop_um=(0, 0, W * MPP, H * MPP))  # the whole image: overlay = labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    overlay = ax.get_images()[-1].get_array()
    assert overlay.shape[-1] == 4
    lab = np.asarray(sdata.labels[K.CELL_LABELS])
    drawn = overlay[..., 3] > 0
    assert drawn.any()
    assert (lab[drawn] > 0).all()
    tab10 = matplotlib.colormaps["tab10"]
    phen = sdata.tables[K.CELLS].obs[K.PHENOTYPE].to_numpy()
    cell = int(np.bincount(lab[drawn]).argmax())  # the cell with the longest outline
    colours = overlay[drawn & (lab == cell)][:, :3]
    expected = tab10(["a", "b", "c"].index(phen[cell - 1]))[:3]
    np.testing.assert_allclose(colours, np.tile(expected, (len(colours), 1)), atol=1e-6)


def test_cells_without_labels_are_circles_and_numeric_colour_gets_a_colour_bar():
    sdata = _slide(labels=False)
    ax = bs.pl.cells(sdata, color=K.AREA_UM2, crop_um=(30, 30, 200, 150))
    coll = _discs(ax)
    obs = sdata.tables[K.CELLS].obs
    assert len(coll.get_offsets()) == len(obs)  # the crop holds every cell
    assert ax.child_axes[0].get_ylabel() == K.AREA_UM2
    with pytest.raises(ValueError, match="labels element"):
        bs.pl.cells(sdata, style="outline")
    with pytest.raises(KeyError, match="columns"):
        bs.pl.cells(sdata, color="no_such_column")


def test_cells_after_segmentation_alone_draws_outlines_in_one_colour():
    sdata = _slide()
    del sdata.tables[K.CELLS].obs[K.PHENOTYPE]
    ax = bs.pl.cells(sdata)  # default colour: phenotypes, absent here
    overlay = ax.get_images()[-1].get_array()
    drawn = overlay[..., 3] > 0
    assert drawn.sum() > 50
    colours = np.unique(np.asarray(overlay[drawn])[:, :3].round(4), axis=0)
    assert len(colours) == 1
    assert ax.get_title() == "cells"
    assert ax.get_legend() is None


def test_cells_requires_a_cells_table():
    with pytest.raises(KeyError, match=r"bs\.tl\.segment"):
        bs.pl.cells(_slide(cells=False))


# --------------------------------------------------------------------------------------------
# gene_correlation
# --------------------------------------------------------------------------------------------
def _cv_table(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(3):
        for g in range(20):
            base = rng.uniform(0, 0.6)
            rows += [
                {"fold": fold, "method": "bitro", "gene": f"G{g}", "pearson": base + 0.05, "spearman": base},
                {"fold": fold, "method": "ridge", "gene": f"G{g}", "pearson": base, "spearman": base},
                {"fold": fold, "method": "mean", "gene": f"G{g}", "pearson": np.nan, "spearman": np.nan},
            ]
    return pd.DataFrame(rows)


def test_gene_correlation_box_means_and_paired_scatter():
    df = _cv_table()
    box, scatter = bs.pl.gene_correlation(df)
    assert box.get_title() == "pearson per gene"
    assert [t.get_text() for t in box.get_xticklabels()] == [
        "bitro\n(n=20)",
        "ridge\n(n=20)",
        "mean\n(undefined)",
    ]
    per_gene = df.groupby(["method", "gene"])["pearson"].mean()
    means = [t.get_text() for t in box.texts]
    assert means == [f"{per_gene['bitro'].mean():.2f}", f"{per_gene['ridge'].mean():.2f}"]
    assert box.get_ylabel() == "Pearson r per gene (mean over 3 folds)"
    assert scatter.get_title() == "bitro vs ridge"
    better = scatter.collections[0]
    assert len(better.get_offsets()) == 20  # bitro is above the diagonal for every gene
    assert [t.get_text() for t in scatter.get_legend().get_texts()] == [
        "bitro better (20)",
        "ridge better (0)",
    ]


def test_gene_correlation_accepts_evaluate_tables_by_name_and_one_table():
    genes = pd.Index(["A", "B", "C"], name="gene")
    a = pd.DataFrame({"pearson": [0.5, 0.2, 0.1], "spearman": [0.4, 0.2, 0.1]}, index=genes)
    b = pd.DataFrame({"pearson": [0.6, 0.1, 0.3], "spearman": [0.4, 0.2, 0.1]}, index=genes)
    _box, scatter = bs.pl.gene_correlation({"bitro": a, "ridge": b}, metric="pearson")
    x, y = scatter.collections[0].get_offsets().T  # genes where bitro is better: B
    assert list(x) == [0.1]
    assert list(y) == [0.2]
    ax = bs.pl.gene_correlation(a)
    assert ax.get_title() == "pearson per gene"
    assert len(ax.texts) == 1
    with pytest.raises(ValueError, match="two methods"):
        bs.pl.gene_correlation(a, kind="scatter")
    with pytest.raises(KeyError, match="not in the results"):
        bs.pl.gene_correlation(_cv_table(), methods=["bitro", "hest"])


# --------------------------------------------------------------------------------------------
# history
# --------------------------------------------------------------------------------------------
HIST = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.0 / (e + 1) + 0.02 * e} for e in range(10)]


def test_history_draws_both_curves_and_marks_the_best_epoch():
    ax = bs.pl.history(HIST)
    train, val = ax.get_lines()[:2]
    np.testing.assert_allclose(train.get_ydata(), [h["train_loss"] for h in HIST])
    np.testing.assert_allclose(val.get_ydata(), [h["val_loss"] for h in HIST])
    best = int(np.argmin([h["val_loss"] for h in HIST]))
    star = ax.collections[0].get_offsets()[0]
    assert tuple(star) == (best, HIST[best]["val_loss"])
    assert ax.get_xlabel() == "epoch"
    assert ax.get_title() == "training history"


def test_history_reads_the_run_record_of_a_table_and_its_best_epoch():
    sdata = _slide(cells=False)
    sdata.tables[K.TABLE].uns[K.RUN] = {
        "history": HIST,
        "best_epoch": 2,
        "config": {"train": {"loss": "mse"}},
    }
    ax = bs.pl.history(sdata)
    assert tuple(ax.collections[0].get_offsets()[0]) == (2, HIST[2]["val_loss"])
    assert ax.get_ylabel() == "loss (mse)"

    class Model:
        def __init__(self) -> None:
            self.record = {"history": HIST[:3]}

    assert len(bs.pl.history(Model()).get_lines()[0].get_xdata()) == 3
    with pytest.raises(KeyError, match="predict_bitro"):
        bs.pl.history(_slide(cells=False))


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_her2st_whole_slide_is_shown_downsampled_with_every_spot(her2st_dir):
    d = her2st_dir
    sdata = bs.io.read_st(d / "C2_HE.jpg", d / "C2_counts.tsv.gz", d / "C2_selection.tsv")
    ax = bs.pl.expression(sdata, "ERBB2", layer=None)
    (image,) = ax.get_images()
    assert max(image.get_array().shape[:2]) <= U.MAX_DISPLAY_PX
    coll = _discs(ax)
    table = sdata.tables[K.TABLE]
    np.testing.assert_allclose(coll.get_offsets(), table.obsm[K.SPATIAL], atol=1e-6)
    # 100 µm spots: diameter in pixels = 100 / mpp
    mpp = bs._sdata.get_mpp(sdata, K.IMAGE)
    np.testing.assert_allclose(coll.get_widths(), 100.0 / mpp, rtol=1e-6)
    # the image spans the spots: every spot centre lies inside the displayed extent
    x0, x1, y1, y0 = image.get_extent()
    xy = table.obsm[K.SPATIAL]
    assert (xy[:, 0] > x0).all()
    assert (xy[:, 0] < x1).all()
    assert (xy[:, 1] > y0).all()
    assert (xy[:, 1] < y1).all()


@pytest.mark.slow
def test_plots_follow_the_contract_of_synthetic_slides_and_segment():
    sdata = bs.datasets.synthetic(kind="visium", seed=0, size_um=300)
    bs.tl.segment(sdata, progress=False)
    table = sdata.tables[K.TABLE]
    gene = str(table.var_names[0])
    ax = bs.pl.expression(sdata, gene, layer=None)
    np.testing.assert_allclose(_discs(ax).get_offsets(), table.obsm[K.SPATIAL], atol=1e-6)
    np.testing.assert_allclose(np.asarray(_discs(ax).get_array()), _measured_of(table, gene), rtol=1e-5)
    ax = bs.pl.cells(sdata, color=K.AREA_UM2, style="outline")
    overlay = ax.get_images()[-1]
    lab = np.asarray(sdata.labels[K.CELL_LABELS])
    x0, x1, y1, y0 = overlay.get_extent()
    rgba = overlay.get_array()
    # the overlay is at full resolution here: its outline pixels lie on labelled nuclei
    assert rgba.shape[:2] == (round(y1 - y0), round(x1 - x0))
    sub = lab[int(y0) : int(y0) + rgba.shape[0], int(x0) : int(x0) + rgba.shape[1]]
    drawn = rgba[..., 3] > 0
    assert drawn.sum() > 100
    assert (sub[drawn] > 0).all()


def _measured_of(table, gene):
    x = table.X.toarray() if sparse.issparse(table.X) else np.asarray(table.X)
    lib = x.sum(1)
    return np.log1p(x[:, list(table.var_names).index(gene)] / np.where(lib > 0, lib, 1) * 1e4)


def test_spots_without_prediction_are_grey_and_ignored_by_the_colour_limits():
    sdata = _slide(cells=False)
    pred = sdata.tables[K.TABLE].layers[K.PREDICTION]
    pred[0, 0] = np.nan  # a spot that holds no cell
    ax = bs.pl.expression(sdata, "EPCAM", compare=False)
    coll = _discs(ax)
    expected = np.log1p(pred[1:, 0])
    assert coll.get_clim() == pytest.approx((expected.min(), expected.max()))
    coll.update_scalarmappable()
    assert tuple(coll.get_facecolors()[0][:3]) == pytest.approx(matplotlib.colors.to_rgb("lightgrey"))


def test_comparison_is_all_or_nothing_across_genes():
    sdata = _slide()
    cells = sdata.tables[K.CELLS]
    sdata.tables[K.CELLS] = ad.AnnData(
        np.zeros((cells.n_obs, 2), np.float32),
        obs=cells.obs,
        var=pd.DataFrame(index=["EPCAM", "NOVEL1"]),
        layers={K.PREDICTION: np.ones((cells.n_obs, 2), np.float32)},
        uns=cells.uns,
    )
    axes = bs.pl.expression(sdata, ["EPCAM", "NOVEL1"], level="cell")  # NOVEL1 was never measured
    assert [a.get_title() for a in axes] == ["EPCAM — predicted (cells)", "NOVEL1 — predicted (cells)"]
    with pytest.raises(KeyError, match="NOVEL1"):
        bs.pl.expression(sdata, ["EPCAM", "NOVEL1"], level="cell", compare=True)


def test_cells_palette_from_uns_and_from_the_user():
    sdata = _slide(labels=False)
    sdata.tables[K.CELLS].uns[f"{K.PHENOTYPE}_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    ax = bs.pl.cells(sdata)
    handles = ax.get_legend().legend_handles
    assert [matplotlib.colors.to_hex(h.get_markerfacecolor()) for h in handles] == [
        "#ff0000",
        "#00ff00",
        "#0000ff",
    ]
    ax = bs.pl.cells(sdata, palette={"a": "black", "b": "white", "c": "gray"})
    assert matplotlib.colors.to_hex(ax.get_legend().legend_handles[0].get_markerfacecolor()) == "#000000"
    with pytest.raises(ValueError, match="2 colours for 3 categories"):
        bs.pl.cells(sdata, palette=["red", "blue"])


def test_holdout_figure_has_a_cell_panel_when_cell_scores_are_given(tmp_path):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(8)]
    scores = pd.DataFrame(
        {
            "fold": 0,
            "test_group": "holdout",
            "sample": "S2",
            "method": np.repeat(["bitro", "ridge"], len(genes)),
            "gene": genes * 2,
            "pearson": rng.uniform(0, 1, 2 * len(genes)),
            "spearman": rng.uniform(0, 1, 2 * len(genes)),
            "n": 30,
            "is_hvg": True,
        }
    )
    cells = scores[["sample", "method", "gene", "pearson", "spearman"]].copy()
    res = bs.tl.Holdout(
        scores=scores,
        models={"bitro": None, "ridge": None},
        genes=genes,
        hvgs=genes,
        train=["S0", "S1"],
        test=["S2"],
        cell_scores=cells,
    )
    fig = bs.pl.holdout(res, title="t", save=tmp_path / "sub" / "h.png")
    assert len(fig.axes) == 2
    assert (tmp_path / "sub" / "h.png").stat().st_size > 1000
    plt.close(fig)
    fig = bs.pl.holdout(dataclasses.replace(res, cell_scores=None))
    assert len(fig.axes) == 1
    plt.close(fig)
    with pytest.raises(TypeError, match=r"output of `bs\.tl\.holdout`"):
        bs.pl.holdout(scores)


# --------------------------------------------------------------------------------------------
# newcomer options: not-predicted genes, image style, smoothed field
# --------------------------------------------------------------------------------------------
def test_a_gene_the_model_did_not_predict_gets_one_message_at_spot_and_cell_level():
    from bitro_sc.pl._expression import GeneNotPredictedError

    sdata = _slide()
    spots = sdata.tables[K.TABLE]
    spots.layers[K.PREDICTION][:, GENES.index("EPCAM")] = np.nan  # spot level: a NaN column
    cells = sdata.tables[K.CELLS]
    sdata.tables[K.CELLS] = cells[:, [g for g in GENES if g != "EPCAM"]].copy()  # cell level: no column
    messages = []
    for level in ("spot", "cell"):
        with pytest.raises(GeneNotPredictedError, match="'EPCAM' was not predicted") as err:
            bs.pl.expression(sdata, "EPCAM", level=level)
        messages.append(str(err.value).replace("'cells'", "'table'"))
        assert isinstance(err.value, KeyError)
        assert isinstance(err.value, ValueError)
        assert "genes=" in str(err.value)
    assert messages[0] == messages[1]
    with pytest.raises(KeyError, match="did you mean"):  # a gene that is nowhere: close matches
        bs.pl.expression(sdata, "EPCM", level="cell")


def test_image_under_values_is_grey_and_dimmed_by_default_and_in_colour_on_request():
    sdata = _slide(cells=False)
    ax = bs.pl.expression(sdata, "EPCAM", compare=False)
    (image,) = ax.get_images()
    assert image.get_array().ndim == 2  # luminance
    assert image.get_cmap().name == "gray"
    assert image.get_alpha() == pytest.approx(0.6)
    ax = bs.pl.expression(sdata, "EPCAM", compare=False, img_cmap=None, img_alpha=1.0)
    (image,) = ax.get_images()
    assert image.get_array().shape[-1] == 3
    with pytest.raises(ValueError, match="img_alpha"):
        bs.pl.expression(sdata, "EPCAM", img_alpha=2.0)
    with pytest.raises(ValueError, match="img_cmap"):
        bs.pl.expression(sdata, "EPCAM", img_cmap="no-such-map")


def test_smooth_style_draws_binned_means_of_the_cells():
    sdata = _slide()
    ax = bs.pl.expression(sdata, "ERBB2", level="cell", style="smooth", bin_um=20.0, compare=False)
    field = ax.get_images()[-1]
    arr = np.ma.masked_invalid(np.ma.filled(field.get_array(), np.nan))
    cells = sdata.tables[K.CELLS]
    values = np.log1p(cells.layers[K.PREDICTION][:, 1])
    # a smoothed mean lies within the range of the values it averages, and fills the cells' area
    assert arr.count() > 10
    assert arr.min() >= values.min() - 1e-9
    assert arr.max() <= values.max() + 1e-9
    assert field.get_clim() == pytest.approx((values.min(), values.max()))
    x0, x1, _, _ = field.get_extent()
    assert (x1 - x0) % (20.0 / MPP) == pytest.approx(0.0)  # whole bins of 40 px
    with pytest.raises(ValueError, match="bin_um"):
        bs.pl.expression(sdata, "ERBB2", level="cell", style="smooth", bin_um=0)
