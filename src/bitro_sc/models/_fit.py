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
from collections.abc import Mapping, Sequence
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
from ._split import slide_groups, split_slides, training_hvgs
from ._start import ScratchStart, Start
from ._train import bag_targets, mean_log_rna
from ._train import train as train_loop
from ._transfer import TransferStart

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
    policy: str = "lora",
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
    start: Start = ScratchStart(ModelParams.coerce(model)) if base is None else TransferStart(base, policy)
    tp = TrainParams.coerce(train).resolved(lora=start.lora)
    tables = _check_slides(slides, keys, level, key_added, overwrite)
    samples, groups, by = slide_groups(slides, keys.table_key if level == "spot" else None)
    train_idx, val_idx, spot_frac = split_slides(groups, samples, validation, level, seed)

    # genes ------------------------------------------------------------------------------------
    train_tables = [tables[i] for i in train_idx]
    hvgs = training_hvgs(train_tables)
    chosen = start.genes(train_tables, genes, hvgs, n_top_genes, level)
    hvgs = [g for g in hvgs if g in chosen]  # evaluation genes must be predicted

    # bags -------------------------------------------------------------------------------------
    dev = resolve_device(device)
    torch.manual_seed(seed)
    inputs = start.inputs(slides, train_idx, keys, level)
    params = inputs.params
    prep = _preprocessing(slides, keys, base)
    need_phen = _uses_phenotypes(params)
    if need_phen and not inputs.phenotypes and (prep.phenotypes is None):
        raise KeyError(
            f"The training slides have no cell phenotypes (obs[{keys.phenotype_key!r}] of the cells table), "
            "and the model uses them: run `bs.tl.phenotypes(slides)` on all training slides together first "
            "(`bs.tl.fit_bitro` runs it for you when every slide lacks them), or train without phenotypes: "
            "`model={'phenotype_dim': 0}`."
        )
    train_data, val_data, bag_sizes = build_data(
        slides,
        train_idx,
        val_idx,
        spot_frac,
        level=level,
        genes=chosen,
        stats=inputs.stats,
        phenotypes=inputs.phenotypes,
        need_graph=params.gat_layers > 0,
        chunk_cells=tp.chunk_cells,
        keys=keys,
        prep=prep,
        need_phenotypes=need_phen,
    )
    bag_cells = float(np.mean(bag_sizes))
    # The head starts at the loss-optimal constant: for the log1p MSE that is the mean of log1p
    # targets (sparse spots make it far below log1p of the mean), for Poisson the mean itself.
    targets = bag_targets(train_data, len(chosen))
    if tp.loss == "mse":
        target_mean = np.expm1(np.log1p(targets.astype(np.float64)).mean(axis=0))
    else:
        target_mean = targets.mean(axis=0)
    # per-cell profile: the bag profile itself when bags are (RNA-weighted) means of their cells
    per_cell = target_mean / (1.0 if params.pooling == "mean" or params.normalized else bag_cells)

    # training ---------------------------------------------------------------------------------
    def begin(data: list[Any]) -> tuple[Any, Any, dict[str, Any]]:
        """The network before its first step on ``data``."""
        torch.manual_seed(seed)
        return start.net(
            data, inputs=inputs, genes=chosen, per_cell=per_cell, bag_cells=bag_cells, level=level, device=dev
        )

    net, lora, report = begin(train_data)
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    history, best_epoch = train_loop(
        net, train_data, val_data, params=tp, device=dev, seed=seed, progress=progress
    )
    refit_record = None
    if tp.refit and val_data:
        # the validation bags chose the number of epochs; train again from the start on all bags
        epochs = best_epoch + 1
        all_bags: list[Any] = [*train_data, *val_data]
        net, lora, report = begin(all_bags)
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
    if net.rna_head is not None:
        # Bag profiles do not change when every cell's RNA content is scaled alike: fix that scale so
        # the training cells' geometric-mean RNA content is 1 (cell values = counts per 10k of a
        # typical cell).
        with torch.no_grad():
            net.rna_head.bias.sub_(mean_log_rna(net, train_data, device=dev))

    # record -----------------------------------------------------------------------------------
    hist: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            hist.setdefault(k, []).append(v)
    record: dict[str, Any] = {
        "method": "bitro",
        "level": level,
        "transfer": start.transfer,
        "policy": start.policy,
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
        "n_bags_train": int(sum(_n_bags(d) for d in train_data)),
        "n_bags_validation": int(sum(_n_bags(d) for d in val_data)),
        "cells_per_bag": bag_cells,
        "history": hist,
        "best_epoch": int(best_epoch),
        "refit": refit_record,
        "n_trainable": int(n_trainable),
        "n_frozen": int(n_frozen),
        **start.record(report, chosen),
    }
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
        preprocessing=prep,
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


def _n_bags(item: Any) -> int:
    return len(item.rows) if isinstance(item, SpotSet) else 1
