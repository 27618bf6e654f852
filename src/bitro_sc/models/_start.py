"""Where training starts: a fresh network (:class:`ScratchStart`) or a base model of another level
(:class:`~bitro_sc.models._transfer.TransferStart`). :func:`bitro_sc.models.fit` runs the same
algorithm for both and asks the start for what differs: the inputs' scaling, the genes, the network
before its first step and what the run record says about it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ._data import FeatureStats, cells_table, phenotype_categories
from ._deconv import bag_design, deconvolve
from ._model import build_net
from ._net import BAG_MARGIN_LOG1P, design_scale
from ._params import DataKeys, ModelParams
from ._split import choose_genes
from ._train import bag_targets

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._net import BiTroNet


@dataclass(frozen=True)
class Inputs:
    """How cells enter the network: feature scaling, phenotype categories, architecture."""

    stats: FeatureStats
    phenotypes: list[str]
    params: ModelParams


def bag_options(inputs: Inputs, validate: bool) -> list[Inputs]:
    """The inputs to train with: as given, or for ``ModelParams.bag_linear="auto"`` with and
    without the bag-level linear term (the fit keeps the one with the lower validation loss),
    without it when there are no validation bags to choose with."""
    if inputs.params.bag_linear != "auto":
        return [inputs]
    on, off = (
        dataclasses.replace(inputs, params=dataclasses.replace(inputs.params, bag_linear=flag))
        for flag in (True, False)
    )
    return [on, off] if validate else [off]


class Start(Protocol):
    """What differs between training from scratch and adapting a base model."""

    @property
    def transfer(self) -> str:
        """Name of the transfer in the run record (``"none"``, ``"bulk"``, ``"spatial"``)."""

    @property
    def policy(self) -> str:
        """Freeze policy in the run record (``"none"`` from scratch)."""

    @property
    def lora(self) -> bool:
        """Whether LoRA adapters are trained (they get a higher default learning rate)."""

    def inputs(
        self, slides: list[SpatialData], train_idx: list[int], keys: DataKeys, level: str
    ) -> Inputs: ...

    def genes(
        self, tables: list[AnnData], genes: Sequence[str] | None, hvgs: list[str], n_top: int, level: str
    ) -> list[str]: ...

    def net(
        self,
        data: list[Any],
        *,
        inputs: Inputs,
        genes: list[str],
        per_cell: np.ndarray,
        bag_cells: float,
        level: str,
        device: torch.device,
    ) -> tuple[BiTroNet, dict[str, Any] | None, dict[str, Any]]: ...

    def record(self, report: dict[str, Any], genes: list[str]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ScratchStart:
    """A fresh network: head bias at the loss-optimal constant, depth exponent at its level's
    default and, with phenotype profiles, a deconvolution of the training bags."""

    model: ModelParams
    transfer: str = "none"
    policy: str = "none"
    lora: bool = False

    def inputs(self, slides: list[SpatialData], train_idx: list[int], keys: DataKeys, level: str) -> Inputs:
        mats = [np.asarray(cells_table(slides[i], keys).obsm[keys.features_key]) for i in train_idx]
        if len({m.shape[1] for m in mats}) > 1:
            raise ValueError(
                f"The training slides have different feature widths {[m.shape[1] for m in mats]}."
            )
        phenotypes = list(
            dict.fromkeys(
                c for s in slides for c in phenotype_categories(cells_table(s, keys), keys.phenotype_key)
            )
        )
        return Inputs(FeatureStats.fit(mats), phenotypes, self.model.resolved(level))

    def genes(
        self, tables: list[AnnData], genes: Sequence[str] | None, hvgs: list[str], n_top: int, level: str
    ) -> list[str]:
        return choose_genes(tables, genes, n_top, level)

    def net(
        self,
        data: list[Any],
        *,
        inputs: Inputs,
        genes: list[str],
        per_cell: np.ndarray,
        bag_cells: float,
        level: str,
        device: torch.device,
    ) -> tuple[BiTroNet, dict[str, Any] | None, dict[str, Any]]:
        params = inputs.params
        net = build_net(
            n_features=inputs.stats.mean.shape[0],
            n_phenotypes=len(inputs.phenotypes),
            n_genes=len(genes),
            params=params,
        )
        net.set_gene_bias(torch.as_tensor(per_cell, dtype=torch.float32))
        net.init_depth(level, bag_cells)
        report: dict[str, Any] = {}
        skip = net.skip is not None and net.profiles is None
        depth = net.depth is not None and level == "spot"
        if net.bag_linear is not None:
            report = _bag_start(net, data, params, len(genes), bag_cells)
        elif params.linear_start == "ridge" and (skip or depth):
            from ._linear import ridge_start

            fit = ridge_start(data, len(genes), bag_cells=bag_cells)
            with torch.no_grad():
                if skip:
                    assert net.skip is not None
                    net.skip.weight[:, : fit.weight.shape[1]] = torch.as_tensor(fit.weight)
                    net.head.bias.add_(torch.as_tensor(fit.skip_shift))
                if depth:
                    assert net.depth is not None
                    net.depth.copy_(torch.as_tensor(fit.depth))
                    net.head.bias.add_(torch.as_tensor(fit.depth_shift))
            report = {"linear_start": {**fit.info, "skip": skip, "depth": depth}}
        if net.profiles is not None:
            design = bag_design(data, len(inputs.phenotypes) + 1)
            design = design * design_scale(design.sum(axis=1, keepdims=True), params, level, bag_cells)
            targets = bag_targets(data, len(genes)).astype(np.float64)
            net.set_profiles(torch.as_tensor(deconvolve(design, targets, per_cell), dtype=torch.float32))
        net.to(device)
        return net, None, report

    def record(self, report: dict[str, Any], genes: list[str]) -> dict[str, Any]:
        extra = {"linear_start": report["linear_start"]} if "linear_start" in report else {}
        return {"matched_genes": [], "new_genes": list(genes), **extra}


def _bag_start(
    net: BiTroNet, data: list[Any], params: ModelParams, n_genes: int, bag_cells: float
) -> dict[str, Any]:
    """Start of a network with a bag-level linear term: the term at the ridge fit of the training bags
    (``linear_start="ridge"``; else at their mean log1p target), every cell's profile at 1 (zero gene
    head), depth exponents at 0 and a zero skip: the bags' starting predictions are the ridge's."""
    assert net.bag_linear is not None
    assert net.bag_count is not None
    assert net.bag_ceiling is not None
    y = np.log1p(bag_targets(data, n_genes).astype(np.float64))
    with torch.no_grad():
        net.bag_ceiling.copy_(torch.as_tensor(y.max(axis=0) + BAG_MARGIN_LOG1P, dtype=torch.float32))
        net.head.weight.zero_()
        net.head.bias.zero_()
        if net.depth is not None:
            net.depth.zero_()
        if params.linear_start == "ridge":
            from ._linear import ridge_start

            fit = ridge_start(data, n_genes, bag_cells=bag_cells)
            net.bag_linear.weight.copy_(torch.as_tensor(fit.bag_weight))
            net.bag_linear.bias.copy_(torch.as_tensor(fit.bag_bias))
            net.bag_count.copy_(torch.as_tensor(fit.bag_count))
            return {"linear_start": {**fit.info, "bag_linear": True}}
        net.bag_linear.bias.copy_(torch.as_tensor(y.mean(axis=0), dtype=torch.float32))
    return {}
