"""Legacy spatial transcriptomics (ST, 100 µm spots on a 200 µm grid), HER2ST layout."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._validate import check_mpp, check_um
from ._common import (
    check_file,
    gene_names,
    integer_counts,
    rgb_uint8,
    spot_sdata,
    strip_suffixes,
)
from ._wsi import read_image_file

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: centre-to-centre distance of neighbouring ST array positions (µm)
ST_PITCH_UM = 200.0
_POSITION = re.compile(r"^\s*(-?\d+)\s*x\s*(-?\d+)\s*$")


def read_st(
    image: str | Path | np.ndarray,
    counts: str | Path | pd.DataFrame,
    spots: str | Path | pd.DataFrame,
    *,
    mpp: float | None = None,
    spot_diameter_um: float = 100.0,
    array_pitch_um: float = ST_PITCH_UM,
    sample_id: str | None = None,
    patient_id: str | None = None,
) -> SpatialData:
    """Read a legacy ST section (HER2ST layout) into SpatialData.

    Parameters
    ----------
    image
        H&E image file (JPEG/PNG/TIFF) or a (y, x, 3) array; the pixels ``spots`` refers to.
    counts
        Spots × genes table (TSV/CSV, optionally gzipped, or a DataFrame) of raw integer counts,
        indexed by array position ``"XxY"`` (e.g. ``"10x21"``), genes as columns.
    spots
        Spot table (TSV/CSV or DataFrame) with columns ``x``, ``y`` (array position), ``pixel_x``,
        ``pixel_y`` (spot centre in image pixels) and optionally ``selected`` (1 = under tissue).
    mpp
        µm per image pixel. ``None`` estimates it from the array pitch: a least-squares similarity
        fit (scale, rotation, shift) of ``pixel_x, pixel_y`` against ``x, y`` over all spots of
        ``spots``; the source string records the number of spots and the RMS residual.
    spot_diameter_um
        Physical spot diameter (µm); the ``"spots"`` circles get radius ``spot_diameter_um / 2 / mpp`` px.
    array_pitch_um
        Distance between neighbouring array positions (µm), used when estimating ``mpp``.
    sample_id, patient_id
        Slide identity; ``sample_id`` defaults to the counts file name without ``_counts`` and extensions.

    Returns
    -------
    SpatialData with image ``"he"``, shapes ``"spots"`` and table ``"table"`` (layout in
    CONTRIBUTING.md). Only spots with ``selected == 1`` that have counts are kept, joined by array
    position; ``obs_names`` are ``"XxY"``, ``obs["array_col"]`` is ``x``, ``obs["array_row"]`` is ``y``.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        Counts and spots share no array positions, or fewer than half of the selected spots have
        counts (fewer but most: a warning names the dropped spots); spot coordinates lie outside the image;
        counts are not non-negative integers; ``spots`` lacks a column; ``mpp`` cannot be estimated.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.io.read_st(  # a HER2ST section on disk  # doctest: +SKIP
    ...     "her2st/C2_HE.jpg", "her2st/C2_counts.tsv.gz", "her2st/C2_selection.tsv", patient_id="C"
    ... )

    The same from in-memory inputs (a 4 × 3 array, 20 px pitch, so 10 µm/px for a 200 µm pitch):

    >>> import numpy as np
    >>> import pandas as pd
    >>> grid = [(x, y) for x in range(1, 5) for y in range(1, 4)]
    >>> spots = pd.DataFrame(
    ...     [
    ...         {"x": x, "y": y, "pixel_x": 20.0 * x + 5, "pixel_y": 20.0 * y + 7, "selected": 1}
    ...         for x, y in grid
    ...     ]
    ... )
    >>> counts = pd.DataFrame(
    ...     np.random.default_rng(0).poisson(2.0, size=(12, 5)),
    ...     index=[f"{x}x{y}" for x, y in grid],
    ...     columns=["A", "B", "C", "D", "E"],
    ... )
    >>> image = np.full((120, 110, 3), 200, np.uint8)
    >>> sdata = bs.io.read_st(image, counts, spots, sample_id="S1")
    >>> sdata.tables["table"].n_obs, bs.get_mpp(sdata, "he")
    (12, 10.0)
    >>> bs._sdata.mpp_source(sdata, "he")
    'estimated from array pitch (200 µm), fit over 12 spots (RMS residual 0.0 µm)'
    """
    counts_df, counts_name = _read_counts(counts)
    spots_df = _read_spots(spots)
    if sample_id is None:
        sample_id = re.sub(r"[_\-.]?(counts?|stdata)$", "", strip_suffixes(counts_name), flags=re.I) or "st"
    spot_diameter_um = check_um(spot_diameter_um, "spot_diameter_um")
    array_pitch_um = check_um(array_pitch_um, "array_pitch_um")
    if mpp is not None:
        mpp = check_mpp(mpp)

    # join by array position
    pos = _parse_positions(counts_df.index)
    counts_df.index = pd.Index([f"{x}x{y}" for x, y in pos], name=None)
    if not counts_df.index.is_unique:
        dup = counts_df.index[counts_df.index.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"The counts table lists array positions more than once: {dup}. Each spot must be one row: "
            "drop or sum the duplicated rows."
        )
    sel = spots_df
    if "selected" in spots_df.columns:
        sel = spots_df[spots_df["selected"].astype(float) == 1]
    sel_names = pd.Index([f"{x}x{y}" for x, y in zip(sel["x"], sel["y"], strict=True)])
    shared = sel_names.isin(counts_df.index)
    n_shared = int(shared.sum())
    if n_shared == 0 or n_shared < 0.5 * len(sel_names):
        raise ValueError(
            f"Counts and spots do not match: only {n_shared} of {len(sel_names)} selected spots have an "
            f"array position ('XxY') in the counts table (counts e.g. {counts_df.index[:3].tolist()}, spots "
            f"e.g. {sel_names[:3].tolist()}). Check that both files belong to the same section."
        )
    if n_shared < len(sel_names):
        warnings.warn(
            f"{len(sel_names) - n_shared} selected spots have no counts and are dropped "
            f"(e.g. {sel_names[~shared][:3].tolist()}).",
            UserWarning,
            stacklevel=2,
        )
    sel = sel[np.asarray(shared)]
    names = sel_names[np.asarray(shared)]
    genes = gene_names(counts_df.columns)
    values = counts_df.loc[names]
    non_numeric = [c for c, t in values.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        raise ValueError(
            f"The counts table has non-numeric values in column(s) {non_numeric[:5]}; raw integer counts "
            "are needed."
        )
    x = integer_counts(values.to_numpy(), what="ST counts", names=list(names))

    # pixel size
    if mpp is None:
        mpp, n_fit, rms_um = estimate_mpp_from_grid(spots_df, pitch_um=array_pitch_um)
        mpp = check_mpp(mpp, name="pixel size estimated from the spot grid")
        source = (
            f"estimated from array pitch ({array_pitch_um:g} µm), fit over {n_fit} spots "
            f"(RMS residual {rms_um:.1f} µm)"
        )
    else:
        mpp = check_mpp(mpp)
        source = "user"
    img = _read_rgb(image)
    xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    return spot_sdata(
        image_yxc=img,
        counts=x,
        barcodes=list(names),
        genes=genes,
        xy_px=xy,
        radius_px=spot_diameter_um / 2.0 / float(mpp),
        mpp=float(mpp),
        mpp_source=source,
        sample_id=str(sample_id),
        patient_id=patient_id,
        array_row=sel["y"].to_numpy(),
        array_col=sel["x"].to_numpy(),
    )


def estimate_mpp_from_grid(spots: pd.DataFrame, *, pitch_um: float = ST_PITCH_UM) -> tuple[float, int, float]:
    """µm/px from array positions and pixel centres: ``(mpp, n_spots, rms_residual_um)``.

    Fits ``pixel = s · R(θ) · array + t`` (similarity transform) by least squares over all rows with
    finite coordinates; ``mpp = pitch_um / s``.
    """
    d = spots[["x", "y", "pixel_x", "pixel_y"]].astype(float)
    d = d[np.isfinite(d.to_numpy()).all(axis=1)]
    n = len(d)
    ax, ay = d["x"].to_numpy(), d["y"].to_numpy()
    if n < 3 or (np.ptp(ax) == 0 and np.ptp(ay) == 0):
        raise ValueError(
            f"Cannot estimate the pixel size from {n} spot(s) at distinct array positions; pass `mpp=`."
        )
    ones, zeros = np.ones(n), np.zeros(n)
    # unknowns (a, b, tx, ty): px = a·x − b·y + tx ; py = b·x + a·y + ty
    design = np.vstack([np.c_[ax, -ay, ones, zeros], np.c_[ay, ax, zeros, ones]])
    target = np.r_[d["pixel_x"].to_numpy(), d["pixel_y"].to_numpy()]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    scale_px = float(np.hypot(coef[0], coef[1]))  # pixels per array step
    if not scale_px > 0:
        raise ValueError("The spot pixel coordinates do not vary with array position; pass `mpp=`.")
    mpp = pitch_um / scale_px
    resid = target - design @ coef
    rms_px = float(np.sqrt(np.mean(resid[:n] ** 2 + resid[n:] ** 2)))
    return float(mpp), n, rms_px * mpp


def _read_counts(counts: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if isinstance(counts, pd.DataFrame):
        return counts.copy(), "st"
    p = check_file(counts, what="ST counts")
    sep = "," if ".csv" in p.name.lower() else "\t"
    df = pd.read_csv(p, sep=sep, index_col=0)
    # pandas renames duplicated headers ("A", "A.1"); restore them so that duplicates are summed
    header = pd.read_csv(p, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
    if len(header) == df.shape[1] + 1:
        df.columns = [str(c) for c in header.iloc[1:]]
    if df.shape[1] == 0:
        raise ValueError(f"The counts file {str(p)!r} has no gene columns; is it {sep!r}-separated?")
    return df, p.name


def _read_spots(spots: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(spots, pd.DataFrame):
        df = spots.copy()
        where = "The spots table"
    else:
        p = check_file(spots, what="ST spot (selection)")
        df = pd.read_csv(p, sep="," if ".csv" in p.name.lower() else "\t")
        where = f"The spots file {str(p)!r}"
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {missing}; it has {list(df.columns)}. Expected the ST spot detector "
            "output with array position `x`, `y` and image position `pixel_x`, `pixel_y`."
        )
    for c in ("x", "y"):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any() or (v != np.round(v)).any():
            raise ValueError(f"{where}: column {c!r} must hold integer array positions.")
        df[c] = v.astype(np.int64)
    return df


def _parse_positions(index: pd.Index) -> list[tuple[int, int]]:
    out = []
    for name in index:
        m = _POSITION.match(str(name))
        if m is None:
            raise ValueError(
                f"Counts row {name!r} is not an array position 'XxY' (e.g. '10x21'). The counts table must "
                "be indexed by array position in its first column."
            )
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _read_rgb(image: str | Path | np.ndarray | Any) -> Any:
    if isinstance(image, str | Path):
        p = check_file(image, what="H&E image")
        return read_image_file(p)
    return rgb_uint8(image, what="H&E image")
