"""`bs.tl.predict_bitro`: write a model's predictions (spot, bulk or cell level) into a slide."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K
from .. import _sdata
from ..models._params import DataKeys
from ..models._protocol import ExpressionModel
from ._steps import StepPlan, plan_steps

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def predict_bitro(
    sdata: SpatialData,
    model: ExpressionModel,
    *,
    level: Literal["spot", "bulk", "cell"] = "spot",
    key_added: str = K.PREDICTION,
    overwrite: bool = False,
    table_key: str | None = None,
    bulk_key: str | None = None,
    cells_key: str | None = None,
    features_key: str | None = None,
    phenotype_key: str | None = None,
    spot_key: str | None = None,
    graph_key: str | None = None,
    store: str | Path | None = None,
) -> None:
    """Predict expression with ``model`` and write it into ``sdata`` (in place).

    Values are on the library-normalised scale: **counts per 10,000, not log-transformed**.

    - ``level="spot"``: ``tables[table_key].layers[key_added]`` (spots × all genes of the table,
      float32; ``NaN`` for genes the model does not predict and for spots that hold no cell).
    - ``level="bulk"``: ``tables[bulk_key].layers[key_added]`` (``NaN`` on rows of other samples);
      a slide without a bulk table gets a one-row bulk table ``tables[bulk_key]`` (``X`` empty
      counts) holding the prediction.
    - ``level="cell"``: ``tables[cells_key]`` is replaced by a cells × genes table with the same
      obs / obsm / obsp / uns, the model's genes as var, no ``X`` (``None``: cells have no measured
      values) and the
      predictions in ``layers[key_added]`` (cells outside spots are predicted in spatial windows
      of a spot's size; a bulk model predicts every cell in windows of its training chunk size).
      Spot-trained models (RNA-content head, the default for spots) write each cell's own
      expression (counts per 10k of a cell of typical RNA content) and its RNA content in
      ``obs[f"{key_added}_rna_content"]``; a spot's prediction is then ``Σ values / Σ rna_content``
      over its cells times the model's per-gene depth factor (``model.net.depth_factor``; with the
      bag-level linear term, ``ModelParams.bag_linear``, it needs the spot's mean scaled cell
      features, and every cell of a spot shares the spot's linear level). Without
      the RNA-content head (``ModelParams(rna_head=False)``, bulk-trained models) the values of a
      spot's cells sum to its spot prediction.

    The model's run record (genes, training HVGs, …) is copied to ``uns[key_added]`` of the table.

    The model applies its own preprocessing (``model.preprocessing``, recorded at fit time): features
    computed with another encoder or other encoder settings (name, feature names, ``fov_um``,
    stains) are refused with the ``bs.tl.cell_features`` call that fixes them; features standardised
    with other statistics (e.g. per slide) are re-standardised from their raw values with the
    training scaler; phenotypes that are missing or come from another k-means are assigned with the
    training k-means (each correction logged; the slide's own columns are not changed). On a slide
    that is only segmented, the missing steps run first with the model's settings, one log line each
    (logger ``"bitro_sc"``, INFO): ``bs.tl.cell_features(sdata, encoder=…, fov_um=…,
    scaler=model.feature_scaler)``, ``bs.tl.phenotypes(sdata, model=model.phenotype_model)``,
    ``bs.tl.assign_cells`` (spot level) and ``bs.tl.cell_graph`` with the recorded ``k`` / radius;
    what cannot be run here is listed in one error before anything is written.

    Parameters
    ----------
    sdata
        The slide: segmented (``bs.tl.segment``), the other steps run when missing (see above).
    model
        A :class:`~bitro_sc.models.BiTroModel`, a baseline, or anything implementing
        :class:`~bitro_sc.models.ExpressionModel`.
    level
        What to predict.
    key_added
        Layer (and ``uns`` key) written.
    overwrite
        Replace an existing ``layers[key_added]`` / ``uns[key_added]`` (or gene columns of the cells
        table) that the user or another function wrote; ``predict_bitro``'s own earlier output
        (and a fit's run record) is replaced anyway. Cell-level predictions keep the cells table's
        other layers (same genes required).
    table_key, bulk_key, cells_key, features_key, phenotype_key, spot_key, graph_key
        Where the slide holds its tables, cell features, phenotypes, cell → spot ids and cell graph
        (see :class:`~bitro_sc.models.DataKeys`). ``None`` (default): the keys the model was
        fitted on (``model.record["keys"]``; the data contract's defaults when it names none).
    store
        ``level="cell"`` only: path of a zarr array to create (float32, chunked by rows of ~16 MB)
        into which the predictions are written block by block as they are computed;
        ``layers[key_added]`` then holds them as a dask array reading from it. Memory stays bounded
        on slides of 10⁶ cells: a BiTro model holds only a band of rows at a time (other models
        compute their whole frame first). The array must outlive the SpatialData: write the slide
        with ``bs.io.write_zarr`` for a self-contained copy. An array there that ``predict_bitro``
        wrote for the same ``key_added`` is replaced; anything else at the path is refused unless
        ``overwrite=True``. ``None`` (default): in memory.

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
    >>> bs.tl.predict_bitro(test_slide, model, level="cell")
    >>> cells = test_slide.tables["cells"].to_df(layer="bitro")
    >>> len(cells) == test_slide.tables["cells"].n_obs, bool((cells.to_numpy() >= 0).all())
    (True, True)
    """
    _sdata.check_level(level, K.PREDICT_LEVELS)
    if store is not None and level != "cell":
        raise ValueError(
            f"`store` holds cell-level predictions; level={level!r} predictions are small and stay in "
            "memory. Pass level='cell', or leave `store` out."
        )
    if not isinstance(model, ExpressionModel):
        raise TypeError(
            f"`model` must implement bitro_sc.models.ExpressionModel (genes, levels, record, predict_frame); "
            f"got {type(model).__name__}. Fit one with `bs.tl.fit_bitro` or `bs.tl.fit_baseline`."
        )
    if level not in model.levels:
        raise ValueError(f"{type(model).__name__} predicts levels {list(model.levels)}, not {level!r}.")
    keys = DataKeys.coerce(model.record.get("keys")).replace(
        table_key=table_key,
        bulk_key=bulk_key,
        cells_key=cells_key,
        features_key=features_key,
        phenotype_key=phenotype_key,
        spot_key=spot_key,
        graph_key=graph_key,
    )
    table_key, bulk_key, cells_key = keys.table_key, keys.bulk_key, keys.cells_key
    plan = _plan(sdata, model, keys, level)
    plan.check()  # one error listing every missing step that cannot be run here, before any write
    target = cells_key if level == "cell" else (table_key if level == "spot" else bulk_key)
    parts = [("layers", key_added), ("uns", key_added)] + (
        [("obs", f"{key_added}_rna_content")] if level == "cell" else []
    )
    written = _sdata.check_table_free(sdata, target, parts, overwrite=overwrite, writer=_WRITERS)
    if level == "cell":
        _check_cells_free(sdata, cells_key, key_added, model)
        genes_key = _sdata.part_key(cells_key, "var", "genes")  # the cells table's gene columns
        there = _sdata.cells_table(sdata, cells_key).n_vars > 0
        _sdata.check_free(
            sdata, genes_key, exists=there, overwrite=overwrite, writer=_WRITERS, what="gene list"
        )
        written.append(genes_key)
        if store is not None:
            _check_store(Path(store), key_added, overwrite=overwrite)
    plan.run()
    if level == "cell":
        values, rna = _cell_values(sdata, model, keys, key_added=key_added, store=store)
        _write_cells(sdata, values, rna, model, cells_key=cells_key, key_added=key_added)
        _sdata.record_writer(sdata, "bs.tl.predict_bitro", *written)
        return
    frame = model.predict_frame(sdata, level=level, keys=keys)
    key = table_key if level == "spot" else bulk_key
    if level == "bulk" and key not in sdata.tables:
        _add_bulk_table(sdata, frame, key)
    table = sdata.tables[key]
    values = np.full(table.shape, np.nan, dtype=np.float32)
    rows = table.obs_names.get_indexer(frame.index.astype(str))
    cols = table.var_names.get_indexer(frame.columns)
    if (rows < 0).any():
        raise ValueError(
            f"The model predicted rows that are not in the {key!r} table: {list(frame.index[rows < 0])[:5]}."
        )
    ok = cols >= 0
    values[np.ix_(rows, cols[ok])] = frame.to_numpy(dtype=np.float32)[:, ok]
    table.layers[key_added] = values
    _write_record(
        table, model, key_added, missing=[g for g, o in zip(frame.columns, ok, strict=True) if not o]
    )
    _sdata.record_writer(sdata, "bs.tl.predict_bitro", *written)


def _plan(sdata: SpatialData, model: ExpressionModel, keys: DataKeys, level: str) -> StepPlan:
    """The preparation steps the slide lacks for ``model`` (run with its recorded settings)."""
    from ..models._baseline import BaselineModel
    from ..models._model import BiTroModel

    need_phen = need_graph = False
    if isinstance(model, BiTroModel):
        p = model.params
        need_phen = bool(model.phenotypes) and (p.phenotype_dim > 0 or bool(p.phenotype_profiles))
        need_graph = p.gat_layers > 0
    elif not isinstance(model, BaselineModel):
        return StepPlan("predict_bitro")  # another model: it reads the slide itself
    return plan_steps(
        [sdata],
        keys=keys,
        prep=model.preprocessing,
        need_spots=level == "spot",
        need_phenotypes=need_phen,
        need_graph=need_graph,
        who="predict_bitro",
        single=True,
    )


#: predict_bitro replaces its own layers and run records, and a run record of fit_bitro / fit_baseline
_WRITERS = ("bs.tl.predict_bitro", *_sdata.RECORD_WRITERS)


def _check_cells_free(sdata: SpatialData, cells_key: str, key_added: str, model: ExpressionModel) -> None:
    """Cell-level predictions keep the cells table's other layers: they must be of the same genes."""
    cells = _sdata.cells_table(sdata, cells_key)
    others = [k for k in cells.layers if k != key_added]
    if others and list(cells.var_names) != [str(g) for g in model.genes]:
        raise ValueError(
            f"The cells table {cells_key!r} already holds cell-level layers {others} of {cells.n_vars} other "
            f"gene(s); a cells table has one gene list, so predictions of this model's {len(model.genes)} "
            "genes cannot sit beside them. Predict into another table (`cells_key=` a copy of the cells "
            "table), or delete those layers first."
        )


def _write_record(
    table: AnnData, model: ExpressionModel, key_added: str, missing: list[str] | None = None
) -> None:
    record = dict(model.record)
    record.setdefault("genes", list(model.genes))
    record.setdefault("hvgs", [])
    if missing:
        record["genes_not_in_table"] = list(missing)
    table.uns[key_added] = _sdata.to_uns(record)


#: marks a predictions array written by predict_bitro (``attrs["bitro_sc"]``)
_STORE_WRITER = "bs.tl.predict_bitro"
#: bytes per row block of a predictions array
_BLOCK_BYTES = 16 << 20


def _check_store(path: Path, key_added: str, *, overwrite: bool) -> None:
    """Refuse a ``store`` path holding anything but predict_bitro's own array for ``key_added``."""
    if not path.exists() or overwrite:
        return
    import zarr

    mark: Any = None
    try:
        mark = dict(zarr.open_array(str(path), mode="r").attrs).get("bitro_sc")
    except (FileNotFoundError, ValueError, KeyError, TypeError, zarr.errors.NodeTypeValidationError):
        mark = None  # not a zarr array: refused below
    if isinstance(mark, dict) and mark.get("written_by") == _STORE_WRITER and mark.get("key") == key_added:
        return
    raise FileExistsError(
        f"`store` {str(path)!r} already exists and is not predict_bitro's array for key {key_added!r}. "
        "Pass another path, or overwrite=True to replace it."
    )


def _cell_values(
    sdata: SpatialData, model: ExpressionModel, keys: DataKeys, *, key_added: str, store: str | Path | None
) -> tuple[Any, np.ndarray | None]:
    """Cell-level predictions (rows = the cells table's) and RNA contents: in memory, or written by
    row blocks into a new zarr array at ``store`` and returned as a dask array reading from it."""
    from ..models._model import BiTroModel

    cells = _sdata.cells_table(sdata, keys.cells_key)
    if store is None:
        frame = model.predict_frame(sdata, level="cell", keys=keys)
        return _frame_rows(frame, cells.obs_names)
    import dask.array as da
    import zarr

    n, g = cells.n_obs, len(model.genes)
    rows = max(1, min(n, _BLOCK_BYTES // (4 * max(g, 1))))
    arr = zarr.create_array(
        store=str(store),
        shape=(n, g),
        chunks=(rows, g),
        dtype="float32",
        fill_value=np.nan,
        compressors=None,  # a working copy: float values compress little; write_zarr's copy is compressed
        overwrite=True,
    )
    arr.attrs["bitro_sc"] = {
        "written_by": _STORE_WRITER,
        "key": key_added,
        "genes": [str(x) for x in model.genes],
    }
    if isinstance(model, BiTroModel):
        rna = model.predict_cells_into(arr, sdata, keys=keys)
    else:  # another model gives a whole frame: copied in by blocks
        values, rna = _frame_rows(model.predict_frame(sdata, level="cell", keys=keys), cells.obs_names)
        for start in range(0, n, rows):
            arr[start : start + rows] = values[start : start + rows]
    return da.from_zarr(arr), rna


def _frame_rows(frame: Any, obs_names: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A cell-level frame's values (float32) and RNA contents in the cells table's row order."""
    import pandas as pd

    rna = frame.attrs.get("rna_content")
    if rna is not None:
        rna = pd.Series(np.asarray(rna, dtype=np.float32), index=frame.index).reindex(obs_names).to_numpy()
    if not frame.index.equals(obs_names):
        frame = frame.reindex(obs_names)
    return frame.to_numpy(dtype=np.float32), rna


def _write_cells(
    sdata: SpatialData,
    values: Any,
    rna: np.ndarray | None,
    model: ExpressionModel,
    *,
    cells_key: str,
    key_added: str,
) -> None:
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    old = sdata.tables[cells_key]
    obs = old.obs.copy()
    if rna is not None:
        obs[f"{key_added}_rna_content"] = rna
    n_genes = len(model.genes)
    new = ad.AnnData(
        X=None,  # no measured values per cell: the predictions are in layers[key_added]
        obs=obs,
        var=pd.DataFrame(index=pd.Index([str(x) for x in model.genes])),
        obsm={k: v for k, v in old.obsm.items()},
        layers={k: v for k, v in old.layers.items() if k != key_added and old.n_vars == n_genes},
        obsp={k: v for k, v in old.obsp.items()},
        uns=dict(old.uns),
    )
    new.layers[key_added] = values
    _write_record(new, model, key_added)
    attrs = old.uns.get(TableModel.ATTRS_KEY)
    if attrs:
        new = TableModel.parse(
            new,
            region=attrs["region"],
            region_key=attrs["region_key"],
            instance_key=attrs["instance_key"],
            overwrite_metadata=True,
        )
    sdata.tables[cells_key] = new


def _add_bulk_table(sdata: SpatialData, frame: Any, key: str) -> None:
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import TableModel

    info = _sdata.slide_info(sdata)
    obs = pd.DataFrame(
        {
            K.SAMPLE_ID: [info[K.SAMPLE_ID] or str(frame.index[0])],
            K.PATIENT_ID: [info[K.PATIENT_ID] or "unknown"],
        },
        index=frame.index.astype(str),
    )
    table = ad.AnnData(
        X=sparse.csr_matrix((1, frame.shape[1]), dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=frame.columns),
    )
    sdata.tables[key] = TableModel.parse(table)
