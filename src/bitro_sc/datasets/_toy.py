"""`bs.datasets.toy`: tiny contract slides with known truth, built in milliseconds.

For tests, examples and benchmarks.

Four kinds, one builder each (all deterministic in ``seed``):

- ``"cells"``: no image. Spots, segmented cells with features, phenotypes, µm centroids, a kNN
  graph and spot assignment, and a one-row bulk table. Truth: expected counts per cell and gene.
- ``"nuclei"``: an H&E-like image with elliptical nuclei of two types on a jittered grid, the cells
  written from the true label image, and spots. Truth: the nucleus type per cells-table row.
- ``"image"``: an H&E-like image only (pink tissue, dark nuclei, optional glass). Truth: the label
  image of the nuclei.
- ``"mixture"``: spots holding 0-8 cells of three types whose features reveal the type; spots are
  points on a line and the cells table annotates no element. Truth: expression per cell (AnnData).

:func:`realistic slides <bitro_sc.datasets.synthetic>` are the other data set of this module.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from .. import _keys as K
from .._cells import write_cells
from .._sdata import micron_transformations, set_slide_info

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

ToyKind = Literal["cells", "nuclei", "image", "mixture"]

#: "nuclei": RGB of the two nucleus types, dark large nuclei (0) and pale small ones (1)
_TYPE_RGB = np.array([[70, 40, 130], [150, 110, 185]], dtype=np.float64)
_TYPE_SEMI_AXES_UM = np.array([[5.0, 3.5], [2.6, 2.4]])
#: "image": stroma and nucleus RGB
_PINK = np.array([236, 178, 214], np.float32)
_NUCLEUS = np.array([88, 60, 150], np.float32)
#: "mixture": cell types, feature dimensions and genes (``"G0"`` … ``"G24"``)
MIXTURE_TYPES, MIXTURE_FEATURES, MIXTURE_GENES = 3, 6, 25


def toy(
    kind: ToyKind = "cells", *, seed: int = 0, return_truth: bool = False, **options: Any
) -> SpatialData | tuple[SpatialData, Any]:
    """A tiny slide following the data contract, with its truth.

    Parameters
    ----------
    kind
        ``"cells"`` (no image; spots, cells with features / phenotypes / graph, bulk: for models),
        ``"nuclei"`` (image with two nucleus types, cells written from the true labels, spots: for
        encoders and phenotypes), ``"image"`` (image only: for segmentation) or ``"mixture"``
        (spots of 0-8 cells of three types, no geometry: for baselines and evaluation).
    seed
        Seed of everything random; the same arguments give the same slide.
    return_truth
        Also return the truth: ``"cells"``: expected counts (cells × genes, before Poisson
        sampling, rows in cells-table order); ``"nuclei"``: the nucleus type (0 / 1) per
        cells-table row; ``"image"``: the ``(y, x)`` uint32 nucleus label image; ``"mixture"``: an
        AnnData of expected expression per cell (cells-table rows × genes).
    **options
        Options of the kind (other names raise):

        - ``"cells"``: ``grid=8`` (spots per side), ``spacing_um=100.0``, ``radius_um=30.0``,
          ``n_genes=40`` (plus gene ``"other"``), ``n_types=4``, ``n_features=16``,
          ``sample_id=f"toy{seed}"``, ``patient_id=f"patient{seed}"``.
        - ``"nuclei"``: ``size_px=320``, ``mpp=0.5``, ``spacing_um=14.0`` (nucleus grid),
          ``labels=True`` (write labels ``"cell_labels"``), ``spots=True`` (25 µm spots on a 60 µm grid).
        - ``"image"``: ``size_px=400``, ``mpp=0.5``, ``n=60`` (nuclei), ``glass_frac=0.0`` (glass
          on the right).
        - ``"mixture"``: ``n_spots=60``, ``sample_id=f"S{seed}"``, ``empty_spots=3`` (the first
          spots hold no cell; the last cell lies outside every spot).

    Returns
    -------
    The SpatialData, or ``(sdata, truth)`` with ``return_truth``.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata, truth = bs.datasets.toy("cells", seed=0, grid=3, return_truth=True)
    >>> sorted(sdata.tables), truth.shape == (sdata.tables["cells"].n_obs, 40)
    (['bulk', 'cells', 'table'], True)
    >>> sdata, cell_type = bs.datasets.toy("nuclei", size_px=100, return_truth=True)
    >>> len(cell_type) == sdata.tables["cells"].n_obs
    True
    """
    if kind not in _BUILDERS:
        raise ValueError(f"`kind` must be one of {list(get_args(ToyKind))}, got {kind!r}.")
    builder = _BUILDERS[kind]
    allowed = [p for p in inspect.signature(builder).parameters if p != "seed"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown} for kind={kind!r}; it accepts {allowed}.")
    sdata, truth = builder(seed=int(seed), **options)
    return (sdata, truth) if return_truth else sdata


# --- "cells" ----------------------------------------------------------------------------------


def type_profiles(n_types: int, n_genes: int, seed: int = 123) -> np.ndarray:
    """(types, genes) mean counts per cell: a shared baseline plus type markers."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=n_genes) + 0.05
    prof = np.tile(base, (n_types, 1))
    for t in range(n_types):
        markers = np.arange(t, n_genes, n_types)[:4]
        prof[t, markers] *= 12.0
    return prof


def graph_knn(xy: np.ndarray, k: int = 6) -> tuple[Any, Any]:
    """Symmetric kNN connectivities and distances (µm) as CSR matrices."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    n = xy.shape[0]
    k = min(k, n - 1)
    d, j = cKDTree(xy).query(xy, k=k + 1)
    r = np.repeat(np.arange(n), k)
    c = j[:, 1:].ravel()
    dist = sparse.csr_matrix((d[:, 1:].ravel().astype(np.float32), (r, c)), shape=(n, n))
    dist = dist.maximum(dist.T).tocsr()
    conn = dist.copy()
    conn.data[:] = 1.0
    return conn, dist


def toy_cells(
    n_cells: int, *, seed: int = 0, n_types: int = 4, n_features: int = 16, side_um: float | None = None
) -> dict[str, np.ndarray]:
    """Cell positions (µm), types and features of the ``"cells"`` kind (no AnnData: fine for 10⁶ cells).

    Cell types form smooth spatial domains; features are noisy type means.
    """
    rng = np.random.default_rng(seed)
    side = side_um if side_um is not None else float(np.sqrt(n_cells * 225.0))  # ~15 µm spacing
    xy = rng.uniform(0, side, size=(n_cells, 2)).astype(np.float32)
    # smooth domains: type = argmax of a few random plane waves
    waves = rng.normal(size=(n_types, 2)) / 150.0
    phase = rng.uniform(0, 2 * np.pi, size=n_types)
    field = np.sin(xy @ waves.T + phase) + 0.6 * rng.normal(size=(n_cells, n_types))
    ctype = field.argmax(axis=1)
    centres = np.random.default_rng(77).normal(size=(n_types, n_features)) * 1.5  # shared by all slides
    feats = (centres[ctype] + rng.normal(size=(n_cells, n_features))).astype(np.float32)
    return {"xy": xy, "type": ctype, "features": feats, "side": np.float32(side)}


def _cells_slide(
    *,
    seed: int,
    grid: int = 8,
    spacing_um: float = 100.0,
    radius_um: float = 30.0,
    n_genes: int = 40,
    n_types: int = 4,
    n_features: int = 16,
    sample_id: str | None = None,
    patient_id: str | None = None,
) -> tuple[SpatialData, np.ndarray]:
    """Expression is a type profile times a per-cell size factor; spot / bulk counts are Poisson sums."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from scipy.spatial import cKDTree
    from shapely import points
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(seed + 1000)
    side = grid * spacing_um
    n_cells = int(side * side / 225.0)
    cells = toy_cells(n_cells, seed=seed, n_types=n_types, n_features=n_features, side_um=side)
    xy, ctype = cells["xy"], cells["type"]
    size = rng.lognormal(0.0, 0.3, size=n_cells)
    truth = type_profiles(n_types, n_genes)[ctype] * size[:, None]
    centres = (np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2) + 0.5) * spacing_um
    d, j = cKDTree(centres).query(xy)
    spot = np.where(d <= radius_um, j, -1)
    genes = [f"gene{g}" for g in range(n_genes)] + ["other"]
    spot_counts = np.zeros((len(centres), n_genes + 1))
    inside = spot >= 0
    cell_counts = rng.poisson(truth)
    np.add.at(spot_counts, spot[inside], np.column_stack([cell_counts[inside], np.full(inside.sum(), 50)]))
    mpp = 0.5
    sid = sample_id or f"toy{seed}"
    pid = patient_id or f"patient{seed}"
    tr = micron_transformations(mpp)
    spots_gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(centres), radius_um / mpp)},
        geometry=points(centres / mpp),
        index=np.arange(len(centres)),
    )
    cells_gdf = gpd.GeoDataFrame(
        {"radius": np.full(n_cells, 8.0)}, geometry=points(xy / mpp), index=np.arange(1, n_cells + 1)
    )
    table = ad.AnnData(
        X=sparse.csr_matrix(spot_counts.astype(np.float32)),
        obs=pd.DataFrame(
            {
                K.SPOT_ID: np.arange(len(centres)),
                K.REGION: pd.Categorical([K.SPOTS] * len(centres)),
                K.X_UM: centres[:, 0],
                K.Y_UM: centres[:, 1],
                K.SAMPLE_ID: sid,
                K.PATIENT_ID: pid,
            },
            index=[f"{sid}_s{i}" for i in range(len(centres))],
        ),
        var=pd.DataFrame(index=genes),
    )
    table.obsm[K.SPATIAL] = centres / mpp
    phen = np.where(rng.uniform(size=n_cells) < 0.8, ctype, rng.integers(0, n_types, n_cells))
    conn, dist = graph_knn(xy)
    cobs = pd.DataFrame(
        {
            K.CELL_ID: np.arange(1, n_cells + 1),
            K.REGION: pd.Categorical([K.CELL_SHAPES] * n_cells),
            K.X_UM: xy[:, 0],
            K.Y_UM: xy[:, 1],
            K.X_PX: xy[:, 0] / mpp,
            K.Y_PX: xy[:, 1] / mpp,
            K.SPOT_ID: pd.array(np.where(spot >= 0, spot, -1), dtype="Int64"),
            K.PHENOTYPE: pd.Categorical(
                [f"P{p}" for p in phen], categories=[f"P{t}" for t in range(n_types)]
            ),
        },
        index=[f"c{i}" for i in range(1, n_cells + 1)],
    )
    cobs.loc[spot < 0, K.SPOT_ID] = pd.NA
    ctable = ad.AnnData(
        obs=cobs, obsm={K.FEATURES: cells["features"], K.SPATIAL: (xy / mpp).astype(np.float64)}
    )
    ctable.obsp[K.CONNECTIVITIES] = conn
    ctable.obsp[K.DISTANCES] = dist
    ctable.uns[K.FEATURES_PARAMS] = {"encoder": "toy", "fov_um": 20.0}
    bulk_counts = np.concatenate([cell_counts.sum(0), [50 * n_cells]])[None].astype(np.float32)
    bulk = ad.AnnData(
        X=bulk_counts,
        obs=pd.DataFrame({K.SAMPLE_ID: [sid], K.PATIENT_ID: [pid]}, index=[sid]),
        var=pd.DataFrame(index=genes),
    )
    sdata = SpatialData(
        shapes={
            K.SPOTS: ShapesModel.parse(spots_gdf, transformations=tr),
            K.CELL_SHAPES: ShapesModel.parse(cells_gdf, transformations=tr),
        },
        tables={
            K.TABLE: TableModel.parse(table, region=K.SPOTS, region_key=K.REGION, instance_key=K.SPOT_ID),
            K.CELLS: TableModel.parse(
                ctable, region=K.CELL_SHAPES, region_key=K.REGION, instance_key=K.CELL_ID
            ),
            K.BULK: TableModel.parse(bulk),
        },
    )
    set_slide_info(sdata, sample_id=sid, patient_id=pid)
    return sdata, truth


# --- "nuclei" ---------------------------------------------------------------------------------


def _nuclei_slide(
    *,
    seed: int,
    size_px: int = 320,
    mpp: float = 0.5,
    spacing_um: float = 14.0,
    labels: bool = True,
    spots: bool = True,
) -> tuple[SpatialData, np.ndarray]:
    """``size_px``² pixels; the same tissue at any pixel size (layout and pixel noise seeded apart)."""
    import pandas as pd
    from skimage.draw import ellipse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel

    rng = np.random.default_rng(seed)  # layout: the same tissue at any pixel size
    noise = np.random.default_rng([seed, 1])  # pixel noise
    img = np.empty((size_px, size_px, 3), dtype=np.float64)
    img[:] = [235.0, 195.0, 215.0]
    img += noise.normal(0, 4, img.shape)
    lab = np.zeros((size_px, size_px), dtype=np.uint32)
    step = spacing_um / mpp
    centres = np.arange(step / 2, size_px - step / 2 + 1e-9, step)
    types = []
    cid = 0
    for cy in centres:
        for cx in centres:
            t = int(rng.integers(2))
            a, b = _TYPE_SEMI_AXES_UM[t] / mpp * rng.uniform(0.9, 1.1)
            jy, jx = rng.uniform(-step * 0.12, step * 0.12, 2)
            rotation = rng.uniform(-np.pi, np.pi)
            rr, cc = ellipse(cy + jy, cx + jx, a, b, shape=lab.shape, rotation=rotation)
            cid += 1
            lab[rr, cc] = cid
            img[rr, cc] = _TYPE_RGB[t] + noise.normal(0, 10 if t == 0 else 4, (len(rr), 3))
            types.append(t)
    img = np.clip(img, 0, 255).astype(np.uint8)
    tf = micron_transformations(mpp)
    shapes: dict = {}
    if spots:
        pitch = 60.0 / mpp
        g = np.arange(pitch / 2, size_px, pitch)
        xy = np.array([(x, y) for y in g for x in g])
        shapes[K.SPOTS] = ShapesModel.parse(
            xy,
            geometry=0,
            radius=np.full(len(xy), 25.0 / mpp),
            index=pd.RangeIndex(len(xy)),
            transformations=tf,
        )
    sdata = SpatialData(
        images={
            K.IMAGE: Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), transformations=tf)
        },
        shapes=shapes,
    )
    sdata.attrs[K.ATTRS] = {
        K.SAMPLE_ID: f"toy{seed}",
        K.PATIENT_ID: f"p{seed}",
        "mpp_source": {K.IMAGE: "user"},
    }
    write_cells(sdata, lab, mpp=mpp, labels_key=K.CELL_LABELS if labels else None)
    ids = sdata.tables[K.CELLS].obs[K.CELL_ID].to_numpy()
    cell_type = np.asarray(types)[ids - 1]
    return sdata, cell_type


# --- "image" ----------------------------------------------------------------------------------


def _image_slide(
    *, seed: int, size_px: int = 400, mpp: float = 0.5, n: int = 60, glass_frac: float = 0.0
) -> tuple[SpatialData, np.ndarray]:
    """Pink tissue with dark purple elliptical nuclei placed without overlap; glass on the right."""
    from skimage.draw import ellipse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    rng = np.random.default_rng(seed)
    img = np.broadcast_to(_PINK, (size_px, size_px, 3)).copy()
    tissue_w = int(size_px * (1 - glass_frac))
    img[:, tissue_w:] = 245.0
    labels = np.zeros((size_px, size_px), np.uint32)
    centres: list[tuple[float, float]] = []
    tries = 0
    while len(centres) < n and tries < 5000:
        tries += 1
        a_um, b_um = rng.uniform(3.0, 5.0), rng.uniform(2.5, 4.0)
        r, c = rng.uniform(12, size_px - 12), rng.uniform(12, tissue_w - 12)
        if any((r - y) ** 2 + (c - x) ** 2 < (2.4 * a_um / mpp) ** 2 for y, x in centres):
            continue
        rr, cc = ellipse(r, c, a_um / mpp, b_um / mpp, shape=labels.shape, rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = len(centres) + 1
        centres.append((r, c))
    nuc = labels > 0
    img[nuc] = _NUCLEUS
    img += rng.normal(0, 6, img.shape)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    sdata = SpatialData(
        images={
            K.IMAGE: Image2DModel.parse(
                np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), transformations=micron_transformations(mpp)
            )
        }
    )
    set_slide_info(sdata, sample_id="toy", patient_id="p0")
    return sdata, labels


# --- "mixture" --------------------------------------------------------------------------------


def _mixture_slide(
    *, seed: int, n_spots: int = 60, sample_id: str | None = None, empty_spots: int = 3
) -> tuple[SpatialData, Any]:
    """Spots of 0-8 cells of 3 types; features reveal the type; counts ~ Poisson(sum of cell profiles)."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(123)  # the biology is shared by all slides
    centroids = fixed.normal(scale=2.0, size=(MIXTURE_TYPES, MIXTURE_FEATURES))
    profiles = fixed.gamma(0.7, 4.0, size=(MIXTURE_TYPES, MIXTURE_GENES))
    n_cells = rng.integers(1, 9, size=n_spots)
    n_cells[:empty_spots] = 0
    cell_spot = np.repeat(np.arange(n_spots), n_cells)
    spot_mix = rng.dirichlet(np.ones(MIXTURE_TYPES) * 0.5, size=n_spots)
    cell_type = np.array([rng.choice(MIXTURE_TYPES, p=spot_mix[s]) for s in cell_spot], dtype=int)
    feats = centroids[cell_type] + rng.normal(scale=0.5, size=(cell_type.size, MIXTURE_FEATURES))
    cell_expr = profiles[cell_type] * rng.lognormal(0, 0.2, size=(cell_type.size, MIXTURE_GENES))
    spot_expr = np.zeros((n_spots, MIXTURE_GENES))
    np.add.at(spot_expr, cell_spot, cell_expr)
    counts = rng.poisson(spot_expr * 3 + 0.05)
    genes = [f"G{j}" for j in range(MIXTURE_GENES)]
    sid = sample_id or f"S{seed}"
    obs = pd.DataFrame(
        {
            K.SPOT_ID: np.arange(n_spots),
            K.REGION: pd.Categorical([K.SPOTS] * n_spots),
            K.SAMPLE_ID: sid,
        },
        index=[f"{sid}_spot{i}" for i in range(n_spots)],
    )
    table = TableModel.parse(
        ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes)),
        region=K.SPOTS,
        region_key=K.REGION,
        instance_key=K.SPOT_ID,
    )
    n = cell_type.size
    cobs = pd.DataFrame(
        {
            K.CELL_ID: np.arange(1, n + 1),
            K.REGION: pd.Categorical([K.CELLS] * n),
            K.SPOT_ID: cell_spot.astype(float),
        },
        index=[f"{sid}_cell{i}" for i in range(n)],
    )
    cells = ad.AnnData(np.zeros((n, 0), dtype=np.float32), obs=cobs)
    cells.obsm[K.FEATURES] = feats.astype(np.float32)
    cells.obs.iloc[-1, cells.obs.columns.get_loc(K.SPOT_ID)] = np.nan  # one cell outside every spot
    cells = TableModel.parse(cells, region=K.CELLS, region_key=K.REGION, instance_key=K.CELL_ID)
    spots = ShapesModel.parse(
        gpd.GeoDataFrame({"geometry": [Point(i, 0) for i in range(n_spots)], "radius": np.ones(n_spots)})
    )
    with warnings.catch_warnings():  # the cells table annotates no shapes element here: not needed
        warnings.filterwarnings("ignore", message="The table is annotating")
        sdata = SpatialData(shapes={K.SPOTS: spots}, tables={K.TABLE: table, K.CELLS: cells})
    sdata.attrs[K.ATTRS] = {K.SAMPLE_ID: sid, K.PATIENT_ID: f"P{seed}"}
    truth = ad.AnnData(cell_expr, obs=pd.DataFrame(index=cobs.index), var=pd.DataFrame(index=genes))
    return sdata, truth


_BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "cells": _cells_slide,
    "nuclei": _nuclei_slide,
    "image": _image_slide,
    "mixture": _mixture_slide,
}
