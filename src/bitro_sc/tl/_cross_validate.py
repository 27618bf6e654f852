"""Leave-one-group-out cross-validation of BiTro and the baselines on the same folds and genes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _keys as K

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

_GROUPS = (K.SAMPLE_ID, K.PATIENT_ID)
_BUILTIN = ("bitro", "ridge", "mean")
_LEVELS = ("spot", "bulk")

#: a custom method: ``fit(train_slides, *, genes, level) -> model`` implementing the model protocol
FitFunction = Callable[..., Any]


def _group_of(sdata: SpatialData, i: int, groups: str, table_key: str) -> str:
    from .._sdata import slide_info

    value = slide_info(sdata).get(groups)
    if value is None and table_key in sdata.tables and groups in sdata.tables[table_key].obs:
        values = sdata.tables[table_key].obs[groups].astype(str).unique()
        if len(values) == 1:
            value = values[0]
    if value is None:
        raise ValueError(
            f"Slide {i} has no {groups!r}: set `sdata.attrs['bitro_sc'][{groups!r}]` "
            "(`bitro_sc._sdata.set_slide_info`) or read it with `bs.io.read_*`."
        )
    return str(value)


def _fitter(name: str, spec: FitFunction | None, level: str, kwargs: Mapping[str, Any]) -> FitFunction:
    if spec is not None:
        return lambda train, genes: spec(train, genes=genes, level=level, **kwargs)
    if name == "bitro":
        from ._fit import fit_bitro

        return lambda train, genes: fit_bitro(
            train,
            level=level,  # type: ignore[arg-type]
            genes=genes,
            **kwargs,
        )
    if name in ("ridge", "mean"):
        from ._baseline import fit_baseline

        return lambda train, genes: fit_baseline(
            train,
            method=name,  # type: ignore[arg-type]
            level=level,  # type: ignore[arg-type]
            genes=genes,
            **kwargs,
        )
    raise ValueError(
        f"Unknown method {name!r}: use {_BUILTIN} or pass a mapping name -> fit function "
        "(`fit(train_slides, *, genes, level) -> model`)."
    )


def _shallow_copy(sdata: SpatialData) -> SpatialData:
    """The same elements (shared, not copied) with copies of the tables and attrs.

    Fitting writes its run record into the training tables; on a shallow copy the user's
    slides stay untouched while images and shapes are not duplicated.
    """
    import copy
    import warnings

    from spatialdata import SpatialData

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
        return SpatialData(
            images=dict(sdata.images),
            labels=dict(sdata.labels),
            points=dict(sdata.points),
            shapes=dict(sdata.shapes),
            tables={k: t.copy() for k, t in sdata.tables.items()},
            attrs=copy.deepcopy(dict(sdata.attrs)),
        )


def _prediction_table(table: AnnData, frame: pd.DataFrame, key: str) -> AnnData:
    """A light copy of ``table`` (counts only) with the predictions as ``layers[key]``."""
    import anndata as ad

    from ..pp._expression import get_counts

    out = ad.AnnData(get_counts(table).copy(), obs=table.obs.copy(), var=pd.DataFrame(index=table.var_names))
    values = np.full(out.shape, np.nan, dtype=np.float32)
    rows = out.obs_names.get_indexer(frame.index)
    cols = out.var_names.get_indexer(frame.columns)
    if (rows < 0).any() or (cols < 0).any():
        raise ValueError("The model's prediction rows / genes do not match the held-out table.")
    values[np.ix_(rows, cols)] = frame.to_numpy(dtype=np.float32)
    out.layers[key] = values
    return out


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
    >>> slides = bs.datasets.synthetic(3, kind="visium", size_um=600)  # doctest: +SKIP
    >>> for s in slides:  # doctest: +SKIP
    ...     bs.tl.segment(s); bs.tl.cell_features(s); bs.tl.assign_cells(s); bs.tl.cell_graph(s)
    >>> bs.tl.phenotypes(slides)  # doctest: +SKIP
    >>> df = bs.tl.cross_validate(slides, methods=("ridge", "mean"))  # doctest: +SKIP
    >>> df.attrs["summary"]  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .._sdata import bulk_table as bulk_row
    from ..pp._expression import highly_variable_genes
    from ._evaluate import evaluate

    if groups not in _GROUPS:
        raise ValueError(f"`groups` must be one of {_GROUPS}, got {groups!r}.")
    if level not in _LEVELS:
        raise ValueError(f"`level` must be one of {_LEVELS}, got {level!r}.")
    slides = list(sdatas)
    key = table_key or (K.TABLE if level == "spot" else K.BULK)
    specs: dict[str, FitFunction | None] = (
        dict(methods) if isinstance(methods, Mapping) else dict.fromkeys(methods)
    )
    if not specs:
        raise ValueError("`methods` is empty; name at least one method.")
    fit_kwargs = dict(fit_kwargs or {})
    unknown = set(fit_kwargs) - set(specs)
    if unknown:
        raise ValueError(f"`fit_kwargs` names methods that are not run: {sorted(unknown)}.")
    for name, spec in specs.items():
        if spec is None and name not in _BUILTIN:
            raise ValueError(f"Unknown method {name!r}: use {_BUILTIN} or pass a fit function for it.")
    for i, s in enumerate(slides):
        if key not in s.tables:
            raise KeyError(f"Slide {i} has no table {key!r} to score; pass `table_key=`.")
    slide_groups = [_group_of(s, i, groups, key) for i, s in enumerate(slides)]
    from .._sdata import slide_info

    samples = [str(slide_info(s).get(K.SAMPLE_ID) or f"slide_{i}") for i, s in enumerate(slides)]
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
        train_copies: list[SpatialData] | None = None
        if level == "spot":
            train_tables = [s.tables[key] for s in train]
        else:  # one row per slide, as fit_bitro / fit_baseline choose their genes
            train_tables = [bulk_row(s, bulk_key=key, i=i) for i, s in enumerate(train)]
        hvgs = highly_variable_genes(train_tables, n_top=top_hvg)
        fold_genes = list(genes) if genes is not None else hvgs
        fold_info.append(
            {"fold": fold, "test_group": held, "train_samples": [samples[i] for i in train_idx], "hvgs": hvgs}
        )
        bulk_genes = set(fold_genes) if fold == 0 else bulk_genes & set(fold_genes)
        for name, spec in specs.items():
            kwargs = dict(fit_kwargs.get(name, {}))
            if name == "bitro" and spec is None:
                kwargs.setdefault("progress", progress)
            fit = _fitter(name, spec, level, kwargs)
            if name in ("ridge", "mean") and spec is None:  # read-only: no copy needed
                model = fit(train, fold_genes)
            else:  # fit_bitro (and unknown code) write run records into the training tables
                train_copies = train_copies or [_shallow_copy(s) for s in train]
                model = fit(train_copies, fold_genes)
            for i in test_idx:
                test = slides[i]
                table = test.tables[key] if level == "spot" else bulk_row(test, bulk_key=key, i=i)
                frame = model.predict_frame(test, level=level).dropna(how="all")
                light = _prediction_table(table, frame, name)
                light.uns[K.RUN] = {"genes": list(model.genes), "hvgs": hvgs}
                if level == "bulk":
                    bulk_tables[name].append(light)
                    continue
                df = evaluate(light, layer=name, genes=fold_genes, top_hvg=top_hvg, level="spot", store=False)
                frames.append(
                    df.reset_index().assign(fold=fold, test_group=held, sample=samples[i], method=name)
                )
    if level == "bulk":
        import anndata as ad

        common = [g for g in fold_info[0]["hvgs"] if g in bulk_genes] if genes is None else list(genes)
        if not common:
            raise ValueError(
                "The folds' training HVGs share no gene, so the pooled bulk predictions cannot be compared; "
                "pass `genes=`."
            )
        for name, tables in bulk_tables.items():
            pooled = ad.concat(tables, join="inner", merge="first")
            pooled.uns[K.RUN] = {"hvgs": common if genes is None else []}
            df = evaluate(pooled, layer=name, genes=common, top_hvg=None, level="bulk", store=False)
            if genes is not None:
                all_hvgs = set().union(*(set(f["hvgs"]) for f in fold_info))
                df["is_hvg"] = [g in all_hvgs for g in df.index]
            frames.append(df.reset_index().assign(fold="pooled", test_group="all", sample="all", method=name))
    out = pd.concat(frames, ignore_index=True)
    cols = ["fold", "test_group", "sample", "method", "gene", "pearson", "spearman", "n", "is_hvg"]
    out = out[cols + [c for c in out.columns if c not in cols]]
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
