"""`bs.tl.fit_bitro` / `bs.tl.predict_bitro` on tiny contract-conforming slides with cell-level truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.datasets import toy as toy_slide  # kind 'cells'
from bitro_sc.models import BiTroModel
from bitro_sc.pp import normalize_expression

torch.set_num_threads(1)
TINY = {"hidden": 16, "phenotype_dim": 4, "gat_heads": 2, "transformer_heads": 2}
MARKERS = [f"gene{g}" for g in range(16)]  # genes 0-15 are cell-type markers in the toy profiles


def _slides(n: int, *, grid: int = 5, start: int = 0, **kw):
    return [toy_slide(seed=start + i, grid=grid, **kw) for i in range(n)]


@pytest.fixture(scope="module")
def trained():
    """A spot-level model trained on three slides, and a held-out slide with its cell truth."""
    train = _slides(3, grid=6)
    test, truth = toy_slide(seed=10, grid=6, return_truth=True)
    model = bs.tl.fit_bitro(
        train, epochs=12, train={"batch_size": 16, "lr": 3e-3}, model={"hidden": 32}, progress=False
    )
    return model, train, test, truth


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.slow
def test_spot_training_predicts_markers_on_a_held_out_slide(trained) -> None:
    model, _, test, truth = trained
    bs.tl.predict_bitro(test, model)
    table = test.tables[K.TABLE]
    measured = normalize_expression(table)
    markers = [g for g in MARKERS if g in model.genes]
    assert len(markers) >= 8
    cols = table.var_names.get_indexer(markers)
    pred = np.log1p(table.layers[K.PREDICTION][:, cols])
    ok = np.isfinite(pred).all(axis=1)
    r = [_pearson(pred[ok, j], measured[ok, c]) for j, c in enumerate(cols)]
    assert np.median(r) > 0.5, r
    # super-resolution: only spots were supervised, yet cell values follow the cell truth
    bs.tl.predict_bitro(test, model, level="cell")
    cells = test.tables[K.CELLS]
    rc = [_pearson(cells[:, g].layers[K.PREDICTION].ravel(), truth[:, int(g[4:])]) for g in markers]
    assert np.median(rc) > 0.5, rc


def test_run_record_is_written_to_the_model_and_training_tables(trained) -> None:
    model, train, _, _ = trained
    rec = model.record
    assert rec["level"] == "spot"
    # three patients are too few to spare one: a block of spots of every slide is held out instead
    assert rec["split"]["by"].startswith("spots")
    assert rec["split"]["validation_spot_fraction"] == 0.2
    assert rec["n_bags_validation"] > 0
    assert rec["n_bags_train"] > 3 * rec["n_bags_validation"]
    assert len(rec["history"]["train_loss"]) == len(rec["history"]["val_loss"]) <= 12
    assert 0 <= rec["best_epoch"] < len(rec["history"]["val_loss"])
    assert rec["best_epoch"] == int(np.argmin(rec["history"]["val_loss"]))
    assert rec["n_trainable"] == sum(p.numel() for p in model.net.parameters())
    assert rec["n_frozen"] == 0
    assert 0 < len(rec["hvgs"]) <= 50
    assert set(rec["hvgs"]) <= set(model.genes)
    for s in train:
        uns = s.tables[K.TABLE].uns[K.RUN]
        assert list(uns["genes"]) == model.genes
        assert list(uns["hvgs"]) == rec["hvgs"]


def test_predictions_land_in_the_spot_table_with_the_record(trained) -> None:
    model, _, _, _ = trained
    slide = toy_slide(seed=11, grid=4)
    table = slide.tables[K.TABLE]
    table.obs.loc[table.obs_names[0], K.SPOT_ID] = 99  # spot 0 now holds no cell
    bs.tl.predict_bitro(slide, model)
    layer = table.layers[K.PREDICTION]
    assert layer.shape == table.shape
    predicted = table.var_names.isin(model.genes)
    assert np.isnan(layer[:, ~predicted]).all()
    assert np.isnan(layer[0]).all()
    assert np.isfinite(layer[1:, predicted]).all()
    assert (layer[1:, predicted] > 0).all()
    assert list(table.uns[K.RUN]["hvgs"]) == model.record["hvgs"]
    bs.tl.predict_bitro(slide, model)  # a re-run replaces its own layer
    table.layers["mine"] = table.X.copy()
    with pytest.raises(ValueError, match=r"layers\['mine'\] \(not written by bitro_sc.*overwrite=True"):
        bs.tl.predict_bitro(slide, model, key_added="mine")
    bs.tl.predict_bitro(slide, model, key_added="mine", overwrite=True)


def test_cell_predictions_sum_to_spot_predictions() -> None:
    """Plain sum pooling (``rna_head=False``): the cells of a spot sum to its prediction."""
    model = bs.tl.fit_bitro(
        _slides(2, grid=4), epochs=2, model={**TINY, "rna_head": False}, genes=MARKERS[:6], progress=False
    )
    assert model.net.rna_head is None
    slide = toy_slide(seed=12, grid=4)
    spots = model.predict_frame(slide, level="spot")
    bs.tl.predict_bitro(slide, model, level="cell")
    cells = slide.tables[K.CELLS]
    assert list(cells.var_names) == model.genes
    assert K.CONNECTIVITIES in cells.obsp
    assert K.FEATURES in cells.obsm
    assert f"{K.PREDICTION}_rna_content" not in cells.obs
    values = pd.DataFrame(cells.layers[K.PREDICTION], columns=model.genes)
    assert np.isfinite(values.to_numpy()).all()  # cells outside spots are predicted too
    spot_of = pd.to_numeric(cells.obs[K.SPOT_ID]).to_numpy()
    inside = np.isfinite(spot_of)
    summed = values[inside].groupby(spot_of[inside].astype(int)).sum()
    np.testing.assert_allclose(summed.to_numpy(), spots.iloc[summed.index].to_numpy(), rtol=1e-4)


def test_rna_head_cell_predictions_pool_to_spot_predictions() -> None:
    """RNA-content pooling: a spot's prediction is Σ values / Σ rna times the depth factor."""
    model = bs.tl.fit_bitro(
        _slides(2, grid=4),
        epochs=2,
        model={**TINY, "rna_head": True, "bag_linear": False},  # the bag-level term: test_linear_start
        genes=MARKERS[:6],
        progress=False,
    )
    assert model.net.rna_head is not None
    slide = toy_slide(seed=12, grid=4)
    spots = model.predict_frame(slide, level="spot")
    bs.tl.predict_bitro(slide, model, level="cell")
    cells = slide.tables[K.CELLS]
    values = pd.DataFrame(cells.layers[K.PREDICTION], columns=model.genes)
    spot_of = pd.to_numeric(cells.obs[K.SPOT_ID]).to_numpy()
    inside = np.isfinite(spot_of)
    rna = cells.obs[f"{K.PREDICTION}_rna_content"].to_numpy()
    assert np.isfinite(rna).all()
    assert (rna > 0).all()
    groups = spot_of[inside].astype(int)
    summed = values[inside].groupby(groups).sum()
    total = pd.Series(rna[inside]).groupby(groups).sum()
    n_cells = pd.Series(1.0, index=groups).groupby(level=0).sum()
    with torch.no_grad():
        factor = model.net.depth_factor(torch.as_tensor(n_cells.to_numpy())).numpy()
    pooled = summed.div(total, axis=0) * factor
    np.testing.assert_allclose(pooled.to_numpy(), spots.iloc[pooled.index].to_numpy(), rtol=1e-4)


def test_library_loss_is_zero_when_rna_contents_add_up_to_the_library() -> None:
    from bitro_sc.models._train import library_loss

    rna = torch.tensor([0.5, 1.5, 1.0, 3.0])
    index = torch.tensor([0, 0, 1, 1])
    assert float(library_loss(rna, index, 2, torch.tensor([2.0, 4.0]))) == pytest.approx(0.0, abs=1e-7)
    expected = (np.log(2.0 / 4.0) ** 2 + np.log(4.0 / 2.0) ** 2) / 2
    assert float(library_loss(rna, index, 2, torch.tensor([4.0, 2.0]))) == pytest.approx(expected, rel=1e-6)


def test_default_spot_model_learns_rna_contents_from_spot_libraries() -> None:
    """Spots: the RNA-content head is on by default, and the library loss makes a spot's summed
    cell RNA contents follow its measured library (without it nothing ties them)."""
    from bitro_sc.models._data import library_and_counts

    slides = _slides(2, grid=5)
    table = slides[0].tables[K.TABLE]
    lib, _ = library_and_counts(table, list(table.var_names))
    r = {}
    for weight in (1.0, 0.0):
        model = bs.tl.fit_bitro(
            slides,
            epochs=15,
            model=TINY,
            train={"lr": 3e-3, "library_weight": weight},
            genes=MARKERS[:8],
            validation=None,
            progress=False,
        )
        assert model.net.rna_head is not None
        assert model.params.rna_head is True
        assert model.record["train"]["library_weight"] == weight
        frame = model.predict_frame(slides[0], level="cell")
        cells = slides[0].tables[K.CELLS]
        spot_of = pd.to_numeric(cells.obs[K.SPOT_ID]).to_numpy()
        inside = np.isfinite(spot_of)
        total = pd.Series(frame.attrs["rna_content"][inside]).groupby(spot_of[inside].astype(int)).sum()
        r[weight] = _pearson(np.log(total.to_numpy()), np.log(lib[total.index]))
    print(f"Pearson(log Σ r, log library) over spots: with library loss {r[1.0]:.3f}, without {r[0.0]:.3f}")
    assert r[1.0] > 0.95
    assert r[1.0] > r[0.0] + 0.05  # 0.994 vs 0.895 when written


def test_saved_model_reloads_with_identical_predictions(trained, tmp_path: Path) -> None:
    model, _, test, _ = trained
    model.save(tmp_path / "m")
    again = BiTroModel.load(tmp_path / "m")
    assert again.genes == model.genes
    assert again.record["hvgs"] == model.record["hvgs"]
    for level in ("spot", "bulk"):
        a, b = model.predict_frame(test, level=level), again.predict_frame(test, level=level)
        pd.testing.assert_frame_equal(a, b)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")


def test_checkpoint_without_rna_head_field_loads_as_plain_sum_model(tmp_path: Path) -> None:
    """Checkpoints written before the RNA-content head (no ``rna_head`` in their config) were plain
    sum-pooling models: they load as such, with identical predictions."""
    import json

    slides = _slides(2, grid=4)
    model = bs.tl.fit_bitro(
        slides, epochs=1, model={**TINY, "rna_head": False}, genes=MARKERS[:4], progress=False
    )
    assert model.net.rna_head is None
    assert model.record["train"]["lr"] == 1e-3  # lr=None resolves to the scratch rate
    model.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for field in ("rna_head", "phenotype_profiles", "slide_size_norm"):  # fields added later
        del cfg["model"][field]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    again = BiTroModel.load(tmp_path / "old")
    assert again.params.rna_head is False
    assert again.params.phenotype_profiles is False
    assert again.params.slide_size_norm is False
    pd.testing.assert_frame_equal(model.predict_frame(slides[1]), again.predict_frame(slides[1]))


def test_validation_split_groups_slides_by_patient() -> None:
    from bitro_sc.models._split import split_slides as _split

    patients = ["p1", "p1", "p2", "p3", "p4", "p5"]
    samples = [f"s{i}" for i in range(6)]
    train, val, frac = _split(patients, samples, "auto", "spot", seed=0)
    assert frac == 0.0
    assert len({patients[i] for i in val}) == 1  # 20 % of 5 patients
    assert {patients[i] for i in train}.isdisjoint({patients[i] for i in val})  # no patient on both sides
    assert sorted(train + val) == list(range(6))
    assert _split(patients, samples, ["p1"], "spot", seed=0)[1] == [0, 1]
    assert _split(patients, samples, ["s3"], "bulk", seed=0)[1] == [3]
    assert _split(patients[:3], samples[:3], "auto", "bulk", seed=0) == ([0, 1, 2], [], 0.0)
    assert _split(patients, samples, None, "spot", seed=0) == (list(range(6)), [], 0.0)
    with pytest.raises(ValueError, match="match no slide"):
        _split(patients, samples, ["p9"], "spot", seed=0)
    with pytest.raises(ValueError, match="keep at least one"):
        _split(patients, samples, patients, "spot", seed=0)


def test_refit_trains_again_on_all_bags_for_the_chosen_epochs() -> None:
    slides = _slides(2, grid=4)
    kw = {"model": TINY, "progress": False, "genes": MARKERS[:6], "overwrite": True, "epochs": 3}
    plain = bs.tl.fit_bitro(slides, train={"refit": False}, **kw)
    assert plain.record["refit"] is None
    assert plain.record["model"]["phenotype_profiles"] is False  # auto: off for spots
    model = bs.tl.fit_bitro(slides, **kw)  # refit by default
    assert model.record["n_bags_validation"] > 0  # the auto split held out spot blocks
    refit = model.record["refit"]
    assert refit["epochs"] == model.record["best_epoch"] + 1
    assert len(refit["train_loss"]) == refit["epochs"]
    assert model.record["history"] == plain.record["history"]  # the choosing run is the same
    assert not np.allclose(
        model.predict_frame(slides[0]).to_numpy(), plain.predict_frame(slides[0]).to_numpy()
    )


def test_same_seed_gives_the_same_model() -> None:
    slides = _slides(2, grid=4)
    kw = {"epochs": 2, "model": TINY, "progress": False, "genes": MARKERS[:6], "overwrite": True}
    a = bs.tl.fit_bitro(slides, seed=3, **kw).predict_frame(slides[0])
    b = bs.tl.fit_bitro(slides, seed=3, **kw).predict_frame(slides[0])
    c = bs.tl.fit_bitro(slides, seed=4, **kw).predict_frame(slides[0])
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.to_numpy(), c.to_numpy())


@pytest.mark.parametrize("rna_head", [False, True])
def test_bulk_training_predicts_slides_and_cells(rna_head: bool) -> None:
    slides = _slides(4, grid=4)
    model = bs.tl.fit_bitro(
        slides[:3],
        level="bulk",
        epochs=2,
        model={**TINY, "rna_head": rna_head},
        train={"chunk_cells": 100},
        genes=MARKERS,
        progress=False,
    )
    assert model.level == "bulk"  # < 5 slides: no validation
    assert model.record["model"]["phenotype_profiles"] is True  # auto: on for whole slides
    assert model.net.profiles is not None
    assert model.record["split"]["validation"] == []
    bs.tl.predict_bitro(slides[3], model, level="bulk")
    bulk = slides[3].tables[K.BULK]
    row = bulk.layers[K.PREDICTION][0, bulk.var_names.get_indexer(model.genes)]
    cells = model.predict_frame(slides[3], level="cell")
    if not rna_head:  # plain sum: the cells' shares add up to the slide
        assert "rna_content" not in cells.attrs
        np.testing.assert_allclose(cells.sum(0).to_numpy(), row, rtol=1e-4)
        return
    rna = cells.attrs["rna_content"]
    with torch.no_grad():
        factor = model.net.depth_factor(torch.tensor([float(len(cells))])).numpy()[0]
    np.testing.assert_allclose(cells.sum(0).to_numpy() / rna.sum() * factor, row, rtol=1e-4)


@pytest.mark.slow
def test_lora_transfer_trains_adapters_and_leaves_the_base_untouched(tmp_path: Path) -> None:
    slides = _slides(3, grid=4)
    base = bs.tl.fit_bitro(slides, level="bulk", epochs=1, model=TINY, genes=MARKERS[:10], progress=False)
    before = {k: v.clone() for k, v in base.net.state_dict().items()}
    genes = MARKERS[5:14]  # 5 shared with the base, 4 new
    model = bs.tl.fit_bitro(
        slides[0],
        transfer="bulk",
        base=base,
        genes=genes,
        epochs=2,
        policy="lora",
        validation=None,
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in base.net.state_dict().items())
    rec = model.record
    assert rec["matched_genes"] == MARKERS[5:10]
    assert rec["new_genes"] == MARKERS[10:14]
    assert rec["base"]["policy"] == "lora"
    assert rec["train"]["lr"] == 3e-3  # LoRA adapters train at the higher default rate
    trainable = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable
    heads = ("head.", "rna_head.", "profiles.")  # the phenotype profiles belong to the gene head
    assert all("lora_" in n or n.startswith(heads) or n == "depth" for n in trainable)
    assert any(n.startswith("blocks.0.q.lora_A") for n in trainable)
    assert rec["n_trainable"] == sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    assert rec["n_frozen"] > rec["n_trainable"]
    # the frozen base weights inside the adapted network are the base's
    state = model.net.state_dict()
    assert torch.equal(state["blocks.0.q.base_layer.weight"], before["blocks.0.q.weight"])
    assert torch.equal(state["gat.0.lin.weight"], before["gat.0.lin.weight"])
    # before training, matched genes start from the base's head rows (bias shifted by the bag-size
    # ratio: plain sum pooling makes per-cell values shares of the bag), new genes from fresh rows
    from bitro_sc.models._transfer import transfer_net

    net, _, _ = transfer_net(
        base, genes, policy="lora", bias_new=torch.zeros(len(genes)), target_bag_cells=10.0
    )
    head = net.state_dict()
    torch.testing.assert_close(head["head.weight"][:5], before["head.weight"][5:10])
    assert not base.params.normalized
    shift = float(np.log(base.bag_cells / 10.0))
    torch.testing.assert_close(head["head.bias"][:5], before["head.bias"][5:10] + shift)
    assert torch.equal(head["head.bias"][5:], torch.zeros(4))
    # a bulk base has phenotype profiles (deconvolution start): matched genes keep theirs, new start at 0
    assert base.params.phenotype_profiles
    torch.testing.assert_close(head["profiles.weight"][:, :5], before["profiles.weight"][:, 5:10])
    assert torch.equal(head["profiles.weight"][:, 5:], torch.zeros(head["profiles.weight"].shape[0], 4))

    # the adapters survive saving and loading
    model.save(tmp_path / "lora")
    again = BiTroModel.load(tmp_path / "lora")
    assert again.lora is not None
    pd.testing.assert_frame_equal(model.predict_frame(slides[1]), again.predict_frame(slides[1]))

    head_only = bs.tl.fit_bitro(
        slides[0],
        transfer="bulk",
        base=base,
        genes=genes,
        policy="head",
        epochs=1,
        progress=False,
        overwrite=True,
    )
    trainable = {n for n, p in head_only.net.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "profiles.weight"}
    full = bs.tl.fit_bitro(
        slides[0],
        transfer="bulk",
        base=base,
        genes=genes,
        policy="full",
        epochs=1,
        progress=False,
        overwrite=True,
    )
    assert full.record["n_frozen"] == 0


def test_transfer_without_base_trains_one_on_the_bulk_tables() -> None:
    slides = _slides(2, grid=4)
    model = bs.tl.fit_bitro(slides, transfer="bulk", epochs=1, model=TINY, genes=MARKERS[:6], progress=False)
    assert model.level == "spot"
    assert model.record["base"]["base_level"] == "bulk"
    for s in slides:
        del s.tables[K.BULK]
    with pytest.raises(ValueError, match=r"pass `base=`.*`bulk=\[\.\.\.\]`"):
        bs.tl.fit_bitro(slides, transfer="bulk", epochs=1, progress=False, overwrite=True)


def test_spatial_transfer_adapts_a_spot_model_to_bulk() -> None:
    slides = _slides(3, grid=4)
    base = bs.tl.fit_bitro(slides[:2], epochs=1, model=TINY, genes=MARKERS[:6], progress=False)
    model = bs.tl.fit_bitro(slides, transfer="spatial", base=base, epochs=1, policy="lora", progress=False)
    assert model.level == "bulk"
    assert model.lora is not None
    assert set(MARKERS[:6]) <= set(model.genes)
    with pytest.raises(ValueError, match="transfer='bulk' starts from a bulk-trained model"):
        bs.tl.fit_bitro(slides[0], transfer="bulk", base=base, progress=False, overwrite=True)


def test_bad_input_gets_a_clear_error() -> None:
    slides = _slides(2, grid=4)
    with pytest.raises(ValueError, match=r"not in every training spot table: \['NOPE'\]"):
        bs.tl.fit_bitro(slides, genes=["gene1", "NOPE"], progress=False)
    base = bs.tl.fit_bitro(slides[0], level="bulk", epochs=1, model=TINY, genes=MARKERS[:3], progress=False)
    with pytest.raises(ValueError, match="no overlapping genes"):
        bs.tl.fit_bitro(slides[1], transfer="bulk", base=base, genes=["gene30", "gene31"], progress=False)
    other = toy_slide(seed=5, grid=4, n_features=12)
    with pytest.raises(ValueError, match="trained on 16 cell features, the target slides have 12"):
        bs.tl.fit_bitro(other, transfer="bulk", base=base, progress=False)
    slides[1].tables[K.BULK].obs[K.SAMPLE_ID] = ["somebody_else"]
    with pytest.raises(ValueError, match="match no slide"):
        bs.tl.fit_bitro(slides, level="bulk", progress=False, overwrite=True)
    cells = slides[0].tables[K.CELLS]
    cells.obs[K.SPOT_ID] = pd.array([pd.NA] * cells.n_obs, dtype="Int64")
    with pytest.raises(ValueError, match=r"run `bs.tl.assign_cells` first"):
        bs.tl.fit_bitro(slides[0], progress=False, overwrite=True)
    del cells.obs[K.SPOT_ID]
    with pytest.raises(KeyError, match=r"run `bs.tl.assign_cells` first"):
        bs.models.fit(slides[0], progress=False, overwrite=True)  # the algorithm runs no missing step


def test_predict_accepts_any_model_implementing_the_protocol() -> None:
    slide = toy_slide(seed=3, grid=3)
    table = slide.tables[K.TABLE]

    class Constant:
        def __init__(self) -> None:
            self.genes = ["gene1", "gene2"]
            self.levels = ("spot",)
            self.record = {"genes": ["gene1", "gene2"], "hvgs": ["gene2"], "method": "constant"}

        def predict_frame(self, sdata, *, level="spot", keys=None):
            t = sdata.tables[K.TABLE]
            return pd.DataFrame(7.0, index=t.obs_names, columns=self.genes)

    bs.tl.predict_bitro(slide, Constant(), key_added="const")
    assert (table[:, ["gene1", "gene2"]].layers["const"] == 7.0).all()
    assert table.uns["const"]["method"] == "constant"
    with pytest.raises(ValueError, match="predicts levels"):
        bs.tl.predict_bitro(slide, Constant(), level="cell")
    with pytest.raises(TypeError, match="ExpressionModel"):
        bs.tl.predict_bitro(slide, object())  # type: ignore[arg-type]


@pytest.mark.slow
def test_slide_with_predictions_and_record_writes_to_zarr(tmp_path: Path) -> None:
    slides = _slides(2, grid=3)
    model = bs.tl.fit_bitro(slides, epochs=1, model=TINY, genes=MARKERS[:4], progress=False)
    bs.tl.predict_bitro(slides[0], model)
    bs.tl.predict_bitro(slides[0], model, level="cell")
    slides[0].write(tmp_path / "slide.zarr")
    from spatialdata import read_zarr

    back = read_zarr(tmp_path / "slide.zarr")
    np.testing.assert_array_equal(
        back.tables[K.TABLE].layers[K.PREDICTION], slides[0].tables[K.TABLE].layers[K.PREDICTION]
    )
    assert list(back.tables[K.TABLE].uns[K.RUN]["genes"]) == model.genes


def test_gene_bias_starts_at_the_log1p_optimal_constant() -> None:
    """The head bias starts where the log1p MSE of a constant prediction is minimal (per gene), not at
    the arithmetic mean (far too high for sparse spots); lr ~0 keeps it there through one epoch."""
    from bitro_sc.models._data import library_and_counts

    slides = _slides(2)
    genes = MARKERS[:4]
    model = bs.tl.fit_bitro(
        slides,
        epochs=1,
        train={"lr": 1e-12},
        model={**TINY, "rna_head": False},
        genes=genes,
        validation=None,
        progress=False,
    )
    targets, sizes = [], []
    for s in slides:
        table = s.tables[K.TABLE]
        index = model._inputs(s, need_spots=True, table_key=K.TABLE, cells_key=K.CELLS).spot_index
        n = np.bincount(index[index >= 0], minlength=table.n_obs)
        lib, counts = library_and_counts(table, genes)
        ok = (n > 0) & (lib > 0)
        targets.append(counts[ok] / lib[ok, None] * 1e4)
        sizes.append(n[ok])
    y = np.concatenate(targets)
    per_cell = np.expm1(np.log1p(y).mean(axis=0)) / np.concatenate(sizes).mean()
    bias = model.net.head.bias.detach().numpy()
    np.testing.assert_allclose(bias, np.log(per_cell), atol=1e-4)
    assert (bias < np.log(y.mean(axis=0) / np.concatenate(sizes).mean()) - 0.05).all()


def test_transfer_of_an_rna_head_base_keeps_its_heads_unshifted() -> None:
    """With RNA-content pooling per-cell values do not depend on the bag size: matched genes keep
    the base's head rows as they are, the RNA head is copied, and the depth exponent restarts at
    the target level's default."""
    from bitro_sc.models._net import DEPTH_INIT
    from bitro_sc.models._transfer import transfer_net

    slides = _slides(3, grid=4)
    base = bs.tl.fit_bitro(
        slides, level="bulk", epochs=1, model={**TINY, "rna_head": True}, genes=MARKERS[:10], progress=False
    )
    before = {k: v.clone() for k, v in base.net.state_dict().items()}
    genes = MARKERS[5:14]
    net, _, report = transfer_net(
        base, genes, policy="head", bias_new=torch.zeros(len(genes)), target_bag_cells=10.0, level="spot"
    )
    state = net.state_dict()
    torch.testing.assert_close(state["head.bias"][:5], before["head.bias"][5:10])
    torch.testing.assert_close(state["rna_head.weight"], before["rna_head.weight"])
    assert torch.equal(state["depth"], torch.full((9,), DEPTH_INIT["spot"]))
    assert float(state["ref_cells"]) == 10.0
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    heads = {"head.weight", "head.bias", "rna_head.weight", "rna_head.bias", "profiles.weight"}
    assert trainable == {*heads, "depth"}
    assert report["matched_genes"] == MARKERS[5:10]


def test_transfer_remaps_the_linear_skip_by_gene() -> None:
    from bitro_sc.models._transfer import transfer_net

    base = bs.tl.fit_bitro(
        _slides(2, grid=4), epochs=1, model={**TINY, "linear_skip": True}, genes=MARKERS[:6], progress=False
    )
    with torch.no_grad():
        torch.nn.init.normal_(base.net.skip.weight)  # distinguishable rows
    genes = ["gene4", "gene5", "gene12"]  # two known, one new
    net, _, _ = transfer_net(base, genes, policy="lora", bias_new=torch.zeros(3), target_bag_cells=5.0)
    torch.testing.assert_close(net.skip.weight[:2], base.net.skip.weight[4:6])
    assert torch.equal(net.skip.weight[2], torch.zeros_like(net.skip.weight[2]))
    assert net.skip.weight.requires_grad


def _rename_cell_keys(sdata) -> None:
    """Move features, phenotype, spot ids and graph of the cells table to custom keys."""
    cells = sdata.tables[K.CELLS]
    cells.obsm["X_uni"] = cells.obsm.pop(K.FEATURES)
    cells.obs["my_type"] = cells.obs.pop(K.PHENOTYPE)
    cells.obs["my_spot"] = cells.obs.pop(K.SPOT_ID)
    cells.obsp["cg_connectivities"] = cells.obsp.pop(K.CONNECTIVITIES)
    cells.obsp["cg_distances"] = cells.obsp.pop(K.DISTANCES)


def test_data_under_custom_keys_is_fitted_and_predicted_with_the_recorded_keys(tmp_path: Path) -> None:
    import json

    kw = {"epochs": 1, "model": TINY, "genes": MARKERS[:4], "progress": False, "validation": None}
    plain = bs.tl.fit_bitro(_slides(2, grid=4), **kw)
    slides = _slides(2, grid=4)
    for s in slides:
        _rename_cell_keys(s)
    with pytest.raises(KeyError, match="X_bitro"):
        bs.tl.fit_bitro(slides, **kw)
    keys = {"features_key": "X_uni", "phenotype_key": "my_type", "spot_key": "my_spot", "graph_key": "cg"}
    model = bs.tl.fit_bitro(slides, **kw, **keys)
    assert {k: model.record["keys"][k] for k in keys} == keys
    assert model.keys == bs.models.DataKeys(**keys)
    assert model.phenotypes == plain.phenotypes  # the phenotype column was read
    expected = plain.predict_frame(_slides(2, grid=4)[1])
    pd.testing.assert_frame_equal(model.predict_frame(slides[1]), expected)
    # predict_bitro reads the keys the model was trained on, without naming them
    bs.tl.predict_bitro(slides[1], model)
    table = slides[1].tables[K.TABLE]
    layer = table[:, model.genes].layers[K.PREDICTION]
    np.testing.assert_array_equal(layer, expected.to_numpy())
    # explicit arguments override the recorded keys
    with pytest.raises(KeyError, match="X_other"):
        bs.tl.predict_bitro(slides[1], model, features_key="X_other", key_added="other")
    # saved models keep their keys; files written before keys were recorded load with the defaults
    model.save(tmp_path / "m")
    assert BiTroModel.load(tmp_path / "m").keys == model.keys
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["record"]["keys"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert BiTroModel.load(tmp_path / "m").keys == bs.models.DataKeys()


def test_models_fit_is_the_algorithm_behind_fit_bitro() -> None:
    kw = {"genes": MARKERS[:4], "progress": False, "validation": None, "model": TINY}
    a = bs.tl.fit_bitro(_slides(2, grid=4), epochs=1, **kw)
    b = bs.models.fit(_slides(2, grid=4), train={"epochs": 1}, **kw)
    slide = _slides(2, grid=4)[1]
    pd.testing.assert_frame_equal(a.predict_frame(slide), b.predict_frame(slide))
    assert b.record["transfer"] == "none"
