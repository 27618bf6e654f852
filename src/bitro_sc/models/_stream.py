"""Bulk training on a cohort streamed from per-slide zarr stores (``bs.models.fit_cohort``).

Only the tables of the slides of one step are in memory: each slide's cells table (features,
phenotypes, positions, graph) is read from its store when the step reaches it and dropped after
its exact chunked gradient (:func:`~bitro_sc.models._slide.slide_step`). A first pass over the stores
computes what the whole cohort shares (feature scaling, phenotype categories, targets, cells per
slide) one slide at a time. The training loop itself is in :mod:`._ddp` (one process or several).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _sdata
from ..pp._expression import TARGET_SUM
from ._bags import BulkSlide
from ._data import FeatureStats, cells_table, library_and_counts, phenotype_categories, slide_cells
from ._params import DataKeys

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def read_tables(store: str | Path) -> SpatialData:
    """The tables of one slide's store (cells, bulk, …): no image, shapes or labels are read."""
    from spatialdata import read_zarr

    path = Path(store)
    if not (path / "tables").exists():
        raise FileNotFoundError(
            f"{str(path)!r} is not a slide store with tables; write one per slide with "
            "`bitro-sc run` ([batch]) or `bs.tl.run_batch`."
        )
    with warnings.catch_warnings():  # only the tables are read: the shapes they annotate are not
        warnings.filterwarnings("ignore", message="The table is annotating.*not present")
        return read_zarr(path, selection=("tables",))


@dataclass
class Cohort:
    """What the training slides share, from one pass over their stores."""

    stats: FeatureStats
    phenotypes: list[str]
    genes: list[str]
    targets: np.ndarray  # (slides, genes) counts per 10k
    libs: np.ndarray  # (slides,)
    n_cells: np.ndarray  # (slides,)
    codes: np.ndarray  # (slides, phenotypes + 1) cells per phenotype code
    sample_ids: list[str]
    meta: dict[str, Any]


def _bulk_target(sdata: SpatialData, bulk: AnnData | None, keys: DataKeys, i: int) -> tuple[AnnData, str]:
    sid = _sdata.sample_id(sdata, i, table_key=keys.cells_key)
    if bulk is None:
        if keys.bulk_key not in sdata.tables:
            raise KeyError(
                f"The store of slide {sid!r} has no bulk table {keys.bulk_key!r}; pass `bulk=` (an AnnData "
                "with one row per slide, obs['sample_id'], e.g. from `bs.io.read_bulk`)."
            )
        row = _sdata.bulk_row(sdata, bulk_key=keys.bulk_key, i=i)
        return sdata.tables[keys.bulk_key][row : row + 1], sid
    ids = bulk.obs["sample_id"].astype(str).to_numpy() if "sample_id" in bulk.obs else bulk.obs_names
    hit = np.flatnonzero(np.asarray(ids) == sid)
    if hit.size != 1:
        raise KeyError(
            f"`bulk` has {hit.size} rows for sample {sid!r} (obs['sample_id']); it needs one per slide."
        )
    return bulk[int(hit[0]) : int(hit[0]) + 1], sid


def scan(
    stores: Sequence[str | Path], *, genes: Sequence[str] | None, bulk: AnnData | None, keys: DataKeys
) -> Cohort:
    """One pass over the stores, one slide in memory at a time (pooled feature mean / variance by
    Chan's parallel formula, phenotype categories, bulk targets, cells per phenotype)."""
    n_total = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    cats: dict[str, None] = {}
    rows: list[tuple[np.ndarray, float]] = []
    n_cells: list[int] = []
    per_slide_codes: list[Any] = []
    sample_ids: list[str] = []
    meta: dict[str, Any] = {}
    for i, store in enumerate(stores):
        sdata = read_tables(store)
        cells = cells_table(sdata, keys)
        x = np.nan_to_num(np.asarray(cells.obsm[keys.features_key], dtype=np.float64))
        if mean is not None and x.shape[1] != mean.shape[0]:
            raise ValueError(f"Store {store} has {x.shape[1]} features, the first one {mean.shape[0]}.")
        n = x.shape[0]
        if n:
            mu, dev = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
            if mean is None or m2 is None:
                mean, m2 = mu, dev
            else:
                delta = mu - mean
                total = n_total + n
                mean = mean + delta * n / total
                m2 = m2 + dev + delta**2 * n_total * n / total
            n_total += n
        cats.update(dict.fromkeys(phenotype_categories(cells, keys.phenotype_key)))
        table, sid = _bulk_target(sdata, bulk, keys, i)
        if genes is None:
            genes = list(map(str, table.var_names))
        missing = [g for g in genes if g not in table.var_names]
        if missing:
            raise KeyError(
                f"The bulk profile of {sid!r} lacks genes {missing[:5]}; pass `genes=` present in all."
            )
        lib, counts = library_and_counts(table, list(genes))
        if n == 0 or lib[0] <= 0:
            raise ValueError(f"Slide {sid!r} has no cells or an empty bulk profile; drop its store.")
        rows.append((counts[0] / lib[0] * TARGET_SUM, float(lib[0])))
        n_cells.append(n)
        per_slide_codes.append(cells.obs.get(keys.phenotype_key))
        sample_ids.append(sid)
        if i == 0:
            meta = {
                "features": _sdata.jsonable(dict(cells.uns.get(keys.features_params, {}))),
                "phenotypes": _sdata.jsonable(dict(cells.uns.get(keys.phenotype_key, {}))),
            }
    if not rows or mean is None or m2 is None or genes is None:
        raise ValueError("No store given: pass the stores of the training slides.")
    std = np.sqrt(m2 / max(n_total - 1, 1))
    std[~(std > 1e-8)] = 1.0
    phenotypes = list(cats)
    codes = np.zeros((len(rows), len(phenotypes) + 1))
    for i, col in enumerate(per_slide_codes):
        if col is not None:
            values = col.astype(object).map(lambda v: None if v != v or v is None else str(v)).to_numpy()
            idx = np.asarray([phenotypes.index(v) + 1 if v in cats else 0 for v in values], dtype=np.int64)
            codes[i] = np.bincount(idx, minlength=len(phenotypes) + 1)
        else:
            codes[i, 0] = n_cells[i]
    return Cohort(
        stats=FeatureStats(np.asarray(mean, np.float32), np.asarray(std, np.float32)),
        phenotypes=phenotypes,
        genes=list(genes),
        targets=np.stack([r[0] for r in rows]).astype(np.float32),
        libs=np.asarray([r[1] for r in rows]),
        n_cells=np.asarray(n_cells),
        codes=codes,
        sample_ids=sample_ids,
        meta=meta,
    )


def design_items(cohort: Cohort) -> list[Any]:
    """Light stand-ins of the training bags for the deconvolution start (phenotype codes, target)."""
    out = []
    for row, target in zip(cohort.codes, cohort.targets, strict=True):
        codes = np.repeat(np.arange(row.size), row.astype(np.int64))
        out.append(SimpleNamespace(slide=SimpleNamespace(phenotype=codes), part=None, target=target))
    return out


class StoreBags:
    """The bulk bags of the cohort, read from their stores on demand (``with bags.bag(i) as item``).

    ``n_loaded`` counts reads, ``max_resident`` the most slides held at once.
    """

    def __init__(
        self,
        stores: Sequence[str | Path],
        cohort: Cohort,
        *,
        keys: DataKeys,
        need_graph: bool,
        chunk_cells: int,
    ) -> None:
        self.stores = [str(s) for s in stores]
        self.cohort = cohort
        self.keys = keys
        self.need_graph = need_graph
        self.chunk_cells = chunk_cells
        self.n_loaded = 0
        self.resident = 0
        self.max_resident = 0

    def __len__(self) -> int:
        return len(self.stores)

    @contextlib.contextmanager
    def bag(self, i: int) -> Iterator[BulkSlide]:
        sdata = read_tables(self.stores[i])
        cells = slide_cells(
            sdata,
            stats=self.cohort.stats,
            phenotypes=self.cohort.phenotypes,
            need_graph=self.need_graph,
            need_spots=False,
            keys=self.keys,
        )
        del sdata
        self.n_loaded += 1
        self.resident += 1
        self.max_resident = max(self.max_resident, self.resident)
        try:
            yield BulkSlide(
                cells,
                cells.chunk_partition(self.chunk_cells),
                self.cohort.targets[i],
                float(self.cohort.libs[i]),
            )
        finally:
            self.resident -= 1

    def counters(self) -> Mapping[str, int]:
        return {"slides_loaded": self.n_loaded, "max_resident": self.max_resident, "n_slides": len(self)}
