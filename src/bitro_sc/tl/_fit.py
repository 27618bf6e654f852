"""`bs.tl.fit_bitro`: check the arguments, find or train the base of a transfer, and call
:func:`bitro_sc.models.fit` (the training algorithm)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import _keys as K
from .. import _sdata, _validate
from ..models._fit import fit
from ..models._model import BiTroModel
from ..models._params import DataKeys, ModelParams, TrainParams
from ..models._route import POLICIES_AUTO
from ..pp._expression import highly_variable_genes

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from spatialdata import SpatialData

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
    policy: Literal["auto", "lora", "full", "head"] = "auto",
    n_top_genes: int = 250,
    progress: bool = True,
    table_key: str = K.TABLE,
    bulk_key: str = K.BULK,
    cells_key: str = K.CELLS,
    features_key: str = K.FEATURES,
    phenotype_key: str = K.PHENOTYPE,
    spot_key: str = K.SPOT_ID,
    graph_key: str = K.SPATIAL,
    key_added: str = K.RUN,
    overwrite: bool = False,
    strategy: Literal["single", "ddp"] = "single",
    world_size: int = 2,
) -> BiTroModel:
    """Train the BiTro model on spot (spatial) or bulk (one profile per slide) expression.

    Cells (``tables["cells"]``: ``obsm["X_bitro"]``, ``obs["bitro_phenotype"]``, the cell graph in
    ``obsp``, ``obs["spot_id"]``) are pooled into bags: the cells of each spot (``level="spot"``,
    targets = rows of the spot table) or all cells of a slide (``level="bulk"``, targets = the
    slide's row of its bulk table). The loss compares log1p counts-per-10k (library over all genes).

    Slides that are only segmented are prepared first: the missing steps run with one log line each
    (logger ``"bitro_sc"``, level INFO), exactly as the explicit calls would: ``bs.tl.cell_features``
    and ``bs.tl.phenotypes`` on all slides together (with a ``base`` model: with its encoder, scaler
    and k-means; when only some slides lack a step: with the others' encoder, scaler and k-means),
    then ``bs.tl.assign_cells`` and ``bs.tl.cell_graph`` per slide. A step that cannot be run here
    (no cells table, an encoder that needs a weights file, …) is listed, with the call that fixes
    it, in one error raised before anything is written.

    The model owns its preprocessing (``model.preprocessing``: encoder identity, feature scaler,
    phenotype k-means, assignment and graph parameters): training slides standardised with
    different statistics, or clustered by different k-means, are refused; see
    :func:`bitro_sc.tl.predict_bitro` for what happens on new slides.

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
        For transfer: ``"auto"`` (default) chooses the route by the validation loss of held-out
        target bags alone (spots, or leave-one-slide-out on fewer than 5 bulk slides): zero-shot
        (the base with its per-gene scale matched to the targets), head only, LoRA (two ranks /
        learning rates), full fine-tuning or training from scratch, and the number of epochs; the
        choice and every route's score are in ``record["route"]`` (see ``bs.pl.history``). With 3
        or more held-out bulk slides the choice is by cross-validated per-gene Pearson, and a
        trained route replaces zero-shot (scratch a transfer route) only when it wins by more than
        one standard error (``record["route"]["margin"]``).
        ``"lora"`` (LoRA adapters on the input projection, attention q/v/out and feed-forward
        layers + gene head; all base weights frozen, GAT included), ``"full"`` (everything
        trainable) or ``"head"`` (gene head only) choose only the epochs (0: zero-shot).
    n_top_genes
        Number of HVGs when ``genes`` is ``None``.
    table_key, bulk_key, cells_key
        Spot table, bulk table and cells table of the slides.
    features_key, phenotype_key, spot_key, graph_key
        Where the cells table holds the features (``obsm``, ``bs.tl.cell_features(key_added=)``),
        the phenotype and each cell's spot (``obs``, ``bs.tl.phenotypes`` / ``bs.tl.assign_cells``
        ``key_added=``) and the cell graph (``obsp[f"{graph_key}_connectivities"]``,
        ``bs.tl.cell_graph(key_added=)``). The model records all keys (``record["keys"]``) and
        ``bs.tl.predict_bitro`` reads the same ones by default.
    key_added
        ``uns`` key of the run record on the training tables. A previous run record there is
        replaced; anything else there needs ``overwrite=True``.
    strategy, world_size
        ``"single"`` (default): this process. ``"ddp"``: bulk level from scratch, data parallel over
        ``world_size`` processes (gloo on CPU, NCCL on GPUs; under ``torchrun``, the processes of the
        initialised group): :func:`bitro_sc.models.fit_cohort` on the slides' tables (every slide is
        a training bag: ``validation`` must hold nothing out). See docs/cohorts.md.

    Returns
    -------
    The fitted :class:`~bitro_sc.models.BiTroModel` (trained by :func:`bitro_sc.models.fit`). Its
    ``record`` (config, keys, genes, ``hvgs`` = top-50 HVGs of the training tables for evaluation,
    split, history, trainable / frozen parameter counts, matched / new genes) is also written to
    ``uns[key_added]`` of every training table.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0, with_bulk=True)
    >>> for s in slides:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features(slides, progress=False)
    >>> _ = bs.tl.phenotypes(slides, n_clusters=3)
    >>> for s in slides:
    ...     bs.tl.assign_cells(s)
    ...     bs.tl.cell_graph(s)
    >>> model = bs.tl.fit_bitro(slides[:2], epochs=2, n_top_genes=20, validation=None, progress=False)
    >>> bs.tl.predict_bitro(slides[2], model)
    >>> df = bs.tl.evaluate(slides[2])
    >>> sorted(df.columns[:2])  # one row per evaluated gene
    ['pearson', 'spearman']


    Train a base on the bulk profiles of the first two slides, then adapt it to the third
    slide's spots (LoRA adapters by default):

    >>> adapted = bs.tl.fit_bitro(
    ...     slides[2], transfer="bulk", bulk=slides[:2], epochs=1, n_top_genes=20, validation=None,
    ...     progress=False,
    ... )
    >>> adapted.level, adapted.record["base"]["base_level"]
    ('spot', 'bulk')
    """
    slides = _sdata.as_slides(sdata_or_list, what="training slide")
    _validate.check_choice(transfer, _TRANSFERS, "transfer")
    _validate.check_choice(policy, POLICIES_AUTO, "policy")
    _validate.check_choice(strategy, ("single", "ddp"), "strategy")
    genes = _validate.check_genes(genes)
    _validate.check_device(device)
    _validate.check_positive_int(n_top_genes, "n_top_genes")
    if epochs is not None:
        _validate.check_positive_int(epochs, "epochs")
    expected = "bulk" if transfer == "spatial" else "spot"
    fit_level = _sdata.check_level(expected if level is None else level, K.FIT_LEVELS)
    if transfer is not None and fit_level != expected:
        raise ValueError(
            f"transfer={transfer!r} adapts a model to {expected}-level targets, but level={fit_level!r}. "
            f"Drop `level=` or use transfer={'spatial' if expected == 'spot' else 'bulk'!r}."
        )
    if bulk is not None and transfer != "bulk":
        raise ValueError("`bulk=` (slides to train the base on) is only used with transfer='bulk'.")
    if base is not None and transfer is None:
        raise ValueError("`base=` is only used with `transfer='bulk'` or `transfer='spatial'`.")
    for lvl in (
        fit_level,
        *(["bulk" if transfer == "bulk" else "spot"] if transfer and base is None else []),
    ):
        key = table_key if lvl == "spot" else bulk_key
        _validate.check_training_tables(slides, key, level=lvl, key_added=key_added, overwrite=overwrite)
        if bulk is not None and lvl == "bulk":
            bulk_slides = _sdata.as_slides(bulk, what="bulk slide")
            _validate.check_training_tables(
                bulk_slides, key, level=lvl, key_added=key_added, overwrite=overwrite
            )
    tp = TrainParams.coerce(train)
    if epochs is not None:
        tp = TrainParams.coerce({**tp.to_dict(), "epochs": int(epochs)})
    keys = DataKeys(
        table_key=table_key,
        bulk_key=bulk_key,
        cells_key=cells_key,
        features_key=features_key,
        phenotype_key=phenotype_key,
        spot_key=spot_key,
        graph_key=graph_key,
    )
    run = functools.partial(
        _fit_recorded,
        keys=keys,
        model=ModelParams.coerce(model),
        train=tp,
        seed=seed,
        device=device,
        validation=validation,
        n_top_genes=n_top_genes,
        progress=progress,
        key_added=key_added,
        overwrite=overwrite,
    )
    if isinstance(base, str | Path):
        base = BiTroModel.load(base)
    prepare = functools.partial(
        _prepare, slides, bulk, keys=keys, level=fit_level, transfer=transfer, model=model, progress=progress
    )
    if strategy == "ddp":  # checked before anything is written
        from ..models import _ddp

        _ddp.check_slides(slides, level=fit_level, transfer=transfer, validation=validation, keys=keys)
        _validate.check_positive_int(world_size, "world_size")
        prepare(base=None)
        fitted = _ddp.fit_slides(
            slides, genes=genes, n_top_genes=n_top_genes, keys=keys, model=model, train=tp, seed=seed,
            device=device, world_size=world_size, progress=progress,
        )  # fmt: skip
        for s in slides:
            s.tables[bulk_key].uns[key_added] = _sdata.to_uns(fitted.record)
            _sdata.record_writer(s, "bs.tl.fit_bitro", _sdata.part_key(bulk_key, "uns", key_added))
        return fitted
    base_model = None
    if transfer is None:
        prepare(base=None)
    else:
        base_model = _resolve_base(
            base,
            transfer=transfer,
            slides=slides,
            bulk=bulk,
            genes=genes,
            n_top=n_top_genes,
            keys=keys,
            run=run,
            prepare=prepare,
        )
    return run(slides, level=fit_level, genes=genes, base=base_model, policy=policy)


def _prepare(
    slides: list[SpatialData],
    bulk: Sequence[SpatialData] | None,
    *,
    keys: DataKeys,
    level: str,
    transfer: str | None,
    base: Any,
    model: ModelParams | Mapping[str, Any] | None,
    progress: bool,
) -> None:
    """Run the preparation steps the training slides (and ``bulk`` base slides) lack: cell features,
    phenotypes, cell → spot assignment, cell graph; with a base model, with its recorded settings.
    Steps that cannot be run here are listed in one error before anything is written."""
    from ._steps import plan_steps

    if isinstance(base, BiTroModel):
        params, prep = base.params, base.preprocessing
    else:
        params, prep = ModelParams.coerce(model).resolved(level), None
    uses_phen = params.phenotype_dim > 0 or bool(params.phenotype_profiles)
    need = {"need_phenotypes": uses_phen, "need_graph": params.gat_layers > 0}
    spot_base = transfer == "spatial" and base is None  # the base is trained first on the slides' spots
    plan = plan_steps(
        slides,
        keys=keys,
        prep=prep,
        need_spots=level == "spot" or spot_base,
        who="fit_bitro",
        progress=progress,
        from_scratch=not isinstance(base, BiTroModel),
        **need,
    )
    if bulk is not None and transfer == "bulk" and base is None:
        sources = _sdata.as_slides(bulk, what="bulk slide")
        plan = plan + plan_steps(
            sources,
            keys=keys,
            prep=None,
            need_spots=False,
            who="fit_bitro",
            progress=progress,
            from_scratch=True,
            **need,
        )
    plan.run()


def _resolve_base(
    base: BiTroModel | str | Path | None,
    *,
    transfer: str,
    slides: list[SpatialData],
    bulk: Sequence[SpatialData] | None,
    genes: Sequence[str] | None,
    n_top: int,
    keys: DataKeys,
    run: Callable[..., BiTroModel],
    prepare: Callable[..., None],
) -> BiTroModel:
    """The base model of a transfer: ``base`` (or the model saved there), else one trained first
    by ``run`` on ``bulk`` or on the slides that hold the base level's table."""
    base_level = "bulk" if transfer == "bulk" else "spot"
    if base is None:
        key = keys.target(base_level)
        sources = (
            _sdata.as_slides(bulk, what="bulk slide")
            if bulk is not None
            else [s for s in slides if key in s.tables]
        )
        if not sources:
            if transfer == "bulk":
                raise ValueError(
                    "transfer='bulk' needs a bulk-trained base model, and none was given: pass `base=` (a "
                    "BiTroModel trained with `level='bulk'`, or a path written by `model.save`), or "
                    f"`bulk=[...]` (SpatialData slides with cells and a {key!r} table, one row per slide) "
                    f"to train it first, or give slides that have a {key!r} table. Without `transfer=`, "
                    "`bs.tl.fit_bitro(sdata)` trains from scratch on this slide's spots."
                )
            raise ValueError(
                "transfer='spatial' needs a spot-trained base model, and none was given: pass `base=` (a "
                "BiTroModel trained with `level='spot'`, or a saved one), or give slides that also have a "
                f"spot table {key!r} with cells assigned to spots to train it first."
            )
        need = (
            list(dict.fromkeys(genes)) if genes is not None else _target_genes(slides, transfer, keys, n_top)
        )
        base_genes = None
        if need is not None:  # train the base on the genes the target will predict
            base_genes = [g for g in need if all(g in s.tables[key].var_names for s in sources)]
            if not base_genes and genes is not None:
                raise ValueError(f"None of the requested genes is in the {key!r} tables of the base slides.")
            base_genes = base_genes or None
        prepare(base=None)  # the slides lack nothing the base and the transfer need
        base = run(sources, level=base_level, genes=base_genes, base=None)
        return _check_base(base, transfer, base_level)
    return _check_base(base, transfer, base_level, prepare=prepare)


def _check_base(
    base: Any, transfer: str, base_level: str, prepare: Callable[..., None] | None = None
) -> BiTroModel:
    if not isinstance(base, BiTroModel):
        raise TypeError(f"`base` must be a BiTroModel or a path to a saved one, got {type(base).__name__}.")
    if base.level != base_level:
        raise ValueError(
            f"transfer={transfer!r} starts from a {base_level}-trained model, but the base was trained at "
            f"level {base.level!r}. Use transfer={'spatial' if base.level == 'spot' else 'bulk'!r} "
            "for this base."
        )
    if prepare is not None:  # a given base: the slides are prepared with its recorded settings
        prepare(base=base)
    return base


def _target_genes(slides: list[SpatialData], transfer: str, keys: DataKeys, n_top: int) -> list[str] | None:
    """Default genes of the target data (its top HVGs), or ``None`` when they cannot be computed."""
    key = keys.target("spot" if transfer == "bulk" else "bulk")
    tables = [s.tables[key] for s in slides if key in s.tables]
    if not tables:
        return None
    try:
        return list(highly_variable_genes(tables, n_top=int(n_top)))
    except ValueError:  # e.g. too few bulk rows for an HVG ranking: the base picks its own genes
        return None


def _fit_recorded(
    slides: list[SpatialData], *, level: str, keys: DataKeys, key_added: str, **kw: Any
) -> BiTroModel:
    """:func:`~bitro_sc.models.fit`, then the run records it wrote are recorded as fit_bitro's."""
    fitted = fit(slides, level=level, keys=keys, key_added=key_added, **kw)
    table = keys.target(level)
    for s in slides:
        _sdata.record_writer(s, "bs.tl.fit_bitro", _sdata.part_key(table, "uns", key_added))
    return fitted
