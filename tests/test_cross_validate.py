from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K

# the toy slides (cells with type-revealing features, spots summing their cells) of test_baseline
_spec = importlib.util.spec_from_file_location("_toy_baseline", Path(__file__).with_name("test_baseline.py"))
assert _spec is not None
assert _spec.loader is not None
_toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_toy)
toy_slide = _toy.toy_slide
GENES = [f"G{j}" for j in range(_toy.N_GENES)]


@pytest.fixture(scope="module")
def slides():
    out = []
    for seed in range(4):
        s, _ = toy_slide(20 + seed, n_spots=40)
        s.attrs[K.ATTRS][K.PATIENT_ID] = f"P{seed // 2}"  # two patients with two sections each
        out.append(s)
    return out


def test_leave_one_sample_out_table_and_summary(slides):
    df = bs.tl.cross_validate(slides, methods=("ridge", "mean"), genes=GENES, top_hvg=10, progress=False)
    assert set(df.columns) >= {
        "fold",
        "test_group",
        "sample",
        "method",
        "gene",
        "pearson",
        "spearman",
        "is_hvg",
    }
    assert len(df) == 4 * 2 * len(GENES)  # folds x methods x genes
    assert sorted(df["test_group"].unique()) == ["S20", "S21", "S22", "S23"]
    summary = df.attrs["summary"]
    assert summary["ridge"]["n_folds"] == 4
    assert summary["ridge"]["mean_pearson"] > 0.3
    assert np.isnan(summary["mean"]["mean_pearson"])  # a constant profile has no correlation
    # every fold's HVGs come from its own training slides only
    for info in df.attrs["folds"]:
        assert info["test_group"] not in info["train_samples"]
        assert len(info["train_samples"]) == 3
        fold_rows = df[(df["fold"] == info["fold"]) & (df["method"] == "ridge")]
        assert set(fold_rows.loc[fold_rows["is_hvg"], "gene"]) == set(info["hvgs"]) & set(GENES)
    # the user's slides are not modified
    assert all(
        K.PREDICTION not in s.tables[K.TABLE].layers and "ridge" not in s.tables[K.TABLE].layers
        for s in slides
    )


def test_fold_scores_equal_a_manual_fit_on_the_training_slides(slides):
    df = bs.tl.cross_validate(
        slides, methods=("ridge",), genes=GENES, fit_kwargs={"ridge": {"alpha": 5.0}}, progress=False
    )
    model = bs.tl.fit_baseline(slides[1:], method="ridge", genes=GENES, alpha=5.0)
    light = bs.tl.prediction_table(model, slides[0], key_added="x")
    manual = bs.tl.evaluate(light, layer="x", genes=GENES, store=False)
    fold0 = df[df["test_group"] == "S20"].set_index("gene")["pearson"]
    np.testing.assert_allclose(fold0.loc[GENES].to_numpy(), manual["pearson"].to_numpy(), rtol=1e-6)


def test_patient_groups_hold_out_both_sections(slides):
    df = bs.tl.cross_validate(
        slides, groups="patient_id", methods=("ridge",), genes=GENES[:5], progress=False
    )
    assert sorted(df["test_group"].unique()) == ["P0", "P1"]
    assert sorted(df.loc[df["test_group"] == "P0", "sample"].unique()) == ["S20", "S21"]
    assert df.attrs["folds"][0]["train_samples"] == ["S22", "S23"]


def test_custom_fit_function_is_called_with_training_slides_only(slides):
    seen = []

    def fit(train, *, genes, level):
        seen.append(sorted(s.attrs[K.ATTRS][K.SAMPLE_ID] for s in train))
        for s in train:  # like fit_bitro, which writes its run record into the training tables
            s.tables[K.TABLE].uns["touched"] = True
        return bs.tl.fit_baseline(train, method="mean", genes=genes, level=level)

    df = bs.tl.cross_validate(slides, methods={"mine": fit}, genes=GENES[:3], progress=False)
    assert len(seen) == 4
    assert all(len(s) == 3 for s in seen)
    assert set(df["method"]) == {"mine"}
    assert not any("touched" in s.tables[K.TABLE].uns for s in slides)  # fitted on copies


def test_bulk_cross_validation_pools_held_out_slides():
    slides = []
    for s in range(8):
        sd, _ = toy_slide(40 + s, n_spots=25)
        t = sd.tables[K.TABLE]
        sd.tables[K.BULK] = ad.AnnData(
            np.asarray(t.X.sum(axis=0)),
            obs=pd.DataFrame({K.SAMPLE_ID: [f"S{40 + s}"]}, index=[f"S{40 + s}"]),
            var=t.var.copy(),
        )
        slides.append(sd)
    df = bs.tl.cross_validate(slides, methods=("ridge", "mean"), level="bulk", genes=GENES, progress=False)
    assert set(df["fold"]) == {"pooled"}
    assert (df["n"] == 8).all()
    assert "q_value" in df.columns
    assert len(df) == 2 * len(GENES)


def test_bad_arguments_are_rejected(slides):
    with pytest.raises(ValueError, match="`groups` must be one of"):
        bs.tl.cross_validate(slides, groups="donor", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown method 'lasso'"):
        bs.tl.cross_validate(slides, methods=("lasso",), progress=False)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        bs.tl.cross_validate(slides[:1], methods=("mean",), progress=False)
    with pytest.raises(ValueError, match="not run"):
        bs.tl.cross_validate(slides, methods=("mean",), fit_kwargs={"ridge": {}}, progress=False)


def test_holdout_gives_the_numbers_of_the_manual_fit_predict_evaluate_path(slides):
    res = bs.tl.holdout(slides, test=["S20", "S21"], methods=("ridge", "mean"), genes=GENES, progress=False)
    assert isinstance(res, bs.tl.Holdout)
    assert res.train == ["S22", "S23"]
    assert res.test == ["S20", "S21"]
    assert set(res.models) == {"ridge", "mean"}
    # the path `bitro-sc demo` took before: fit on the training slides, write, evaluate
    model = bs.tl.fit_baseline(slides[2:], method="ridge", genes=GENES)
    for k, sample in ((0, "S20"), (1, "S21")):
        test = toy_slide(20 + k, n_spots=40)[0]  # a fresh copy of slide k
        bs.tl.predict_bitro(test, model, key_added="ridge")
        before = bs.tl.evaluate(test, layer="ridge", top_hvg=None, store=False)
        after = res.scores[(res.scores["method"] == "ridge") & (res.scores["sample"] == sample)]
        np.testing.assert_array_equal(after.set_index("gene").loc[before.index, "pearson"], before["pearson"])
    # the slides are not modified
    assert all("ridge" not in s.tables[K.TABLE].layers for s in slides)
    summary = res.summary()
    assert list(summary.index) == ["ridge", "mean"]
    assert summary.loc["ridge", "n_genes"] == 2 * len(GENES)
    assert np.isnan(summary.loc["mean", "spot_mean_pearson"])  # constant predictions: undefined


def test_holdout_is_one_fold_of_cross_validate(slides):
    cv = bs.tl.cross_validate(slides, methods=("ridge",), genes=GENES, top_hvg=10, progress=False)
    res = bs.tl.holdout(slides, test=["S23"], methods=("ridge",), genes=GENES, top_hvg=10, progress=False)
    fold = cv[cv["test_group"] == "S23"].reset_index(drop=True)
    cols = ["gene", "pearson", "spearman", "is_hvg"]
    pd.testing.assert_frame_equal(res.scores[cols].reset_index(drop=True), fold[cols])
    with pytest.raises(ValueError, match="not among the slides"):
        bs.tl.holdout(slides, test=["S99"], methods=("ridge",))
    with pytest.raises(ValueError, match="leave at least one"):
        bs.tl.holdout(slides, test=["S20", "S21", "S22", "S23"], methods=("ridge",))


def test_prediction_table_is_a_light_copy_with_the_record(slides):
    model = bs.tl.fit_baseline(slides[1:], method="ridge", genes=GENES)
    light = bs.tl.prediction_table(model, slides[0], key_added="r")
    assert light.shape == slides[0].tables[K.TABLE].shape
    assert light.uns["r"]["genes"] == list(model.genes)
    assert np.isfinite(light.layers["r"]).any()
    assert "r" not in slides[0].tables[K.TABLE].layers
