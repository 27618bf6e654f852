"""Foundation-encoder paths end to end with random weights: Hugging Face (ViT, CNN) and timm."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.encoders import HFEncoder, TimmEncoder, get_encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache and no network: everything must come from local files."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny randomly initialised DINOv2 ViT with its image-processor config, saved locally."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("models") / "tiny-vit"
    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
    )
    Dinov2Model(cfg).save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=[0.5, 0.4, 0.6],
        image_std=[0.2, 0.25, 0.3],
        resample=3,  # bicubic
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory):
    """A small randomly initialised ResNet (the ResNet-18 layout, fewer channels), no processor config."""
    from transformers import ResNetConfig, ResNetModel

    path = tmp_path_factory.mktemp("models") / "tiny-resnet"
    torch.manual_seed(0)
    cfg = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2], layer_type="basic"
    )
    ResNetModel(cfg).save_pretrained(path)
    return path


def _slides(n=2, seed=0):
    slides = bs.datasets.synthetic(n, kind="visium", size_um=250, seed=seed, n_genes=12)
    slides = list(slides) if isinstance(slides, list | tuple) else [slides]
    for s in slides:
        bs.tl.segment(s, progress=False)
        bs.tl.assign_cells(s)
        bs.tl.cell_graph(s)
    return slides


def test_hf_vit_preprocessing_comes_from_its_processor_config(vit_dir):
    enc = get_encoder(f"hf:{vit_dir}")
    assert isinstance(enc, HFEncoder)
    enc.build()
    p = enc.params
    assert p["input_size"] == 32
    assert p["interpolation"] == "bicubic"
    assert p["mean"] == pytest.approx([0.5, 0.4, 0.6])
    assert p["std"] == pytest.approx([0.2, 0.25, 0.3])
    json.dumps(p)
    over = HFEncoder(str(vit_dir), input_size=16, interpolation="bilinear")
    over.build()
    assert over.params["input_size"] == 16
    assert over.params["interpolation"] == "bilinear"


@pytest.mark.parametrize(("token", "dim"), [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_hf_vit_token_choice(vit_dir, token, dim):
    slide = bs.datasets.toy("nuclei", seed=0, size_px=160, labels=False)
    obs = slide.tables[K.CELLS].obs
    enc = HFEncoder(str(vit_dir), token=token)
    x, names = enc.encode(slide.images[K.IMAGE], obs, mpp=0.5, fov_um=24, progress=False)
    assert x.shape == (len(obs), dim)
    assert np.isfinite(x).all()
    assert len(names) == dim
    # the class token and the patch mean are different summaries of the same forward pass
    if token == "cls+mean":
        cls_x, _ = HFEncoder(str(vit_dir), token="cls").encode(
            slide.images[K.IMAGE], obs, mpp=0.5, fov_um=24, progress=False
        )
        np.testing.assert_allclose(x[:, :32], cls_x, atol=1e-5)
        assert not np.allclose(x[:, :32], x[:, 32:], atol=1e-3)


def test_hf_encoders_end_to_end_with_a_saved_and_reloaded_model(vit_dir, cnn_dir, tmp_path):
    train, test = _slides(2, seed=0), _slides(1, seed=7)[0]
    for name, path in (("vit", vit_dir), ("cnn", cnn_dir)):
        enc = get_encoder(f"hf:{path}")
        bs.tl.cell_features(train, encoder=enc, fov_um=24, overwrite=True, progress=False)
        bs.tl.cell_features(test, encoder=enc, fov_um=24, scaler=train[0], overwrite=True, progress=False)
        uns = test.tables[K.CELLS].uns[K.FEATURES_PARAMS]
        assert uns["encoder"] == f"hf:{path}"
        assert test.tables[K.CELLS].obsm[K.FEATURES].shape[1] == 32
        bs.tl.phenotypes([*train, test], n_clusters=3, overwrite=True)
        model = bs.tl.fit_bitro(
            train,
            genes=list(train[0].tables["table"].var_names[:6]),
            epochs=2,
            validation=None,
            progress=False,
        )
        saved = model.save(tmp_path / f"{name}.bitro")
        again = type(model).load(saved)
        a, b = model.predict_frame(test, level="cell"), again.predict_frame(test, level="cell")
        assert a.shape == (test.tables[K.CELLS].n_obs, 6)
        assert np.isfinite(a.to_numpy()).all()
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6)


def test_hf_model_missing_from_the_cache_says_how_to_get_it():
    with pytest.raises(
        FileNotFoundError, match=r"huggingface-cli login.*\n.*huggingface-cli download org/model"
    ):
        get_encoder("hf:org/model").build()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_encoder("hf:/no/such/folder").build()
    assert isinstance(get_encoder("hf-hub:org/model"), HFEncoder)
    with pytest.raises(ValueError, match="token"):
        HFEncoder("org/model", token="max")


def test_timm_without_weights_says_how_to_get_them():
    slide = bs.datasets.toy("nuclei", seed=0, size_px=100, labels=False)
    with pytest.raises(FileNotFoundError, match=r"weights=.*huggingface-cli login.*download timm/resnet18"):
        bs.tl.cell_features(slide, encoder="timm:resnet18", progress=False)


def test_timm_models_with_local_weights_end_to_end(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not importable here (it needs a matching torchvision)")
    from safetensors.torch import save_file

    slide = bs.datasets.toy("nuclei", seed=0, size_px=160, labels=False)
    for name, dim in (("resnet18", 512), ("vit_small_patch16_224", 384)):
        model = timm.create_model(name, pretrained=False, num_classes=0)
        path = tmp_path / f"{name}.safetensors"
        save_file(model.state_dict(), str(path))
        enc = TimmEncoder(name, weights=path)
        bs.tl.cell_features(slide, encoder=enc, fov_um=24, overwrite=True, progress=False)
        assert slide.tables[K.CELLS].obsm[K.FEATURES].shape[1] == dim
        p = enc.params
        assert p["input_size"] == 224
        assert p["interpolation"] in ("bilinear", "bicubic")
        json.dumps(p)
