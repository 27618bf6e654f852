"""Encoders: the registry, torch modules on fixed-µm crops, timm with local weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.encoders import ENCODERS, TimmEncoder, TorchEncoder, get_encoder

torch = pytest.importorskip("torch")


class CentrePixel(torch.nn.Module):
    """Returns the normalised value at the crop centre (input size 1 → exactly the cell centroid)."""

    def forward(self, x):
        return x[:, :, x.shape[2] // 2, x.shape[3] // 2]


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def slide():
    return bs.datasets.toy("nuclei", seed=0, size_px=200, labels=False)


def test_encoders_import_does_not_import_torch():
    code = "import sys, bitro_sc.encoders; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_resolves_names_prefixes_and_modules():
    assert "morphology" in ENCODERS
    assert isinstance(ENCODERS.get("timm:resnet18"), TimmEncoder)
    assert isinstance(get_encoder(TinyCNN()), TorchEncoder)
    with pytest.raises(ValueError, match=r"morphology.*timm:<name>"):
        ENCODERS.get("uni")


def test_crops_are_centred_on_the_cell_at_the_right_place(slide):
    from scipy.ndimage import map_coordinates

    obs = slide.tables[K.CELLS].obs
    image = slide.images[K.IMAGE]
    enc = TorchEncoder(CentrePixel(), input_size=1, mean=(0, 0, 0), std=(1, 1, 1))
    feats, names = enc.encode(image, obs, mpp=0.5, fov_um=0.5, progress=False)  # 1 px: no pooling
    assert names == ["CentrePixel_0", "CentrePixel_1", "CentrePixel_2"]
    rgb = np.asarray(image).astype(np.float64) / 255.0
    coords = [obs[K.Y_PX].to_numpy(), obs[K.X_PX].to_numpy()]
    expected = np.stack([map_coordinates(rgb[c], coords, order=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(feats, expected, atol=2e-3)


def test_crop_mean_covers_the_fixed_field_of_view(slide):
    obs = slide.tables[K.CELLS].obs.iloc[:20]
    image = slide.images[K.IMAGE]

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    fov_um, mpp = 10.0, 0.5  # 20 px: a 20-px box resampled to 20 px is the box itself
    enc = TorchEncoder(Mean(), input_size=20, mean=(0, 0, 0), std=(1, 1, 1))
    feats, _ = enc.encode(image, obs, mpp=mpp, fov_um=fov_um, progress=False)
    rgb = np.asarray(image).astype(np.float64) / 255.0
    for i, (x, y) in enumerate(obs[[K.X_PX, K.Y_PX]].to_numpy()):
        y0, x0 = round(y - 10 + 0.5), round(x - 10 + 0.5)
        box = np.full((3, 20, 20), 1.0)  # white outside the slide
        ys, xs = slice(max(y0, 0), min(y0 + 20, 200)), slice(max(x0, 0), min(x0 + 20, 200))
        box[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = rgb[:, ys, xs]
        np.testing.assert_allclose(feats[i], box.mean(axis=(1, 2)), atol=0.03)


def test_tiles_and_batches_do_not_change_torch_features(slide):
    torch.manual_seed(0)
    net = TinyCNN()
    obs = slide.tables[K.CELLS].obs
    image = slide.images[K.IMAGE]
    a, _ = TorchEncoder(net, input_size=16, tile_um=1000).encode(
        image, obs, mpp=0.5, fov_um=24, batch_size=7, progress=False
    )
    b, _ = TorchEncoder(net, input_size=16, tile_um=20).encode(
        image, obs, mpp=0.5, fov_um=24, batch_size=64, progress=False
    )
    assert a.shape == (len(obs), 6)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cell_features_with_a_torch_module_and_local_weights(tmp_path):
    from safetensors.torch import save_file

    slide = bs.datasets.toy("nuclei", seed=1, size_px=160, labels=False)
    torch.manual_seed(1)
    trained = TinyCNN()
    path = tmp_path / "tiny.safetensors"
    save_file(trained.state_dict(), str(path))

    fresh = TinyCNN()  # different random weights until the file is loaded
    encoder = TorchEncoder(fresh, input_size=16, name="tiny")
    bs.tl.cell_features(slide, encoder=encoder, weights=path, fov_um=24, device=None, progress=False)
    t = slide.tables[K.CELLS]
    assert t.obsm[K.FEATURES].shape == (t.n_obs, 6)
    assert t.uns[K.FEATURES_PARAMS]["encoder"] == "tiny"
    ref, _ = TorchEncoder(trained, input_size=16).encode(
        slide.images[K.IMAGE], t.obs, mpp=0.5, fov_um=24, progress=False
    )
    scaler = t.uns[K.FEATURES_PARAMS]["scaler"]
    np.testing.assert_allclose(t.obsm[K.FEATURES] * scaler["scale"] + scaler["mean"], ref, atol=1e-4)

    plain = bs.datasets.toy("nuclei", seed=1, size_px=160, labels=False)  # a bare nn.Module works too
    bs.tl.cell_features(plain, encoder=TinyCNN(), fov_um=24, progress=False)
    assert plain.tables[K.CELLS].obsm[K.FEATURES].shape[1] == 6


def test_timm_encoder_needs_weights(slide, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: timm's hub copy is not there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"weights=.*huggingface-cli download timm/resnet18"):
        bs.tl.cell_features(slide, encoder="timm:resnet18", progress=False)


def test_weights_path_that_does_not_exist(slide, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        bs.tl.cell_features(slide, encoder="timm:resnet18", weights=missing, progress=False)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        bs.tl.cell_features(slide, encoder=TinyCNN(), weights=missing, progress=False)


def test_timm_missing_names_the_extra(slide, tmp_path):
    pytest.importorskip("safetensors")
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("timm is installed")
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ImportError, match=r"bitro-sc\[timm\]"):
        bs.tl.cell_features(slide, encoder="timm:resnet18", weights=path, progress=False)


def test_torch_encoder_on_a_slide_without_cells_keeps_the_feature_dimension(nuclei_slide):
    from bitro_sc.segmentation import write_cells

    with pytest.warns(UserWarning, match="No cells"):
        write_cells(nuclei_slide, np.zeros((100, 100), np.uint32), mpp=0.5, overwrite=True, labels_key=None)
    x, names = TorchEncoder(TinyCNN(), input_size=8).encode(
        nuclei_slide.images[K.IMAGE], nuclei_slide.tables[K.CELLS].obs, mpp=0.5, fov_um=8, progress=False
    )
    assert x.shape == (0, 6)
    assert names == [f"TinyCNN_{i}" for i in range(6)]
