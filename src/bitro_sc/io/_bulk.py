"""Bulk RNA tables (samples × genes, counts or TPM) into AnnData."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _keys as K
from .._validate import sum_duplicate_genes
from ._common import check_file

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def read_bulk(
    table: str | Path | pd.DataFrame,
    *,
    sample_key: str = K.SAMPLE_ID,
    patient_key: str | None = K.PATIENT_ID,
    obs_columns: Sequence[str] = (),
) -> AnnData:
    """Read a samples × genes table (counts or TPM) into an AnnData for ``fit_bitro(level="bulk")``.

    Parameters
    ----------
    table
        CSV / TSV (optionally gzipped) / parquet file, or a DataFrame: one row per sample, one column
        per gene (symbol). Sample ids come from the column ``sample_key`` when present, otherwise from
        the first column (files) or the index (DataFrames).
    sample_key
        Column holding the sample ids.
    patient_key
        Column holding patient ids, used when present (``None``: never).
    obs_columns
        Further non-gene columns to keep as ``obs`` (e.g. ``["subtype"]``).

    Returns
    -------
    AnnData: ``obs_names`` = sample ids, ``obs["sample_id"]``, ``obs["patient_id"]`` (missing
    where unknown) and ``obs_columns``; genes as ``var_names`` (a gene named twice is summed into one,
    with a warning, as every reader does); ``X`` dense, int64 when the table
    holds integers, float64 otherwise. It annotates no element; store it as table ``"bulk"``.

    Raises
    ------
    FileNotFoundError
        The file is missing.
    ValueError
        Duplicate sample ids (named in the message), non-numeric, missing or
        negative values (the first offending sample and gene named), an unknown ``obs_columns`` entry.

    Examples
    --------
    >>> import pandas as pd
    >>> import bitro_sc as bs
    >>> df = pd.DataFrame({"sample_id": ["S1", "S2"], "ERBB2": [10, 3], "EPCAM": [5, 0]})
    >>> bs.io.read_bulk(df)
    AnnData object with n_obs × n_vars = 2 × 2
        obs: 'sample_id', 'patient_id'
    """
    from anndata import AnnData

    df = _load(table, sample_key=sample_key)
    if sample_key in df.columns:
        df = df.set_index(sample_key)
    ids = pd.Index([str(i) for i in df.index])
    if ids.duplicated().any():
        dup = ids[ids.duplicated()].unique().tolist()
        raise ValueError(
            f"Duplicate sample ids in the bulk table: {dup[:10]}. Each sample must be one row: drop or "
            "merge the duplicated rows."
        )
    df.index = ids

    meta_cols = list(obs_columns)
    unknown = [c for c in meta_cols if c not in df.columns]
    if unknown:
        raise ValueError(f"`obs_columns` {unknown} are not columns of the bulk table.")
    if patient_key is not None and patient_key in df.columns:
        meta_cols.append(patient_key)
    meta = df[meta_cols]
    genes = df.drop(columns=meta_cols)
    names = pd.Index([str(g) for g in genes.columns])
    if genes.shape[1] == 0:
        raise ValueError(
            f"The bulk table has no gene columns (columns: {[sample_key, *meta_cols]}). Expected one row per "
            "sample and one column per gene; a genes × samples table must be transposed first (`df.T`)."
        )

    bad = [
        c
        for c, t in genes.dtypes.items()
        if not pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t)
    ]
    if bad:
        col = bad[0]
        coerced = pd.to_numeric(genes[col], errors="coerce")
        row = genes.index[coerced.isna() & genes[col].notna()]
        example = f" (e.g. sample {row[0]!r}: {genes.at[row[0], col]!r})" if len(row) else ""
        raise ValueError(
            f"Non-numeric values in gene column(s) {[str(b) for b in bad[:10]]}{example}. The table must "
            "hold "
            f"numbers only, apart from {sample_key!r}, {patient_key!r} and `obs_columns`."
        )
    values = genes.to_numpy()
    for test, what in ((np.isnan(values.astype(np.float64)), "missing (NaN)"), (values < 0, "negative")):
        if test.any():
            r, c = np.argwhere(test)[0]
            raise ValueError(
                f"{int(test.sum())} {what} value(s) in the bulk table, first for sample {genes.index[r]!r}, "
                f"gene {names[c]!r}. Expression must be non-negative counts or TPM."
            )
    x = values.astype(np.int64) if np.issubdtype(values.dtype, np.integer) else values.astype(np.float64)

    obs = pd.DataFrame(index=ids)
    obs[K.SAMPLE_ID] = ids.to_numpy()
    if patient_key is not None and patient_key in meta.columns:
        obs[K.PATIENT_ID] = meta[patient_key].astype("string").to_numpy()
    else:
        obs[K.PATIENT_ID] = pd.array([pd.NA] * len(ids), dtype="string")
    for c in obs_columns:
        obs[c] = meta[c].to_numpy()
    for c in (K.SAMPLE_ID, K.PATIENT_ID):
        obs[c] = obs[c].astype("category")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=names))
    return sum_duplicate_genes(adata)  # the rule of every reader: duplicated genes are summed


def _load(table: str | Path | pd.DataFrame, *, sample_key: str) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table.copy()
    p = check_file(table, what="bulk expression")
    name = p.name.lower()
    if name.endswith((".xlsx", ".xls", ".ods", ".h5ad", ".h5", ".rds", ".json")):
        raise ValueError(
            f"{str(p)!r} is not a text or parquet table; read_bulk reads CSV / TSV (optionally gzipped) and "
            f"parquet. Read it yourself and pass the DataFrame (e.g. `pd.read_excel({p.name!r})`; for an "
            "AnnData, `adata.to_df()`)."
        )
    if name.endswith(".parquet"):
        df = pd.read_parquet(p)
        if sample_key not in df.columns and isinstance(df.index, pd.RangeIndex):
            df = df.set_index(df.columns[0])
        return df
    sep = "\t" if any(s in name for s in (".tsv", ".txt", ".tab")) else ","
    df = pd.read_csv(p, sep=sep)
    # pandas renames duplicate headers ("A", "A.1"); restore them so duplicates are reported
    header = pd.read_csv(p, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
    df.columns = [str(c) if i or c else df.columns[0] for i, c in enumerate(header)]
    if sample_key not in df.columns:
        df = df.set_index(df.columns[0])
    return df
