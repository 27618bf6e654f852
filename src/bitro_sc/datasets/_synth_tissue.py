"""Tissue layout, cell list and region rendering of one synthetic slide.

A slide is planned up front as compact arrays — coarse region fields (tumour nests, stroma, immune
infiltrate, glass) on a grid of a few µm and one row per cell — and pixels are rendered on demand for
any rectangle (:meth:`SlidePlan.render`), so a whole slide never has to sit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CELL_TYPES = ("tumour", "fibroblast", "lymphocyte", "macrophage", "endothelial")
REGIONS = ("tumour", "stroma", "immune")
#: the coarse region fields a plan keeps, in the order of ``SlidePlan.fields``
FIELDS = ("tissue", "tumour", "immune", "c2", "s2")

# per type: mean and sd of the nucleus semi-major axis (µm), minor/major ratio range, boundary
# irregularity, haematoxylin strength, cytoplasm size factor, cytoplasm eosin / haematoxylin OD
_MORPH = {
    "tumour": {"a": (5.6, 1.0), "ratio": (0.62, 0.95), "w": (0.07, 0.06), "cyto": (1.45, 0.26, 0.10)},
    "fibroblast": {"a": (6.8, 1.0), "ratio": (0.24, 0.38), "w": (0.04, 0.03), "cyto": (1.2, 0.22, 0.04)},
    "lymphocyte": {"a": (3.3, 0.3), "ratio": (0.85, 1.00), "w": (0.03, 0.03), "cyto": (1.2, 0.10, 0.06)},
    "macrophage": {"a": (5.2, 0.6), "ratio": (0.60, 0.85), "w": (0.05, 0.12), "cyto": (2.0, 0.22, 0.07)},
    "endothelial": {"a": (6.0, 0.8), "ratio": (0.24, 0.34), "w": (0.04, 0.03), "cyto": (1.25, 0.18, 0.04)},
}

# cells per mm² of each region, and the cell-type mix of each region
_DENSITY = {"tumour": 5200.0, "stroma": 1100.0, "immune": 4400.0}
_OVERSAMPLE = {"tumour": 1.6, "stroma": 1.1, "immune": 1.3}
# hard-core factor: nuclei closer than factor × (sum of mean radii) are not placed
_PACKING = {"tumour": 0.85, "fibroblast": 0.55, "lymphocyte": 0.7, "macrophage": 0.7, "endothelial": 0.55}
#: capillaries per mm² of stroma, lumen radius (µm: median, log-sd, min, max)
_VESSELS = (45.0, (6.0, 0.4, 3.5, 14.0))
_MIX = {
    "tumour": {"tumour": 0.90, "lymphocyte": 0.05, "macrophage": 0.04, "fibroblast": 0.01},
    "stroma": {"fibroblast": 0.62, "endothelial": 0.12, "macrophage": 0.10, "lymphocyte": 0.16},
    "immune": {"lymphocyte": 0.80, "macrophage": 0.10, "fibroblast": 0.05, "endothelial": 0.05},
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed with a Gaussian of ``sigma`` grid cells (FFT), scaled to unit sd."""
    import scipy.fft
    from scipy import ndimage

    step = max(1, int(sigma // 4))  # a smooth field needs only a coarse lattice: draw it there
    small = (shape[0] // step + 2, shape[1] // step + 2) if step > 1 else shape
    white = rng.standard_normal(small, dtype=np.float32)
    f = scipy.fft.rfft2(white)
    f = ndimage.fourier_gaussian(f, sigma=sigma / step, n=small[1])
    out = scipy.fft.irfft2(f, s=small).astype(np.float64)
    if step > 1:
        gy, gx = np.arange(shape[0]) / step, np.arange(shape[1]) / step
        out = ndimage.map_coordinates(out, np.meshgrid(gy, gx, indexing="ij"), order=1, mode="nearest")
    sd = out.std()
    return out / sd if sd > 0 else out


@dataclass
class SlidePlan:
    """Everything needed to render any rectangle of one slide, and the cell-level facts."""

    height_px: int
    width_px: int
    mpp: float
    grid_um: float
    depth_um: np.ndarray  # signed distance to the tumour boundary (µm; > 0 inside nests)
    vessels: dict[str, np.ndarray]  # capillaries: centre, lumen radius (pixels), red blood cells
    fields: np.ndarray  # (5, gy, gx) float32: FIELDS (soft tissue / tumour / immune, fibre angle)
    cells: dict[str, np.ndarray]  # compact per-cell arrays (pixels), sorted by (y, x)
    seed: int
    stain: np.ndarray  # (2, 3) H and E optical density vectors (RGB)
    glass: np.ndarray  # (3,) transmission of the bare glass (white balance)
    blur_um: float
    noise_sd: float

    # ---------------------------------------------------------------------------------------
    def fields_at(self, ys: np.ndarray, xs: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """Bilinear interpolation of grid fields at pixel coordinates (any shape)."""
        from scipy import ndimage

        coords = np.stack(
            [np.asarray(ys, float) * self.mpp / self.grid_um, np.asarray(xs, float) * self.mpp / self.grid_um]
        )
        return [
            ndimage.map_coordinates(self.fields[FIELDS.index(n)], coords, order=1, mode="nearest")
            for n in names
        ]

    def _select(self, y0: int, x0: int, h: int, w: int, pad: float) -> np.ndarray:
        c = self.cells
        lo, hi = np.searchsorted(c["cy"], [y0 - pad, y0 + h + pad])
        sel = np.arange(lo, hi)
        x = c["cx"][sel]
        sel = sel[(x >= x0 - pad) & (x <= x0 + w + pad)]
        return sel[np.argsort(c["z"][sel], kind="stable")]

    def render_labels(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """uint32 nucleus labels of the rectangle (0 = no nucleus)."""

        labels = np.zeros((h, w), np.uint32)
        dummy = np.zeros((1, 1), np.float32)
        self._paint(y0, x0, h, w, dummy, dummy, labels, want_image=False)
        return labels

    def _paint(
        self,
        y0: int,
        x0: int,
        h: int,
        w: int,
        od_h: np.ndarray,
        od_e: np.ndarray,
        labels: np.ndarray,
        *,
        want_image: bool,
    ) -> None:
        from ._synth_render import render_cells

        c = self.cells
        pad = float(c["ext"].max()) + 4.0 if len(c["cx"]) else 0.0
        idx = self._select(y0, x0, h, w, pad)
        render_cells(
            y0, x0, h, w, idx.astype(np.int64),
            c["cx"], c["cy"], c["a"], c["b"], c["ct"], c["st"],
            c["w2"], c["c2p"], c["s2p"], c["w3"], c["c3p"], c["s3p"], c["w5"],
            c["kind"], c["hst"], c["cyto_f"], c["cyto_e"], c["cyto_h"], c["nuc_u"], c["nuc_v"], c["nuc_r"],
            c["cell_id"], self.mpp, self.seed, od_h, od_e, labels, want_image,
        )  # fmt: skip

    def blur_margin(self) -> int:
        sigma = self.blur_um / self.mpp
        return math.ceil(4.0 * sigma) + 1 if sigma > 0 else 0

    def render(
        self, y0: int, x0: int, h: int, w: int, *, with_labels: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 ``(3, h, w)`` and (optionally) uint32 labels ``(h, w)`` of a rectangle."""
        from scipy import ndimage

        from ._synth_render import compose_rgb, finish_rgb, render_background, render_vessels

        m = self.blur_margin()
        ye, xe, he, we = y0 - m, x0 - m, h + 2 * m, w + 2 * m
        od_h = np.empty((he, we), np.float32)
        od_e = np.empty((he, we), np.float32)
        render_background(ye, xe, self.fields, self.grid_um, self.mpp, self.seed, od_h, od_e)
        v = self.vessels
        if len(v["vx"]):
            pad = float(v["vr"].max()) + 8.0 / self.mpp
            vsel = np.flatnonzero(
                (v["vx"] > xe - pad)
                & (v["vx"] < xe + we + pad)
                & (v["vy"] > ye - pad)
                & (v["vy"] < ye + he + pad)
            )
            render_vessels(
                ye, xe, vsel, v["vx"], v["vy"], v["vr"], v["n_rbc"], self.mpp, self.seed, od_h, od_e
            )
        labels_e = np.zeros((he, we), np.uint32)
        self._paint(ye, xe, he, we, od_h, od_e, labels_e, want_image=True)
        rgb = np.empty((3, he, we), np.float32)
        compose_rgb(ye, xe, od_h, od_e, self.stain, self.glass, self.mpp, self.seed, rgb)
        del od_h, od_e
        sigma = self.blur_um / self.mpp
        if sigma > 0:
            for ch in range(3):
                ndimage.gaussian_filter(rgb[ch], sigma, mode="nearest", truncate=4.0, output=rgb[ch])
        out = np.empty((3, h, w), np.uint8)
        finish_rgb(y0, x0, self.seed, self.noise_sd, rgb[:, m : m + h, m : m + w], out)
        labels = labels_e[m : m + h, m : m + w].copy() if with_labels else None
        return out, labels


# -------------------------------------------------------------------------------------------
def plan_slide(
    *,
    height_um: float,
    width_um: float,
    mpp: float,
    rng: np.random.Generator,
    tumour_fraction: float,
    immune_fraction: float,
    density_scale: float = 1.0,
    blur_um: float = 0.35,
    noise_sd: float = 3.0,
) -> SlidePlan:
    """Draw the tissue layout and the cell list of one slide."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    height_px = round(height_um / mpp)
    width_px = round(width_um / mpp)
    size = max(height_um, width_um)
    grid_um = max(4.0, size / 2500.0)
    gy = math.ceil(height_um / grid_um) + 2
    gx = math.ceil(width_um / grid_um) + 2
    shape = (gy, gx)
    yy, xx = np.mgrid[0:gy, 0:gx] * grid_um

    # --- tissue outline: a rotated ellipse with a wavy border, and a few holes -----------------
    cyu = height_um * (0.5 + rng.uniform(-0.04, 0.04))
    cxu = width_um * (0.5 + rng.uniform(-0.04, 0.04))
    ang = rng.uniform(0, np.pi)
    ry, rx = height_um * rng.uniform(0.40, 0.47), width_um * rng.uniform(0.40, 0.47)
    du, dv = (
        (xx - cxu) * np.cos(ang) + (yy - cyu) * np.sin(ang),
        -(xx - cxu) * np.sin(ang) + (yy - cyu) * np.cos(ang),
    )
    rr = (du / rx) ** 2 + (dv / ry) ** 2
    raw = (1.0 - rr) + 0.35 * _smooth_noise(rng, shape, 0.10 * size / grid_um)
    raw += 0.10 * _smooth_noise(rng, shape, 25.0 / grid_um)
    hard = raw > 0
    holes = _smooth_noise(rng, shape, 12.0 / grid_um) > 2.7
    hard &= ~holes

    # --- tumour nests: thresholded band-pass noise at the patient's tumour fraction ------------
    nest = _smooth_noise(rng, shape, 22.0 / grid_um) + 0.6 * _smooth_noise(rng, shape, 120.0 / grid_um)
    thr = np.quantile(nest[hard], 1.0 - tumour_fraction) if hard.any() else np.inf
    tum = hard & (nest > thr)
    outside_um = ndimage.distance_transform_edt(~tum) * grid_um if tum.any() else np.full(shape, 1e6)
    inside_um = ndimage.distance_transform_edt(tum) * grid_um
    depth = np.where(tum, inside_um, -outside_um)

    # --- immune infiltrate: a patchy band around nests plus lymphoid aggregates ---------------
    patch = _smooth_noise(rng, shape, 25.0 / grid_um)
    agg = _smooth_noise(rng, shape, 45.0 / grid_um)
    cand = hard & ~tum
    band = cand & (outside_um < 40.0) & (patch > 0.0)
    if cand.any():
        agg_thr = np.quantile(
            agg[cand], 1.0 - max(immune_fraction - 0.5 * band.sum() / max(cand.sum(), 1), 0.01)
        )
    else:
        agg_thr = np.inf
    imm = cand & (band | (agg > agg_thr))

    # --- fibre direction: wraps around nests, wanders elsewhere --------------------------------
    sm = ndimage.gaussian_filter(tum.astype(float), 40.0 / grid_um)
    gyy, gxx = np.gradient(sm)
    mag = np.hypot(gxx, gyy)
    theta = np.arctan2(gyy, gxx) + np.pi / 2
    theta_n = np.pi * _smooth_noise(rng, shape, 60.0 / grid_um)
    m = np.clip(mag / (np.percentile(mag[hard], 75) + 1e-9), 0, 1) if hard.any() else np.zeros(shape)
    c2 = m * np.cos(2 * theta) + (1 - m) * np.cos(2 * theta_n)
    s2 = m * np.sin(2 * theta) + (1 - m) * np.sin(2 * theta_n)

    soft = lambda b: ndimage.gaussian_filter(b.astype(float), 0.8)  # noqa: E731
    plan_fields = {
        "tissue": soft(hard),
        "tumour": soft(tum) * soft(hard),
        "immune": soft(imm) * soft(hard),
        "c2": c2,
        "s2": s2,
        "depth_um": depth,
    }

    # --- cells: inhomogeneous Poisson on the grid, then a soft hard-core ------------------------
    region_code = np.full(shape, -1, np.int8)
    region_code[hard & ~tum & ~imm] = 1
    region_code[imm] = 2
    region_code[tum] = 0
    lam = np.zeros(shape)
    for r, name in enumerate(REGIONS):
        lam[region_code == r] = _DENSITY[name] * 1e-6 * density_scale  # per µm²
    # keep the last grid row/col (beyond the image) empty
    lam[int(height_um // grid_um) :, :] = 0
    lam[:, int(width_um // grid_um) :] = 0
    # oversample; random sequential adsorption below thins to a realistic packing
    over = np.zeros(shape)
    for r, name in enumerate(REGIONS):
        over[region_code == r] = _OVERSAMPLE[name]
    lam = lam * over
    expected = lam.sum() * grid_um**2
    n = int(rng.poisson(expected)) if expected > 0 else 0
    flat = lam.ravel()
    pick = rng.choice(flat.size, size=n, p=flat / flat.sum()) if n > 0 else np.zeros(0, int)
    py, px = np.unravel_index(pick, shape)
    y_um = (py + rng.random(n)) * grid_um
    x_um = (px + rng.random(n)) * grid_um
    reg = region_code[py, px].astype(np.int64)
    inside_img = (y_um < height_um - 0.5 * mpp) & (x_um < width_um - 0.5 * mpp)
    tis_at = ndimage.map_coordinates(
        plan_fields["tissue"], np.stack([y_um / grid_um, x_um / grid_um]), order=1, mode="nearest"
    )
    keep = inside_img & (tis_at > 0.62)
    y_um, x_um, reg = y_um[keep], x_um[keep], reg[keep]
    n = len(y_um)

    kind = np.empty(n, np.int64)
    u = rng.random(n)
    for r, name in enumerate(REGIONS):
        sel = np.flatnonzero(reg == r)
        mix = _MIX[name]
        names = list(mix)
        cum = np.cumsum([mix[t] for t in names])
        cum /= cum[-1]
        kind[sel] = np.array([CELL_TYPES.index(t) for t in names])[
            np.searchsorted(cum, u[sel], side="right").clip(0, len(names) - 1)
        ]

    # morphology (µm)
    a_um = np.empty(n)
    ratio = np.empty(n)
    w2 = np.empty(n)
    w3 = np.empty(n)
    hst = np.empty(n)
    cyto_f = np.empty(n)
    cyto_e = np.empty(n)
    cyto_h = np.empty(n)
    for t, name in enumerate(CELL_TYPES):
        sel = kind == t
        k = int(sel.sum())
        mo = _MORPH[name]
        a_um[sel] = np.clip(rng.normal(mo["a"][0], mo["a"][1], k), 0.55 * mo["a"][0], 1.8 * mo["a"][0])
        ratio[sel] = rng.uniform(mo["ratio"][0], mo["ratio"][1], k)
        w2[sel] = rng.uniform(0, mo["w"][0], k) * 1.0
        w3[sel] = rng.uniform(0, mo["w"][1], k)
        hst[sel] = rng.lognormal(0.0, 0.12, k)
        cyto_f[sel] = mo["cyto"][0] * rng.uniform(0.9, 1.1, k)
        cyto_e[sel] = mo["cyto"][1] * rng.uniform(0.85, 1.15, k)
        cyto_h[sel] = mo["cyto"][2]
    b_um = a_um * ratio
    # orientation: spindle cells follow the fibres, others random
    c2_at, s2_at = (
        ndimage.map_coordinates(f, np.stack([y_um / grid_um, x_um / grid_um]), order=1, mode="nearest")
        for f in (c2, s2)
    )
    theta_c = np.where(
        np.isin(kind, [1, 4]),
        0.5 * np.arctan2(s2_at, c2_at) + rng.normal(0, 0.25, n),
        rng.uniform(0, np.pi, n),
    )

    # --- capillaries in the stroma: lumen, endothelial nuclei around it -------------------------
    stroma_cells = np.flatnonzero(region_code.ravel() == 1)
    n_v = (
        int(rng.poisson(_VESSELS[0] * density_scale * len(stroma_cells) * grid_um**2 * 1e-6))
        if len(stroma_cells)
        else 0
    )
    pick_v = rng.choice(stroma_cells, size=n_v) if n_v else np.zeros(0, int)
    vy_, vx_ = np.unravel_index(pick_v, shape)
    vy = (vy_ + rng.random(n_v)) * grid_um
    vx = (vx_ + rng.random(n_v)) * grid_um
    med, lsd, rmin, rmax = _VESSELS[1]
    vr = np.clip(rng.lognormal(np.log(med), lsd, n_v), rmin, rmax)
    if n_v:
        okv = np.ones(n_v, bool)
        if n_v > 1:
            vp = cKDTree(np.c_[vx, vy]).query_pairs(r=2 * rmax + 12.0, output_type="ndarray")
            if len(vp):
                too_close = np.hypot(vx[vp[:, 0]] - vx[vp[:, 1]], vy[vp[:, 0]] - vy[vp[:, 1]]) < (
                    vr[vp[:, 0]] + vr[vp[:, 1]] + 12.0
                )
                okv[vp[too_close].max(axis=1)] = False
        (tis_v,) = (
            ndimage.map_coordinates(
                plan_fields["tissue"], np.stack([vy / grid_um, vx / grid_um]), order=1, mode="nearest"
            ),
        )
        okv &= (
            (tis_v > 0.8)
            & (vy > vr + 3)
            & (vx > vr + 3)
            & (vy < height_um - vr - 3)
            & (vx < width_um - vr - 3)
        )
        vx, vy, vr = vx[okv], vy[okv], vr[okv]
        n_v = len(vr)
    # no other nucleus inside a lumen
    if n_v and n:
        near = cKDTree(np.c_[x_um, y_um]).query_ball_point(np.c_[vx, vy], r=vr + 4.5)
        clear = np.ones(n, bool)
        for lst in near:
            clear[lst] = False
        x_um, y_um, reg, kind = x_um[clear], y_um[clear], reg[clear], kind[clear]
        a_um, b_um, w2, w3 = a_um[clear], b_um[clear], w2[clear], w3[clear]
        hst, cyto_f, cyto_e, cyto_h, theta_c = (
            hst[clear],
            cyto_f[clear],
            cyto_e[clear],
            cyto_h[clear],
            theta_c[clear],
        )
        n = len(x_um)
    # endothelial nuclei on each ring, tangential
    ring_n = np.maximum(2, np.round(2 * np.pi * vr / 16.0)).astype(int)
    ring_v = np.repeat(np.arange(n_v), ring_n)
    phase = rng.uniform(0, 2 * np.pi, n_v)
    k_in = np.arange(len(ring_v)) - np.repeat(np.cumsum(ring_n) - ring_n, ring_n)
    ang_e = phase[ring_v] + 2 * np.pi * (k_in + rng.uniform(-0.2, 0.2, len(ring_v))) / ring_n[ring_v]
    mo = _MORPH["endothelial"]
    ne = len(ring_v)
    ea = np.clip(rng.normal(mo["a"][0], mo["a"][1], ne), 3.5, 9.0)
    eb = ea * rng.uniform(mo["ratio"][0], mo["ratio"][1], ne)
    rad_e = vr[ring_v] + 2.0 + eb
    ex_um = vx[ring_v] + rad_e * np.cos(ang_e)
    ey_um = vy[ring_v] + rad_e * np.sin(ang_e)
    inside_e = (ex_um > 1) & (ey_um > 1) & (ex_um < width_um - 1) & (ey_um < height_um - 1)
    endo = {
        "x_um": ex_um, "y_um": ey_um, "reg": np.ones(ne, np.int64), "kind": np.full(ne, 4, np.int64),
        "a_um": ea, "b_um": eb, "w2": rng.uniform(0, mo["w"][0], ne), "w3": rng.uniform(0, mo["w"][1], ne),
        "hst": rng.lognormal(0.0, 0.12, ne), "cyto_f": mo["cyto"][0] * rng.uniform(0.9, 1.1, ne),
        "cyto_e": mo["cyto"][1] * rng.uniform(0.85, 1.15, ne), "cyto_h": np.full(ne, mo["cyto"][2]),
        "theta_c": ang_e + np.pi / 2,
    }  # fmt: skip
    endo = {k: v[inside_e] for k, v in endo.items()}
    # endothelial cells first so that the packing keeps them
    x_um = np.concatenate([endo["x_um"], x_um])
    y_um = np.concatenate([endo["y_um"], y_um])
    reg = np.concatenate([endo["reg"], reg])
    kind = np.concatenate([endo["kind"], kind])
    a_um = np.concatenate([endo["a_um"], a_um])
    b_um = np.concatenate([endo["b_um"], b_um])
    w2 = np.concatenate([endo["w2"], w2])
    w3 = np.concatenate([endo["w3"], w3])
    hst = np.concatenate([endo["hst"], hst])
    cyto_f = np.concatenate([endo["cyto_f"], cyto_f])
    cyto_e = np.concatenate([endo["cyto_e"], cyto_e])
    cyto_h = np.concatenate([endo["cyto_h"], cyto_h])
    theta_c = np.concatenate([endo["theta_c"], theta_c])
    n = len(x_um)

    # packing: random sequential adsorption with a type-specific hard core
    from ._synth_render import hardcore_rsa

    r_mean = np.sqrt(a_um * b_um)
    fac = np.array([_PACKING[t] for t in CELL_TYPES])[kind] if n else np.zeros(0)
    ptr, nbr = _neighbours(x_um, y_um, 2.0 * float(r_mean.max()) if n else 1.0)
    keep = hardcore_rsa(x_um, y_um, r_mean, fac, ptr, nbr) if n else np.zeros(0, bool)

    cells = {
        "cy": y_um / mpp,
        "cx": x_um / mpp,
        "a": a_um / mpp,
        "b": b_um / mpp,
        "ct": np.cos(theta_c),
        "st": np.sin(theta_c),
        "w2": w2,
        "w3": w3,
        "kind": kind,
        "region": reg,
        "hst": hst,
        "cyto_f": cyto_f,
        "cyto_e": cyto_e,
        "cyto_h": cyto_h,
        "nuc_u": rng.uniform(-0.3, 0.3, n),
        "nuc_v": rng.uniform(-0.3, 0.3, n),
        "nuc_r": np.where(rng.random(n) < 0.8, rng.uniform(0.12, 0.2, n), 0.0),
        "z": rng.permutation(n).astype(np.int64),
    }
    cells["w5"] = rng.uniform(0.0, 0.035, n)
    for name in ("2", "3"):
        phase = rng.uniform(0, 2 * np.pi, n)
        cells[f"c{name}p"] = np.cos(phase)
        cells[f"s{name}p"] = np.sin(phase)
    cells = {k: v[keep] for k, v in cells.items()}
    cells = _finalise_cells(cells, height_px=height_px, width_px=width_px)

    stain = np.array([[0.62, 0.72, 0.31], [0.10, 0.94, 0.30]])
    stain += rng.normal(0, 0.04, stain.shape)
    stain = np.abs(stain) / np.linalg.norm(stain, axis=1, keepdims=True)
    stain[0] *= rng.uniform(0.85, 1.25)
    stain[1] *= rng.uniform(0.65, 1.2)
    glass = np.clip(1.0 - np.abs(rng.normal([0.035, 0.06, 0.05], 0.01)), 0.88, 1.0)

    vessels = {
        "vx": vx / mpp,
        "vy": vy / mpp,
        "vr": vr / mpp,
        "n_rbc": rng.integers(0, 5, n_v).astype(np.int64),
    }
    return SlidePlan(
        vessels=vessels,
        height_px=height_px,
        width_px=width_px,
        mpp=mpp,
        grid_um=grid_um,
        depth_um=depth,
        cells=cells,
        seed=int(rng.integers(0, 2**31 - 1)),
        stain=stain,
        glass=glass,
        fields=np.ascontiguousarray(np.stack([plan_fields[k] for k in FIELDS]), dtype=np.float32),
        blur_um=blur_um,
        noise_sd=noise_sd,
    )


def _neighbours(cx: np.ndarray, cy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric CSR neighbour lists of points within ``radius`` (pixels)."""
    from scipy.spatial import cKDTree

    n = len(cx)
    if n < 2:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(np.c_[cx, cy]).query_pairs(r=radius, output_type="ndarray")
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.argsort(src, kind="stable")
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=ptr[1:])
    return ptr, dst[order].astype(np.int64)


def _visible(
    cells: dict[str, np.ndarray],
    height_px: int,
    width_px: int,
    nbrs: tuple[np.ndarray, np.ndarray],
    active: np.ndarray,
    alive: np.ndarray,
    out: np.ndarray,
) -> None:
    """Visible-nucleus statistics (see ``visible_stats``) of the ``active`` cells, into ``out``."""
    from ._synth_render import visible_stats

    c = cells
    visible_stats(
        c["cx"], c["cy"], c["a"], c["b"], c["ct"], c["st"],
        c["w2"], c["c2p"], c["s2p"], c["w3"], c["c3p"], c["s3p"], c["w5"],
        c["z"], nbrs[0], nbrs[1], active, alive, height_px, width_px, out,
    )  # fmt: skip


def _finalise_cells(cells: dict[str, np.ndarray], *, height_px: int, width_px: int) -> dict[str, np.ndarray]:
    """Drop nuclei hidden by more than half, sort by (y, x), number them 1..n and measure them."""
    n0 = len(cells["cx"])
    ext = cells["a"] * (1.0 + np.abs(cells["w2"]) + np.abs(cells["w3"]) + np.abs(cells["w5"])) + 2.0
    ptr, nbr = _neighbours(cells["cx"], cells["cy"], 2.0 * float(ext.max()) if n0 else 1.0)
    stats = np.zeros((n0, 4))
    everyone = np.ones(n0, np.bool_)
    _visible(cells, height_px, width_px, (ptr, nbr), everyone, everyone, stats)
    ok = (stats[:, 1] >= 0.5 * stats[:, 0]) & (stats[:, 1] >= 4)
    # removing cells only uncovers the cells beneath them: measure those again
    dropped = np.flatnonzero(~ok)
    redo = np.zeros(n0, np.bool_)
    for i in dropped:
        redo[nbr[ptr[i] : ptr[i + 1]]] = True
    redo &= ok
    _visible(cells, height_px, width_px, (ptr, nbr), redo, ok, stats)
    cells = {k: v[ok] for k, v in cells.items()}
    stats = stats[ok]
    order = np.lexsort((cells["cx"], cells["cy"]))
    cells = {k: v[order] for k, v in cells.items()}
    stats = stats[order]
    n = len(order)
    cells["cell_id"] = np.arange(1, n + 1, dtype=np.uint32)
    cells["area_px"] = stats[:, 1]
    cells["x_px"] = stats[:, 2] / np.maximum(stats[:, 1], 1)
    cells["y_px"] = stats[:, 3] / np.maximum(stats[:, 1], 1)
    cells["ext"] = cells["a"] * cells["cyto_f"] * 1.35 + 2.0
    return cells
