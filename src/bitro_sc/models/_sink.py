"""Cell-level predictions written by row blocks, so a slide of 10⁶ cells never holds cells × genes.

Windows of cells are predicted in any grouping, but batches are *visited in order of their smallest
cell row*: once the next batch starts at row ``m``, no later batch writes a row below ``m`` (a window
holding row ``r < m`` has its smallest row ``≤ r`` and was therefore visited already). The rows below
that frontier are final and are flushed to the target (a zarr array) block by block. Cells tables are
numbered in image raster order, so the pending rows are a band of the slide a batch tall.

Written by hand: dask and zarr write arrays by whole chunks, not by scattered rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["RowBlocks", "sweep", "window_first_rows"]


class RowBlocks:
    """Rows × columns float32 target written by scattered rows, flushed in blocks of ``block_rows``.

    ``target``: a NumPy array (written straight through; :meth:`advance` is free) or an array-like
    with slice assignment (a zarr array, chunked by ``block_rows`` rows). Rows never written read as
    the target's fill value (NaN). ``scale`` multiplies every value written.
    """

    def __init__(self, target: Any, *, block_rows: int | None = None, scale: float = 1.0) -> None:
        self.target = target
        self.n_rows, self.n_cols = (int(s) for s in target.shape)
        self.direct = isinstance(target, np.ndarray)
        chunks = getattr(target, "chunks", None)
        self.block_rows = int(block_rows or (chunks[0] if chunks else 16384))
        self.scale = scale
        self._pending: dict[int, np.ndarray] = {}
        self._next = 0  # blocks below this index are final

    def __setitem__(self, rows: np.ndarray, values: np.ndarray) -> None:
        if self.scale != 1.0:
            values = values * self.scale
        if self.direct:
            self.target[rows] = values
            return
        rows = np.asarray(rows, dtype=np.int64)
        blocks = rows // self.block_rows
        for b in np.unique(blocks):
            if b < self._next:
                raise RuntimeError(
                    f"row block {int(b)} was already flushed: batches must be visited in order of their "
                    "smallest row (bitro_sc bug; please report it)."
                )
            buf = self._pending.get(int(b))
            if buf is None:
                n = min(self.block_rows, self.n_rows - int(b) * self.block_rows)
                buf = self._pending[int(b)] = np.full((n, self.n_cols), np.nan, dtype=np.float32)
            sel = blocks == b
            buf[rows[sel] - int(b) * self.block_rows] = values[sel]

    def advance(self, frontier: int) -> None:
        """Rows below ``frontier`` are final: flush every pending block that ends at or below it."""
        if self.direct:
            return
        last = min(frontier, self.n_rows) // self.block_rows  # blocks [0, last) are complete
        if frontier >= self.n_rows:
            last = -(-self.n_rows // self.block_rows)
        for b in sorted(k for k in self._pending if k < last):
            start = b * self.block_rows
            buf = self._pending.pop(b)
            self.target[start : start + buf.shape[0]] = buf
        self._next = max(self._next, last)

    def close(self) -> None:
        """Flush everything (call once, after the last batch)."""
        self.advance(self.n_rows)

    @property
    def pending_rows(self) -> int:
        """Rows held in memory now (for tests and diagnostics)."""
        return sum(b.shape[0] for b in self._pending.values())


def sweep(batches: Iterable[tuple[int, Any]], sink: RowBlocks | None) -> Iterator[Any]:
    """Yield the payloads of ``(smallest row, payload)`` batches in row order, advancing ``sink``'s
    frontier before each one and closing it after the last."""
    for first_row, payload in sorted(batches, key=lambda b: b[0]):
        if sink is not None:
            sink.advance(first_row)
        yield payload
    if sink is not None:
        sink.close()


def window_first_rows(order: np.ndarray, cell_ptr: np.ndarray) -> np.ndarray:
    """Smallest cell row of every window of a partition (``order`` / ``cell_ptr``; empty windows: the
    largest int64)."""
    starts = cell_ptr[:-1]
    out = np.full(starts.size, np.iinfo(np.int64).max, dtype=np.int64)
    nonempty = np.diff(cell_ptr) > 0
    if nonempty.any():  # empty windows take no room in ``order``: reduce over the others' offsets
        out[nonempty] = np.minimum.reduceat(np.asarray(order, dtype=np.int64), starts[nonempty])
    return out
