"""Ridge start of the linear skip: the network starts where a ridge on bag-mean features ends.

With ``ModelParams.linear_skip`` every cell's log-expression gets a linear term ``W x`` of its
(scaled) features next to the deep path. Under the log link, a bag's log-profile is then, to first
order, ``W`` times the bag's mean features: the model a ridge regression on bag-mean features fits
(:mod:`~bitro_sc.models._baseline`, the ``"ridge"`` baseline), and the per-gene depth factor
``(n / n̄) ** β`` of the RNA-content head carries the bag's cell count ``n``. :func:`ridge_start`
solves that ridge in closed form on the training bags (log1p targets on mean features and
``log1p(n)``, the penalty chosen by grouped cross-validation as the baseline does) and converts its
coefficients to the log link at each gene's typical level, so training starts from the ridge fit
and the deep path only has to add what it misses (context, non-linear effects).

The depth exponents matter most: started at 1 for every gene (a sparse gene's log1p grows with the
spot's cells), a well-expressed gene — most markers — whose counts per 10k do not grow with ``n``
gets a spurious ``log n`` term that the few hundred training steps on a small data set do not
unlearn (HER2ST, ``benchmarks/results/encoders.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._bags import BulkSlide, SpotSet
from ._baseline import DEFAULT_ALPHAS, _fit_ridge, _select_alpha
from ._train import bag_targets

#: cap of the log1p → log link factor ``exp(m) / expm1(m)`` (very sparse genes: m → 0)
MAX_LINK_FACTOR = 10.0
#: range of the started depth exponents (a spot's log-profile per log cell count)
DEPTH_RANGE = (-1.0, 2.0)


def bag_mean_features(data: list[SpotSet] | list[BulkSlide]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean scaled features per bag (bags × F), cells per bag, group per bag: the slide of a spot,
    each whole slide its own group), in the order of :func:`~bitro_sc.models._train.bag_targets`."""
    feats: list[np.ndarray] = []
    sizes: list[int] = []
    groups: list[int] = []
    items: list[SpotSet | BulkSlide] = list(data)
    for i, item in enumerate(items):
        x, part = item.slide.features, item.part
        if isinstance(item, SpotSet):
            for r in item.rows:
                cells = part.order[part.cell_ptr[r] : part.cell_ptr[r + 1]]
                feats.append(x[cells].mean(axis=0))
                sizes.append(cells.size)
                groups.append(i)
        else:
            feats.append(x.mean(axis=0))
            sizes.append(x.shape[0])
            groups.append(i)
    return np.asarray(feats, dtype=np.float64), np.asarray(sizes, dtype=np.float64), np.asarray(groups)


class RidgeStart(NamedTuple):
    """The linear parts of a network's start (see :func:`ridge_start`)."""

    weight: np.ndarray  #: (genes, features) feature columns of the linear skip
    depth: np.ndarray  #: (genes,) exponents of the depth factor ``(n / bag_cells) ** depth``
    skip_shift: np.ndarray  #: (genes,) head-bias shift that centres the skip on the training bags
    depth_shift: np.ndarray  #: (genes,) head-bias shift that centres the depth term
    info: dict[str, object]  #: for the run record (penalty, cross-validated Pearson)
    #: the ridge itself on the log1p scale:
    #: a bag's log1p target ≈ bag_bias + bag_weight @ x̄ + bag_count * log1p(n)
    bag_weight: np.ndarray  #: (genes, features)
    bag_count: np.ndarray  #: (genes,)
    bag_bias: np.ndarray  #: (genes,)


def ridge_start(
    data: list[SpotSet] | list[BulkSlide], n_genes: int, *, bag_cells: float, seed: int = 0
) -> RidgeStart:
    """Closed-form ridge start of the linear parts of the network on the training bags ``data``:
    the skip's feature weights, and each gene's depth exponent (the ridge's ``log1p(n)``
    coefficient on the log link, clipped to :data:`DEPTH_RANGE`), with the head-bias shifts that
    keep the average training bag at the network's constant start. Needs at least two bags."""
    x, n, groups = bag_mean_features(data)
    if x.shape[0] < 2:
        raise ValueError(
            "The ridge start of the linear skip needs at least 2 training bags; train with "
            "`model={'linear_start': 'constant'}` or on more slides / spots."
        )
    y = np.log1p(bag_targets(data, n_genes).astype(np.float64))
    raw = np.hstack([x, np.log1p(n)[:, None]])
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    scale[scale == 0] = 1.0
    design = (raw - mean) / scale
    if design.shape[0] >= 4 and (len(np.unique(groups)) >= 2 or design.shape[0] >= 5):
        alpha, cv = _select_alpha(design, y, groups, DEFAULT_ALPHAS, seed)
    else:  # too few bags to cross-validate: the middle of the baseline's grid
        alpha, cv = float(DEFAULT_ALPHAS[len(DEFAULT_ALPHAS) // 2]), {"cv": "none (too few bags)"}
    coef, intercept = _fit_ridge(design, y, alpha)  # (F + 1, genes) on the scaled design
    coef = coef / scale[:, None]  # per unit of the scaled cell features / of log1p(n)
    intercept = intercept - mean @ coef  # the same fit on the unscaled design
    m = y.mean(axis=0)
    link = np.minimum(np.exp(m) / np.maximum(np.expm1(m), 1e-12), MAX_LINK_FACTOR)
    weight = coef[:-1].T * link[:, None]
    depth = np.clip(coef[-1] * link, DEPTH_RANGE[0], DEPTH_RANGE[1])
    log_ratio = float(np.log(np.maximum(n, 1.0) / bag_cells).mean())
    f32 = np.float32
    return RidgeStart(
        weight.astype(f32),
        depth.astype(f32),
        (-weight @ x.mean(axis=0)).astype(f32),
        (-depth * log_ratio).astype(f32),
        {"alpha": float(alpha), **cv},
        coef[:-1].T.astype(f32),
        coef[-1].astype(f32),
        intercept.astype(f32),
    )
