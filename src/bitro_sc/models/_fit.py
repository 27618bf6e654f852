"""`bitro_sc.models.fit`: the whole BiTro training algorithm, from slides to a fitted model.

1. check the slides and split them (validation groups by patient, else by sample);
2. choose the genes (the start decides: HVGs, or a base model's genes plus HVGs);
3. build the bags (cells of each spot, or each whole slide) with the start's feature scaling;
4. start the network (:mod:`._start`: fresh, head bias at the loss-optimal constant,
   deconvolution start of phenotype profiles; or :mod:`._transfer`: a base model's network);
5. train with early stopping on the validation bags, then refit on all bags for the chosen epochs;
6. fix the scale of the RNA-content head, and write the run record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import _keys as K
from .. import _sdata
from ._bags import SpotSet
from ._data import build_data, cells_table
from ._model import BiTroModel, resolve_device
from ._params import DataKeys, ModelParams, TrainParams
from ._preprocess import Preprocessing
from ._route import (
    SHRINK,
    Route,
    loo_folds,
    route_by_name,
    route_params,
    routes_for,
    select_route,
    shrink_toward,
    without_scratch,
)
from ._split import slide_groups, split_slides, training_hvgs
from ._start import Inputs, ScratchStart, Start, bag_options
from ._train import bag_targets, evaluate_loss, mean_log_rna
from ._train import train as train_loop
from ._transfer import TransferStart

_log = logging.getLogger("bitro_sc")
#: bulk slides held out, at the least, for choosing a transfer route on them (with the noise margin)
MIN_HELD_OUT_BULK = 3

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def fit(
    slides: SpatialData | Sequence[SpatialData],
    *,
    level: str = "spot",
    genes: Sequence[str] | None = None,
    keys: DataKeys | Mapping[str, str] | None = None,
    model: ModelParams | Mapping[str, Any] | None = None,
    train: TrainParams | Mapping[str, Any] | None = None,
    base: BiTroModel | None = None,
    policy: str = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
    validation: float | str | Sequence[str] | None = "auto",
    n_top_genes: int = 250,
    progress: bool = True,
    key_added: str = K.RUN,
    overwrite: bool = False,
) -> BiTroModel:
    """Train a BiTro model on the spot (``level="spot"``) or bulk (``"bulk"``) tables of ``slides``.

    The algorithm behind :func:`bitro_sc.tl.fit_bitro`, which adds argument handling and trains a
    missing base model first; see it for the parameters. Here ``base`` is a fitted model or
    ``None`` (train from scratch with ``model``; with a base, its architecture is kept and ``model``
    is ignored), and ``keys`` (:class:`~bitro_sc.models.DataKeys`) names every table, column and
    graph read. The run record (``model.record``, also written to ``uns[key_added]`` of every
    training table) names the keys in ``record["keys"]``; predictions use them by default.
    """
    slides = _sdata.as_slides(slides, what="training slide")
    level = _sdata.check_level(level, K.FIT_LEVELS)
    keys = DataKeys.coerce(keys)
    routes = routes_for(policy) if base is not None else ()
    scratch = ScratchStart(ModelParams.coerce(model))
    start: Start = scratch if base is None else TransferStart(base, "lora" if policy == "auto" else policy)
    tp_user = TrainParams.coerce(train)
    tp = tp_user.resolved(lora=start.lora)
    window = _transfer_window(base, level, tp_user)
    tables = _check_slides(slides, keys, level, key_added, overwrite)
    samples, groups, by = slide_groups(slides, keys.table_key if level == "spot" else None)
    train_idx, val_idx, spot_frac = split_slides(groups, samples, validation, level, seed)
    if base is not None and level == "bulk" and validation == "auto" and val_idx:
        held = {groups[i] for i in val_idx}
        if len(held) < MIN_HELD_OUT_BULK:
            # fewer held-out slides than the noise margin needs: the route would be chosen by the
            # validation loss of 1-2 slides, which picked harmful routes (transfer_notes.md, fourth
            # pass, 8 bulk slides); leave-one-slide-out folds with the margin choose instead
            _log.info(
                "fit_bitro: %d held-out bulk group(s) are too few to choose a transfer route; "
                "choosing it by leave-one-slide-out folds over the %d slides.",
                len(held),
                len(groups),
            )
            train_idx, val_idx = sorted(train_idx + val_idx), []

    # genes ------------------------------------------------------------------------------------
    train_tables = [tables[i] for i in train_idx]
    hvgs = training_hvgs(train_tables)
    chosen = start.genes(train_tables, genes, hvgs, n_top_genes, level)
    hvgs = [g for g in hvgs if g in chosen]  # evaluation genes must be predicted

    # bags -------------------------------------------------------------------------------------
    dev = resolve_device(device)
    torch.manual_seed(seed)
    bags: dict[int, tuple[Inputs, list[Any], list[Any]]] = {}  # by start kind: scratch, transfer
    preps: dict[int, Preprocessing] = {}  # the preprocessing each start kind's bags were built with

    def kind_of(st: Start) -> int:
        """0: a fresh network (the target's own preprocessing), 1: a transfer start (the base's)."""
        return 0 if isinstance(st, ScratchStart) else 1

    def data_of(st: Start) -> tuple[Inputs, list[Any], list[Any]]:
        """Inputs, training and validation bags under the feature scaling of start ``st``."""
        kind = kind_of(st)
        if kind not in bags:
            inp = st.inputs(slides, train_idx, keys, level)
            prep = _preprocessing(slides, keys, base if kind == 1 else None)
            need_phen = _uses_phenotypes(inp.params)
            if need_phen and not inp.phenotypes and prep.phenotypes is None:
                raise KeyError(
                    f"The training slides have no cell phenotypes (obs[{keys.phenotype_key!r}] of the cells "
                    "table), and the model uses them: run `bs.tl.phenotypes(slides)` on all training slides "
                    "together first (`bs.tl.fit_bitro` runs it for you when every slide lacks them), or "
                    "train without phenotypes: `model={'phenotype_dim': 0}`."
                )
            preps[kind] = prep
            tr, va, _ = build_data(
                slides,
                train_idx,
                val_idx,
                spot_frac,
                level=level,
                genes=chosen,
                stats=inp.stats,
                phenotypes=inp.phenotypes,
                need_graph=inp.params.gat_layers > 0,
                chunk_cells=tp.chunk_cells if kind == 0 else window,
                keys=keys,
                prep=prep,
                need_phenotypes=need_phen,
            )
            bags[kind] = (inp, tr, va)
        return bags[kind]

    inputs, train_data, val_data = data_of(start)

    def begin(
        st: Start, data: list[Any], inp: Inputs, scale: list[Any] | None = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """The network of start ``st`` before its first step on ``data`` (head bias from the
        targets of ``scale``, default ``data``)."""
        torch.manual_seed(seed)
        per_cell, cells = start_scale(data if scale is None else scale, tp.loss, inp.params, len(chosen))
        return st.net(
            data, inputs=inp, genes=chosen, per_cell=per_cell, bag_cells=cells, level=level, device=dev
        )

    # training ---------------------------------------------------------------------------------
    route_record: dict[str, Any] | None = None
    refit_record = bag_choice = None
    if base is not None:
        route_record, start, inputs, net, lora, report, hist, best_epoch, refit_record = _transfer(
            base=base,
            routes=routes,
            scratch=scratch,
            data_of=data_of,
            begin=begin,
            tp_user=tp_user,
            level=level,
            loo=not val_data and validation is not None and level == "bulk" and len(train_data) >= 2,
            dev=dev,
            seed=seed,
            progress=progress,
        )
        tp = route_params(tp_user, route_by_name(routes, route_record.get("route", route_record["chosen"])))
        if not isinstance(start, ScratchStart):  # predictions use the attention window trained with
            tp = dataclasses.replace(tp, chunk_cells=window)
        _, tr, va = data_of(start)  # the chosen route's bags (scratch has its own feature scaling)
        n_bags = (sum(_n_bags(d) for d in tr), sum(_n_bags(d) for d in va))
        train_data = [*tr, *va]  # the final network saw every bag
    else:
        runs = []  # one run, or with and without the bag-level term (chosen by validation loss)
        for inp in bag_options(inputs, bool(val_data)):
            net, lora, report = begin(start, train_data, inp)
            history, best_epoch = train_loop(
                net,
                train_data,
                val_data,
                params=tp,
                device=dev,
                seed=seed,
                progress=progress,
                keep_start=inp.params.bag_linear is True,  # the ridge start competes with every epoch
            )
            val = evaluate_loss(net, val_data, loss=tp.loss, device=dev, chunk_cells=tp.chunk_cells)
            runs.append((val, inp, net, lora, report, history, best_epoch))
        _, inputs, net, lora, report, history, best_epoch = min(runs, key=lambda run: run[0])
        if len(runs) > 1:
            bag_choice = {
                "chosen": inputs.params.bag_linear,
                "val_loss": {str(r[1].params.bag_linear): r[0] for r in runs},
            }
        hist = _columns(history)
        if tp.refit and val_data:
            # the validation bags chose the number of epochs; train again from the start on all bags
            # (0 epochs: no epoch beat the start, which is kept as fitted on all bags)
            epochs = best_epoch + 1
            all_bags: list[Any] = [*train_data, *val_data]
            net, lora, report = begin(start, all_bags, inputs, scale=train_data)
            refit_history: list[dict[str, float]] = []
            if epochs > 0:
                refit_history, _ = train_loop(
                    net,
                    all_bags,
                    [],
                    params=dataclasses.replace(tp, epochs=epochs),
                    device=dev,
                    seed=seed,
                    progress=progress,
                )
            refit_record = {"epochs": epochs, "train_loss": [row["train_loss"] for row in refit_history]}
        n_bags = (sum(_n_bags(d) for d in train_data), sum(_n_bags(d) for d in val_data))
    params = inputs.params
    bag_cells = start_scale(train_data, tp.loss, params, len(chosen))[1]
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    if net.rna_head is not None:
        # Bag profiles do not change when every cell's RNA content is scaled alike: fix that scale so
        # the training cells' geometric-mean RNA content is 1 (cell values = counts per 10k of a
        # typical cell).
        with torch.no_grad():
            net.rna_head.bias.sub_(mean_log_rna(net, train_data, device=dev))

    # record -----------------------------------------------------------------------------------
    record: dict[str, Any] = {
        "method": "bitro",
        "level": level,
        "transfer": start.transfer if base is None else ("bulk" if base.level == "bulk" else "spatial"),
        "policy": start.policy if route_record is None else route_record["policy"],
        "route": route_record,
        "seed": seed,
        "device": str(dev),
        "genes": chosen,
        "hvgs": hvgs,
        "keys": keys.to_dict(),
        "model": params.to_dict(),
        "train": tp.to_dict(),
        "split": {
            "by": by if spot_frac == 0 else "spots (largest-x block of every slide)",
            "train": [samples[i] for i in train_idx],
            "validation": [samples[i] for i in val_idx],
            "validation_spot_fraction": spot_frac,
        },
        "n_bags_train": int(n_bags[0]),
        "n_bags_validation": int(n_bags[1]),
        "cells_per_bag": bag_cells,
        "history": hist,
        "best_epoch": int(best_epoch),
        "refit": refit_record,
        "n_trainable": int(n_trainable),
        "n_frozen": int(n_frozen),
        "bag_linear_selection": bag_choice,
        **start.record(report, chosen),
    }
    if base is not None and "base" not in record:  # the route chosen was training from scratch
        record["base"] = {"policy": "scratch", "base_level": base.level, "base_genes": len(base.genes)}
    cells0 = cells_table(slides[0], keys)
    meta = {
        "features": _sdata.jsonable(dict(cells0.uns.get(keys.features_params, {}))),
        "phenotypes": _sdata.jsonable(dict(cells0.uns.get(keys.phenotype_key, {}))),
    }
    record = _sdata.jsonable(record)
    fitted = BiTroModel(
        net,
        genes=chosen,
        level=level,
        stats=inputs.stats,
        phenotypes=inputs.phenotypes,
        params=params,
        train_params=tp,
        bag_cells=bag_cells,
        lora=lora,
        meta=meta,
        record=record,
        preprocessing=preps[kind_of(start)],
    )
    for t in tables:
        t.uns[key_added] = _sdata.to_uns(record)
    return fitted


def _check_slides(
    slides: list[SpatialData], keys: DataKeys, level: str, key_added: str, overwrite: bool
) -> list:
    """The target tables of ``slides``; errors name what is missing, or a foreign ``uns[key_added]``."""
    tkey = keys.target(level)
    for i, s in enumerate(slides):
        if tkey not in s.tables:
            step = "read it with `bs.io.read_*`" if level == "spot" else "add one with `bs.io.read_bulk`"
            raise KeyError(
                f"Training slide {i} has no {level} table {tkey!r} (tables: {list(s.tables.keys())}): {step}."
            )
        cells_table(s, keys)
        rec = s.tables[tkey].uns.get(key_added)
        if rec is not None and not overwrite and not (isinstance(rec, Mapping) and "genes" in rec):
            raise ValueError(
                f"uns[{key_added!r}] of the {tkey!r} table of slide {i} holds something that is not a "
                "BiTro run record; pass `overwrite=True` to replace it or choose another `key_added=`."
            )
    return [s.tables[tkey] for s in slides]


def _uses_phenotypes(params: ModelParams) -> bool:
    """Whether the network reads phenotypes (embedding or phenotype profiles)."""
    return params.phenotype_dim > 0 or bool(params.phenotype_profiles)


def _preprocessing(slides: list[SpatialData], keys: DataKeys, base: BiTroModel | None) -> Preprocessing:
    """The preprocessing the fitted model owns: a base model's (its inputs are the base's), else the
    one shared by the training slides (an error when they differ)."""
    if base is not None and base.preprocessing is not None:
        return base.preprocessing
    return Preprocessing.from_slides(slides, keys)


def _transfer_window(base: BiTroModel | None, level: str, tp: TrainParams) -> int:
    """Cells per attention window of whole slides for a transfer start: a spot base adapted to bulk
    keeps its own window (its mean cells per spot) unless ``chunk_cells`` was set; else
    ``tp.chunk_cells``.

    A spot base has only ever attended within spots; on whole slides cut into chunks of 256 cells
    its predictions of 24 held-out synthetic bulk slides lost 0.023 Pearson (0.194 -> 0.171, draw 7;
    ``benchmarks/results/transfer.md``), so every transfer route started from a worse point."""
    default = TrainParams.__dataclass_fields__["chunk_cells"].default
    if base is None or level != "bulk" or base.level == "bulk" or tp.chunk_cells != default:
        return int(tp.chunk_cells)
    return int(base.window_cells)


def start_scale(data: list[Any], loss: str, params: ModelParams, n_genes: int) -> tuple[np.ndarray, float]:
    """(per-cell start profile, mean cells per bag) of the bags ``data``. The head starts at the
    loss-optimal constant: for the log1p MSE the mean of log1p targets (sparse spots make it far
    below log1p of the mean), for Poisson the mean itself; per cell, the bag profile itself when
    bags are (RNA-weighted) means of their cells."""
    sizes = [
        np.asarray(d.part.sizes()[d.rows], dtype=np.float64)
        if isinstance(d, SpotSet)
        else np.array([d.slide.n_cells], dtype=np.float64)
        for d in data
    ]
    bag_cells = float(np.concatenate(sizes).mean())
    targets = bag_targets(data, n_genes)
    if loss == "mse":
        target_mean = np.expm1(np.log1p(targets.astype(np.float64)).mean(axis=0))
    else:
        target_mean = targets.mean(axis=0)
    return target_mean / (1.0 if params.pooling == "mean" or params.normalized else bag_cells), bag_cells


def _columns(history: list[dict[str, float]]) -> dict[str, list[float]]:
    hist: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            hist.setdefault(k, []).append(v)
    return hist


def _transfer(
    *,
    base: BiTroModel,
    routes: tuple[Route, ...],
    scratch: ScratchStart,
    data_of: Callable[[Start], tuple[Inputs, list[Any], list[Any]]],
    begin: Callable[..., tuple[Any, Any, dict[str, Any]]],
    tp_user: TrainParams,
    level: str,
    loo: bool,
    dev: torch.device,
    seed: int,
    progress: bool,
) -> tuple[Any, ...]:
    """Choose the route by validation (:func:`._route.select_route`) and train it on all bags for the
    chosen epochs. Without validation bags (``validation=None``, a single bulk slide) the first
    route is trained for ``epochs`` without a choice (``policy="auto"``: LoRA rank 8)."""

    def start_of(route: Route) -> Start:
        if route.policy == "scratch":
            return scratch
        if route.policy == "zero-shot":  # the common start of the transfer routes, untrained
            route = next((r for r in routes if r.policy != "scratch"), Route("head", "head"))
        return TransferStart(base, route.policy, rank=route.rank)

    def folds(route: Route) -> list[tuple[list[Any], list[Any]]]:
        _, tr, va = data_of(start_of(route))
        return loo_folds(tr) if loo else ([(tr, va)] if va else [])

    def begin_route(route: Route, data: list[Any]) -> Any:
        st = start_of(route)
        return begin(st, data, data_of(st)[0])[0]

    _, tr0, va0 = data_of(start_of(routes[0]))
    routes, no_scratch = without_scratch(routes, level, sum(_n_bags(d) for d in [*tr0, *va0]))
    if folds(routes[0]):
        sel = select_route(
            routes,
            folds=folds,
            begin=begin_route,
            tp=tp_user,
            device=dev,
            seed=seed,
            progress=progress,
            cross_pearson=level == "bulk" and sum(len(va) for _, va in folds(routes[0])) >= 3,
            shrink=SHRINK,
        )
        route = route_by_name(routes, sel["route"])
        epochs = int(sel["epochs"])
        hist = sel.pop("history")
        how = f"leave-one-slide-out ({sel['n_folds']} folds)" if loo else "held-out bags"
        route_record = {**sel, "policy": route.policy, "selected": True, "validation": how}
        if no_scratch:
            route_record["scratch"] = no_scratch
    else:
        route = next((r for r in routes if r.policy == "lora"), routes[0])
        epochs, hist = tp_user.epochs, {}
        route_record = {
            "chosen": route.name,
            "policy": route.policy,
            "epochs": epochs,
            "selected": False,
            "validation": "none: no validation bags (validation=None or a single bulk slide)",
        }
    st = start_of(route)
    inputs, tr, va = data_of(st)
    all_bags = [*tr, *va]
    net, lora, report = begin(st, all_bags, inputs)
    refit = None
    if epochs > 0:
        tp = dataclasses.replace(route_params(tp_user, route), epochs=epochs)
        start_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        rows, _ = train_loop(net, all_bags, [], params=tp, device=dev, seed=seed, progress=progress)
        shrink_toward(net, start_state, float(route_record.get("shrink", 1.0)))
        refit = {"epochs": epochs, "train_loss": [row["train_loss"] for row in rows]}
        if not route_record["selected"]:
            hist = _columns(rows)
    return route_record, st, inputs, net, lora, report, hist, epochs - 1, refit


def _n_bags(item: Any) -> int:
    return len(item.rows) if isinstance(item, SpotSet) else 1
