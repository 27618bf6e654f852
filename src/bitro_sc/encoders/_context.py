"""Tissue context: statistics of each cell's neighbourhood at the scale of a spot (≈100-200 µm)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K
from ._tiles import iter_tiles, n_owning_tiles, read_rgb

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

#: per-pixel channels averaged over each window (after pooling the tile to ``pixel_um``)
PIXEL_STATS = (
    "h_mean",  # haematoxylin optical density (OD)
    "h_std",
    "e_mean",  # eosin OD
    "e_std",
    "od_mean",  # total OD of the three RGB channels (darkness)
    "tissue_frac",  # fraction of pixels with total OD above `tissue_od` (not glass)
    "hema_frac",  # fraction of pixels whose H OD exceeds their E OD (nuclei-rich)
    "h_grad",  # texture: mean |∇H| between neighbouring pooled pixels (OD per pixel_um)
    "r_mean",  # mean R, G, B in [0, 1]
    "g_mean",
    "b_mean",
)
#: statistics of the cells (centroids) in each window, from the cells table
CELL_STATS = (
    "density_per_mm2",  # cell centroids per mm² of the window
    "nuc_area_mean_um2",  # mean nucleus area of the cells in the window
    "nuc_area_std_um2",
)


def feature_names(scales_um: tuple[float, ...]) -> list[str]:
    """``ctx{scale}_{stat}`` for every scale (µm, rounded) and statistic."""
    return [f"ctx{round(s)}_{f}" for s in scales_um for f in PIXEL_STATS + CELL_STATS]


def _box_sums(integral: np.ndarray, y0, y1, x0, x1) -> np.ndarray:
    return integral[..., y1, x1] - integral[..., y0, x1] - integral[..., y1, x0] + integral[..., y0, x0]


def _integral(a: np.ndarray) -> np.ndarray:
    """Integral images of ``(k, h, w)`` channels, shape ``(k, h + 1, w + 1)``, float64."""
    out = np.zeros((a.shape[0], a.shape[1] + 1, a.shape[2] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(a, axis=1, dtype=np.float64), axis=2, out=out[:, 1:, 1:])
    return out


@dataclass(frozen=True)
class ContextEncoder:
    """Each cell's tissue neighbourhood at the scale of a spot (``"context"`` in ``cell_features``).

    For every scale ``s`` in ``scales_um`` the square window of ``s`` µm centred on the cell is
    described by (names ``ctx{s}_<stat>``, in :func:`feature_names` order):

    - **colour / stain** statistics: haematoxylin and eosin OD mean and standard deviation, total
      OD, mean R, G, B (stain intensities read as by :class:`MorphologyEncoder`, ``stains=``);
    - **composition**: fraction of tissue (total OD above ``tissue_od``) and of haematoxylin-dominated
      pixels (nuclei-rich);
    - **texture**: mean haematoxylin gradient magnitude;
    - **cells**: density of cell centroids (per mm²) and mean / sd of their nucleus area, from the
      cells table.

    The image is average-pooled to about ``pixel_um`` µm per pixel first, so the cost is a few
    vectorised passes over a small image (integral images give every window in O(1)); memory is
    bounded by one tile of ``tile_um`` µm plus the largest window. ``fov_um`` of
    ``bs.tl.cell_features`` is not used (the scales are this encoder's own).

    Combine it with the nucleus features: ``encoder="morphology+context"`` (see
    :class:`CombinedEncoder`).
    """

    scales_um: tuple[float, ...] = (64.0, 160.0)
    pixel_um: float = 2.0
    tissue_od: float = 0.2
    tile_um: float = 2048.0
    stains: Literal["macenko", "fixed"] = "macenko"
    name: str = "context"

    @property
    def params(self) -> dict[str, Any]:
        """The encoder's settings (JSON-serialisable)."""
        d = asdict(self)
        d["scales_um"] = [float(s) for s in self.scales_um]
        return d

    def _check(self) -> None:
        if not self.scales_um or min(float(s) for s in self.scales_um) <= 0:
            raise ValueError(
                f"ContextEncoder `scales_um` must be positive sizes in µm, got {self.scales_um!r}."
            )
        for p in ("pixel_um", "tile_um", "tissue_od"):
            if not getattr(self, p) > 0:
                raise ValueError(f"ContextEncoder `{p}` must be positive, got {getattr(self, p)!r}.")
        if self.stains not in ("macenko", "fixed"):
            raise ValueError(f"ContextEncoder `stains` must be 'macenko' or 'fixed', got {self.stains!r}.")

    def encode(
        self,
        image: xr.DataArray,
        cells: pd.DataFrame,
        *,
        mpp: float,
        fov_um: float = 0.0,
        labels: xr.DataArray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[str]]:
        from tqdm.auto import tqdm

        from ._morphology import _stain_luts

        self._check()
        names = feature_names(self.scales_um)
        n = len(cells)
        out = np.full((n, len(names)), np.nan, dtype=np.float32)
        if n == 0:
            return out, names
        x_px = cells[K.X_PX].to_numpy(dtype=np.float64)
        y_px = cells[K.Y_PX].to_numpy(dtype=np.float64)
        area = cells[K.AREA_UM2].to_numpy(dtype=np.float64) if K.AREA_UM2 in cells else np.full(n, np.nan)
        n_pix, n_cell = len(PIXEL_STATS), len(CELL_STATS)
        per = n_pix + n_cell
        pix_cols = [k * per + j for k in range(len(self.scales_um)) for j in range(n_pix)]
        cell_cols = [k * per + n_pix + j for k in range(len(self.scales_um)) for j in range(n_cell)]
        out[:, cell_cols] = self._cell_stats(x_px * mpp, y_px * mpp, area)

        lut_h, lut_e = _stain_luts(image if self.stains == "macenko" else None)
        od = -np.log10((np.arange(256) + 1.0) / 256.0)
        pool = max(round(self.pixel_um / mpp), 1)
        half = [s / 2 / mpp for s in self.scales_um]  # full-resolution pixels
        margin = math.ceil(max(half)) + 2 * pool
        tile_px = max(round(self.tile_um / mpp / pool) * pool, 64 * pool)
        shape_yx = (int(image.sizes["y"]), int(image.sizes["x"]))
        tiles = iter_tiles(shape_yx, x_px, y_px, tile_px=tile_px, margin_px=margin)
        n_tiles = n_owning_tiles(shape_yx, x_px, y_px, tile_px=tile_px)
        for tile in tqdm(tiles, total=n_tiles, desc="context features", disable=not progress):
            rgb = read_rgb(image, tile)
            chans = self._pixel_channels(rgb, pool, lut_h, lut_e, od)  # (k, hp, wp)
            integ = _integral(chans)
            hp, wp = chans.shape[1:]
            o = tile.cells
            cy = (y_px[o] - tile.y0) / pool  # in pooled pixels, pixel i covers [i, i + 1)
            cx = (x_px[o] - tile.x0) / pool
            feats = []
            for h in half:
                r = h / pool
                y0 = np.clip(np.round(cy - r).astype(np.int64), 0, hp)
                y1 = np.clip(np.round(cy + r).astype(np.int64), 0, hp)
                x0 = np.clip(np.round(cx - r).astype(np.int64), 0, wp)
                x1 = np.clip(np.round(cx + r).astype(np.int64), 0, wp)
                area_px = np.maximum((y1 - y0) * (x1 - x0), 1)
                m = _box_sums(integ, y0, y1, x0, x1) / area_px  # (k, n_owned)
                h_mean, h_sq, e_mean, e_sq, od_mean, tissue, hema, grad, r_, g_, b_ = m
                feats.append(
                    np.column_stack(
                        [
                            h_mean,
                            np.sqrt(np.maximum(h_sq - h_mean**2, 0)),
                            e_mean,
                            np.sqrt(np.maximum(e_sq - e_mean**2, 0)),
                            od_mean,
                            tissue,
                            hema,
                            grad,
                            r_,
                            g_,
                            b_,
                        ]
                    )
                )
            out[np.ix_(o, pix_cols)] = np.hstack(feats)
        return out, names

    def _pixel_channels(self, rgb, pool, lut_h, lut_e, od) -> np.ndarray:
        """Per pooled pixel: H, H², E, E², total OD, tissue, H-dominated, |∇H|, R, G, B (float32)."""
        h_full = lut_h[0][rgb[..., 0]] + lut_h[1][rgb[..., 1]] + lut_h[2][rgb[..., 2]]
        e_full = lut_e[0][rgb[..., 0]] + lut_e[1][rgb[..., 1]] + lut_e[2][rgb[..., 2]]
        od_full = (od[rgb[..., 0]] + od[rgb[..., 1]] + od[rgb[..., 2]]).astype(np.float32)
        chans = [
            h_full,
            h_full * h_full,
            e_full,
            e_full * e_full,
            od_full,
            (od_full > self.tissue_od).astype(np.float32),
            (h_full > e_full).astype(np.float32),
            *(rgb[..., c].astype(np.float32) / 255.0 for c in range(3)),
        ]
        pooled = [_avg_pool(c, pool) for c in chans]
        hp = pooled[0]
        gy = np.zeros_like(hp)
        gx = np.zeros_like(hp)
        gy[1:-1] = (hp[2:] - hp[:-2]) / 2
        gx[:, 1:-1] = (hp[:, 2:] - hp[:, :-2]) / 2
        grad = np.sqrt(gy * gy + gx * gx)
        return np.stack([*pooled[:7], grad, *pooled[7:]]).astype(np.float32)

    def _cell_stats(self, x_um: np.ndarray, y_um: np.ndarray, area: np.ndarray) -> np.ndarray:
        """Density and nucleus-area statistics of the cells in each window (a 4 µm grid)."""
        b = 4.0
        gx = np.floor((x_um - x_um.min()) / b).astype(np.int64)
        gy = np.floor((y_um - y_um.min()) / b).astype(np.int64)
        h, w = int(gy.max()) + 1, int(gx.max()) + 1
        ok = np.isfinite(area)
        grids = np.zeros((4, h, w), dtype=np.float64)
        np.add.at(grids[0], (gy, gx), 1.0)
        np.add.at(grids[1], (gy[ok], gx[ok]), 1.0)
        np.add.at(grids[2], (gy[ok], gx[ok]), area[ok])
        np.add.at(grids[3], (gy[ok], gx[ok]), area[ok] ** 2)
        integ = _integral(grids)
        cy = (y_um - y_um.min()) / b
        cx = (x_um - x_um.min()) / b
        cols = []
        for s in self.scales_um:
            r = s / 2 / b
            y0 = np.clip(np.round(cy - r).astype(np.int64), 0, h)
            y1 = np.clip(np.round(cy + r).astype(np.int64), 0, h)
            x0 = np.clip(np.round(cx - r).astype(np.int64), 0, w)
            x1 = np.clip(np.round(cx + r).astype(np.int64), 0, w)
            count, n_area, s1, s2 = _box_sums(integ, y0, y1, x0, x1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = s1 / n_area
                sd = np.sqrt(np.maximum(s2 / n_area - mean**2, 0))
            cols += [count / (float(s) ** 2) * 1e6, mean, sd]
        return np.column_stack(cols).astype(np.float32)


def _avg_pool(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k``×``k`` blocks (partial blocks at the edges averaged over their pixels)."""
    if k == 1:
        return a.astype(np.float32)
    h, w = a.shape
    hp, wp = -(-h // k), -(-w // k)
    pad = np.zeros((hp * k, wp * k), dtype=np.float32)
    pad[:h, :w] = a
    cnt = np.zeros((hp * k, wp * k), dtype=np.float32)
    cnt[:h, :w] = 1
    s = pad.reshape(hp, k, wp, k).sum(axis=(1, 3))
    c = cnt.reshape(hp, k, wp, k).sum(axis=(1, 3))
    return s / c
