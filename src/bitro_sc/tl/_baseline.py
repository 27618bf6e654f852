"""`bs.tl.fit_baseline`: HEST-style baselines (ridge, mean profile) on the same cell features as BiTro.

The model and the fitting live in :mod:`bitro_sc.models` (:class:`~bitro_sc.models.BaselineModel`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from .. import _keys as K
from .. import _sdata, _validate
from ..models._baseline import METHODS, BaselineModel
from ..models._baseline import fit_baseline as models_fit_baseline
from ..models._params import DataKeys
from ..pp._expression import highly_variable_genes

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

__all__ = ["BaselineModel", "fit_baseline"]


def fit_baseline(
    sdata_or_list: SpatialData | Sequence[SpatialData],
    *,
    method: Literal["ridge", "mean"] = "ridge",
    genes: Sequence[str] | None = None,
    level: Literal["spot", "bulk"] = "spot",
    alpha: float | Sequence[float] | None = None,
    n_top_genes: int = 250,
    table_key: str = K.TABLE,
    bulk_key: str = K.BULK,
    cells_key: str = K.CELLS,
    features_key: str = K.FEATURES,
    spot_key: str = K.SPOT_ID,
    seed: int = 0,
) -> BaselineModel:
    """Fit a HEST-style baseline on the same cell features BiTro uses.

    ``"ridge"``: ridge regression from the mean cell feature vector of each spot (each slide for
    ``level="bulk"``), ``obsm["X_bitro"]`` of the cells table, plus ``log1p`` of its number of
    cells, to ``log1p`` counts-per-10k of the measured profile (library size over all genes).
    Features are standardised over the training data. The penalty is chosen among ``alpha``
    (default: 13 values from 0.1 to 1e5, log-spaced) by inner cross-validation grouped by slide,
    maximising the mean per-gene Pearson of out-of-fold predictions. ``"mean"``: the mean counts-per-10k
    profile of the training spots (slides).

    Parameters
    ----------
    sdata_or_list
        Training slide(s): spot table ``tables["table"]`` (raw counts in ``X`` or ``layers["counts"]``)
        for ``level="spot"``, a ``"bulk"`` table for ``level="bulk"``; a cells table with features
        and ``obs["spot_id"]`` (``bs.tl.assign_cells``). Spots with no cells are not used for
        training and are predicted as ``NaN`` (as BiTro does), so that both are scored on the
        same spots.
    method
        ``"ridge"`` or ``"mean"``.
    genes
        Genes to predict. Default: the top ``n_top_genes`` highly variable genes of the training
        tables (spot tables, or each slide's bulk row), by :func:`bitro_sc.pp.highly_variable_genes`
        as in ``fit_bitro``. Unknown genes are an error.
    level
        ``"spot"`` (one observation per spot) or ``"bulk"`` (one per slide; needs several slides).
    alpha
        Fixed ridge penalty, or a grid to choose from by grouped inner CV.
    table_key, bulk_key, cells_key, features_key, spot_key
        Where the slides hold the spot table, the bulk table, the cells table, the cell features
        (``obsm``) and each cell's spot (``obs``). The model records them (``record["keys"]``) and
        predicts with them by default.

    Returns
    -------
    :class:`~bitro_sc.models.BaselineModel`, for ``bs.tl.predict_bitro(sdata, model, level=...)``; its
    ``record`` holds ``method``, ``level``, ``genes``, ``hvgs`` (top-50 training HVGs), ``keys``,
    ``alpha`` and the CV scores.

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
    >>> bs.tl.predict_bitro(test_slide, model)
    >>> test_slide.tables["table"].layers["bitro"].shape
    (4, 200)
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    _sdata.check_level(level, K.FIT_LEVELS)
    _validate.check_choice(method, ("ridge", "mean"), "method")
    genes = _validate.check_genes(genes)
    slides = _sdata.as_slides(sdata_or_list, what="training slide")
    _validate.check_training_tables(slides, table_key if level == "spot" else bulk_key, level=level)
    keys = DataKeys(
        table_key=table_key,
        bulk_key=bulk_key,
        cells_key=cells_key,
        features_key=features_key,
        spot_key=spot_key,
    )
    if level == "spot":
        missing = [i for i, s in enumerate(slides) if table_key not in s.tables]
        if missing:
            raise KeyError(
                f"Slide(s) {missing} have no spot table {table_key!r}; "
                "pass `table_key=` or fit at `level='bulk'`."
            )
        tables = [s.tables[table_key] for s in slides]
    else:
        if len(slides) < 3:
            raise ValueError(
                "A bulk baseline learns across slides and needs at least 3 training slides, "
                f"got {len(slides)}."
            )
        tables = [_sdata.bulk_table(s, bulk_key=bulk_key, i=i) for i, s in enumerate(slides)]
    try:
        hvgs = highly_variable_genes(tables, n_top=50)
    except ValueError as err:
        if genes is None:
            raise
        warnings.warn(
            f"No training HVGs could be recorded ({err}); evaluate with explicit `genes=`.", stacklevel=2
        )
        hvgs = []
    if genes is None:
        genes = hvgs if n_top_genes == 50 else highly_variable_genes(tables, n_top=n_top_genes)
    return models_fit_baseline(
        slides, tables, method=method, level=level, genes=genes, hvgs=hvgs, alpha=alpha, keys=keys, seed=seed
    )
