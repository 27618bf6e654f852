"""A fitted model owns its preprocessing (issue 13, point 1): encoder identity, feature scaler and
phenotype k-means recorded at fit time and checked / re-applied on every slide it predicts."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
import pytest
import torch

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.datasets import toy
from bitro_sc.encoders import FeatureScaler
from bitro_sc.models import BiTroModel

torch.set_num_threads(1)
TINY = {"hidden": 16, "phenotype_dim": 4, "gat_heads": 2, "transformer_heads": 2}
GENES = [f"gene{g}" for g in range(8)]
FIT = {"epochs": 2, "model": TINY, "genes": GENES, "progress": False, "validation": None}


def _record(scaler: FeatureScaler, *, fov_um: float = 48.0, encoder: str = "morphology") -> dict:
    """``uns["bitro_features"]`` as `bs.tl.cell_features` writes it."""
    return {
        "encoder": encoder,
        "feature_names": np.asarray(scaler.feature_names, dtype=object),
        "fov_um": fov_um,
        "mpp": 0.5,
        "nucleus_pixels": "labels",
        "n_missing": 0,
        "scaler": scaler.to_dict(),
        "stains": "macenko",
    }


def _standardise(slide, scaler: FeatureScaler, raw: np.ndarray, **kw) -> None:
    cells = slide.tables[K.CELLS]
    cells.obsm[K.FEATURES] = scaler.transform(raw)
    cells.uns[K.FEATURES_PARAMS] = _record(scaler, **kw)


@pytest.fixture(scope="module")
def setting():
    """Two training slides and a test slide featurised with one scaler and phenotyped with one
    k-means (as `cell_features` / `phenotypes` write them), a BiTro and a ridge model fitted on them."""
    slides = [toy(seed=i, grid=4) for i in range(3)]
    raws = [np.asarray(s.tables[K.CELLS].obsm[K.FEATURES], dtype=np.float64) * 3.0 + 5.0 for s in slides]
    names = [f"f{j}" for j in range(raws[0].shape[1])]
    scaler = FeatureScaler.fit(raws[:2], feature_names=names, encoder="morphology", stains="macenko")
    for s, raw in zip(slides, raws, strict=True):
        _standardise(s, scaler, raw)
        del s.tables[K.CELLS].obs[K.PHENOTYPE]
    km = bs.tl.phenotypes(slides[:2], n_clusters=4)
    bs.tl.phenotypes(slides[2], model=km)
    model = bs.tl.fit_bitro(slides[:2], **FIT)
    ridge = bs.tl.fit_baseline(slides[:2], genes=GENES)
    return slides, raws, names, model, ridge


def _frames(models, slide) -> list[pd.DataFrame]:
    return [m.predict_frame(slide) for m in models]


def test_the_model_records_encoder_scaler_and_kmeans(setting) -> None:
    slides, _, names, model, ridge = setting
    prep = model.preprocessing
    assert prep.features["encoder"] == "morphology"
    assert prep.features["feature_names"] == names
    assert prep.features["fov_um"] == 48.0
    scaler = slides[0].tables[K.CELLS].uns[K.FEATURES_PARAMS]["scaler"]
    np.testing.assert_array_equal(model.feature_scaler.mean, scaler["mean"])
    np.testing.assert_array_equal(ridge.feature_scaler.scale, scaler["scale"])
    centres = slides[0].tables[K.CELLS].uns[K.PHENOTYPE]["cluster_centers"]
    np.testing.assert_array_equal(model.phenotype_model.cluster_centers_, centres)
    assert prep.graph == {"n_neighbors": 6} or prep.graph is None  # toy graphs carry no record
    assert len(model.phenotypes) == 4


def test_features_standardised_per_slide_are_re_standardised(setting, caplog) -> None:
    slides, raws, names, model, ridge = setting
    expected = _frames([model, ridge], slides[2])
    slide = copy.deepcopy(slides[2])
    own = FeatureScaler.fit([raws[2]], feature_names=names, encoder="morphology", stains="macenko")
    _standardise(slide, own, raws[2])
    x_new = slide.tables[K.CELLS].obsm[K.FEATURES]
    assert np.abs(x_new - slides[2].tables[K.CELLS].obsm[K.FEATURES]).max() > 0.05  # the input did change
    with caplog.at_level(logging.INFO, logger="bitro_sc"):
        got = _frames([model, ridge], slide)
    assert "re-standardising" in caplog.text
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fov_um": 24.0}, "fov_um: 48.0"),
        ({"encoder": "timm:resnet18"}, "encoder: 'morphology'"),
    ],
)
def test_features_of_another_encoder_with_the_same_width_are_refused(setting, change, message) -> None:
    slides, raws, _, model, ridge = setting
    slide = copy.deepcopy(slides[2])
    scaler = FeatureScaler.from_any(slides[0])
    _standardise(slide, scaler, raws[2], **change)
    for m in (model, ridge):
        with pytest.raises(ValueError, match=message) as err:
            m.predict_frame(slide)
        assert "bs.tl.cell_features(sdata" in str(err.value)
        assert "scaler=model.feature_scaler" in str(err.value)


def test_missing_phenotypes_are_assigned_with_the_training_kmeans(setting) -> None:
    slides, _, _, model, _ = setting
    expected = model.predict_frame(slides[2])
    slide = copy.deepcopy(slides[2])
    del slide.tables[K.CELLS].obs[K.PHENOTYPE]
    pd.testing.assert_frame_equal(model.predict_frame(slide), expected)
    assert K.PHENOTYPE not in slide.tables[K.CELLS].obs  # the model does not write into the slide


def test_phenotypes_fitted_on_the_slide_alone_are_reassigned(setting) -> None:
    slides, _, _, model, _ = setting
    expected = model.predict_frame(slides[2])
    slide = copy.deepcopy(slides[2])
    bs.tl.phenotypes(slide, n_clusters=4, seed=7, overwrite=True)
    own = slide.tables[K.CELLS].obs[K.PHENOTYPE].astype(str).to_numpy()
    assert (own != slides[2].tables[K.CELLS].obs[K.PHENOTYPE].astype(str).to_numpy()).mean() > 0.2
    pd.testing.assert_frame_equal(model.predict_frame(slide), expected)


def test_saved_models_keep_their_preprocessing(setting, tmp_path) -> None:
    slides, raws, names, model, _ = setting
    model.save(tmp_path / "m")
    back = BiTroModel.load(tmp_path / "m")
    np.testing.assert_array_equal(back.feature_scaler.mean, model.feature_scaler.mean)
    np.testing.assert_array_equal(
        back.phenotype_model.cluster_centers_, model.phenotype_model.cluster_centers_
    )
    slide = copy.deepcopy(slides[2])
    own = FeatureScaler.fit([raws[2]], feature_names=names, encoder="morphology", stains="macenko")
    _standardise(slide, own, raws[2])
    del slide.tables[K.CELLS].obs[K.PHENOTYPE]
    np.testing.assert_allclose(
        back.predict_frame(slide).to_numpy(), model.predict_frame(slides[2]).to_numpy(), rtol=2e-4, atol=1e-5
    )


def test_training_slides_scaled_or_clustered_apart_are_refused(setting) -> None:
    slides, raws, names, _, _ = setting
    train = [copy.deepcopy(s) for s in slides[:2]]
    own = FeatureScaler.fit([raws[1]], feature_names=names, encoder="morphology", stains="macenko")
    _standardise(train[1], own, raws[1])
    with pytest.raises(ValueError, match="standardised with different statistics"):
        bs.tl.fit_bitro(train, **FIT, overwrite=True)
    with pytest.raises(ValueError, match="standardised with different statistics"):
        bs.tl.fit_baseline(train, genes=GENES)
    train = [copy.deepcopy(s) for s in slides[:2]]
    bs.tl.phenotypes(train[1], n_clusters=4, overwrite=True)
    with pytest.raises(ValueError, match="different k-means"):
        bs.tl.fit_bitro(train, **FIT, overwrite=True)


def test_fitting_without_phenotypes_runs_them_or_refuses(setting, caplog) -> None:
    slides, _, _, _, _ = setting
    train = [copy.deepcopy(s) for s in slides[:2]]
    for s in train:
        del s.tables[K.CELLS].obs[K.PHENOTYPE]
        del s.tables[K.CELLS].uns[K.PHENOTYPE]
    with pytest.raises(KeyError, match=r"bs.tl.phenotypes\(slides\)"):
        bs.models.fit(train, **{k: v for k, v in FIT.items() if k != "epochs"}, train={"epochs": 1})
    explicit = [copy.deepcopy(s) for s in train]
    bs.tl.phenotypes(explicit)
    with caplog.at_level(logging.INFO, logger="bitro_sc"):
        model = bs.tl.fit_bitro(train, **FIT)
    assert "running bs.tl.phenotypes(slides)" in caplog.text
    assert len(model.phenotypes) == 7
    for a, b in zip(train, explicit, strict=True):
        pd.testing.assert_series_equal(a.tables[K.CELLS].obs[K.PHENOTYPE], b.tables[K.CELLS].obs[K.PHENOTYPE])
        np.testing.assert_array_equal(
            a.tables[K.CELLS].uns[K.PHENOTYPE]["cluster_centers"],
            b.tables[K.CELLS].uns[K.PHENOTYPE]["cluster_centers"],
        )
    # without phenotype inputs the model trains on none, on purpose
    plain = [copy.deepcopy(s) for s in slides[:2]]
    for s in plain:
        del s.tables[K.CELLS].obs[K.PHENOTYPE]
    none = bs.models.fit(
        plain, genes=GENES, model={**TINY, "phenotype_dim": 0}, train={"epochs": 1}, progress=False
    )
    assert none.net.phenotype is None


def test_one_error_lists_every_missing_step(setting) -> None:
    slides, _, _, model, _ = setting
    slide = copy.deepcopy(slides[2])
    del slide.tables[K.CELLS]
    with pytest.raises(KeyError, match="cannot be run automatically") as err:
        bs.tl.predict_bitro(slide, model)
    text = str(err.value)
    for call in (
        "bs.tl.segment(sdata)",
        "bs.tl.cell_features(sdata",
        "bs.tl.phenotypes(",
        "bs.tl.assign_cells(sdata)",
    ):
        assert call in text, text
    assert K.PREDICTION not in slide.tables[K.TABLE].layers  # nothing written


def _obs_state(slide) -> dict:
    cells = slide.tables[K.CELLS]
    return {
        "obs": cells.obs.copy(),
        "obsm": {k: np.asarray(v).copy() for k, v in cells.obsm.items()},
        "obsp": {k: v.copy() for k, v in cells.obsp.items()},
        "uns": sorted(cells.uns),
    }


def _assert_same_state(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["obs"], b["obs"])
    assert a["obsm"].keys() == b["obsm"].keys()
    for k in a["obsm"]:
        np.testing.assert_array_equal(a["obsm"][k], b["obsm"][k])
    assert a["obsp"].keys() == b["obsp"].keys()
    for k in a["obsp"]:
        assert (a["obsp"][k] != b["obsp"][k]).nnz == 0
    assert a["uns"] == b["uns"]


@pytest.mark.slow
def test_segmented_slides_are_prepared_like_the_explicit_calls(caplog) -> None:
    """`fit_bitro` and `predict_bitro` on slides that are only segmented run the missing steps (one
    log line each) and write exactly what the explicit calls write; predictions are identical."""
    slides = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0, n_genes=40)
    for s in slides:
        bs.tl.segment(s, progress=False)
    auto = [copy.deepcopy(s) for s in slides]
    # explicit: the documented pipeline
    bs.tl.cell_features(slides[:2], progress=False)
    km = bs.tl.phenotypes(slides[:2])
    for s in slides[:2]:
        bs.tl.assign_cells(s)
        bs.tl.cell_graph(s)
    fit = {"epochs": 1, "n_top_genes": 10, "progress": False, "validation": None, "model": TINY}
    model = bs.tl.fit_bitro(slides[:2], **fit)
    bs.tl.cell_features(slides[2], scaler=slides[0], progress=False)
    bs.tl.phenotypes(slides[2], model=km)
    bs.tl.assign_cells(slides[2])
    bs.tl.cell_graph(slides[2])
    bs.tl.predict_bitro(slides[2], model)
    # automatic
    with caplog.at_level(logging.INFO, logger="bitro_sc"):
        auto_model = bs.tl.fit_bitro(auto[:2], **fit)
        fit_lines = [r.getMessage() for r in caplog.records]
        caplog.clear()
        bs.tl.predict_bitro(auto[2], auto_model)
        predict_lines = [r.getMessage() for r in caplog.records]
    assert len(fit_lines) == 6, fit_lines  # features, phenotypes (all slides), assignment + graph per slide
    assert "bs.tl.cell_features(slides)" in fit_lines[0]
    assert len(predict_lines) == 4, predict_lines
    assert "scaler=model.feature_scaler" in predict_lines[0]
    assert "model=model.phenotype_model" in predict_lines[1]
    for a, b in zip(auto, slides, strict=True):
        _assert_same_state(_obs_state(a), _obs_state(b))
    np.testing.assert_array_equal(
        auto[2].tables[K.TABLE].layers[K.PREDICTION], slides[2].tables[K.TABLE].layers[K.PREDICTION]
    )


def test_a_graph_built_with_other_settings_is_refused_with_the_fixing_call() -> None:
    """Issue 13: the model records the graph settings; a slide whose graph has another k (or a
    radius) is refused at predict with the exact call that rebuilds it, which then works."""
    slides = [toy(seed=i, grid=4) for i in range(3)]
    for s in slides:
        bs.tl.cell_graph(s, k=4, overwrite=True)
    model = bs.tl.fit_bitro(slides[:2], **FIT)
    assert model.preprocessing.graph == {"n_neighbors": 4}
    target = slides[2]
    expected = model.predict_frame(target)
    for kw, shown in (({"k": 8}, "k=8 nearest"), ({"radius_um": 30.0}, "radius 30 µm")):
        bs.tl.cell_graph(target, **kw)
        with pytest.raises(ValueError, match=shown) as info:
            model.predict_frame(target)
        assert "bs.tl.cell_graph(sdata, k=4, overwrite=True)" in str(info.value)
    bs.tl.cell_graph(target, k=4, overwrite=True)
    pd.testing.assert_frame_equal(model.predict_frame(target), expected)
