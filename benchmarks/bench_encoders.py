"""Cell encoders on real data: HER2ST leave-one-section-out, and encoder throughput on CPU.

Sections (``--sections``):

``her2st``
    Leave-one-section-out over the HER2ST sections C2-C5 for several feature sets (``--sets``):
    ``morphology``, ``context``, ``morphology+context``, ``niche`` (morphology plus its 300 µm
    neighbourhood mean), and with ``--ssl`` a self-supervised
    encoder (``bs.tl.train_encoder``) alone (``ssl``, PCA) and combined. In each fold the features
    are standardised — and learned embeddings reduced by PCA — with statistics of the three training
    sections only (``bs.tl.cell_features(train)``, then ``scaler=train[0]`` on the held-out one);
    phenotypes are re-clustered per feature set on the four sections together, as in
    ``bench_accuracy.py`` (unsupervised, no expression). BiTro (``--seeds`` model seeds)
    and ridge are fitted on the union of the fold's top-50 training HVGs and the marker panel (genes
    expressed in the training sections), and scored on the held-out section: HEST score (mean
    Pearson over the top-50 HVGs) and the mean Pearson over the marker panel.
``speed``
    CPU throughput (cells/s) and peak memory of the encoders on a synthetic slide.

Run: ``python benchmarks/bench_encoders.py --sections her2st --ssl``; results go to
``benchmarks/results/encoders.md`` (with the command). Raw features are cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "encoders.md"
MARKERS = [
    "EPCAM",
    "KRT19",
    "KRT8",
    "KRT18",
    "ERBB2",
    "GRB7",
    "MUC1",
    "SCGB2A2",
    "CD74",
    "PTPRC",
    "IGKC",
    "IGHG3",
    "FN1",
    "COL1A1",
    "COL1A2",
    "COL3A1",
    "DCN",
    "LUM",
    "MGP",
]
SETS = ("morphology", "context", "morphology+context", "niche")


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


class Cached:
    """An encoder whose raw features per slide are computed once (memory and ``.npy`` cache)."""

    def __init__(self, encoder: Any, cache: Path, tag: str) -> None:
        import bitro_sc as bs

        self.inner = bs.encoders.get_encoder(encoder)
        self.name = str(getattr(self.inner, "name", tag))
        self.params = dict(getattr(self.inner, "params", {}))
        self.cache, self.tag = cache, tag
        self.mem: dict[str, tuple[np.ndarray, list[str]]] = {}

    def encode(self, image: Any, cells: pd.DataFrame, **kw: Any) -> tuple[np.ndarray, list[str]]:
        key = f"{self.tag}_{len(cells)}_{int(cells['x_px'].sum())}"
        if key not in self.mem:
            f = self.cache / f"{key}.npz"
            if f.is_file():
                z = np.load(f, allow_pickle=False)
                self.mem[key] = (z["x"], [str(v) for v in z["names"]])
            else:
                x, names = self.inner.encode(image, cells, **kw)
                np.savez(f, x=x, names=np.asarray(names))
                self.mem[key] = (x, list(names))
        x, names = self.mem[key]
        return x.copy(), list(names)


def load_her2st(cache: Path) -> list:
    """HER2ST C2-C5, segmented, cells assigned, cell graph (segmentation cached as zarr)."""
    import spatialdata as sd
    from bench_accuracy import her2st_slides

    import bitro_sc as bs

    names = ("C2", "C3", "C4", "C5")
    if all((cache / f"{n}.zarr").is_dir() for n in names):
        slides = [sd.read_zarr(cache / f"{n}.zarr") for n in names]
    else:
        slides = her2st_slides()
        if slides is None:
            raise SystemExit("HER2ST data not found ($BITRO_SC_DATA or ../shared/data).")
        for s, n in zip(slides, names, strict=True):
            bs.tl.segment(s, progress=False)
            s.write(cache / f"{n}.zarr", overwrite=True)
    for s in slides:
        bs.tl.assign_cells(s, overwrite=True)
        bs.tl.cell_graph(s, overwrite=True)
    return slides


def featurise_fold(train: list, test: Any, encoder: Any, *, fov_um: float) -> None:
    """Features (and phenotypes) of one fold: scaling / PCA / k-means fitted on ``train`` only."""
    import bitro_sc as bs

    bs.tl.cell_features(train, encoder=encoder, fov_um=fov_um, overwrite=True, progress=False)
    bs.tl.cell_features(test, encoder=encoder, fov_um=fov_um, scaler=train[0], overwrite=True, progress=False)
    bs.tl.phenotypes([*train, test], overwrite=True)


def bench_her2st(args: argparse.Namespace, t0: float) -> str:
    import bitro_sc as bs

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    slides = load_her2st(cache)
    ids = [bs.slide_info(s)["sample_id"] for s in slides]
    assert ids == ["C2", "C3", "C4", "C5"], ids
    _log(f"HER2ST loaded: {[s.tables['cells'].n_obs for s in slides]} cells", t0)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    parts = {p for s in sets for p in s.partition(":")[0].split("+")}
    encoders: dict[str, Any] = {p: Cached(p, cache, p) for p in parts if p not in ("ssl", "random", "pixels")}
    if "random" in parts:  # baseline: the same CNN, randomly initialised (no training)
        rnd = bs.tl.train_encoder(slides, n_cells=256, epochs=0, seed=0, progress=False)
        encoders["random"] = Cached(rnd, cache, "random_cnn")
    if "pixels" in parts:  # baseline: the raw crop (12 x 12 px over the same field of view), PCA
        import torch

        pix = bs.encoders.TorchEncoder(torch.nn.Flatten(), input_size=12, mean=(0, 0, 0), std=(1, 1, 1))
        encoders["pixels"] = Cached(pix, cache, "pixels12")
    ssl_info = ""
    if "ssl" in parts:
        enc_path = cache / f"ssl_{args.ssl_cells}_{args.ssl_epochs}.pt"
        if not enc_path.is_file():
            start = time.perf_counter()
            enc = bs.tl.train_encoder(
                slides, n_cells=args.ssl_cells, epochs=args.ssl_epochs, seed=0, progress=False
            )
            enc.save(enc_path)
            ssl_info = f"self-supervised encoder trained in {time.perf_counter() - start:.0f} s; "
            _log(ssl_info, t0)
        encoders["ssl"] = Cached(str(enc_path), cache, enc_path.stem)
        ssl_info += f"`{enc_path.name}`: {encoders['ssl'].params}"
    rows = []
    for held in ids:
        train = [s for s, i in zip(slides, ids, strict=True) if i != held]
        test = next(s for s, i in zip(slides, ids, strict=True) if i == held)
        expressed = set.intersection(*(set(s.tables["table"].var_names) for s in train))
        markers = [g for g in MARKERS if g in expressed]
        hvgs: list[str] | None = None
        for spec in sets:
            fset, _, only = spec.partition(":")  # "name:ridge" fits ridge only
            enc = bs.encoders.CombinedEncoder(
                [encoders[p] for p in fset.split("+")],
                n_components=args.n_components,
                reduce=[p in ("ssl", "random", "pixels") for p in fset.split("+")],
            )
            featurise_fold(train, test, enc, fov_um=args.fov_um)
            if hvgs is None:  # the fold's top-50 training HVGs (the "mean" baseline fits in no time)
                hvgs = list(
                    bs.tl.holdout(slides, test=[held], methods=("mean",), top_hvg=50, progress=False).genes
                )
            genes = list(dict.fromkeys([*hvgs, *markers]))
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                methods = ("bitro", "ridge") if seed == args.first_seed else ("bitro",)
                if only:
                    methods = tuple(m for m in methods if m == only)
                if not methods:
                    continue
                res = bs.tl.holdout(
                    slides,
                    test=[held],
                    methods=methods,
                    top_hvg=50,
                    genes=genes,
                    fit_kwargs={"bitro": {"epochs": args.epochs, "seed": seed, "progress": False}}
                    if "bitro" in methods
                    else None,
                    progress=False,
                )
                sc = res.scores
                choice = None  # BiTro's validation choice of the bag-level linear term (bag_linear="auto")
                if "bitro" in methods:
                    sel = res.models["bitro"].record.get("bag_linear_selection")
                    choice = (
                        res.models["bitro"].record["model"].get("bag_linear")
                        if sel is None
                        else sel["chosen"]
                    )
                for m in methods:
                    d = sc[sc["method"] == m].set_index("gene")["pearson"]
                    hv = sc[(sc["method"] == m) & sc["is_hvg"]]["pearson"]
                    rows.append(
                        {
                            "features": fset,
                            "method": m,
                            "seed": seed,
                            "test": held,
                            "hest_score": float(hv.mean()),
                            "markers": float(d.reindex(markers).mean()),
                            "n_markers": len(markers),
                            "n_features": int(test.tables["cells"].obsm["X_bitro"].shape[1]),
                            "bag_linear": choice if m == "bitro" else None,
                        }
                    )
            _log(f"{held} {fset}: {rows[-1]}", t0)
    df = pd.DataFrame(rows)
    df.to_csv(cache / "her2st_scores.csv", index=False)
    per_seed = df.groupby(["features", "method", "seed"])[["hest_score", "markers"]].mean()
    summ = per_seed.groupby(["features", "method"]).agg(["mean", "min", "max"])
    summ.columns = [f"{a}_{b}" for a, b in summ.columns]
    nfeat = df.groupby(["features"])["n_features"].first()
    summ = summ.join(nfeat, on="features")
    folds = df.pivot_table(index=["features", "method"], columns="test", values="hest_score", aggfunc="mean")
    return (
        "### HER2ST leave-one-section-out "
        f"(C2-C5; BiTro {args.epochs} epochs, {args.seeds} model seed(s))\n\n"
        "Mean over the 4 held-out sections (min / max over BiTro model seeds); `hest_score` = mean "
        "Pearson over the fold's top-50 training HVGs, `markers` = mean Pearson over the marker panel "
        f"genes expressed in the training sections.\n\n{_md(summ.reset_index())}\n\n"
        f"HEST score per held-out section (mean over seeds):\n\n{_md(folds.reset_index())}\n\n"
        + (f"{ssl_info}\n" if ssl_info else "")
    )


def _speed_model(kind: str, folder: Path) -> str:
    """A randomly initialised model of a realistic size saved with ``save_pretrained`` (no download)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, ResNetConfig, ResNetModel

    path = folder / kind
    if not path.is_dir():
        torch.manual_seed(0)
        if kind == "vit_s16":  # ViT-S/16 (DINOv2 layout): 384 wide, 12 blocks, 6 heads, 224 px
            cfg = Dinov2Config(
                hidden_size=384,
                num_hidden_layers=12,
                num_attention_heads=6,
                intermediate_size=1536,
                patch_size=16,
                image_size=224,
            )
            Dinov2Model(cfg).save_pretrained(path)
        else:  # ResNet-18 layout, 224 px
            cfg = ResNetConfig(
                embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"
            )
            ResNetModel(cfg).save_pretrained(path)
    return f"hf:{path}"


def speed_one(spec: str, n: int, cache: Path) -> dict[str, Any]:
    """Encode ``n`` cells of one HER2ST section with ``spec``; cells/s and peak RSS of this process."""
    import resource

    import spatialdata
    import spatialdata as sd

    import bitro_sc as bs

    slide = sd.read_zarr(cache / "C3.zarr")
    obs = slide.tables["cells"].obs.iloc[:n]
    key = next(iter(slide.images))
    image = spatialdata.get_pyramid_levels(slide.images[key], n=0)
    mpp = bs.get_mpp(slide, key)
    if spec in ("vit_s16", "resnet18"):
        enc = bs.encoders.get_encoder(_speed_model(spec, cache))
    elif spec == "learned":
        enc = bs.encoders.load_encoder(sorted(cache.glob("ssl_*.pt"))[0])
    else:
        enc = bs.encoders.get_encoder(spec)
    if hasattr(enc, "build"):
        enc.build()
    start = time.perf_counter()
    x, _ = enc.encode(image, obs, mpp=mpp, fov_um=48.0, batch_size=64, device="cpu", progress=False)
    sec = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "encoder": spec,
        "cells": n,
        "dim": x.shape[1],
        "seconds": sec,
        "cells_per_s": n / sec,
        "peak_rss_mb": peak,
    }


def bench_speed(args: argparse.Namespace, t0: float) -> str:
    import json
    import subprocess

    rows = []
    for spec, n in (
        ("morphology", 22257),
        ("niche", 22257),
        ("context", 22257),
        ("learned", 2000),
        ("resnet18", 64),
        ("vit_s16", 32),
    ):
        cmd = [sys.executable, __file__, "--speed-one", f"{spec}:{n}", "--cache", args.cache]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        _log(str(rows[-1]), t0)
    df = pd.DataFrame(rows)
    return (
        "### CPU throughput and peak memory (one process, "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')} thread(s), shared machine)\n\n"
        "Cells of HER2ST section C3 (0.69 µm/px), each encoder in a fresh process; `peak_rss_mb` is the "
        "whole process (Python, torch, the slide's lazily read image included).\n\n"
        f"{_md(df)}\n"
    )


def _md(df: pd.DataFrame) -> str:
    try:
        return df.to_markdown(index=False, floatfmt=".3f")
    except ImportError:
        return "```\n" + df.to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n```"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="her2st")
    p.add_argument("--sets", default=",".join(SETS), help="feature sets (encoder names joined by '+')")
    p.add_argument(
        "--ssl", action="store_true", help="add the self-supervised sets (ssl, morphology+ssl, ...)"
    )
    p.add_argument("--ssl-cells", type=int, default=20000)
    p.add_argument("--ssl-epochs", type=int, default=10)
    p.add_argument("--n-components", type=int, default=16, help="PCA components of learned embeddings")
    p.add_argument("--fov-um", type=float, default=48.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="BiTro model seeds first-seed ... + seeds - 1")
    p.add_argument("--cache", default="benchmarks/.cache/encoders")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true")
    p.add_argument("--speed-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.speed_one:  # child process of the speed section
        import json

        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        spec, _, n = args.speed_one.rpartition(":")
        print(json.dumps(speed_one(spec, int(n), Path(args.cache))))
        return 0
    if args.ssl:
        args.sets += ",ssl,morphology+ssl,morphology+context+ssl"
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    parts = []
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        start = time.perf_counter()
        if name == "her2st":
            text = bench_her2st(args, t0)
        elif name == "speed":
            text = bench_speed(args, t0)
        else:
            p.error(f"unknown section {name!r}")
        parts.append(text + f"\n({name}: {time.perf_counter() - start:.0f} s)\n")
        print(text, flush=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        "# Encoders benchmark\n\n"
        f"Command: `python benchmarks/bench_encoders.py {command}`  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"total {time.perf_counter() - t0:.0f} s.\n\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        out.write_text(out.read_text() + "\n---\n\n" + header.split("\n", 2)[2] + "\n".join(parts))
    else:
        out.write_text(header + "\n".join(parts))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
