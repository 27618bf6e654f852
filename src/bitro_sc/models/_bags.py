"""Bags of cells → torch_geometric batches.

A *partition* groups the cells of one slide into windows (the cells of each spot, or spatially
coherent chunks of a whole slide) and keeps, for each window, the edges of the cell graph whose two
ends lie in it (the graph restricted to the window; edges that cross windows are cut). Batches are
assembled by concatenating windows, so building a batch costs O(cells + edges in it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from scipy import sparse
    from torch_geometric.data import Batch


@dataclass
class SlideCells:
    """Model inputs of one slide's cells (already scaled / encoded)."""

    features: np.ndarray  # (n, F) float32, scaled
    phenotype: np.ndarray  # (n,) int64, 0 = unknown
    xy_um: np.ndarray  # (n, 2) float32, µm
    graph: sparse.csr_matrix | None  # (n, n) adjacency pattern, or None (no GAT)
    spot_index: np.ndarray  # (n,) int64 row of the spot table, -1 = in no spot
    _cache: dict[object, Partition] = field(default_factory=dict, repr=False)

    @property
    def n_cells(self) -> int:
        return int(self.features.shape[0])

    def spot_partition(self, n_spots: int) -> Partition:
        key = ("spots", n_spots)
        if key not in self._cache:
            self._cache[key] = Partition.build(self.spot_index, n_spots, self.graph)
        return self._cache[key]

    def chunk_partition(self, chunk_cells: int) -> Partition:
        key = ("chunks", chunk_cells)
        if key not in self._cache:
            group = spatial_chunks(self.xy_um, chunk_cells)
            self._cache[key] = Partition.build(group, int(group.max()) + 1 if group.size else 0, self.graph)
        return self._cache[key]


def spatial_chunks(xy_um: np.ndarray, chunk_cells: int) -> np.ndarray:
    """Chunk id per cell: consecutive runs of ``chunk_cells`` cells along a Z-order (Morton) curve,
    so each chunk is a compact patch of tissue (about ``chunk_cells`` cells; the last one smaller)."""
    n = xy_um.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lo = xy_um.min(axis=0)
    span = max(float((xy_um.max(axis=0) - lo).max()), 1e-6)
    q = ((xy_um - lo) / span * 65535).astype(np.uint64)
    code = _interleave(q[:, 0]) | (_interleave(q[:, 1]) << np.uint64(1))
    order = np.argsort(code, kind="stable")
    group = np.empty(n, dtype=np.int64)
    group[order] = np.arange(n) // chunk_cells
    return group


def _interleave(v: np.ndarray) -> np.ndarray:
    """Spread the low 16 bits of ``v`` to the even bit positions."""
    v = v & np.uint64(0xFFFF)
    for shift, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


@dataclass
class Partition:
    """Cells grouped into windows, with the graph restricted to each window."""

    order: np.ndarray  # cell indices sorted by window
    cell_ptr: np.ndarray  # (n_groups + 1,) offsets into ``order``
    edges: np.ndarray  # (2, E) window-local indices, sorted by window
    edge_ptr: np.ndarray  # (n_groups + 1,)

    @property
    def n_groups(self) -> int:
        return len(self.cell_ptr) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.cell_ptr)

    @classmethod
    def build(cls, group: np.ndarray, n_groups: int, graph: sparse.spmatrix | None) -> Partition:
        group = np.asarray(group, dtype=np.int64)
        members = np.flatnonzero(group >= 0)
        order = members[np.argsort(group[members], kind="stable")]
        cell_ptr = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(np.bincount(group[members], minlength=n_groups), out=cell_ptr[1:])
        local = np.full(group.shape[0], -1, dtype=np.int64)
        local[order] = np.arange(order.size) - cell_ptr[group[order]]
        if graph is None or graph.nnz == 0:
            return cls(order, cell_ptr, np.zeros((2, 0), dtype=np.int64), np.zeros(n_groups + 1, np.int64))
        coo = graph.tocoo()
        r, c = coo.row.astype(np.int64), coo.col.astype(np.int64)
        keep = (group[r] >= 0) & (group[r] == group[c]) & (r != c)
        r, c = r[keep], c[keep]
        g = group[r]
        srt = np.argsort(g, kind="stable")
        edges = np.stack([local[r[srt]], local[c[srt]]])
        edge_ptr = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(np.bincount(g, minlength=n_groups), out=edge_ptr[1:])
        return cls(order, cell_ptr, edges, edge_ptr)


def make_batch(
    slides: list[SlideCells],
    parts: list[Partition],
    windows: list[tuple[int, int]],
    *,
    max_cells: int | None = None,
    drop_cells: float = 0.0,
    rng: np.random.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Batch, np.ndarray]:
    """A PyG ``Batch`` of windows ``(slide, group)``; also the slide-local cell index of every cell.

    Positions are relative to each window's centroid (µm). Windows with more than ``max_cells``
    cells are randomly subsampled, and each cell is dropped with probability ``drop_cells`` (at
    least one kept) — training only; the graph is restricted to the kept cells. ``batch.n_cells``
    holds every window's full number of cells.
    """
    import torch
    from torch_geometric.data import Batch

    idx_parts, edge_parts, sizes, full = [], [], [], []
    feats, phens, poss = [], [], []
    offset = 0
    for si, gi in windows:
        slide, part = slides[si], parts[si]
        cells = part.order[part.cell_ptr[gi] : part.cell_ptr[gi + 1]]
        e = part.edges[:, part.edge_ptr[gi] : part.edge_ptr[gi + 1]]
        full.append(cells.size)
        keep = None
        if max_cells is not None and cells.size > max_cells:
            gen = rng if rng is not None else np.random.default_rng(0)
            keep = np.sort(gen.choice(cells.size, max_cells, replace=False))
        if drop_cells > 0 and cells.size > 1:
            gen = rng if rng is not None else np.random.default_rng(0)
            kept = np.flatnonzero(gen.random(cells.size) >= drop_cells)
            kept = kept if kept.size else np.array([int(gen.integers(cells.size))])
            keep = kept if keep is None else np.intersect1d(keep, kept)
            keep = keep if keep.size else kept[:1]
        if keep is not None:
            remap = np.full(cells.size, -1, dtype=np.int64)
            remap[keep] = np.arange(keep.size)
            cells = cells[keep]
            e = remap[e]
            e = e[:, (e >= 0).all(axis=0)]
        xy = slide.xy_um[cells]
        idx_parts.append((si, cells))
        feats.append(slide.features[cells])
        phens.append(slide.phenotype[cells])
        poss.append(xy - xy.mean(axis=0, keepdims=True))
        edge_parts.append(e + offset)
        sizes.append(cells.size)
        offset += cells.size
    sizes_a = np.asarray(sizes, dtype=np.int64)
    ptr = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes_a, out=ptr[1:])
    batch = Batch(
        x=torch.from_numpy(np.concatenate(feats)).to(device),
        phenotype=torch.from_numpy(np.concatenate(phens)).to(device),
        pos=torch.from_numpy(np.concatenate(poss).astype(np.float32)).to(device),
        edge_index=torch.from_numpy(np.concatenate(edge_parts, axis=1)).to(device),
        batch=torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes_a)).to(device),
        ptr=torch.from_numpy(ptr).to(device),
        n_cells=torch.as_tensor(full, dtype=torch.long).to(device),
    )
    batch._num_graphs = len(sizes)
    cell_index = np.concatenate([c for _, c in idx_parts]) if idx_parts else np.zeros(0, np.int64)
    return batch, cell_index


@dataclass
class SpotSet:
    """Spot-level training targets of one slide: the spots that hold at least one cell."""

    slide: SlideCells
    part: Partition
    rows: np.ndarray  # spot-table rows (= partition groups) used
    target: np.ndarray  # (len(rows), genes) counts per 10k
    lib: np.ndarray  # (len(rows),) library sizes (all genes)


@dataclass
class BulkSlide:
    """Bulk target of one slide: the whole slide is one bag, cut into chunks."""

    slide: SlideCells
    part: Partition
    target: np.ndarray  # (genes,) counts per 10k
    lib: float
