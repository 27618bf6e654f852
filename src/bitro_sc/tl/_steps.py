"""The preparation steps that ``fit_bitro`` and ``predict_bitro`` run themselves when they are missing.

A slide that is only segmented lacks cell features, phenotypes, the cell → spot assignment and the
cell graph. :func:`plan_steps` finds what each slide lacks, and either returns the calls that make it
(exactly the public calls a user would make, with the model's recorded settings at predict time) or
raises one error that lists every missing step with the call that fixes it. :meth:`StepPlan.run` runs
them, one log line each (logger ``"bitro_sc"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import _keys as K
from ..models._params import DataKeys
from ..models._preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

logger = logging.getLogger("bitro_sc")


class MissingStepsError(ValueError, KeyError):
    """Preparation steps are missing and cannot be run automatically (a ``KeyError`` too, as the
    missing element errors of each step are)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass
class StepPlan:
    """Steps to run (``(log line, call)``) in order, and the missing steps that cannot be run here."""

    who: str
    steps: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    unfixable: list[str] = field(default_factory=list)

    def __add__(self, other: StepPlan) -> StepPlan:
        return StepPlan(self.who, [*self.steps, *other.steps], [*self.unfixable, *other.unfixable])

    def check(self) -> None:
        """One error listing every missing step that cannot be run automatically, with its call."""
        if not self.unfixable:
            return
        lines = "\n".join(f"  - {u}" for u in self.unfixable)
        done = [line.split("running ", 1)[-1].rstrip(".") for line, _ in self.steps]
        also = f"\n(These would run by themselves: {'; '.join(done)}.)" if done else ""
        raise MissingStepsError(
            f"{self.who} cannot prepare the slide(s): these steps are missing and cannot be run "
            f"automatically. Run them first (in this order):\n{lines}{also}"
        )

    def run(self) -> None:
        """Check, then run the steps, one log line each."""
        self.check()
        for line, call in self.steps:
            logger.info(line)
            call()


def _names(slides: Sequence[Any], idx: list[int], single: bool) -> str:
    return "sdata" if single else ("slides" if len(idx) == len(slides) else f"slides[{idx}]".replace(" ", ""))


def _verb(idx: list[int], single: bool) -> str:
    return "has" if single or len(idx) == 1 else "have"


def _encoder(prep: Preprocessing) -> Any:
    """The encoder recorded in ``prep`` when it can be rebuilt without outside files, else ``None``."""
    name = prep.features.get("encoder")
    if name not in ("morphology", "niche") or "scaler" not in prep.features:
        return None
    from ..encoders import MorphologyEncoder, NicheEncoder

    stains = prep.features.get("stains")
    if name == "niche":
        return NicheEncoder(base=MorphologyEncoder(stains=stains)) if stains else "niche"
    return MorphologyEncoder(stains=stains) if stains else "morphology"


def plan_steps(
    slides: Sequence[SpatialData],
    *,
    keys: DataKeys,
    prep: Preprocessing | None,
    need_spots: bool,
    need_phenotypes: bool,
    need_graph: bool,
    who: str,
    single: bool = False,
    progress: bool = False,
    from_scratch: bool = False,
) -> StepPlan:
    """The missing steps of ``slides`` as a plan (:meth:`StepPlan.check` raises one error listing those
    that cannot be run here, :meth:`StepPlan.run` runs the others).

    ``prep``: the model's preprocessing (predict, or a transfer from a given base): features are
    computed with its encoder, ``fov_um`` and scaler, phenotypes with its k-means, assignment and
    graph with its parameters. ``from_scratch`` (fit without a base): slides that all lack a step
    get it with the defaults, together (one scaler, one k-means); when some slides have it, the
    others get it with theirs. Without either, features and phenotypes cannot be made here.
    """
    from . import assign_cells, cell_features, cell_graph, phenotypes

    plan = StepPlan(who)
    unfixable = plan.unfixable
    fk, pk, ck = keys.features_key, keys.phenotype_key, keys.cells_key
    has_cells = [ck in s.tables for s in slides]
    for i, ok in enumerate(has_cells):
        if not ok:
            where = "sdata" if single else f"slides[{i}]"
            unfixable.append(f"cells (segmentation): bs.tl.segment({where})")
    cells = [s.tables[ck] if ok else None for s, ok in zip(slides, has_cells, strict=True)]

    # features -----------------------------------------------------------------------------------
    lacking = [i for i, c in enumerate(cells) if c is None or fk not in c.obsm]
    have = [i for i in range(len(slides)) if i not in lacking]
    key_kw = {} if fk == K.FEATURES else {"key_added": fk}
    source = prep if prep is not None else None
    if lacking and source is None and have:
        source = Preprocessing.from_slides([slides[i] for i in have], keys, phenotypes=False)
    if lacking:
        where = _names(slides, lacking, single)
        todo = [slides[i] for i in lacking]
        kw: dict[str, Any] | None = None  # None: cannot be run here
        if source is None:
            call = f"bs.tl.cell_features({where}{'' if fk == K.FEATURES else f', key_added={fk!r}'})"
            if from_scratch:  # no slide featurised: the defaults, all slides together
                kw = {}
            else:
                call = call[:-1] + ", encoder=<the training encoder>, scaler=<the training slides>)"
        else:
            enc = _encoder(source)
            call = source.encoder_call(sdata=where, features_key=fk) or f"bs.tl.cell_features({where}, ...)"
            call = call.replace(", overwrite=True", "")
            if enc is not None:
                fov = float(source.features["fov_um"])
                kw = {"encoder": enc, "fov_um": fov, "scaler": source.feature_scaler}
        if kw is None:
            unfixable.append(f"cell features (obsm[{fk!r}]): {call}")
        elif any(has_cells[i] and not slides[i].images for i in lacking):
            unfixable.append(f"cell features (obsm[{fk!r}]; need the H&E image, which is missing): {call}")
        else:
            plan.steps.append(
                (
                    f"{who}: {where} {_verb(lacking, single)} no cell features (obsm[{fk!r}]); "
                    f"running {call}.",
                    partial(cell_features, todo, **kw, **key_kw, cells_key=ck, progress=progress),
                )
            )

    # phenotypes ---------------------------------------------------------------------------------
    if need_phenotypes:
        lacking = [i for i, c in enumerate(cells) if c is None or pk not in c.obs]
        have = [i for i in range(len(slides)) if i not in lacking]
        kmeans: Any = None
        if prep is not None:
            kmeans = prep.phenotype_model
        elif have:
            kmeans = Preprocessing.from_slides([slides[i] for i in have], keys).phenotype_model
        if lacking:
            where = _names(slides, lacking, single)
            todo = [slides[i] for i in lacking]
            extra = ("" if fk == K.FEATURES else f", features_key={fk!r}") + (
                "" if pk == K.PHENOTYPE else f", key_added={pk!r}"
            )
            pkw = {"features_key": fk, "key_added": pk, "cells_key": ck}
            if kmeans is None and prep is not None:
                unfixable.append(
                    f"cell phenotypes (obs[{pk!r}]): a column with the model's phenotype categories "
                    "(the model has no k-means to assign them: they were not made by `bs.tl.phenotypes`)"
                )
            elif kmeans is None and (have or not from_scratch):
                unfixable.append(
                    f"cell phenotypes (obs[{pk!r}]): "
                    f"bs.tl.phenotypes({where}, model=<the training k-means>{extra})"
                )
            else:
                call = f"bs.tl.phenotypes({where}{', model=model.phenotype_model' if kmeans else ''}{extra})"
                plan.steps.append(
                    (
                        f"{who}: {where} {_verb(lacking, single)} no cell phenotypes (obs[{pk!r}]); "
                        f"running {call}.",
                        partial(phenotypes, todo, model=kmeans, **pkw),
                    )
                )

    # assignment and graph: one slide at a time ----------------------------------------------------
    spots_key = (prep.assign or {}).get("spots_key", K.SPOTS) if prep is not None else K.SPOTS
    graph = (prep.graph or {}) if prep is not None else {}
    for i, (s, c) in enumerate(zip(slides, cells, strict=True)):
        where = "sdata" if single else f"slides[{i}]"
        if need_spots and (c is None or keys.spot_key not in c.obs):
            skw = {"spots_key": spots_key, "key_added": keys.spot_key}
            args = "".join(
                f", {k}={v!r}"
                for k, v in skw.items()
                if v != {"spots_key": K.SPOTS, "key_added": K.SPOT_ID}[k]
            )
            call = f"bs.tl.assign_cells({where}{args})"
            if spots_key not in s.shapes:
                unfixable.append(
                    f"cell → spot assignment (obs[{keys.spot_key!r}]; needs shapes {spots_key!r}): {call}"
                )
            else:
                plan.steps.append(
                    (
                        f"{who}: {where} has no cell → spot assignment (obs[{keys.spot_key!r}]); "
                        f"running {call}.",
                        partial(assign_cells, s, cells_key=ck, **skw),
                    )
                )
        if need_graph and (c is None or keys.connectivities not in c.obsp):
            gkw: dict[str, Any] = {"key_added": keys.graph_key}
            if graph.get("radius") is not None:
                gkw["radius_um"] = float(graph["radius"])
            elif graph.get("n_neighbors"):
                gkw["k"] = int(graph["n_neighbors"])
            args = "".join(
                f", {k}={v!r}" for k, v in gkw.items() if not (k == "key_added" and v == K.SPATIAL)
            )
            call = f"bs.tl.cell_graph({where}{args})"
            plan.steps.append(
                (
                    f"{who}: {where} has no cell graph (obsp[{keys.connectivities!r}]); running {call}.",
                    partial(cell_graph, s, cells_key=ck, **gkw),
                )
            )
    return plan
