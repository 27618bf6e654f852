"""Provenance and the overwrite rule: which bitro_sc function wrote each element and table part.

The record is ``sdata.attrs["bitro_sc"]["written_by"]`` (saved with the zarr store): element names
(``"cells"``) and parts of tables as ``"<table>/<slot>/<name>"`` (``"cells/obs/spot_id"``,
``"table/layers/bitro"``). A function re-run with the same key replaces what it wrote itself;
anything else (the user's data, another function's output) needs ``overwrite=True``; spatialdata's
own ``uns["spatialdata_attrs"]`` is never replaced. Re-exported by :mod:`bitro_sc._sdata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _keys as K

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def _attrs(sdata: SpatialData) -> dict[str, Any]:
    return sdata.attrs.setdefault(K.ATTRS, {})


def check_free(
    sdata: SpatialData,
    key: str,
    *,
    overwrite: bool = False,
    what: str = "element",
    writer: str | tuple[str, ...] | None = None,
    exists: bool | None = None,
) -> None:
    """Fail unless ``key`` may be written by ``writer``: it is unused, ``writer`` (or one of a tuple
    of writers sharing the key) wrote it before (a re-run replaces its own output), or ``overwrite=True``.

    ``key`` is an element name, or a part of a table made by :func:`part_key` (``"cells/obs/spot_id"``);
    ``exists`` says whether that part is there (default: ``key in sdata``). Who wrote what is read
    from :func:`written_by`. Keys reserved by spatialdata (:data:`RESERVED_UNS`) are refused always.
    """
    name = key.rsplit("/", 1)[-1]
    if "/uns/" in key and name in RESERVED_UNS:
        raise ValueError(
            f"uns[{name!r}] is spatialdata's own metadata of the table and cannot be replaced; choose "
            "another `key_added=`."
        )
    present = (key in sdata) if exists is None else exists
    if not present or overwrite:
        return
    owner = written_by(sdata, key)
    if writer is not None and owner in ((writer,) if isinstance(writer, str) else tuple(writer)):
        return
    by = f"written by `{owner}`" if owner else "not written by bitro_sc: your own data"
    raise ValueError(
        f"SpatialData already has {'an' if what[:1] in 'aeiou' else 'a'} {what} {_describe(key)} ({by}). "
        f"Pass `overwrite=True` to replace it, or choose another `key_added=`."
    )


#: ``uns`` keys of a table that belong to spatialdata / anndata, never replaced by bitro_sc
RESERVED_UNS = frozenset({"spatialdata_attrs"})


def part_key(table_key: str, slot: str, name: str) -> str:
    """Provenance key of a part of a table: ``part_key("cells", "obs", "spot_id") == "cells/obs/spot_id"``."""
    return f"{table_key}/{slot}/{name}"


def _describe(key: str) -> str:
    parts = key.split("/")
    if len(parts) == 3:
        return f"tables[{parts[0]!r}].{parts[1]}[{parts[2]!r}]"
    return repr(key)


def written_by(sdata: SpatialData, key: str) -> str | None:
    """The bitro_sc function that wrote ``key`` (an element name or a :func:`part_key`), or ``None``.

    The record is ``sdata.attrs["bitro_sc"]["written_by"]`` (saved with the zarr store).
    """
    record = sdata.attrs.get(K.ATTRS, {}).get(WRITERS, {})
    value = record.get(key)
    return None if value is None else str(value)


#: ``sdata.attrs["bitro_sc"][WRITERS]``: ``{element or part key: "bs.<module>.<function>"}``
WRITERS = "written_by"


def record_writer(sdata: SpatialData, writer: str, *keys: str) -> None:
    """Record that ``writer`` wrote ``keys``; parts recorded under a replaced key are forgotten."""
    record = _attrs(sdata).setdefault(WRITERS, {})
    for key in keys:
        for old in [k for k in record if k.startswith(key + "/")]:
            del record[old]
        record[key] = writer


#: writers of a BiTro run record (``uns["bitro"]`` of a spot / bulk / cells table): any of them may
#: replace a record another one wrote (fit, then predict on the same slide)
RECORD_WRITERS = ("bs.tl.fit_bitro", "bs.tl.fit_baseline", "bs.tl.predict_bitro")


def check_table_free(
    sdata: SpatialData,
    table_key: str,
    parts: Sequence[tuple[str, str]],
    *,
    overwrite: bool,
    writer: str | tuple[str, ...],
) -> list[str]:
    """:func:`check_free` for parts ``(slot, name)`` of ``tables[table_key]`` (slot: ``"obs"``,
    ``"obsm"``, ``"obsp"``, ``"layers"``, ``"uns"``); returns their :func:`part_key` s.
    A missing table has no parts yet."""
    table = sdata.tables.get(table_key)
    keys = []
    for slot, name in parts:
        key = part_key(table_key, slot, name)
        there = False
        if table is not None:
            container = table.obs.columns if slot == "obs" else getattr(table, slot)
            there = name in container
        what = {"obs": "column", "obsm": "embedding", "obsp": "graph", "layers": "layer"}.get(slot, "record")
        check_free(sdata, key, exists=there, overwrite=overwrite, writer=writer, what=what)
        keys.append(key)
    return keys
