"""Numba kernels that render synthetic H&E pixels and nucleus labels for one rectangular region.

Every value here is a pure function of global pixel coordinates and the cell list, so any region
(a dask block plus its margin, or the whole image) renders the same pixels: the lazy and the eager
paths agree exactly. Pixel centres sit at integer coordinates (the skimage convention).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# cell type codes (order of ``_synth_tissue.CELL_TYPES``)
TUMOUR, FIBROBLAST, LYMPHOCYTE, MACROPHAGE, ENDOTHELIAL = 0, 1, 2, 3, 4


@njit(cache=True, inline="always")
def _hash01(ix: int, iy: int, seed: int) -> float:
    """Integer hash of a lattice point → uniform value in [0, 1)."""
    h = (ix * 374761393 + iy * 668265263 + seed * 1442695041) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = (h ^ (h >> 16)) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 2246822519) & 0xFFFFFFFF
    h = (h ^ (h >> 13)) & 0xFFFFFFFF
    return h / 4294967296.0


@njit(cache=True, inline="always")
def _vnoise(x: float, y: float, seed: int) -> float:
    """Smooth value noise in [0, 1) with unit lattice spacing."""
    fx0 = math.floor(x)
    fy0 = math.floor(y)
    ix = int(fx0)
    iy = int(fy0)
    fx = x - fx0
    fy = y - fy0
    sx = fx * fx * (3.0 - 2.0 * fx)
    sy = fy * fy * (3.0 - 2.0 * fy)
    v00 = _hash01(ix, iy, seed)
    v10 = _hash01(ix + 1, iy, seed)
    v01 = _hash01(ix, iy + 1, seed)
    v11 = _hash01(ix + 1, iy + 1, seed)
    a = v00 + sx * (v10 - v00)
    b = v01 + sx * (v11 - v01)
    return a + sy * (b - a)


@njit(cache=True, inline="always")
def _chromatin(x: float, y: float, scale: float, seed: int) -> float:
    """Two-octave chromatin texture in [0, 1); ``scale`` is the clump size (µm)."""
    return 0.6 * _vnoise(x / scale, y / scale, seed) + 0.4 * _vnoise(
        x / (0.45 * scale), y / (0.45 * scale), seed + 1
    )


@njit(cache=True, inline="always")
def _smoothstep(e0: float, e1: float, x: float) -> float:
    t = (x - e0) / (e1 - e0)
    if t < 0.0:
        t = 0.0
    elif t > 1.0:
        t = 1.0
    return t * t * (3.0 - 2.0 * t)


@njit(cache=True, inline="always")
def _shape(
    dx: float,
    dy: float,
    a: float,
    b: float,
    ct: float,
    st: float,
    w2: float,
    c2p: float,
    s2p: float,
    w3: float,
    c3p: float,
    s3p: float,
    w5: float,
) -> tuple[float, float, float, float]:
    """Normalised radius ``rho`` of a point and the boundary ``R`` in its direction (inside: rho < R).

    The boundary is an ellipse (semi-axes ``a`` ≥ ``b``, direction (``ct``, ``st``)) whose radius is
    modulated by 2nd and 3rd harmonics of amplitude ``w2``, ``w3`` and phase (cos, sin) ``c2p, s2p``,
    ``c3p, s3p``, plus a 5th harmonic of amplitude ``w5`` (phase tied to the 3rd) for a slightly
    rough outline: ``R = 1 + w2 cos(2φ + p2) + w3 cos(3φ + p3) + w5 cos(5φ + p3)``.
    """
    u = dx * ct + dy * st
    v = -dx * st + dy * ct
    un = u / a
    vn = v / b
    rho = math.sqrt(un * un + vn * vn)
    if rho > 0.0:
        c = un / rho
        s = vn / rho
    else:
        c = 1.0
        s = 0.0
    cos2 = c * c - s * s
    sin2 = 2.0 * c * s
    cos3 = c * (4.0 * c * c - 3.0)
    sin3 = s * (3.0 - 4.0 * s * s)
    c2s = c * c
    s2s = s * s
    cos5 = c * (16.0 * c2s * c2s - 20.0 * c2s + 5.0)
    sin5 = s * (16.0 * s2s * s2s - 20.0 * s2s + 5.0)
    r_edge = (
        1.0 + w2 * (cos2 * c2p - sin2 * s2p) + w3 * (cos3 * c3p - sin3 * s3p) + w5 * (cos5 * c3p - sin5 * s3p)
    )
    return rho, r_edge, un, vn


@njit(cache=True, inline="always")
def _bilinear(f: np.ndarray, gy: float, gx: float) -> float:
    """Bilinear sample of grid ``f`` at fractional grid coordinates (edge values held outside)."""
    ny, nx = f.shape
    if gy < 0.0:
        gy = 0.0
    elif gy > ny - 1.0:
        gy = ny - 1.0
    if gx < 0.0:
        gx = 0.0
    elif gx > nx - 1.0:
        gx = nx - 1.0
    iy = min(int(gy), ny - 2) if ny > 1 else 0
    ix = min(int(gx), nx - 2) if nx > 1 else 0
    fy = gy - iy
    fx = gx - ix
    iy1 = min(iy + 1, ny - 1)
    ix1 = min(ix + 1, nx - 1)
    a = f[iy, ix] + fx * (f[iy, ix1] - f[iy, ix])
    b = f[iy1, ix] + fx * (f[iy1, ix1] - f[iy1, ix])
    return a + fy * (b - a)


@njit(cache=True, nogil=True)
def render_background(
    y0: int,
    x0: int,
    fields: np.ndarray,
    grid_um: float,
    mpp: float,
    seed: int,
    od_h: np.ndarray,
    od_e: np.ndarray,
) -> None:
    """Haematoxylin / eosin optical density of the extracellular tissue and glass.

    ``fields`` (5, gy, gx) holds the region fields on the coarse grid: tissue, tumour, immune
    (0..1, 0.5 at a border) and the doubled fibre angle (cos, sin).
    """
    h, w = od_h.shape
    for iy in range(h):
        yg = (y0 + iy) * mpp  # µm
        gy = yg / grid_um
        for ix in range(w):
            xg = (x0 + ix) * mpp
            gx = xg / grid_um
            tis = _bilinear(fields[0], gy, gx)
            if tis < 0.3:  # glass: almost clear with a faint tint
                od_e[iy, ix] = 0.0
                od_h[iy, ix] = 0.0
                continue
            tu = _bilinear(fields[1], gy, gx)
            im = _bilinear(fields[2], gy, gx)
            c2 = _bilinear(fields[3], gy, gx)
            s2 = _bilinear(fields[4], gy, gx)
            # ragged tissue edge: fine noise on the threshold
            edge = tis + 0.16 * (_vnoise(xg / 5.0, yg / 5.0, seed + 11) - 0.5)
            t = _smoothstep(0.44, 0.56, edge)
            st_w = max(0.0, 1.0 - tu - im)
            e_str = 0.0
            h_str = 0.0
            if st_w > 0.0:
                e_str, h_str = _stroma(xg, yg, c2, s2, seed)
            grain = 0.0
            if tu + im > 0.0:
                grain = 0.6 * _vnoise(xg / 1.5, yg / 1.5, seed + 4) + 0.4 * _vnoise(
                    xg / 4.0, yg / 4.0, seed + 7
                )
            # tumour nests: a sheet of cytoplasm; immune infiltrate: little cytoplasm, loose matrix
            e_t = 0.16 + 0.08 * grain
            h_t = 0.13 + 0.06 * grain
            e_i = 0.12 + 0.06 * grain
            h_i = 0.09 + 0.05 * grain
            e = st_w * e_str + tu * e_t + im * e_i
            hh = st_w * h_str + tu * h_t + im * h_i
            od_e[iy, ix] = t * e
            od_h[iy, ix] = t * hh


@njit(cache=True, inline="always")
def _bundles(x: float, y: float, k: int, seed: int) -> tuple[float, float]:
    """Collagen bundle and fibril noise along the fixed direction ``k`` · 30°."""
    ang = k * 0.5235987755982988
    ca = math.cos(ang)
    sa = math.sin(ang)
    u = x * ca + y * sa
    v = -x * sa + y * ca
    s = seed + 17 * k
    bundle = 0.7 * _vnoise(u / 70.0, v / 7.0, s + 1) + 0.3 * _vnoise(u / 25.0, v / 3.0, s + 2)
    fibril = _vnoise(u / 10.0, v / 0.9, s + 8)
    return bundle, fibril


@njit(cache=True, inline="always")
def _stroma(xg: float, yg: float, c2: float, s2: float, seed: int) -> tuple[float, float]:
    """Eosin / haematoxylin OD of collagen: wavy bundles along the fibre direction, pale gaps.

    The local direction blends two of six fixed orientations, so that the texture never shears
    (rotating absolute coordinates by a varying angle would compress it far from the origin).
    """
    # bounded domain warp: waviness
    xw = xg + 12.0 * (_vnoise(xg / 60.0, yg / 60.0, seed + 5) - 0.5)
    yw = yg + 12.0 * (_vnoise(xg / 60.0, yg / 60.0, seed + 6) - 0.5)
    theta = 0.5 * math.atan2(s2, c2)
    if theta < 0.0:
        theta += math.pi
    t = theta / 0.5235987755982988
    k0 = math.floor(t)
    f = t - k0
    b0, f0 = _bundles(xw, yw, k0 % 6, seed)
    b1, f1 = _bundles(xw, yw, (k0 + 1) % 6, seed)
    bundle = (1.0 - f) * b0 + f * b1
    fibril = (1.0 - f) * f0 + f * f1
    coarse = _vnoise(xg / 80.0, yg / 80.0, seed + 3)
    gap = 1.0 - _smoothstep(0.2, 0.36, bundle)  # 1 in a pale gap
    e_str = (0.10 + 0.22 * bundle + 0.05 * fibril + 0.10 * coarse) * (1.0 - 0.7 * gap)
    h_str = (0.08 + 0.06 * coarse + 0.02 * fibril) * (1.0 - 0.6 * gap)
    return e_str, h_str


@njit(cache=True, nogil=True)
def compose_rgb(
    y0: int,
    x0: int,
    od_h: np.ndarray,
    od_e: np.ndarray,
    stain: np.ndarray,
    glass: np.ndarray,
    mpp: float,
    seed: int,
    rgb: np.ndarray,
) -> None:
    """Beer–Lambert: ``rgb = 255 · glass · 10^-(H·h + E·e)`` with stain vectors ``stain`` (2, 3).

    Staining is slightly uneven over the slide (±8 % haematoxylin, ±10 % eosin over ~0.5 mm).
    """
    h, w = od_h.shape
    for iy in range(h):
        ym = (y0 + iy) * mpp
        for ix in range(w):
            xm = (x0 + ix) * mpp
            hh = od_h[iy, ix] * (1.0 + 0.16 * (_vnoise(xm / 500.0, ym / 500.0, seed + 51) - 0.5))
            ee = od_e[iy, ix] * (1.0 + 0.20 * (_vnoise(xm / 500.0, ym / 500.0, seed + 52) - 0.5))
            for ch in range(3):
                rgb[ch, iy, ix] = (
                    255.0 * glass[ch] * math.exp(-2.302585092994046 * (hh * stain[0, ch] + ee * stain[1, ch]))
                )


@njit(cache=True, nogil=True)
def render_cells(
    y0: int,
    x0: int,
    h: int,
    w: int,
    idx: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ct: np.ndarray,
    st: np.ndarray,
    w2: np.ndarray,
    c2p: np.ndarray,
    s2p: np.ndarray,
    w3: np.ndarray,
    c3p: np.ndarray,
    s3p: np.ndarray,
    w5: np.ndarray,
    kind: np.ndarray,
    hst: np.ndarray,
    cyto_f: np.ndarray,
    cyto_e: np.ndarray,
    cyto_h: np.ndarray,
    nuc_u: np.ndarray,
    nuc_v: np.ndarray,
    nuc_r: np.ndarray,
    cell_id: np.ndarray,
    mpp: float,
    seed: int,
    od_h: np.ndarray,
    od_e: np.ndarray,
    labels: np.ndarray,
    want_image: bool,
) -> None:
    """Paint cytoplasm and nuclei of the cells ``idx`` (sorted by depth, bottom first) into a region.

    ``labels`` takes the id of the top-most nucleus whose shape contains the pixel centre.
    """
    n = idx.shape[0]
    if want_image:
        # cytoplasm: eosinophilic halo around each nucleus (max-composited)
        for k in range(n):
            i = idx[k]
            f = cyto_f[i]
            ext = a[i] * f * 1.35 + 2.0
            ylo = max(math.floor(cy[i] - ext) - y0, 0)
            yhi = min(math.ceil(cy[i] + ext) - y0 + 1, h)
            xlo = max(math.floor(cx[i] - ext) - x0, 0)
            xhi = min(math.ceil(cx[i] + ext) - x0 + 1, w)
            ac = a[i] * f
            bc = b[i] * f + (f - 1.0) * a[i] * 0.6
            for iy in range(ylo, yhi):
                for ix in range(xlo, xhi):
                    dx = (x0 + ix) - cx[i]
                    dy = (y0 + iy) - cy[i]
                    rho, r_edge, un, vn = _shape(
                        dx,
                        dy,
                        ac,
                        bc,
                        ct[i],
                        st[i],
                        0.5 * w2[i],
                        c2p[i],
                        s2p[i],
                        w3[i],
                        c3p[i],
                        s3p[i],
                        w5[i],
                    )
                    wgt = 1.0 - _smoothstep(0.75, 1.25, rho / r_edge)
                    if wgt <= 0.0:
                        continue
                    if kind[i] == TUMOUR:  # faint membrane at the cell border
                        wgt *= 1.0 + 0.35 * math.exp(-((rho / r_edge - 0.95) ** 2) / 0.004)
                    ev = cyto_e[i] * wgt
                    hv = cyto_h[i] * wgt
                    if ev > od_e[iy, ix]:
                        od_e[iy, ix] = ev
                    if hv > od_h[iy, ix]:
                        od_h[iy, ix] = hv
    for k in range(n):
        i = idx[k]
        ext = a[i] * (1.0 + abs(w2[i]) + abs(w3[i]) + abs(w5[i])) + 2.0
        ylo = max(math.floor(cy[i] - ext) - y0, 0)
        yhi = min(math.ceil(cy[i] + ext) - y0 + 1, h)
        xlo = max(math.floor(cx[i] - ext) - x0, 0)
        xhi = min(math.ceil(cx[i] + ext) - x0 + 1, w)
        cseed = seed + 7919 * int(cell_id[i])
        for iy in range(ylo, yhi):
            for ix in range(xlo, xhi):
                xg = x0 + ix
                yg = y0 + iy
                dx = xg - cx[i]
                dy = yg - cy[i]
                rho, r_edge, un, vn = _shape(
                    dx, dy, a[i], b[i], ct[i], st[i], w2[i], c2p[i], s2p[i], w3[i], c3p[i], s3p[i], w5[i]
                )
                if rho < r_edge:
                    labels[iy, ix] = cell_id[i]
                if not want_image:
                    continue
                # anti-aliased coverage: ~1 px wide edge
                dist_px = (r_edge - rho) * b[i]
                alpha = dist_px + 0.5
                if alpha <= 0.0:
                    continue
                if alpha > 1.0:
                    alpha = 1.0
                d = rho / r_edge
                xm = xg * mpp
                ym = yg * mpp
                kd = kind[i]
                if kd == TUMOUR:  # large pale vesicular nucleus: dark rim, fine chromatin, nucleolus
                    tex = _smoothstep(0.35, 0.85, _chromatin(xm, ym, 1.1, cseed))
                    val = 0.50 + 0.38 * tex + 0.22 * _smoothstep(0.72, 0.98, d)
                    du = un - nuc_u[i]
                    dv = vn - nuc_v[i]
                    if du * du + dv * dv < nuc_r[i] * nuc_r[i]:
                        val += 0.55
                elif kd == LYMPHOCYTE:  # small, round, dense, coarse clumps
                    tex = _chromatin(xm, ym, 0.9, cseed)
                    val = 1.0 + 0.45 * tex
                elif kd == FIBROBLAST:  # thin spindle, evenly dark
                    tex = _chromatin(xm, ym, 0.8, cseed)
                    val = 0.90 + 0.30 * tex
                elif kd == MACROPHAGE:  # oval/kidney, moderately stained, fine chromatin
                    tex = _chromatin(xm, ym, 0.8, cseed)
                    val = 0.55 + 0.30 * tex + 0.2 * _smoothstep(0.8, 1.0, d)
                else:  # endothelial: flat, dark
                    tex = _chromatin(xm, ym, 0.8, cseed)
                    val = 0.85 + 0.25 * tex
                od_h[iy, ix] += alpha * val * hst[i]
                od_e[iy, ix] *= 1.0 - 0.55 * alpha


@njit(cache=True, nogil=True)
def visible_stats(
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ct: np.ndarray,
    st: np.ndarray,
    w2: np.ndarray,
    c2p: np.ndarray,
    s2p: np.ndarray,
    w3: np.ndarray,
    c3p: np.ndarray,
    s3p: np.ndarray,
    w5: np.ndarray,
    z: np.ndarray,
    nbr_ptr: np.ndarray,
    nbr_idx: np.ndarray,
    active: np.ndarray,
    alive: np.ndarray,
    height: int,
    width: int,
    out: np.ndarray,
) -> None:
    """Per cell: full pixel count, visible pixel count and visible centroid sums (x, y).

    Only pixels inside the ``height`` × ``width`` image count; only ``active`` cells are measured
    (their rows of ``out`` are overwritten) and only ``alive`` cells occlude.
    A pixel is visible for cell ``i`` when no neighbour with a larger depth ``z`` covers it — the
    rule :func:`render_cells` applies when it paints labels bottom first.
    ``out`` columns: full area, visible area, sum x, sum y (pixels).
    """
    n = cx.shape[0]
    for i in range(n):
        if not active[i]:
            continue
        ext = a[i] * (1.0 + abs(w2[i]) + abs(w3[i]) + abs(w5[i])) + 2.0
        ylo = max(math.floor(cy[i] - ext), 0)
        yhi = min(math.ceil(cy[i] + ext) + 1, height)
        xlo = max(math.floor(cx[i] - ext), 0)
        xhi = min(math.ceil(cx[i] + ext) + 1, width)
        full = 0.0
        vis = 0.0
        sx = 0.0
        sy = 0.0
        for yg in range(ylo, yhi):
            for xg in range(xlo, xhi):
                rho, r_edge, _un, _vn = _shape(
                    xg - cx[i],
                    yg - cy[i],
                    a[i],
                    b[i],
                    ct[i],
                    st[i],
                    w2[i],
                    c2p[i],
                    s2p[i],
                    w3[i],
                    c3p[i],
                    s3p[i],
                    w5[i],
                )
                if rho >= r_edge:
                    continue
                full += 1.0
                covered = False
                for q in range(nbr_ptr[i], nbr_ptr[i + 1]):
                    j = nbr_idx[q]
                    if z[j] <= z[i] or not alive[j]:
                        continue
                    ddx = xg - cx[j]
                    ddy = yg - cy[j]
                    rmax = a[j] * (1.0 + abs(w2[j]) + abs(w3[j]) + abs(w5[j]))
                    if ddx * ddx + ddy * ddy >= rmax * rmax:
                        continue
                    rj, ej, _uj, _vj = _shape(
                        xg - cx[j],
                        yg - cy[j],
                        a[j],
                        b[j],
                        ct[j],
                        st[j],
                        w2[j],
                        c2p[j],
                        s2p[j],
                        w3[j],
                        c3p[j],
                        s3p[j],
                        w5[j],
                    )
                    if rj < ej:
                        covered = True
                        break
                if not covered:
                    vis += 1.0
                    sx += xg
                    sy += yg
        out[i, 0] = full
        out[i, 1] = vis
        out[i, 2] = sx
        out[i, 3] = sy


@njit(cache=True, nogil=True)
def finish_rgb(y0: int, x0: int, seed: int, sd: float, rgb: np.ndarray, out: np.ndarray) -> None:
    """Add sensor noise (sd in 8-bit levels; partly shared between channels), round, clip to uint8."""
    _, h, w = out.shape
    for iy in range(h):
        for ix in range(w):
            yg = y0 + iy
            xg = x0 + ix
            common = 0.0
            if sd > 0.0:
                common = _hash01(xg, yg, seed + 101) + _hash01(xg, yg, seed + 102) - 1.0
            for ch in range(3):
                val = rgb[ch, iy, ix]
                if sd > 0.0:
                    own = _hash01(xg, yg, seed + 103 + ch) + _hash01(xg, yg, seed + 113 + ch) - 1.0
                    val += sd * 2.45 * (0.6 * common + 0.8 * own)
                val = math.floor(val + 0.5)
                if val < 0.0:
                    val = 0.0
                elif val > 255.0:
                    val = 255.0
                out[ch, iy, ix] = np.uint8(val)


@njit(cache=True, nogil=True)
def hardcore_rsa(
    x: np.ndarray, y: np.ndarray, r: np.ndarray, fac: np.ndarray, nbr_ptr: np.ndarray, nbr_idx: np.ndarray
) -> np.ndarray:
    """Random sequential adsorption: accept points in index order unless an accepted one is closer
    than ``(fac_i + fac_j) / 2 · (r_i + r_j)``. Returns the boolean mask of accepted points."""
    n = x.shape[0]
    acc = np.zeros(n, np.bool_)
    for i in range(n):
        ok = True
        for q in range(nbr_ptr[i], nbr_ptr[i + 1]):
            j = nbr_idx[q]
            if j >= i or not acc[j]:
                continue
            dmin = 0.5 * (fac[i] + fac[j]) * (r[i] + r[j])
            dx = x[i] - x[j]
            dy = y[i] - y[j]
            if dx * dx + dy * dy < dmin * dmin:
                ok = False
                break
        acc[i] = ok
    return acc


@njit(cache=True, nogil=True)
def render_vessels(
    y0: int,
    x0: int,
    idx: np.ndarray,
    vx: np.ndarray,
    vy: np.ndarray,
    vr: np.ndarray,
    n_rbc: np.ndarray,
    mpp: float,
    seed: int,
    od_h: np.ndarray,
    od_e: np.ndarray,
) -> None:
    """Capillaries: a clear lumen (faint plasma) with red blood cells and an eosinophilic wall."""
    h, w = od_h.shape
    wall = 2.0 / mpp
    rbc = 3.6 / mpp
    for k in range(idx.shape[0]):
        v = idx[k]
        ext = vr[v] + wall + 1.0
        ylo = max(math.floor(vy[v] - ext) - y0, 0)
        yhi = min(math.ceil(vy[v] + ext) - y0 + 1, h)
        xlo = max(math.floor(vx[v] - ext) - x0, 0)
        xhi = min(math.ceil(vx[v] + ext) - x0 + 1, w)
        for iy in range(ylo, yhi):
            for ix in range(xlo, xhi):
                dx = (x0 + ix) - vx[v]
                dy = (y0 + iy) - vy[v]
                d = math.sqrt(dx * dx + dy * dy)
                if d < vr[v]:
                    e = 0.03
                    hh = 0.01
                    for m in range(n_rbc[v]):
                        ang = 6.283185307179586 * _hash01(v, m, seed + 31)
                        rad = max(vr[v] - rbc, 0.0) * math.sqrt(_hash01(v, m, seed + 37))
                        ex = dx - rad * math.cos(ang)
                        ey = dy - rad * math.sin(ang)
                        q = math.sqrt(ex * ex + ey * ey) / rbc
                        if q < 1.0:
                            e = max(e, 0.75 - 0.25 * math.exp(-q * q / 0.15))
                            hh = 0.03
                    od_e[iy, ix] = e
                    od_h[iy, ix] = hh
                elif d < vr[v] + wall:
                    f = 1.0 - (d - vr[v]) / wall
                    od_e[iy, ix] = max(od_e[iy, ix], 0.32 * f + od_e[iy, ix] * (1.0 - f))
