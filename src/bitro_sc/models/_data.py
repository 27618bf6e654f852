"""SpatialData → model inputs: scaled cell arrays, spot / bulk targets, the training bags.

Every key is read from a :class:`~bitro_sc.models.DataKeys` (features, phenotype, spot id and
graph included), so data written under custom keys is fitted and predicted by naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _sdata
from ..pp._expression import cp10k, get_counts
from ._bags import BulkSlide, SlideCells, SpotSet
from ._params import DataKeys

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._preprocess import Preprocessing


def cells_table(sdata: SpatialData, keys: DataKeys) -> AnnData:
    """The featurised cells table of ``keys``, or an error naming the missing step."""
    return _sdata.cells_table(sdata, keys.cells_key, features_key=keys.features_key)


def cell_positions_um(cells: AnnData) -> np.ndarray:
    """Cell centroids (n, 2) in µm, float32 (see :func:`bitro_sc._sdata.cell_centroids_um`)."""
    return _sdata.cell_centroids_um(cells).astype(np.float32)


def spot_rows(table: AnnData, cell_spots: np.ndarray) -> np.ndarray:
    """Row of the spot table of every cell (-1: in no spot, or in a spot the table does not have)."""
    rows = pd.Index(_sdata.spot_instance_ids(table)).get_indexer(cell_spots)
    rows[cell_spots < 0] = -1
    return rows.astype(np.int64)


def phenotype_categories(cells: AnnData, phenotype_key: str) -> list[str]:
    if phenotype_key not in cells.obs:
        return []
    col = cells.obs[phenotype_key]
    cats = (
        col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.Index(col.dropna().unique())
    )
    return [str(c) for c in cats]


def phenotype_codes(
    cells: AnnData, categories: list[str], phenotype_key: str, labels: np.ndarray | None = None
) -> np.ndarray:
    """Embedding index per cell: 1 + position in ``categories``; 0 for unknown / missing phenotypes.
    ``labels`` (one per cell) replace ``obs[phenotype_key]`` when given."""
    if not categories or (labels is None and phenotype_key not in cells.obs):
        return np.zeros(cells.n_obs, dtype=np.int64)
    if labels is None:
        values = cells.obs[phenotype_key].astype(object).map(lambda v: None if pd.isna(v) else str(v))
        labels = values.to_numpy()
    return (pd.Index(categories).get_indexer(labels) + 1).astype(np.int64)


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
    keys: DataKeys,
    prep: Preprocessing | None = None,
    need_phenotypes: bool = False,
) -> SlideCells:
    """Model inputs of one slide (scaled features, phenotype codes, µm positions, graph, spot rows).

    With ``prep`` (the model's :class:`~bitro_sc.models._preprocess.Preprocessing`), features of
    another encoder are refused, features in another scaling are re-standardised with the training
    scaler and missing or foreign phenotypes are re-assigned with the training k-means. With
    ``need_phenotypes`` a slide whose phenotypes are missing and cannot be assigned is refused.
    """
    cells = cells_table(sdata, keys)
    x = np.asarray(cells.obsm[keys.features_key])
    unchanged, labels = True, None
    if x.shape[1] == stats.mean.shape[0] and prep is not None:
        x, unchanged = prep.features_for(cells, keys)
        labels = prep.phenotype_labels(cells, keys, x, unchanged)
    if need_phenotypes and labels is None and keys.phenotype_key not in cells.obs:
        raise KeyError(
            f"The cells table has no obs[{keys.phenotype_key!r}] (cell phenotypes) and the model has no "
            "phenotype k-means to assign them: run `bs.tl.phenotypes` first (on a new slide "
            "`bs.tl.phenotypes(sdata, model=<the training k-means>)`), or pass the `phenotype_key` that "
            "holds them."
        )
    if x.shape[1] != stats.mean.shape[0]:
        raise ValueError(
            f"The cells table has {x.shape[1]} features in obsm[{keys.features_key!r}], the model expects "
            f"{stats.mean.shape[0]}. Compute the features with the same encoder as the training slides."
        )
    graph = None
    if need_graph:
        if keys.connectivities not in cells.obsp:
            raise KeyError(
                f"The cells table has no obsp[{keys.connectivities!r}] (cell graph): run `bs.tl.cell_graph` "
                "first (or pass the `graph_key` it wrote), or use a model without GAT layers "
                "(`model={'gat_layers': 0}`)."
            )
        if prep is not None:
            prep.check_graph(cells, keys)
        from scipy import sparse

        graph = sparse.csr_matrix(cells.obsp[keys.connectivities])
    spot_index = np.full(cells.n_obs, -1, dtype=np.int64)
    has_table = keys.table_key in sdata.tables
    if need_spots and not has_table:
        raise KeyError(f"The SpatialData object has no spot table {keys.table_key!r}.")
    if need_spots or (keys.spot_key in cells.obs and has_table):
        ids = _sdata.cell_spot_ids(cells, spot_key=keys.spot_key, cells_key=keys.cells_key)
        spot_index = spot_rows(sdata.tables[keys.table_key], ids)
    return SlideCells(
        features=stats.apply(x),
        phenotype=phenotype_codes(cells, phenotypes, keys.phenotype_key, labels),
        xy_um=cell_positions_um(cells),
        graph=graph,
        spot_index=spot_index,
    )


def library_and_counts(table: AnnData, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(library size over all genes (n,), counts of ``genes`` (n, g) dense float64)."""
    from scipy import sparse

    counts = get_counts(table)
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    cols = table.var_names.get_indexer(genes)
    sub = counts[:, cols]
    dense = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)  # type: ignore[union-attr]
    return lib, np.asarray(dense, dtype=np.float64)


def build_data(
    slides: list[SpatialData],
    train_idx: list[int],
    val_idx: list[int],
    spot_frac: float,
    *,
    level: str,
    genes: list[str],
    stats: FeatureStats,
    phenotypes: list[str],
    need_graph: bool,
    chunk_cells: int,
    keys: DataKeys,
    prep: Preprocessing | None = None,
    need_phenotypes: bool = False,
) -> tuple[list[SpotSet] | list[BulkSlide], list[SpotSet] | list[BulkSlide], list[int]]:
    """(training bags, validation bags, cells per training bag). At spot level with ``spot_frac``,
    the spots with the largest x of every training slide (that share of them) are validation bags."""
    train_data: list = []
    val_data: list = []
    bag_sizes: list[int] = []
    n_with_cells = 0
    for i in [*train_idx, *val_idx]:
        s = slides[i]
        cells = slide_cells(
            s,
            stats=stats,
            phenotypes=phenotypes,
            need_graph=need_graph,
            need_spots=level == "spot",
            keys=keys,
            prep=prep,
            need_phenotypes=need_phenotypes,
        )
        if level == "spot":
            table = s.tables[keys.table_key]
            lib, counts = library_and_counts(table, genes)
            part = cells.spot_partition(table.n_obs)
            sizes = part.sizes()
            rows = np.flatnonzero((sizes > 0) & (lib > 0))
            n_with_cells += rows.size
            if rows.size == 0:
                continue
            y = cp10k(counts[rows], lib[rows])
            items = [(rows, y, lib[rows])]
            if i in train_idx and spot_frac > 0:
                x = np.array(
                    [cells.xy_um[part.order[part.cell_ptr[r] : part.cell_ptr[r + 1]], 0].mean() for r in rows]
                )
                held = x > np.quantile(x, 1 - spot_frac)
                if held.any() and (~held).any():
                    items = [
                        (rows[~held], y[~held], lib[rows][~held]),
                        (rows[held], y[held], lib[rows][held]),
                    ]
            for j, (r, yr, lb) in enumerate(items):
                item = SpotSet(cells, part, r, yr.astype(np.float32), lb.astype(np.float32))
                if i in train_idx and j == 0:
                    train_data.append(item)
                    bag_sizes.extend(sizes[r].tolist())
                else:
                    val_data.append(item)
        else:
            row = _sdata.bulk_row(s, bulk_key=keys.bulk_key, i=i)
            lib, counts = library_and_counts(s.tables[keys.bulk_key][row : row + 1], genes)
            if cells.n_cells == 0 or lib[0] <= 0:
                raise ValueError(
                    f"Bulk slide {i} has no cells or an empty bulk profile; drop it or segment it."
                )
            n_with_cells += 1
            bulk = BulkSlide(
                cells,
                cells.chunk_partition(chunk_cells),
                cp10k(counts[0], lib[0]).astype(np.float32),
                float(lib[0]),
            )
            if i in train_idx:
                train_data.append(bulk)
                bag_sizes.append(cells.n_cells)
            else:
                val_data.append(bulk)
    if level == "spot" and n_with_cells == 0:
        raise ValueError(
            "No spot of any training slide holds a cell (the spots have no cells: obs['spot_id'] of the "
            "cells table is missing / -1 everywhere): run `bs.tl.assign_cells` first, and check that the "
            "spots overlap the segmented tissue."
        )
    if not train_data:
        raise ValueError("The training split has no usable bag (spots with cells / bulk slides).")
    return train_data, val_data, bag_sizes
