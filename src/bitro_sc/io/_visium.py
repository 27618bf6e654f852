"""10x Genomics Visium (Space Ranger 1.x–3.x output folders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._validate import check_mpp
from ._common import check_dir, check_file, gene_names, integer_counts, spot_sdata
from ._wsi import read_image_file

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: physical diameter of a Visium spot (µm)
VISIUM_SPOT_UM = 55.0
_POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
_POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")

ImageChoice = Literal["auto", "fullres", "hires", "lowres"]


def read_visium(
    path: str | Path,
    *,
    mpp: float | None = None,
    image: ImageChoice = "auto",
    fullres_image: str | Path | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    in_tissue_only: bool = True,
    sample_id: str | None = None,
    patient_id: str | None = None,
) -> SpatialData:
    """Read a Space Ranger (1.x–3.x) Visium folder into SpatialData.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (or its parent), holding ``counts_file`` and ``spatial/``
        with ``scalefactors_json.json``, the tissue positions (``tissue_positions_list.csv`` without
        header in 1.x, ``tissue_positions.csv`` with header in 2.x, ``tissue_positions.parquet`` in 3.x)
        and ``tissue_hires_image.png`` / ``tissue_lowres_image.png``.
    mpp
        µm per pixel of the *full-resolution* image. ``None`` derives it from the 55 µm spot
        diameter: ``55 / spot_diameter_fullres``. For a downscaled image the recorded pixel size is
        divided by its scale factor.
    image
        Which image becomes ``"he"``: ``"auto"`` takes ``fullres_image`` when given, otherwise the
        hires, otherwise the lowres image. Spots, radii and ``obsm["spatial"]`` are in pixels of it.
    fullres_image
        Path to the full-resolution H&E given to Space Ranger (TIFF/JPEG), relative to ``path`` or absolute.
    counts_file
        Counts file (10x HDF5) or matrix folder (``filtered_feature_bc_matrix/``) inside ``path``.
    in_tissue_only
        Keep only spots with ``in_tissue == 1``.
    sample_id, patient_id
        Slide identity; ``sample_id`` defaults to the folder name (its parent's for ``outs``).

    Returns
    -------
    SpatialData with image ``"he"``, shapes ``"spots"`` (radius = half the spot diameter in
    pixels of the image) and table ``"table"`` (raw integer counts, gene symbols as var_names,
    Ensembl ids in ``var["gene_ids"]``; only "Gene Expression" features), as in CONTRIBUTING.md.

    Raises
    ------
    FileNotFoundError
        The folder, the counts, the positions, the scale factors or the chosen image is missing.
    ValueError
        Barcodes of the counts have no position; spots fall outside the chosen image; counts are not
        non-negative integers.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.io.read_visium("run1/outs", patient_id="P1")  # doctest: +SKIP
    >>> sdata = bs.io.read_visium("run1/outs", fullres_image="he_fullres.tif")  # doctest: +SKIP
    """
    root = check_dir(path, what="Space Ranger")
    if mpp is not None:
        mpp = check_mpp(mpp)
    if not (root / "spatial").is_dir() and (root / "outs" / "spatial").is_dir():
        root = root / "outs"
    if image not in ("auto", "fullres", "hires", "lowres"):
        raise ValueError(f"`image` must be 'auto', 'fullres', 'hires' or 'lowres', got {image!r}.")
    if sample_id is None:
        sample_id = root.parent.name if root.name == "outs" else root.name
    spatial = check_dir(root / "spatial", what="Space Ranger `spatial`")

    adata = _read_counts(root / counts_file)
    positions = read_positions(spatial)
    scalefactors = json.loads(
        check_file(spatial / "scalefactors_json.json", what="scale factors").read_text()
    )
    diameter_full = float(scalefactors["spot_diameter_fullres"])

    missing = ~adata.obs_names.isin(positions.index)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} of {adata.n_obs} barcodes of the counts have no row in the tissue "
            "positions "
            f"(e.g. {adata.obs_names[missing][:3].tolist()}). Check that the counts and `spatial/` come from "
            "the same Space Ranger run."
        )
    pos = positions.loc[adata.obs_names]
    keep = (pos["in_tissue"].to_numpy() == 1) if in_tissue_only else np.ones(len(pos), dtype=bool)
    if not keep.any():
        raise ValueError(
            "No spot of the counts is under tissue (`in_tissue == 1`); pass `in_tissue_only=False`."
        )
    adata, pos = adata[keep], pos[keep]

    _, img_path, scalef = _choose_image(root, spatial, image, fullres_image, scalefactors)
    img = read_image_file(img_path)
    if mpp is None:
        mpp_full, source = (
            VISIUM_SPOT_UM / diameter_full,
            f"scalefactors ({VISIUM_SPOT_UM:g} µm spot diameter)",
        )
    else:
        mpp = check_mpp(mpp)
        mpp_full, source = float(mpp), "user"
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64) * scalef
    x = integer_counts(adata.X, what="Visium counts", names=list(adata.obs_names))
    var = adata.var.copy()
    return spot_sdata(
        image_yxc=img,
        counts=x,
        barcodes=list(adata.obs_names),
        genes=list(adata.var_names),
        xy_px=xy,
        radius_px=diameter_full * scalef / 2.0,
        mpp=mpp_full / scalef,
        mpp_source=source,
        sample_id=str(sample_id),
        patient_id=patient_id,
        in_tissue=pos["in_tissue"].to_numpy() == 1,
        array_row=pos["array_row"].to_numpy(),
        array_col=pos["array_col"].to_numpy(),
        var=var,
    )


def read_positions(spatial: Path) -> pd.DataFrame:
    """Tissue positions of any Space Ranger version, indexed by barcode, with the 2.x column names."""
    for name in _POSITION_FILES:
        p = spatial / name
        if p.is_file():
            break
    else:
        raise FileNotFoundError(
            f"No tissue positions in {str(spatial)!r}: expected one of {list(_POSITION_FILES)}."
        )
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
    else:
        with p.open() as fh:
            first = fh.readline()
        header = 0 if "in_tissue" in first or "barcode" in first else None
        df = pd.read_csv(p, header=header)
        if header is None:
            if df.shape[1] != len(_POSITION_COLUMNS):
                raise ValueError(
                    f"{str(p)!r} has {df.shape[1]} columns; a Space Ranger positions file has "
                    f"{len(_POSITION_COLUMNS)} ({_POSITION_COLUMNS})."
                )
            df.columns = _POSITION_COLUMNS
    missing = [c for c in _POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{str(p)!r} lacks column(s) {missing}; it has {list(df.columns)}.")
    return df.set_index("barcode")


def _read_counts(p: Path) -> AnnData:
    import scanpy as sc

    if p.is_dir():
        adata = sc.read_10x_mtx(p, var_names="gene_symbols", make_unique=False)
    else:
        check_file(p, what="Space Ranger counts")
        adata = sc.read_10x_h5(p)
    if "feature_types" in adata.var.columns:
        adata = adata[:, (adata.var["feature_types"] == "Gene Expression").to_numpy()]
    adata = adata.copy()
    adata.var_names = gene_names(adata.var_names)
    return adata


def _choose_image(
    root: Path,
    spatial: Path,
    image: ImageChoice,
    fullres_image: str | Path | None,
    scalefactors: dict[str, float],
) -> tuple[str, Path, float]:
    """``(which, path, scale factor from full-resolution pixels to the image's pixels)``."""
    if image == "fullres" or (image == "auto" and fullres_image is not None):
        if fullres_image is None:
            raise ValueError(
                "`image='fullres'` needs the full-resolution image: pass `fullres_image=` (a path)."
            )
        p = Path(fullres_image)
        p = p if p.is_absolute() else (root / p if (root / p).is_file() else p)
        return "fullres", check_file(p, what="full-resolution image"), 1.0
    candidates = ["hires", "lowres"] if image == "auto" else [image]
    for which in candidates:
        p = spatial / f"tissue_{which}_image.png"
        if p.is_file():
            return which, p, float(scalefactors[f"tissue_{which}_scalef"])
    names = [f"tissue_{w}_image.png" for w in candidates]
    raise FileNotFoundError(
        f"No image {names} in {str(spatial)!r}. Pass `fullres_image=` or choose another `image=`."
    )
