"""Spot-level forward passes, bag targets and predictions, and the training loop (AdamW, early
stopping on validation bags). Whole slides go through :mod:`._slide` (exact chunked gradient)."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._bags import BulkSlide, Partition, SlideCells, SpotSet, make_batch
from ._net import pool_bags
from ._slide import CELLS_PER_BATCH, chunk_batches, loss_fn, slide_profile, slide_step, with_depth

if TYPE_CHECKING:  # pragma: no cover
    from ._net import BiTroNet
    from ._params import TrainParams
    from ._sink import RowBlocks

__all__ = ["bag_predictions", "bag_targets", "spot_values", "train"]


#: spot windows per forward pass when predicting
SPOT_BATCH = 256


def spot_values(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    groups: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = SPOT_BATCH,
    cells_out: np.ndarray | RowBlocks | None = None,
    rna_out: np.ndarray | None = None,
    calibrate: bool = True,
) -> np.ndarray:
    """Profiles of spot windows ``groups`` (len, genes); with ``cells_out`` (slide cells × genes,
    float32, or a :class:`~bitro_sc.models._sink.RowBlocks` over one) the per-cell values of these
    windows' cells are written into its rows, and with
    ``rna_out`` (slide cells) their RNA contents (see :func:`slide_cell_values`); other rows are left
    as they are, so that a whole slide's cells never need a second cells × genes array.
    ``calibrate``: apply the depth factor (a spot-trained model predicting spots). Eval mode is the
    caller's job."""
    prof = np.zeros((len(groups), net.n_genes), dtype=np.float32)
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
            if rna_out is not None and r is not None:
                rna_out[cells] = r[:, 0].float().cpu().numpy()
    return prof


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
                out.append(spot_values(net, item.slide, item.part, item.rows, device=device))
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
                batches = [[(0, g) for g in gs] for gs in chunk_batches(item.part, CELLS_PER_BATCH)[:5]]
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
    weights: torch.Tensor | None = None,
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
    value = loss_fn(pooled, target, lib, loss, weights)
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


def gene_weights(sets: list[SpotSet], kind: str, device: torch.device) -> torch.Tensor | None:
    """Per-gene loss weights (mean 1) of ``TrainParams.gene_weights`` over the spots ``sets``."""
    if kind == "none" or not sets:
        return None
    var = np.log1p(np.concatenate([s.target for s in sets]).astype(np.float64)).var(axis=0)
    w = 1.0 / np.maximum(var, max(float(np.median(var)), 1e-12) * 1e-2)  # constant genes: capped
    return torch.as_tensor(w / w.mean(), dtype=torch.float32, device=device)


def evaluate_loss(
    net: BiTroNet,
    data: list[SpotSet] | list[BulkSlide],
    *,
    loss: str,
    device: torch.device,
    chunk_cells: int,
    weights: torch.Tensor | None = None,
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
                    value = _spot_loss(
                        net, sets, picks, loss=loss, device=device, max_cells=None, rng=None, weights=weights
                    )
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
    keep_start: bool = False,
) -> tuple[list[dict[str, float]], int]:
    """Train ``net`` in place (AdamW; early stopping on ``val_data`` when given; the best weights are
    restored). Returns (history: one dict per epoch, best epoch). ``keep_start``: the network before
    the first step competes too (best epoch ``-1`` when no epoch improves its validation loss)."""
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
            net,
            train_data,
            val_data,
            trainable,
            params=params,
            device=device,
            rng=rng,
            progress=progress,
            keep_start=keep_start,
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
    keep_start: bool = False,
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
    weights = None
    if spot_level:
        weights = gene_weights(train_data, params.gene_weights, device)  # type: ignore[arg-type]
    if keep_start and val_data:  # the start (e.g. the ridge fit) is kept unless an epoch beats it
        best = evaluate_loss(
            net, val_data, loss=params.loss, device=device, chunk_cells=params.chunk_cells, weights=weights
        )
        best_state = copy.deepcopy(net.state_dict())
    desc = "fit_bitro" if val_data else "fit_bitro (all bags)"  # no validation: the refit, or no split
    bar = tqdm(range(params.epochs), desc=desc, unit="epoch", disable=not progress, leave=True)
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
                    weights=weights,
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
                net,
                val_data,
                loss=params.loss,
                device=device,
                chunk_cells=params.chunk_cells,
                weights=weights,
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
            bar.n = epoch + 1  # this epoch ran: count it, and close the bar before leaving the loop
            bar.set_description(f"fit_bitro: early stop, best epoch {best_epoch + 1}", refresh=False)
            bar.close()
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history, best_epoch
