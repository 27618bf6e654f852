"""Fit on some slides, predict and score others: `bs.tl.holdout`, `bs.tl.prediction_table`.

The fold machinery here (method resolution, fitting on shallow copies, predictions into light
copies of the held-out tables, spot-level scoring) is the one :func:`bitro_sc.tl.cross_validate`
runs in each of its folds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _keys as K
from .. import _sdata
from ..metrics import cell_truth_scores
from ..pp._expression import get_counts, highly_variable_genes
from ._evaluate import evaluate

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

BUILTIN = ("bitro", "ridge", "mean")
#: columns of the long per-gene tables of `cross_validate` and `holdout`
COLUMNS = ["fold", "test_group", "sample", "method", "gene", "pearson", "spearman", "n", "is_hvg"]

#: a custom method: ``fit(train_slides, *, genes, level) -> model`` implementing the model protocol
FitFunction = Callable[..., Any]


# ----------------------------------------------------------------------------------------------
# fold machinery shared with cross_validate
# ----------------------------------------------------------------------------------------------
def resolve_methods(
    methods: Sequence[str] | Mapping[str, FitFunction | None],
    fit_kwargs: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[dict[str, FitFunction | None], dict[str, Mapping[str, Any]]]:
    """``{name: fit function or None (built-in)}`` and the per-method keyword arguments, checked."""
    specs: dict[str, FitFunction | None] = (
        dict(methods) if isinstance(methods, Mapping) else dict.fromkeys(methods)
    )
    if not specs:
        raise ValueError("`methods` is empty; name at least one method.")
    kwargs = dict(fit_kwargs or {})
    unknown = set(kwargs) - set(specs)
    if unknown:
        raise ValueError(f"`fit_kwargs` names methods that are not run: {sorted(unknown)}.")
    for name, spec in specs.items():
        if spec is None and name not in BUILTIN:
            raise ValueError(f"Unknown method {name!r}: use {BUILTIN} or pass a fit function for it.")
    return specs, kwargs


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
    from ._baseline import fit_baseline

    return lambda train, genes: fit_baseline(
        train,
        method=name,  # type: ignore[arg-type]
        level=level,  # type: ignore[arg-type]
        genes=genes,
        **kwargs,
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


def fit_fold(
    train: Sequence[SpatialData],
    specs: Mapping[str, FitFunction | None],
    *,
    level: str,
    genes: Sequence[str],
    fit_kwargs: Mapping[str, Mapping[str, Any]],
    progress: bool,
) -> dict[str, Any]:
    """Every method fitted on ``train`` with ``genes``; the slides are never modified."""
    models: dict[str, Any] = {}
    copies: list[SpatialData] | None = None
    for name, spec in specs.items():
        kwargs = dict(fit_kwargs.get(name, {}))
        if name == "bitro" and spec is None:
            kwargs.setdefault("progress", progress)
        fit = _fitter(name, spec, level, kwargs)
        if name in ("ridge", "mean") and spec is None:  # read-only: no copy needed
            models[name] = fit(list(train), list(genes))
        else:  # fit_bitro (and unknown code) write run records into the training tables
            copies = copies or [_shallow_copy(s) for s in train]
            models[name] = fit(copies, list(genes))
    return models


def training_hvgs(train: Sequence[SpatialData], *, level: str, table_key: str, top_hvg: int) -> list[str]:
    """The top ``top_hvg`` HVGs of the training slides' spot tables (or bulk rows)."""
    tables = [_scored_table(s, level=level, table_key=table_key, i=i) for i, s in enumerate(train)]
    return list(highly_variable_genes(tables, n_top=top_hvg))


def _scored_table(sdata: SpatialData, *, level: str, table_key: str, i: int) -> AnnData:
    """The spot table, or the slide's row of its bulk table (the whole table when it has one row)."""
    table = sdata.tables[table_key]
    if level == "spot" or table.n_obs == 1:
        return table
    return table[[_sdata.bulk_row(sdata, bulk_key=table_key, i=i)]]


def prediction_table(
    model: Any,
    sdata: SpatialData,
    *,
    level: Literal["spot", "bulk"] = "spot",
    key_added: str = K.PREDICTION,
    table_key: str | None = None,
    i: int = 0,
) -> AnnData:
    """A light copy of a slide's spot table (or bulk row) holding a model's predictions.

    The non-writing twin of :func:`bitro_sc.tl.predict_bitro`: the copy has the counts, obs and
    var names of the table, the predictions (counts per 10k; ``NaN`` = not predicted) in
    ``layers[key_added]`` and the model's run record (``genes``, training ``hvgs``) in
    ``uns[key_added]``, ready for :func:`bitro_sc.tl.evaluate`. The slide is not modified.

    Parameters
    ----------
    model
        A fitted model (``bs.tl.fit_bitro``, ``bs.tl.fit_baseline`` or any model with
        ``predict_frame``, ``genes`` and ``record``).
    sdata
        The slide to predict.
    level
        ``"spot"`` (the spot table) or ``"bulk"`` (the slide's row of its bulk table).
    table_key
        Table to copy; default ``"table"`` (spot) or ``"bulk"``.
    i
        Position of the slide in a list (its fallback sample id, for the bulk row).

    Examples
    --------
    >>> import bitro_sc as bs
    >>> *train_slides, test_slide = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in [*train_slides, test_slide]:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features([*train_slides, test_slide], progress=False)
    >>> for s in [*train_slides, test_slide]:
    ...     bs.tl.assign_cells(s)
    >>> model = bs.tl.fit_baseline(train_slides, method="ridge", n_top_genes=20)
    >>> light = bs.tl.prediction_table(model, test_slide, key_added="ridge")
    >>> df = bs.tl.evaluate(light, layer="ridge", store=False)
    >>> len(df), "ridge" in test_slide.tables["table"].layers
    (20, False)
    """
    import anndata as ad

    level = _sdata.check_level(level, K.FIT_LEVELS)  # type: ignore[assignment]
    key = table_key or _sdata.level_table_key(level)
    if key not in sdata.tables:
        raise KeyError(
            f"The slide has no table {key!r} (tables: {list(sdata.tables.keys())}); pass `table_key=`."
        )
    table = _scored_table(sdata, level=level, table_key=key, i=i)
    frame = model.predict_frame(sdata, level=level).dropna(how="all")
    out = ad.AnnData(get_counts(table).copy(), obs=table.obs.copy(), var=pd.DataFrame(index=table.var_names))
    values = np.full(out.shape, np.nan, dtype=np.float32)
    rows = out.obs_names.get_indexer(frame.index)
    cols = out.var_names.get_indexer(frame.columns)
    if (rows < 0).any() or (cols < 0).any():
        raise ValueError("The model's prediction rows / genes do not match the held-out table.")
    values[np.ix_(rows, cols)] = frame.to_numpy(dtype=np.float32)
    out.layers[key_added] = values
    record = dict(getattr(model, "record", None) or {})
    out.uns[key_added] = {**record, "genes": list(model.genes), "hvgs": list(record.get("hvgs", []))}
    return out


def score_spots(
    models: Mapping[str, Any],
    slides: Sequence[SpatialData],
    test_idx: Sequence[int],
    samples: Sequence[str],
    *,
    genes: Sequence[str],
    hvgs: Sequence[str],
    top_hvg: int,
    table_key: str,
) -> list[pd.DataFrame]:
    """Per-gene spot-level scores of every model on every held-out slide (one frame each)."""
    frames = []
    for name, model in models.items():
        for i in test_idx:
            light = prediction_table(model, slides[i], level="spot", key_added=name, table_key=table_key, i=i)
            light.uns[name] = {"genes": list(model.genes), "hvgs": list(hvgs)}
            df = evaluate(light, layer=name, genes=list(genes), top_hvg=top_hvg, level="spot", store=False)
            frames.append(df.reset_index().assign(sample=samples[i], method=name))
    return frames


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


# ----------------------------------------------------------------------------------------------
# holdout
# ----------------------------------------------------------------------------------------------
@dataclass
class Holdout:
    """Result of :func:`bitro_sc.tl.holdout`.

    Attributes
    ----------
    scores
        Long per-gene table (the columns of :func:`bitro_sc.tl.cross_validate`; ``fold`` is 0,
        ``test_group`` ``"holdout"``): one row per (held-out slide, method, gene) at spot level,
        per (method, gene) with ``sample = "all"`` at bulk level (correlation across the slides).
    models
        The fitted models, by method name.
    genes
        Genes every method was fitted on and scored over.
    hvgs
        Highly variable genes of the training slides (``is_hvg``).
    train, test
        Sample ids of the training and held-out slides.
    cell_scores
        With ``truths``: per-gene cell-level scores against the simulated truth
        (:func:`bitro_sc.metrics.cell_truth_scores`), columns ``sample``, ``method``, ``gene``,
        ``pearson``, ``spearman``; else ``None``.
    """

    scores: pd.DataFrame
    models: dict[str, Any]
    genes: list[str]
    hvgs: list[str]
    train: list[str]
    test: list[str]
    level: str = "spot"
    cell_scores: pd.DataFrame | None = field(default=None)

    def summary(self) -> pd.DataFrame:
        """One row per method: mean / median Pearson, HEST score (mean over the training HVGs),
        number of genes, and the cell-level median Pearson when ``cell_scores`` are present."""
        rows = {}
        for m in self.models:
            row: dict[str, float] = {}
            sub = self.scores[self.scores["method"] == m]
            if len(sub):
                r = sub["pearson"]
                row[f"{self.level}_mean_pearson"] = float(np.nanmean(r)) if r.notna().any() else np.nan
                row[f"{self.level}_median_pearson"] = float(r.median()) if r.notna().any() else np.nan
                hv = sub.loc[sub["is_hvg"].astype(bool), "pearson"]
                row["hest_score"] = float(hv.mean()) if hv.notna().any() else np.nan
                row["n_genes"] = float(len(sub))
                if "q_value" in sub:  # bulk level: Benjamini-Hochberg q < 0.05, as `evaluate` counts
                    row["n_significant"] = float((sub["q_value"].fillna(1.0) < 0.05).sum())
            if self.cell_scores is not None and (self.cell_scores["method"] == m).any():
                cell = self.cell_scores.loc[self.cell_scores["method"] == m, "pearson"]
                row["cell_median_pearson"] = float(cell.median()) if cell.notna().any() else np.nan
            rows[m] = row
        return pd.DataFrame.from_dict(rows, orient="index")


def holdout(
    sdatas: Sequence[SpatialData],
    *,
    test: Sequence[str],
    methods: Sequence[str] | Mapping[str, FitFunction | None] = BUILTIN,
    level: Literal["spot", "bulk"] = "spot",
    genes: Sequence[str] | None = None,
    top_hvg: int = 50,
    fit_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    table_key: str | None = None,
    truths: Sequence[Any] | None = None,
    progress: bool = True,
) -> Holdout:
    """Fit every method on the slides not in ``test``, predict the ``test`` slides and score them.

    One fold of :func:`bitro_sc.tl.cross_validate` with a chosen test set: the same fitting (on
    shallow copies), genes (``genes`` or the top ``top_hvg`` HVGs of the training slides),
    predictions into light copies (:func:`prediction_table`; the slides are never modified) and
    scoring (:func:`bitro_sc.tl.evaluate`, ``log1p`` counts-per-10k).

    Parameters
    ----------
    sdatas
        Slides with cell features (and, at spot level, cells assigned to spots).
    test
        Sample ids of the held-out slides (``bitro_sc`` sample id, else ``slide_{i}``).
    methods, fit_kwargs, table_key
        As in :func:`bitro_sc.tl.cross_validate`.
    level
        ``"spot"``: per-gene correlation across the spots of each test slide; ``"bulk"``:
        across the test slides (at least 3).
    truths
        Simulated truths aligned with ``sdatas`` (``bs.datasets.synthetic(return_truth=True)``):
        cell-level predictions of the test slides are scored against them
        (:func:`bitro_sc.metrics.cell_truth_scores`) for every model that predicts cells.

    Returns
    -------
    A :class:`Holdout`: ``scores`` (long per-gene table), ``models``, ``genes``, ``train``,
    ``test``, ``cell_scores``; ``summary()`` gives one row per method.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in slides:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features(slides, progress=False)
    >>> for s in slides:
    ...     bs.tl.assign_cells(s)
    >>> res = bs.tl.holdout(slides, test=["S2"], methods=("ridge", "mean"), top_hvg=20, progress=False)
    >>> sorted(res.summary().index)
    ['mean', 'ridge']
    """
    import anndata as ad

    level = _sdata.check_level(level, K.FIT_LEVELS)  # type: ignore[assignment]
    slides = _sdata.as_slides(sdatas)
    key = table_key or _sdata.level_table_key(level)
    specs, kwargs = resolve_methods(methods, fit_kwargs)
    ids = _sdata.sample_ids(slides)
    unknown = [t for t in test if t not in ids]
    if unknown:
        raise ValueError(
            f"Test sample(s) {unknown} are not among the slides {ids}. Pass `test=` sample ids of the given "
            "slides (set a slide's id with `bs.set_slide_info(sdata, sample_id=...)`)."
        )
    test_idx = [k for k, i in enumerate(ids) if i in test]
    train = [s for s, i in zip(slides, ids, strict=True) if i not in test]
    if not train:
        raise ValueError("Every slide is a test slide; leave at least one for training.")
    for i, s in enumerate(slides):
        if key not in s.tables:
            raise KeyError(f"Slide {ids[i]!r} has no table {key!r} to score; pass `table_key=`.")
    if truths is not None and len(truths) != len(slides):
        raise ValueError(f"`truths` has {len(truths)} entries for {len(slides)} slides; align them.")
    hvgs = training_hvgs(train, level=level, table_key=key, top_hvg=top_hvg)
    chosen = list(genes) if genes is not None else hvgs
    models = fit_fold(train, specs, level=level, genes=chosen, fit_kwargs=kwargs, progress=progress)
    if level == "spot":
        frames = score_spots(
            models, slides, test_idx, ids, genes=chosen, hvgs=hvgs, top_hvg=top_hvg, table_key=key
        )
    else:
        frames = []
        for name, model in models.items():
            light = [
                prediction_table(model, slides[i], level="bulk", key_added=name, table_key=key, i=i)
                for i in test_idx
            ]
            pooled = ad.concat(light, join="inner", merge="first")
            pooled.uns[name] = {"genes": list(model.genes), "hvgs": hvgs}
            df = evaluate(pooled, layer=name, genes=chosen, top_hvg=None, level="bulk", store=False)
            frames.append(df.reset_index().assign(sample="all", method=name))
    scores = order_columns(pd.concat(frames, ignore_index=True).assign(fold=0, test_group="holdout"))
    cells = None
    if truths is not None:
        parts = [
            cell_truth_scores(model.predict_frame(slides[k], level="cell"), slides[k], truths[k])
            .reset_index()
            .assign(sample=ids[k], method=m)
            for k in test_idx
            for m, model in models.items()
            if "cell" in getattr(model, "levels", ())
        ]
        cells = pd.concat(parts, ignore_index=True) if parts else None
    return Holdout(
        scores=scores,
        models=models,
        genes=chosen,
        hvgs=hvgs,
        train=[i for i in ids if i not in test],
        test=[ids[k] for k in test_idx],
        level=level,
        cell_scores=cells,
    )
