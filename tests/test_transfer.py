"""Transfer route selection (issue 17): the route and epochs are chosen by validation alone, the
base's per-gene scale is matched to the targets, and the choice is recorded and plotted."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc.datasets import toy as toy_slide
from bitro_sc.models import _route
from bitro_sc.models._params import TrainParams

torch.set_num_threads(1)
TINY = {"hidden": 16, "phenotype_dim": 4, "gat_heads": 2, "transformer_heads": 2}
MARKERS = [f"gene{g}" for g in range(16)]


def _slides(n: int, *, grid: int = 4, start: int = 0) -> list:
    return [toy_slide(seed=start + i, grid=grid) for i in range(n)]


def _fake_training(monkeypatch: pytest.MonkeyPatch, curves: dict[str, list[float]], zero: float) -> None:
    """Replace training and evaluation in route selection by fixed validation curves per route."""

    def evaluate_loss(net: Any, val: Any, **kw: Any) -> float:
        return zero

    def train_loop(net: Any, train: Any, val: Any, **kw: Any) -> tuple[list[dict[str, float]], int]:
        curve = curves[net]
        hist = [{"epoch": i, "train_loss": 0.5, "val_loss": v} for i, v in enumerate(curve)]
        return hist, int(np.argmin(curve))

    monkeypatch.setattr(_route, "evaluate_loss", evaluate_loss)
    monkeypatch.setattr(_route, "train_loop", train_loop)


@pytest.mark.parametrize(
    ("curves", "zero", "chosen", "epochs"),
    [
        ({"head": [0.9, 0.95], "lora": [0.8, 0.7, 0.75]}, 1.0, "lora", 2),
        ({"head": [1.2, 1.1], "lora": [1.05, 1.3]}, 1.0, "zero-shot", 0),
        ({"head": [0.9], "scratch": [0.5, 0.4]}, 1.0, "scratch", 2),
    ],
)
def test_route_and_epochs_minimise_the_mean_validation_loss(
    monkeypatch: pytest.MonkeyPatch, curves: dict[str, list[float]], zero: float, chosen: str, epochs: int
) -> None:
    _fake_training(monkeypatch, curves, zero)
    routes = [_route.Route(name, "scratch" if name == "scratch" else name) for name in curves]
    sel = _route.select_route(
        routes,
        folds=lambda route: [([1], [2])],
        begin=lambda route, data: route.name,
        tp=TrainParams(),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    assert sel["chosen"] == chosen
    assert sel["epochs"] == epochs
    assert sel["scores"]["zero-shot"] == zero
    assert min(sel["scores"].values()) == sel["scores"][chosen]
    assert sel["curves"]["head"][0] == zero  # index 0: before training, the common start


def test_a_shrunk_route_is_chosen_when_halfway_validates_best(monkeypatch: pytest.MonkeyPatch) -> None:
    # one weight: the start at 0, training moves it to 2, the validation optimum is 1 (halfway)
    def evaluate_loss(net: Any, val: Any, **kw: Any) -> float:
        return float((net.weight.item() - 1.0) ** 2)

    def train_loop(net: Any, train: Any, val: Any, **kw: Any) -> tuple[list[dict[str, float]], int]:
        with torch.no_grad():
            net.weight.fill_(2.0)
        return [{"epoch": 0, "train_loss": 0.5, "val_loss": 1.0}], 0

    def begin(route: Any, data: Any) -> torch.nn.Module:
        net = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(net.weight)
        return net

    monkeypatch.setattr(_route, "evaluate_loss", evaluate_loss)
    monkeypatch.setattr(_route, "train_loop", train_loop)
    sel = _route.select_route(
        [_route.Route("lora", "lora")],
        folds=lambda route: [([1], [2])],
        begin=begin,
        tp=TrainParams(),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
        shrink=(0.5, 0.75),
    )
    assert sel["chosen"] == _route.shrink_name("lora", 0.5)
    assert (sel["route"], sel["shrink"]) == ("lora", 0.5)
    assert sel["scores"][_route.shrink_name("lora", 0.75)] == pytest.approx(0.25)
    assert sel["scores"]["lora"] == pytest.approx(1.0)
    net = begin(None, None)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.fill_(4.0)
    _route.shrink_toward(net, start, 0.25)
    assert net.weight.item() == pytest.approx(1.0)


def test_folds_are_averaged_epoch_by_epoch() -> None:
    # a fold that stopped early keeps its last value
    np.testing.assert_allclose(_route._mean_curve([[1.0, 0.5], [1.0, 0.7, 0.3]]), [1.0, 0.6, 0.4])
    folds = _route.loo_folds(["a", "b", "c"])
    assert folds == [(["b", "c"], ["a"]), (["a", "c"], ["b"]), (["a", "b"], ["c"])]
    assert len(_route.loo_folds(list(range(9)))) == _route.MAX_FOLDS


def test_cross_validated_pearson_is_per_gene_across_folds() -> None:
    truth = [np.array([[1.0, 5.0, 2.0]]), np.array([[2.0, 5.0, 4.0]]), np.array([[3.0, 5.0, 8.0]])]
    same = [np.expm1(np.log1p(t) * 2.0) for t in truth]  # monotone in log1p: r = 1 per gene
    flipped = [same[2], same[1], same[0]]
    assert _route.cv_pearson(same, truth) == pytest.approx(1.0)  # gene 1 is constant: skipped
    assert _route.cv_pearson(flipped, truth) < -0.9
    # one fold holding out several slides is the same as one fold per slide
    assert _route.cv_pearson([np.concatenate(flipped)], [np.concatenate(truth)]) < -0.9


def test_route_params_use_the_routes_learning_rate_unless_one_is_given() -> None:
    lora = _route.Route("lora r4", "lora", 1e-3, 4)
    assert _route.route_params(TrainParams(), lora).lr == 1e-3
    assert _route.route_params(TrainParams(lr=5e-4), lora).lr == 5e-4
    assert _route.route_params(TrainParams(), _route.Route("lora", "lora")).lr == TrainParams.LORA_LR
    with pytest.raises(ValueError, match="`policy` must be one of"):
        _route.routes_for("best")


def test_scale_matching_sets_mean_log1p_and_keeps_pearson() -> None:
    from bitro_sc.models._train import bag_predictions, bag_targets
    from bitro_sc.models._transfer import match_scale

    slides = _slides(3)
    base = bs.tl.fit_bitro(slides[:2], epochs=1, model=TINY, genes=MARKERS[:6], progress=False)
    model = bs.tl.fit_bitro(
        slides, transfer="spatial", base=base, epochs=1, policy="head", validation=None, progress=False
    )
    # rebuild the start on the bulk bags and check the matched scale directly
    from bitro_sc.models._data import build_data

    data, _, _ = build_data(
        slides,
        [0, 1, 2],
        [],
        0.0,
        level="bulk",
        genes=model.genes,
        stats=base.stats,
        phenotypes=base.phenotypes,
        need_graph=True,
        chunk_cells=256,
        keys=bs.models.DataKeys(),
    )
    from bitro_sc.models._transfer import TransferStart

    net, _, _ = TransferStart(base, "head", match=False).net(
        data,
        inputs=TransferStart(base).inputs(slides, [0, 1, 2], bs.models.DataKeys(), "bulk"),
        genes=model.genes,
        per_cell=np.ones(len(model.genes)),
        bag_cells=100.0,
        level="bulk",
        device=torch.device("cpu"),
    )
    before = bag_predictions(net, data, device=torch.device("cpu"))
    shift = match_scale(net, data, len(model.genes), device=torch.device("cpu"))
    after = bag_predictions(net, data, device=torch.device("cpu"))
    targets = bag_targets(data, len(model.genes)).astype(np.float64)
    free = np.abs(shift) < 7.9  # the bisection searches log c in [-8, 8]
    assert free.sum() >= len(shift) - 2
    np.testing.assert_allclose(np.log1p(after).mean(0)[free], np.log1p(targets).mean(0)[free], atol=1e-3)
    np.testing.assert_allclose(after, before * np.exp(shift), rtol=1e-4)  # one factor per gene
    assert model.record["base"]["scale_shift"]["sd"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("few", [True, False], ids=["few-spots-no-scratch", "scratch-considered"])
def test_auto_transfer_records_the_route_chosen_by_validation(few, monkeypatch) -> None:
    if not few:  # 25 spots: training from scratch is a candidate only when the threshold allows it
        monkeypatch.setitem(_route.MIN_SCRATCH_BAGS, "spot", 25)
    slides = _slides(3, grid=5)
    base = bs.tl.fit_bitro(slides[1:], level="bulk", epochs=2, model=TINY, genes=MARKERS[:8], progress=False)
    model = bs.tl.fit_bitro(slides[0], transfer="bulk", base=base, epochs=3, progress=False)
    route = model.record["route"]
    assert route["selected"]
    assert route["validation"] == "held-out bags"
    names = {r.name for r in _route.AUTO_ROUTES if not (few and r.policy == "scratch")} | {"zero-shot"}
    if few:
        assert route["scratch"].startswith("left out: 25 target spots (< 100)")
    else:
        assert "scratch" not in route
    trained = [r.name for r in _route.AUTO_ROUTES if r.policy != "scratch"]
    shrunk = {_route.shrink_name(name, a) for name in trained for a in _route.SHRINK}
    assert set(route["scores"]) == names | shrunk
    assert route["chosen"] == min(route["scores"], key=route["scores"].get)
    assert route["epochs"] == route["epochs_by_route"][route["chosen"]]
    assert route["chosen"].startswith(route["route"])
    assert model.record["policy"] == _route.route_by_name(_route.AUTO_ROUTES, route["route"]).policy
    on_table = slides[0].tables[K.TABLE].uns[K.RUN]["route"]
    assert on_table["chosen"] == route["chosen"]
    ax = bs.pl.history(model)
    assert route["chosen"] in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("(chosen)" in t for t in labels)


def test_few_bulk_slides_are_validated_leave_one_slide_out() -> None:
    slides = _slides(3)
    base = bs.tl.fit_bitro(slides[:2], epochs=1, model=TINY, genes=MARKERS[:6], progress=False)
    model = bs.tl.fit_bitro(slides, transfer="spatial", base=base, epochs=2, policy="head", progress=False)
    route = model.record["route"]
    assert route["n_folds"] == 3
    assert route["validation"].startswith("leave-one-slide-out")
    shrunk = {_route.shrink_name("head", a) for a in _route.SHRINK}
    assert set(route["scores"]) == {"head", "zero-shot"} | shrunk
    # on 3+ single-slide folds the route is chosen by cross-validated Pearson, with a noise margin:
    # the best transfer candidate replaces zero-shot only when its gain exceeds MARGIN_SE SEs
    assert set(route["cv_pearson"]) == {"head", "zero-shot"} | shrunk
    (step,) = route["margin"]["steps"]
    best = max(set(route["cv_pearson"]) - {"zero-shot"}, key=route["cv_pearson"].get)
    assert (step["candidate"], step["against"]) == (best, "zero-shot")
    assert step["taken"] == (step["gain"] > route["margin"]["k_se"] * step["se"])
    assert route["chosen"] == (best if step["taken"] else "zero-shot")
    assert step["gain"] == pytest.approx(route["cv_pearson"][best] - route["cv_pearson"]["zero-shot"])
    assert f"{best} vs zero-shot" in bs.pl.history(model).get_title()
    on_table = slides[0].tables[K.BULK].uns[K.RUN]["route"]  # the run record of the bulk table
    assert on_table["chosen"] == route["chosen"]
    assert bool(on_table["margin"]["steps"]["0"]["taken"]) == step["taken"]  # lists of dicts: keyed
    assert model.record["n_bags_train"] == 3
    assert model.window_cells == base.window_cells  # the spot base's attention window is kept
    # without validation nothing is chosen: the policy trains for the given epochs
    plain = bs.tl.fit_bitro(
        slides, transfer="spatial", base=base, epochs=2, validation=None, progress=False, overwrite=True
    )
    assert plain.record["route"]["selected"] is False
    assert plain.record["route"]["chosen"] == "lora r8 lr 3e-3"  # policy="auto" falls back to LoRA
    assert plain.lora is not None
    assert len(plain.record["history"]["train_loss"]) == 2


def test_five_to_twelve_bulk_slides_choose_the_route_leave_one_slide_out(caplog) -> None:
    """20 % of 6 slides is one held-out slide: too few for the noise margin (on 8 slides the
    validation loss of 2 held-out slides chose routes that fell below the base), so the route is
    chosen as on 2-4 slides."""
    slides = _slides(6)
    base = bs.tl.fit_bitro(slides[:2], epochs=1, model=TINY, genes=MARKERS[:6], progress=False)
    with caplog.at_level("INFO", logger="bitro_sc"):
        model = bs.tl.fit_bitro(
            slides, transfer="spatial", base=base, epochs=1, policy="head", progress=False
        )
    route = model.record["route"]
    assert route["validation"].startswith("leave-one-slide-out")
    assert route["margin"] is not None  # cross-validated Pearson with the noise margin
    assert model.record["split"]["validation"] == []
    assert "too few to choose a transfer route" in caplog.text
    # an explicit validation split is kept as given
    given = bs.tl.fit_bitro(
        slides,
        transfer="spatial",
        base=base,
        epochs=1,
        policy="head",
        validation=0.34,
        progress=False,
        overwrite=True,
    )
    assert len(given.record["split"]["validation"]) == 2


def test_history_plot_shows_a_zero_shot_route_without_epochs() -> None:
    record = {
        "history": {"epoch": [], "train_loss": [], "val_loss": []},
        "route": {
            "chosen": "zero-shot",
            "epochs": 0,
            "scores": {"head": 0.4, "zero-shot": 0.3},
            "curves": {"head": [0.3, 0.4, 0.45]},
        },
    }
    ax = bs.pl.history(record)
    assert ax.get_title() == "route: zero-shot (0 epochs)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "zero-shot: 0.3 (chosen)" in labels
    assert "head: 0.4" in labels
    with pytest.raises(ValueError, match="empty"):
        bs.pl.history({"history": {"epoch": [], "train_loss": []}})


def test_a_spot_base_adapted_to_bulk_keeps_its_attention_window() -> None:
    from types import SimpleNamespace

    from bitro_sc.models._fit import _transfer_window

    spot_base = SimpleNamespace(level="spot", window_cells=7)
    bulk_base = SimpleNamespace(level="bulk", window_cells=256)
    assert _transfer_window(spot_base, "bulk", TrainParams()) == 7  # type: ignore[arg-type]
    assert _transfer_window(spot_base, "bulk", TrainParams(chunk_cells=64)) == 64  # type: ignore[arg-type]
    assert _transfer_window(bulk_base, "spot", TrainParams()) == TrainParams().chunk_cells  # type: ignore[arg-type]
    assert _transfer_window(None, "bulk", TrainParams()) == TrainParams().chunk_cells


def test_route_choice_keeps_zero_shot_unless_the_gain_beats_the_noise_margin() -> None:
    rng = np.random.default_rng(0)
    truth = np.exp(rng.normal(size=(8, 30)))
    zero = truth * np.exp(rng.normal(scale=1.0, size=truth.shape))  # r ≈ 0.7 per gene
    # a hair better than zero-shot on average (well within noise): zero-shot must stay
    tiny = zero.copy()
    tiny[:, 0] = truth[:, 0]  # one gene perfect, another much worse: a small, noisy net gain
    tiny[:, 1] = truth[:, 1] * np.exp(rng.normal(scale=3.0, size=8))
    held = {"zero-shot": [zero[:4], zero[4:]], "lora": [tiny[:4], tiny[4:]]}
    folds = [truth[:4], truth[4:]]
    plain = max(held, key=lambda n: _route.cv_pearson(held[n], folds))
    assert plain == "lora"  # the best score alone would leave zero-shot
    chosen, margin = _route.choose_with_margin(held, folds)
    assert chosen == "zero-shot"
    step = margin["steps"][0]
    assert step["candidate"] == "lora"
    assert not step["taken"]
    assert 0 < step["gain"] <= _route.MARGIN_SE * step["se"]
    # a clear gain is taken; scratch must then beat the transfer route by the margin too
    good = truth * np.exp(rng.normal(scale=0.2, size=truth.shape))
    noisy = good.copy()
    noisy[:, 0] = truth[:, 0]
    noisy[:, 1] = truth[:, 1] * np.exp(rng.normal(scale=3.0, size=8))
    held = {"zero-shot": [zero], "lora": [good], "scratch": [noisy]}
    chosen, margin = _route.choose_with_margin(held, [truth], scratch={"scratch"})
    assert chosen == "lora"
    assert [s["taken"] for s in margin["steps"]] == [True, False]


def test_scratch_is_never_a_candidate_on_four_bulk_slides() -> None:
    routes, reason = _route.without_scratch(_route.AUTO_ROUTES, "bulk", 4)
    assert all(r.policy != "scratch" for r in routes)
    assert reason is not None
    assert reason.startswith("left out: 4 target bulk slides")
    kept, none = _route.without_scratch(_route.AUTO_ROUTES, "bulk", _route.MIN_SCRATCH_BAGS["bulk"])
    assert kept == _route.AUTO_ROUTES
    assert none is None


def test_history_title_states_the_margin_steps_from_a_model_or_from_uns() -> None:
    from bitro_sc.pl._history import _margin_note

    step = {"candidate": "lora", "against": "zero-shot", "gain": 0.004, "se": 0.012, "taken": False}
    note = _margin_note({"margin": {"k_se": 1.0, "steps": [step]}})
    assert "lora vs zero-shot: +0.004 ≤ 1 SE (0.012), kept zero-shot" in note
    stored = _margin_note({"margin": {"k_se": 1.0, "steps": {"0": {**step, "taken": True}}}})
    assert "> 1 SE (0.012), taken" in stored
    assert _margin_note({"margin": "none"}) == ""
