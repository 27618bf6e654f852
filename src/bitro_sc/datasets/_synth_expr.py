"""Gene programs and cell-level counts of synthetic slides.

Expression depends only on what a pathologist could see: the cell type (nucleus morphology),
nucleus size, the neighbourhood (lymphocytes nearby, distance to / depth inside a tumour nest), and
a slow gradient across the slide. Patient effects (e.g. ERBB2 amplification) are invisible, as in
real tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._synth_tissue import CELL_TYPES

# marker genes: type -> symbols (log-fold +3 over the background in that type)
_MARKERS = {
    "tumour": [
        "EPCAM",
        "KRT19",
        "KRT8",
        "KRT18",
        "CDH1",
        "ERBB2",
        "SCGB2A2",
        "MUC1",
        "CD24",
        "KRT7",
        "AGR2",
        "TFF1",
    ],
    "fibroblast": ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "FN1", "SPARC", "PDGFRB", "MGP", "COL6A3"],
    "lymphocyte": ["PTPRC", "CD3E", "CD2", "CD52", "CCL5", "IGKC", "MS4A1", "CXCR4", "IL7R", "CD79A"],
    "macrophage": ["CD68", "CD163", "LYZ", "C1QA", "C1QB", "APOE", "TYROBP", "FCER1G", "CD74", "HLA-DRA"],
    "endothelial": ["PECAM1", "VWF", "CDH5", "PLVAP", "ENG", "SPARCL1", "RAMP2", "EGFL7"],
}
_HOUSEKEEPING = ["ACTB", "GAPDH", "B2M", "MALAT1", "TMSB4X", "EEF1A1", "RPLP0", "FTL", "FTH1", "TPT1"]
# spatial / visible-state programs: name -> (cell types it acts in, genes, log-fold per unit covariate)
_PROGRAMS = {
    "hypoxia": (("tumour",), ["VEGFA", "CA9", "NDRG1", "BNIP3", "ADM"], 2.0),
    "proliferation": (("tumour",), ["MKI67", "TOP2A", "CCNB1", "BIRC5"], 1.2),
    "interferon": (("tumour", "macrophage"), ["ISG15", "IFI27", "IFI6", "CXCL9", "CXCL10", "STAT1"], 2.0),
    "caf": (("fibroblast",), ["POSTN", "FAP", "ACTA2", "MMP11", "COL11A1"], 2.2),
    "gradient": (CELL_TYPES, ["FOS", "JUN", "EGR1"], 1.5),
}
PROGRAMS = tuple(_PROGRAMS)
# relative RNA content per cell type (bigger cells hold more RNA)
_RNA = {"tumour": 1.6, "fibroblast": 0.8, "lymphocyte": 0.45, "macrophage": 1.0, "endothelial": 0.7}


@dataclass(frozen=True)
class GeneModel:
    """Per-gene parameters shared by all slides of a call (patients add their own offsets)."""

    names: list[str]
    log_mu: np.ndarray  # (n_types, n_genes) log expected share before normalisation
    program_lfc: np.ndarray  # (n_programs, n_types, n_genes)
    theta: np.ndarray  # (n_genes,) NB inverse dispersion
    patient_sd: np.ndarray  # (n_genes,) sd of patient log-offsets


def gene_model(n_genes: int, rng: np.random.Generator) -> GeneModel:
    """Names and programs of ``n_genes`` genes: real markers first, then synthetic ``SYNnnnn``."""
    curated: list[tuple[str, str, str | None]] = []  # (symbol, role, type or program)
    for t, genes in _MARKERS.items():
        curated += [(g, "marker", t) for g in genes]
    curated += [(g, "housekeeping", None) for g in _HOUSEKEEPING]
    for p, (_, genes, _) in _PROGRAMS.items():
        curated += [(g, "program", p) for g in genes]
    # interleave so that a small n_genes still covers every type and program
    by_group: dict[str, list[tuple[str, str, str | None]]] = {}
    for item in curated:
        by_group.setdefault(f"{item[1]}:{item[2]}", []).append(item)
    ordered: list[tuple[str, str, str | None]] = []
    while any(by_group.values()):
        for lst in by_group.values():
            if lst:
                ordered.append(lst.pop(0))
    chosen = ordered[:n_genes]
    n_syn = n_genes - len(chosen)
    names = [g for g, _, _ in chosen] + [f"SYN{i + 1:05d}" for i in range(n_syn)]

    nt, npg = len(CELL_TYPES), len(_PROGRAMS)
    log_mu = rng.normal(-1.0, 0.9, (1, n_genes)) + rng.normal(0.0, 0.35, (nt, n_genes))
    lfc = np.zeros((npg, nt, n_genes))
    for j, (g, role, grp) in enumerate(chosen):
        if role == "marker":
            log_mu[CELL_TYPES.index(str(grp)), j] += 3.2
            if g == "CD74":  # also up in lymphocytes (B cells)
                log_mu[CELL_TYPES.index("lymphocyte"), j] += 2.0
        elif role == "housekeeping":
            log_mu[:, j] += 3.0
        elif grp is not None:
            prog = PROGRAMS.index(grp)
            types, _, eff = _PROGRAMS[grp]
            for t in types:
                lfc[prog, CELL_TYPES.index(t), j] = eff * rng.uniform(0.8, 1.2)
                log_mu[CELL_TYPES.index(t), j] += 0.8
    for j in range(len(chosen), n_genes):  # synthetic genes: sparse type programs, some spatial
        if rng.random() < 0.45:
            log_mu[rng.integers(nt), j] += rng.normal(2.0, 0.7)
        if rng.random() < 0.15:
            prog = int(rng.integers(npg))
            for t in _PROGRAMS[PROGRAMS[prog]][0]:
                lfc[prog, CELL_TYPES.index(t), j] = rng.normal(0, 1.2)
    theta = 10 ** rng.uniform(0.3, 1.3, n_genes)
    patient_sd = np.full(n_genes, 0.2)
    if "ERBB2" in names:  # amplified in some patients, invisible in H&E
        patient_sd[names.index("ERBB2")] = 1.2
    return GeneModel(names=names, log_mu=log_mu, program_lfc=lfc, theta=theta, patient_sd=patient_sd)


def covariates(
    cells: dict[str, np.ndarray], *, depth_um: np.ndarray, width_um: float, mpp: float
) -> np.ndarray:
    """(n_cells, n_programs) visible-state covariates in the order of :data:`PROGRAMS`."""
    from scipy.spatial import cKDTree

    n = len(cells["x_px"])
    x_um = cells["x_px"] * mpp
    y_um = cells["y_px"] * mpp
    kind = cells["kind"]
    cov = np.zeros((n, len(PROGRAMS)))
    d = depth_um
    cov[:, 0] = 1.0 - np.exp(-np.clip(d, 0.0, None) / 30.0)  # hypoxia: deep inside a nest
    area = cells["area_px"] * mpp * mpp
    for t in range(len(CELL_TYPES)):
        sel = kind == t
        if sel.sum() > 1:
            la = np.log(area[sel])
            cov[sel, 1] = np.clip((la - la.mean()) / (la.std() + 1e-9), -2.5, 2.5)  # nucleus size
    lym = kind == CELL_TYPES.index("lymphocyte")
    if lym.any() and n:
        cnt = cKDTree(np.c_[x_um[lym], y_um[lym]]).query_ball_point(
            np.c_[x_um, y_um], r=30.0, return_length=True
        )
        cnt = cnt - lym.astype(int)  # not oneself
        cov[:, 2] = 1.0 - np.exp(-cnt / 4.0)
    cov[:, 3] = np.exp(-np.clip(-d, 0, None) / 40.0) * (d <= 0)  # close to a nest, outside it
    cov[:, 4] = x_um / max(width_um, 1e-9) - 0.5
    return cov


def cell_expression(
    model: GeneModel,
    kind: np.ndarray,
    cov: np.ndarray,
    area_rel: np.ndarray,
    patient_offset: np.ndarray,
    *,
    umi_per_cell: float,
    rng: np.random.Generator,
    block: int = 20000,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free rates and negative-binomial counts (float32, cells × genes)."""
    n, g = len(kind), len(model.names)
    log_mu = model.log_mu + patient_offset[None, :]
    norm = np.log(np.exp(model.log_mu).sum(axis=1))  # per type, without patient / program effects
    rna = np.array([_RNA[t] for t in CELL_TYPES])
    size = rng.lognormal(0.0, 0.3, n) * rna[kind] * np.sqrt(np.clip(area_rel, 0.2, 5.0))
    rate = np.empty((n, g), np.float32)
    counts = np.empty((n, g), np.float32)
    for s in range(0, n, block):
        sl = slice(s, min(s + block, n))
        k = kind[sl]
        eff = np.einsum("cp,pcg->cg", cov[sl], model.program_lfc[:, k, :])
        r = umi_per_cell * size[sl, None] * np.exp(log_mu[k] + eff - norm[k, None])
        rate[sl] = r
        lam = rng.gamma(model.theta[None, :], r / model.theta[None, :])
        counts[sl] = rng.poisson(lam)
    return rate, counts
