"""Expression normalisation and the training-data gene selection shared by models and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from .._validate import sum_duplicate_genes as sum_duplicate_genes  # public as bs.pp.*

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from scipy import sparse

#: library size every profile is scaled to before ``log1p`` (counts per 10k)
TARGET_SUM = 1e4


def get_counts(adata: AnnData) -> np.ndarray | sparse.spmatrix:
    """Raw counts of a spot or bulk table: ``layers["counts"]`` when present, else ``X``.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> get_counts(ad.AnnData(np.ones((2, 3)))).shape
    (2, 3)
    """
    return adata.layers.get(K.COUNTS_LAYER, adata.X)


def cp10k(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    """Counts per 10k (:data:`TARGET_SUM`) of dense ``counts`` (profiles × genes, or one profile)
    given each profile's library size (over all genes), in the dtype of the inputs; no ``log1p``.

    Examples
    --------
    >>> cp10k(np.array([[1.0, 3.0]]), np.array([4.0]))
    array([[2500., 7500.]])
    """
    library = np.asarray(library)
    return counts / (library[:, None] if counts.ndim == 2 else library) * TARGET_SUM


def normalize_expression(
    counts: AnnData | np.ndarray | sparse.spmatrix,
    *,
    target_sum: float = TARGET_SUM,
    log1p: bool = True,
    library_size: np.ndarray | None = None,
) -> np.ndarray:
    """Library-normalise counts to ``target_sum`` per profile, then ``log1p`` (dense float32).

    Parameters
    ----------
    counts
        Profiles × genes counts, or an AnnData (its raw counts, see :func:`get_counts`).
    target_sum
        Total every profile is scaled to.
    log1p
        Apply ``log1p`` after scaling.
    library_size
        Per-profile totals to divide by. Default: the row sums of ``counts``. Pass the totals over
        *all* genes when ``counts`` holds a gene subset, so that values do not depend on the subset.

    Returns
    -------
    Dense ``float32`` array. Profiles with zero counts stay zero (no division by zero).

    Examples
    --------
    >>> import numpy as np
    >>> normalize_expression(np.array([[1, 3], [0, 0]]), target_sum=4, log1p=False)
    array([[1., 3.],
           [0., 0.]], dtype=float32)
    """
    from anndata import AnnData
    from scipy import sparse

    raw: Any = get_counts(counts) if isinstance(counts, AnnData) else counts
    x = np.asarray(raw.toarray() if sparse.issparse(raw) else raw, dtype=np.float64)
    if np.any(x < 0):
        raise ValueError("Counts must be non-negative; got negative values. Pass raw counts, not log values.")
    lib = x.sum(axis=1) if library_size is None else np.asarray(library_size, dtype=np.float64)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    out = x * scale[:, None]
    if log1p:
        out = np.log1p(out)
    return out.astype(np.float32)


def highly_variable_genes(
    tables: AnnData | Sequence[AnnData],
    *,
    n_top: int = 50,
    min_detected_frac: float = 0.1,
) -> list[str]:
    """Top highly variable genes of *training* tables, by the HEST-benchmark protocol.

    Genes shared by all tables and detected (count > 0) in at least ``min_detected_frac`` of the
    spots (rows) of **every** table are kept; among them, scanpy's ``"seurat"`` HVG ranking on
    ``log1p`` counts-per-10k of all tables together picks ``n_top`` genes.

    Never call this on test data: the genes a model is scored on must be fixed at fit time.

    Returns
    -------
    Gene names, most variable first. Fewer than ``n_top`` when fewer genes pass the filter.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(2, kind="visium", size_um=250, seed=0)
    >>> genes = bs.pp.highly_variable_genes([s.tables["table"] for s in slides], n_top=10)
    >>> len(genes), set(genes) <= set(slides[0].tables["table"].var_names)
    (10, True)
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    from scipy import sparse

    tables = [tables] if isinstance(tables, ad.AnnData) else list(tables)
    if not tables:
        raise ValueError("`highly_variable_genes` needs at least one training table.")
    if n_top < 1:
        raise ValueError(f"`n_top` must be at least 1, got {n_top}.")
    shared = pd.Index(tables[0].var_names)
    for t in tables[1:]:
        shared = shared.intersection(t.var_names, sort=False)
    if shared.empty:
        raise ValueError(
            "The training tables share no gene names; check that they use the same gene symbols."
        )
    keep = np.ones(len(shared), dtype=bool)
    normalised = []
    for t in tables:
        counts = get_counts(t)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        sub = t[:, shared]
        sub_counts = get_counts(sub)
        detected = np.asarray((sub_counts > 0).sum(axis=0)).ravel() / max(t.n_obs, 1)
        keep &= detected >= min_detected_frac
        normalised.append(normalize_expression(sub_counts, library_size=lib))
    genes = shared[keep]
    if genes.empty:
        raise ValueError(
            f"No gene is detected in at least {min_detected_frac:.0%} of the spots of every training table; "
            "lower `min_detected_frac` or check the tables."
        )
    x = np.vstack(normalised)[:, keep]
    tmp = ad.AnnData(sparse.csr_matrix(x) if x.size else x, var=pd.DataFrame(index=genes))
    n = min(n_top, len(genes))
    if len(genes) == 1:
        return list(genes)
    # ranked by normalised dispersion even when every gene is kept, so truncating stays "top"
    sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n)
    ranked = tmp.var.sort_values("dispersions_norm", ascending=False, na_position="last")
    return list(ranked.index[:n])


#: Marker genes added to the default genes of a fit (:func:`default_genes`), so that the genes
#: people plot first are predicted: epithelium and breast cancer, immune cells, stroma and vessels,
#: proliferation. Those absent from the training tables (or never detected there) are left out.
MARKER_GENES: tuple[str, ...] = (
    # epithelium / tumour
    "EPCAM", "KRT19", "KRT8", "KRT18", "KRT5", "KRT14", "KRT17", "CDH1", "ERBB2", "GRB7", "MUC1",
    "SCGB2A2", "ESR1", "PGR", "FOXA1", "GATA3",
    # immune
    "PTPRC", "CD74", "HLA-DRA", "CD3E", "CD8A", "CD68", "CD163", "LYZ", "MS4A1", "IGKC", "IGHG3",
    "IGHA1", "JCHAIN",
    # stroma, vessels
    "FN1", "COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "MGP", "SPARC", "ACTA2", "VIM", "PECAM1", "VWF",
    # proliferation
    "MKI67", "TOP2A",
)  # fmt: skip


def default_genes(tables: AnnData | Sequence[AnnData], *, n_top: int = 250) -> list[str]:
    """The genes a fit predicts by default: top HVGs plus the marker panel.

    The top ``n_top`` HVGs of the training tables (:func:`highly_variable_genes`, HEST filter:
    detected in ≥ 10 % of the spots of every table), then every gene of :data:`MARKER_GENES` that
    is in every table and detected (count > 0) in at least one row of each, in the panel's order.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(2, kind="visium", size_um=250, seed=0)
    >>> genes = bs.pp.default_genes([s.tables["table"] for s in slides], n_top=10)
    >>> "EPCAM" in genes and len(genes) > 10
    True
    """
    import anndata as ad

    tables = [tables] if isinstance(tables, ad.AnnData) else list(tables)
    chosen = list(highly_variable_genes(tables, n_top=n_top))
    seen = set(chosen)
    for gene in MARKER_GENES:
        if gene in seen or not all(gene in t.var_names for t in tables):
            continue
        if all(get_counts(t[:, [gene]]).sum() > 0 for t in tables):
            chosen.append(gene)
            seen.add(gene)
    return chosen
