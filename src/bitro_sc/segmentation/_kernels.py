"""Numba kernels of the default segmenter (compiled once, cached on disk; release the GIL).

- :func:`squared_edt`: exact squared Euclidean distance transform (Felzenszwalb & Huttenlocher),
  linear time, no feature transform (what makes ``scipy.ndimage.distance_transform_edt`` slow).
- :func:`flood`: marker-controlled watershed by a hierarchical (bucket) queue on integer levels,
  linear time; 4-connected, ties broken first-in first-out as ``skimage.segmentation.watershed``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def squared_edt(fg):
    """Squared distance (float32) of each foreground pixel to the nearest background pixel.

    Pixels outside the array do not count as background (as ``scipy.ndimage``); a foreground
    component with no background in the array gets a large value.
    """
    h, w = fg.shape
    inf = float(h + w) ** 2 + 1.0
    g = np.empty((h, w), np.float64)
    for x in range(w):  # 1-D distances along columns, computed row by row (cache friendly)
        g[0, x] = inf if fg[0, x] else 0.0
    for y in range(1, h):
        for x in range(w):
            if not fg[y, x]:
                g[y, x] = 0.0
            else:
                prev = g[y - 1, x]
                g[y, x] = prev + 1.0 if prev < inf else inf
    for y in range(h - 2, -1, -1):
        for x in range(w):
            below = g[y + 1, x] + 1.0
            if below < g[y, x]:
                g[y, x] = below
    out = np.zeros((h, w), np.float32)
    v = np.empty(w, np.int64)
    z = np.empty(w + 1, np.float64)
    f = np.empty(w, np.float64)
    for y in range(h):  # lower envelope of parabolas along rows
        any_fg = False
        for x in range(w):
            gv = g[y, x]
            f[x] = gv * gv if gv < inf else inf * inf
            if fg[y, x]:
                any_fg = True
        if not any_fg:
            continue
        k = 0
        v[0] = 0
        z[0] = -np.inf
        z[1] = np.inf
        for q in range(1, w):
            while True:
                p = v[k]
                s = ((f[q] + q * q) - (f[p] + p * p)) / (2.0 * (q - p))
                if s <= z[k] and k > 0:
                    k -= 1
                else:
                    break
            if s <= z[k]:  # k == 0: replace the first parabola
                v[0] = q
                z[0] = -np.inf
                z[1] = np.inf
                continue
            k += 1
            v[k] = q
            z[k] = s
            z[k + 1] = np.inf
        k = 0
        for q in range(w):
            while z[k + 1] < q:
                k += 1
            if fg[y, q]:
                d = q - v[k]
                out[y, q] = d * d + f[v[k]]
    return out


@numba.njit(cache=True, nogil=True)
def flood(level, markers, mask):
    """Watershed: grow ``markers`` (int32, 0 = none) over ``mask`` in order of ``level``.

    ``level`` holds non-negative integers (lower floods first). Returns the labels (int32).
    """
    h, w = level.shape
    n = h * w
    labels = markers.copy()
    nlev = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and level[y, x] + 1 > nlev:
                nlev = level[y, x] + 1
    if nlev == 0:
        return labels
    head = np.full(nlev, -1, np.int64)
    tail = np.full(nlev, -1, np.int64)
    nxt = np.full(n, -1, np.int64)
    for y in range(h):
        for x in range(w):
            if labels[y, x] > 0 and mask[y, x]:
                p = y * w + x
                lv = level[y, x]
                if tail[lv] == -1:
                    head[lv] = p
                else:
                    nxt[tail[lv]] = p
                tail[lv] = p
    cur = 0
    while cur < nlev:
        p = head[cur]
        if p == -1:
            cur += 1
            continue
        head[cur] = nxt[p]
        if head[cur] == -1:
            tail[cur] = -1
        y = p // w
        x = p - y * w
        lab = labels[y, x]
        for k in range(4):
            if k == 0:
                yy, xx = y - 1, x
            elif k == 1:
                yy, xx = y + 1, x
            elif k == 2:
                yy, xx = y, x - 1
            else:
                yy, xx = y, x + 1
            if yy < 0 or yy >= h or xx < 0 or xx >= w:
                continue
            if labels[yy, xx] != 0 or not mask[yy, xx]:
                continue
            labels[yy, xx] = lab
            lv = level[yy, xx]
            if lv < cur:
                lv = cur
            q = yy * w + xx
            nxt[q] = -1
            if tail[lv] == -1:
                head[lv] = q
            else:
                nxt[tail[lv]] = q
            tail[lv] = q
    return labels


@numba.njit(cache=True, nogil=True)
def haematoxylin_binned(rgb, lut, f):
    """Mean haematoxylin optical density over ``f × f`` blocks of an ``(y, x, 3)`` uint8 image.

    ``lut[c, v]`` is the haematoxylin contribution of value ``v`` in channel ``c``; partial blocks
    at the right and bottom edges average the pixels they have. Any strides (e.g. a transposed view).
    """
    h, w = rgb.shape[0], rgb.shape[1]
    ny = (h + f - 1) // f
    nx = (w + f - 1) // f
    out = np.zeros((ny, nx), np.float32)
    for y in range(h):
        by = y // f
        for x in range(w):
            out[by, x // f] += lut[0, rgb[y, x, 0]] + lut[1, rgb[y, x, 1]] + lut[2, rgb[y, x, 2]]
    if f > 1:
        for by in range(ny):
            hy = min(f, h - by * f)
            for bx in range(nx):
                out[by, bx] /= hy * min(f, w - bx * f)
    return out


@numba.njit(cache=True, nogil=True)
def fill_small_holes(fg, bg_lab, n_bg, max_px):
    """Set ``fg`` (in place) on background components (``bg_lab``, ``1..n_bg``) of at most ``max_px``
    pixels that do not touch the array border (a piece cut by a tile border is not a hole)."""
    h, w = fg.shape
    sizes = _label_sizes(bg_lab, n_bg)
    small = np.zeros(n_bg + 1, np.bool_)
    for i in range(1, n_bg + 1):
        small[i] = sizes[i] <= max_px
    for x in range(w):
        small[bg_lab[0, x]] = False
        small[bg_lab[h - 1, x]] = False
    for y in range(h):
        small[bg_lab[y, 0]] = False
        small[bg_lab[y, w - 1]] = False
    small[0] = False
    for y in range(h):
        for x in range(w):
            if small[bg_lab[y, x]]:
                fg[y, x] = True


@numba.njit(cache=True, nogil=True)
def drop_by_size(labels, min_px, max_px):
    """Set (in place) to 0 the labels whose pixel count is outside ``[min_px, max_px]``."""
    h, w = labels.shape
    n = 0
    for y in range(h):
        for x in range(w):
            if labels[y, x] > n:
                n = labels[y, x]
    sizes = _label_sizes(labels, n)
    keep = np.zeros(n + 1, np.bool_)
    for i in range(1, n + 1):
        keep[i] = sizes[i] >= min_px and sizes[i] <= max_px
    for y in range(h):
        for x in range(w):
            if not keep[labels[y, x]]:
                labels[y, x] = 0


@numba.njit(cache=True, nogil=True)
def _label_sizes(labels, n):
    """Pixel count of each label ``0..n`` of an int label image."""
    sizes = np.zeros(n + 1, np.int64)
    h, w = labels.shape
    for y in range(h):
        for x in range(w):
            sizes[labels[y, x]] += 1
    return sizes
