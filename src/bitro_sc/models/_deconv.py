"""Deconvolution start of the phenotype profiles: bags ≈ Σ cells × per-phenotype profiles.

Under sum pooling a bag's profile is the sum of its cells' values. If every cell of phenotype ``k``
expressed a fixed profile ``P_k``, a bag would be ``Σ_k n_k · P_k`` (``n_k``: its cells of
phenotype ``k``): a non-negative least-squares problem per gene over the training bags, solved here
in closed form before any gradient step. The network then starts from this deconvolution and learns
what the phenotypes do not explain (neighbourhood, cell state) on top of it. scipy's ``nnls`` does
the fit; no scverse library offers a bag-level deconvolution on arbitrary cell clusters.
"""

from __future__ import annotations

import numpy as np

from ._bags import BulkSlide, SpotSet

#: profiles are floored at this fraction of the gene's mean value per cell (log of zero is -inf, and
#: a phenotype the training bags never showed expressing a gene may still do so elsewhere)
FLOOR = 0.02


def bag_design(data: list[SpotSet] | list[BulkSlide], n_codes: int) -> np.ndarray:
    """Cells of each phenotype code per training bag (bags × codes), in the order of
    :func:`~bitro_sc.models._train.bag_targets`."""
    rows: list[np.ndarray] = []
    for item in data:
        codes = item.slide.phenotype
        part = item.part
        if isinstance(item, SpotSet):  # spots: one bag per spot-table row
            for r in item.rows:
                rows.append(
                    np.bincount(codes[part.order[part.cell_ptr[r] : part.cell_ptr[r + 1]]], minlength=n_codes)
                )
        else:  # a whole slide is one bag
            rows.append(np.bincount(codes, minlength=n_codes))
    return np.asarray(rows, dtype=np.float64)


def deconvolve(design: np.ndarray, targets: np.ndarray, per_cell: np.ndarray) -> np.ndarray:
    """Per-phenotype log-profiles relative to ``per_cell`` (codes × genes).

    Each gene's profiles are the non-negative least-squares fit of the bag targets on the
    phenotype counts, rescaled per gene so that the mean of ``log1p`` of the fitted bags equals that
    of the targets (the loss compares ``log1p`` values), floored at :data:`FLOOR` × ``per_cell``.
    Codes that no training bag holds get 0 (the gene's mean).
    """
    from scipy.optimize import nnls

    n_codes, n_genes = design.shape[1], targets.shape[1]
    seen = design.sum(axis=0) > 0
    a = design[:, seen]
    prof = np.zeros((a.shape[1], n_genes))
    for g in range(n_genes):
        prof[:, g] = nnls(a, targets[:, g])[0]
    prof *= np.exp(log1p_match(a @ prof, targets))
    floor = FLOOR * np.maximum(per_cell, 1e-12)
    out = np.zeros((n_codes, n_genes))
    out[seen] = np.log(np.maximum(prof, floor) / np.maximum(per_cell, 1e-12))
    return out


def log1p_match(fitted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-gene ``log c`` such that ``mean(log1p(c · fitted)) = mean(log1p(targets))`` over bags.

    The loss compares ``log1p`` values, whose mean depends on how sparse the bags are: this is the
    one number per gene that matches a start (a deconvolution, or a base model of another level) to
    the targets' scale. Bisection on ``log c`` in [-8, 8], all genes at once.
    """
    goal = np.log1p(targets).mean(axis=0)
    lo, hi = np.full(targets.shape[1], -8.0), np.full(targets.shape[1], 8.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        above = np.log1p(fitted * np.exp(mid)).mean(axis=0) > goal
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return (lo + hi) / 2
