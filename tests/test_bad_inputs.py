"""Every bad input gets an error naming the problem and the fix, raised before anything is written.

Each case of :data:`CASES` is one row of ``docs/bad_inputs.md`` (the docs test checks that every
row names a case here). Each case builds fresh inputs, makes one failing call and checks the
exception type and message; for calls on a SpatialData the object is compared with a snapshot
taken before the call (elements, tables, ``obs`` / ``obsm`` / ``obsp`` / ``layers`` / ``uns`` keys,
values of ``X`` and layers, ``attrs``), so a failing call provably leaves it as it was.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
import tifffile
from spatialdata.models import Image2DModel, TableModel

import bitro_sc as bs
from bitro_sc import _keys as K

DOCS = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def cells_slide(**kw: Any) -> sd.SpatialData:
    """Spots, cells with features / phenotypes / graph, spot and bulk tables; no image."""
    return bs.datasets.toy("cells", grid=3, **kw)


def image_slide() -> sd.SpatialData:
    return bs.datasets.toy("image", size_px=200, n=10)


def st_inputs(n: int = 3) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(image, counts, spots) of a tiny legacy ST section (20 px pitch, 10 µm/px)."""
    grid = [(x, y) for x in range(1, n + 2) for y in range(1, n + 1)]
    spots = pd.DataFrame(
        [{"x": x, "y": y, "pixel_x": 20.0 * x + 5, "pixel_y": 20.0 * y + 7, "selected": 1} for x, y in grid]
    )
    counts = pd.DataFrame(
        np.random.default_rng(0).poisson(2.0, size=(len(grid), 4)),
        index=[f"{x}x{y}" for x, y in grid],
        columns=["A", "B", "C", "D"],
    )
    return np.full((120, 120, 3), 200, np.uint8), counts, spots


def bulk_frame() -> pd.DataFrame:
    return pd.DataFrame({"sample_id": ["S1", "S2", "S3"], "ERBB2": [10, 0, 7], "EPCAM": [3, 4, 5]})


def wsi_file(tmp: Path) -> Path:
    path = tmp / "slide.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 220, np.uint8), photometric="rgb")
    return path


def with_image(array: np.ndarray, dims: tuple[str, ...] = ("c", "y", "x")) -> sd.SpatialData:
    sdata = sd.SpatialData(images={"he": Image2DModel.parse(array, dims=dims)})
    bs._sdata.set_mpp(sdata, "he", 0.5, source="user")
    return sdata


def mean_model() -> Any:
    import warnings

    with warnings.catch_warnings():  # a one-slide baseline may not record training HVGs
        warnings.simplefilter("ignore")
        return bs.tl.fit_baseline(cells_slide(), method="mean", genes=["gene0", "gene1"])


def zarr_store(tmp: Path) -> Path:
    sdata = cells_slide()
    return bs.io.write_zarr(sdata, tmp / "slide.zarr")


# ----------------------------------------------------------------------------------------------
# snapshot: what a failing call must leave untouched
# ----------------------------------------------------------------------------------------------
def _table_state(t: ad.AnnData) -> dict[str, Any]:
    def values(m: Any) -> Any:
        if m is None:
            return None
        dense = m.toarray() if hasattr(m, "toarray") else np.asarray(m)
        return dense.tobytes() if dense.dtype != object else repr(dense)

    return {
        "shape": t.shape,
        "obs": list(t.obs.columns),
        "obs_values": t.obs.astype(str).to_numpy().tolist(),
        "var": list(t.var_names),
        "obsm": sorted(t.obsm),
        "obsp": sorted(t.obsp),
        "layers": {k: values(v) for k, v in t.layers.items()},
        "uns": repr(sorted(t.uns)),
        "uns_values": repr({k: t.uns[k] for k in sorted(t.uns)}),
        "X": values(t.X),
    }


def snapshot(sdata: sd.SpatialData) -> dict[str, Any]:
    return {
        "elements": sorted((kind, name) for kind, name, _ in sdata.gen_elements()),
        "tables": {k: _table_state(t) for k, t in sdata.tables.items()},
        "attrs": copy.deepcopy(dict(sdata.attrs)),
    }


# ----------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    call: Callable[[Path], tuple[sd.SpatialData | None, Callable[[], Any]]]
    error: type[BaseException]
    match: str


def _call(
    sdata: sd.SpatialData | None, fn: Callable[[], Any]
) -> tuple[sd.SpatialData | None, Callable[[], Any]]:
    return sdata, fn


def _on(make: Callable[[], sd.SpatialData], fn: Callable[[sd.SpatialData], Any]) -> Callable[[Path], Any]:
    def build(_tmp: Path) -> tuple[sd.SpatialData, Callable[[], Any]]:
        s = make()
        return s, lambda: fn(s)

    return build


def _plain(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
    return lambda tmp: (None, lambda: fn(tmp))


def _st(**change: Any) -> Callable[[Path], Any]:
    """read_st on the tiny section with one input changed (a function of the inputs, or a keyword)."""

    def fn(_tmp: Path) -> Any:
        image, counts, spots = st_inputs()
        kw: dict[str, Any] = {"sample_id": "S"}
        for k, v in change.items():
            if k == "image":
                image = v(image)
            elif k == "counts":
                counts = v(counts)
            elif k == "spots":
                spots = v(spots)
            else:
                kw[k] = v
        return bs.io.read_st(image, counts, spots, **kw)

    return _plain(fn)


def _set(frame: pd.DataFrame, row: int, col: str, value: Any) -> pd.DataFrame:
    frame = frame.astype({col: float}) if isinstance(value, float) else frame
    frame.iloc[row, frame.columns.get_loc(col)] = value
    return frame


def _with_x(value_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[], sd.SpatialData]:
    def make() -> sd.SpatialData:
        s = cells_slide()
        t = s.tables[K.TABLE]
        x = np.asarray(t.X.toarray() if hasattr(t.X, "toarray") else t.X, dtype=np.float64)
        t.X = value_fn(x)
        t.layers.pop(K.COUNTS_LAYER, None)
        return s

    return make


def _dup_genes() -> sd.SpatialData:
    s = cells_slide()
    t = s.tables[K.TABLE]
    names = list(t.var_names)
    names[1] = names[0]
    t.var_names = names
    return s


def _dup_spots() -> sd.SpatialData:
    s = cells_slide()
    t = s.tables[K.TABLE]
    t.obs_names = [t.obs_names[0], *t.obs_names[1:-1], t.obs_names[0]]
    return s


def _user_element(make: Callable[[], sd.SpatialData], key: str) -> Callable[[], sd.SpatialData]:
    def build() -> sd.SpatialData:
        s = make()
        s.tables[key] = TableModel.parse(ad.AnnData(np.zeros((2, 1), np.float32)))
        return s

    return build


def _failing_method(tile: np.ndarray) -> np.ndarray:
    raise RuntimeError("the segmentation method failed on a tile")


def _zero_cells() -> sd.SpatialData:
    s = cells_slide()
    s.tables[K.CELLS] = TableModel.parse(
        ad.AnnData(np.zeros((0, 0), np.float32), obsm={K.FEATURES: np.zeros((0, 16), np.float32)})
    )
    return s


def _damage(how: str) -> Callable[[Path], Any]:
    def fn(tmp: Path) -> Any:
        path = zarr_store(tmp)
        chunk = next(
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and re.search(r"tables/table/X/.*c/", p.as_posix())
        )
        if how == "lost":
            chunk.unlink()
        elif how == "cut":
            chunk.write_bytes(chunk.read_bytes()[: max(1, chunk.stat().st_size // 2)])
        elif how == "flip":
            raw = bytearray(chunk.read_bytes())
            raw[-1] ^= 0xFF
            chunk.write_bytes(bytes(raw))
        elif how == "manifest":
            (path / "bitro_sc_manifest.json").write_text("{not json")
        return bs.io.read_zarr(path)

    return _plain(fn)


def _holdout_config(tmp: Path) -> Any:
    cfg = tmp / "run.toml"
    cfg.write_text(
        '[data]\nreader = "read_bulk"\nslides = []\n[steps]\nrun = ["holdout"]\n'
        '[params.holdout]\ntest = ["nope"]\n'
    )
    slides = [cells_slide(sample_id=f"S{i}") for i in range(2)]
    from bitro_sc import cli

    cli.read_slides = lambda cfg: (slides, None)  # restored by the case's monkeypatch guard
    cli.load_config = lambda path: {
        "data": {"reader": "read_st"},
        "steps": ["segment", "holdout"],
        "params": {"holdout": {"test": ["nope"]}},
        "progress": False,
        "out": str(tmp / "out"),
    }

    def no_prepare(*a: Any, **k: Any) -> None:
        raise AssertionError("preparation ran before the test ids were checked")

    cli.prepare = no_prepare
    return cli.run(cfg)


def _bulk_log() -> sd.SpatialData:
    s = cells_slide()
    b = s.tables[K.BULK]
    x = np.asarray(b.X.toarray() if hasattr(b.X, "toarray") else b.X, dtype=np.float64)
    b.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    b.layers.pop(K.COUNTS_LAYER, None)
    return s


def _with_layer() -> sd.SpatialData:
    s = cells_slide()
    s.tables[K.TABLE].layers["mine"] = np.ones(s.tables[K.TABLE].shape, np.float32)
    return s


_MODEL: list[Any] = []


def MODEL() -> Any:
    if not _MODEL:
        _MODEL.append(mean_model())
    return _MODEL[0]


CASES: list[Case] = [
    # --- pixel size ---------------------------------------------------------------------------
    Case(
        "wsi-mpp-zero",
        _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp=0)),
        ValueError,
        "positive number of µm",
    ),
    Case("wsi-mpp-negative", _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp=-0.5)), ValueError, "positive"),
    Case(
        "wsi-mpp-inf", _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp=math.inf)), ValueError, "is infinite"
    ),
    Case("wsi-mpp-nan", _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp=math.nan)), ValueError, "is NaN"),
    Case(
        "wsi-mpp-string",
        _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp="0.5")),
        TypeError,
        "the string '0.5'",
    ),
    Case(
        "wsi-mpp-huge",
        _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp=4000)),
        ValueError,
        "absurd.*pixels per µm",
    ),
    Case("wsi-mpp-tiny", _plain(lambda t: bs.io.read_wsi(wsi_file(t), mpp=1e-5)), ValueError, "absurd"),
    Case(
        "segment-mpp-inf",
        _on(image_slide, lambda s: bs.tl.segment(s, mpp=math.inf)),
        ValueError,
        "is infinite",
    ),
    Case(
        "segment-mpp-bool",
        _on(image_slide, lambda s: bs.tl.segment(s, mpp=True)),
        TypeError,
        "number of µm per pixel",
    ),
    Case(
        "segment-mpp-coarse", _on(image_slide, lambda s: bs.tl.segment(s, mpp=4.0)), ValueError, "too coarse"
    ),
    Case(
        "tissue-mpp-nan", _on(image_slide, lambda s: bs.pp.tissue_mask(s, mpp=math.nan)), ValueError, "is NaN"
    ),
    Case("st-mpp-zero", _st(mpp=0.0), ValueError, "positive number of µm"),
    Case("st-spot-diameter-zero", _st(spot_diameter_um=0), ValueError, "spot_diameter_um.*positive"),
    Case("st-spot-diameter-nan", _st(spot_diameter_um=math.nan), ValueError, "finite"),
    # --- files and formats --------------------------------------------------------------------
    Case(
        "wsi-text-file",
        _plain(lambda t: (t / "x.txt").write_text("hi") and bs.io.read_wsi(t / "x.txt")),
        ValueError,
        "not a slide image.*convert",
    ),
    Case(
        "wsi-missing-file",
        _plain(lambda t: bs.io.read_wsi(t / "none.svs")),
        FileNotFoundError,
        "does not exist",
    ),
    Case(
        "wsi-backend-typo",
        _plain(lambda t: bs.io.read_wsi(wsi_file(t), backend="tiff")),
        ValueError,
        r"`backend` must be one of",
    ),
    Case(
        "bulk-xlsx",
        _plain(lambda t: (t / "x.xlsx").write_bytes(b"PK") and bs.io.read_bulk(t / "x.xlsx")),
        ValueError,
        "not a text or parquet.*read_excel",
    ),
    Case(
        "bulk-no-genes",
        _plain(lambda t: bs.io.read_bulk(bulk_frame()[["sample_id"]])),
        ValueError,
        "no gene columns.*transposed",
    ),
    Case(
        "bulk-negative",
        _plain(lambda t: bs.io.read_bulk(_set(bulk_frame(), 1, "EPCAM", -2))),
        ValueError,
        "negative value",
    ),
    Case(
        "bulk-nan",
        _plain(lambda t: bs.io.read_bulk(_set(bulk_frame(), 1, "EPCAM", math.nan))),
        ValueError,
        r"missing \(NaN\)",
    ),
    Case(
        "bulk-duplicate-samples",
        _plain(lambda t: bs.io.read_bulk(bulk_frame().assign(sample_id=["S1", "S1", "S3"]))),
        ValueError,
        "Duplicate sample ids",
    ),
    Case(
        "bulk-text-values",
        _plain(
            lambda t: bs.io.read_bulk(bulk_frame().astype({"EPCAM": object}).pipe(_set, 0, "EPCAM", "high"))
        ),
        ValueError,
        "Non-numeric",
    ),
    Case("st-counts-fraction", _st(counts=lambda c: _set(c, 0, "A", 1.5)), ValueError, "non-integer values"),
    Case("st-counts-negative", _st(counts=lambda c: _set(c, 0, "A", -1)), ValueError, "negative values"),
    Case("st-counts-nan", _st(counts=lambda c: _set(c, 0, "A", math.nan)), ValueError, "NaN or infinite"),
    Case(
        "st-spot-pixel-nan",
        _st(spots=lambda s: _set(s, 0, "pixel_x", math.nan)),
        ValueError,
        r"missing \(NaN or infinite\) pixel coordinate",
    ),
    Case(
        "st-spot-outside", _st(spots=lambda s: _set(s, 0, "pixel_x", 5000.0)), ValueError, "outside the image"
    ),
    Case("st-spots-no-column", _st(spots=lambda s: s.drop(columns="pixel_x")), ValueError, "lacks column"),
    Case(
        "st-duplicate-positions",
        _st(counts=lambda c: c.set_axis([c.index[0], *c.index[:-1]])),
        ValueError,
        "more than once",
    ),
    Case("zarr-lost-chunk", _damage("lost"), ValueError, "damaged: 1 file.*missing"),
    Case("zarr-cut-short", _damage("cut"), ValueError, "changed or cut short"),
    Case("zarr-flipped-byte", _damage("flip"), ValueError, "changed or cut short"),
    Case("zarr-bad-manifest", _damage("manifest"), ValueError, "manifest .* is damaged"),
    Case(
        "zarr-no-store",
        _plain(lambda t: bs.io.read_zarr(t / "none.zarr")),
        FileNotFoundError,
        "does not exist",
    ),
    # --- images ---------------------------------------------------------------------------------
    Case("st-image-grey", _st(image=lambda im: im[..., 0]), ValueError, "greyscale.*np.repeat"),
    Case(
        "st-image-float-over-255",
        _st(image=lambda im: im.astype(np.float32) * 10),
        ValueError,
        r"expected \[0, 1\] or \[0, 255\]",
    ),
    Case(
        "st-image-nan",
        _st(image=lambda im: np.where(im > 0, np.nan, 0).astype(np.float32)),
        ValueError,
        "NaN pixels",
    ),
    Case(
        "st-image-negative",
        _st(image=lambda im: im.astype(np.float32) - 300),
        ValueError,
        "negative pixel values",
    ),
    Case(
        "st-image-5-channels",
        _st(image=lambda im: np.concatenate([im, im[..., :2]], -1)),
        ValueError,
        r"shape \(120, 120, 5\)",
    ),
    Case(
        "image-float-in-sdata",
        _on(lambda: with_image(np.zeros((3, 64, 64), np.float32)), lambda s: bs.tl.segment(s)),
        ValueError,
        "pixel type float32.*to_rgb_uint8",
    ),
    Case(
        "image-channel-last-as-cyx",
        _on(lambda: with_image(np.zeros((64, 64, 3), np.uint8)), lambda s: bs.tl.segment(s)),
        ValueError,
        r"axes look swapped.*dims=\('y', 'x', 'c'\)",
    ),
    Case(
        "image-rgba-in-sdata",
        _on(lambda: with_image(np.zeros((4, 64, 64), np.uint8)), lambda s: bs.pp.tissue_mask(s)),
        ValueError,
        "4 channel.*to_rgb_uint8",
    ),
    # --- segmentation arguments ---------------------------------------------------------------
    Case(
        "segment-tile-tiny",
        _on(image_slide, lambda s: bs.tl.segment(s, tile_um=0.5)),
        ValueError,
        "smaller than the largest nucleus",
    ),
    Case(
        "segment-tile-zero",
        _on(image_slide, lambda s: bs.tl.segment(s, tile_um=0)),
        ValueError,
        "tile_um.*positive",
    ),
    Case(
        "segment-tile-nan",
        _on(image_slide, lambda s: bs.tl.segment(s, tile_um=math.nan)),
        ValueError,
        "finite",
    ),
    Case(
        "segment-tile-string",
        _on(image_slide, lambda s: bs.tl.segment(s, tile_um="600")),
        TypeError,
        "number of µm",
    ),
    Case(
        "segment-overlap-zero",
        _on(image_slide, lambda s: bs.tl.segment(s, overlap_um=0)),
        ValueError,
        "cut in two",
    ),
    Case(
        "segment-overlap-negative",
        _on(image_slide, lambda s: bs.tl.segment(s, overlap_um=-1)),
        ValueError,
        "≥ 0",
    ),
    Case(
        "segment-method-unknown",
        _on(image_slide, lambda s: bs.tl.segment(s, method="nope")),
        ValueError,
        "watershed",
    ),
    Case(
        "segment-option-unknown",
        _on(image_slide, lambda s: bs.tl.segment(s, min_area=3)),
        TypeError,
        "min_area_um2",
    ),
    Case(
        "segment-tissue-not-shapes",
        _on(image_slide, lambda s: bs.tl.segment(s, tissue="he")),
        ValueError,
        "not a shapes element",
    ),
    Case(
        "segment-tissue-type",
        _on(image_slide, lambda s: bs.tl.segment(s, tissue=5)),
        TypeError,
        "`tissue` must be",
    ),
    Case(
        "segment-over-users-table",
        _on(_user_element(image_slide, "cells"), lambda s: bs.tl.segment(s, progress=False)),
        ValueError,
        "not written by bitro_sc.*overwrite=True",
    ),
    Case(
        "segment-method-fails",
        _on(
            lambda: bs.datasets.synthetic(kind="visium", size_um=250, seed=0),
            lambda s: bs.tl.segment(s, method=_failing_method, tissue=True, progress=False),
        ),
        RuntimeError,
        "failed on a tile",
    ),
    Case(
        "tissue-level-zero",
        _on(image_slide, lambda s: bs.pp.tissue_mask(s, level_um=0)),
        ValueError,
        "level_um.*positive",
    ),
    Case(
        "tissue-threshold-range",
        _on(image_slide, lambda s: bs.pp.tissue_mask(s, threshold=2)),
        ValueError,
        r"in \[0, 1\]",
    ),
    Case(
        "tissue-over-users-table",
        _on(_user_element(image_slide, "tissue"), lambda s: bs.pp.tissue_mask(s)),
        ValueError,
        "not written by bitro_sc",
    ),
    Case(
        "stains-method-unknown",
        _on(image_slide, lambda s: bs.pp.normalize_stains(s, method="vahadane")),
        ValueError,
        "macenko",
    ),
    Case(
        "stains-over-source-image",
        _on(image_slide, lambda s: bs.pp.normalize_stains(s, key_added="he")),
        ValueError,
        "'he' \\(not written by bitro_sc",
    ),
    # --- cell steps -----------------------------------------------------------------------------
    Case(
        "features-no-cells",
        _on(image_slide, lambda s: bs.tl.cell_features(s, progress=False)),
        KeyError,
        r"bs\.tl\.segment",
    ),
    Case(
        "phenotypes-zero-cells",
        _on(_zero_cells, lambda s: bs.tl.phenotypes(s, overwrite=True)),
        ValueError,
        "0 cells.*segmentation found no nuclei",
    ),
    Case(
        "phenotypes-algorithm",
        _on(cells_slide, lambda s: bs.tl.phenotypes(s, algorithm="dbscan", overwrite=True)),
        ValueError,
        "algorithm",
    ),
    Case(
        "phenotypes-over-users-column",
        _on(cells_slide, lambda s: bs.tl.phenotypes(s, key_added="x_um")),
        ValueError,
        r"obs\['x_um'\] \(not written by bitro_sc",
    ),
    Case("assign-no-cells", _on(image_slide, lambda s: bs.tl.assign_cells(s)), KeyError, r"bs\.tl\.segment"),
    Case(
        "assign-over-users-column",
        _on(cells_slide, lambda s: bs.tl.assign_cells(s, key_added="cell_id")),
        ValueError,
        r"obs\['cell_id'\] \(not written by bitro_sc",
    ),
    Case("graph-k-zero", _on(cells_slide, lambda s: bs.tl.cell_graph(s, k=0)), ValueError, "integer ≥ 1"),
    Case("graph-k-fraction", _on(cells_slide, lambda s: bs.tl.cell_graph(s, k=2.5)), TypeError, "integer"),
    Case(
        "graph-radius-negative",
        _on(cells_slide, lambda s: bs.tl.cell_graph(s, radius_um=-1)),
        ValueError,
        "radius_um.*positive",
    ),
    Case(
        "graph-radius-inf",
        _on(cells_slide, lambda s: bs.tl.cell_graph(s, radius_um=math.inf)),
        ValueError,
        "finite",
    ),
    Case(
        "graph-over-users-graph",
        _on(cells_slide, lambda s: bs.tl.cell_graph(s)),
        ValueError,
        r"obsp\['spatial_connectivities'\] \(not written by bitro_sc",
    ),
    # --- training -------------------------------------------------------------------------------
    Case(
        "fit-policy-case",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, transfer="spatial", policy="loRA", progress=False)),
        ValueError,
        "did you mean 'lora'",
    ),
    Case(
        "fit-transfer-unknown",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, transfer="both")),
        ValueError,
        r"`transfer` must be one of",
    ),
    Case(
        "fit-level-cell",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, level="cell")),
        ValueError,
        "`level` must be one of",
    ),
    Case(
        "fit-genes-string",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, genes="g0")),
        TypeError,
        r"single string 'g0'.*\['g0'\]",
    ),
    Case("fit-genes-empty", _on(cells_slide, lambda s: bs.tl.fit_bitro(s, genes=[])), ValueError, "is empty"),
    Case(
        "fit-device-typo",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, device="gpu")),
        ValueError,
        "not a torch device",
    ),
    Case(
        "fit-epochs-zero", _on(cells_slide, lambda s: bs.tl.fit_bitro(s, epochs=0)), ValueError, "epochs.*≥ 1"
    ),
    Case(
        "fit-nan-counts",
        _on(_with_x(lambda x: np.where(x == x.max(), np.nan, x)), lambda s: bs.tl.fit_bitro(s)),
        ValueError,
        "NaN or infinite",
    ),
    Case(
        "fit-log-counts",
        _on(_with_x(lambda x: np.log1p(x / x.sum(1, keepdims=True) * 1e4)), lambda s: bs.tl.fit_bitro(s)),
        ValueError,
        "looks log-transformed",
    ),
    Case(
        "fit-negative-counts",
        _on(_with_x(lambda x: x - x.mean(0)), lambda s: bs.tl.fit_bitro(s)),
        ValueError,
        "negative values",
    ),
    Case(
        "fit-duplicate-genes",
        _on(_dup_genes, lambda s: bs.tl.fit_bitro(s)),
        ValueError,
        "sum_duplicate_genes",
    ),
    Case(
        "fit-duplicate-spots",
        _on(_dup_spots, lambda s: bs.tl.fit_bitro(s)),
        ValueError,
        "duplicated ids in obs_names",
    ),
    Case(
        "fit-record-reserved",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, key_added="spatialdata_attrs")),
        ValueError,
        "spatialdata's own metadata",
    ),
    Case(
        "fit-bulk-log",
        _on(_bulk_log, lambda s: bs.tl.fit_bitro(s, level="bulk")),
        ValueError,
        "looks log-transformed",
    ),
    Case(
        "fit-base-without-transfer",
        _on(cells_slide, lambda s: bs.tl.fit_bitro(s, base="model.pt")),
        ValueError,
        "only used with",
    ),
    Case(
        "baseline-method-unknown",
        _on(cells_slide, lambda s: bs.tl.fit_baseline(s, method="lasso")),
        ValueError,
        r"`method` must be one of",
    ),
    Case(
        "baseline-genes-string",
        _on(cells_slide, lambda s: bs.tl.fit_baseline(s, genes="g0")),
        TypeError,
        "single string",
    ),
    Case(
        "baseline-nan-counts",
        _on(
            _with_x(lambda x: np.where(x == x.max(), np.nan, x)),
            lambda s: bs.tl.fit_baseline(s, genes=["g0"]),
        ),
        ValueError,
        "NaN",
    ),
    # --- prediction -----------------------------------------------------------------------------
    Case(
        "predict-level-unknown",
        _on(cells_slide, lambda s: bs.tl.predict_bitro(s, MODEL(), level="slide")),
        ValueError,
        "`level` must be one of",
    ),
    Case(
        "predict-not-a-model",
        _on(cells_slide, lambda s: bs.tl.predict_bitro(s, object())),
        TypeError,
        "ExpressionModel",
    ),
    Case(
        "predict-into-spatialdata-attrs",
        _on(cells_slide, lambda s: bs.tl.predict_bitro(s, MODEL(), key_added="spatialdata_attrs")),
        ValueError,
        "spatialdata's own metadata",
    ),
    Case(
        "predict-over-feature-params",
        _on(cells_slide, lambda s: bs.tl.predict_bitro(s, MODEL(), level="cell", key_added="bitro_features")),
        ValueError,
        r"uns\['bitro_features'\] \(not written by bitro_sc",
    ),
    Case(
        "predict-over-users-layer",
        _on(_with_layer, lambda s: bs.tl.predict_bitro(s, MODEL(), key_added="mine")),
        ValueError,
        r"layers\['mine'\] \(not written by bitro_sc",
    ),
    # --- analysis -------------------------------------------------------------------------------
    Case(
        "holdout-unknown-test-id",
        _plain(lambda t: bs.tl.holdout([cells_slide(sample_id=f"S{i}") for i in range(2)], test=["nope"])),
        ValueError,
        "not among the slides",
    ),
    Case(
        "cli-holdout-unknown-test-id",
        _plain(_holdout_config),
        ValueError,
        r"Test sample\(s\) \['nope'\] are not among",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitro_sc import cli

    for name in ("read_slides", "load_config", "prepare"):  # patched by the CLI case, restored here
        monkeypatch.setattr(cli, name, getattr(cli, name))
    sdata, call = case.call(tmp_path)
    before = snapshot(sdata) if sdata is not None else None
    with pytest.raises(case.error, match=case.match) as info:
        call()
    message = str(info.value)
    assert len(message) > 30, f"{case.id}: the message is too short to name the problem and the fix"
    if sdata is not None:
        assert snapshot(sdata) == before, f"{case.id}: the failing call changed the SpatialData"


def test_docs_table_lists_60_cases_each_backed_by_a_test() -> None:
    rows = [r for r in DOCS.read_text().splitlines() if r.startswith("| ") and "`" in r]
    last_cells = [r.rstrip(" |").rsplit("|", 1)[-1].strip() for r in rows]
    named = [m.group(1) for c in last_cells for m in [re.fullmatch(r"`(test_\w+(?:\[[\w-]+\])?)`", c)] if m]
    assert len(rows) >= 60
    assert len(named) == len(rows)
    ids = {c.id for c in CASES}
    here = Path(__file__).parent
    tests = {
        m for f in here.glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), flags=re.M)
    }
    for name in named:
        base, _, param = name.partition("[")
        assert base in tests, f"docs/bad_inputs.md names {name!r}, which is not a test"
        if param:
            assert param.rstrip("]") in ids, f"docs/bad_inputs.md names case {param!r}, which does not exist"


def test_every_case_is_documented() -> None:
    text = DOCS.read_text()
    missing = [c.id for c in CASES if f"test_bad_input[{c.id}]" not in text]
    assert not missing, f"cases not in docs/bad_inputs.md: {missing}"


def test_cuda_without_cuda_is_refused() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    s = cells_slide()
    before = snapshot(s)
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine.*device='cpu'"):
        bs.tl.fit_bitro(s, device="cuda")
    assert snapshot(s) == before


def test_cases_have_distinct_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


def test_json_manifest_lists_every_file(tmp_path: Path) -> None:
    path = zarr_store(tmp_path)
    listed = set(json.loads((path / "bitro_sc_manifest.json").read_text())["files"])
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert listed == on_disk - {"bitro_sc_manifest.json"}
