"""A tiny slide with known nuclei, following the data contract (for tests and docstrings only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _keys as K

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: RGB of the two nucleus types of the toy slide: dark large nuclei (0) and pale small ones (1)
_TYPE_RGB = np.array([[70, 40, 130], [150, 110, 185]], dtype=np.float64)
_TYPE_SEMI_AXES_UM = np.array([[5.0, 3.5], [2.6, 2.4]])


def toy_cells_slide(
    *,
    size_px: int = 320,
    mpp: float = 0.5,
    spacing_um: float = 14.0,
    seed: int = 0,
    labels: bool = True,
    spots: bool = True,
) -> tuple[SpatialData, np.ndarray]:
    """A slide of ``size_px``² pixels with elliptical nuclei of two types on a jittered grid.

    Returns ``(sdata, cell_type)``: the SpatialData has image ``"he"`` and the cells written by
    :func:`bitro_sc.segmentation.write_cells` from the true label image (labels ``"cell_labels"``
    only when ``labels``) and, when ``spots``, shapes ``"spots"`` (circles of 25 µm radius on
    a 60 µm grid); ``cell_type`` is the true type (0/1) per row of the cells table.
    """
    import pandas as pd
    from skimage.draw import ellipse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel

    from .._sdata import micron_transformations
    from ..segmentation import write_cells

    rng = np.random.default_rng(seed)  # layout: the same tissue at any pixel size
    noise = np.random.default_rng([seed, 1])  # pixel noise
    img = np.empty((size_px, size_px, 3), dtype=np.float64)
    img[:] = [235.0, 195.0, 215.0]
    img += noise.normal(0, 4, img.shape)
    lab = np.zeros((size_px, size_px), dtype=np.uint32)
    step = spacing_um / mpp
    centres = np.arange(step / 2, size_px - step / 2 + 1e-9, step)
    types = []
    cid = 0
    for cy in centres:
        for cx in centres:
            t = int(rng.integers(2))
            a, b = _TYPE_SEMI_AXES_UM[t] / mpp * rng.uniform(0.9, 1.1)
            jy, jx = rng.uniform(-step * 0.12, step * 0.12, 2)
            rotation = rng.uniform(-np.pi, np.pi)
            rr, cc = ellipse(cy + jy, cx + jx, a, b, shape=lab.shape, rotation=rotation)
            cid += 1
            lab[rr, cc] = cid
            img[rr, cc] = _TYPE_RGB[t] + noise.normal(0, 10 if t == 0 else 4, (len(rr), 3))
            types.append(t)
    img = np.clip(img, 0, 255).astype(np.uint8)
    tf = micron_transformations(mpp)
    shapes: dict = {}
    if spots:
        pitch = 60.0 / mpp
        g = np.arange(pitch / 2, size_px, pitch)
        xy = np.array([(x, y) for y in g for x in g])
        shapes[K.SPOTS] = ShapesModel.parse(
            xy,
            geometry=0,
            radius=np.full(len(xy), 25.0 / mpp),
            index=pd.RangeIndex(len(xy)),
            transformations=tf,
        )
    sdata = SpatialData(
        images={
            K.IMAGE: Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), transformations=tf)
        },
        shapes=shapes,
    )
    sdata.attrs[K.ATTRS] = {
        K.SAMPLE_ID: f"toy{seed}",
        K.PATIENT_ID: f"p{seed}",
        "mpp_source": {K.IMAGE: "user"},
    }
    write_cells(sdata, lab, mpp=mpp, labels_key=K.CELL_LABELS if labels else None)
    ids = sdata.tables[K.CELLS].obs[K.CELL_ID].to_numpy()
    cell_type = np.asarray(types)[ids - 1]
    return sdata, cell_type
