"""bs.tl.cell_features with the morphology encoder (the default, which "niche" extends) and the
shared feature scaling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.encoders import MORPHOLOGY_FEATURES, FeatureScaler, MorphologyEncoder
from bitro_sc.encoders._morphology import paint_ellipses


def _raw(sdata) -> pd.DataFrame:
    t = sdata.tables[K.CELLS]
    p = t.uns[K.FEATURES_PARAMS]
    raw = t.obsm[K.FEATURES] * p["scaler"]["scale"] + p["scaler"]["mean"]
    return pd.DataFrame(raw, columns=list(p["feature_names"]), index=t.obs_names)


@pytest.fixture(scope="module")
def toy():
    sdata, cell_type = bs.datasets.toy("nuclei", return_truth=True, seed=0)
    bs.tl.cell_features(sdata, encoder="morphology", progress=False)
    return sdata, cell_type


def test_features_written_as_float32_with_parameters(toy):
    sdata, _ = toy
    t = sdata.tables[K.CELLS]
    x = t.obsm[K.FEATURES]
    assert x.dtype == np.float32
    assert x.shape == (t.n_obs, len(MORPHOLOGY_FEATURES))
    p = t.uns[K.FEATURES_PARAMS]
    assert list(p["feature_names"]) == list(MORPHOLOGY_FEATURES)
    assert p["encoder"] == "morphology"
    assert p["nucleus_pixels"] == "labels"
    assert p["mpp"] == pytest.approx(0.5)
    assert p["n_missing"] == 0
    assert p["stains"] == "macenko"
    # standardised over this slide: mean 0, sd 1 for non-constant features
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)


def test_shape_features_round_trip_the_cells_table(toy):
    sdata, _ = toy
    raw = _raw(sdata)
    obs = sdata.tables[K.CELLS].obs
    for col in ("area_um2", "perimeter_um", "eccentricity", "major_axis_um"):
        np.testing.assert_allclose(raw[col].to_numpy(), obs[col].to_numpy(), rtol=1e-4, atol=1e-4)


def test_stain_features_separate_the_two_nucleus_types(toy):
    sdata, cell_type = toy
    raw = _raw(sdata)
    dark, pale = raw[cell_type == 0], raw[cell_type == 1]
    # dark purple nuclei: more haematoxylin, every one of them
    assert dark["nuc_h_mean"].min() > pale["nuc_h_mean"].max()
    assert dark["nuc_h_contrast"].mean() > 2 * pale["nuc_h_contrast"].mean()
    # the ring around a nucleus is background (pink): far less haematoxylin than inside
    assert (raw["ring_h_mean"] < 0.3 * raw["nuc_h_mean"]).mean() > 0.95


def test_density_matches_the_grid_spacing(toy):
    sdata, _ = toy
    raw = _raw(sdata)
    obs = sdata.tables[K.CELLS].obs
    # cells placed on a 14 µm grid: 1e6 / 14² ≈ 5102 per mm² away from the slide border
    inner = (obs[K.X_UM].between(55, 105) & obs[K.Y_UM].between(55, 105)).to_numpy()
    assert inner.sum() >= 4
    assert np.median(raw.loc[inner, "density_per_mm2"]) == pytest.approx(1e6 / 14**2, rel=0.15)


def test_tile_size_does_not_change_features():
    sdata = bs.datasets.toy("nuclei", seed=1, size_px=200)
    image = sdata.images[K.IMAGE]
    obs = sdata.tables[K.CELLS].obs
    labels = sdata.labels[K.CELL_LABELS]
    kw = {"mpp": 0.5, "fov_um": 30.0, "labels": labels, "progress": False}
    big, _ = MorphologyEncoder(tile_um=1000).encode(image, obs, **kw)
    small, _ = MorphologyEncoder(tile_um=23).encode(image, obs, **kw)  # ~20 tiles, cells on borders
    np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-5)


def test_ellipses_from_the_table_approximate_the_true_nuclei():
    sdata = bs.datasets.toy("nuclei", seed=2)
    obs = sdata.tables[K.CELLS].obs
    truth = np.asarray(sdata.labels[K.CELL_LABELS])
    painted = paint_ellipses(
        truth.shape,
        obs[K.Y_PX].to_numpy(),
        obs[K.X_PX].to_numpy(),
        obs["major_axis_um"].to_numpy() / 2 / 0.5,
        obs["minor_axis_um"].to_numpy() / 2 / 0.5,
        obs["orientation"].to_numpy(),
        obs[K.CELL_ID].to_numpy(),
    )
    ious = []
    for cid in obs[K.CELL_ID].to_numpy():
        a, b = truth == cid, painted == cid
        ious.append((a & b).sum() / (a | b).sum())
    assert np.mean(ious) > 0.85  # orientation convention and axes agree with regionprops


def test_slide_without_labels_uses_ellipses_with_the_same_features():
    with_labels = bs.datasets.toy("nuclei", seed=3)
    without = bs.datasets.toy("nuclei", seed=3, labels=False)
    bs.tl.cell_features(with_labels, progress=False)
    bs.tl.cell_features(without, progress=False)
    assert without.tables[K.CELLS].uns[K.FEATURES_PARAMS]["nucleus_pixels"] == "ellipses"
    a, b = _raw(with_labels), _raw(without)
    for col in ("nuc_h_mean", "nuc_e_mean", "fov_nuclear_fraction"):
        assert np.corrcoef(a[col], b[col])[0, 1] > 0.95, col


def test_field_of_view_is_physical_not_pixels():
    # the same tissue design scanned at 0.5 and 0.25 µm/px gives the same context features
    coarse = bs.datasets.toy("nuclei", seed=4, mpp=0.5, size_px=240)
    fine = bs.datasets.toy("nuclei", seed=4, mpp=0.25, size_px=480)
    bs.tl.cell_features(coarse, fov_um=30.0, progress=False)
    bs.tl.cell_features(fine, fov_um=30.0, progress=False)
    a, b = _raw(coarse), _raw(fine)
    for col in ("area_um2", "fov_nuclear_fraction", "density_per_mm2"):
        assert a[col].median() == pytest.approx(b[col].median(), rel=0.15), col


def test_list_of_slides_shares_one_scaler_and_new_slides_reuse_it():
    s1 = bs.datasets.toy("nuclei", seed=5, size_px=200)
    s2 = bs.datasets.toy("nuclei", seed=6, size_px=200, mpp=0.4)
    bs.tl.cell_features([s1, s2], progress=False)
    p1 = s1.tables[K.CELLS].uns[K.FEATURES_PARAMS]["scaler"]
    p2 = s2.tables[K.CELLS].uns[K.FEATURES_PARAMS]["scaler"]
    np.testing.assert_array_equal(p1["mean"], p2["mean"])
    assert p1["n_slides"] == 2
    assert p1["n_cells"] == s1.tables[K.CELLS].n_obs + s2.tables[K.CELLS].n_obs
    # pooled standardisation: mean 0 over both slides together, not per slide
    both = np.concatenate([s1.tables[K.CELLS].obsm[K.FEATURES], s2.tables[K.CELLS].obsm[K.FEATURES]])
    np.testing.assert_allclose(both.mean(0), 0, atol=1e-4)

    new = bs.datasets.toy("nuclei", seed=6, size_px=200, mpp=0.4)  # same tissue as s2
    bs.tl.cell_features(new, scaler=s1, progress=False)
    np.testing.assert_allclose(
        new.tables[K.CELLS].obsm[K.FEATURES], s2.tables[K.CELLS].obsm[K.FEATURES], atol=1e-5
    )
    # the uns dict and a FeatureScaler work the same
    scaler = FeatureScaler.from_any(s1.tables[K.CELLS].uns[K.FEATURES_PARAMS])
    bs.tl.cell_features(new, scaler=scaler, overwrite=True, progress=False)
    np.testing.assert_allclose(
        new.tables[K.CELLS].obsm[K.FEATURES], s2.tables[K.CELLS].obsm[K.FEATURES], atol=1e-5
    )


def test_features_replace_their_own_but_never_a_users_obsm(toy):
    sdata, _ = toy
    cells = sdata.tables[K.CELLS]
    cells.obsm["mine"] = np.ones((cells.n_obs, 2), np.float32)
    with pytest.raises(ValueError, match=r"obsm\['mine'\] \(not written by bitro_sc.*overwrite=True"):
        bs.tl.cell_features(sdata, key_added="mine", progress=False)
    assert (cells.obsm["mine"] == 1).all()
    bs.tl.cell_features(sdata, key_added="ours", progress=False)
    bs.tl.cell_features(sdata, key_added="ours", progress=False)  # a re-run replaces its own


def test_missing_cells_table_names_the_step(nuclei_slide):
    sdata = nuclei_slide
    del sdata.tables[K.CELLS]
    with pytest.raises(KeyError, match=r"bs\.tl\.segment"):
        bs.tl.cell_features(sdata, progress=False)


def test_missing_image_is_a_clear_error(nuclei_slide):
    sdata = nuclei_slide
    del sdata.images[K.IMAGE]
    with pytest.raises(ValueError, match="no image element"):
        bs.tl.cell_features(sdata, progress=False)


def test_wrong_number_of_channels_is_a_clear_error(nuclei_slide):
    from spatialdata.models import Image2DModel

    from bitro_sc._sdata import micron_transformations

    sdata = nuclei_slide
    gray = np.zeros((1, 100, 100), dtype=np.uint8)
    sdata.images[K.IMAGE] = Image2DModel.parse(
        gray, dims=("c", "y", "x"), transformations=micron_transformations(0.5)
    )
    with pytest.raises(ValueError, match="3 channels"):
        bs.tl.cell_features(sdata, progress=False)


def test_unknown_pixel_size_is_a_clear_error(nuclei_slide):
    from spatialdata.transformations import Identity, remove_transformation, set_transformation

    sdata = nuclei_slide
    image = sdata.images[K.IMAGE]
    remove_transformation(image, K.MICRON_CS)
    set_transformation(image, Identity(), to_coordinate_system=K.PIXEL_CS)
    with pytest.raises(ValueError, match="mpp="):
        bs.tl.cell_features(sdata, progress=False)
    bs.tl.cell_features(sdata, mpp=0.5, progress=False)  # the fix named in the message works
    assert sdata.tables[K.CELLS].uns[K.FEATURES_PARAMS]["mpp"] == 0.5


def test_unregistered_encoder_lists_the_names(nuclei_slide):
    sdata = nuclei_slide
    with pytest.raises(ValueError, match="morphology"):
        bs.tl.cell_features(sdata, encoder="resnet", progress=False)


@pytest.mark.slow  # the first synthetic slide of a process compiles its renderer
def test_features_predict_the_true_cell_type_on_a_synthetic_slide():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from bitro_sc.segmentation import write_cells

    sdata, truth = bs.datasets.synthetic(size_um=400.0, seed=1, return_truth=True)
    write_cells(sdata, np.asarray(truth.labels), mpp=truth.mpp)  # the true nuclei as cells
    bs.tl.cell_features(sdata, progress=False)
    table = sdata.tables[K.CELLS]
    types = truth.cells.set_index(K.CELL_ID).loc[table.obs[K.CELL_ID].to_numpy(), "cell_type"]
    y = types.astype(str).to_numpy()
    cv = StratifiedKFold(4, shuffle=True, random_state=0)
    model = LogisticRegression(max_iter=2000)
    bacc = cross_val_score(model, table.obsm[K.FEATURES], y, cv=cv, scoring="balanced_accuracy").mean()
    print(f"cell-type balanced accuracy from morphology features: {bacc:.3f} ({len(y)} cells, 5 types)")
    assert bacc > 0.65  # chance is 0.2


def test_slide_without_cells_gets_an_empty_matrix(nuclei_slide):
    from bitro_sc.segmentation import write_cells

    sdata = nuclei_slide
    with pytest.warns(UserWarning, match="No cells"):
        write_cells(sdata, np.zeros((100, 100), np.uint32), mpp=0.5, overwrite=True, labels_key=None)
    bs.tl.cell_features(sdata, encoder="niche", labels_key=None, progress=False)
    assert sdata.tables[K.CELLS].obsm[K.FEATURES].shape == (0, 2 * len(MORPHOLOGY_FEATURES))


@pytest.mark.slow
@pytest.mark.realdata
def test_her2st_crop_features_are_plausible(her2st_dir):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from bitro_sc import _sdata

    full = bs.io.read_st(
        her2st_dir / "C2_HE.jpg", her2st_dir / "C2_counts.tsv.gz", her2st_dir / "C2_selection.tsv"
    )
    mpp = _sdata.get_mpp(full, K.IMAGE)
    spots = full.tables[K.TABLE]
    cx, cy = np.median(np.asarray(spots.obsm[K.SPATIAL])[spots.obs[K.IN_TISSUE].astype(bool)], axis=0)
    y0, x0 = int(cy) - 512, int(cx) - 512
    arr = np.asarray(_sdata.get_image(full, K.IMAGE).data[:, y0 : y0 + 1024, x0 : x0 + 1024])
    crop = SpatialData(
        images={
            K.IMAGE: Image2DModel.parse(
                arr, dims=("c", "y", "x"), transformations=_sdata.micron_transformations(mpp)
            )
        }
    )
    bs.tl.segment(crop, tissue=False, progress=False)
    bs.tl.cell_features(crop, progress=False)
    table = crop.tables[K.CELLS]
    raw = _raw(crop)
    print(
        f"HER2ST C2 crop: {table.n_obs} cells; median area {raw['area_um2'].median():.1f} µm², "
        f"median density {raw['density_per_mm2'].median():.0f} /mm², "
        f"nucleus H > ring H for {(raw['nuc_h_mean'] > raw['ring_h_mean']).mean():.1%} of cells"
    )
    assert table.n_obs > 500
    assert table.uns[K.FEATURES_PARAMS]["n_missing"] <= 0.01 * raw.size
    assert np.isfinite(table.obsm[K.FEATURES]).all()
    assert 15 < raw["area_um2"].median() < 80
    assert 1000 < raw["density_per_mm2"].median() < 10000
    assert (raw["nuc_h_mean"] > raw["ring_h_mean"]).mean() > 0.9


def _restained(sdata, factor: float):
    """A copy of a slide whose stains are ``factor`` times as dense (optical density scaled)."""
    import copy

    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    out = copy.deepcopy(sdata)
    image = out.images["he"]
    rgb = np.asarray(image.data).astype(np.float64)
    od = np.clip(-np.log((rgb + 1.0) / 240.0), 0.0, None)
    dense = np.clip(240.0 * np.exp(-factor * od) - 1.0, 0, 255).round().astype(np.uint8)
    out.images["he"] = Image2DModel.parse(
        dense, dims=("c", "y", "x"), transformations=get_transformation(image, get_all=True)
    )
    return out


@pytest.mark.parametrize("factor", [0.7, 1.4])
def test_macenko_stains_make_features_invariant_to_staining_strength(factor):
    sdata = bs.datasets.toy("nuclei", seed=0)
    darker = _restained(sdata, factor)
    cols = ["nuc_h_mean", "nuc_e_mean", "ring_h_mean"]
    feats = {}
    for stains in ("macenko", "fixed"):
        enc = MorphologyEncoder(stains=stains)
        for name, s in (("orig", sdata), ("restained", darker)):
            bs.tl.cell_features(s, encoder=enc, overwrite=True, progress=False)
            feats[stains, name] = _raw(s)[cols]
    ratio = {st: (feats[st, "restained"].mean() / feats[st, "orig"].mean()) for st in ("macenko", "fixed")}
    # the fixed matrix reads the denser stain as more haematoxylin; the slide's own estimate does not
    np.testing.assert_allclose(ratio["fixed"]["nuc_h_mean"], factor, rtol=0.1)
    np.testing.assert_allclose(ratio["macenko"][["nuc_h_mean", "nuc_e_mean", "ring_h_mean"]], 1.0, atol=0.05)
    # per cell, not only on average
    r = np.corrcoef(feats["macenko", "orig"]["nuc_h_mean"], feats["macenko", "restained"]["nuc_h_mean"])[0, 1]
    assert r > 0.98


def test_blank_image_with_macenko_stains_names_the_fixed_alternative(nuclei_slide):
    sdata = nuclei_slide
    blank = _restained(sdata, 0.0)
    with pytest.raises(ValueError, match="stains='fixed'"):
        bs.tl.cell_features(blank, progress=False)
    bs.tl.cell_features(blank, encoder=MorphologyEncoder(stains="fixed"), progress=False)


def test_reusing_a_scaler_checks_how_the_stains_were_read():
    train = bs.datasets.toy("nuclei", seed=0, size_px=160)
    new = bs.datasets.toy("nuclei", seed=1, size_px=160)
    bs.tl.cell_features(train, encoder=MorphologyEncoder(stains="fixed"), progress=False)
    with pytest.raises(ValueError, match="stains='fixed'"):
        bs.tl.cell_features(new, scaler=train, progress=False)
    bs.tl.cell_features(new, scaler=train, encoder=MorphologyEncoder(stains="fixed"), progress=False)
    assert new.tables[K.CELLS].uns[K.FEATURES_PARAMS]["stains"] == "fixed"
    # features written before the `stains` record existed were read with the fixed matrix
    old = dict(train.tables[K.CELLS].uns[K.FEATURES_PARAMS])
    del old["stains"]
    assert FeatureScaler.from_any(old).stains == "fixed"
    with pytest.raises(ValueError, match="not be comparable"):
        bs.tl.cell_features(new, scaler=old, overwrite=True, progress=False)


def test_field_of_view_statistics_match_brute_force_box_means():
    from bitro_sc.encoders._morphology import _stain_luts, _tile_features, paint_ellipses

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    cy, cx = rng.uniform(0, 70, 12), rng.uniform(0, 90, 12)  # some boxes cut by the tile border
    lab = paint_ellipses(
        rgb.shape[:2], cy, cx, np.full(12, 4.0), np.full(12, 3.0), np.zeros(12), np.arange(1, 13)
    )
    lut_h, lut_e = _stain_luts(None)
    hv = lut_h[0][rgb[..., 0]] + lut_h[1][rgb[..., 1]] + lut_h[2][rgb[..., 2]]
    ev = lut_e[0][rgb[..., 0]] + lut_e[1][rgb[..., 1]] + lut_e[2][rgb[..., 2]]
    ell = np.column_stack([cy, cx, np.full(12, 4.0), np.full(12, 3.0), np.zeros(12)])
    out = _tile_features(
        rgb, lab, np.arange(1, 13), ell, half_fov=10.0, ring_px=2.0, lut_h=lut_h, lut_e=lut_e
    )
    for i in range(12):
        y0, y1 = np.clip([round(cy[i] - 10), round(cy[i] + 10) + 1], 0, 70)
        x0, x1 = np.clip([round(cx[i] - 10), round(cx[i] + 10) + 1], 0, 90)
        h, e = hv[y0:y1, x0:x1].astype(np.float64), ev[y0:y1, x0:x1].astype(np.float64)
        expected = [
            h.mean(),
            np.sqrt(max((h**2).mean() - h.mean() ** 2, 0)),
            e.mean(),
            (lab[y0:y1, x0:x1] > 0).mean(),
        ]
        np.testing.assert_allclose(out[i, 8:12], expected, rtol=1e-5, atol=1e-6)
