"""Who trains and who validates: split groups of slides, the validation split, the genes to predict."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from .. import _sdata
from ..pp._expression import default_genes, highly_variable_genes

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def slide_groups(slides: list[SpatialData], table_key: str | None) -> tuple[list[str], list[str], str]:
    """(sample id per slide, split group per slide, grouping column): patients when every slide has
    one, else samples. Ids come from the slide's attrs, else from a single value in ``obs`` of
    ``tables[table_key]`` (pass ``None`` to skip that)."""
    samples = _sdata.sample_ids(slides, table_key=table_key)
    patients = [_sdata.patient_id(s, table_key=table_key) for s in slides]
    if all(p is not None for p in patients):
        return samples, [str(p) for p in patients], K.PATIENT_ID
    return samples, samples, K.SAMPLE_ID


def split_slides(
    groups: list[str], samples: list[str], validation: Any, level: str, seed: int
) -> tuple[list[int], list[int], float]:
    """(training slides, validation slides, fraction of spots held out within each training slide).

    ``validation``: ``"auto"`` (20 % of the groups with at least 5 of them; else at spot level a
    block of 20 % of every slide's spots, at bulk level nothing), a fraction of the groups (a single
    group at spot level: of its spots), a list of sample / patient ids, or ``None`` / 0 (nothing).
    """
    uniq = list(dict.fromkeys(groups))
    everything = list(range(len(groups)))
    if validation is None or validation is False or (isinstance(validation, int | float) and validation == 0):
        return everything, [], 0.0
    if isinstance(validation, str) and validation != "auto":
        validation = [validation]
    if isinstance(validation, str):  # "auto"
        if len(uniq) >= 5:
            frac = 0.2
        elif level == "spot":  # too few groups to spare one: hold out a block of spots per slide
            return everything, [], 0.2
        else:
            return everything, [], 0.0
    elif isinstance(validation, int | float):
        frac = float(validation)
        if not 0 < frac < 1:
            raise ValueError(f"`validation` as a fraction must be in (0, 1), got {validation!r}.")
        if len(uniq) < 2:
            if level == "spot":
                return everything, [], frac
            raise ValueError(
                "Cannot hold out a fraction of a single bulk group; pass more slides or `validation=None`."
            )
    else:
        ids = [str(v) for v in validation]
        unknown = [h for h in ids if h not in groups and h not in samples]
        if unknown:
            raise ValueError(f"Validation ids {unknown} match no slide's patient or sample id ({uniq}).")
        val = [i for i in everything if groups[i] in ids or samples[i] in ids]
        train = [i for i in everything if i not in val]
        if not train:
            raise ValueError("Every slide is in the validation split; keep at least one for training.")
        return train, val, 0.0
    rng = np.random.default_rng(seed)
    k = min(max(1, round(frac * len(uniq))), len(uniq) - 1)
    held = {uniq[i] for i in rng.permutation(len(uniq))[:k]}
    return [i for i in everything if groups[i] not in held], [i for i in everything if groups[i] in held], 0.0


def training_hvgs(tables: list[AnnData], n_top: int = 50) -> list[str]:
    """Top HVGs of the training tables recorded for evaluation (empty, with a warning, when none
    can be computed)."""
    try:
        return list(highly_variable_genes(tables, n_top=n_top))
    except ValueError as err:
        warnings.warn(f"No training HVGs could be recorded ({err}).", stacklevel=4)
        return []


def choose_genes(tables: list[AnnData], genes: Sequence[str] | None, n_top: int, what: str) -> list[str]:
    """``genes`` (deduplicated; each must be in every table), or the tables' top ``n_top`` HVGs
    plus the marker panel (:func:`bitro_sc.pp.default_genes`)."""
    if genes is None:
        return default_genes(tables, n_top=n_top)
    chosen = [str(g) for g in dict.fromkeys(genes)]
    if not chosen:
        raise ValueError("`genes` is empty; pass gene names or None for the top HVGs.")
    missing = sorted({g for t in tables for g in chosen if g not in t.var_names})
    if missing:
        raise ValueError(
            f"{len(missing)} requested gene(s) are not in every training {what} table: {missing[:20]}"
            f"{' …' if len(missing) > 20 else ''}. Pass genes from `var_names` of all training tables."
        )
    return chosen
