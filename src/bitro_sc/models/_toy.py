"""Tiny contract-conforming slides with cell-level truth, for the model's tests and benchmarks.

No image: a slide has shapes ``"spots"`` and ``"cell_circles"``, a spot table ``"table"``, a cells
table ``"cells"`` (features, phenotype, µm centroids, kNN graph, spot assignment) and a one-row
bulk table ``"bulk"``. Cell types form smooth spatial domains; features are noisy type means;
expression is a type profile times a per-cell size factor, spot / bulk counts are Poisson sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _keys as K

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def type_profiles(n_types: int, n_genes: int, seed: int = 123) -> np.ndarray:
    """(types, genes) mean counts per cell: a shared baseline plus type markers."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=n_genes) + 0.05
    prof = np.tile(base, (n_types, 1))
    for t in range(n_types):
        markers = np.arange(t, n_genes, n_types)[:4]
        prof[t, markers] *= 12.0
    return prof


def graph_knn(xy: np.ndarray, k: int = 6):
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
    """Cell positions (µm), types and features (no AnnData: usable for a million cells)."""
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


def toy_slide(
    *,
    seed: int = 0,
    grid: int = 8,
    spacing_um: float = 100.0,
    radius_um: float = 30.0,
    n_genes: int = 40,
    n_types: int = 4,
    n_features: int = 16,
    sample_id: str | None = None,
    patient_id: str | None = None,
    return_truth: bool = False,
) -> SpatialData | tuple[SpatialData, np.ndarray]:
    """One slide (``grid`` × ``grid`` spots). With ``return_truth``, also the cells × genes expected
    expression (counts per cell, before sampling)."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from shapely import points
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    from .._sdata import micron_transformations, set_slide_info

    rng = np.random.default_rng(seed + 1000)
    side = grid * spacing_um
    n_cells = int(side * side / 225.0)
    cells = toy_cells(n_cells, seed=seed, n_types=n_types, n_features=n_features, side_um=side)
    xy, ctype = cells["xy"], cells["type"]
    size = rng.lognormal(0.0, 0.3, size=n_cells)
    truth = type_profiles(n_types, n_genes)[ctype] * size[:, None]
    centres = (np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2) + 0.5) * spacing_um
    from scipy.spatial import cKDTree

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
    ctable = ad.AnnData(obs=cobs, obsm={K.FEATURES: cells["features"], K.SPATIAL: xy.astype(np.float64)})
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
    return (sdata, truth) if return_truth else sdata
