import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel

import bitro_sc as bs
from bitro_sc import _sdata
from bitro_sc.pp._stains import REFERENCE_STAINS, estimate_stains


def _render(stains, rng, shape=(128, 128)):
    """An RGB image from known H and E concentrations under the Beer-Lambert model."""
    conc = np.stack([rng.gamma(1.0, 0.6, shape), rng.gamma(2.0, 0.3, shape)], axis=-1)
    od = conc @ stains.T
    return np.clip(240 * np.exp(-od) - 1, 0, 255).astype(np.uint8)


def _slide(rgb):
    img = Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), chunks=(3, 64, 64))
    sdata = sd.SpatialData(images={"he": img})
    _sdata.set_mpp(sdata, "he", 0.5, source="user")
    return sdata


def test_estimate_stains_recovers_known_stain_vectors():
    rng = np.random.default_rng(0)
    true = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=0)
    est, _ = estimate_stains(_render(true, rng))
    cos = np.sum(est * true, axis=0)
    assert np.all(cos > 0.97)


def test_normalize_stains_maps_a_restained_slide_to_the_reference_colours():
    rng = np.random.default_rng(1)
    ref = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=0)
    other = np.array([[0.85, 0.05], [0.50, 0.90], [0.15, 0.43]])
    other /= np.linalg.norm(other, axis=0)
    reference = _render(ref, np.random.default_rng(2))
    sdata = _slide(_render(other, rng))
    bs.pp.normalize_stains(sdata, reference=reference)
    out = np.moveaxis(sdata.images["he_normalized"].data.compute(), 0, -1)
    ref_stains, _ = estimate_stains(reference)
    before = np.sum(estimate_stains(_render(other, rng))[0] * ref_stains, axis=0)
    after = np.sum(estimate_stains(out)[0] * ref_stains, axis=0)
    assert np.all(after > 0.995)  # same stain colours as the reference
    assert np.min(before) < 0.97  # which the input did not have
    np.testing.assert_allclose(out.mean(axis=(0, 1)), reference.mean(axis=(0, 1)), atol=8)
    assert _sdata.get_mpp(sdata, "he_normalized") == pytest.approx(0.5)


def test_normalize_stains_never_overwrites_without_permission():
    sdata = _slide(_render(REFERENCE_STAINS, np.random.default_rng(3)))
    bs.pp.normalize_stains(sdata)
    bs.pp.normalize_stains(sdata, image_key="he")  # a re-run replaces its own image
    with pytest.raises(ValueError, match=r"'he' \(not written by bitro_sc.*overwrite=True"):
        bs.pp.normalize_stains(sdata, image_key="he_normalized", key_added="he")
    with pytest.raises(ValueError, match="Too few stained pixels"):
        estimate_stains(np.full((32, 32, 3), 250, np.uint8))
