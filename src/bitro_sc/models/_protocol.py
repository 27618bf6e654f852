"""The small protocol every expression model implements, so `bs.tl.predict_bitro` accepts it.

A model predicts, for one slide (a :class:`~spatialdata.SpatialData`), a table of expression
values on the **library-normalised scale: counts per 10,000** (not log-transformed), one row per
observation of the target table and one column per gene. Where it reads the slide is given by a
:class:`~bitro_sc.models.DataKeys` (``keys``; ``None``: the keys the model was fitted on):

- ``level="spot"``: rows = ``obs_names`` of the spot table (``tables[keys.table_key]``);
- ``level="bulk"``: rows = ``obs_names`` of the bulk table (``tables[keys.bulk_key]``), or a
  single row named after the slide's ``sample_id`` when the slide has no bulk table;
- ``level="cell"``: rows = ``obs_names`` of the cells table (``tables[keys.cells_key]``); for a
  sum-pooling model the values of the cells of one spot sum to that spot's prediction (a model
  that cannot predict per cell raises ``ValueError`` naming the levels it supports). A model may
  attach per-cell RNA contents as ``frame.attrs["rna_content"]``; ``bs.tl.predict_bitro`` writes
  them to ``obs[f"{key_added}_rna_content"]``.

``bs.tl.predict_bitro`` writes the frame into ``layers["bitro"]`` (or ``key_added``) and copies
``model.record`` (at least ``"genes"`` and ``"hvgs"``; ``"keys"``: the keys of training, used by
default) into the table's ``uns["bitro"]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData

    from ._params import DataKeys

Level = Literal["spot", "bulk", "cell"]


@runtime_checkable
class ExpressionModel(Protocol):
    """What `bs.tl.predict_bitro` needs from a model (BiTroModel, BaselineModel, ...).

    Attributes
    ----------
    genes
        Gene names (``var_names``) the model predicts, in column order.
    levels
        The levels ``predict_frame`` supports, a subset of ``("spot", "bulk", "cell")``.
    record
        Run record (JSON-serialisable dict): at least ``"genes"`` and ``"hvgs"`` (top-50 HVGs of
        the training spot tables, for evaluation); ``"keys"`` (the ``DataKeys`` fields it was
        fitted on) where known; also config, split and history where known.
    """

    genes: list[str]
    levels: tuple[str, ...]
    record: dict[str, Any]

    def predict_frame(
        self, sdata: SpatialData, *, level: Level = "spot", keys: DataKeys | None = None
    ) -> pd.DataFrame:
        """Predicted expression (counts per 1e4, not log) as a DataFrame: index = obs_names of
        the target table for ``level`` (read with ``keys``), columns = ``genes``."""
        ...
