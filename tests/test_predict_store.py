"""Cell-level predictions written by row blocks into a zarr array (`predict_bitro(store=...)`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.datasets import toy as toy_slide
from bitro_sc.models._sink import RowBlocks, sweep, window_first_rows

torch.set_num_threads(1)
TINY = {"hidden": 16, "phenotype_dim": 4, "gat_heads": 2, "transformer_heads": 2}
GENES = [f"gene{g}" for g in range(8)]


class _Target:
    """A zarr-like target: slice assignment only, and a record of every block written."""

    def __init__(self, n: int, g: int) -> None:
        self.data = np.full((n, g), np.nan, dtype=np.float32)
        self.shape = self.data.shape
        self.chunks = (5, g)
        self.writes: list[tuple[int, int]] = []

    def __setitem__(self, key: slice, value: np.ndarray) -> None:
        assert isinstance(key, slice)
        self.writes.append((key.start, key.stop))
        self.data[key] = value


def test_row_blocks_flush_each_block_once_and_match_direct_writes() -> None:
    rng = np.random.default_rng(0)
    n, g = 97, 3
    # windows of nearby rows (as cells of a compact patch of a raster-numbered slide), visited in batches
    rows = rng.permutation(n)
    windows = [np.sort(rows[i : i + 6] // 4 * 4 % n) for i in range(0, n, 6)]
    windows = [np.unique(np.clip(w[0] + np.arange(len(w)) * 2, 0, n - 1)) for w in windows]
    windows.append(np.arange(n))  # every row written at least once
    values = [rng.normal(size=(len(w), g)).astype(np.float32) for w in windows]
    direct = np.full((n, g), np.nan, dtype=np.float32)
    target = _Target(n, g)
    sink = RowBlocks(target, scale=2.0)
    straight = RowBlocks(direct, scale=2.0)
    batches = [(int(w.min()), i) for i, w in enumerate(windows)]
    for i in sweep(batches, sink):
        sink[windows[i]] = values[i]
    for i in sorted(range(len(windows)), key=lambda i: windows[i].min()):
        straight[windows[i]] = values[i]
    np.testing.assert_array_equal(target.data, direct)
    starts = [s for s, _ in target.writes]
    assert sorted(starts) == starts  # blocks flushed in order
    assert len(set(starts)) == len(starts) == -(-n // 5)  # each block once
    assert sink.pending_rows == 0


def test_row_blocks_refuse_a_row_of_a_flushed_block() -> None:
    sink = RowBlocks(_Target(20, 2))
    sink[np.array([0, 1])] = np.ones((2, 2), dtype=np.float32)
    sink.advance(10)
    with pytest.raises(RuntimeError, match="already flushed"):
        sink[np.array([3])] = np.ones((1, 2), dtype=np.float32)


def test_window_first_rows_skips_empty_windows() -> None:
    order = np.array([5, 2, 9, 7, 1, 3])
    cell_ptr = np.array([0, 2, 2, 5, 6])  # windows {5, 2}, {}, {9, 7, 1}, {3}
    first = window_first_rows(order, cell_ptr)
    assert first.tolist() == [2, np.iinfo(np.int64).max, 1, 3]


def _raster_ordered(slide):
    """The toy slide with its cells numbered in raster order (by y), as segmentation numbers them."""
    cells = slide.tables[K.CELLS]
    slide.tables[K.CELLS] = cells[np.argsort(cells.obs["y_um"].to_numpy(), kind="stable")].copy()
    return slide


@pytest.fixture(scope="module")
def models():
    slides = [toy_slide(seed=i, grid=4) for i in range(4)]
    spot = bs.tl.fit_bitro(slides[:2], epochs=2, model=TINY, genes=GENES, progress=False)
    bulk = bs.tl.fit_bitro(
        slides[:3],
        level="bulk",
        epochs=2,
        model={**TINY, "rna_head": False, "pooling": "attention"},
        train={"chunk_cells": 40},
        genes=GENES,
        progress=False,
    )
    return {"spot": spot, "bulk": bulk}


@pytest.mark.parametrize("which", ["spot", "bulk"])
def test_streamed_cell_predictions_equal_in_memory_ones_bit_for_bit(
    models, which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dask.array as da

    from bitro_sc.models import _slide, _train
    from bitro_sc.tl import _predict

    model = models[which]
    monkeypatch.setattr(_predict, "_BLOCK_BYTES", 4 * len(GENES) * 9)  # 9-row blocks: many flushes
    monkeypatch.setattr(_train, "SPOT_BATCH", 4)  # spot windows per batch
    monkeypatch.setattr(_slide, "CELLS_PER_BATCH", 80)  # bulk: two 40-cell chunks per batch
    peak: list[int] = []
    advance = RowBlocks.advance

    def spy(self: RowBlocks, frontier: int) -> None:
        peak.append(self.pending_rows)
        advance(self, frontier)

    monkeypatch.setattr(RowBlocks, "advance", spy)
    memory, streamed = (
        _raster_ordered(toy_slide(seed=12, grid=5)),
        _raster_ordered(toy_slide(seed=12, grid=5)),
    )
    bs.tl.predict_bitro(memory, model, level="cell")
    bs.tl.predict_bitro(streamed, model, level="cell", store=tmp_path / "pred.zarr")
    a, b = memory.tables[K.CELLS], streamed.tables[K.CELLS]
    assert isinstance(b.layers[K.PREDICTION], da.Array)
    assert b.layers[K.PREDICTION].chunks[0][0] == 9
    want = np.asarray(a.layers[K.PREDICTION])
    np.testing.assert_array_equal(np.asarray(b.layers[K.PREDICTION]), want)
    assert np.isfinite(want).all()
    assert list(b.var_names) == list(a.var_names) == model.genes
    rna = f"{K.PREDICTION}_rna_content"
    assert (rna in a.obs) == (rna in b.obs) == (which == "spot")
    if which == "spot":
        np.testing.assert_array_equal(a.obs[rna].to_numpy(), b.obs[rna].to_numpy())
    # only a band of rows was held at a time (cells are numbered in raster order)
    assert len(peak) > 10
    assert max(peak) < 0.5 * a.n_obs, (max(peak), a.n_obs)
    # the slide writes and reads back with the values
    bs.io.write_zarr(streamed, tmp_path / "slide.zarr")
    back = bs.io.read_zarr(tmp_path / "slide.zarr").tables[K.CELLS]
    np.testing.assert_array_equal(np.asarray(back.layers[K.PREDICTION]), want)


def test_store_is_replaced_on_rerun_and_foreign_paths_are_refused(models, tmp_path: Path) -> None:
    model = models["spot"]
    slide = toy_slide(seed=12, grid=4)
    store = tmp_path / "pred.zarr"
    with pytest.raises(ValueError, match="level='cell'"):
        bs.tl.predict_bitro(slide, model, store=store)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        bs.tl.predict_bitro(slide, model, level="cell", store=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert K.PREDICTION not in slide.tables[K.CELLS].layers  # refused before anything was written
    bs.tl.predict_bitro(slide, model, level="cell", store=store)
    first = np.asarray(slide.tables[K.CELLS].layers[K.PREDICTION])
    bs.tl.predict_bitro(slide, model, level="cell", store=store)  # its own array: replaced
    np.testing.assert_array_equal(np.asarray(slide.tables[K.CELLS].layers[K.PREDICTION]), first)
    with pytest.raises(FileExistsError, match="key 'other'"):  # the array of another key is kept
        bs.tl.predict_bitro(slide, model, level="cell", store=store, key_added="other", overwrite=False)
