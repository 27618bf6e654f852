"""`bs.tl.cell_features`: one standardised feature vector per cell."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from .. import _sdata

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import xarray as xr
    from spatialdata import SpatialData

    from ..encoders import CellEncoder


#: the ``uns`` key that records the parameters of ``obsm[key_added]``
features_params_key = _sdata.features_params_key


def aligned_labels(sdata: SpatialData, labels_key: str, image: xr.DataArray) -> xr.DataArray:
    """The full-resolution label image on the image's pixel grid (a crop is zero-padded lazily)."""
    import dask.array as da
    import xarray as xr
    from spatialdata.transformations import get_transformation

    element: Any = sdata.labels[labels_key]
    if isinstance(element, xr.DataTree):  # multiscale
        level: Any = element[sorted(element.children)[0]]
        element = next(iter(level.values()))
    h, w = int(image.sizes["y"]), int(image.sizes["x"])
    lh, lw = int(element.sizes["y"]), int(element.sizes["x"])
    to_px = get_transformation(element, get_all=True).get(K.PIXEL_CS)
    m = np.eye(3)
    if to_px is not None:
        m = np.asarray(to_px.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")))
    oy, ox = float(m[0, 2]), float(m[1, 2])
    ok = np.allclose(m[:2, :2], np.eye(2)) and oy == round(oy) and ox == round(ox)
    oy, ox = round(oy), round(ox)
    if not ok or oy < 0 or ox < 0 or oy + lh > h or ox + lw > w:
        raise ValueError(
            f"Label image {labels_key!r} ({lh}×{lw} px) is not a whole-pixel crop of the image's "
            f"{h}×{w} px grid. Pass `labels_key=None` to approximate nuclei from the cells table instead."
        )
    data = element.data if hasattr(element.data, "dask") else da.from_array(np.asarray(element.data))
    if (oy, ox, lh, lw) != (0, 0, h, w):
        data = da.pad(data, ((oy, h - oy - lh), (ox, w - ox - lw)))
    return xr.DataArray(data, dims=("y", "x"))


def cell_features(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    encoder: str | CellEncoder | torch.nn.Module = "morphology",
    image_key: str | None = None,
    cells_key: str = K.CELLS,
    labels_key: str | None = K.CELL_LABELS,
    fov_um: float = 48.0,
    batch_size: int = 256,
    scaler: Any = None,
    weights: str | Path | None = None,
    mpp: float | None = None,
    device: str | None = None,
    key_added: str = K.FEATURES,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Describe every cell with one feature vector, standardised with statistics shared across slides.

    Parameters
    ----------
    sdata
        A slide, or a list of slides: features of a list are standardised with one scaler fitted
        over all of them (no per-slide scaling, which would make slides incomparable).
    encoder
        ``"morphology"`` (default; the cell alone: nucleus shape, haematoxylin / eosin intensities in
        the nucleus and a ring around it, texture, context in the field of view, local density — see
        :class:`bitro_sc.encoders.MorphologyEncoder`), ``"niche"`` (the ``"morphology"`` features of
        each cell followed by their mean over the cells in the 300 µm square around it, the tissue
        at the scale of a spot — see :class:`bitro_sc.encoders.NicheEncoder`; the most accurate
        BiTro encoder on HER2ST without weights, see docs/encoders.md),
        ``"context"`` (the tissue around each cell at
        the scale of a spot, :class:`bitro_sc.encoders.ContextEncoder`), a combination such as
        ``"morphology+context"`` (:class:`bitro_sc.encoders.CombinedEncoder`, which can also reduce
        a learned embedding by PCA fitted on the training slides), ``"hf:<org>/<repo>"`` (a
        Hugging Face model from the local cache, :class:`bitro_sc.encoders.HFEncoder`), an encoder
        trained by :func:`bitro_sc.tl.train_encoder` (object or saved ``.pt`` path),
        ``"timm:<name>"`` with ``weights=``, a
        ``torch.nn.Module`` (224 px input, ImageNet normalisation; wrap it in
        :class:`bitro_sc.encoders.TorchEncoder` for other preprocessing), or any registered name in
        ``bs.encoders.ENCODERS``.
    image_key
        H&E image element; the only one when ``None``.
    cells_key
        Cells table (and shapes) written by ``bs.tl.segment``.
    labels_key
        Nucleus label image used for nucleus pixels when present. Without it (whole slides) the
        morphology encoder approximates each nucleus by the ellipse of its shape measures.
    fov_um
        Side in µm of the square field of view around each cell (context statistics; crop size of
        deep encoders, resampled to their input size). Fixed in µm so that slides scanned at
        different resolutions see the same tissue.
    batch_size
        Crops per forward pass of deep encoders.
    scaler
        ``None``: fit the standardisation on the given slide(s). Otherwise re-apply the statistics
        of training slides: a :class:`bitro_sc.encoders.FeatureScaler`, a featurised training
        SpatialData (or its cells table, or its ``uns["bitro_features"]`` dict).
    weights
        Local weights file for ``"timm:<name>"`` / torch encoders (nothing is downloaded).
    mpp
        Pixel size in µm/px; read from the image's transformation when ``None``.
    device
        Torch device for deep encoders; ``"cuda"`` when available, else CPU.
    key_added
        ``obsm`` key of the features.
    overwrite
        Replace existing features under ``key_added``.
    progress
        Show a progress bar over tiles.

    Returns
    -------
    ``None``. Writes to ``sdata.tables[cells_key]``:

    - ``obsm[key_added]``: ``(n_cells, n_features)`` float32, standardised (mean 0 / sd 1 over the
      slides the scaler was fitted on); a value that could not be measured (e.g. a nucleus absent
      from the label image) is set to the fitted mean, 0;
    - ``uns["bitro_features"]`` (``uns[f"{key_added}_params"]`` for another key): ``encoder``,
      ``feature_names``, ``fov_um``, ``mpp``, ``nucleus_pixels`` (``"labels"`` or ``"ellipses"``),
      ``stains`` (morphology encoder: ``"macenko"`` or ``"fixed"``), ``n_missing`` and ``scaler``
      (``mean``, ``scale``, ``n_cells``, ``n_slides``) — the raw values are ``X * scale + mean``.

    A slide without cells gets a ``(0, n_features)`` matrix.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> *train, new_slide = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in [*train, new_slide]:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features(train, progress=False)  # one scaler over both slides
    >>> bs.tl.cell_features(new_slide, scaler=train[0], progress=False)  # re-use the training scaling
    >>> new_slide.tables["cells"].obsm["X_bitro"].dtype
    dtype('float32')
    """
    from ..encoders import FeatureScaler, get_encoder

    slides: list[Any] = list(sdata) if isinstance(sdata, list | tuple) else [sdata]
    if not slides:
        raise ValueError("`sdata` is an empty list; pass at least one SpatialData.")
    if not fov_um > 0:
        raise ValueError(f"`fov_um` must be a positive size in µm, got {fov_um!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    backend = get_encoder(encoder, weights=weights)
    if hasattr(backend, "build"):  # deep encoders: fail on missing weights / packages before any work
        backend.build()
    fitted = None if scaler is None else FeatureScaler.from_any(scaler, cells_key=cells_key)
    if fitted is not None and not getattr(backend, "is_fitted", True):
        raise ValueError(
            f"Encoder {backend.name!r} reduces its embeddings with a PCA fitted on the training slides, but "
            "it has not been fitted: call `bs.tl.cell_features(train_slides, encoder=enc)` with the same "
            "encoder object first, then `bs.tl.cell_features(new, encoder=enc, scaler=train_slides[0])`."
        )
    stains = str(getattr(backend, "stains", ""))
    if fitted is not None and fitted.stains and stains and fitted.stains != stains:
        raise ValueError(
            f"The `scaler` features read the stains with stains={fitted.stains!r}, this encoder with "
            f"stains={stains!r}: the features would not be comparable. Pass "
            f"`encoder=bs.encoders.MorphologyEncoder(stains={fitted.stains!r})`, or recompute the "
            "reference features with this encoder."
        )
    uns_key = features_params_key(key_added)

    inputs = []
    for s in slides:  # validate every slide before computing anything
        table = _sdata.require(s, cells_key, kind="tables", step="run `bs.tl.segment` first")
        missing = [c for c in (K.X_PX, K.Y_PX) if c not in table.obs.columns]
        if missing:
            raise ValueError(
                f"The cells table {cells_key!r} has no {missing} columns (centroid in pixels); "
                "run `bs.tl.segment` to make a cells table that follows the data contract."
            )
        xy = table.obs[[K.X_PX, K.Y_PX]].to_numpy(dtype=np.float64)
        if not np.isfinite(xy).all():
            raise ValueError(
                f"The cells table {cells_key!r} has {int((~np.isfinite(xy)).any(1).sum())} cells without a "
                "finite centroid (x_px / y_px); drop them or re-run `bs.tl.segment`."
            )
        parts = [("obsm", key_added), ("uns", uns_key)]
        _sdata.check_table_free(s, cells_key, parts, overwrite=overwrite, writer="bs.tl.cell_features")
        ikey = _sdata.resolve_image_key(s, image_key)
        image = _sdata.get_image(s, ikey)
        slide_mpp = _sdata.get_mpp(s, ikey, mpp)
        labels = None
        if labels_key is not None and labels_key in s.labels:
            labels = aligned_labels(s, labels_key, image)
        elif labels_key is not None and labels_key != K.CELL_LABELS:
            raise KeyError(f"No labels element {labels_key!r} (have {list(s.labels.keys()) or 'none'}).")
        inputs.append((s, table, image, slide_mpp, labels))

    raws = []
    names: list[str] = []
    for _s, table, image, slide_mpp, labels in inputs:
        raw, names = backend.encode(
            image,
            table.obs,
            mpp=slide_mpp,
            fov_um=float(fov_um),
            labels=labels,
            batch_size=int(batch_size),
            device=device,
            progress=progress,
        )
        raws.append(raw)
    reducer: Any = backend
    if hasattr(reducer, "apply_reduction"):  # learned embeddings reduced (PCA) on the training slides only
        if fitted is None:
            reducer.fit_reduction(raws)
        reduced = [reducer.apply_reduction(raw, names) for raw in raws]
        raws, names = [r for r, _ in reduced], (reduced[0][1] if reduced else names)
    name = str(getattr(backend, "name", type(backend).__name__))
    if fitted is None:
        fitted = FeatureScaler.fit(raws, feature_names=names, encoder=name, stains=stains)

    for (_s, table, _image, slide_mpp, labels), raw in zip(inputs, raws, strict=True):
        x = fitted.transform(raw, feature_names=names)
        bad = ~np.isfinite(x)
        x[bad] = 0.0
        table.obsm[key_added] = x
        table.uns[uns_key] = {
            "encoder": name,
            "feature_names": np.asarray(names, dtype=object),
            "fov_um": float(fov_um),
            "mpp": float(slide_mpp),
            "nucleus_pixels": "labels" if labels is not None else "ellipses",
            "n_missing": int(bad.sum()),
            "scaler": fitted.to_dict(),
        }
        if stains:  # the morphology encoder: per-slide (Macenko) or fixed stains
            table.uns[uns_key]["stains"] = stains
        _sdata.record_writer(_s, "bs.tl.cell_features", *(_sdata.part_key(cells_key, *p) for p in parts))
