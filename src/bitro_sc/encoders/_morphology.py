"""The default "morphology" encoder: a compact, documented, interpretable vector per cell."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .. import _keys as K
from ._tiles import iter_tiles, n_owning_tiles, read_labels, read_rgb

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

#: shape measures (from the cells table, or measured on the nucleus mask when a column is missing)
SHAPE_FEATURES = (
    "area_um2",
    "perimeter_um",
    "eccentricity",
    "solidity",
    "major_axis_um",
    "minor_axis_um",
)
#: accepted column names for each shape measure in the cells table (first match wins)
SHAPE_ALIASES: dict[str, tuple[str, ...]] = {
    "area_um2": (K.AREA_UM2,),
    "perimeter_um": ("perimeter_um",),
    "eccentricity": ("eccentricity",),
    "solidity": ("solidity",),
    "major_axis_um": ("major_axis_um", "axis_major_length_um", "major_axis_length_um"),
    "minor_axis_um": ("minor_axis_um", "axis_minor_length_um", "minor_axis_length_um"),
    "orientation": ("orientation", "orientation_rad"),
}
#: intensity, texture, context and density features, in output order after SHAPE_FEATURES
IMAGE_FEATURES = (
    "nuc_h_mean",  # haematoxylin optical density (OD) inside the nucleus: mean
    "nuc_h_std",  # ... and standard deviation
    "nuc_e_mean",  # eosin OD inside the nucleus: mean
    "nuc_e_std",
    "nuc_h_contrast",  # texture: mean |ΔH| between 4-connected neighbouring nucleus pixels
    "ring_h_mean",  # haematoxylin OD in a ring of `ring_um` around the nucleus (cytoplasm proxy)
    "ring_e_mean",  # eosin OD in the ring
    "ring_e_std",
    "fov_h_mean",  # haematoxylin OD over the square field of view (fov_um) centred on the cell
    "fov_h_std",
    "fov_e_mean",
    "fov_nuclear_fraction",  # fraction of the field of view covered by nuclei
    "density_per_mm2",  # cells (centroids) within `density_radius_um`, per mm²
)
FEATURE_NAMES = SHAPE_FEATURES + IMAGE_FEATURES


def _stain_luts(image: xr.DataArray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel lookup tables uint8 → haematoxylin / eosin optical density (OD).

    Without ``image``: Ruifrok-Johnston colour deconvolution (skimage's fixed matrix). With
    ``image``: the slide's own H&E vectors and 99th-percentile concentrations are estimated once
    (Macenko, :func:`bitro_sc.pp.estimate_stains` on a strided subsample), its concentrations are
    mapped to the reference stains, and the result is read with the same Ruifrok matrix, i.e. the
    features of the Macenko-normalised image (``bs.pp.normalize_stains``) without writing it.
    Both maps are linear in each channel's OD, hence per-channel tables.
    """
    from skimage.color import hed_from_rgb

    v = np.arange(256, dtype=np.float64)
    if image is None:
        od = -np.log10((v + 1.0) / 256.0)  # optical density of one channel value, 0 for white
        lut_h = (od[None, :] * hed_from_rgb[:, 0][:, None]).astype(np.float32)  # (3, 256)
        lut_e = (od[None, :] * hed_from_rgb[:, 1][:, None]).astype(np.float32)
        return lut_h, lut_e
    from ..pp._stains import (
        REFERENCE_MAX_CONC,
        REFERENCE_STAINS,
        _optical_density,
        estimate_stains,
        subsample_rgb,
    )

    try:
        stains, max_conc = estimate_stains(subsample_rgb(image, 2_000_000))
    except ValueError as err:
        raise ValueError(
            f"{err} To describe cells with the fixed Ruifrok-Johnston stain matrix instead, pass "
            "`encoder=bs.encoders.MorphologyEncoder(stains='fixed')`."
        ) from err
    to_conc = np.linalg.pinv(stains) * (REFERENCE_MAX_CONC / max_conc)[:, None]  # (2, 3): OD -> conc
    # normalised OD (natural log) = REFERENCE_STAINS @ conc; Ruifrok reads log10 OD
    coef = hed_from_rgb[:, :2].T @ REFERENCE_STAINS @ to_conc / np.log(10.0)  # (2 stains, 3 channels)
    od_ln = np.clip(_optical_density(v), 0.0, None)  # Macenko's OD (natural log); white glass 0
    lut_h = (coef[0][:, None] * od_ln[None, :]).astype(np.float32)
    lut_e = (coef[1][:, None] * od_ln[None, :]).astype(np.float32)
    return lut_h, lut_e


def paint_ellipses(
    shape: tuple[int, int],
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    values: np.ndarray,
) -> np.ndarray:
    """Rasterise filled ellipses (semi-axes ``a`` ≥ ``b`` in px, orientation as skimage) into labels.

    Where ellipses overlap, the one painted first keeps the pixel. Compiled with numba.
    """
    from ._kernels import paint_ellipses as kernel

    out = np.zeros(shape, dtype=np.int32)
    kernel(
        out,
        np.asarray(cy, dtype=np.float64),
        np.asarray(cx, dtype=np.float64),
        np.maximum(np.asarray(a, dtype=np.float64), 0.5),
        np.maximum(np.asarray(b, dtype=np.float64), 0.5),
        np.asarray(theta, dtype=np.float64),
        np.asarray(values, dtype=np.int32),
    )
    return out


def _corner_means(c: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray):
    """Box means from the integral image's values at the corners ``(y1,x1), (y0,x1), (y1,x0), (y0,x0)``
    (rows of ``c``), in the usual order of operations."""
    s = c[0] - c[1] - c[2] + c[3]
    return s / np.maximum((y1 - y0) * (x1 - x0), 1)


def _shape_column(cells: pd.DataFrame, feature: str) -> np.ndarray | None:
    for col in SHAPE_ALIASES[feature]:
        if col in cells.columns:
            return cells[col].to_numpy(dtype=np.float64)
    return None


@dataclass(frozen=True)
class MorphologyEncoder:
    """Classical, interpretable nucleus and context features (the default encoder, ``"morphology"``).

    Per cell (names in :data:`FEATURE_NAMES`, units in the names; optical density = OD):

    - **shape** of the nucleus: area (µm²), perimeter (µm), eccentricity, solidity, major and minor
      axis (µm) — taken from the cells table (written by ``bs.tl.segment``); a column that is missing
      is measured on the label image (``skimage.measure.regionprops``) when there is one;
    - **stain intensities** after colour deconvolution (Ruifrok-Johnston, skimage's matrix):
      haematoxylin and eosin OD mean / std inside the nucleus, and in a ring of ``ring_um`` µm around
      it (non-nucleus pixels inside the nucleus' ellipse enlarged by ``ring_um`` on both semi-axes;
      a pixel between two close nuclei counts for both rings);
    - **texture**: mean absolute haematoxylin difference between neighbouring nucleus pixels;
    - **context** in the square field of view of ``fov_um`` µm centred on the cell: haematoxylin
      mean / std, eosin mean, fraction of the view covered by nuclei (at the slide border, over the
      part of the view inside the image);
    - **density**: cell centroids within ``density_radius_um`` µm (itself included), per mm².

    Nucleus pixels come from the label image (``cell_labels``) when the slide has one. Otherwise
    (whole slides) each nucleus is approximated by the ellipse of its table shape measures (major /
    minor axis and orientation), or by the disc of its area when the axes are missing.

    ``stains="macenko"`` (default) reads the stain intensities in each slide's own H&E colours
    (estimated once per slide, Macenko) mapped to a reference, so that slides stained or scanned
    differently give comparable features; ``"fixed"`` uses the fixed Ruifrok-Johnston matrix for
    every slide. Measured on synthetic slides with slide-to-slide stain variation
    (``benchmarks/results/accuracy.md``): a classifier trained on 3 slides types the cells of the
    4th at 0.905-0.924 accuracy with ``"macenko"``, 0.825-0.933 with ``"fixed"``.

    The slide is processed in tiles of ``tile_um`` µm (plus a margin), so memory is bounded by a
    tile; per-pixel work is one numba pass per tile (stain lookup tables, per-nucleus sums, integral
    images for the field-of-view statistics) plus one pass over each cell's ring.
    """

    ring_um: float = 3.0
    density_radius_um: float = 50.0
    max_nucleus_um: float = 30.0
    tile_um: float = 1024.0
    stains: Literal["macenko", "fixed"] = "macenko"
    name: str = "morphology"

    def encode(
        self,
        image: xr.DataArray,
        cells: pd.DataFrame,
        *,
        mpp: float,
        fov_um: float,
        labels: xr.DataArray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[str]]:
        from scipy.spatial import cKDTree
        from tqdm.auto import tqdm

        for p in ("ring_um", "density_radius_um", "max_nucleus_um", "tile_um"):
            if not getattr(self, p) > 0:
                raise ValueError(f"MorphologyEncoder `{p}` must be positive (µm), got {getattr(self, p)!r}.")
        if self.stains not in ("macenko", "fixed"):
            raise ValueError(f"MorphologyEncoder `stains` must be 'macenko' or 'fixed', got {self.stains!r}.")
        n = len(cells)
        out = np.full((n, len(FEATURE_NAMES)), np.nan, dtype=np.float32)
        if n == 0:
            return out, list(FEATURE_NAMES)
        x_px = cells[K.X_PX].to_numpy(dtype=np.float64)
        y_px = cells[K.Y_PX].to_numpy(dtype=np.float64)

        # shape from the table; missing columns measured on the labels (or the ellipse fallback)
        missing = []
        for j, f in enumerate(SHAPE_FEATURES):
            col = _shape_column(cells, f)
            if col is None:
                missing.append(f)
            else:
                out[:, j] = col
        area_px = _shape_column(cells, "area_um2")
        if area_px is None:
            raise ValueError(
                f"The cells table has no {K.AREA_UM2!r} column; run `bs.tl.segment` to make a cells table "
                "that follows the data contract."
            )
        area_px = area_px / mpp**2
        major = _shape_column(cells, "major_axis_um")
        minor = _shape_column(cells, "minor_axis_um")
        theta = _shape_column(cells, "orientation")
        if major is not None and minor is not None:
            semi_a, semi_b = major / (2 * mpp), minor / (2 * mpp)
        else:
            semi_a = semi_b = np.sqrt(area_px / np.pi)
        if theta is None:
            theta = np.zeros(n)
        if labels is None and missing:
            warnings.warn(
                f"The cells table lacks {missing} and the slide has no label image; these features are "
                "taken from the ellipse/disc approximation of each nucleus.",
                UserWarning,
                stacklevel=3,
            )

        # local density (global, not per tile)
        xy_um = np.column_stack([x_px, y_px]) * mpp
        counts = cKDTree(xy_um).query_ball_point(xy_um, r=self.density_radius_um, return_length=True)
        out[:, FEATURE_NAMES.index("density_per_mm2")] = counts / (np.pi * self.density_radius_um**2) * 1e6

        lut_h, lut_e = _stain_luts(image if self.stains == "macenko" else None)
        half_fov = fov_um / 2 / mpp
        ring_px = self.ring_um / mpp
        max_r = self.max_nucleus_um / 2 / mpp
        margin = math.ceil(max(half_fov, max_r + ring_px)) + 2
        tile_px = max(round(self.tile_um / mpp), 64)
        shape_yx = (int(image.sizes["y"]), int(image.sizes["x"]))
        cell_ids = cells[K.CELL_ID].to_numpy() if K.CELL_ID in cells.columns else cells.index.to_numpy()
        n_tiles = n_owning_tiles(shape_yx, x_px, y_px, tile_px=tile_px)
        img_cols = [FEATURE_NAMES.index(f) for f in IMAGE_FEATURES[:-1]]
        shape_cols = [FEATURE_NAMES.index(f) for f in missing]

        by_y = np.argsort(y_px, kind="stable")
        y_sorted = y_px[by_y]
        tiles = iter_tiles(shape_yx, x_px, y_px, tile_px=tile_px, margin_px=margin)
        for tile in tqdm(tiles, total=n_tiles, desc="morphology features", disable=not progress):
            rgb = read_rgb(image, tile)
            # cells whose nucleus may reach into the window: a band of rows, then columns
            band = by_y[
                np.searchsorted(y_sorted, tile.y0 - max_r) : np.searchsorted(y_sorted, tile.y1 + max_r)
            ]
            xb = x_px[band]
            cand = np.sort(band[(xb >= tile.x0 - max_r) & (xb < tile.x1 + max_r)])
            if labels is not None:
                raw = read_labels(labels, tile)
                ids = cell_ids[cand]
                srt = np.argsort(ids, kind="stable")
                sorted_ids = ids[srt]
                pos = np.clip(np.searchsorted(sorted_ids, raw), 0, len(sorted_ids) - 1)
                lab = np.where((sorted_ids[pos] == raw) & (raw != 0), srt[pos] + 1, 0).astype(np.int32)
            else:
                lab = paint_ellipses(
                    rgb.shape[:2],
                    y_px[cand] - tile.y0,
                    x_px[cand] - tile.x0,
                    semi_a[cand],
                    semi_b[cand],
                    theta[cand],
                    np.arange(1, len(cand) + 1),
                )
            owned = np.searchsorted(cand, tile.cells) + 1  # local label of each owned cell
            o = tile.cells
            feats = _tile_features(
                rgb,
                lab,
                owned,
                np.column_stack([y_px[o] - tile.y0, x_px[o] - tile.x0, semi_a[o], semi_b[o], theta[o]]),
                half_fov=half_fov,
                ring_px=ring_px,
                lut_h=lut_h,
                lut_e=lut_e,
            )
            out[np.ix_(tile.cells, img_cols)] = feats
            if shape_cols:
                out[np.ix_(tile.cells, shape_cols)] = _measure_shapes(lab, owned, missing, mpp)
        return out, list(FEATURE_NAMES)


def _tile_features(
    rgb: np.ndarray,
    lab: np.ndarray,
    owned: np.ndarray,
    ellipses: np.ndarray,
    *,
    half_fov: float,
    ring_px: float,
    lut_h: np.ndarray,
    lut_e: np.ndarray,
) -> np.ndarray:
    """Image features (IMAGE_FEATURES without density) of the owned cells of one tile.

    ``ellipses`` holds per owned cell ``(cy, cx, a, b, theta)`` in tile pixels.
    """
    from ._kernels import pixel_pass_boxes, ring_pass

    m = int(lab.max()) + 1
    ih, iw = lab.shape
    nuc = np.zeros((m, 5), dtype=np.float64)
    con = np.zeros((m, 2), dtype=np.float64)
    cy, cx = ellipses[:, 0], ellipses[:, 1]
    # field of view: box sums from the integral images, of which only the 4 corners per cell are kept
    y0 = np.clip(np.round(cy - half_fov).astype(np.int64), 0, ih)
    y1 = np.clip(np.round(cy + half_fov).astype(np.int64) + 1, 0, ih)
    x0 = np.clip(np.round(cx - half_fov).astype(np.int64), 0, iw)
    x1 = np.clip(np.round(cx + half_fov).astype(np.int64) + 1, 0, iw)
    n_own = len(owned)
    q_row = np.concatenate([y1, y0, y1, y0])  # corner order of _box_means: (y1,x1) (y0,x1) (y1,x0) (y0,x0)
    q_col = np.concatenate([x1, x1, x0, x0])
    order = np.argsort(q_row, kind="stable")
    q_start = np.searchsorted(q_row[order], np.arange(ih + 2)).astype(np.int64)
    corners = np.zeros((4, 4 * n_own), dtype=np.float64)
    pixel_pass_boxes(rgb, lab, lut_h, lut_e, m, nuc, con, q_start, q_col[order], order, corners)
    cy, cx, a, b, theta = (np.ascontiguousarray(c) for c in ellipses.T)
    ring = np.zeros((len(owned), 4), dtype=np.float64)
    ring_pass(
        rgb, lab, lut_h, lut_e, cy, cx, np.maximum(a, 0.5), np.maximum(b, 0.5), theta, float(ring_px), ring
    )

    with np.errstate(invalid="ignore", divide="ignore"):
        n, s = nuc[owned], con[owned]
        h_mean = n[:, 1] / n[:, 0]
        h_std = np.sqrt(np.maximum(n[:, 2] / n[:, 0] - h_mean**2, 0))
        e_mean = n[:, 3] / n[:, 0]
        e_std = np.sqrt(np.maximum(n[:, 4] / n[:, 0] - e_mean**2, 0))
        contrast = s[:, 0] / s[:, 1]
        r_h = ring[:, 1] / ring[:, 0]
        r_e = ring[:, 2] / ring[:, 0]
        r_e_std = np.sqrt(np.maximum(ring[:, 3] / ring[:, 0] - r_e**2, 0))

    fov_h, fov_h2, fov_e, fov_nuc = (
        _corner_means(corners[k].reshape(4, n_own), y0, y1, x0, x1) for k in range(4)
    )
    fov_h_std = np.sqrt(np.maximum(fov_h2 - fov_h**2, 0))
    cols = [h_mean, h_std, e_mean, e_std, contrast, r_h, r_e, r_e_std, fov_h, fov_h_std, fov_e, fov_nuc]
    return np.column_stack(cols).astype(np.float32)


def _measure_shapes(lab: np.ndarray, owned: np.ndarray, features: list[str], mpp: float) -> np.ndarray:
    """Shape measures of the owned labels (µm) with skimage's regionprops (fallback path)."""
    import pandas as pd
    from skimage.measure import regionprops_table

    props = {
        "area_um2": ("area", mpp**2),
        "perimeter_um": ("perimeter", mpp),
        "eccentricity": ("eccentricity", 1.0),
        "solidity": ("solidity", 1.0),
        "major_axis_um": ("axis_major_length", mpp),
        "minor_axis_um": ("axis_minor_length", mpp),
    }
    keep = np.isin(lab, owned)
    table = pd.DataFrame(
        regionprops_table(np.where(keep, lab, 0), properties=["label"] + [props[f][0] for f in features])
    ).set_index("label")
    table = table.reindex(owned)
    return np.column_stack([table[props[f][0]].to_numpy() * props[f][1] for f in features]).astype(np.float32)
