"""Checks at the door: every argument and input of the public functions, in one place.

Each check raises before anything is computed or written, naming the problem and the fix
(the table of every bad input and its message is ``docs/bad_inputs.md``). The rules:

- **Options** (``Literal`` arguments) are checked at run time: :func:`check_choice`.
- **Lengths** are µm, finite and positive: :func:`check_um`; **pixel sizes** also lie within
  :data:`MPP_RANGE` (anything else is named absurd, e.g. px/µm given for µm/px): :func:`check_mpp`.
- **Gene lists** are sequences of names, never a bare string: :func:`check_genes`.
- **Devices** must exist on this machine: :func:`check_device`.
- **Counts**: finite, non-negative; spot counts integer (raw UMI), bulk counts integer or TPM, never
  log-transformed: :func:`check_expression`. **Duplicated gene names** are summed into one gene by
  every reader (with a warning naming them, :func:`sum_duplicate_genes`); a table that still has
  them is refused by ``fit_bitro`` / ``fit_baseline`` with that fix. **Duplicated spot or sample
  ids** are refused everywhere (two rows cannot be told apart).
- **Images** become RGB uint8 ``(y, x, 3)`` in the readers: :func:`to_rgb_uint8` converts channel-first
  arrays, RGBA (over white), uint16 holding 8-/12-/16-bit values and floats in [0, 1] or [0, 255],
  with a warning saying what it did; greyscale, NaN, negative or out-of-range values are refused.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

#: plausible pixel sizes of an H&E image (µm/px): 0.05 (a 100x scan) to 50 (a Visium low-res PNG)
MPP_RANGE = (0.01, 100.0)
#: a non-integer bulk table whose largest value is at most this is taken for log-transformed
#: (log1p of a million TPM is 13.8, log2 of it 19.9; real TPM / count tables reach thousands)
LOG_MAX = 25.0


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(value: Any, allowed: Sequence[Any], name: str) -> Any:
    """``value`` if it is one of ``allowed`` (a ``Literal`` option), else a ``ValueError`` listing them."""
    try:
        ok = value in tuple(allowed)
    except TypeError:  # unhashable/uncomparable values are not options
        ok = False
    if not ok:
        close = ""
        if isinstance(value, str):
            lower = [a for a in allowed if isinstance(a, str) and a.lower() == value.lower()]
            close = f" (did you mean {lower[0]!r}? options are case-sensitive)" if lower else ""
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}{close}.")
    return value


def check_um(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A length (µm) as float: a finite real number > 0 (≥ 0 with ``allow_zero``)."""
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a number of µm, got {type(value).__name__} {value!r}.")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"`{name}` must be a finite number of µm, got {v!r}.")
    if v < 0 or (v == 0 and not allow_zero):
        sign = "≥ 0" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be {sign} (µm), got {v!r}.")
    return v


def check_mpp(value: Any, *, name: str = "mpp") -> float:
    """A pixel size (µm/px) as float; NaN, inf, ≤ 0, strings and values outside :data:`MPP_RANGE` are
    refused, each named as such."""
    if isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a number of µm per pixel, got the string {value!r}; pass e.g. `{name}=0.5`."
        )
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a number of µm per pixel, got {type(value).__name__} {value!r}.")
    v = float(value)
    if math.isnan(v):
        raise ValueError(
            f"`{name}` is NaN; pass the pixel size in µm per pixel (e.g. 0.25 at 40x, 0.5 at 20x)."
        )
    if math.isinf(v):
        raise ValueError(f"`{name}` is infinite; pass the pixel size in µm per pixel (e.g. 0.5).")
    if v <= 0:
        raise ValueError(f"`{name}` must be a positive number of µm per pixel, got {v!r}.")
    lo, hi = MPP_RANGE
    if not lo <= v <= hi:
        hint = (
            f"1/{v:g} = {1 / v:.3g}: was it given in pixels per µm?"
            if v > hi
            else "was it given in mm or in pixels per µm?"
        )
        raise ValueError(
            f"`{name}`={v!r} µm per pixel is absurd for an H&E image (expected {lo:g}–{hi:g}; 0.25 at "
            f"40x, 0.5 at 20x); {hint} Pass the pixel size in µm per pixel."
        )
    return v


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """An integer ≥ ``minimum`` (bools and non-integral floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | float) or value != int(value):
        raise TypeError(f"`{name}` must be an integer ≥ {minimum}, got {value!r}.")
    if int(value) < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def check_genes(genes: Any, name: str = "genes") -> list[str] | None:
    """``genes`` as a list of distinct names (``None`` stays ``None``); a bare string is refused."""
    if genes is None:
        return None
    if isinstance(genes, str | bytes):
        raise TypeError(
            f"`{name}` must be a list of gene names, got the single string {genes!r} "
            f"(it would be read letter by letter); pass `{name}=[{genes!r}]`."
        )
    try:
        out = [str(g) for g in genes]
    except TypeError as err:
        raise TypeError(f"`{name}` must be a list of gene names, got {type(genes).__name__}.") from err
    if not out:
        raise ValueError(f"`{name}` is empty; pass at least one gene name, or `None` for the default genes.")
    return out


def check_device(device: Any) -> None:
    """Refuse a device that does not exist here (``"cuda"`` without CUDA, ``"mps"`` without MPS, typos)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"`device`={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0', 'mps' or None."
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`device`={device!r} but CUDA is not available on this machine (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda}). Use `device='cpu'` or None."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"`device`={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"`device`={device!r} but MPS is not available here. Use `device='cpu'` or None.")


# ----------------------------------------------------------------------------------------------
# expression tables
# ----------------------------------------------------------------------------------------------
def check_unique_ids(table: AnnData, *, what: str, column: str | None = None) -> None:
    """Refuse duplicated row ids (obs names, or ``obs[column]``): two rows cannot be told apart."""
    import pandas as pd

    ids = pd.Index(table.obs[column].astype(str)) if column and column in table.obs else table.obs_names
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()[:5].tolist()
        where = f"obs[{column!r}]" if column and column in table.obs else "obs_names"
        raise ValueError(
            f"The {what} has duplicated ids in {where}: {dup}. Each spot / sample must be one row: drop or "
            "rename the duplicates (e.g. `table = table[~table.obs_names.duplicated()]`)."
        )


def check_unique_genes(table: AnnData, *, what: str) -> None:
    """Refuse duplicated gene names, naming :func:`bitro_sc.pp.sum_duplicate_genes` as the fix."""
    names = table.var_names
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"The {what} has duplicated gene names {dup}. bitro_sc sums duplicated genes (as its readers "
            "do): `table = bs.pp.sum_duplicate_genes(table)`, then store it back."
        )


def check_expression(table: AnnData, *, what: str, level: str = "spot") -> None:
    """Refuse counts that are not raw: NaN / inf, negative, non-integer at spot level (or
    log-transformed at bulk level, where TPM is allowed); duplicated genes or ids."""
    from scipy import sparse

    from .pp._expression import get_counts

    check_unique_genes(table, what=what)
    check_unique_ids(table, what=what)
    if level == "spot" and "spot_id" in table.obs:
        check_unique_ids(table, what=what, column="spot_id")
    raw = get_counts(table)
    where = "(layers['counts'])" if "counts" in table.layers else "(X)"
    values: np.ndarray = np.asarray(raw.data if sparse.issparse(raw) else raw)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"The {what} {where} has dtype {values.dtype}; numeric raw counts are needed.")
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"The {what} {where} holds {int(bad.sum())} NaN or infinite value(s); raw counts are needed. "
                "Fill or drop them (e.g. `np.nan_to_num`) or re-read the data with `bs.io.read_*`."
            )
    if values.size and values.min() < 0:
        raise ValueError(
            f"The {what} {where} holds negative values (min {values.min():g}): it is not raw counts (scaled "
            "or centred data?). Put the raw counts in `layers['counts']`."
        )
    if values.dtype.kind != "f" or not values.size:
        return
    frac = values != np.round(values)
    if not frac.any():
        return
    top = float(values.max())
    if level == "bulk" and top > LOG_MAX:
        return  # TPM / FPKM
    kind = "log-transformed" if top <= LOG_MAX else "normalised"
    raise ValueError(
        f"The {what} {where} holds non-integer values up to {top:.3g}: it looks {kind}, not raw counts. "
        "bitro_sc normalises itself (log1p counts per 10k): put the raw "
        f"{'counts or TPM' if level == 'bulk' else 'integer counts'} in `layers['counts']` "
        "(e.g. from `adata.raw` or the reader, `bs.io.read_*`)."
    )


def sum_duplicate_genes(adata: AnnData, *, warn: bool = True) -> AnnData:
    """A copy of ``adata`` whose duplicated gene names are summed into one gene (first position kept).

    Applied by every reader; ``X`` and every layer are summed, ``var`` keeps the first row. Returns
    ``adata`` itself when its genes are already unique.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> a = ad.AnnData(np.array([[1, 2, 3]]), var=pd.DataFrame(index=["A", "B", "A"]))
    >>> b = sum_duplicate_genes(a, warn=False)
    >>> list(b.var_names), b.X.tolist()
    (['A', 'B'], [[4, 2]])
    """
    import pandas as pd
    from anndata import AnnData
    from scipy import sparse

    names = pd.Index([str(n) for n in adata.var_names])
    if names.is_unique:
        return adata
    codes, uniques = pd.factorize(names)
    dup = names[names.duplicated()].unique().tolist()
    if warn:
        warnings.warn(
            f"{len(dup)} gene name(s) appear more than once ({dup[:5]}{' ...' if len(dup) > 5 else ''}); "
            "their counts are summed into one gene each.",
            UserWarning,
            stacklevel=3,
        )
    merge = sparse.csr_matrix(
        (np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), len(uniques))
    )

    def summed(m: Any) -> Any:
        kind = m.dtype
        out = (sparse.csr_matrix(m) @ merge).astype(kind)
        return out if sparse.issparse(m) else np.asarray(out.todense())

    first = np.unique(codes, return_index=True)[1]
    var = adata.var.iloc[first].copy()
    var.index = pd.Index(uniques)
    return AnnData(
        X=summed(adata.X),
        obs=adata.obs.copy(),
        var=var,
        layers={k: summed(v) for k, v in adata.layers.items()},
        obsm=dict(adata.obsm),
        uns=dict(adata.uns),
    )


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def _note(what: str, text: str) -> None:
    warnings.warn(f"The {what} {text}", UserWarning, stacklevel=4)


def to_rgb_uint8(arr: Any, *, what: str = "image", sample: Any = None) -> Any:
    """A 2-D image as RGB uint8 ``(y, x, 3)`` (numpy stays numpy, dask stays lazy).

    - channel-first ``(3|4, y, x)`` is moved to channel-last;
    - RGBA is composited over white (transparent = glass);
    - uint16 is scaled by its bit depth, read from the largest value (8-, 12-, 14- or 16-bit);
    - floats in [0, 1] are scaled by 255, floats in [0, 255] rounded;

    each with a warning saying what was done. Greyscale, other channel counts, NaN, negative
    values or floats above 255 raise, saying what to do. ``sample`` (e.g. a small pyramid level of
    the same image) gives the value range instead of ``arr`` itself, so a lazy whole slide is not read.

    Examples
    --------
    >>> import numpy as np
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     out = to_rgb_uint8(np.full((3, 4, 5), 0.5, np.float32))
    >>> out.shape, out.dtype, int(out[0, 0, 0])
    ((4, 5, 3), dtype('uint8'), 128)
    """
    shape = tuple(int(n) for n in arr.shape)
    if arr.ndim == 3 and shape[-1] not in (3, 4) and shape[0] in (3, 4):
        _note(what, f"is channel-first {shape}; read as (y, x, c).")
        arr = arr.transpose(1, 2, 0)
        if sample is not None and sample.ndim == 3 and sample.shape[0] in (3, 4):
            sample = sample.transpose(1, 2, 0)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 2)):
        raise ValueError(
            f"The {what} is greyscale (shape {shape}); an RGB H&E image is needed (the nuclei are found "
            "by colour deconvolution). Give the colour scan; to proceed anyway with a brightfield "
            "greyscale image, stack it: `np.repeat(img[..., None], 3, axis=-1)`."
        )
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(
            f"The {what} has shape {shape}; a 2-D RGB image (y, x, 3) or (3, y, x) is needed. Select one "
            "plane / the RGB channels first."
        )
    if arr.dtype.kind not in "uif" or arr.dtype.kind == "b":
        raise ValueError(f"The {what} has pixel type {arr.dtype}; expected uint8, uint16 or float.")
    ref = arr if sample is None else sample
    if ref.ndim == 3 and ref.shape[-1] == 4:
        ref = ref[..., :3]
    if arr.shape[-1] == 4:
        arr = _composite(arr, what)
    if arr.dtype == np.uint8:
        return arr
    lo, hi = _value_range(ref)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"The {what} contains NaN pixels; fill them (e.g. with 255 for glass) first.")
    if lo < 0:
        raise ValueError(
            f"The {what} has negative pixel values (min {lo:g}); an RGB image in 0–255 (or 0–1) is needed. "
            "Undo the normalisation that produced it."
        )
    if arr.dtype.kind in "ui":
        bits = max(8, math.ceil(math.log2(hi + 1))) if hi > 0 else 8
        if bits > 16:
            raise ValueError(
                f"The {what} has integer values up to {hi:g} (over 16 bits); rescale it to 0–255."
            )
        if bits == 8:
            _note(what, f"has type {arr.dtype} holding 8-bit values (max {hi:g}); cast to uint8.")
            return arr.astype(np.uint8)
        bits = 12 if bits <= 12 else (14 if bits <= 14 else 16)
        _note(what, f"has type {arr.dtype} holding {bits}-bit values (max {hi:g}); scaled to 8 bits.")
        scaled = arr.astype(np.float32) * np.float32(255.0 / (2**bits - 1)) + np.float32(0.5)
        return scaled.clip(0, 255).astype(np.uint8)
    if hi <= 1.0:
        _note(what, "has float values in [0, 1]; scaled by 255 to uint8.")
        return (arr.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if hi <= 255.0:
        _note(what, f"has float values in [0, 255] (max {hi:g}); rounded to uint8.")
        return (arr.clip(0.0, 255.0) + 0.5).astype(np.uint8)
    raise ValueError(
        f"The {what} has float values up to {hi:g}; expected [0, 1] or [0, 255]. Rescale it to 0–255 first."
    )


def _composite(arr: Any, what: str) -> Any:
    """RGB from RGBA over white; alpha in the image's own range."""
    if isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and (arr[..., 3] == 255).all():
        return arr[..., :3]
    _note(what, "has an alpha channel; composited over white (transparent = glass).")
    full = (
        255.0
        if arr.dtype == np.uint8
        else (float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0)
    )
    if arr.dtype.kind in "ui" and arr.dtype != np.uint8:
        full = max(1.0, float(_value_range(arr[..., 3])[1]))
    alpha = arr[..., 3:4].astype(np.float32) / np.float32(full)
    white = 255.0 if arr.dtype == np.uint8 else float(_value_range(arr[..., :3])[1] or 1.0)
    rgb = arr[..., :3].astype(np.float32) * alpha + np.float32(white) * (1.0 - alpha)
    if arr.dtype == np.uint8:
        return (rgb + 0.5).astype(np.uint8)
    return rgb.astype(arr.dtype) if arr.dtype.kind == "f" else (rgb + 0.5).astype(arr.dtype)


def _value_range(arr: Any) -> tuple[float, float]:
    """(min, max) of an array (NaN when it holds NaN); dask arrays are computed."""
    if not arr.size:
        return 0.0, 0.0
    lo, hi = arr.min(), arr.max()
    if hasattr(lo, "compute"):
        import dask

        lo, hi = dask.compute(lo, hi)
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# training calls
# ----------------------------------------------------------------------------------------------
def check_training_tables(
    slides: Sequence[Any],
    table_key: str,
    *,
    level: str,
    key_added: str | None = None,
    overwrite: bool = False,
) -> None:
    """Check every training table ``table_key`` present on ``slides`` (counts, duplicated genes and
    ids) and, with ``key_added``, that its run record ``uns[key_added]`` may be written."""
    from . import _sdata

    for i, s in enumerate(slides):
        if table_key not in s.tables:
            continue  # the missing table is reported by the caller, naming the step
        check_expression(s.tables[table_key], what=f"{table_key!r} table of slide {i}", level=level)
        if key_added is not None:
            _sdata.check_table_free(
                s, table_key, [("uns", key_added)], overwrite=overwrite, writer=_sdata.RECORD_WRITERS
            )


def check_test_ids(slides: Sequence[Any], test: Sequence[Any]) -> None:
    """Refuse held-out sample ids that match no slide (before any preparation is run)."""
    from . import _sdata

    ids = _sdata.sample_ids(slides)
    unknown = [str(t) for t in test if str(t) not in ids]
    if unknown:
        raise ValueError(
            f"Test sample(s) {unknown} are not among the slides' sample ids {ids}. Fix `test = [...]` in "
            "[params.holdout] (or the slides' `sample_id`) to name held-out slides."
        )
