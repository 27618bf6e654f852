"""Default segmenter: haematoxylin colour deconvolution + threshold + distance-transform watershed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: optical-density to stain matrix of Ruifrok & Johnston (as ``skimage.color.hed_from_rgb``);
#: column 0 projects optical density onto haematoxylin
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def _stain_luts() -> tuple[np.ndarray, np.ndarray]:
    """(3, 256) float32 tables: haematoxylin and eosin contributions of each channel value."""
    rgb_from_hed = _RGB_FROM_HED.copy()
    rgb_from_hed[2] = np.cross(rgb_from_hed[0], rgb_from_hed[1])
    rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
    hed_from_rgb = np.linalg.inv(rgb_from_hed)
    od = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)  # optical density per value
    h = (od[None, :] * hed_from_rgb[:, 0][:, None]).astype(np.float32)
    e = (od[None, :] * hed_from_rgb[:, 1][:, None]).astype(np.float32)
    return h, e


_H_LUT, _E_LUT = _stain_luts()


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an ``(y, x, 3)`` uint8 RGB image, float32 (≈0 on glass)."""
    if rgb.dtype != np.uint8:
        raise TypeError(f"Expected a uint8 RGB tile, got {rgb.dtype}.")
    out = _H_LUT[0][rgb[..., 0]]
    out += _H_LUT[1][rgb[..., 1]]
    out += _H_LUT[2][rgb[..., 2]]
    return out


@dataclass
class HaematoxylinWatershed:
    """Nuclei from the haematoxylin channel, split by a distance-transform watershed.

    Steps, all sizes in µm and converted with the pixel size so that the result does not depend
    on the scan resolution: haematoxylin optical density by colour deconvolution (Ruifrok &
    Johnston, as ``skimage.color.rgb2hed``, through lookup tables) minus ``eosin_weight`` times
    eosin, binned to about ``work_mpp``;
    Gaussian smoothing (``sigma_um``); a threshold (``threshold``, or Otsu over tissue fitted once
    per slide by :meth:`calibrate`, so every tile uses the same rule), and above the local mean
    (``local_um``); holes under ``max_hole_um2`` filled;
    maxima of the distance transform at least ``peak_distance_um`` apart as markers; a watershed
    on the inverted distance inside the foreground; objects outside
    ``[min_area_um2, max_area_um2]`` dropped.

    Parameters
    ----------
    sigma_um
        Gaussian smoothing of the haematoxylin channel (µm).
    threshold
        Haematoxylin optical density above which a pixel is nucleus; ``None`` uses the value from
        :meth:`calibrate` (``segment`` calls it), or Otsu on the tile when never calibrated.
    threshold_scale
        Multiplies the Otsu threshold (< 1 finds paler nuclei).
    min_area_um2, max_area_um2
        Plausible nucleus areas (µm²).
    peak_distance_um
        Minimum distance between two nucleus centres (µm); smaller splits more.
    max_hole_um2
        Holes in the foreground up to this area are filled (µm²).
    eosin_weight
        The signal is haematoxylin minus this times eosin (optical densities); > 0 makes dense
        purple stroma (much eosin, some haematoxylin) less likely to be taken for nuclei.
    local_um, local_factor
        In crowded regions a pixel must also exceed ``local_factor`` times the mean
        haematoxylin over a ``local_um`` window, which separates packed nuclei (lymphocyte
        aggregates); ``None`` disables it.
    dist_sigma_um
        Gaussian smoothing of the distance transform before finding maxima (µm), so that an
        elongated nucleus has one maximum, not a ridge of them.
    work_mpp
        Pixel size (µm/px) to work at: a finer image is binned by the integer factor
        ``floor(work_mpp / mpp)`` (block means of the haematoxylin channel) and the labels are
        returned at full resolution (blocks). Nuclei (5-15 µm) are still resolved at 1.4 µm/px,
        and binning a 0.25 µm/px scan by 5 makes the work 25 times smaller. On HER2ST
        (0.69 µm/px) the default bins by 2: about 3 times faster than ``work_mpp=1.0`` (no
        binning) at a detection F1 lower by about 0.05 on synthetic slides
        (``benchmarks/results/segmentation.md``). ``None``: never bin.
    """

    sigma_um: float = 0.5
    threshold: float | None = None
    threshold_scale: float = 1.0
    min_area_um2: float = 20.0
    max_area_um2: float = 400.0
    peak_distance_um: float = 2.0
    max_hole_um2: float = 10.0
    dist_sigma_um: float = 0.75
    work_mpp: float | None = 1.4
    eosin_weight: float = 1.0
    local_um: float | None = 20.0
    local_factor: float = 1.0
    #: nuclei cannot be resolved on images coarser than this (µm/px)
    min_mpp: float = 2.0
    #: the largest nucleus diameter (µm); tiles overlap by at least this
    max_diameter_um: float = 25.0

    @property
    def context_um(self) -> float:
        """How far (µm) the result at a pixel depends on the image: the default tile overlap."""
        return self.max_diameter_um + 0.5 * (self.local_um or 0.0) + 3 * self.sigma_um + 2.0

    def bin_factor(self, mpp: float) -> int:
        """Integer binning factor at pixel size ``mpp`` (1 = none)."""
        if self.work_mpp is None or mpp <= 0:
            return 1
        return max(1, int(self.work_mpp / mpp + 1e-9))

    def tile_multiple(self, mpp: float) -> int:
        """Tile origins must be multiples of this (the binning grid is then the same for all tiles)."""
        return self.bin_factor(mpp)

    def _binned_h(self, rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, float, int]:
        from ._kernels import haematoxylin_binned

        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise TypeError(f"Expected a (y, x, 3) uint8 RGB tile, got {rgb.dtype} {rgb.shape}.")
        f = self.bin_factor(mpp)
        lut = _H_LUT - np.float32(self.eosin_weight) * _E_LUT if self.eosin_weight else _H_LUT
        h = haematoxylin_binned(rgb, np.ascontiguousarray(lut, dtype=np.float32), f)
        return self._smooth(h, mpp * f), mpp * f, f

    def calibrate(self, rgb: np.ndarray, *, mpp: float, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Fit the slide-wide threshold on sample pixels ``rgb`` (tissue where ``mask``)."""
        from skimage.filters import threshold_otsu

        if self.threshold is not None:
            return {"threshold": float(self.threshold)}
        h, _, f = self._binned_h(rgb, mpp)
        if mask is not None and f > 1:
            mask = mask[::f, ::f][: h.shape[0], : h.shape[1]]
        values = h[mask] if mask is not None else h.ravel()
        if values.size < 100 or np.ptp(values) <= 0:
            return {}
        return {"threshold": float(threshold_otsu(values)) * self.threshold_scale}

    def _smooth(self, h: np.ndarray, mpp: float) -> np.ndarray:
        from scipy import ndimage as ndi

        sigma = self.sigma_um / mpp
        return ndi.gaussian_filter(h, sigma, mode="nearest", truncate=3.0) if sigma >= 0.3 else h

    def __call__(self, tile: np.ndarray, *, mpp: float, threshold: float | None = None) -> np.ndarray:
        """Label image (int32, 0 = background) of the nuclei in an ``(y, x, 3)`` uint8 RGB tile."""
        labels, f = self.labels_binned(tile, mpp=mpp, threshold=threshold)
        if f > 1:
            labels = np.repeat(np.repeat(labels, f, axis=0), f, axis=1)[: tile.shape[0], : tile.shape[1]]
        return labels

    def labels_binned(
        self, tile: np.ndarray, *, mpp: float, threshold: float | None = None
    ) -> tuple[np.ndarray, int]:
        """The labels at the working resolution and the bin factor ``f``: :meth:`__call__` returns
        them repeated over ``f × f`` blocks, cropped to the tile (the tiler measures the cells on
        the binned image when it needs no full-resolution label image)."""
        h, work_mpp, f = self._binned_h(tile, mpp)
        return self._labels(h, work_mpp, threshold), f

    def _labels(self, h: np.ndarray, mpp: float, threshold: float | None) -> np.ndarray:
        from scipy import ndimage as ndi

        thr = self.threshold if self.threshold is not None else threshold
        if thr is None:
            from skimage.filters import threshold_otsu

            if np.ptp(h) <= 0:
                return np.zeros(h.shape, np.int32)
            thr = float(threshold_otsu(h)) * self.threshold_scale
        fg = h > thr
        w = self.local_um / mpp if self.local_um else 0
        if w >= 3:  # in crowded regions also above the local mean: separates packed nuclei
            fg &= h > ndi.uniform_filter(h, size=int(w) | 1, mode="nearest") * self.local_factor
        if not fg.any():
            return np.zeros(h.shape, np.int32)
        px2 = mpp * mpp
        from ._kernels import drop_by_size, fill_small_holes, flood, squared_edt

        # fill small holes: background components not touching the border and small
        hole_px = self.max_hole_um2 / px2
        if hole_px >= 1:
            bg_lab, n_bg = ndi.label(~fg)
            if n_bg:
                fill_small_holes(fg, bg_lab, n_bg, float(hole_px))

        dist = np.sqrt(squared_edt(fg))
        ds = self.dist_sigma_um / mpp
        if ds >= 0.3:  # ties along the ridge of an elongated nucleus resolve to its middle
            dist = ndi.gaussian_filter(dist, ds, truncate=2.0)
            dist[~fg] = 0
        r = max(1, round(self.peak_distance_um / mpp))
        dmax = ndi.maximum_filter(dist, size=2 * r + 1, mode="constant", cval=0.0)
        min_r = max(1.0, 0.5 * np.sqrt(self.min_area_um2 / np.pi) / mpp)
        peaks = (dist == dmax) & (dist >= min_r * 0.5)
        markers, _ = ndi.label(peaks, structure=np.ones((3, 3), bool))
        # flood the inverted distance, quantised to 1/4 px on an absolute scale (tile independent)
        cap = self.max_diameter_um / mpp
        level = np.clip((cap - dist) * 4.0, 0, None).astype(np.int32)
        labels = flood(level, markers.astype(np.int32), fg)
        # size filter (in place)
        drop_by_size(labels, float(self.min_area_um2 / px2), float(self.max_area_um2 / px2))
        return labels
