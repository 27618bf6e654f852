"""HEST-style baselines on the same cell features as BiTro: ridge regression and the mean profile.

:class:`BaselineModel` implements :class:`~bitro_sc.models.ExpressionModel` like
:class:`~bitro_sc.models.BiTroModel`; :func:`fit_baseline` fits it (``bs.tl.fit_baseline`` is its
front end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _keys as K
from .. import _sdata
from ..metrics import pearson
from ..pp._expression import get_counts, normalize_expression
from ._params import DataKeys
from ._preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..encoders import FeatureScaler

METHODS: tuple[str, ...] = ("ridge", "mean")
#: default ridge penalty grid (features are standardised, so the scale is sample-count-like)
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 5, 13))


# --------------------------------------------------------------------------------------------
# features and targets
# --------------------------------------------------------------------------------------------
def _cell_spot_positions(cells: AnnData, table: AnnData, keys: DataKeys) -> np.ndarray:
    """Row of the spot table of every cell (-1 where a cell lies in no spot of the table)."""
    cell_spot = _sdata.cell_spot_ids(cells, spot_key=keys.spot_key, cells_key=keys.cells_key)
    pos = pd.Index(_sdata.spot_instance_ids(table)).get_indexer(cell_spot)
    pos[cell_spot < 0] = -1
    return pos


def _cell_features(cells: AnnData, keys: DataKeys, prep: Preprocessing | None) -> np.ndarray:
    """The cells' features (float64), checked and brought to the training scaling by ``prep``."""
    x = np.asarray(cells.obsm[keys.features_key]) if prep is None else prep.features_for(cells, keys)[0]
    return np.asarray(x, dtype=np.float64)


def spot_features(
    sdata: SpatialData, *, keys: DataKeys | None = None, prep: Preprocessing | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean cell feature vector and number of cells of every spot (rows of the spot table).

    Returns ``(features, n_cells)``: ``(n_spots, d)`` float64 (``NaN`` rows for spots without
    cells) and ``(n_spots,)`` cell counts. With ``prep`` (a model's preprocessing) features of
    another encoder are refused and features in another scaling re-standardised.
    """
    from scipy import sparse

    keys = keys or DataKeys()
    table = sdata.tables[keys.table_key]
    cells = _sdata.cells_table(sdata, keys.cells_key, features_key=keys.features_key)
    x = _cell_features(cells, keys, prep)
    pos = _cell_spot_positions(cells, table, keys)
    ok = pos >= 0
    member = sparse.csr_matrix(
        (np.ones(int(ok.sum())), (pos[ok], np.flatnonzero(ok))), shape=(table.n_obs, cells.n_obs)
    )
    n_cells = np.asarray(member.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        feats = (member @ x) / n_cells[:, None]
    return feats, n_cells


def slide_features(
    sdata: SpatialData, *, keys: DataKeys | None = None, prep: Preprocessing | None = None
) -> tuple[np.ndarray, float]:
    """Mean cell feature vector over all cells of a slide and its number of cells."""
    keys = keys or DataKeys()
    cells = _sdata.cells_table(sdata, keys.cells_key, features_key=keys.features_key)
    if cells.n_obs == 0:
        raise ValueError(f"The cells table {keys.cells_key!r} is empty: the slide has no segmented cells.")
    x = _cell_features(cells, keys, prep)
    return x.mean(axis=0), float(cells.n_obs)


def _log_targets(table: AnnData, genes: Sequence[str], *, what: str) -> np.ndarray:
    """log1p counts-per-10k of ``genes``, library size over all genes of ``table``."""
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        raise ValueError(
            f"{len(missing)} gene(s) are not in {what}: {missing[:10]}{' ...' if len(missing) > 10 else ''}. "
            "Pass `genes=` present in every training table."
        )
    counts = get_counts(table)
    lib = np.asarray(counts.sum(axis=1)).ravel()
    idx = table.var_names.get_indexer(list(genes))
    return normalize_expression(counts[:, idx], library_size=lib).astype(np.float64)


# --------------------------------------------------------------------------------------------
# ridge with grouped inner CV
# --------------------------------------------------------------------------------------------
def _ridge_svd(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> list[np.ndarray]:
    """Coefficients of centred ridge regressions for several penalties from one SVD."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    return [vt.T @ ((s / (s**2 + a))[:, None] * uty) for a in alphas]


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    coef = _ridge_svd(x - xm, y - ym, [alpha])[0]
    return coef, ym - xm @ coef


def _select_alpha(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: Sequence[float], seed: int
) -> tuple[float, dict[str, Any]]:
    """Penalty with the best mean per-gene Pearson of pooled out-of-fold predictions.

    Folds group by slide (``GroupKFold``); with a single training slide, 5-fold CV over
    observations (shuffled with ``seed``) is used instead and the record says so.
    """
    from sklearn.model_selection import GroupKFold, KFold

    n_groups = len(np.unique(groups))
    if n_groups >= 2:
        splits = list(GroupKFold(n_splits=min(n_groups, 5)).split(x, groups=groups))
        scheme = f"GroupKFold({min(n_groups, 5)}) by slide"
    else:
        k = min(5, x.shape[0])
        if k < 2:
            raise ValueError(
                "Ridge alpha selection needs at least 2 training observations; pass a fixed `alpha=`."
            )
        splits = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(x))
        scheme = f"KFold({k}) over observations (one training slide)"
    oof = np.zeros((len(alphas), *y.shape))
    for train, test in splits:
        xm, ym = x[train].mean(axis=0), y[train].mean(axis=0)
        for j, coef in enumerate(_ridge_svd(x[train] - xm, y[train] - ym, alphas)):
            oof[j, test] = (x[test] - xm) @ coef + ym
    scores = []
    for j in range(len(alphas)):
        r = pearson(y, oof[j])
        scores.append(float(np.nanmean(r)) if np.isfinite(r).any() else -np.inf)
    best = int(np.argmax(scores))
    return float(alphas[best]), {"cv": scheme, "alphas": list(map(float, alphas)), "cv_pearson": scores}


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@dataclass
class BaselineModel:
    """A fitted baseline (``"ridge"`` or ``"mean"``) that ``bs.tl.predict_bitro`` accepts.

    Predictions are on the counts-per-10k scale (``expm1`` of the regression on ``log1p``
    counts-per-10k), like BiTro's. Attributes are plain arrays; :attr:`record` is the run record
    (method, level, genes, hvgs, alpha, features) copied into ``uns["bitro"]`` by ``predict_bitro``.
    """

    method: str
    level: str
    genes: list[str]
    record: dict[str, Any]
    coef: np.ndarray | None = None  # (n_features, n_genes) on standardised features
    intercept: np.ndarray | None = None  # (n_genes,), log1p CP10k
    feature_mean: np.ndarray | None = None
    feature_scale: np.ndarray | None = None
    mean_profile: np.ndarray | None = None  # (n_genes,), counts per 10k
    typical_n_cells: float = 1.0  # median cells per training spot (slide for bulk)
    keys: DataKeys = field(default_factory=DataKeys)  # where it read the training slides
    levels: tuple[str, ...] = field(default=K.PREDICT_LEVELS)
    #: encoder identity and feature scaler of the training features (checked / re-applied on new slides)
    preprocessing: Preprocessing | None = None

    @property
    def feature_scaler(self) -> FeatureScaler | None:
        """The training feature scaler (``bs.tl.cell_features(slide, scaler=model.feature_scaler)``)."""
        return self.preprocessing.feature_scaler if self.preprocessing is not None else None

    # --- design matrix -------------------------------------------------------------------
    def _design(self, feats: np.ndarray, n_cells: np.ndarray) -> np.ndarray:
        assert self.feature_mean is not None
        assert self.feature_scale is not None
        feats = np.atleast_2d(feats)
        d = self.feature_mean.size - 1
        if feats.shape[1] != d:
            raise ValueError(
                f"The cells have {feats.shape[1]} features but the baseline was fitted on {d}; "
                "compute features with the same `bs.tl.cell_features` settings."
            )
        count = np.log1p(np.asarray(n_cells, dtype=np.float64)).reshape(-1, 1)
        raw = np.hstack([feats, count])
        empty = ~np.isfinite(raw).all(axis=1)
        raw[empty] = self.feature_mean  # no cells: the training average (intercept-only prediction)
        return (raw - self.feature_mean) / self.feature_scale

    def _predict_log(self, feats: np.ndarray, n_cells: np.ndarray) -> np.ndarray:
        n = np.atleast_2d(feats).shape[0]
        if self.method == "mean":
            assert self.mean_profile is not None
            return np.tile(np.log1p(self.mean_profile), (n, 1))
        assert self.coef is not None
        assert self.intercept is not None
        return self._design(feats, n_cells) @ self.coef + self.intercept

    def _predict_profile(self, feats: np.ndarray, n_cells: np.ndarray) -> np.ndarray:
        return np.clip(np.expm1(self._predict_log(feats, n_cells)), 0.0, None)

    # --- protocol ------------------------------------------------------------------------
    def predict_frame(
        self,
        sdata: SpatialData,
        *,
        level: Literal["spot", "bulk", "cell"] = "spot",
        keys: DataKeys | None = None,
    ) -> pd.DataFrame:
        """Predicted counts per 10k: rows = obs_names of the spot / bulk / cells table, columns = genes.

        ``"spot"``: ``NaN`` rows for spots that hold no cell.

        ``"cell"``: a cell's share of its spot's (slide's for a bulk model) prediction is the
        model's profile for that cell's own features, normalised so that the cells of a spot sum
        to the spot prediction; cells in no spot get the profile of their own features divided by
        the typical number of cells per training spot (so do all cells of a slide without spots).
        The ``"mean"`` baseline shares equally. ``keys``: where to read the slide (default:
        :attr:`keys`, those of training).
        """
        if level not in self.levels:
            raise ValueError(f"`level` must be one of {self.levels}, got {level!r}.")
        keys = keys or self.keys
        if level == "bulk":
            return self._predict_bulk(sdata, keys)
        if level == "spot":
            return self._predict_spots(sdata, keys)
        return self._predict_cells(sdata, keys)

    def _predict_spots(self, sdata: SpatialData, keys: DataKeys) -> pd.DataFrame:
        if keys.table_key not in sdata.tables:
            raise KeyError(f"No spot table {keys.table_key!r}; predict at `level='bulk'` or 'cell'.")
        table = sdata.tables[keys.table_key]
        feats, n_cells = spot_features(sdata, keys=keys, prep=self.preprocessing)
        values = self._predict_profile(feats, n_cells)
        values[n_cells == 0] = np.nan  # like BiTro: no cell, no prediction (same spots scored)
        return pd.DataFrame(values, index=table.obs_names.copy(), columns=list(self.genes))

    def _predict_bulk(self, sdata: SpatialData, keys: DataKeys) -> pd.DataFrame:
        feats, n = slide_features(sdata, keys=keys, prep=self.preprocessing)
        values = self._predict_profile(feats[None, :], np.array([n]))
        if keys.bulk_key not in sdata.tables:
            return pd.DataFrame(values, index=[_sdata.sample_id(sdata)], columns=list(self.genes))
        bulk = sdata.tables[keys.bulk_key]
        out = pd.DataFrame(np.nan, index=bulk.obs_names.copy(), columns=list(self.genes))
        out.iloc[_sdata.bulk_row(sdata, bulk_key=keys.bulk_key)] = values[0]
        return out

    def _predict_cells(self, sdata: SpatialData, keys: DataKeys) -> pd.DataFrame:
        cells = _sdata.cells_table(sdata, keys.cells_key, features_key=keys.features_key)
        x = _cell_features(cells, keys, self.preprocessing)
        genes = list(self.genes)
        if self.level == "bulk":
            slide = self._predict_bulk(sdata, keys).dropna().to_numpy()[0]
            own = self._predict_profile(x, np.full(cells.n_obs, float(cells.n_obs)))
            share = own / np.maximum(own.sum(axis=0, keepdims=True), 1e-12)
            return pd.DataFrame(share * slide, index=cells.obs_names.copy(), columns=genes)
        if keys.table_key not in sdata.tables or keys.spot_key not in cells.obs:  # e.g. a whole-slide image
            own = self._predict_profile(x, np.full(cells.n_obs, self.typical_n_cells))
            return pd.DataFrame(own / self.typical_n_cells, index=cells.obs_names.copy(), columns=genes)
        table = sdata.tables[keys.table_key]
        _, n_cells = spot_features(sdata, keys=keys, prep=self.preprocessing)
        spot_pred = self._predict_spots(sdata, keys).to_numpy()
        pos = _cell_spot_positions(cells, table, keys)
        in_spot = pos >= 0
        count = np.where(in_spot, n_cells[np.maximum(pos, 0)], self.typical_n_cells)
        own = self._predict_profile(x, count)
        out = own / self.typical_n_cells
        if in_spot.any():
            idx = pos[in_spot]
            totals = np.zeros((table.n_obs, len(genes)))
            np.add.at(totals, idx, own[in_spot])
            out[in_spot] = own[in_spot] / np.maximum(totals[idx], 1e-12) * spot_pred[idx]
        return pd.DataFrame(out, index=cells.obs_names.copy(), columns=genes)


# --------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------
def fit_baseline(
    slides: list[SpatialData],
    tables: list[AnnData],
    *,
    method: str,
    level: str,
    genes: Sequence[str],
    hvgs: list[str],
    alpha: float | Sequence[float] | None,
    keys: DataKeys,
    seed: int,
) -> BaselineModel:
    """Fit a ``"ridge"`` or ``"mean"`` baseline predicting ``genes`` of ``tables`` (the spot tables,
    or each slide's bulk row) from the cells of ``slides`` (see :func:`bitro_sc.tl.fit_baseline`)."""
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise ValueError("`genes` is empty; pass at least one gene name.")
    samples = _sdata.sample_ids(slides)
    prep = Preprocessing.from_slides(slides, keys, phenotypes=False)

    feats_list, count_list, y_list, group_list = [], [], [], []
    for i, (s, t) in enumerate(zip(slides, tables, strict=True)):
        y = _log_targets(t, genes, what=f"the training table of slide {samples[i]!r}")
        if level == "spot":
            f, n = spot_features(s, keys=keys)
            keep = n > 0
            f, n, y = f[keep], n[keep], y[keep]
        else:
            fv, nv = slide_features(s, keys=keys)
            f, n = fv[None, :], np.array([nv])
        feats_list.append(f)
        count_list.append(n)
        y_list.append(y)
        group_list.append(np.full(len(n), i))
    n_all = np.concatenate(count_list)
    if n_all.size == 0:
        raise ValueError(
            "No spot of the training slides contains a cell: check `bs.tl.assign_cells` "
            "(spot radius, coordinate systems)."
        )
    dims = {f.shape[1] for f in feats_list}
    if len(dims) > 1:
        raise ValueError(f"The training slides have different feature dimensions {sorted(dims)}.")
    raw = np.hstack([np.vstack(feats_list), np.log1p(n_all)[:, None]])
    y_all = np.vstack(y_list)
    groups = np.concatenate(group_list)
    mean = raw.mean(axis=0)
    scale = raw.std(axis=0)
    scale[scale == 0] = 1.0

    record: dict[str, Any] = {
        "model": "baseline",
        "method": method,
        "level": level,
        "genes": list(genes),
        "hvgs": list(hvgs),
        "n_train_slides": len(slides),
        "n_train_observations": int(y_all.shape[0]),
        "train_samples": samples,
        "keys": keys.to_dict(),
        "features": {"key": keys.features_key, "aggregate": "mean over cells", "extra": ["log1p(n_cells)"]},
        "target": "log1p counts per 10k (library size over all genes)",
    }
    model = BaselineModel(
        method=method,
        level=level,
        genes=list(genes),
        record=record,
        feature_mean=mean,
        feature_scale=scale,
        typical_n_cells=float(max(np.median(n_all), 1.0)),
        keys=keys,
        preprocessing=prep,
    )
    if method == "mean":
        model.mean_profile = np.expm1(y_all).mean(axis=0)
        record["alpha"] = None
        return model

    x = (raw - mean) / scale
    if alpha is None or not np.isscalar(alpha):
        grid = DEFAULT_ALPHAS if alpha is None else tuple(float(a) for a in alpha)  # type: ignore[union-attr]
        if not grid or min(grid) <= 0:
            raise ValueError(f"`alpha` values must be positive, got {grid}.")
        best, cv = _select_alpha(x, y_all, groups, grid, seed)
        record["alpha_selection"] = cv
    else:
        best = float(alpha)  # type: ignore[arg-type]
        if best <= 0:
            raise ValueError(f"`alpha` must be positive, got {alpha!r}.")
    model.coef, model.intercept = _fit_ridge(x, y_all, best)
    record["alpha"] = best
    return model
