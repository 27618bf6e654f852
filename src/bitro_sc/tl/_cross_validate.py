"""Leave-one-group-out cross-validation of BiTro and the baselines on the same folds and genes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from .. import _keys as K
from .. import _sdata
from ._evaluate import evaluate
from ._holdout import (
    FitFunction,
    fit_fold,
    order_columns,
    prediction_table,
    resolve_methods,
    score_spots,
    training_hvgs,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

_GROUPS = (K.SAMPLE_ID, K.PATIENT_ID)


def _group_of(sdata: SpatialData, i: int, groups: str, table_key: str) -> str:
    """The slide's sample id (fallback ``slide_{i}``) or patient id (an error when unknown)."""
    if groups == K.SAMPLE_ID:
        return _sdata.sample_id(sdata, i, table_key=table_key)
    value = _sdata.patient_id(sdata, table_key=table_key)
    if value is None:
        raise ValueError(
            f"Slide {i} has no {groups!r}: set it with `bs.set_slide_info(sdata, {groups}=...)` "
            "or read the slide with `bs.io.read_*`."
        )
    return value


def cross_validate(
    sdatas: Sequence[SpatialData],
    *,
    groups: Literal["sample_id", "patient_id"] = "sample_id",
    methods: Sequence[str] | Mapping[str, FitFunction | None] = ("bitro", "ridge", "mean"),
    level: Literal["spot", "bulk"] = "spot",
    genes: Sequence[str] | None = None,
    top_hvg: int = 50,
    fit_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    table_key: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Leave-one-group-out cross-validation of several methods on the same folds and genes.

    In each fold, the slides of one group (``sample_id`` or ``patient_id``) are held out; every
    method is fitted on the remaining slides only, with the same genes: ``genes`` when given,
    else the top ``top_hvg`` highly variable genes of *that fold's training slides*
    (:func:`bitro_sc.pp.highly_variable_genes`). Predictions are made with the model's
    ``predict_frame`` into light copies of the held-out tables, so the user's slides are never
    modified (methods other than the baselines are fitted on shallow copies of the training
    slides, since ``fit_bitro`` writes its run record into the training tables), and scored
    with :func:`bitro_sc.tl.evaluate` on ``log1p`` counts-per-10k.

    ``level="spot"``: per-gene correlation across the spots of each held-out slide.
    ``level="bulk"``: each slide's profile is predicted by the model of the fold that held it
    out, and the correlation is computed across all slides at once (fold ``"pooled"``), over
    ``genes`` or else the genes every fold predicted (the intersection of the folds' training
    HVGs; pass ``genes=`` for a fixed panel).

    Parameters
    ----------
    sdatas
        Slides (at least 2 groups); each with a spot table (``"table"``) or a ``"bulk"`` table,
        cell features and, at spot level, cells assigned to spots.
    groups
        What to hold out together; slides of one patient must share a fold to avoid leakage.
    methods
        Built-in names ``"bitro"`` (``bs.tl.fit_bitro``), ``"ridge"``, ``"mean"``
        (``bs.tl.fit_baseline``), or a mapping name -> fit function
        ``fit(train_slides, *, genes, level, **kwargs) -> model`` (``None`` for a built-in).
    fit_kwargs
        Per-method keyword arguments, e.g. ``{"bitro": {"epochs": 20}, "ridge": {"alpha": 10.0}}``.
    table_key
        Table to score; default ``"table"`` (spot) or ``"bulk"``.

    Returns
    -------
    Long table with one row per (fold, held-out slide, method, gene): ``fold``, ``test_group``,
    ``sample``, ``method``, ``gene``, ``pearson``, ``spearman``, ``n``, ``is_hvg`` (a training HVG of
    the fold). ``df.attrs["summary"]``: per method ``hest_score`` (mean over folds of the mean
    Pearson over the fold's HVGs), ``hest_score_sd`` (over folds), ``mean_pearson`` (all genes),
    ``n_folds``; ``df.attrs["folds"]``: per fold the held-out group and the training samples.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in slides:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features(slides, progress=False)
    >>> for s in slides:
    ...     bs.tl.assign_cells(s)
    >>> df = bs.tl.cross_validate(slides, methods=("ridge", "mean"), top_hvg=20, progress=False)
    >>> sorted(df.attrs["summary"])
    ['mean', 'ridge']
    """
    import anndata as ad
    from tqdm.auto import tqdm

    if groups not in _GROUPS:
        raise ValueError(f"`groups` must be one of {_GROUPS}, got {groups!r}.")
    level = _sdata.check_level(level, K.FIT_LEVELS)  # type: ignore[assignment]
    slides = list(sdatas)
    key = table_key or _sdata.level_table_key(level)
    specs, fit_kwargs = resolve_methods(methods, fit_kwargs)
    for i, s in enumerate(slides):
        if key not in s.tables:
            raise KeyError(f"Slide {i} has no table {key!r} to score; pass `table_key=`.")
    slide_groups = [_group_of(s, i, groups, key) for i, s in enumerate(slides)]
    samples = _sdata.sample_ids(slides)
    unique_groups = list(dict.fromkeys(slide_groups))
    if len(unique_groups) < 2:
        raise ValueError(
            f"Leave-one-group-out needs at least 2 distinct {groups!r} values, got {unique_groups}."
        )

    frames: list[pd.DataFrame] = []
    fold_info: list[dict[str, Any]] = []
    bulk_tables: dict[str, list[AnnData]] = {m: [] for m in specs}
    bulk_genes: set[str] = set()
    for fold, held in enumerate(tqdm(unique_groups, desc="folds", disable=not progress)):
        train_idx = [i for i, g in enumerate(slide_groups) if g != held]
        test_idx = [i for i, g in enumerate(slide_groups) if g == held]
        train = [slides[i] for i in train_idx]
        hvgs = training_hvgs(train, level=level, table_key=key, top_hvg=top_hvg)
        fold_genes = list(genes) if genes is not None else hvgs
        fold_info.append(
            {"fold": fold, "test_group": held, "train_samples": [samples[i] for i in train_idx], "hvgs": hvgs}
        )
        bulk_genes = set(fold_genes) if fold == 0 else bulk_genes & set(fold_genes)
        models = fit_fold(
            train, specs, level=level, genes=fold_genes, fit_kwargs=fit_kwargs, progress=progress
        )
        if level == "spot":
            parts = score_spots(
                models, slides, test_idx, samples, genes=fold_genes, hvgs=hvgs, top_hvg=top_hvg, table_key=key
            )
            frames.extend(df.assign(fold=fold, test_group=held) for df in parts)
            continue
        for name, model in models.items():  # bulk: pooled over all folds below
            for i in test_idx:
                light = prediction_table(model, slides[i], level="bulk", key_added=name, table_key=key, i=i)
                light.uns[name] = {"genes": list(model.genes), "hvgs": hvgs}
                bulk_tables[name].append(light)
    if level == "bulk":
        common = [g for g in fold_info[0]["hvgs"] if g in bulk_genes] if genes is None else list(genes)
        if not common:
            raise ValueError(
                "The folds' training HVGs share no gene, so the pooled bulk predictions cannot be compared; "
                "pass `genes=`."
            )
        for name, tables in bulk_tables.items():
            pooled = ad.concat(tables, join="inner", merge="first")
            pooled.uns[name] = {"hvgs": common if genes is None else []}
            df = evaluate(pooled, layer=name, genes=common, top_hvg=None, level="bulk", store=False)
            if genes is not None:
                all_hvgs = set().union(*(set(f["hvgs"]) for f in fold_info))
                df["is_hvg"] = [g in all_hvgs for g in df.index]
            frames.append(df.reset_index().assign(fold="pooled", test_group="all", sample="all", method=name))
    out = order_columns(pd.concat(frames, ignore_index=True))
    out.attrs["summary"] = summarize_cv(out)
    out.attrs["folds"] = fold_info
    out.attrs["level"] = level
    out.attrs["groups"] = groups
    return out


def summarize_cv(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per-method summary of a :func:`cross_validate` table (``NaN`` genes skipped).

    ``hest_score``: mean over folds (held-out slides) of the mean Pearson over the fold's HVGs;
    ``hest_score_sd``: its standard deviation over folds; ``mean_pearson`` / ``mean_spearman``:
    mean over folds of the mean over all evaluated genes; ``n_folds``.
    """
    out: dict[str, dict[str, float]] = {}
    for method, sub in df.groupby("method", sort=False):
        per_fold = sub.groupby(["fold", "sample"], sort=False)
        hest = per_fold.apply(lambda d: d.loc[d["is_hvg"], "pearson"].mean(), include_groups=False)
        mean_r = per_fold["pearson"].mean()
        mean_rho = per_fold["spearman"].mean()
        out[str(method)] = {
            "hest_score": float(hest.mean()),
            "hest_score_sd": float(hest.std(ddof=1)) if hest.notna().sum() > 1 else float("nan"),
            "mean_pearson": float(mean_r.mean()),
            "mean_spearman": float(mean_rho.mean()),
            "n_folds": len(hest),
        }
    return out
