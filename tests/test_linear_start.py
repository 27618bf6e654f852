"""Ridge start of the linear skip and per-gene loss weights (bitro_sc.models._linear, _train)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitro_sc as bs
from bitro_sc.datasets import toy as toy_slide
from bitro_sc.models import ModelParams, TrainParams
from bitro_sc.models._bags import SlideCells, SpotSet
from bitro_sc.models._data import FeatureStats
from bitro_sc.models._linear import ridge_start
from bitro_sc.models._start import Inputs, ScratchStart
from bitro_sc.models._train import bag_targets, gene_weights, spot_values

torch.set_num_threads(1)
SMALL = {"hidden": 16, "phenotype_dim": 4, "gat_layers": 0, "transformer_heads": 2, "gat_heads": 2}


def _spots(seed: int, n_spots: int = 60, n_features: int = 5) -> tuple[SpotSet, np.ndarray]:
    """Spots whose log expression is linear in their cells' mean features and log cell count
    (``beta``; gene 1 also grows with the cell count, gene 3 is sparse)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(6, 25, n_spots)
    spot_of = np.repeat(np.arange(n_spots), sizes)
    n = spot_of.size
    shift = rng.normal(size=(n_spots, n_features))  # spots differ in their mean features
    x = (rng.normal(size=(n, n_features)) + shift[spot_of]).astype(np.float32)
    slide = SlideCells(
        x, np.ones(n, dtype=np.int64), rng.uniform(0, 500, (n, 2)).astype(np.float32), None, spot_of
    )
    beta = np.array([[0.0, 0, 0, 0, 0], [0.5, -0.3, 0, 0, 0], [0, 0, 0.4, 0.4, 0], [0, 0, 0, 0, 0.6]])
    gamma = np.array([0.0, 1.0, 0.0, 0.0])  # exponent of the cell count per gene
    base = np.log([50.0, 80.0, 20.0, 0.3])
    xbar = np.stack([x[spot_of == s].mean(axis=0) for s in range(n_spots)])
    log_n = np.log(sizes / sizes.mean())[:, None]
    target = np.exp(base + xbar @ beta.T + log_n * gamma).astype(np.float32)
    part = slide.spot_partition(n_spots)
    return SpotSet(slide, part, np.arange(n_spots), target, np.full(n_spots, 1e4)), beta


def test_ridge_start_recovers_the_linear_effects_of_the_mean_features_and_cell_count() -> None:
    data, beta = _spots(0)
    fit = ridge_start([data], 4, bag_cells=15.0)
    assert fit.weight.shape == (4, 5)
    assert fit.depth.shape == fit.skip_shift.shape == fit.depth_shift.shape == (4,)
    assert fit.info["alpha"] > 0
    # well-expressed genes: the log1p slope is the log slope (link factor ~1)
    np.testing.assert_allclose(fit.weight[:3], beta[:3], atol=0.08)
    np.testing.assert_allclose(fit.depth[:3], [0.0, 1.0, 0.0], atol=0.1)
    # the sparse gene's log1p slope is scaled back to the log link (a 0.6 effect, not a damped one)
    assert fit.weight[3, 4] > 0.3
    assert abs(fit.weight[3, :4]).max() < 0.1


def test_ridge_start_needs_two_bags() -> None:
    data, _ = _spots(0, n_spots=1)
    with pytest.raises(ValueError, match="at least 2 training bags"):
        ridge_start([data], 4, bag_cells=1.0)


@pytest.mark.parametrize("start", ["ridge", "constant"])
def test_a_fresh_network_starts_from_the_ridge_fit(start: str) -> None:
    data, _ = _spots(1)
    params = ModelParams(**SMALL, linear_skip=True, linear_start=start, bag_linear=False).resolved("spot")  # type: ignore[arg-type]
    inputs = Inputs(FeatureStats.fit([data.slide.features]), ["a"], params)
    targets = bag_targets([data], 4).astype(np.float64)
    per_cell = np.expm1(np.log1p(targets).mean(axis=0))
    torch.manual_seed(0)
    net, _, report = ScratchStart(params).net(
        [data],
        inputs=inputs,
        genes=list("abcd"),
        per_cell=per_cell,
        bag_cells=15.0,
        level="spot",
        device=torch.device("cpu"),
    )
    net.eval()
    pred = spot_values(net, data.slide, data.part, data.rows, device=torch.device("cpu"))
    r = [np.corrcoef(np.log1p(pred[:, g]), np.log1p(targets[:, g]))[0, 1] for g in (1, 2, 3)]
    assert net.depth is not None
    if start == "ridge":
        assert min(r) > 0.9  # before any training step
        assert report["linear_start"]["skip"]
        assert report["linear_start"]["depth"]
        assert abs(float(net.depth[0].detach())) < 0.1  # gene 0 does not grow with the cell count
    else:
        assert torch.equal(net.depth, torch.ones(4))
        assert net.skip is not None
        assert not net.skip.weight.any()  # zero-initialised: the plain deep model
        assert report == {}


def test_variance_gene_weights_make_every_gene_count_alike() -> None:
    data, _ = _spots(2)
    w = gene_weights([data], "variance", torch.device("cpu"))
    assert w is not None
    assert gene_weights([data], "none", torch.device("cpu")) is None
    var = np.log1p(data.target.astype(np.float64)).var(axis=0)
    assert float(w.mean()) == pytest.approx(1.0)
    # weighted variances are equal, except the flat gene 0 whose weight is capped
    wv = w.numpy()[1:] * var[1:]
    np.testing.assert_allclose(wv, wv.mean(), rtol=1e-4)
    with pytest.raises(ValueError, match="gene_weights must be one of"):
        TrainParams(gene_weights="rank")  # type: ignore[arg-type]


def test_fit_with_the_ridge_start_records_it_and_predicts() -> None:
    train = [toy_slide(seed=i, grid=4) for i in range(2)]
    genes = [f"gene{g}" for g in range(6)]
    model = bs.tl.fit_bitro(
        train,
        epochs=2,
        genes=genes,
        model={**SMALL, "linear_skip": True, "linear_start": "ridge", "bag_linear": False},
        train={"gene_weights": "variance"},
        progress=False,
    )
    start = model.record["linear_start"]
    assert start["alpha"] > 0
    assert model.record["train"]["gene_weights"] == "variance"
    test = toy_slide(seed=5, grid=4)
    bs.tl.predict_bitro(test, model)
    table = test.tables["table"]
    pred = np.asarray(table[:, genes].layers["bitro"], dtype=np.float64)
    assert np.isfinite(pred).all()
    assert (pred >= 0).all()


def _fresh(data: SpotSet, **model: object) -> tuple[torch.nn.Module, dict, ModelParams]:
    params = ModelParams(**SMALL, **model).resolved("spot")  # type: ignore[arg-type]
    inputs = Inputs(FeatureStats.fit([data.slide.features]), ["a"], params)
    targets = bag_targets([data], 4).astype(np.float64)
    torch.manual_seed(0)
    net, _, report = ScratchStart(params).net(
        [data],
        inputs=inputs,
        genes=list("abcd"),
        per_cell=np.expm1(np.log1p(targets).mean(axis=0)),
        bag_cells=15.0,
        level="spot",
        device=torch.device("cpu"),
    )
    return net.eval(), report, params


def test_the_bag_linear_term_is_chosen_by_validation_for_spots_with_the_ridge_start() -> None:
    assert ModelParams().resolved("spot").bag_linear == "auto"
    assert ModelParams(bag_linear=True).resolved("spot").bag_linear is True
    assert not ModelParams().resolved("bulk").bag_linear  # whole slides: phenotype profiles instead
    assert not ModelParams(linear_start="constant").resolved("spot").bag_linear
    assert not ModelParams(bag_linear=False).resolved("spot").bag_linear


def test_with_the_bag_term_a_fresh_network_predicts_exactly_the_ridge_fit() -> None:
    from sklearn.linear_model import Ridge

    data, _ = _spots(3)
    net, report, params = _fresh(data, bag_linear=True)
    assert params.bag_linear is True
    alpha = report["linear_start"]["alpha"]
    # the ridge, solved independently: log1p targets on the standardised [mean features, log1p(n)]
    sizes = data.part.sizes()[data.rows].astype(np.float64)
    xbar = np.stack([data.slide.features[data.slide.spot_index == s].mean(axis=0) for s in data.rows])
    raw = np.hstack([xbar, np.log1p(sizes)[:, None]])
    design = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    y = np.log1p(bag_targets([data], 4).astype(np.float64))
    ridge = Ridge(alpha=alpha).fit(design, y).predict(design)
    cells = np.full((data.slide.n_cells, net.n_genes), np.nan, dtype=np.float32)
    rna = np.full(data.slide.n_cells, np.nan, dtype=np.float32)
    pred = spot_values(
        net, data.slide, data.part, data.rows, device=torch.device("cpu"), cells_out=cells, rna_out=rna
    )
    np.testing.assert_allclose(np.log1p(pred), np.maximum(ridge, 1e-4), atol=2e-3)
    # cells: RNA content times their bag's level at the reference size (every profile starts at 1)
    assert cells is not None
    assert rna is not None
    profile = cells[data.slide.spot_index == 0] / rna[data.slide.spot_index == 0, None]
    np.testing.assert_allclose(profile, np.broadcast_to(profile[0], profile.shape), rtol=1e-5)
    # a spot = Σ values / Σ RNA of its cells times the depth factor at its mean features
    inside = data.slide.spot_index[:, None] == np.asarray(data.rows)[None, :]
    pooled = (inside.T @ cells.astype(np.float64)) / (inside.T @ rna.astype(np.float64))[:, None]
    with torch.no_grad():
        factor = net.depth_factor(torch.as_tensor(sizes), bag_means=torch.as_tensor(xbar)).numpy()
    np.testing.assert_allclose(pooled * factor, pred, rtol=1e-4)
    with pytest.raises(ValueError, match="bag_means"):
        net.depth_factor(torch.tensor([10.0, 20.0, 30.0]))  # not the bags of the last forward pass


def test_the_bag_term_learns_and_a_fitted_model_saves_and_reloads(tmp_path) -> None:
    train = [toy_slide(seed=i, grid=4) for i in range(2)]
    genes = [f"gene{g}" for g in range(6)]
    model = bs.tl.fit_bitro(train, epochs=2, genes=genes, model={**SMALL, "bag_linear": True}, progress=False)
    assert model.record["model"]["bag_linear"] is True
    assert model.record["bag_linear_selection"] is None  # given, not chosen
    assert model.record["linear_start"]["bag_linear"]
    test = toy_slide(seed=5, grid=4)
    spots = model.predict_arrays(test, level="spot")
    cells = model.predict_arrays(test, level="cell")
    assert np.isfinite(spots[~np.isnan(spots).any(axis=1)]).all()
    assert (cells[np.isfinite(cells)] >= 0).all()
    path = model.save(tmp_path / "m")
    again = type(model).load(path)
    np.testing.assert_allclose(again.predict_arrays(test, level="spot"), spots, rtol=1e-5)


def test_early_stopping_keeps_the_ridge_start_when_no_epoch_beats_it() -> None:
    train = [toy_slide(seed=i, grid=4) for i in range(3)]
    genes = [f"gene{g}" for g in range(6)]
    small = {**SMALL, "bag_linear": True}
    frozen = bs.tl.fit_bitro(
        train, epochs=2, genes=genes, model=small, train={"lr": 1e-12, "patience": 1}, progress=False
    )
    assert frozen.record["best_epoch"] == -1  # no step can lower the validation loss: the start is kept
    assert frozen.record["refit"]["epochs"] == 0
    learns = bs.tl.fit_bitro(train, epochs=2, genes=genes, model=small, train={"lr": 3e-2}, progress=False)
    assert learns.record["best_epoch"] >= 0


def test_auto_trains_with_and_without_the_bag_term_and_keeps_the_lower_validation_loss() -> None:
    train = [toy_slide(seed=i, grid=4) for i in range(3)]
    genes = [f"gene{g}" for g in range(6)]
    model = bs.tl.fit_bitro(train, epochs=2, genes=genes, model=SMALL, progress=False)
    sel = model.record["bag_linear_selection"]
    losses = sel["val_loss"]
    assert set(losses) == {"True", "False"}
    assert sel["chosen"] is (losses["True"] < losses["False"])
    assert model.record["model"]["bag_linear"] is sel["chosen"]
    assert (model.net.bag_linear is not None) is sel["chosen"]
    # no validation bags: nothing to choose with, the plain network
    plain = bs.tl.fit_bitro(train, epochs=1, genes=genes, model=SMALL, validation=None, progress=False)
    assert plain.record["bag_linear_selection"] is None
    assert plain.net.bag_linear is None


def test_the_bag_term_never_extrapolates_far_above_the_training_bags() -> None:
    data, _ = _spots(4)
    net, _, _ = _fresh(data, bag_linear=True)
    y = np.log1p(bag_targets([data], 4).astype(np.float64))
    assert net.bag_ceiling is not None
    np.testing.assert_allclose(net.bag_ceiling.numpy(), y.max(axis=0) + 1.0, rtol=1e-6)
    with torch.no_grad():  # bags with features far outside the training range
        far = net.depth_factor(torch.tensor([15.0, 15.0]), bag_means=torch.full((2, 5), 50.0))
        level = net._bag_level(net.bag_linear(torch.full((2, 5), 50.0)), torch.tensor([15.0, 15.0]))
    assert far is not None
    assert torch.isfinite(far).all()
    assert (level <= torch.expm1(net.bag_ceiling) * (1 + 1e-5)).all()
