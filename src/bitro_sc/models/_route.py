"""Route selection for transfer: which way of adapting a base model (zero-shot, head only, LoRA at
a rank and learning rate, full fine-tuning, or training from scratch) and how many epochs, chosen
by the validation loss of held-out target bags alone.

Every route starts from the same point (the base network, its gene head matched to the target's
scale, :func:`~._transfer.match_scale`), so "zero-shot" is the 0-epoch end of every transfer route.
With several validation folds (leave-one-slide-out on a few bulk slides) the folds' validation
curves are averaged epoch by epoch, and the route and epoch count minimising the mean curve win.
Every trained transfer route is also validated shrunk back toward its start (:data:`SHRINK`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._params import TrainParams
from ._train import bag_predictions, bag_targets, evaluate_loss
from ._train import train as train_loop

#: Policies accepted by :func:`bitro_sc.models.fit` with a base model.
POLICIES_AUTO = ("auto", "lora", "full", "head")
#: Leave-one-slide-out folds are used for bulk targets with fewer than 5 slides (at most this many).
MAX_FOLDS = 4
#: Shrinkage of a trained transfer route toward its start (weight-space interpolation, the start's
#: weights + ``a`` × the change): every trained transfer route is also validated at these ``a``.
SHRINK = (0.5,)
#: Noise margin of the cross-validated route choice, in standard errors: a trained route replaces
#: zero-shot, and training from scratch replaces the best transfer route (or zero-shot), only when its
#: cross-validated Pearson is higher by more than this many standard errors of the paired difference
#: (:func:`paired_gain`).
MARGIN_SE = 1.0
#: Fewest target bags (spots, bulk slides: training and validation together) for which
#: ``policy="auto"`` also considers training from scratch. Below them a network trained on the target
#: alone was far behind the base in every measurement (4 bulk slides: scratch 0.03-0.09 mean
#: Pearson against 0.25 for the spot base as is, ``benchmarks/results/transfer.md``; one slide of 20
#: spots in tutorial 03: 0.09 against 0.22 for LoRA), while validation on so few bags can still pick it.
MIN_SCRATCH_BAGS = {"spot": 100, "bulk": 8}


def without_scratch(
    routes: tuple[Route, ...], level: str, n_bags: int
) -> tuple[tuple[Route, ...], str | None]:
    """``routes`` without training from scratch when the target has fewer than
    :data:`MIN_SCRATCH_BAGS` bags, and the reason for the run record (``None``: unchanged)."""
    least = MIN_SCRATCH_BAGS.get(level, 0)
    if n_bags >= least or len(routes) < 2 or all(r.policy != "scratch" for r in routes):
        return routes, None
    unit = "spots" if level == "spot" else "bulk slides"
    reason = f"left out: {n_bags} target {unit} (< {least}) are too few to train a network from scratch"
    return tuple(r for r in routes if r.policy != "scratch"), reason


@dataclass(frozen=True)
class Route:
    """One way of adapting a base: ``policy`` ``"head"`` / ``"lora"`` / ``"full"`` / ``"scratch"``,
    its learning rate (``None``: the default of :class:`~._params.TrainParams`) and LoRA rank."""

    name: str
    policy: str
    lr: float | None = None
    rank: int | None = None


#: Candidates of ``policy="auto"`` (zero-shot is the 0-epoch end of each transfer route).
AUTO_ROUTES = (
    Route("head", "head", 1e-3),
    Route("lora r8 lr 3e-3", "lora", 3e-3, 8),
    Route("lora r4 lr 1e-3", "lora", 1e-3, 4),
    Route("full lr 1e-3", "full", 1e-3),
    Route("scratch", "scratch"),
)
ZERO_SHOT = Route("zero-shot", "zero-shot")


def routes_for(policy: str) -> tuple[Route, ...]:
    """Candidate routes of ``policy`` (``"auto"``: all of :data:`AUTO_ROUTES`; else that policy)."""
    from .._validate import check_choice

    check_choice(policy, POLICIES_AUTO, "policy")
    return AUTO_ROUTES if policy == "auto" else (Route(policy, policy),)


def route_params(tp: TrainParams, route: Route) -> TrainParams:
    """Training parameters of ``route``: its learning rate unless ``tp`` names one."""
    if route.lr is not None and tp.lr is None:
        return dataclasses.replace(tp, lr=route.lr)
    return tp.resolved(lora=route.policy == "lora")


def loo_folds(data: Sequence[Any]) -> list[tuple[list[Any], list[Any]]]:
    """Leave-one-bag-out folds over the first :data:`MAX_FOLDS` bags of ``data`` (bulk slides)."""
    return [([d for j, d in enumerate(data) if j != i], [data[i]]) for i in range(min(len(data), MAX_FOLDS))]


def _mean_curve(curves: list[list[float]]) -> np.ndarray:
    """Epoch-wise mean of curves of unequal length (a stopped fold keeps its last value)."""
    n = max(len(c) for c in curves)
    return np.array([c + [c[-1]] * (n - len(c)) for c in curves], dtype=np.float64).mean(axis=0)


def select_route(
    routes: Sequence[Route],
    *,
    folds: Callable[[Route], list[tuple[list[Any], list[Any]]]],
    begin: Callable[[Route, list[Any]], Any],
    tp: TrainParams,
    device: torch.device,
    seed: int,
    progress: bool,
    cross_pearson: bool = False,
    shrink: Sequence[float] = (),
) -> dict[str, Any]:
    """Train every route on every fold with early stopping; return the selection record: the chosen
    route (``"zero-shot"`` when no trained route lowers the mean validation loss), its epochs, each
    route's best mean validation loss and epochs, the mean curves (index 0: before training) and the
    chosen route's mean training / validation history.

    ``cross_pearson`` (bulk slides, 3 or more held out in all): the route is chosen by the
    cross-validated per-gene Pearson instead, i.e. the held-out slides of every fold predicted by
    that fold's network (at its early-stopped epoch), as deviations from the same network's
    predictions of the fold's training slides (``log1p``; :func:`_held_out` says why), correlated
    with the targets' deviations across all held-out slides gene by gene, averaged over genes, and
    a route replaces zero-shot (or scratch a transfer route) only beyond a noise margin
    (:func:`choose_with_margin`, recorded as ``"margin"``). On a few bulk slides the validation loss is
    dominated by each gene's offset, which a network trained from scratch fits well while it
    ranks the slides no better than chance; the cross-validated Pearson measures what a bulk
    model is for: ranking slides gene by gene.

    ``shrink``: every trained transfer route is also scored with its weights moved back toward its
    start, ``start + a × (trained - start)`` for each ``a`` (candidates named ``"<route> · shrink
    a"``, at the route's epochs); the record's ``"route"`` names the trained route and
    ``"shrink"`` its ``a`` (1: none).
    """
    scores: dict[str, float] = {}
    epochs: dict[str, int] = {}
    curves: dict[str, list[float]] = {}
    train_curves: dict[str, list[float]] = {}
    zero: list[float] = []
    n_folds = 0
    held: dict[str, list[np.ndarray]] = {}  # held-out predictions per route, one per fold
    truth: list[np.ndarray] = []
    for route in routes:
        val_c: list[list[float]] = []
        train_c: list[list[float]] = []
        first_transfer = route.policy != "scratch" and not zero
        shrunk: dict[float, list[float]] = {a: [] for a in shrink if route.policy != "scratch"}
        for k, (train, val) in enumerate(folds(route)):
            net = begin(route, train)
            start = _state(net) if shrunk else None
            v0 = evaluate_loss(net, val, loss=tp.loss, device=device, chunk_cells=tp.chunk_cells)
            if first_transfer:  # every transfer route starts from the same network: zero-shot
                zero.append(v0)
                if cross_pearson:
                    held.setdefault(ZERO_SHOT.name, []).append(_held_out(net, train, val, device))
            if cross_pearson and len(truth) <= k:
                truth.append(_deviation(bag_targets(val, net.n_genes), bag_targets(train, net.n_genes)))
            hist, _ = train_loop(
                net,
                train,
                val,
                params=route_params(tp, route),
                device=device,
                seed=seed + k,
                progress=progress,
            )
            val_c.append([v0] + [h["val_loss"] for h in hist])
            if cross_pearson:
                held.setdefault(route.name, []).append(_held_out(net, train, val, device))
            if start is not None:
                end = _state(net)
                for a in shrunk:
                    net.load_state_dict(_mix(start, end, a))
                    shrunk[a].append(
                        evaluate_loss(net, val, loss=tp.loss, device=device, chunk_cells=tp.chunk_cells)
                    )
                    if cross_pearson:
                        held.setdefault(shrink_name(route.name, a), []).append(
                            _held_out(net, train, val, device)
                        )
                net.load_state_dict(end)
            train_c.append([math.nan] + [h["train_loss"] for h in hist])
            n_folds = max(n_folds, k + 1)
        mean = _mean_curve(val_c)
        best = 1 + int(np.argmin(mean[1:]))  # at least one epoch: 0 epochs is zero-shot
        scores[route.name], epochs[route.name] = float(mean[best]), best
        curves[route.name] = mean.tolist()
        train_curves[route.name] = _mean_curve(train_c).tolist()
        for a, vals in shrunk.items():
            scores[shrink_name(route.name, a)], epochs[shrink_name(route.name, a)] = (
                float(np.mean(vals)),
                best,
            )
    candidates = dict(scores)
    if zero:
        candidates[ZERO_SHOT.name] = float(np.mean(zero))
        epochs[ZERO_SHOT.name] = 0
    chosen = min(candidates, key=lambda name: candidates[name])
    pearson = {name: cv_pearson(preds, truth, log=False) for name, preds in held.items()}
    margin = None
    if pearson:
        scratch = {r.name for r in routes if r.policy == "scratch"}
        chosen, margin = choose_with_margin(held, truth, scratch=scratch, log=False)
    chosen_route, a = _unshrink(chosen)
    if chosen == ZERO_SHOT.name:
        history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": []}
    else:
        history = {
            "epoch": list(range(len(curves[chosen_route]) - 1)),
            "train_loss": train_curves[chosen_route][1:],
            "val_loss": curves[chosen_route][1:],
        }
    return {
        "chosen": chosen,
        "route": chosen_route,
        "shrink": a,
        "epochs": int(epochs[chosen]),
        "scores": candidates,
        "cv_pearson": pearson or None,
        "margin": margin,
        "epochs_by_route": epochs,
        "curves": curves,
        "n_folds": n_folds,
        "history": history,
    }


def shrink_name(name: str, a: float) -> str:
    """Candidate name of route ``name`` shrunk toward its start by ``a``."""
    return f"{name} · shrink {a:g}"


def _unshrink(name: str) -> tuple[str, float]:
    """(trained route name, shrink factor) of a candidate name (factor 1: not shrunk)."""
    if " · shrink " in name:
        route, a = name.rsplit(" · shrink ", 1)
        return route, float(a)
    return name, 1.0


def _state(net: Any) -> dict[str, torch.Tensor]:
    """A detached copy of ``net``'s state."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _mix(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], a: float) -> dict[str, torch.Tensor]:
    """``start + a × (end - start)`` for floating-point entries (others: ``end``)."""
    return {k: start[k] + a * (v - start[k]) if v.is_floating_point() else v for k, v in end.items()}


def shrink_toward(net: Any, start: dict[str, torch.Tensor], a: float) -> None:
    """Move ``net``'s weights back toward ``start`` (in place): ``start + a × (net - start)``."""
    if a != 1.0:
        net.load_state_dict(_mix(start, _state(net), a))


def _deviation(val: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``log1p`` of the held-out bags ``val`` minus the mean ``log1p`` of the fold's training bags
    ``train`` (bags × genes), gene by gene."""
    v = np.log1p(np.asarray(val, dtype=np.float64))
    return v - np.log1p(np.asarray(train, dtype=np.float64)).mean(axis=0)


def _held_out(net: Any, train: list[Any], val: list[Any], device: torch.device) -> np.ndarray:
    """The fold network's predictions of its validation bags ``val`` as deviations from its own
    predictions of the fold's training bags (``log1p``, bags × genes, :func:`_deviation`).

    Pooling raw held-out predictions of several folds is biased: each fold's network carries a
    per-gene offset fitted to its training bags (the scale match, the trained bias), and with one
    held-out slide per fold that offset is *anti*-correlated with the held-out value (a slide high
    in a gene leaves training slides lower in it). Measured: the zero-shot spot base scored -0.49
    cross-validated Pearson on 4 bulk slides of draw 7 while it scores +0.19 on 24 new slides.
    Deviations from the same network's training-bag predictions cancel the fold's offset; the
    targets are taken the same way, which only rescales each held-out value's true deviation."""
    return _deviation(bag_predictions(net, val, device=device), bag_predictions(net, train, device=device))


def gene_pearsons(p: np.ndarray, t: np.ndarray, *, log: bool = True) -> np.ndarray:
    """Per-gene Pearson correlation of ``log1p`` predictions ``p`` and targets ``t`` (bags × genes;
    ``log=False``: taken as they are) across bags; NaN for a gene constant on either side."""
    p = np.asarray(p, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if log:
        p, t = np.log1p(p), np.log1p(t)
    p, t = p - p.mean(axis=0), t - t.mean(axis=0)
    den = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    ok = den > 1e-12
    out = np.full(p.shape[1], math.nan)
    out[ok] = (p * t).sum(axis=0)[ok] / den[ok]
    return out


def cv_pearson(preds: list[np.ndarray], truth: list[np.ndarray], *, log: bool = True) -> float:
    """Mean over genes of the Pearson correlation across all held-out bags of all folds (arrays of
    bags × genes, one per fold) of ``log1p`` predictions and targets (genes constant on either side
    are skipped; NaN when none is left)."""
    r = gene_pearsons(np.concatenate(preds), np.concatenate(truth), log=log)
    return float(np.nanmean(r)) if np.isfinite(r).any() else math.nan


def paired_gain(a: np.ndarray, b: np.ndarray, truth: np.ndarray, *, log: bool = True) -> tuple[float, float]:
    """(gain, standard error) of predictions ``a`` over ``b`` in cross-validated Pearson (all
    held-out bags × genes, stacked): the gain is the mean over genes of the per-gene difference; its
    standard error is the larger of the genes' (sd of the differences / √genes) and, with 4 or more
    held-out bags, the jackknife over bags (each bag left out in turn), the unit the folds sample."""
    d = gene_pearsons(a, truth, log=log) - gene_pearsons(b, truth, log=log)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan, math.nan
    gain = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    n = len(truth)
    if n >= 4:
        keep = [np.arange(n) != i for i in range(n)]
        jack = []
        for m in keep:
            dj = gene_pearsons(a[m], truth[m], log=log) - gene_pearsons(b[m], truth[m], log=log)
            dj = dj[np.isfinite(dj)]
            if dj.size:
                jack.append(float(dj.mean()))
        if len(jack) >= 2:
            jk = np.asarray(jack)
            se = max(se, float(math.sqrt((len(jk) - 1) / len(jk) * ((jk - jk.mean()) ** 2).sum())))
    return gain, se


def choose_with_margin(
    held: dict[str, list[np.ndarray]],
    truth: list[np.ndarray],
    *,
    scratch: Collection[str] = (),
    log: bool = True,
) -> tuple[str, dict[str, Any]]:
    """The candidate chosen by cross-validated Pearson with a noise margin (:data:`MARGIN_SE`), and
    the record of the choice. ``held``: each candidate's held-out predictions, one array per fold
    (``"zero-shot"`` among them); ``scratch``: names of candidates trained from scratch.

    Zero-shot is kept unless the best transfer candidate beats it by more than ``MARGIN_SE``
    standard errors (:func:`paired_gain`); training from scratch then replaces the choice only
    when it beats that by the same margin. Without a zero-shot candidate the best transfer
    candidate is the default."""
    t = np.concatenate(truth).astype(np.float64)
    stacked = {name: np.concatenate(preds) for name, preds in held.items()}
    mean = {name: float(np.nanmean(gene_pearsons(p, t, log=log))) for name, p in stacked.items()}
    transfer = [n for n in stacked if n not in scratch and n != ZERO_SHOT.name]
    steps: list[dict[str, Any]] = []

    def challenge(current: str | None, pool: list[str]) -> str | None:
        if not pool:
            return current
        best = max(pool, key=lambda n: mean[n] if math.isfinite(mean[n]) else -math.inf)
        if current is None:
            return best
        gain, se = paired_gain(stacked[best], stacked[current], t, log=log)
        wins = bool(math.isfinite(gain) and gain > MARGIN_SE * se)
        steps.append({"candidate": best, "against": current, "gain": gain, "se": se, "taken": wins})
        return best if wins else current

    start = ZERO_SHOT.name if ZERO_SHOT.name in stacked else None
    chosen = challenge(start, transfer)
    chosen = challenge(chosen, [n for n in stacked if n in scratch])
    if chosen is None:  # no candidate at all cannot happen with held-out predictions
        raise ValueError("No candidate route has held-out predictions; pass at least one route.")
    record = {"k_se": MARGIN_SE, "steps": steps, "rule": "cross-validated Pearson, gain > k_se x SE"}
    return chosen, record


def route_by_name(routes: Sequence[Route], name: str) -> Route:
    """The route called ``name`` (``"zero-shot"`` included)."""
    return next((r for r in routes if r.name == name), ZERO_SHOT)
