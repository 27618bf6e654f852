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
def label_moments(lab, nmax):
    """Per-label sums over an int label image with values in ``[0, nmax]``.

    Returns ``(stats, hull)``: ``stats[l]`` = (count, Σy, Σx, Σy², Σx², Σxy, boundary edges) and
    ``hull[l]`` = area of the convex hull of the label's pixel squares.
    """
    h, w = lab.shape
    stats = np.zeros((nmax + 1, 7), np.float64)
    ymin = np.full(nmax + 1, h, np.int64)
    ymax = np.full(nmax + 1, -1, np.int64)
    for y in range(h):
        for x in range(w):
            v = lab[y, x]
            if v <= 0:
                continue
            s = stats[v]
            s[0] += 1.0
            s[1] += y
            s[2] += x
            s[3] += y * y
            s[4] += x * x
            s[5] += x * y
            e = 0
            if y == 0 or lab[y - 1, x] != v:
                e += 1
            if y == h - 1 or lab[y + 1, x] != v:
                e += 1
            if x == 0 or lab[y, x - 1] != v:
                e += 1
            if x == w - 1 or lab[y, x + 1] != v:
                e += 1
            s[6] += e
            if y < ymin[v]:
                ymin[v] = y
            if y > ymax[v]:
                ymax[v] = y
    # per-label, per-row extents
    off = np.zeros(nmax + 2, np.int64)
    for v in range(1, nmax + 1):
        off[v + 1] = off[v] + (ymax[v] - ymin[v] + 1 if ymax[v] >= 0 else 0)
    total = off[nmax + 1]
    rxmin = np.full(total, w + 1, np.int64)
    rxmax = np.full(total, -1, np.int64)
    for y in range(h):
        for x in range(w):
            v = lab[y, x]
            if v <= 0:
                continue
            i = off[v] + y - ymin[v]
            if x < rxmin[i]:
                rxmin[i] = x
            if x > rxmax[i]:
                rxmax[i] = x
    hull = np.zeros(nmax + 1, np.float64)
    for v in range(1, nmax + 1):
        if ymax[v] < 0:
            continue
        nrows = ymax[v] - ymin[v] + 1
        # corner rows Y = ymin .. ymax + 1: extreme corners from pixel rows Y - 1 and Y
        py = np.empty(2 * (nrows + 1), np.float64)
        px = np.empty(2 * (nrows + 1), np.float64)
        m = 0
        for r in range(nrows + 1):
            lo = w + 1
            hi = -1
            for rr in (r - 1, r):
                if 0 <= rr < nrows:
                    i = off[v] + rr
                    if rxmax[i] >= 0:
                        if rxmin[i] < lo:
                            lo = rxmin[i]
                        if rxmax[i] + 1 > hi:
                            hi = rxmax[i] + 1
            if hi < 0:
                continue
            py[m] = ymin[v] + r
            px[m] = lo
            m += 1
            py[m] = ymin[v] + r
            px[m] = hi
            m += 1
        # Andrew's monotone chain over points sorted by (y, x)
        hy = np.empty(2 * m + 1, np.float64)
        hx = np.empty(2 * m + 1, np.float64)
        k = 0
        for i in range(m):
            while (
                k >= 2
                and (hy[k - 1] - hy[k - 2]) * (px[i] - hx[k - 2])
                - (hx[k - 1] - hx[k - 2]) * (py[i] - hy[k - 2])
                <= 0
            ):
                k -= 1
            hy[k] = py[i]
            hx[k] = px[i]
            k += 1
        lower = k + 1
        for i in range(m - 2, -1, -1):
            while (
                k >= lower
                and (hy[k - 1] - hy[k - 2]) * (px[i] - hx[k - 2])
                - (hx[k - 1] - hx[k - 2]) * (py[i] - hy[k - 2])
                <= 0
            ):
                k -= 1
            hy[k] = py[i]
            hx[k] = px[i]
            k += 1
        a = 0.0
        for i in range(k - 1):
            a += hy[i] * hx[i + 1] - hy[i + 1] * hx[i]
        hull[v] = abs(a) / 2.0
    return stats, hull


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
