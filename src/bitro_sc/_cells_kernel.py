"""Numba kernel of the cells writer: per-label pixel moments and convex-hull areas.

Compiled once and cached on disk; :func:`bitro_sc._cells.cell_props` imports it on first use so that
importing the writer does not import numba.
"""

from __future__ import annotations

import numba
import numpy as np


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
    off, rxmin, rxmax = _row_extents(nmax, w, ymin, ymax)
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
    return stats, _hull_areas(nmax, w, ymin, ymax, off, rxmin, rxmax)


@numba.njit(cache=True, nogil=True)
def _hull_areas(nmax, w, ymin, ymax, off, rxmin, rxmax):  # pragma: no cover - compiled
    """Convex-hull area of each label's pixel squares from its per-row x extents
    (``rxmin/rxmax[off[v] + y - ymin[v]]``; ``rxmax < 0``: no pixel on that row)."""
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
    return hull


@numba.njit(cache=True, nogil=True)
def label_moments_blocks(lab, nmax, f, h, w):  # pragma: no cover - compiled
    """:func:`label_moments` of the ``(h, w)`` image made by repeating each pixel of ``lab`` over an
    ``f × f`` block (cropped to ``h × w``), without making it: the same integer sums (exact in
    float64), boundary edges and convex hulls, from one pass over the blocks."""
    bh, bw = lab.shape
    stats = np.zeros((nmax + 1, 7), np.float64)
    ymin = np.full(nmax + 1, h, np.int64)
    ymax = np.full(nmax + 1, -1, np.int64)
    for by in range(bh):
        y0 = by * f
        y1 = min(y0 + f, h)
        if y0 >= h:
            break
        fy = y1 - y0
        sy, syy = _range_sums(y0, y1)
        for bx in range(bw):
            v = lab[by, bx]
            if v <= 0:
                continue
            x0 = bx * f
            x1 = min(x0 + f, w)
            if x0 >= w:
                break
            fx = x1 - x0
            sx, sxx = _range_sums(x0, x1)
            s = stats[v]
            s[0] += fy * fx
            s[1] += fx * sy
            s[2] += fy * sx
            s[3] += fx * syy
            s[4] += fy * sxx
            s[5] += sx * sy
            e = 0
            if by == 0 or lab[by - 1, bx] != v:
                e += fx
            if y1 >= h or by + 1 >= bh or lab[by + 1, bx] != v:
                e += fx
            if bx == 0 or lab[by, bx - 1] != v:
                e += fy
            if x1 >= w or bx + 1 >= bw or lab[by, bx + 1] != v:
                e += fy
            s[6] += e
            if y0 < ymin[v]:
                ymin[v] = y0
            if y1 - 1 > ymax[v]:
                ymax[v] = y1 - 1
    off, rxmin, rxmax = _row_extents(nmax, w, ymin, ymax)
    for by in range(bh):
        y0 = by * f
        if y0 >= h:
            break
        y1 = min(y0 + f, h)
        for bx in range(bw):
            v = lab[by, bx]
            if v <= 0:
                continue
            x0 = bx * f
            if x0 >= w:
                break
            x1 = min(x0 + f, w) - 1
            for y in range(y0, y1):
                i = off[v] + y - ymin[v]
                if x0 < rxmin[i]:
                    rxmin[i] = x0
                if x1 > rxmax[i]:
                    rxmax[i] = x1
    return stats, _hull_areas(nmax, w, ymin, ymax, off, rxmin, rxmax)


@numba.njit(cache=True, nogil=True)
def _row_extents(nmax, w, ymin, ymax):  # pragma: no cover - compiled
    """Storage of each label's per-row x extents: ``(off, rxmin, rxmax)``, label ``v``'s row ``y`` at
    ``off[v] + y - ymin[v]``, started empty (``rxmin = w + 1``, ``rxmax = -1``)."""
    off = np.zeros(nmax + 2, np.int64)
    for v in range(1, nmax + 1):
        off[v + 1] = off[v] + (ymax[v] - ymin[v] + 1 if ymax[v] >= 0 else 0)
    total = off[nmax + 1]
    return off, np.full(total, w + 1, np.int64), np.full(total, -1, np.int64)


@numba.njit(cache=True, nogil=True)
def _range_sums(a, b):  # pragma: no cover - compiled
    """``(Σ i, Σ i²)`` over the integers ``a <= i < b``, in float64 as the pixel loops sum them."""
    s = 0.0
    ss = 0.0
    for i in range(a, b):
        s += i
        ss += i * i
    return s, ss
