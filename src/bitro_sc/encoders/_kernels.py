"""Numba kernels of the morphology encoder (imported lazily; compiled once and cached on disk).

Each kernel makes one pass over the pixels it needs, computing stain optical densities on the fly
from per-channel lookup tables, so no per-pixel float image is ever allocated.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def paint_ellipses(out, cy, cx, a, b, theta, values):  # pragma: no cover - compiled
    """Fill ellipses (semi-axes a along the major axis, b; skimage orientation) with ``values``.

    Where ellipses overlap the first one keeps the pixel.
    """
    h, w = out.shape
    for i in range(cy.shape[0]):
        r = max(a[i], b[i])
        y0 = max(math.floor(cy[i] - r), 0)
        y1 = min(math.ceil(cy[i] + r) + 1, h)
        x0 = max(math.floor(cx[i] - r), 0)
        x1 = min(math.ceil(cx[i] + r) + 1, w)
        ct = math.cos(theta[i])
        st = math.sin(theta[i])
        ia2 = 1.0 / (a[i] * a[i])
        ib2 = 1.0 / (b[i] * b[i])
        for y in range(y0, y1):
            dy = y - cy[i]
            for x in range(x0, x1):
                dx = x - cx[i]
                u = dy * ct + dx * st  # along the major axis
                v = -dy * st + dx * ct
                if u * u * ia2 + v * v * ib2 <= 1.0 and out[y, x] == 0:
                    out[y, x] = values[i]


@numba.njit(cache=True, nogil=True)
def ring_pass(rgb, lab, lut_h, lut_e, cy, cx, a, b, theta, ring, out):  # pragma: no cover - compiled
    """Per cell, ``out[i] = (count, ΣH, ΣE, ΣE²)`` over background pixels (``lab == 0``) inside the
    cell's ellipse enlarged by ``ring`` pixels on both semi-axes."""
    h, w = lab.shape
    for i in range(cy.shape[0]):
        aa = a[i] + ring
        bb = b[i] + ring
        r = max(aa, bb)
        y0 = max(math.floor(cy[i] - r), 0)
        y1 = min(math.ceil(cy[i] + r) + 1, h)
        x0 = max(math.floor(cx[i] - r), 0)
        x1 = min(math.ceil(cx[i] + r) + 1, w)
        ct = math.cos(theta[i])
        st = math.sin(theta[i])
        ia2 = 1.0 / (aa * aa)
        ib2 = 1.0 / (bb * bb)
        for y in range(y0, y1):
            dy = y - cy[i]
            for x in range(x0, x1):
                if lab[y, x] != 0:
                    continue
                dx = x - cx[i]
                u = dy * ct + dx * st
                v = -dy * st + dx * ct
                if u * u * ia2 + v * v * ib2 <= 1.0:
                    rr = rgb[y, x, 0]
                    g = rgb[y, x, 1]
                    bl = rgb[y, x, 2]
                    hv = lut_h[0, rr] + lut_h[1, g] + lut_h[2, bl]
                    ev = lut_e[0, rr] + lut_e[1, g] + lut_e[2, bl]
                    out[i, 0] += 1.0
                    out[i, 1] += hv
                    out[i, 2] += ev
                    out[i, 3] += ev * ev


@numba.njit(cache=True, nogil=True)
def pixel_pass_boxes(rgb, lab, lut_h, lut_e, m, nuc, con, q_start, q_col, q_out, corners):  # pragma: no cover
    """One pass over a tile: per-nucleus sums and the field-of-view box sums.

    Fills ``nuc[l] = (count, ΣH, ΣH², ΣE, ΣE²)`` per label ``l`` (``m`` labels incl. background) and
    ``con[l] = (Σ|ΔH|, pairs)`` over 4-connected neighbour pairs inside the same nucleus. The integral
    images of H, H², E and the nucleus mask are never held: their rows are built one at a time and
    only the values that queries ask for are kept.

    Queries are grouped by integral row ``r`` (``0..h``): ``q_start[r]:q_start[r + 1]`` index
    ``q_col`` (the column, ``0..w``) and ``q_out`` (a flat index into ``corners[k]``), so that
    ``corners[k, q_out[i]] = integral_k[r, q_col[i]]`` for H, H², E and the nucleus mask (``k``).
    """
    h, w = lab.shape
    prev_row = np.zeros(w, dtype=np.float64)
    run = np.zeros((4, w + 1), dtype=np.float64)  # the current integral row (row 0: zeros)
    for i in range(q_start[0], q_start[1]):
        for k in range(4):
            corners[k, q_out[i]] = 0.0
    for y in range(h):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        hleft = 0.0
        for x in range(w):
            r = rgb[y, x, 0]
            g = rgb[y, x, 1]
            bl = rgb[y, x, 2]
            hv = lut_h[0, r] + lut_h[1, g] + lut_h[2, bl]
            ev = lut_e[0, r] + lut_e[1, g] + lut_e[2, bl]
            lv = lab[y, x]
            fg = 0.0
            if lv > 0:
                fg = 1.0
                nuc[lv, 0] += 1.0
                nuc[lv, 1] += hv
                nuc[lv, 2] += hv * hv
                nuc[lv, 3] += ev
                nuc[lv, 4] += ev * ev
                if x > 0 and lab[y, x - 1] == lv:
                    con[lv, 0] += abs(hv - hleft)
                    con[lv, 1] += 1.0
                if y > 0 and lab[y - 1, x] == lv:
                    con[lv, 0] += abs(hv - prev_row[x])
                    con[lv, 1] += 1.0
            hleft = hv
            prev_row[x] = hv
            s0 += hv
            s1 += hv * hv
            s2 += ev
            s3 += fg
            run[0, x + 1] = run[0, x + 1] + s0
            run[1, x + 1] = run[1, x + 1] + s1
            run[2, x + 1] = run[2, x + 1] + s2
            run[3, x + 1] = run[3, x + 1] + s3
        for i in range(q_start[y + 1], q_start[y + 2]):
            c = q_col[i]
            for k in range(4):
                corners[k, q_out[i]] = run[k, c]
