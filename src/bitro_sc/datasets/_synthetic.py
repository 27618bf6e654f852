"""Realistic synthetic H&E slides with spot / bulk expression and cell-level truth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from .. import _keys as K
from .. import _sdata
from ..io._common import spot_shapes, spot_table
from ._synth_expr import PROGRAMS, cell_expression, covariates, gene_model
from ._synth_tissue import CELL_TYPES, REGIONS, SlidePlan, plan_slide

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData

Kind = Literal["visium", "st", "bulk"]

#: spot diameter and centre-to-centre pitch (µm) of each platform
_SPOT_GEOMETRY = {"visium": (55.0, 100.0), "st": (100.0, 200.0)}
#: expected UMIs of an average cell (before the cell-type RNA factor) per platform
_UMI_PER_CELL = {"visium": 60.0, "st": 25.0, "bulk": 60.0}
#: images with more pixels than this are generated lazily by default
_LAZY_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class SyntheticTruth:
    """Cell-level truth of one synthetic slide (never stored in the SpatialData).

    Attributes
    ----------
    labels
        ``(y, x)`` uint32 nucleus labels aligned with the image (0 = no nucleus, value = ``cell_id``);
        a numpy array, or a dask array for slides generated lazily.
    cells
        One row per cell: ``cell_id``, ``cell_type`` (categorical: tumour, fibroblast, lymphocyte,
        macrophage, endothelial), ``region`` (tissue region, categorical: tumour, stroma, immune),
        ``x_px``, ``y_px`` (centroid of the visible part of the nucleus in array-index pixel
        coordinates — pixel centres at integers, as skimage's ``regionprops`` and Space Ranger; the
        spots use the same convention), ``x_um``, ``y_um`` (= pixels × ``mpp``), ``area_um2``
        (visible nucleus area: its pixel count in ``labels`` × mpp²), ``major_axis_um``,
        ``minor_axis_um``, ``depth_um`` (signed distance to the nearest tumour-nest border, > 0
        inside a nest), ``spot_id`` (spot whose disc holds the centroid; -1 when none) and the
        ``program_*`` covariates that drive the spatial / state gene programs.
    expression
        AnnData, cells × genes: raw counts in ``X`` (CSR, float32 holding integers), the noise-free
        expected counts in ``layers["rate"]``, ``obs`` = ``cells``, ``obsm["spatial"]`` in pixels
        (µm in obs ``x_um``/``y_um``).
    sample_id, patient_id
        Slide identity, as in the SpatialData.
    mpp
        Pixel size of the image and labels (µm per pixel).
    params
        Slide parameters: patient tumour / immune fractions, stain vectors, kind.
    """

    labels: Any
    cells: pd.DataFrame
    expression: ad.AnnData
    sample_id: str
    patient_id: str
    mpp: float
    params: dict[str, Any] = field(default_factory=dict)


def _check_kind(kind: str) -> None:
    if kind not in get_args(Kind):
        raise ValueError(f"`kind` must be one of {get_args(Kind)}, got {kind!r}.")


def _default_patients(n_slides: int) -> int:
    # at least two slides per patient once there are enough slides to split by patient
    return n_slides if n_slides < 4 else n_slides // 2


def synthetic(
    n_slides: int = 1,
    *,
    kind: Kind = "visium",
    seed: int = 0,
    return_truth: bool = False,
    size_um: float | tuple[float, float] = 1200.0,
    mpp: float = 0.5,
    n_genes: int = 200,
    n_patients: int | None = None,
    gene_seed: int | None = None,
    umi_per_cell: float | None = None,
    with_bulk: bool = False,
    lazy: bool | None = None,
    chunk_px: int = 2048,
    density_scale: float = 1.0,
    blur_um: float = 0.45,
    noise_sd: float = 3.0,
) -> Any:
    """Simulate H&E slides with spatial (or bulk) expression and keep the cell-level truth.

    Each slide is a piece of breast-carcinoma-like tissue on glass: tumour nests, fibrous stroma
    and immune infiltrate, with five cell types whose nuclei differ as in real H&E (large pale
    vesicular tumour nuclei with nucleoli, thin dark fibroblast and endothelial nuclei, small round
    dense lymphocytes, bean-shaped macrophages), cytoplasm, capillaries with red blood cells,
    touching and overlapping nuclei, slide-to-slide stain variation, blur and sensor noise, at
    about 2,800 nuclei per mm² of tissue. Expression follows cell type, nucleus size and
    neighbourhood (programs for hypoxia deep inside nests, interferon near lymphocytes,
    cancer-associated fibroblasts next to nests, proliferation with nucleus size, a gradient across
    the slide) plus invisible patient effects, with log-normal size factors and negative-binomial
    counts. A spot's counts are the sum over the
    cells whose (visible-nucleus) centroid lies in its disc; bulk is the sum over all cells.

    Parameters
    ----------
    n_slides
        Number of slides; sample ids ``"S0"``, ``"S1"``, …
    kind
        ``"visium"``: 55 µm spots on a 100 µm hexagonal grid; ``"st"``: 100 µm spots on a 200 µm
        square grid (legacy ST); ``"bulk"``: no spots, one expression row per slide.
    seed
        Everything is a deterministic function of ``seed`` (and the other arguments).
    return_truth
        Also return a :class:`SyntheticTruth` per slide: ``(sdata, truth)`` pairs.
    size_um
        Side of the square slide, or ``(height, width)``, in µm. 300 makes a tiny slide for tests,
        1200 (default) a demo slide, ≥ 10,000 at ``mpp=0.5`` a whole-slide-sized one (lazy).
    mpp
        Pixel size of the rendered image (µm per pixel).
    n_genes
        Number of genes: real marker symbols first (EPCAM, KRT19, COL1A2, PTPRC, CD68, PECAM1,
        housekeeping and program genes), then synthetic ``SYN00001``…
    n_patients
        Number of patients the slides come from (slide ``i`` belongs to patient ``i % n_patients``);
        default: one per slide below four slides, otherwise ``n_slides // 2`` (≥ 2 slides each).
    gene_seed
        Seed of the gene model (each gene's baseline per cell type and its program effects); default
        ``seed``. Two cohorts with the same ``gene_seed`` and different ``seed`` values share one biology
        in different patients and slides: e.g. bulk slides to train a base on and spot slides to
        transfer it to.
    umi_per_cell
        Expected UMIs of an average cell; default 60 for Visium, 25 for ST (≈ the depth of those
        platforms over the simulated genes).
    with_bulk
        For ``"visium"`` / ``"st"``, also add the slide's bulk table ``"bulk"``.
    lazy
        Render the image (and the truth labels) lazily, block by block with dask; default: when the
        image has more than 8192² pixels. Lazy and eager pixels are identical.
    chunk_px
        Dask chunk size (pixels) of the image and labels.
    density_scale
        Multiplies the cell density of every region.
    blur_um, noise_sd
        Optical blur (Gaussian sd, µm) and sensor noise (sd, 8-bit levels).

    Returns
    -------
    A SpatialData (or a list of ``n_slides`` of them) with image ``"he"`` (RGB uint8, dask, pixel
    size recorded), and for spatial kinds shapes ``"spots"`` + table ``"table"`` (spots over tissue
    only, raw counts), for ``"bulk"`` table ``"bulk"``. With ``return_truth=True``, ``(sdata,
    truth)`` pairs instead.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata, truth = bs.datasets.synthetic(size_um=300, return_truth=True)
    >>> sorted(sdata.tables), sorted(sdata.shapes)
    (['table'], ['spots'])
    >>> int(truth.labels.max()) == len(truth.cells)
    True
    >>> slides = bs.datasets.synthetic(4, kind="bulk", size_um=300)  # 4 slides, 2 patients
    """
    _check_kind(kind)
    if not isinstance(n_slides, int | np.integer) or n_slides < 1:
        raise ValueError(f"`n_slides` must be a positive integer, got {n_slides!r}.")
    if not mpp > 0:
        raise ValueError(f"`mpp` must be a positive number of µm per pixel, got {mpp!r}.")
    if n_genes < 1:
        raise ValueError(f"`n_genes` must be at least 1, got {n_genes!r}.")
    height_um, width_um = (float(size_um), float(size_um)) if np.isscalar(size_um) else map(float, size_um)  # type: ignore[arg-type]
    if min(height_um, width_um) < 50.0:
        raise ValueError(f"`size_um` must be at least 50 µm per side, got {size_um!r}.")
    n_patients = _default_patients(n_slides) if n_patients is None else int(n_patients)
    if not 1 <= n_patients <= n_slides:
        raise ValueError(f"`n_patients` must be between 1 and n_slides={n_slides}, got {n_patients}.")
    if gene_seed is not None and not isinstance(gene_seed, int | np.integer):
        raise ValueError(f"`gene_seed` must be an integer or None, got {gene_seed!r}.")
    if chunk_px < 64:
        raise ValueError(f"`chunk_px` must be at least 64 pixels, got {chunk_px}.")
    for name, value in (("density_scale", density_scale), ("blur_um", blur_um), ("noise_sd", noise_sd)):
        if not value >= 0:
            raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    umi = _UMI_PER_CELL[kind] if umi_per_cell is None else float(umi_per_cell)

    biology = seed if gene_seed is None else int(gene_seed)
    genes = gene_model(n_genes, np.random.default_rng(np.random.SeedSequence([biology, 0])))
    out = []
    for i in range(n_slides):
        p = i % n_patients
        prng = np.random.default_rng(np.random.SeedSequence([seed, 1, p]))
        patient = {
            "tumour_fraction": float(prng.uniform(0.2, 0.35)),
            "immune_fraction": float(prng.uniform(0.08, 0.22)),
            "offset": prng.normal(0.0, genes.patient_sd),
        }
        sdata, truth = _one_slide(
            sample_id=f"S{i}",
            patient_id=f"P{p}",
            rng=np.random.default_rng(np.random.SeedSequence([seed, 2, i])),
            patient=patient,
            genes=genes,
            kind=kind,
            height_um=height_um,
            width_um=width_um,
            mpp=float(mpp),
            umi=umi,
            with_bulk=with_bulk,
            lazy=lazy,
            chunk_px=int(chunk_px),
            density_scale=density_scale,
            blur_um=blur_um,
            noise_sd=noise_sd,
        )
        out.append((sdata, truth) if return_truth else sdata)
    return out[0] if n_slides == 1 else out


# -------------------------------------------------------------------------------------------
def _render_image(plan: SlidePlan, *, lazy: bool, chunk_px: int) -> tuple[Any, Any]:
    """Image (dask, (3, y, x) uint8) and truth labels (numpy when eager, dask when lazy)."""
    import dask.array as da

    h, w = plan.height_px, plan.width_px
    if not lazy:
        import os
        from concurrent.futures import ThreadPoolExecutor

        img = np.empty((3, h, w), np.uint8)
        labels = np.empty((h, w), np.uint32)
        tile = 2048
        tiles = [(y0, x0) for y0 in range(0, h, tile) for x0 in range(0, w, tile)]

        def _tile(yx: tuple[int, int]) -> None:  # the kernels release the GIL: tiles run in threads
            y0, x0 = yx
            th, tw = min(tile, h - y0), min(tile, w - x0)
            rgb, lab = plan.render(y0, x0, th, tw)
            img[:, y0 : y0 + th, x0 : x0 + tw] = rgb
            assert lab is not None
            labels[y0 : y0 + th, x0 : x0 + tw] = lab

        workers = min(len(tiles), os.cpu_count() or 1, 4)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(_tile, tiles))
        else:
            for yx in tiles:
                _tile(yx)
        return da.from_array(img, chunks=(3, chunk_px, chunk_px)), labels

    ychunks = _chunks(h, chunk_px)
    xchunks = _chunks(w, chunk_px)

    def _img_block(block_info: dict | None = None) -> np.ndarray:
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]  # type: ignore[index]
        rgb, _ = plan.render(y0, x0, y1 - y0, x1 - x0, with_labels=False)
        return rgb

    def _lab_block(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"]  # type: ignore[index]
        return plan.render_labels(y0, x0, y1 - y0, x1 - x0)

    img = da.map_blocks(
        _img_block, dtype=np.uint8, chunks=((3,), ychunks, xchunks), meta=np.empty((0, 0, 0), np.uint8)
    )
    labels = da.map_blocks(
        _lab_block, dtype=np.uint32, chunks=(ychunks, xchunks), meta=np.empty((0, 0), np.uint32)
    )
    return img, labels


def _chunks(n: int, c: int) -> tuple[int, ...]:
    return tuple([c] * (n // c) + ([n % c] if n % c else []))


def _spot_layout(plan: SlidePlan, kind: str) -> pd.DataFrame:
    """Spots over tissue: centre (µm and px), array row/col, barcode."""
    import pandas as pd

    diameter, pitch = _SPOT_GEOMETRY[kind]
    rad = diameter / 2
    h_um, w_um = plan.height_px * plan.mpp, plan.width_px * plan.mpp
    rows = []
    if kind == "visium":
        dy = pitch * math.sqrt(3) / 2
        r = 0
        while rad + 2 + r * dy <= h_um - rad - 2:
            y = rad + 2 + r * dy
            c = r % 2
            while rad + 2 + c * pitch / 2 <= w_um - rad - 2:
                rows.append((r, c, rad + 2 + c * pitch / 2, y))
                c += 2
            r += 1
    else:
        r = 0
        while rad + 2 + r * pitch <= h_um - rad - 2:
            c = 0
            while rad + 2 + c * pitch <= w_um - rad - 2:
                rows.append((r + 1, c + 1, rad + 2 + c * pitch, rad + 2 + r * pitch))
                c += 1
            r += 1
    df = pd.DataFrame(rows, columns=["array_row", "array_col", "x_um", "y_um"])
    if len(df):
        (tis,) = plan.fields_at(
            df["y_um"].to_numpy() / plan.mpp, df["x_um"].to_numpy() / plan.mpp, ("tissue",)
        )
        df = df[tis > 0.5].reset_index(drop=True)
    df["x_px"] = df["x_um"] / plan.mpp
    df["y_px"] = df["y_um"] / plan.mpp
    df["radius_px"] = rad / plan.mpp
    if kind == "visium":
        df["name"] = [_barcode(int(r), int(c)) for r, c in zip(df["array_row"], df["array_col"], strict=True)]
    else:
        df["name"] = [f"{c}x{r}" for r, c in zip(df["array_row"], df["array_col"], strict=True)]
    return df


def _barcode(row: int, col: int) -> str:
    v = (((row << 12) + col) * 2654435761) % (1 << 32)  # a bijection for col < 4096
    return "".join("ACGT"[(v >> (2 * k)) & 3] for k in range(16)) + "-1"


def _cells_frame(plan: SlidePlan, cov: np.ndarray, depth: np.ndarray) -> pd.DataFrame:
    import pandas as pd

    c = plan.cells
    m = plan.mpp
    df = pd.DataFrame(
        {
            K.CELL_ID: c["cell_id"].astype(np.int64),
            "cell_type": pd.Categorical.from_codes(c["kind"], categories=list(CELL_TYPES)),
            K.REGION: pd.Categorical.from_codes(c["region"], categories=list(REGIONS)),
            K.X_PX: c["x_px"],
            K.Y_PX: c["y_px"],
            K.X_UM: c["x_px"] * m,
            K.Y_UM: c["y_px"] * m,
            K.AREA_UM2: c["area_px"] * m * m,
            "major_axis_um": 2 * c["a"] * m,
            "minor_axis_um": 2 * c["b"] * m,
            "depth_um": depth,
        }
    )
    for j, name in enumerate(PROGRAMS):
        df[f"program_{name}"] = cov[:, j]
    df.index = df[K.CELL_ID].astype(str)
    return df


def _one_slide(
    *,
    sample_id: str,
    patient_id: str,
    rng: np.random.Generator,
    patient: dict[str, Any],
    genes: Any,
    kind: str,
    height_um: float,
    width_um: float,
    mpp: float,
    umi: float,
    with_bulk: bool,
    lazy: bool | None,
    chunk_px: int,
    density_scale: float,
    blur_um: float,
    noise_sd: float,
) -> tuple[SpatialData, SyntheticTruth]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    from scipy import ndimage
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, TableModel

    plan = plan_slide(
        height_um=height_um,
        width_um=width_um,
        mpp=mpp,
        rng=rng,
        tumour_fraction=patient["tumour_fraction"],
        immune_fraction=patient["immune_fraction"],
        density_scale=density_scale,
        blur_um=blur_um,
        noise_sd=noise_sd,
    )
    c = plan.cells
    n_cells = len(c["cell_id"])
    depth = ndimage.map_coordinates(
        plan.depth_um,
        np.stack([c["y_px"] * mpp / plan.grid_um, c["x_px"] * mpp / plan.grid_um]),
        order=1,
        mode="nearest",
    )
    cov = covariates(c, depth_um=depth, width_um=width_um, mpp=mpp)
    area = c["area_px"] * mpp * mpp
    type_mean = np.array([area[c["kind"] == t].mean() if (c["kind"] == t).any() else 1.0 for t in range(5)])
    rate, counts = cell_expression(
        genes,
        c["kind"],
        cov,
        area / type_mean[c["kind"]] if n_cells else area,
        patient["offset"],
        umi_per_cell=umi,
        rng=rng,
    )
    cells = _cells_frame(plan, cov, depth)

    # --- spots and the cell -> spot assignment ---------------------------------------------------
    spot_df = None
    spot_of_cell = np.full(n_cells, -1, np.int64)
    if kind in _SPOT_GEOMETRY:
        from scipy.spatial import cKDTree

        spot_df = _spot_layout(plan, kind)
        if not len(spot_df):
            raise ValueError(
                f"No {kind!r} spot lies over tissue on synthetic slide {sample_id} "
                f"({height_um:g} × {width_um:g} µm). Use a larger `size_um` (≥ 300 µm is safe), "
                "another `seed`, or `kind='bulk'`."
            )
        if len(spot_df) and n_cells:
            d, j = cKDTree(spot_df[["x_px", "y_px"]].to_numpy()).query(np.c_[c["x_px"], c["y_px"]])
            inside = d <= spot_df["radius_px"].to_numpy()[0]
            spot_of_cell[inside] = j[inside]
    cells["spot_id"] = spot_of_cell

    counts_csr = sp.csr_matrix(counts)
    expr = ad.AnnData(X=counts_csr, obs=cells.copy(), var=pd.DataFrame(index=pd.Index(genes.names)))
    expr.layers["rate"] = rate
    expr.obsm[K.SPATIAL] = cells[[K.X_PX, K.Y_PX]].to_numpy()  # pixels, as on the slide's tables

    # --- image -------------------------------------------------------------------------------------
    lazy_ = (plan.height_px * plan.width_px > _LAZY_PIXELS) if lazy is None else bool(lazy)
    img, labels = _render_image(plan, lazy=lazy_, chunk_px=chunk_px)
    scale_factors = []
    side = max(plan.height_px, plan.width_px)
    while lazy_ and side > 4096:
        scale_factors.append(2)
        side //= 2
    image = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=_sdata.micron_transformations(mpp),
        scale_factors=scale_factors or None,
        chunks=(3, chunk_px, chunk_px) if scale_factors else None,
    )
    sdata = SpatialData(images={K.IMAGE: image})
    _sdata.set_mpp(sdata, K.IMAGE, mpp, source="synthetic")
    _sdata.set_slide_info(sdata, sample_id=sample_id, patient_id=patient_id)

    gene_index = pd.Index(genes.names)
    if spot_df is not None:
        n_spots = len(spot_df)
        assign = sp.csr_matrix(
            (
                np.ones(int((spot_of_cell >= 0).sum()), np.float32),
                (spot_of_cell[spot_of_cell >= 0], np.flatnonzero(spot_of_cell >= 0)),
            ),
            shape=(n_spots, n_cells),
        )
        spot_counts = sp.csr_matrix((assign @ counts_csr).astype(np.float32))
        xy_px = spot_df[["x_px", "y_px"]].to_numpy()
        sdata.shapes[K.SPOTS] = spot_shapes(xy_px, radius_px=float(spot_df["radius_px"].iloc[0]), mpp=mpp)
        sdata.tables[K.TABLE] = spot_table(
            counts=spot_counts,
            barcodes=spot_df["name"].to_numpy(),
            genes=gene_index,
            xy_px=xy_px,
            sample_id=sample_id,
            patient_id=patient_id,
            array_row=spot_df["array_row"].to_numpy(),
            array_col=spot_df["array_col"].to_numpy(),
            mpp=mpp,
        )
    if kind == "bulk" or with_bulk:
        bulk_x = np.asarray(counts_csr.sum(axis=0), dtype=np.float32).reshape(1, -1)
        obs = pd.DataFrame(
            {K.SAMPLE_ID: [sample_id], K.PATIENT_ID: [patient_id]}, index=pd.Index([sample_id])
        )
        bulk = ad.AnnData(X=bulk_x, obs=obs, var=pd.DataFrame(index=gene_index.copy()))
        sdata.tables[K.BULK] = TableModel.parse(bulk)

    truth = SyntheticTruth(
        labels=labels,
        cells=cells,
        expression=expr,
        sample_id=sample_id,
        patient_id=patient_id,
        mpp=mpp,
        params={
            "tumour_fraction": patient["tumour_fraction"],
            "immune_fraction": patient["immune_fraction"],
            "stain": plan.stain.copy(),
            "kind": kind,
        },
    )
    return sdata, truth
