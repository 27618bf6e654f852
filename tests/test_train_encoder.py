"""bs.tl.train_encoder: a self-supervised cell encoder from the user's slides."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K

torch = pytest.importorskip("torch")


def _train(slide, *, epochs, seed):
    kw = {"n_cells": 32, "batch_size": 16, "input_size": 16, "widths": (8, 16), "progress": False}
    return bs.tl.train_encoder(slide, epochs=epochs, seed=seed, **kw)


@pytest.fixture(scope="module")
def slide():
    return bs.datasets.toy("nuclei", seed=0, size_px=200, labels=False)


@pytest.fixture(scope="module")
def trained(slide):
    return _train(slide, epochs=1, seed=3)


def test_training_is_deterministic_per_seed_and_changes_the_network(slide, trained):
    again = _train(slide, epochs=1, seed=3)
    for a, b in zip(trained.network.state_dict().values(), again.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    untrained = _train(slide, epochs=0, seed=3)
    w0 = untrained.network[0].weight
    assert not torch.equal(w0, trained.network[0].weight)  # the optimiser moved it
    assert untrained.params["name"] == "random_cnn"
    assert untrained.params["final_loss"] is None
    other = _train(slide, epochs=1, seed=4)
    assert not torch.equal(other.network[0].weight, trained.network[0].weight)
    json.dumps(trained.params)


def test_saved_encoder_reloads_and_featurises_a_new_slide(trained, tmp_path):
    path = trained.save(tmp_path / "enc.pt")
    new = bs.datasets.toy("nuclei", seed=9, size_px=160, labels=False)
    bs.tl.cell_features(new, encoder=str(path), progress=False)
    t = new.tables[K.CELLS]
    assert t.obsm[K.FEATURES].shape == (t.n_obs, trained.params["widths"][-1])
    assert t.uns[K.FEATURES_PARAMS]["encoder"] == "learned"
    reloaded = bs.encoders.load_encoder(path)
    assert reloaded.params == trained.params
    img = new.images[K.IMAGE]
    a, _ = trained.encode(img, t.obs, mpp=0.5, progress=False)
    b, _ = reloaded.encode(img, t.obs, mpp=0.5, fov_um=99.0, progress=False)  # its own field of view
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()
    assert a.std(0).max() > 0


def test_augmentations_keep_the_crop_a_valid_image():
    from bitro_sc.tl._train_encoder import augment

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 20, 20, generator=gen)
    y = augment(x, size=16, gen=gen, blur_p=1.0)
    assert y.shape == (8, 3, 16, 16)
    assert float(y.min()) >= 0
    assert float(y.max()) <= 1
    # a white crop stays (nearly) white under stain jitter, flips, rotations and blur
    w = augment(torch.ones(4, 3, 20, 20), size=16, gen=gen, stain_jitter=0.0)
    assert float(w.min()) > 0.99
    # a 90° rotation / flip / blur-free, jitter-free view of a constant-colour crop keeps the colour
    c = torch.zeros(2, 3, 20, 20) + torch.tensor([0.8, 0.4, 0.6]).view(1, 3, 1, 1)
    v = augment(c, size=16, gen=gen, stain_jitter=0.0, blur_p=0.0)
    np.testing.assert_allclose(v.mean(dim=(2, 3)).numpy(), c.mean(dim=(2, 3)).numpy(), atol=1e-4)


def test_bad_arguments_are_clear_errors(slide, tmp_path):
    with pytest.raises(ValueError, match="objective"):
        bs.tl.train_encoder(slide, objective="byol", progress=False)
    with pytest.raises(ValueError, match="input_size"):
        bs.tl.train_encoder(slide, input_size=4, progress=False)
    with pytest.raises(FileNotFoundError, match="train_encoder"):
        bs.encoders.load_encoder(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"\.pt"):
        bs.tl.train_encoder(slide, n_cells=8, epochs=0, progress=False).save(tmp_path / "e.bin")
