"""`bs.tl.phenotypes`: k-means cell phenotypes fitted once and shared across slides."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K
from .. import _sdata

if TYPE_CHECKING:  # pragma: no cover
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from spatialdata import SpatialData

_ALGORITHMS = ("auto", "kmeans", "minibatch")


def phenotypes(
    sdata_or_list: SpatialData | Sequence[SpatialData],
    *,
    n_clusters: int = 7,
    model: KMeans | MiniBatchKMeans | None = None,
    cells_key: str = K.CELLS,
    features_key: str = K.FEATURES,
    key_added: str = K.PHENOTYPE,
    algorithm: Literal["auto", "kmeans", "minibatch"] = "auto",
    minibatch_above: int = 200_000,
    seed: int = 0,
    overwrite: bool = False,
) -> KMeans | MiniBatchKMeans:
    """Cluster cells into phenotypes with one k-means model shared by every slide.

    The model is fitted once on the cells of all given slides pooled together (or taken from
    ``model=``, e.g. the one fitted on the training slides), so that phenotype ``"3"`` means the same
    thing on every slide. Features are ``obsm[features_key]`` from ``bs.tl.cell_features``, which
    are standardised with shared statistics too.

    Parameters
    ----------
    sdata_or_list
        One slide or a list of slides.
    n_clusters
        Number of phenotypes (ignored when ``model`` is given).
    model
        A fitted ``sklearn.cluster.KMeans`` / ``MiniBatchKMeans`` (this function's return value) to
        apply instead of fitting.
    cells_key
        Cells table.
    features_key
        ``obsm`` key of the cell features.
    key_added
        ``obs`` column of the phenotype, and ``uns`` key of the parameters.
    algorithm
        ``"kmeans"`` (Lloyd, ``n_init=4``), ``"minibatch"`` (``MiniBatchKMeans``), or ``"auto"``:
        minibatch when the slides hold more than ``minibatch_above`` cells.
    minibatch_above
        Cell count above which ``"auto"`` uses minibatch k-means.
    seed
        Random state of k-means.
    overwrite
        Replace an existing ``obs[key_added]``.

    Returns
    -------
    The fitted (or given) model; its ``bitro_feature_names_`` attribute records the feature names.
    Writes to each cells table ``obs[key_added]`` (categorical with categories ``"0"`` …
    ``str(n_clusters - 1)`` on every slide, present or not) and ``uns[key_added]``: ``n_clusters``,
    ``algorithm``, ``seed``, ``features_key``, ``cluster_centers``, ``n_cells_fitted`` (0 when
    ``model`` was given), ``counts`` (cells per phenotype on this slide).

    Examples
    --------
    >>> import bitro_sc as bs
    >>> *train_slides, test_slide = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in [*train_slides, test_slide]:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features([*train_slides, test_slide], progress=False)
    >>> km = bs.tl.phenotypes(train_slides, n_clusters=3)
    >>> _ = bs.tl.phenotypes(test_slide, model=km)  # same phenotypes on a new slide
    >>> len(test_slide.tables["cells"].obs["bitro_phenotype"].cat.categories)
    3
    """
    import pandas as pd

    slides = list(sdata_or_list) if isinstance(sdata_or_list, list | tuple) else [sdata_or_list]
    if not slides:
        raise ValueError("`sdata_or_list` is an empty list; pass at least one SpatialData.")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {_ALGORITHMS}, got {algorithm!r}.")
    tables = []
    names: list[str] | None = None
    for s in slides:
        table = _sdata.require(s, cells_key, kind="tables", step="run `bs.tl.segment` first")
        if features_key not in table.obsm:
            raise KeyError(
                f"tables[{cells_key!r}].obsm has no {features_key!r}: run `bs.tl.cell_features` first."
            )
        parts = [("obs", key_added), ("uns", key_added)]
        _sdata.check_table_free(s, cells_key, parts, overwrite=overwrite, writer="bs.tl.phenotypes")
        tables.append(table)
        params = table.uns.get(_sdata.features_params_key(features_key))
        these = [str(v) for v in params["feature_names"]] if params and "feature_names" in params else None
        if names is not None and these is not None and these != names:
            raise ValueError(
                "The slides were featurised with different encoders; run `bs.tl.cell_features` with the "
                "same encoder (and a shared `scaler=`) on all of them."
            )
        names = these if these is not None else names
    _warn_if_scaled_per_slide(tables, features_key)
    matrices = [np.asarray(t.obsm[features_key], dtype=np.float32) for t in tables]
    dims = {m.shape[1] for m in matrices}
    if len(dims) > 1:
        raise ValueError(f"The slides have features of different widths {sorted(dims)}; use one encoder.")

    n_fitted = 0
    if model is None:
        if int(n_clusters) < 2:
            raise ValueError(f"`n_clusters` must be at least 2, got {n_clusters!r}.")
        x = np.concatenate(matrices, axis=0)
        if not len(x):
            raise ValueError(
                f"The cells table(s) {cells_key!r} hold 0 cells, so there is nothing to cluster: "
                "segmentation found no nuclei (check the tissue mask and the image, e.g. `bs.pl.cells`) "
                "or the wrong table was given."
            )
        if len(x) < n_clusters:
            raise ValueError(f"{len(x)} cells cannot make {n_clusters} clusters; lower `n_clusters`.")
        use_mb = algorithm == "minibatch" or (algorithm == "auto" and len(x) > minibatch_above)
        if use_mb:
            from sklearn.cluster import MiniBatchKMeans

            model = MiniBatchKMeans(
                n_clusters=int(n_clusters), random_state=seed, batch_size=4096, n_init=3
            ).fit(x)
        else:
            from sklearn.cluster import KMeans

            model = KMeans(n_clusters=int(n_clusters), random_state=seed, n_init=4).fit(x)
        model.bitro_feature_names_ = names
        n_fitted = len(x)
        del x
    else:
        if not hasattr(model, "cluster_centers_"):
            raise TypeError(
                "`model` must be a fitted sklearn KMeans / MiniBatchKMeans (from `bs.tl.phenotypes`)."
            )
        if model.cluster_centers_.shape[1] != next(iter(dims)):
            raise ValueError(
                f"`model` was fitted on {model.cluster_centers_.shape[1]} features, the slides have "
                f"{next(iter(dims))}; use the encoder and scaler of the slides the model was fitted on."
            )
        fitted_names = getattr(model, "bitro_feature_names_", None)
        if fitted_names is not None and names is not None and list(fitted_names) != names:
            raise ValueError("`model` was fitted on other features (names differ); use the same encoder.")
    k = int(model.cluster_centers_.shape[0])
    categories = [str(i) for i in range(k)]
    for table, x in zip(tables, matrices, strict=True):
        labels = model.predict(x) if len(x) else np.zeros(0, dtype=np.int64)
        table.obs[key_added] = pd.Categorical(labels.astype(str), categories=categories)
        table.uns[key_added] = {
            "n_clusters": k,
            "algorithm": type(model).__name__,
            "seed": int(seed),
            "features_key": features_key,
            "cluster_centers": np.asarray(model.cluster_centers_, dtype=np.float32),
            "n_cells_fitted": int(n_fitted),
            "counts": np.bincount(labels, minlength=k).astype(np.int64),
        }
    for s in slides:
        _sdata.record_writer(s, "bs.tl.phenotypes", *(_sdata.part_key(cells_key, *p) for p in parts))
    return model


def _warn_if_scaled_per_slide(tables: list[Any], features_key: str) -> None:
    key = _sdata.features_params_key(features_key)
    means = []
    for t in tables:
        params = t.uns.get(key)
        if params is not None and "scaler" in params:
            means.append(np.asarray(params["scaler"]["mean"], dtype=np.float64))
    if len(means) > 1 and any(m.shape != means[0].shape or not np.allclose(m, means[0]) for m in means):
        warnings.warn(
            "The slides' features were standardised with different statistics (per-slide scaling), so "
            "phenotypes are not comparable across slides. Run `bs.tl.cell_features` on the list of slides "
            "together, or pass `scaler=` from the training slides.",
            UserWarning,
            stacklevel=3,
        )
