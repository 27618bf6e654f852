"""Transfer between levels, all of it: copy a base network, re-map its gene head by name (new genes
start at the target's head bias), apply a freeze policy, and match the start to spot targets.

:class:`TransferStart` is the start strategy :func:`bitro_sc.models.fit` uses with a base model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from ._data import cells_table
from ._deconv import log1p_match
from ._model import BiTroModel, inject_lora, lora_config
from ._params import DataKeys, ModelParams
from ._split import choose_genes
from ._start import Inputs
from ._train import bag_predictions, bag_targets

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._net import BiTroNet

Policy = Literal["lora", "full", "head"]
POLICIES = ("lora", "full", "head")


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold any LoRA adapters of ``net`` into their base layers (in place) and drop the adapters."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return net


def _new_head(
    old: nn.Linear, rows: np.ndarray, bias_new: torch.Tensor | None, shift: float, *, init_std: float = 0.01
) -> nn.Linear:
    """A head for the target genes: rows copied from ``old`` where ``rows >= 0`` (bias + ``shift``),
    freshly initialised elsewhere (weights ~ N(0, ``init_std``), bias ``bias_new``; no bias when
    ``old`` has none)."""
    has_bias = old.bias is not None
    head = nn.Linear(old.in_features, len(rows), bias=has_bias).to(old.weight.device)
    if init_std > 0:
        nn.init.normal_(head.weight, std=init_std)
    else:
        nn.init.zeros_(head.weight)
    with torch.no_grad():
        if head.bias is not None and bias_new is not None:
            head.bias.copy_(bias_new.to(head.bias))
        hit = np.flatnonzero(rows >= 0)
        if hit.size:
            src = torch.as_tensor(rows[hit], device=old.weight.device)
            idx = torch.as_tensor(hit, device=old.weight.device)
            head.weight[idx] = old.weight.detach()[src]
            if head.bias is not None and old.bias is not None:
                head.bias[idx] = old.bias.detach()[src] + shift
    return head


def transfer_net(
    base: BiTroModel,
    genes: list[str],
    *,
    policy: Policy,
    bias_new: torch.Tensor,
    target_bag_cells: float,
    level: str | None = None,
    rank: int | None = None,
) -> tuple[BiTroNet, dict[str, Any] | None, dict[str, Any]]:
    """A copy of ``base.net`` for ``genes`` under ``policy``; the base model is not modified.
    ``rank``: LoRA rank (alpha = 2 × rank; default: the base's ``lora_r`` / ``lora_alpha``).

    Genes are matched by name: matched genes keep their head weights (bias shifted by
    ``log(base bag size / target bag size)`` for plain sum-like pooling with the exp activation,
    because per-cell values are shares of the bag; not with the RNA-content head), new genes get a
    fresh head row; the RNA-content head is kept and trained like the gene head. Returns
    (network, LoRA config or None, report).
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {list(POLICIES)}, got {policy!r}.")
    index = {g: i for i, g in enumerate(base.genes)}
    rows = np.array([index.get(g, -1) for g in genes], dtype=np.int64)
    matched = [g for g, r in zip(genes, rows, strict=True) if r >= 0]
    if not matched:
        raise ValueError(
            f"The base model predicts {len(base.genes)} genes (e.g. {base.genes[:5]}) and none of the "
            f"{len(genes)} target genes (e.g. {genes[:5]}): the base has no overlapping genes. Use a base "
            "trained on the same gene symbols, or pass `genes=` that the base knows."
        )
    net: BiTroNet = merge_lora(copy.deepcopy(base.net))  # type: ignore[assignment]
    if net.bag_linear is not None:  # a bag-level linear term is specific to the base's bags: dropped
        net.bag_linear, net.bag_count, net._bag_base, net.bag_ceiling = None, None, None, None
        net.params = without_bag_term(net.params)
    shift = 0.0
    if (
        base.params.pooling != "mean"
        and not base.params.normalized
        and base.params.activation == "exp"
        and target_bag_cells > 0
    ):
        shift = math.log(base.bag_cells / target_bag_cells)
    net.head = _new_head(net.head, rows, bias_new, shift)
    if net.profiles is not None:  # matched genes keep their phenotype profiles, new genes start at 0
        table = torch.zeros(net.profiles.num_embeddings, len(genes), device=net.profiles.weight.device)
        cols = np.flatnonzero(rows >= 0)
        table[:, torch.as_tensor(cols)] = net.profiles.weight.detach()[:, torch.as_tensor(rows[cols])]
        net.profiles = nn.Embedding.from_pretrained(table, freeze=False)
    if net.skip is not None:  # new genes start without a linear path, as in a fresh network
        net.skip = _new_head(net.skip, rows, None, 0.0, init_std=0.0)
    if net.depth is not None:
        # the depth exponent describes the measurement at the base's level: kept for matched genes
        # at the same level, restarted at the level's default at the other level and for new genes
        known = torch.as_tensor(rows >= 0)
        depth = torch.zeros(len(genes), device=net.depth.device)
        if level == base.level:
            depth[known] = net.depth.detach()[torch.as_tensor(rows[rows >= 0])]
        net.depth = nn.Parameter(depth)
        net.init_depth(level or base.level, target_bag_cells, None if level != base.level else ~known)
    if net.attn_head is not None:
        net.attn_head = _new_head(net.attn_head, rows, torch.zeros(len(genes)), 0.0)
    net.n_genes = len(genes)
    lora = None
    if policy == "lora":
        lora = lora_config(base.params)
        if rank is not None:
            lora = {**lora, "r": int(rank), "lora_alpha": 2.0 * int(rank)}
        inject_lora(net, lora)  # freezes every non-adapter weight
    else:
        for p in net.parameters():
            p.requires_grad_(policy == "full")
    for head in (net.head, net.attn_head, net.rna_head, net.skip, net.profiles):
        if head is not None:
            for p in head.parameters():
                p.requires_grad_(True)
    if net.depth is not None:
        net.depth.requires_grad_(True)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    report = {
        "policy": policy,
        "matched_genes": matched,
        "new_genes": [g for g, r in zip(genes, rows, strict=True) if r < 0],
        "n_trainable": int(trainable),
        "n_frozen": int(frozen),
        "lora_targets": lora["target_modules"] if lora else None,
        "frozen_modules": "all base weights except the gene head "
        "(with its phenotype profiles and RNA-content head)" + (" (LoRA adapters trained)" if lora else "")
        if policy != "full"
        else "none",
        "base_level": base.level,
        "base_genes": len(base.genes),
    }
    return net, lora, report


def without_bag_term(params: ModelParams) -> ModelParams:
    """``params`` without the bag-level linear term (``ModelParams.bag_linear``), which transfer drops."""
    return dataclasses.replace(params, bag_linear=False) if params.bag_linear is True else params


def head_bias(per_cell: torch.Tensor, params: ModelParams) -> torch.Tensor:
    """Head bias giving ``per_cell`` expression per cell under the activation of ``params``."""
    m = per_cell.clamp(min=1e-6)
    return m.log() if params.activation == "exp" else m + torch.log(-torch.expm1(-m))


def match_scale(net: BiTroNet, data: list[Any], n_genes: int, *, device: torch.device) -> np.ndarray:
    """Shift the gene head's bias by one log-scale per gene so that the network's predictions of the
    training bags match their targets in mean ``log1p`` (:func:`~._deconv.log1p_match`); returns
    the shifts.

    The loss compares ``log1p`` values, and a base's per-gene scale belongs to its own level: a base
    from whole slides (deep libraries) knows nothing of how sparse spots are, and a base from spots
    was fitted to the mean of log1p of sparse counts, which sits far below log1p of their mean, by
    a different amount for every gene. Measured (``benchmarks/results/transfer.md``): a spot base
    predicting 4 synthetic bulk slides was off by -0.58 log1p on average with a spread of 0.56
    across genes, against 0.22 of real slide-to-slide variation; trained from there, the first
    steps spend the adapters on that per-gene offset. This closed-form shift (it leaves per-gene
    Pearson across bags unchanged) removes the offset before the first step, at both levels.
    """
    log_c = log1p_match(
        bag_predictions(net, data, device=device), bag_targets(data, n_genes).astype(np.float64)
    )
    with torch.no_grad():
        net.head.bias.add_(torch.as_tensor(log_c, dtype=net.head.bias.dtype, device=device))
    return log_c


@dataclass(frozen=True)
class TransferStart:
    """Start from ``base`` (a model of another level) under a freeze ``policy``: its feature
    scaling, phenotypes and architecture; its genes found in the target tables plus the target's
    HVGs (unless ``genes`` are given); its network copied by :func:`transfer_net` (LoRA ``rank``)
    and, with ``match``, its per-gene scale matched to the training bags (:func:`match_scale`)."""

    base: BiTroModel
    policy: str = "lora"
    rank: int | None = None
    match: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.base, BiTroModel):
            raise TypeError(f"`base` must be a BiTroModel, got {type(self.base).__name__}.")
        if self.policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {list(POLICIES)}, got {self.policy!r}.")

    @property
    def transfer(self) -> str:
        return "bulk" if self.base.level == "bulk" else "spatial"

    @property
    def lora(self) -> bool:
        return self.policy == "lora"

    def inputs(self, slides: list[SpatialData], train_idx: list[int], keys: DataKeys, level: str) -> Inputs:
        base = self.base
        n_feat = cells_table(slides[0], keys).obsm[keys.features_key].shape[1]
        if n_feat != base.n_features:
            raise ValueError(
                f"The base model was trained on {base.n_features} cell features, the target slides have "
                f"{n_feat} (obsm[{keys.features_key!r}]). Compute the features with the base's encoder "
                "and settings."
            )
        return Inputs(base.stats, base.phenotypes, without_bag_term(base.params))

    def genes(
        self, tables: list[AnnData], genes: Sequence[str] | None, hvgs: list[str], n_top: int, level: str
    ) -> list[str]:
        if genes is not None:
            return choose_genes(tables, genes, n_top, level)
        known = [g for g in self.base.genes if all(g in t.var_names for t in tables)]
        return list(dict.fromkeys(known + hvgs))

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
        net, lora, report = transfer_net(
            self.base,
            genes,
            policy=self.policy,  # type: ignore[arg-type]
            bias_new=head_bias(torch.as_tensor(per_cell, dtype=torch.float32), params),
            target_bag_cells=bag_cells,
            level=level,
            rank=self.rank,
        )
        net.to(device)
        if self.match and params.activation == "exp":
            shift = match_scale(net, data, len(genes), device=device)
            report["scale_shift"] = {"mean": float(shift.mean()), "sd": float(shift.std())}
        return net, lora, report

    def record(self, report: dict[str, Any], genes: list[str]) -> dict[str, Any]:
        base = {k: v for k, v in report.items() if k not in ("matched_genes", "new_genes")}
        base["record"] = {k: self.base.record.get(k) for k in ("level", "split", "best_epoch", "seed")}
        return {"matched_genes": report["matched_genes"], "new_genes": report["new_genes"], "base": base}
