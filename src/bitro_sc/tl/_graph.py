"""`bs.tl.cell_graph`: a kNN or µm-radius cell graph under squidpy's keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _keys as K
from .. import _sdata
from .._validate import check_positive_int, check_um

#: recorded as the writer of the graph
WRITER = "bs.tl.cell_graph"

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def cell_graph(
    sdata: SpatialData,
    *,
    k: int = 8,
    radius_um: float | None = None,
    cells_key: str = K.CELLS,
    key_added: str = K.SPATIAL,
    overwrite: bool = False,
) -> None:
    """Connect each cell to its ``k`` nearest cells, or to every cell within ``radius_um`` µm.

    The graph is the one ``squidpy.gr.spatial_neighbors_knn`` / ``spatial_neighbors_radius`` build
    on the cell centroids in µm, stored under squidpy's keys so every squidpy tool
    (``sq.gr.nhood_enrichment``, …) reads it directly. It is built with a KD-tree
    (``scipy.spatial.cKDTree``, all cores) straight into CSR: on a million cells about 2× (kNN) and
    6× (radius) less CPU time than squidpy's builders; memory is linear in cells × neighbours.

    Parameters
    ----------
    sdata
        Slide with a cells table (``bs.tl.segment``).
    k
        Neighbours per cell for the kNN graph (ignored when ``radius_um`` is given). Capped at
        ``n_cells - 1``.
    radius_um
        Radius in µm; when given, a radius graph instead of kNN.
    cells_key
        Cells table.
    key_added
        Prefix of the keys written, as squidpy's ``key_added``: ``obsp[f"{key_added}_connectivities"]``,
        ``obsp[f"{key_added}_distances"]`` and ``uns[f"{key_added}_neighbors"]``. Fit and predict
        with such a graph by passing ``graph_key=key_added``.
    overwrite
        Replace an existing graph that the user or another function wrote; one ``cell_graph``
        wrote is replaced anyway (a re-run).

    Returns
    -------
    ``None``. Writes to ``sdata.tables[cells_key]`` (names for the default ``key_added="spatial"``):
    ``obsp["spatial_connectivities"]`` (CSR, 1 per edge, no self-loops), ``obsp["spatial_distances"]``
    (CSR, µm), and ``uns["spatial_neighbors"]``
    (squidpy's record: keys of both matrices and ``params`` with ``n_neighbors`` or ``radius``, plus
    ``units="um"``). The kNN graph is directed as in squidpy (row ``i`` holds ``i``'s neighbours).
    A table with fewer than two cells gets empty matrices.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> bs.tl.segment(sdata, progress=False)
    >>> bs.tl.cell_graph(sdata, k=6)
    >>> float(sdata.tables["cells"].obsp["spatial_connectivities"].sum(1).mean())  # mean degree
    6.0
    """
    import scipy.sparse as sp

    table = _sdata.require(sdata, cells_key, kind="tables", step="run `bs.tl.segment` first")
    radius_um = None if radius_um is None else check_um(radius_um, "radius_um")
    if radius_um is None:
        k = check_positive_int(k, "k")
    conn_key, dist_key = f"{key_added}_connectivities", f"{key_added}_distances"
    written = (
        _sdata.part_key(cells_key, "obsp", conn_key),
        _sdata.part_key(cells_key, "obsp", dist_key),
        _sdata.part_key(cells_key, "uns", f"{key_added}_neighbors"),
    )
    for key, there in zip(written, (table.obsp, table.obsp, table.uns), strict=True):
        name = key.rsplit("/", 1)[-1]
        _sdata.check_free(sdata, key, exists=name in there, overwrite=overwrite, writer=WRITER, what="graph")
    xy = _sdata.cell_centroids_um(table, cells_key=cells_key)
    n = len(xy)
    params: dict = {"coord_type": "generic", "transform": "none", "units": "um"}
    if radius_um is None:
        params["n_neighbors"] = int(min(int(k), max(n - 1, 0)))
    else:
        params["radius"] = float(radius_um)

    if n < 2 or (radius_um is None and params["n_neighbors"] < 1):
        conn = sp.csr_matrix((n, n), dtype=np.float32)
        dist = sp.csr_matrix((n, n), dtype=np.float64)
    elif radius_um is None:
        conn, dist = knn_graph(xy, params["n_neighbors"])
    else:
        conn, dist = radius_graph(xy, float(radius_um))
    table.obsp[conn_key] = conn
    table.obsp[dist_key] = dist
    table.uns[f"{key_added}_neighbors"] = {
        "connectivities_key": conn_key,
        "distances_key": dist_key,
        "params": params,
    }
    _sdata.record_writer(sdata, WRITER, *written)


def knn_graph(xy: np.ndarray, k: int):
    """Directed kNN graph (row = a cell's ``k`` nearest other cells): connectivities and distances."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(xy)
    d, j = cKDTree(xy).query(xy, k=k + 1, workers=-1)
    # drop the cell itself (normally first; among coincident points it may sit elsewhere)
    is_self = j == np.arange(n)[:, None]
    drop = np.where(is_self.any(1), np.argmax(is_self, axis=1), k)
    keep = np.ones((n, k + 1), dtype=bool)
    keep[np.arange(n), drop] = False
    j = j[keep].reshape(n, k)
    d = d[keep].reshape(n, k)
    order = np.argsort(j, axis=1)  # sorted column indices within each row
    cols = np.take_along_axis(j, order, axis=1).ravel().astype(np.int64)
    dist_data = np.take_along_axis(d, order, axis=1).ravel()
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    conn = sp.csr_matrix((np.ones(n * k, np.float32), cols, indptr), shape=(n, n))
    dist = sp.csr_matrix((dist_data.astype(np.float64), cols.copy(), indptr.copy()), shape=(n, n))
    return conn, dist


def radius_graph(xy: np.ndarray, radius: float):
    """Symmetric graph of all pairs of distinct cells within ``radius``: connectivities and distances."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(xy)
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    a, b = pairs[:, 0], pairs[:, 1]
    d = np.linalg.norm(xy[a] - xy[b], axis=1)
    rows, cols = np.concatenate([a, b]), np.concatenate([b, a])
    dist = sp.coo_matrix((np.concatenate([d, d]), (rows, cols)), shape=(n, n)).tocsr()
    dist.sort_indices()
    conn = sp.csr_matrix(
        (np.ones(dist.nnz, np.float32), dist.indices.copy(), dist.indptr.copy()), shape=(n, n)
    )
    return conn, dist
