"""Real slide files end to end: pyramidal tiled JPEG TIFFs built from HER2ST H&E, read -> tissue mask ->
segment -> features -> graph, streaming from the file, at several sizes.

The TIFF is a mosaic of the 512 px tiles of the four HER2ST sections that are ≥ 90% tissue (a dense
slide: every tile is tissue), written tile by tile to a temporary folder (never into the data
folder); each size runs in its own process so that its peak RSS is its own.

    nice -n 5 python benchmarks/bench_scale.py --sizes 64 256 1024 --out benchmarks/results/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segmentation import HER2ST_MPP, data_dir  # the HER2ST folder and pixel size, defined once

SECTIONS = ("C2", "C3", "C4", "C5")
TILE = 512


def peak_rss_gib() -> float:
    """This process's peak RSS (``VmHWM``: exec starts it afresh, unlike ``ru_maxrss``, which a child
    inherits from the parent that forked it), GiB; ``ru_maxrss`` where ``/proc`` is absent (macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tissue_tiles() -> list[np.ndarray]:
    """The 512 px tiles of the HER2ST sections that are at least 90% tissue (dense slides)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    out = []
    for s in SECTIONS:
        full = np.asarray(Image.open(data_dir() / f"{s}_HE.jpg").convert("RGB"))
        for y in range(0, full.shape[0] - TILE + 1, TILE):
            for x in range(0, full.shape[1] - TILE + 1, TILE):
                tile = full[y : y + TILE, x : x + TILE]
                if (tile[::8, ::8].mean(-1) < 215).mean() >= 0.9:
                    out.append(np.ascontiguousarray(tile))
        del full
    return out


def write_mosaic(path: Path, side: int, pieces: list[np.ndarray], *, ome: bool = False) -> None:
    """A ``side``² px pyramidal tiled JPEG TIFF of tissue tiles (levels /2 down to < 2048 px, in
    SubIFDs); ``ome=True`` writes an OME-TIFF (pixel size in the OME-XML, µm)."""
    import tifffile

    levels = [1]
    while side // (2 * levels[-1]) >= 2048:
        levels.append(2 * levels[-1])
    n0 = side // TILE  # level-0 tiles per side

    def piece(ty: int, tx: int) -> np.ndarray:
        return pieces[(ty * n0 + tx * 7) % len(pieces)]

    def tiles(factor: int):
        n = n0 // factor  # output tiles per side at this level
        sub = TILE // factor
        for oy in range(n):
            for ox in range(n):
                out = np.empty((TILE, TILE, 3), np.uint8)
                for dy in range(factor):
                    for dx in range(factor):
                        p = piece(oy * factor + dy, ox * factor + dx).astype(np.float32)
                        small = p.reshape(sub, factor, sub, factor, 3).mean((1, 3)) if factor > 1 else p
                        out[dy * sub : (dy + 1) * sub, dx * sub : (dx + 1) * sub] = small.round()
                yield out

    res = 1e4 / HER2ST_MPP  # px per cm
    ome_meta = {
        "axes": "YXS",
        "PhysicalSizeX": HER2ST_MPP,
        "PhysicalSizeY": HER2ST_MPP,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeYUnit": "µm",
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tif:
        for i, factor in enumerate(levels):
            n = side // factor
            tif.write(
                tiles(factor),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subifds=len(levels) - 1 if i == 0 else None,
                subfiletype=1 if i else 0,
                resolution=(res / factor, res / factor),
                resolutionunit="CENTIMETER",
                **({"metadata": ome_meta} if ome and i == 0 else {}),
            )


#: where the fitted model is kept between runs (fitting is not part of the measured pipeline)
MODEL_DIR = Path(tempfile.gettempdir()) / "bitro_scale_model"


def fitted_model(folder: Path = MODEL_DIR) -> Path:
    """A BiTro model fitted on HER2ST C2 with the package defaults (saved once under ``folder``)."""
    path = folder / "her2st_c2_model"
    if not (path / "config.json").is_file():
        import bitro_sc as bs

        d = data_dir()
        sdata = bs.io.read_st(d / "C2_HE.jpg", d / "C2_counts.tsv.gz", d / "C2_selection.tsv", mpp=HER2ST_MPP)
        bs.tl.segment(sdata, progress=False)
        model = bs.tl.fit_bitro(sdata, seed=0, progress=False)
        model.save(path, overwrite=True)
    return path


def run_one(path: Path, model_path: Path | None = None) -> dict:
    """read -> segment (tissue tiles only) -> features -> graph -> (with a model) cell-level prediction
    written to a zarr store, on one file; stage times, peak RSS."""
    import torch
    from spatialdata import SpatialData

    import bitro_sc as bs

    torch.set_num_threads(os.cpu_count() or 1)
    t = {}
    t0 = time.perf_counter()
    sdata = bs.io.read_wsi(path)
    t["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bs.tl.segment(sdata, progress=False)
    t["segment_s"] = time.perf_counter() - t0  # includes the tissue mask
    t0 = time.perf_counter()
    bs.tl.cell_features(sdata, progress=False)
    t["features_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bs.tl.cell_graph(sdata)
    t["graph_s"] = time.perf_counter() - t0
    t["n_cells"] = int(sdata.tables["cells"].n_obs)
    t["peak_rss_graph_gib"] = peak_rss_gib()
    if model_path is not None:
        model = bs.models.BiTroModel.load(model_path)
        t0 = time.perf_counter()
        # as `bs.tl.run_batch` predicts: cell values written to disk by row blocks as they are computed
        bs.tl.predict_bitro(
            sdata, model, level="cell", store=path.with_suffix(".predictions.zarr"), overwrite=True
        )
        t["predict_s"] = time.perf_counter() - t0
        layer = sdata.tables["cells"].layers["bitro"]
        t["n_genes"], t["layer_dtype"] = int(layer.shape[1]), str(layer.dtype)
        t["peak_rss_predict_gib"] = peak_rss_gib()
        t0 = time.perf_counter()
        # as `bs.tl.run_batch` stores a slide: every element but the image (the file stays the source)
        store = SpatialData(
            **{k: dict(getattr(sdata, k)) for k in ("labels", "shapes", "points", "tables")},
            attrs=sdata.attrs,
        )
        bs.io.write_zarr(store, path.with_suffix(".zarr"), overwrite=True)
        t["write_s"] = time.perf_counter() - t0
    t["peak_rss_gib"] = peak_rss_gib()
    return t


def measure(
    sizes: list[int], formats: list[str], *, predict: bool = True, keep: Path | None = None
) -> list[dict]:
    """Write each size in each format (``"tiff"``, ``"ome"``) and run it in its own process; the
    load average (1 min) before and after each run is in its row. ``keep``: write the files into
    that folder and keep them (a file already there is reused, not written again)."""
    rows = []
    pieces = tissue_tiles()
    print(f"{len(pieces)} tissue tiles of {TILE} px", flush=True)
    with tempfile.TemporaryDirectory(prefix="bitro_scale_") as scratch:
        tmp = str(keep) if keep is not None else scratch
        model = ["--model", str(fitted_model())] if predict else []
        for mp in sizes:
            unit = 8 * TILE if mp >= 16 else TILE  # whole tiles on every level (one level below 16 MP)
            side = max(1, round(np.sqrt(mp * 1e6) / unit)) * unit
            for fmt in formats:
                path = Path(tmp) / f"mosaic_{mp}mp.{'ome.tif' if fmt == 'ome' else 'tif'}"
                t0 = time.perf_counter()
                if keep is None or not path.is_file():
                    write_mosaic(path, side, pieces, ome=fmt == "ome")
                file_s = time.perf_counter() - t0  # writing the TIFF (not a stage)
                load0 = os.getloadavg()[0]
                out = subprocess.run(
                    [sys.executable, __file__, "--one", str(path), *model],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                line = next(ln[7:] for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
                res = json.loads(line)
                res.update(
                    mp=side * side / 1e6,
                    format=fmt,
                    side_px=side,
                    file_gib=path.stat().st_size / 2**30,
                    file_s=file_s,
                    load_before=load0,
                    load_after=os.getloadavg()[0],
                )
                res["total_s"] = sum(res.get(k, 0.0) for k in STAGES)
                rows.append(res)
                if keep is None:
                    path.unlink()
                shutil.rmtree(path.with_suffix(".zarr"), ignore_errors=True)
                print(json.dumps(res), flush=True)
    return rows


#: the timed stages (``predict_s``: cell-level prediction; ``write_s``: the zarr store)
STAGES = ("read_s", "segment_s", "features_s", "graph_s", "predict_s", "write_s")
COLS = [
    *("mp", "format", "n_cells", "segment_s", "features_s", "graph_s", "predict_s", "write_s", "total_s"),
    *("peak_rss_gib", "file_gib"),
]


def table(rows: list[dict]) -> list[str]:
    """Markdown rows: every stage, per-MP and per-cell rates, the load average around the run."""
    lines = [
        "| " + " | ".join(COLS) + " | s per MP | µs per cell | load 1 min (before → after) |",
        "|" + "---|" * (len(COLS) + 3),
    ]
    for r in rows:
        vals = [
            str(r[c])
            if c == "format"
            else f"{r[c]:.0f}"
            if c == "n_cells"
            else f"{r.get(c, float('nan')):.2f}"
            for c in COLS
        ]
        rate = 1e6 * r["total_s"] / max(r["n_cells"], 1)
        lines.append(
            "| " + " | ".join(vals) + f" | {r['total_s'] / r['mp']:.3f} | {rate:.0f} | "
            f"{r['load_before']:.1f} → {r['load_after']:.1f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="megapixels")
    p.add_argument("--formats", nargs="+", default=["tiff", "ome"], choices=["tiff", "ome"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    p.add_argument("--no-predict", action="store_true", help="skip cell-level prediction and zarr write")
    p.add_argument("--keep", type=Path, help="write the TIFFs into this folder and keep them (reused)")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # child: run one file, print JSON
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)  # child: the fitted model
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.model)))
        return
    import bitro_sc

    load0 = os.getloadavg()
    rows = measure(args.sizes, args.formats, predict=not args.no_predict, keep=args.keep)
    load1 = os.getloadavg()
    lines = [
        f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Command: `python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), Python "
        f"{platform.python_version()}, bitro_sc {bitro_sc.__version__}, {platform.platform()}",
        "Files: pyramidal tiled (512 px) JPEG TIFFs (`tiff`) and OME-TIFFs (`ome`, pyramid in SubIFDs, "
        "pixel size in the OME-XML), mosaics of the ≥ 90%-tissue 512 px tiles of HER2ST "
        f"C2–C5 at {HER2ST_MPP} µm/px; "
        "stages: read (lazy) → tissue mask + segment (tissue tiles) → morphology features → kNN graph "
        "→ cell-level prediction (`predict_s`; a BiTro model fitted on HER2ST C2 with the defaults, float32 "
        "layer) → `bs.io.write_zarr` of every element but the image, as `bs.tl.run_batch` stores a slide "
        "(`write_s`).",
        f"Load average (1, 5, 15 min) before the runs: {', '.join(f'{v:.1f}' for v in load0)}; after: "
        f"{', '.join(f'{v:.1f}' for v in load1)}.",
        "",
        *table(rows),
        "",
    ]
    text = "\n".join(lines)
    # a dated section appended to the results file (earlier runs stay)
    old = args.out.read_text().rstrip("\n") + "\n\n" if args.out.is_file() else ""
    args.out.write_text(old + text)
    print(text)


if __name__ == "__main__":
    main()
