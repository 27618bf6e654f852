"""`bs.tl.fit_bitro`: train BiTro on spots or bulk slides, from scratch or by transfer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models import BiTroModel, ModelParams, TrainParams

_LEVELS = ("spot", "bulk")
_TRANSFERS = (None, "bulk", "spatial")


def fit_bitro(
    sdata_or_list: SpatialData | Sequence[SpatialData],
    *,
    level: Literal["spot", "bulk"] | None = None,
    genes: Sequence[str] | None = None,
    transfer: Literal["bulk", "spatial"] | None = None,
    base: BiTroModel | str | Path | None = None,
    bulk: Sequence[SpatialData] | None = None,
    epochs: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    validation: float | str | Sequence[str] | None = "auto",
    train: TrainParams | Mapping[str, Any] | None = None,
    model: ModelParams | Mapping[str, Any] | None = None,
    policy: Literal["lora", "full", "head"] = "lora",
    n_top_genes: int = 250,
    progress: bool = True,
    table_key: str = K.TABLE,
    bulk_key: str = K.BULK,
    cells_key: str = K.CELLS,
    key_added: str = K.RUN,
    overwrite: bool = False,
) -> BiTroModel:
    """Train the BiTro model on spot (spatial) or bulk (one profile per slide) expression.

    Cells (``tables["cells"]``: ``obsm["X_bitro"]``, ``obs["bitro_phenotype"]``, the cell graph in
    ``obsp``, ``obs["spot_id"]``) are pooled into bags: the cells of each spot (``level="spot"``,
    targets = rows of the spot table) or all cells of a slide (``level="bulk"``, targets = the
    slide's row of its bulk table). The loss compares log1p counts-per-10k (library over all genes).

    Parameters
    ----------
    sdata_or_list
        Training slide(s).
    level
        Target level; default ``"spot"``, or ``"bulk"`` for ``transfer="spatial"``.
    genes
        Genes to predict (names). Default: the top ``n_top_genes`` highly variable genes of the
        training tables (:func:`bitro_sc.pp.highly_variable_genes`); with a base model, the base's
        genes found in the target tables plus the target's top-50 HVGs. Unknown genes are an error.
    transfer
        ``"bulk"``: adapt a bulk-trained base to these spots; ``"spatial"``: adapt a spot-trained
        base to these slides' bulk tables; ``None``: train from scratch.
    base
        The base model (or a path written by ``BiTroModel.save``). Without it, the base is trained
        first: on ``bulk`` (slides with a ``"bulk"`` table) or on the given slides' bulk tables
        (``transfer="bulk"``), or on the given slides' spot tables (``transfer="spatial"``).
    bulk
        Bulk-labelled slides to train the base on (``transfer="bulk"`` without ``base``).
    epochs
        Overrides ``train.epochs``.
    device
        ``"cpu"``, ``"cuda"``, …; default CUDA when available.
    seed
        Seeds weights, shuffling, dropout and the validation split (same seed → same model).
    validation
        Held out for early stopping and model choice (never test data). ``"auto"``: with at least 5
        patients (or samples, when patient ids are unknown), 20 % of them; with fewer, at spot
        level the 20 % of spots with the largest x of every slide, at bulk level nothing. A fraction
        holds out that share of the patients (a single slide: of its spots); a list of sample or
        patient ids holds out those slides; ``None`` holds out nothing (no early stopping).
    train, model
        :class:`~bitro_sc.models.TrainParams` / :class:`~bitro_sc.models.ModelParams` or dicts.
    policy
        For transfer: ``"lora"`` (LoRA adapters on the input projection, attention q/v/out and
        feed-forward layers + gene head; all base weights frozen, GAT included), ``"full"``
        (everything trainable) or ``"head"`` (gene head only).
    n_top_genes
        Number of HVGs when ``genes`` is ``None``.
    key_added
        ``uns`` key of the run record on the training tables. A previous run record there is
        replaced; anything else there needs ``overwrite=True``.

    Returns
    -------
    The fitted :class:`~bitro_sc.models.BiTroModel`. Its ``record`` (config, genes, ``hvgs`` = top-50
    HVGs of the training tables for evaluation, split, history, trainable / frozen parameter
    counts, matched / new genes) is also written to ``uns[key_added]`` of every training table.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(3, kind="visium", size_um=600, seed=0)  # doctest: +SKIP
    >>> for s in slides:  # doctest: +SKIP
    ...     bs.tl.segment(s)
    >>> bs.tl.cell_features(slides)  # doctest: +SKIP
    >>> bs.tl.phenotypes(slides)  # doctest: +SKIP
    >>> for s in slides:  # doctest: +SKIP
    ...     bs.tl.assign_cells(s)
    ...     bs.tl.cell_graph(s)
    >>> model = bs.tl.fit_bitro(slides[:2], epochs=15)  # doctest: +SKIP
    >>> bs.tl.predict_bitro(slides[2], model)  # doctest: +SKIP
    >>> bs.tl.evaluate(slides[2])  # doctest: +SKIP
    >>> adapted = bs.tl.fit_bitro(slides[2], transfer="bulk", bulk=bulk_slides)  # doctest: +SKIP
    """
    from ..models import ModelParams, TrainParams

    slides = _as_list(sdata_or_list)
    if transfer not in _TRANSFERS:
        raise ValueError(f"`transfer` must be one of {list(_TRANSFERS)}, got {transfer!r}.")
    expected = "bulk" if transfer == "spatial" else "spot"
    if level is None:
        level = "bulk" if transfer == "spatial" else "spot"
    if level not in _LEVELS:
        raise ValueError(f"`level` must be one of {list(_LEVELS)}, got {level!r}.")
    if transfer is not None and level != expected:
        raise ValueError(
            f"transfer={transfer!r} adapts a model to {expected}-level targets, but level={level!r}. "
            f"Drop `level=` or use transfer={'spatial' if expected == 'spot' else 'bulk'!r}."
        )
    if bulk is not None and transfer != "bulk":
        raise ValueError("`bulk=` (slides to train the base on) is only used with transfer='bulk'.")
    tp = TrainParams.coerce(train)
    if epochs is not None:
        tp = TrainParams.coerce({**tp.to_dict(), "epochs": int(epochs)})
    mp = ModelParams.coerce(model)
    keys = {"table_key": table_key, "bulk_key": bulk_key, "cells_key": cells_key}
    common: dict[str, Any] = {
        "device": device,
        "seed": seed,
        "validation": validation,
        "train": tp,
        "n_top_genes": n_top_genes,
        "progress": progress,
        "key_added": key_added,
        "overwrite": overwrite,
        **keys,
    }
    base_model = None
    if transfer is not None:
        base_model = _resolve_base(
            base, transfer=transfer, slides=slides, bulk=bulk, genes=genes, model=mp, common=common
        )
    elif base is not None:
        raise ValueError("`base=` is only used with `transfer='bulk'` or `transfer='spatial'`.")
    return _fit(
        slides,
        level=level,
        genes=genes,
        model=mp,
        base=base_model,
        policy=policy,
        transfer=transfer,
        **common,
    )


# ----------------------------------------------------------------------------------------------
def _as_list(sdata_or_list: SpatialData | Sequence[SpatialData]) -> list[SpatialData]:
    from spatialdata import SpatialData

    slides = [sdata_or_list] if isinstance(sdata_or_list, SpatialData) else list(sdata_or_list)
    if not slides:
        raise ValueError("No training slide given.")
    bad = [type(s).__name__ for s in slides if not isinstance(s, SpatialData)]
    if bad:
        raise TypeError(f"Expected SpatialData objects, got {bad}.")
    return slides


def _target_key(level: str, keys: Mapping[str, str]) -> str:
    return keys["table_key"] if level == "spot" else keys["bulk_key"]


def _resolve_base(
    base: Any,
    *,
    transfer: str,
    slides: list[SpatialData],
    bulk: Sequence[SpatialData] | None,
    genes: Sequence[str] | None,
    model: ModelParams,
    common: dict[str, Any],
) -> BiTroModel:
    from ..models import BiTroModel

    base_level = "bulk" if transfer == "bulk" else "spot"
    if isinstance(base, str | Path):
        base = BiTroModel.load(base)
    if base is None:
        key = _target_key(base_level, common)
        sources = _as_list(bulk) if bulk is not None else [s for s in slides if key in s.tables]
        if not sources:
            if transfer == "bulk":
                raise ValueError(
                    "transfer='bulk' needs a bulk-trained base model, and none was given: pass `base=` (a "
                    "BiTroModel trained with `level='bulk'`, or a path written by `model.save`), or "
                    f"`bulk=[...]` (SpatialData slides with cells and a {key!r} table, one row per slide) "
                    f"to train it first, or give slides that have a {key!r} table."
                )
            raise ValueError(
                "transfer='spatial' needs a spot-trained base model, and none was given: pass `base=` (a "
                "BiTroModel trained with `level='spot'`, or a saved one), or give slides that also have a "
                f"spot table {key!r} with cells assigned to spots to train it first."
            )
        need = list(dict.fromkeys(genes)) if genes is not None else _target_genes(slides, transfer, common)
        base_genes = None
        if need is not None:  # train the base on the genes the target will predict
            base_genes = [g for g in need if all(g in s.tables[key].var_names for s in sources)]
            if not base_genes and genes is not None:
                raise ValueError(f"None of the requested genes is in the {key!r} tables of the base slides.")
            base_genes = base_genes or None
        base = _fit(
            sources,
            level=base_level,
            genes=base_genes,
            model=model,
            base=None,
            policy="full",
            transfer=None,
            **common,
        )
    if not isinstance(base, BiTroModel):
        raise TypeError(f"`base` must be a BiTroModel or a path to a saved one, got {type(base).__name__}.")
    if base.level != base_level:
        raise ValueError(
            f"transfer={transfer!r} starts from a {base_level}-trained model, but the base was trained at "
            f"level {base.level!r}. Use transfer={'spatial' if base.level == 'spot' else 'bulk'!r} "
            "for this base."
        )
    return base


def _target_genes(slides: list[SpatialData], transfer: str, common: Mapping[str, Any]) -> list[str] | None:
    """Default genes of the target data (its top HVGs), or ``None`` when they cannot be computed."""
    from ..pp import highly_variable_genes

    key = _target_key("spot" if transfer == "bulk" else "bulk", common)
    tables = [s.tables[key] for s in slides if key in s.tables]
    if not tables:
        return None
    try:
        return list(highly_variable_genes(tables, n_top=int(common["n_top_genes"])))
    except ValueError:  # e.g. too few bulk rows for an HVG ranking: the base picks its own genes
        return None


def _groups(
    slides: list[SpatialData], keys: Mapping[str, str], level: str
) -> tuple[list[str], list[str], str]:
    """(sample id, split group per slide, grouping column)."""
    from .._sdata import slide_info

    samples, patients = [], []
    for i, s in enumerate(slides):
        info = slide_info(s)
        table = s.tables.get(_target_key(level, keys))
        sample, patient = info[K.SAMPLE_ID], info[K.PATIENT_ID]
        for col, val in ((K.SAMPLE_ID, sample), (K.PATIENT_ID, patient)):
            if val is None and table is not None and col in table.obs and level == "spot":
                uniq = table.obs[col].astype(str).unique()
                if len(uniq) == 1:
                    if col == K.SAMPLE_ID:
                        sample = uniq[0]
                    else:
                        patient = uniq[0]
        samples.append(str(sample) if sample is not None else f"slide{i}")
        patients.append(patient)
    if all(p is not None for p in patients):
        return samples, [str(p) for p in patients], K.PATIENT_ID
    return samples, samples, K.SAMPLE_ID


def _split(
    groups: list[str], samples: list[str], validation: Any, level: str, seed: int
) -> tuple[list[int], list[int], float]:
    """(training slides, validation slides, fraction of spots held out within a single slide)."""
    uniq = list(dict.fromkeys(groups))
    everything = list(range(len(groups)))
    if validation is None or validation is False or (isinstance(validation, int | float) and validation == 0):
        return everything, [], 0.0
    if isinstance(validation, str) and validation != "auto":
        validation = [validation]
    if isinstance(validation, str):  # "auto"
        if len(uniq) >= 5:
            frac = 0.2
        elif level == "spot":  # too few groups to spare one: hold out a block of spots per slide
            return everything, [], 0.2
        else:
            return everything, [], 0.0
    elif isinstance(validation, int | float):
        frac = float(validation)
        if not 0 < frac < 1:
            raise ValueError(f"`validation` as a fraction must be in (0, 1), got {validation!r}.")
        if len(uniq) < 2:
            if level == "spot":
                return everything, [], frac
            raise ValueError(
                "Cannot hold out a fraction of a single bulk group; pass more slides or `validation=None`."
            )
    else:
        ids = [str(v) for v in validation]
        unknown = [h for h in ids if h not in groups and h not in samples]
        if unknown:
            raise ValueError(f"Validation ids {unknown} match no slide's patient or sample id ({uniq}).")
        val = [i for i in everything if groups[i] in ids or samples[i] in ids]
        train = [i for i in everything if i not in val]
        if not train:
            raise ValueError("Every slide is in the validation split; keep at least one for training.")
        return train, val, 0.0
    rng = np.random.default_rng(seed)
    k = min(max(1, round(frac * len(uniq))), len(uniq) - 1)
    held = {uniq[i] for i in rng.permutation(len(uniq))[:k]}
    return [i for i in everything if groups[i] not in held], [i for i in everything if groups[i] in held], 0.0


def _choose_genes(tables: list[AnnData], genes: Sequence[str] | None, n_top: int, what: str) -> list[str]:
    from ..pp import highly_variable_genes

    if genes is None:
        return list(highly_variable_genes(tables, n_top=n_top))
    chosen = [str(g) for g in dict.fromkeys(genes)]
    if not chosen:
        raise ValueError("`genes` is empty; pass gene names or None for the top HVGs.")
    missing = sorted({g for t in tables for g in chosen if g not in t.var_names})
    if missing:
        raise ValueError(
            f"{len(missing)} requested gene(s) are not in every training {what} table: {missing[:20]}"
            f"{' …' if len(missing) > 20 else ''}. Pass genes from `var_names` of all training tables."
        )
    return chosen


def _fit(
    slides: list[SpatialData],
    *,
    level: str,
    genes: Sequence[str] | None,
    model: ModelParams,
    base: BiTroModel | None,
    policy: str,
    transfer: str | None,
    device: Any,
    seed: int,
    validation: Any,
    train: TrainParams,
    n_top_genes: int,
    progress: bool,
    key_added: str,
    overwrite: bool,
    table_key: str,
    bulk_key: str,
    cells_key: str,
) -> BiTroModel:
    import dataclasses

    import torch

    from ..models import BiTroModel, TrainParams
    from ..models._data import FeatureStats, cells_table, jsonable, phenotype_categories
    from ..models._model import build_net, resolve_device
    from ..models._train import bag_targets, mean_log_rna
    from ..models._train import train as train_loop
    from ..models._transfer import transfer_net
    from ..pp import highly_variable_genes

    if train.lr is None:  # LoRA adapters train at a higher rate (benchmarks/results/accuracy.md)
        lora_lr = base is not None and policy == "lora"
        train = dataclasses.replace(train, lr=TrainParams.LORA_LR if lora_lr else TrainParams.LR)
    keys = {"table_key": table_key, "bulk_key": bulk_key, "cells_key": cells_key}
    tkey = _target_key(level, keys)
    for i, s in enumerate(slides):
        if tkey not in s.tables:
            step = "read it with `bs.io.read_*`" if level == "spot" else "add one with `bs.io.read_bulk`"
            raise KeyError(
                f"Training slide {i} has no {'spot' if level == 'spot' else 'bulk'} table {tkey!r} "
                f"(tables: {list(s.tables.keys())}): {step}."
            )
        cells_table(s, cells_key)
        rec = s.tables[tkey].uns.get(key_added)
        if rec is not None and not overwrite and not (isinstance(rec, Mapping) and "genes" in rec):
            raise ValueError(
                f"uns[{key_added!r}] of the {tkey!r} table of slide {i} holds something that is not a "
                "BiTro run record; pass `overwrite=True` to replace it or choose another `key_added=`."
            )
    tables = [s.tables[tkey] for s in slides]
    samples, groups, by = _groups(slides, keys, level)
    train_idx, val_idx, spot_frac = _split(groups, samples, validation, level, seed)

    # genes ------------------------------------------------------------------------------------
    train_tables = [tables[i] for i in train_idx]
    try:
        hvgs = list(highly_variable_genes(train_tables, n_top=50))
    except ValueError as err:
        warnings.warn(f"No training HVGs could be recorded ({err}).", stacklevel=3)
        hvgs = []
    if base is not None and genes is None:
        common = [g for g in base.genes if all(g in t.var_names for t in train_tables)]
        chosen = list(dict.fromkeys(common + hvgs))
    else:
        chosen = _choose_genes(train_tables, genes, n_top_genes, "spot" if level == "spot" else "bulk")
    hvgs = [g for g in hvgs if g in chosen]  # evaluation genes must be predicted

    # inputs -----------------------------------------------------------------------------------
    dev = resolve_device(device)
    torch.manual_seed(seed)
    if base is not None:
        n_feat = cells_table(slides[0], cells_key).obsm[K.FEATURES].shape[1]
        if n_feat != base.n_features:
            raise ValueError(
                f"The base model was trained on {base.n_features} cell features, the target slides have "
                f"{n_feat} (obsm[{K.FEATURES!r}]). Compute the features with the base's encoder and settings."
            )
        stats, phenotypes, params = base.stats, base.phenotypes, base.params
    else:
        mats = [np.asarray(cells_table(slides[i], cells_key).obsm[K.FEATURES]) for i in train_idx]
        if len({m.shape[1] for m in mats}) > 1:
            raise ValueError(
                f"The training slides have different feature widths {[m.shape[1] for m in mats]}."
            )
        stats = FeatureStats.fit(mats)
        phenotypes = list(
            dict.fromkeys(c for s in slides for c in phenotype_categories(cells_table(s, cells_key)))
        )
        params = model
        if params.phenotype_profiles is None:  # auto: whole-slide bags (benchmarks/results/accuracy.md)
            params = dataclasses.replace(params, phenotype_profiles=level == "bulk")
        if params.rna_head is None:  # auto: spots, whose libraries supervise it (ditto)
            params = dataclasses.replace(params, rna_head=level == "spot")
    train_data, val_data, bag_sizes = _build_data(
        slides,
        train_idx,
        val_idx,
        spot_frac,
        level=level,
        genes=chosen,
        stats=stats,
        phenotypes=phenotypes,
        need_graph=params.gat_layers > 0,
        chunk_cells=train.chunk_cells,
        keys=keys,
    )
    bag_cells = float(np.mean(bag_sizes))
    targets = bag_targets(train_data, len(chosen))
    # The head starts at the loss-optimal constant: for the log1p MSE that is the mean of log1p
    # targets (sparse spots make it far below log1p of the mean), for Poisson the mean itself.
    if train.loss == "mse":
        target_mean = np.expm1(np.log1p(targets.astype(np.float64)).mean(axis=0))
    else:
        target_mean = targets.mean(axis=0)
    # per-cell profile: the bag profile itself when bags are (RNA-weighted) means of their cells
    per_cell = target_mean / (1.0 if params.pooling == "mean" or params.normalized else bag_cells)
    bias = torch.as_tensor(per_cell, dtype=torch.float32)

    # network ----------------------------------------------------------------------------------
    def start(data: list[Any]) -> tuple[Any, Any, dict[str, Any]]:
        """The network before its first step on ``data``: fresh (+ deconvolution start) or transferred."""
        torch.manual_seed(seed)
        report: dict[str, Any] = {}
        lora = None
        if base is None:
            net = build_net(
                n_features=stats.mean.shape[0],
                n_phenotypes=len(phenotypes),
                n_genes=len(chosen),
                params=params,
            )
            net.set_gene_bias(bias)
            net.init_depth(level, bag_cells)
            if net.profiles is not None:
                from ..models._deconv import bag_design, deconvolve

                design = bag_design(data, len(phenotypes) + 1)
                design = design * _design_scale(design.sum(axis=1, keepdims=True), params, level, bag_cells)
                start_targets = bag_targets(data, len(chosen)).astype(np.float64)
                net.set_profiles(
                    torch.as_tensor(deconvolve(design, start_targets, per_cell), dtype=torch.float32)
                )
        else:
            net, lora, report = transfer_net(
                base,
                chosen,
                policy=policy,  # type: ignore[arg-type]
                bias_new=_bias_param(bias, params),
                target_bag_cells=bag_cells,
                level=level,
            )
        net.to(dev)
        if base is not None and level == "spot" and params.activation == "exp":
            # A base from whole slides (deep libraries) knows nothing of how sparse spots are, and the
            # mean of log1p of sparse counts sits far below log1p of their mean: one log-scale per gene
            # matches the base to the spot targets before the first step. Measured: bulk -> spot LoRA
            # 0.367 / 0.362 / 0.348 with it vs 0.357 / 0.357 / 0.332 without (3 seeds); at bulk targets
            # it lowered LoRA (spot -> bulk 0.067-0.175 vs 0.141-0.254), so it is spots only.
            from ..models._deconv import log1p_match
            from ..models._train import bag_predictions

            log_c = log1p_match(
                bag_predictions(net, data, device=dev), bag_targets(data, len(chosen)).astype(np.float64)
            )
            with torch.no_grad():
                net.head.bias.add_(torch.as_tensor(log_c, dtype=net.head.bias.dtype, device=dev))
        return net, lora, report

    net, lora, report = start(train_data)
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    history, best_epoch = train_loop(
        net, train_data, val_data, params=train, device=dev, seed=seed, progress=progress
    )
    refit_record = None
    if train.refit and val_data:
        # the validation bags chose the number of epochs; train again from the start on all bags
        epochs = best_epoch + 1
        net, lora, report = start(train_data + val_data)
        refit_history, _ = train_loop(
            net,
            train_data + val_data,
            [],
            params=dataclasses.replace(train, epochs=epochs),
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
        "transfer": transfer or "none",
        "policy": policy if base is not None else "none",
        "seed": seed,
        "device": str(dev),
        "genes": chosen,
        "hvgs": hvgs,
        "model": params.to_dict(),
        "train": train.to_dict(),
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
        "matched_genes": report.get("matched_genes", []),
        "new_genes": report.get("new_genes", chosen if base is None else []),
    }
    if base is not None:
        record["base"] = {k: v for k, v in report.items() if k not in ("matched_genes", "new_genes")}
        record["base"]["record"] = {k: base.record.get(k) for k in ("level", "split", "best_epoch", "seed")}
    cells0 = cells_table(slides[0], cells_key)
    meta = {
        "features": jsonable(dict(cells0.uns.get(K.FEATURES_PARAMS, {}))),
        "phenotypes": jsonable(dict(cells0.uns.get(K.PHENOTYPE_PARAMS, {}))),
    }
    record = jsonable(record)
    fitted = BiTroModel(
        net,
        genes=chosen,
        level=level,
        stats=stats,
        phenotypes=phenotypes,
        params=params,
        train_params=train,
        bag_cells=bag_cells,
        lora=lora,
        meta=meta,
        record=record,
    )
    for t in tables:
        t.uns[key_added] = uns_safe(record)
    return fitted


def _design_scale(n: np.ndarray, params: ModelParams, level: str, bag_cells: float) -> np.ndarray:
    """What one cell weighs in its bag's profile (bags of ``n`` cells), as the pooling has it at
    the start of training: 1 (plain sum), ``n̄ / n`` (whole slides with ``slide_size_norm``),
    ``1 / n`` (mean) or ``(n / n̄) ** β / n`` (RNA-content head, all cells alike at the start)."""
    from ..models._net import DEPTH_INIT

    n = np.maximum(n, 1.0)
    if params.normalized:
        return (n / bag_cells) ** DEPTH_INIT[level] / n
    if params.pooling == "mean":
        return 1.0 / n
    if level == "bulk" and params.slide_size_norm:
        return bag_cells / n
    return np.ones_like(n)


def _bias_param(per_cell: torch.Tensor, params: ModelParams) -> torch.Tensor:
    """Head bias giving ``per_cell`` expression per cell under the activation of ``params``."""
    import torch

    m = per_cell.clamp(min=1e-6)
    return m.log() if params.activation == "exp" else m + torch.log(-torch.expm1(-m))


def _n_bags(item: Any) -> int:
    return len(item.rows) if hasattr(item, "rows") else 1


def _build_data(
    slides: list[SpatialData],
    train_idx: list[int],
    val_idx: list[int],
    spot_frac: float,
    *,
    level: str,
    genes: list[str],
    stats: Any,
    phenotypes: list[str],
    need_graph: bool,
    chunk_cells: int,
    keys: Mapping[str, str],
) -> tuple[list[Any], list[Any], list[int]]:
    from ..models._data import bulk_row, library_and_counts, slide_cells
    from ..models._train import BulkSlide, SpotSet

    train_data: list[Any] = []
    val_data: list[Any] = []
    bag_sizes: list[int] = []
    n_with_cells = 0
    for i in [*train_idx, *val_idx]:
        s = slides[i]
        cells = slide_cells(
            s,
            stats=stats,
            phenotypes=phenotypes,
            need_graph=need_graph,
            need_spots=level == "spot",
            table_key=keys["table_key"],
            cells_key=keys["cells_key"],
        )
        if level == "spot":
            table = s.tables[keys["table_key"]]
            lib, counts = library_and_counts(table, genes)
            part = cells.spot_partition(table.n_obs)
            sizes = part.sizes()
            rows = np.flatnonzero((sizes > 0) & (lib > 0))
            n_with_cells += rows.size
            if rows.size == 0:
                continue
            cp10k = counts[rows] / lib[rows, None] * 1e4
            items = [(rows, cp10k, lib[rows])]
            if i in train_idx and spot_frac > 0:
                x = np.array(
                    [cells.xy_um[part.order[part.cell_ptr[r] : part.cell_ptr[r + 1]], 0].mean() for r in rows]
                )
                cut = np.quantile(x, 1 - spot_frac)
                held = x > cut
                if held.any() and (~held).any():
                    items = [
                        (rows[~held], cp10k[~held], lib[rows][~held]),
                        (rows[held], cp10k[held], lib[rows][held]),
                    ]
            for j, (r, y, lb) in enumerate(items):
                item = SpotSet(cells, part, r, y.astype(np.float32), lb.astype(np.float32))
                if i in train_idx and j == 0:
                    train_data.append(item)
                    bag_sizes.extend(sizes[r].tolist())
                else:
                    val_data.append(item)
        else:
            table = s.tables[keys["bulk_key"]]
            row = bulk_row(s, bulk_key=keys["bulk_key"])
            lib, counts = library_and_counts(table[row : row + 1], genes)
            if cells.n_cells == 0 or lib[0] <= 0:
                raise ValueError(
                    f"Bulk slide {i} has no cells or an empty bulk profile; drop it or segment it."
                )
            n_with_cells += 1
            item = BulkSlide(  # type: ignore[assignment]
                cells,
                cells.chunk_partition(chunk_cells),
                (counts[0] / lib[0] * 1e4).astype(np.float32),
                float(lib[0]),
            )
            if i in train_idx:
                train_data.append(item)
                bag_sizes.append(cells.n_cells)
            else:
                val_data.append(item)
    if level == "spot" and n_with_cells == 0:
        raise ValueError(
            "No spot of any training slide holds a cell (the spots have no cells: obs['spot_id'] of the "
            "cells "
            "table is missing / -1 everywhere): run `bs.tl.assign_cells` first, and check that the spots "
            "overlap the segmented tissue."
        )
    if not train_data:
        raise ValueError("The training split has no usable bag (spots with cells / bulk slides).")
    return train_data, val_data, bag_sizes


def uns_safe(obj: Any) -> Any:
    """A copy AnnData can write to zarr / h5ad: ``None`` → ``"none"``, ragged lists → strings."""
    if isinstance(obj, dict):
        return {k: uns_safe(v) for k, v in obj.items()}
    if obj is None:
        return "none"
    if isinstance(obj, list):
        if any(isinstance(v, dict | list) for v in obj):
            return {str(i): uns_safe(v) for i, v in enumerate(obj)}
        if any(isinstance(v, str) for v in obj):
            return np.asarray(["none" if v is None else str(v) for v in obj], dtype=object)
        if any(v is None for v in obj):
            return np.asarray([math.nan if v is None else v for v in obj], dtype=float)
        return np.asarray(obj) if obj else np.zeros(0)
    return obj
