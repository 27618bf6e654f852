"""Forward passes over bags, the exact chunked whole-slide gradient, and the training loop.

Whole slides (bulk level) are one bag each, whatever their number of cells. The slide is cut into
spatially coherent chunks of ``chunk_cells`` cells (Z-order), the attention window of the
Transformer and the GAT (graph edges between chunks are cut). The slide's sum-pooled profile is a
sum of chunk terms, so the gradient of the loss is computed exactly in two passes:

1. forward every chunk without gradients, accumulate the pooled profile and compute
   ``dLoss/dPooled``;
2. re-run each chunk with gradients and back-propagate that upstream gradient
   (``torch.autograd.backward(chunk_terms, grad)``).

Memory is bounded by one batch of chunks, time is linear in cells. Dropout draws the same random
numbers in both passes (each chunk batch runs under its own seed). Gene-wise attention pooling is
exact too (its numerator and denominator are sums of chunk terms under a common shift).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._bags import Partition, SlideCells, make_batch
from ._net import pool_bags

if TYPE_CHECKING:  # pragma: no cover
    from ._net import BiTroNet
    from ._params import TrainParams

#: cells per forward batch when a slide is processed in chunks (several chunks per batch)
CELLS_PER_BATCH = 4096


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


def loss_fn(pred: torch.Tensor, target: torch.Tensor, lib: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss over bags and genes; ``pred``/``target`` in counts per 10k, ``lib`` library sizes."""
    if kind == "mse":
        return ((torch.log1p(pred) - torch.log1p(target)) ** 2).mean()
    scale = (lib / 1e4)[:, None]
    mu = pred * scale + 1e-8
    k = target * scale
    return 2 * (torch.xlogy(k, k) - k * torch.log(mu) - k + mu).mean()  # Poisson deviance


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under its own torch seed without disturbing the global random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _chunk_batches(part: Partition, cells_per_batch: int) -> list[list[int]]:
    sizes = part.sizes()
    out: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for g, s in enumerate(sizes):
        if s == 0:
            continue
        if cur and n + s > cells_per_batch:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += int(s)
    if cur:
        out.append(cur)
    return out


def _terms(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    groups: list[int],
    device: torch.device,
    shift: torch.Tensor | None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Pooling terms of some chunks: [Σ y], [Σ y, Σ r] (RNA-content head) or, for attention,
    [Σ e^(s-m) y, Σ e^(s-m)] and m."""
    batch, _ = make_batch([slide], [part], [(0, g) for g in groups], device=device)
    y, s, r = net(batch)
    if r is not None:
        return [y.sum(0), r.sum(0)], None
    if s is None:
        return [y.sum(0)], None
    m = s.detach().max(0).values if shift is None else shift
    w = torch.exp(s - m)
    return [(w * y).sum(0), w.sum(0)], m


def _combine(
    acc: tuple[list[torch.Tensor], torch.Tensor | None] | None,
    new: tuple[list[torch.Tensor], torch.Tensor | None],
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    if acc is None:
        return new
    (terms, m), (nterms, nm) = acc, new
    if m is None or nm is None:
        return [a + b for a, b in zip(terms, nterms, strict=True)], None
    top = torch.maximum(m, nm)
    a, b = torch.exp(m - top), torch.exp(nm - top)
    return [t * a + u * b for t, u in zip(terms, nterms, strict=True)], top


def slide_scale(net: BiTroNet, n_cells: int) -> torch.Tensor | float:
    """Factor of a whole slide's summed cell values under plain sum pooling with ``slide_size_norm``:
    ``ref_cells / n``. A deep bulk library is normalised to counts per 10k whatever the slide's
    size, so the sum is scaled to a slide of the reference size (cell values stay shares of a bag
    of ``ref_cells`` cells, the average training bag). 1 otherwise."""
    p = net.params
    if p.pooling == "sum" and not p.normalized and p.slide_size_norm and n_cells > 0:
        return net.ref_cells / n_cells
    return 1.0


def _finalize(terms: list[torch.Tensor], net: BiTroNet, n_cells: int) -> torch.Tensor:
    """A whole slide's profile from its summed chunk terms."""
    params = net.params
    pooling = params.pooling
    if params.normalized:
        return terms[0] / terms[1]
    if pooling == "sum":
        return terms[0] * slide_scale(net, n_cells)
    if pooling == "mean":
        return terms[0] / n_cells
    return n_cells * terms[0] / terms[1]


def slide_profile(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    *,
    device: torch.device,
    seed: int = 0,
    cells_per_batch: int = CELLS_PER_BATCH,
) -> torch.Tensor:
    """Pooled profile (genes,) of a whole slide; differentiable when grad is enabled (reference path
    that keeps every chunk's graph in memory: small slides and tests only)."""
    acc = None
    for bi, groups in enumerate(_chunk_batches(part, cells_per_batch)):
        with seeded(seed + bi, device):
            acc = _combine(acc, _terms(net, slide, part, groups, device, None))
    if acc is None:
        raise ValueError("The slide has no cells: run `bs.tl.segment` on it (or drop it).")
    return _calibrated(net, _finalize(acc[0], net, int(part.order.size)), int(part.order.size))


def with_depth(net: BiTroNet, pooled: torch.Tensor, n_cells: torch.Tensor) -> torch.Tensor:
    """Bag profiles (bags, genes) times the net's depth factor for bags of ``n_cells`` cells (at
    the training level; unchanged without the RNA-content head)."""
    factor = net.depth_factor(n_cells)
    return pooled if factor is None else pooled * factor


def _calibrated(net: BiTroNet, profile: torch.Tensor, n_cells: int) -> torch.Tensor:
    """One slide's ``profile`` (genes,) through :func:`with_depth`."""
    return with_depth(net, profile[None], torch.tensor([float(n_cells)], device=profile.device))[0]


def slide_step(
    net: BiTroNet,
    item: BulkSlide,
    *,
    loss: str,
    device: torch.device,
    seed: int,
    scale: float = 1.0,
    cells_per_batch: int = CELLS_PER_BATCH,
) -> float:
    """Accumulate into ``.grad`` the exact gradient of ``scale * loss(slide profile)``; return the loss.

    Two passes over the chunks (see the module docstring); peak memory is one batch of chunks.
    """
    batches = _chunk_batches(item.part, cells_per_batch)
    n = int(item.part.order.size)
    acc = None
    with torch.no_grad():
        for bi, groups in enumerate(batches):
            with seeded(seed + bi, device):
                acc = _combine(acc, _terms(net, item.slide, item.part, groups, device, None))
    if acc is None:
        raise ValueError("The slide has no cells: run `bs.tl.segment` on it (or drop it).")
    terms, shift = acc
    leaves = [t.detach().requires_grad_(True) for t in terms]
    pooled = _calibrated(net, _finalize(leaves, net, n), n)
    target = torch.as_tensor(item.target, dtype=pooled.dtype, device=device)[None]
    lib = torch.tensor([item.lib], dtype=pooled.dtype, device=device)
    value = loss_fn(pooled[None], target, lib, loss) * scale
    extra: list[torch.Tensor] = [net.depth] if net.depth is not None and net.depth.requires_grad else []
    grads = list(torch.autograd.grad(value, [*leaves, *extra]))
    for param, grad in zip(extra, grads[len(leaves) :], strict=True):  # the depth exponent's share
        param.grad = grad if param.grad is None else param.grad + grad
    grads = grads[: len(leaves)]
    for bi, groups in enumerate(batches):
        with seeded(seed + bi, device):
            chunk_terms, _ = _terms(net, item.slide, item.part, groups, device, shift)
        torch.autograd.backward(chunk_terms, list(grads))
    return float(value.detach()) / scale


def slide_cell_values(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    *,
    device: torch.device,
    cells_per_batch: int = CELLS_PER_BATCH,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-cell values (n_cells, genes) of a whole slide and the cells' RNA contents (n_cells,) or
    ``None`` (eval; rows of cells outside the partition are NaN).

    With the RNA-content head the values are each cell's expression ``r · p`` and the slide profile
    is ``values.sum(0) / rna.sum()``; otherwise they are contributions that sum to the profile."""
    pooling = net.params.pooling
    batches = _chunk_batches(part, cells_per_batch)
    n = int(part.order.size)
    out = np.full((slide.n_cells, net.n_genes), np.nan, dtype=np.float32)
    rna = np.full(slide.n_cells, np.nan, dtype=np.float32) if net.params.normalized else None
    with torch.no_grad():
        shift = denom = None
        if pooling == "attention":
            acc = None
            for groups in batches:
                acc = _combine(acc, _terms(net, slide, part, groups, device, None))
            assert acc is not None
            shift, denom = acc[1], acc[0][1]
        for groups in batches:
            batch, cells = make_batch([slide], [part], [(0, g) for g in groups], device=device)
            y, s, r = net(batch)
            if rna is not None:
                assert r is not None
                rna[cells] = r[:, 0].float().cpu().numpy()
            elif pooling == "mean":
                y = y / n
            elif pooling == "sum":
                y = y * slide_scale(net, n)
            elif pooling == "attention":
                assert s is not None
                assert shift is not None
                assert denom is not None
                y = n * torch.exp(s - shift) * y / denom
            out[cells] = y.float().cpu().numpy()
    return out, rna


def spot_values(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    groups: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 256,
    with_cells: bool = False,
    calibrate: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Profiles of spot windows ``groups`` (len, genes) and, optionally, per-cell values (slide cells
    × genes, NaN for cells outside these spots) and RNA contents (see :func:`slide_cell_values`).
    ``calibrate``: apply the depth factor (a spot-trained model predicting spots). Eval mode is the
    caller's job."""
    prof = np.zeros((len(groups), net.n_genes), dtype=np.float32)
    cells_out = np.full((slide.n_cells, net.n_genes), np.nan, dtype=np.float32) if with_cells else None
    rna = np.full(slide.n_cells, np.nan, dtype=np.float32) if with_cells and net.params.normalized else None
    with torch.no_grad():
        for start in range(0, len(groups), batch_size):
            wins = [(0, int(g)) for g in groups[start : start + batch_size]]
            batch, cells = make_batch([slide], [part], wins, device=device)
            y, s, r = net(batch)
            pooled, contrib = pool_bags(y, s, batch.batch, batch.num_graphs, net.params.pooling, r)
            if calibrate:
                pooled = with_depth(net, pooled, batch.n_cells)
            prof[start : start + len(wins)] = pooled.float().cpu().numpy()
            if cells_out is not None:
                cells_out[cells] = (y if r is not None else contrib).float().cpu().numpy()
            if rna is not None:
                assert r is not None
                rna[cells] = r[:, 0].float().cpu().numpy()
    return prof, cells_out, rna


def bag_targets(data: list[SpotSet] | list[BulkSlide], n_genes: int) -> np.ndarray:
    """Targets (bags × genes, counts per 10k) of the bags of ``data``, in their order."""
    return np.concatenate([d.target.reshape(-1, n_genes) for d in data])


def bag_predictions(
    net: BiTroNet, data: list[SpotSet] | list[BulkSlide], *, device: torch.device
) -> np.ndarray:
    """Current predictions (bags × genes) of the training bags of ``data``, in their order (eval mode)."""
    net.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for item in data:
            if isinstance(item, SpotSet):
                out.append(spot_values(net, item.slide, item.part, item.rows, device=device)[0])
            else:
                out.append(slide_profile(net, item.slide, item.part, device=device).cpu().numpy()[None])
    return np.concatenate(out).astype(np.float64)


def mean_log_rna(net: BiTroNet, data: list[SpotSet] | list[BulkSlide], *, device: torch.device) -> float:
    """Mean log RNA content of the cells of ``data`` (at most ~20k cells per slide; eval mode)."""
    logs: list[np.ndarray] = []
    net.eval()
    with torch.no_grad():
        for item in data:
            if isinstance(item, SpotSet):
                wins = [(0, int(g)) for g in item.rows[:2000]]
                batches = [wins[i : i + 256] for i in range(0, len(wins), 256)]
            else:
                batches = [[(0, g) for g in gs] for gs in _chunk_batches(item.part, CELLS_PER_BATCH)[:5]]
            for wins in batches:
                batch, _ = make_batch([item.slide], [item.part], wins, device=device)
                _, _, r = net(batch)
                if r is not None:
                    logs.append(torch.log(r[:, 0]).float().cpu().numpy())
    return float(np.concatenate(logs).mean()) if logs else 0.0


def _spot_loss(
    net: BiTroNet,
    sets: list[SpotSet],
    picks: list[tuple[int, int]],
    *,
    loss: str,
    device: torch.device,
    max_cells: int | None,
    rng: np.random.Generator | None,
    drop_cells: float = 0.0,
    library: tuple[float, float] | None = None,
) -> torch.Tensor:
    windows = [(si, int(sets[si].rows[k])) for si, k in picks]
    batch, _ = make_batch(
        [s.slide for s in sets],
        [s.part for s in sets],
        windows,
        max_cells=max_cells,
        drop_cells=drop_cells,
        rng=rng,
        device=device,
    )
    y, s, r = net(batch)
    pooled, _ = pool_bags(y, s, batch.batch, batch.num_graphs, net.params.pooling, r)
    pooled = with_depth(net, pooled, batch.n_cells)  # the spots' full cell counts, however many were kept
    target = torch.from_numpy(np.stack([sets[si].target[k] for si, k in picks])).to(device, pooled.dtype)
    lib = torch.tensor([sets[si].lib[k] for si, k in picks], dtype=pooled.dtype, device=device)
    value = loss_fn(pooled, target, lib, loss)
    if library is not None and r is not None:
        weight, per_cell = library
        kept = torch.bincount(batch.batch, minlength=batch.num_graphs).to(lib)
        # subsampled spots: their kept cells stand for all of them
        expected = lib / per_cell * kept / batch.n_cells.to(lib).clamp(min=1.0)
        value = value + weight * library_loss(r[:, 0], batch.batch, batch.num_graphs, expected)
    return value


def library_loss(rna: torch.Tensor, index: torch.Tensor, n_bags: int, expected: torch.Tensor) -> torch.Tensor:
    """Mean squared log-ratio of each bag's summed RNA content ``Σ r`` to ``expected`` (the bag's
    library in units of the average training cell's library)."""
    total = torch.zeros(n_bags, dtype=rna.dtype, device=rna.device).index_add_(0, index, rna)
    return ((torch.log(total) - torch.log(expected)) ** 2).mean()


def library_per_cell(sets: list[SpotSet]) -> float:
    """Mean library of a training spot divided by its mean number of cells (the library-loss unit)."""
    libs = np.concatenate([s.lib for s in sets])
    cells = np.concatenate([s.part.sizes()[s.rows] for s in sets])
    return float(libs.mean() / max(cells.mean(), 1e-12)) if libs.size else 1.0


def evaluate_loss(
    net: BiTroNet, data: list[SpotSet] | list[BulkSlide], *, loss: str, device: torch.device, chunk_cells: int
) -> float:
    """Mean loss over all bags of ``data`` (eval mode, no gradients)."""
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for item in data:
            if isinstance(item, SpotSet):
                sets = [item]
                for start in range(0, len(item.rows), 256):
                    picks = [(0, k) for k in range(start, min(start + 256, len(item.rows)))]
                    value = _spot_loss(net, sets, picks, loss=loss, device=device, max_cells=None, rng=None)
                    total += float(value) * len(picks)
                    count += len(picks)
            else:
                pooled = slide_profile(net, item.slide, item.part, device=device)
                target = torch.as_tensor(item.target, dtype=pooled.dtype, device=device)[None]
                lib = torch.tensor([item.lib], dtype=pooled.dtype, device=device)
                total += float(loss_fn(pooled[None], target, lib, loss))
                count += 1
    return total / max(count, 1)


def train(
    net: BiTroNet,
    train_data: list[SpotSet] | list[BulkSlide],
    val_data: list[SpotSet] | list[BulkSlide],
    *,
    params: TrainParams,
    device: torch.device,
    seed: int,
    progress: bool,
) -> tuple[list[dict[str, float]], int]:
    """Train ``net`` in place (AdamW; early stopping on ``val_data`` when given; the best weights are
    restored). Returns (history: one dict per epoch, best epoch)."""
    rng = np.random.default_rng(seed)
    trainable = [p for p in net.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters under this policy.")
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cuda":  # scatter-adds are non-deterministic on CUDA unless asked (CPU ops are)
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train_epochs(
            net, train_data, val_data, trainable, params=params, device=device, rng=rng, progress=progress
        )
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train_epochs(
    net: BiTroNet,
    train_data: list[SpotSet] | list[BulkSlide],
    val_data: list[SpotSet] | list[BulkSlide],
    trainable: list[torch.nn.Parameter],
    *,
    params: TrainParams,
    device: torch.device,
    rng: np.random.Generator,
    progress: bool,
) -> tuple[list[dict[str, float]], int]:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(trainable, lr=params.lr or params.LR, weight_decay=params.weight_decay)
    history: list[dict[str, float]] = []
    best, best_epoch, best_state, bad = math.inf, -1, None, 0
    spot_level = bool(train_data) and isinstance(train_data[0], SpotSet)
    samples: list[tuple[int, int]] = (
        [(si, k) for si, s in enumerate(train_data) for k in range(len(s.rows))]  # type: ignore[union-attr,arg-type,attr-defined]
        if spot_level
        else [(si, 0) for si in range(len(train_data))]
    )
    library = None
    if spot_level and net.params.normalized and params.library_weight > 0:
        library = (params.library_weight, library_per_cell(train_data))  # type: ignore[arg-type]
    bar = tqdm(range(params.epochs), desc="fit_bitro", disable=not progress, leave=True)
    for epoch in bar:
        net.train()
        order = rng.permutation(len(samples))
        losses = []
        for start in range(0, len(order), params.batch_size):
            picks = [samples[i] for i in order[start : start + params.batch_size]]
            opt.zero_grad(set_to_none=True)
            if spot_level:
                value = _spot_loss(
                    net,
                    train_data,  # type: ignore[arg-type]
                    picks,
                    loss=params.loss,
                    device=device,
                    max_cells=params.max_cells_per_spot,
                    drop_cells=params.drop_cells,
                    rng=rng,
                    library=library,
                )
                value.backward()
                losses.append(float(value.detach()))
            else:
                step = 0.0
                for si, _ in picks:
                    step += slide_step(
                        net,
                        train_data[si],  # type: ignore[arg-type]
                        loss=params.loss,
                        device=device,
                        seed=int(rng.integers(2**31)),
                        scale=1.0 / len(picks),
                    )
                losses.append(step / len(picks))
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            opt.step()
        record = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if val_data:
            val = evaluate_loss(
                net, val_data, loss=params.loss, device=device, chunk_cells=params.chunk_cells
            )
            record["val_loss"] = val
            if val < best - 1e-6:
                best, best_epoch, bad = val, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                bad += 1
        else:
            best_epoch = epoch
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
        if val_data and params.patience and bad >= params.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history, best_epoch
