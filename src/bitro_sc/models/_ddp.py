"""``bs.models.fit_cohort``: bulk BiTro training on slides streamed from their stores, in one process
or data-parallel over several (torch.distributed: gloo on CPU, NCCL on GPUs).

Data parallel training here is DistributedDataParallel's algorithm written out: every process holds
the same network (broadcast from rank 0), takes its share of each step's slides, accumulates their
exact chunked gradients and the processes all-reduce the gradient once before the identical
optimizer step. (The ``DistributedDataParallel`` wrapper itself cannot be used: the exact gradient of
a whole slide calls ``backward`` once per chunk batch, a number that differs between processes, and
the wrapper all-reduces on every call.) The result equals one process training on the whole step,
up to the order of floating-point sums.

With ``torchrun``, initialise the process group and call ``fit_cohort(..., strategy="ddp")`` in every
process (see docs/cohorts.md); otherwise ``strategy="ddp"`` starts ``world_size`` processes itself.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .. import _sdata
from ._params import DataKeys, ModelParams, TrainParams
from ._slide import slide_step
from ._start import Inputs, ScratchStart
from ._stream import Cohort, StoreBags, design_items, scan

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from ._model import BiTroModel
    from ._net import BiTroNet

STRATEGIES = ("single", "ddp")


def fit_cohort(
    stores: Sequence[str | Path],
    *,
    genes: Sequence[str] | None = None,
    bulk: AnnData | None = None,
    model: ModelParams | Mapping[str, Any] | None = None,
    train: TrainParams | Mapping[str, Any] | None = None,
    keys: DataKeys | Mapping[str, str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    strategy: Literal["single", "ddp"] = "single",
    world_size: int = 2,
    amp: bool = False,
    progress: bool = True,
) -> BiTroModel:
    """Train a bulk-level BiTro model on whole slides read one at a time from their zarr stores.

    Parameters
    ----------
    stores
        One store per training slide (written by ``bitro-sc run`` with ``[batch]`` or
        ``bs.tl.run_batch``), with a featurised cells table, its cell graph (unless
        ``model={"gat_layers": 0}``) and, unless ``bulk`` is given, a one-row bulk table.
    genes
        Genes to predict; default: every gene of the bulk profiles.
    bulk
        Bulk expression (one row per slide, ``obs["sample_id"]`` = the store's sample id), e.g. from
        ``bs.io.read_bulk``; default: the ``"bulk"`` table of each store.
    model, train, keys
        As in :func:`bitro_sc.models.fit` (:class:`ModelParams`, :class:`TrainParams`,
        :class:`DataKeys`). Every training slide is a training bag (no validation split, no refit):
        the model of the last epoch is returned.
    seed
        Seed of the initial weights, the slide order and dropout.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; default CUDA when available. With ``strategy="ddp"`` on
        CUDA, process ``r`` uses GPU ``r``.
    strategy
        ``"single"``: this process. ``"ddp"``: data parallel over ``world_size`` processes (started
        here, or the processes of an initialised ``torch.distributed`` group, e.g. under torchrun).
    amp
        Forward passes under bfloat16 autocast (mixed precision); losses and gradients in float32.
    progress
        A progress bar over epochs (rank 0).

    Returns
    -------
    The fitted :class:`~bitro_sc.models.BiTroModel` (level ``"bulk"``). Its ``record["streaming"]``
    says how many slide reads the training made and the most slides held in memory at once.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}, got {strategy!r}.")
    if strategy == "ddp" and int(world_size) < 1:
        raise ValueError(f"`world_size` must be a positive number of processes, got {world_size!r}.")
    paths = [str(s) for s in stores]
    keys = DataKeys.coerce(keys)
    tp = TrainParams.coerce(train).resolved(lora=False)
    params = ModelParams.coerce(model).resolved("bulk")
    cohort = scan(paths, genes=genes, bulk=bulk, keys=keys)
    job = _Job(paths, cohort, params, tp, keys, seed, str(device) if device is not None else None, amp)
    import torch.distributed as dist

    if strategy == "single" or (dist.is_available() and dist.is_initialized()):
        net, history, counters = _run(job, progress=progress)
    else:
        net, history, counters = _spawn(job, int(world_size))
    return _model(job, net, history, counters, strategy=strategy)


class _Job:
    """Everything a training process needs (picklable)."""

    def __init__(
        self,
        stores: list[str],
        cohort: Cohort,
        params: ModelParams,
        tp: TrainParams,
        keys: DataKeys,
        seed: int,
        device: str | None,
        amp: bool,
    ) -> None:
        self.stores, self.cohort, self.params, self.tp, self.keys = stores, cohort, params, tp, keys
        self.seed, self.device, self.amp = seed, device, amp

    def build(self, device: torch.device) -> BiTroNet:
        targets = self.cohort.targets.astype(np.float64)
        if self.tp.loss == "mse":
            target_mean = np.expm1(np.log1p(targets).mean(axis=0))
        else:
            target_mean = targets.mean(axis=0)
        bag_cells = float(self.cohort.n_cells.mean())
        per_cell = target_mean / (
            1.0 if self.params.pooling == "mean" or self.params.normalized else bag_cells
        )
        torch.manual_seed(self.seed)
        inputs = Inputs(self.cohort.stats, self.cohort.phenotypes, self.params)
        net, _, _ = ScratchStart(self.params).net(
            design_items(self.cohort),
            inputs=inputs,
            genes=self.cohort.genes,
            per_cell=per_cell,
            bag_cells=bag_cells,
            level="bulk",
            device=device,
        )
        return net


def _device(job: _Job, rank: int, world: int) -> torch.device:
    from ._model import resolve_device

    dev = resolve_device(job.device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        local = int(os.environ.get("LOCAL_RANK", rank))  # torchrun sets it per machine
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    return dev


def _run(job: _Job, *, progress: bool) -> tuple[BiTroNet, list[dict[str, float]], dict[str, int]]:
    """The training loop of this process (the only one, or one rank of an initialised group)."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dev = _device(job, rank, world)
    net = job.build(dev)
    if distributed:
        for tensor in net.state_dict().values():
            dist.broadcast(tensor, src=0)  # identical start on every rank
    bags = StoreBags(
        job.stores,
        job.cohort,
        keys=job.keys,
        need_graph=job.params.gat_layers > 0,
        chunk_cells=job.tp.chunk_cells,
    )
    tp = job.tp
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=tp.lr or tp.LR, weight_decay=tp.weight_decay)
    rng = np.random.default_rng(job.seed)
    history: list[dict[str, float]] = []
    for epoch in tqdm(range(tp.epochs), desc="fit_cohort", disable=not progress or rank != 0):
        net.train()
        order = rng.permutation(len(bags))
        losses = []
        for start in range(0, len(order), tp.batch_size):
            picks = order[start : start + tp.batch_size]
            seeds = [int(rng.integers(2**31)) for _ in picks]  # same draws on every rank
            opt.zero_grad(set_to_none=True)
            local = 0.0
            for j in range(rank, len(picks), world):
                with bags.bag(int(picks[j])) as item:
                    local += slide_step(
                        net,
                        item,
                        loss=tp.loss,
                        device=dev,
                        seed=seeds[j],
                        scale=1.0 / len(picks),
                        amp=job.amp,
                    )
            if distributed:
                local = _all_reduce(trainable, local, dev)
            if tp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, tp.grad_clip)
            opt.step()
            losses.append(local / len(picks))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
    if net.rna_head is not None:
        from ._train import mean_log_rna

        with bags.bag(0) as item, torch.no_grad():
            net.rna_head.bias.sub_(mean_log_rna(net, [item], device=dev))
    net.eval()
    counters = dict(bags.counters())
    if distributed:
        counts = torch.tensor([counters["slides_loaded"], counters["max_resident"]], dtype=torch.float64)
        dist.all_reduce(counts)  # totals over ranks (max_resident: slides in memory at once, all ranks)
        counters.update(slides_loaded=int(counts[0]), max_resident=int(counts[1]), world_size=world)
    return net, history, counters


def _all_reduce(params: list[torch.nn.Parameter], loss: float, device: torch.device) -> float:
    """Sum the gradients (and the loss) of all ranks, in one flat buffer."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    loss_t = torch.tensor([loss], device=device, dtype=params[0].dtype)
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss_t])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
    return float(flat[-1])


def _worker(rank: int, world: int, job: _Job, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if _device(job, rank, world).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        net, history, counters = _run(job, progress=False)
        if rank == 0:
            state = {k: v.cpu() for k, v in net.state_dict().items()}
            torch.save({"state": state, "history": history, "counters": counters}, Path(folder) / "result.pt")
    finally:
        dist.destroy_process_group()


def _spawn(job: _Job, world: int) -> tuple[BiTroNet, list[dict[str, float]], dict[str, int]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bitro_ddp_") as folder:
        mp.spawn(_worker, args=(world, job, folder), nprocs=world, join=True)
        result = torch.load(Path(folder) / "result.pt", weights_only=False)
    net = job.build(torch.device("cpu"))
    net.load_state_dict(result["state"])
    net.to(_device(job, 0, 1))
    net.eval()
    return net, result["history"], result["counters"]


def _model(
    job: _Job, net: BiTroNet, history: list[dict[str, float]], counters: Mapping[str, int], *, strategy: str
) -> BiTroModel:
    from ._model import BiTroModel

    hist: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            hist.setdefault(k, []).append(v)
    record = {
        "method": "bitro",
        "level": "bulk",
        "transfer": "none",
        "policy": "none",
        "seed": job.seed,
        "device": str(next(net.parameters()).device),
        "genes": job.cohort.genes,
        "hvgs": [],
        "keys": job.keys.to_dict(),
        "model": job.params.to_dict(),
        "train": job.tp.to_dict(),
        "split": {"by": "none (streamed cohort)", "train": job.cohort.sample_ids, "validation": []},
        "n_bags_train": len(job.stores),
        "n_bags_validation": 0,
        "cells_per_bag": float(job.cohort.n_cells.mean()),
        "history": hist,
        "best_epoch": len(history) - 1,
        "refit": None,
        "streaming": {**counters, "strategy": strategy, "amp": job.amp, "stores": job.stores},
        "matched_genes": [],
        "new_genes": list(job.cohort.genes),
    }
    return BiTroModel(
        net,
        genes=job.cohort.genes,
        level="bulk",
        stats=job.cohort.stats,
        phenotypes=job.cohort.phenotypes,
        params=job.params,
        train_params=job.tp,
        bag_cells=float(job.cohort.n_cells.mean()),
        meta=job.cohort.meta,
        record=_sdata.jsonable(record),
    )


def fit_slides(
    slides: Sequence[Any],
    *,
    genes: Sequence[str] | None,
    n_top_genes: int,
    keys: DataKeys,
    model: ModelParams | Mapping[str, Any] | None,
    train: TrainParams | Mapping[str, Any] | None,
    seed: int,
    device: str | torch.device | None,
    world_size: int,
    progress: bool,
) -> BiTroModel:
    """``bs.tl.fit_bitro(..., level="bulk", strategy="ddp")``: the tables of in-memory slides are
    written to temporary stores (one per slide, tables only) and :func:`fit_cohort` trains on them
    data parallel. Genes default to those :func:`bitro_sc.models.fit` would choose."""
    from spatialdata import SpatialData

    from ._split import choose_genes

    tables = [s.tables[keys.bulk_key] for s in slides]
    chosen = choose_genes(tables, genes, int(n_top_genes), "bulk")
    with tempfile.TemporaryDirectory(prefix="bitro_fit_ddp_") as folder:
        stores = []
        for i, s in enumerate(slides):
            sid = _sdata.sample_id(s, i, table_key=keys.cells_key)
            row = _sdata.bulk_row(s, bulk_key=keys.bulk_key, i=i)
            part = {
                keys.cells_key: s.tables[keys.cells_key],
                keys.bulk_key: s.tables[keys.bulk_key][row : row + 1],
            }
            stores.append(Path(folder) / f"{i:05d}.zarr")
            with warnings.catch_warnings():  # tables only: the shapes they annotate stay in memory
                warnings.filterwarnings("ignore", message="The table is annotating.*not present")
                store = SpatialData(tables=part, attrs=copy.deepcopy(dict(s.attrs)))
                _sdata.set_slide_info(store, sample_id=sid)
                store.write(stores[-1])
        fitted = fit_cohort(
            stores,
            genes=chosen,
            model=model,
            train=train,
            keys=keys,
            seed=seed,
            device=device,
            strategy="ddp",
            world_size=world_size,
            progress=progress,
        )
    fitted.record["streaming"]["stores"] = "temporary (tables of the in-memory slides)"
    return fitted


def check_slides(
    slides: Sequence[Any], *, level: str, transfer: str | None, validation: Any, keys: DataKeys
) -> None:
    """Errors for ``fit_bitro(..., strategy="ddp")`` raised before anything is written."""
    from ._split import slide_groups, split_slides

    if level != "bulk" or transfer is not None:
        raise ValueError(
            "strategy='ddp' trains a bulk-level model from scratch (one bag per slide), got "
            f"level={level!r}, transfer={transfer!r}. Pass level='bulk' without `transfer=`, or "
            "strategy='single'."
        )
    samples, groups, _ = slide_groups(list(slides), None)
    _, val_idx, _ = split_slides(groups, samples, validation, "bulk", 0)
    if val_idx:
        raise ValueError(
            f"strategy='ddp' trains on every slide (no validation split), but validation={validation!r} "
            f"holds out {len(val_idx)} slide(s). Pass validation=None (evaluate held-out slides with "
            "`bs.tl.predict_bitro`), or strategy='single'."
        )
