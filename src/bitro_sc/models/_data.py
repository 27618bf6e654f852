"""SpatialData → model inputs: scaled cell arrays, spot / bulk targets, JSON-safe metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _keys as K
from .. import _sdata
from ._bags import SlideCells

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def cells_table(sdata: SpatialData, cells_key: str = K.CELLS) -> AnnData:
    """The featurised cells table, or an error naming the missing step."""
    if cells_key not in sdata.tables:
        raise KeyError(
            f"The SpatialData object has no cells table {cells_key!r} "
            f"(tables: {list(sdata.tables.keys()) or 'none'}): run `bs.tl.segment` and "
            "`bs.tl.cell_features` first."
        )
    cells = sdata.tables[cells_key]
    if K.FEATURES not in cells.obsm:
        raise KeyError(
            f"The cells table {cells_key!r} has no obsm[{K.FEATURES!r}]: run `bs.tl.cell_features` first."
        )
    return cells


def cell_positions_um(cells: AnnData) -> np.ndarray:
    """Cell centroids (n, 2) in µm, float32 (see :func:`bitro_sc._sdata.cell_centroids_um`)."""
    return _sdata.cell_centroids_um(cells).astype(np.float32)


def cell_spot_ids(cells: AnnData) -> np.ndarray:
    """Spot instance id per cell (int64, -1 where a cell is in no spot); error if never assigned."""
    if K.SPOT_ID not in cells.obs:
        raise KeyError(f"The cells table has no obs[{K.SPOT_ID!r}]: run `bs.tl.assign_cells` first.")
    ids = pd.to_numeric(cells.obs[K.SPOT_ID], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    out = np.full(ids.shape, -1, dtype=np.int64)
    ok = np.isfinite(ids) & (ids >= 0)
    out[ok] = ids[ok].astype(np.int64)
    return out


def spot_rows(table: AnnData, cell_spots: np.ndarray) -> np.ndarray:
    """Row of the spot table of every cell (-1: in no spot, or in a spot the table does not have)."""
    ids = (
        pd.to_numeric(table.obs[K.SPOT_ID]).to_numpy(dtype=np.int64)
        if K.SPOT_ID in table.obs
        else np.arange(table.n_obs, dtype=np.int64)
    )
    rows = pd.Index(ids).get_indexer(cell_spots)
    rows[cell_spots < 0] = -1
    return rows.astype(np.int64)


def phenotype_categories(cells: AnnData) -> list[str]:
    if K.PHENOTYPE not in cells.obs:
        return []
    col = cells.obs[K.PHENOTYPE]
    cats = (
        col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.Index(col.dropna().unique())
    )
    return [str(c) for c in cats]


def phenotype_codes(cells: AnnData, categories: list[str]) -> np.ndarray:
    """Embedding index per cell: 1 + position in ``categories``; 0 for unknown / missing phenotypes."""
    if K.PHENOTYPE not in cells.obs or not categories:
        return np.zeros(cells.n_obs, dtype=np.int64)
    values = cells.obs[K.PHENOTYPE].astype(object).map(lambda v: None if pd.isna(v) else str(v))
    return (pd.Index(categories).get_indexer(values.to_numpy()) + 1).astype(np.int64)


@dataclass
class FeatureStats:
    """Global (all training slides together) per-feature mean / std used to scale model inputs."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, matrices: list[np.ndarray]) -> FeatureStats:
        n = sum(m.shape[0] for m in matrices)
        total = sum(np.nan_to_num(m.astype(np.float64)).sum(0) for m in matrices)
        mean = total / max(n, 1)
        sq = sum(((np.nan_to_num(m.astype(np.float64)) - mean) ** 2).sum(0) for m in matrices)
        std = np.sqrt(sq / max(n - 1, 1))
        std[~(std > 1e-8)] = 1.0
        return cls(np.asarray(mean, np.float32), np.asarray(std, np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = (np.asarray(x, dtype=np.float32) - self.mean) / self.std
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)


def slide_cells(
    sdata: SpatialData,
    *,
    stats: FeatureStats,
    phenotypes: list[str],
    need_graph: bool,
    need_spots: bool,
    table_key: str = K.TABLE,
    cells_key: str = K.CELLS,
) -> SlideCells:
    """Model inputs of one slide (scaled features, phenotype codes, µm positions, graph, spot rows)."""
    cells = cells_table(sdata, cells_key)
    x = np.asarray(cells.obsm[K.FEATURES])
    if x.shape[1] != stats.mean.shape[0]:
        raise ValueError(
            f"The cells table has {x.shape[1]} features in obsm[{K.FEATURES!r}], the model expects "
            f"{stats.mean.shape[0]}. Compute the features with the same encoder as the training slides."
        )
    graph = None
    if need_graph:
        if K.CONNECTIVITIES not in cells.obsp:
            raise KeyError(
                f"The cells table has no obsp[{K.CONNECTIVITIES!r}] (cell graph): run `bs.tl.cell_graph` "
                "first, or use a model without GAT layers (`model={'gat_layers': 0}`)."
            )
        from scipy import sparse

        graph = sparse.csr_matrix(cells.obsp[K.CONNECTIVITIES])
    spot_index = np.full(cells.n_obs, -1, dtype=np.int64)
    if need_spots:
        if table_key not in sdata.tables:
            raise KeyError(f"The SpatialData object has no spot table {table_key!r}.")
        spot_index = spot_rows(sdata.tables[table_key], cell_spot_ids(cells))
    elif K.SPOT_ID in cells.obs and table_key in sdata.tables:
        spot_index = spot_rows(sdata.tables[table_key], cell_spot_ids(cells))
    return SlideCells(
        features=stats.apply(x),
        phenotype=phenotype_codes(cells, phenotypes),
        xy_um=cell_positions_um(cells),
        graph=graph,
        spot_index=spot_index,
    )


def library_and_counts(table: AnnData, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(library size over all genes (n,), counts of ``genes`` (n, g) dense float64)."""
    from scipy import sparse

    from ..pp._expression import get_counts

    counts = get_counts(table)
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    cols = table.var_names.get_indexer(genes)
    sub = counts[:, cols]
    dense = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)  # type: ignore[union-attr]
    return lib, np.asarray(dense, dtype=np.float64)


def bulk_row(sdata: SpatialData, *, bulk_key: str = K.BULK) -> int:
    """Row of the slide's own sample in its bulk table, or an error when no sample matches it."""
    from .._sdata import slide_info

    table = sdata.tables[bulk_key]
    sample = slide_info(sdata)[K.SAMPLE_ID]
    ids = table.obs[K.SAMPLE_ID].astype(str) if K.SAMPLE_ID in table.obs else pd.Series(table.obs_names)
    if sample is not None:
        hit = np.flatnonzero(ids.to_numpy() == str(sample))
        if hit.size:
            return int(hit[0])
    elif table.n_obs == 1:
        return 0
    raise ValueError(
        f"The bulk table {bulk_key!r} has samples {list(ids)[:5]} but the slide's sample_id is {sample!r}: "
        "the bulk samples match no slide. Set the slide's identity with "
        "`bitro_sc._sdata.set_slide_info(sdata, sample_id=...)` or fix obs['sample_id'] of the bulk table."
    )


def jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy (numpy → lists / scalars; unknown objects → str)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)
