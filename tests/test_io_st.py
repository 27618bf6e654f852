"""bs.io.read_st on the real HER2ST section C2, and its errors on small synthetic inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata


@pytest.fixture(scope="session")
def c2_paths(her2st_dir: Path) -> dict[str, Path]:
    return {
        "image": her2st_dir / "C2_HE.jpg",
        "counts": her2st_dir / "C2_counts.tsv.gz",
        "spots": her2st_dir / "C2_selection.tsv",
    }


@pytest.fixture(scope="session")
def c2(c2_paths: dict[str, Path]):
    """C2 read once per session (the 92 MP JPEG takes a few seconds)."""
    return bs.io.read_st(c2_paths["image"], c2_paths["counts"], c2_paths["spots"], patient_id="P_C")


# --- real data: HER2ST C2 ----------------------------------------------------------------------


@pytest.mark.slow
def test_c2_layout_matches_the_contract(c2, c2_paths):
    sel = pd.read_csv(c2_paths["spots"], sep="\t")
    n_sel = int((sel["selected"] == 1).sum())
    table = c2.tables[K.TABLE]
    assert 175 <= table.n_obs <= n_sel  # selected spots that have counts
    assert 15_000 <= table.n_vars <= 16_500
    img = _sdata.get_image(c2, K.IMAGE)
    assert img.dtype == np.uint8
    assert dict(img.sizes) == {"c": 3, "y": 9911, "x": 9274}  # height 9911, width 9274
    assert len(c2.images[K.IMAGE].children) > 1  # multiscale
    assert table.X.format == "csr"
    assert np.issubdtype(table.X.dtype, np.integer)
    assert table.obs_names[0] == f"{sel['x'].iloc[0]}x{sel['y'].iloc[0]}"
    assert (table.obs[K.SPOT_ID].to_numpy() == np.arange(table.n_obs)).all()
    assert list(table.obs[K.REGION].unique()) == [K.SPOTS]
    assert set(table.obs[K.SAMPLE_ID]) == {"C2"}
    assert set(table.obs[K.PATIENT_ID]) == {"P_C"}
    assert _sdata.slide_info(c2) == {K.SAMPLE_ID: "C2", K.PATIENT_ID: "P_C"}
    spots = c2.shapes[K.SPOTS]
    assert len(spots) == table.n_obs
    np.testing.assert_allclose(np.c_[spots.geometry.x, spots.geometry.y], table.obsm[K.SPATIAL])


@pytest.mark.slow
def test_c2_counts_equal_the_file_for_each_spot(c2, c2_paths):
    raw = pd.read_csv(c2_paths["counts"], sep="\t", index_col=0)
    table = c2.tables[K.TABLE]
    dense = raw.loc[table.obs_names, list(table.var_names[:500])].to_numpy()
    np.testing.assert_array_equal(table.X[:, :500].toarray(), dense)
    assert table.X.sum() == raw.loc[table.obs_names].to_numpy().sum()


@pytest.mark.slow
def test_c2_pixel_size_is_estimated_near_069(c2):
    mpp = _sdata.get_mpp(c2, K.IMAGE)
    assert mpp == pytest.approx(0.69, abs=0.01)
    source = _sdata.mpp_source(c2, K.IMAGE)
    assert source.startswith("estimated from array pitch (200 µm), fit over 187 spots")
    radius = c2.shapes[K.SPOTS]["radius"].iloc[0]
    assert radius * mpp == pytest.approx(50.0)  # 100 µm spots


@pytest.mark.slow
def test_c2_spots_land_on_tissue_not_glass(c2):
    rgb = np.asarray(_sdata.get_image(c2, K.IMAGE).data)  # (c, y, x) uint8
    xy = c2.tables[K.TABLE].obsm[K.SPATIAL]

    def mean_under(xs, ys, r=40):
        return np.mean(
            [
                rgb[:, int(y) - r : int(y) + r, int(x) - r : int(x) + r].mean()
                for x, y in zip(xs, ys, strict=True)
            ]
        )

    under = mean_under(xy[:, 0], xy[:, 1])
    glass = np.mean([rgb[:, :400, :400].mean(), rgb[:, -400:, -400:].mean(), rgb[:, :400, -400:].mean()])
    swapped = mean_under(xy[:, 1], xy[:, 0])  # the x/y mistake the reader must not make
    assert glass > 230
    assert under < glass - 60
    assert under < swapped - 10


@pytest.mark.slow
def test_c2_survives_zarr_round_trip(c2, zarr_roundtrip):
    back = zarr_roundtrip(c2, full_images=False)
    assert _sdata.get_mpp(back, K.IMAGE) == _sdata.get_mpp(c2, K.IMAGE)
    assert (back.tables[K.TABLE].X != c2.tables[K.TABLE].X).nnz == 0


def test_user_mpp_is_recorded(tiny_st):
    sdata = bs.io.read_st(**tiny_st, mpp=0.5)
    assert _sdata.get_mpp(sdata, K.IMAGE) == 0.5
    assert _sdata.mpp_source(sdata, K.IMAGE) == "user"
    assert sdata.shapes[K.SPOTS]["radius"].iloc[0] == pytest.approx(100.0)


# --- small synthetic ST section ------------------------------------------------------------------


@pytest.fixture
def tiny_st(tmp_path: Path) -> dict[str, Path]:
    """A 4 × 3 array, 20 px pitch (mpp = 10 µm/px for a 200 µm pitch), 8 selected spots."""
    rows = []
    for x in range(1, 5):
        for y in range(1, 4):
            rows.append({"x": x, "y": y, "pixel_x": 20.0 * x + 5, "pixel_y": 20.0 * y + 7, "selected": 1})
    spots = pd.DataFrame(rows)
    spots.loc[[0, 5, 7, 11], "selected"] = 0
    spots.to_csv(tmp_path / "S1_selection.tsv", sep="\t", index=False)
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(
        rng.poisson(2.0, size=(12, 5)),
        index=[f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)],
        columns=["A", "B", "C", "D", "E"],
    )
    counts.to_csv(tmp_path / "S1_counts.tsv", sep="\t")
    Image.fromarray(np.full((120, 110, 3), 200, np.uint8)).save(tmp_path / "S1_HE.png")
    return {
        "image": tmp_path / "S1_HE.png",
        "counts": tmp_path / "S1_counts.tsv",
        "spots": tmp_path / "S1_selection.tsv",
    }


def test_tiny_keeps_selected_spots_and_estimates_mpp_exactly(tiny_st):
    sdata = bs.io.read_st(**tiny_st)
    table = sdata.tables[K.TABLE]
    assert table.n_obs == 8
    assert "1x1" not in table.obs_names  # unselected
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(10.0)
    assert "RMS residual 0.0 µm" in _sdata.mpp_source(sdata, K.IMAGE)
    assert _sdata.slide_info(sdata)[K.SAMPLE_ID] == "S1"
    raw = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0)
    np.testing.assert_array_equal(table.X.toarray(), raw.loc[table.obs_names].to_numpy())
    obs = table.obs.loc["2x2"]
    assert (obs["array_col"], obs["array_row"]) == (2, 2)
    np.testing.assert_allclose(table.obsm[K.SPATIAL][table.obs_names.get_loc("2x2")], [45.0, 47.0])


def test_tiny_survives_zarr_round_trip(tiny_st, zarr_roundtrip):
    sdata = bs.io.read_st(**tiny_st)
    back = zarr_roundtrip(sdata)
    assert back.tables[K.TABLE].obs[K.PATIENT_ID].isna().all()


@pytest.mark.parametrize("which", ["image", "counts", "spots"])
def test_missing_file_is_named(tiny_st, which):
    args = dict(tiny_st)
    args[which] = Path(str(args[which]) + ".missing")
    with pytest.raises(FileNotFoundError, match=r"\.missing' does not exist"):
        bs.io.read_st(**args)


def test_counts_of_another_section_are_rejected(tiny_st, tmp_path):
    counts = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0)
    counts.index = [f"{int(i.split('x')[0]) + 10}x{i.split('x')[1]}" for i in counts.index]
    counts.to_csv(tmp_path / "other.tsv", sep="\t")
    with pytest.raises(ValueError, match="Counts and spots do not match: only 0 of 8"):
        bs.io.read_st(tiny_st["image"], tmp_path / "other.tsv", tiny_st["spots"])


def test_few_shared_positions_are_rejected(tiny_st, tmp_path):
    counts = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0).iloc[:4]
    counts.to_csv(tmp_path / "few.tsv", sep="\t")
    with pytest.raises(ValueError, match="only 3 of 8 selected spots"):
        bs.io.read_st(tiny_st["image"], tmp_path / "few.tsv", tiny_st["spots"])


def test_a_few_missing_spots_warn_and_are_dropped(tiny_st, tmp_path):
    counts = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0).drop(index=["2x1"])
    counts.to_csv(tmp_path / "most.tsv", sep="\t")
    with pytest.warns(UserWarning, match="1 selected spots have no counts"):
        sdata = bs.io.read_st(tiny_st["image"], tmp_path / "most.tsv", tiny_st["spots"])
    assert sdata.tables[K.TABLE].n_obs == 7


def test_image_smaller_than_spot_coordinates_is_rejected(tiny_st, tmp_path):
    Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"outside the image \(50 × 50 px"):
        bs.io.read_st(tmp_path / "small.png", tiny_st["counts"], tiny_st["spots"])


def test_non_integer_counts_are_rejected(tiny_st, tmp_path):
    counts = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0).astype(float)
    counts.iloc[3, 2] = 1.5
    counts.to_csv(tmp_path / "norm.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"non-integer values \(first in row '2x1'\)"):
        bs.io.read_st(tiny_st["image"], tmp_path / "norm.tsv", tiny_st["spots"])


def test_non_numeric_counts_are_rejected(tiny_st, tmp_path):
    counts = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0).astype(object)
    counts.iloc[3, 2] = "low"
    counts.to_csv(tmp_path / "text.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"non-numeric values in column\(s\) \['C'\]"):
        bs.io.read_st(tiny_st["image"], tmp_path / "text.tsv", tiny_st["spots"])


def test_spots_without_pixel_columns_are_rejected(tiny_st, tmp_path):
    spots = pd.read_csv(tiny_st["spots"], sep="\t").drop(columns=["pixel_y"])
    spots.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['pixel_y'\]"):
        bs.io.read_st(tiny_st["image"], tiny_st["counts"], tmp_path / "bad.tsv")


def test_dataframes_and_an_array_image_are_accepted(tiny_st):
    counts = pd.read_csv(tiny_st["counts"], sep="\t", index_col=0)
    spots = pd.read_csv(tiny_st["spots"], sep="\t")
    image = np.asarray(Image.open(tiny_st["image"]))
    sdata = bs.io.read_st(image, counts, spots, sample_id="S9")
    reference = bs.io.read_st(**tiny_st)
    assert (sdata.tables[K.TABLE].X != reference.tables[K.TABLE].X).nnz == 0
    assert _sdata.slide_info(sdata)[K.SAMPLE_ID] == "S9"


def test_grid_fit_recovers_scale_of_a_rotated_noisy_array():
    from bitro_sc.io._st import estimate_mpp_from_grid

    rng = np.random.default_rng(3)
    x, y = (a.ravel() for a in np.meshgrid(np.arange(30), np.arange(30)))
    theta, px_per_step = np.deg2rad(2.0), 289.0  # 200 µm / 289 px = 0.692 µm/px
    noise = rng.normal(0, 5.0, (2, x.size))  # 5 px detection noise
    px = px_per_step * (np.cos(theta) * x - np.sin(theta) * y) + 100 + noise[0]
    py = px_per_step * (np.sin(theta) * x + np.cos(theta) * y) + 50 + noise[1]
    mpp, n, rms_um = estimate_mpp_from_grid(pd.DataFrame({"x": x, "y": y, "pixel_x": px, "pixel_y": py}))
    assert n == 900
    assert mpp == pytest.approx(200.0 / px_per_step, rel=1e-3)
    assert rms_um == pytest.approx(np.sqrt(2) * 5.0 * mpp, rel=0.1)
