"""The BiTro network: cell encoder (features + phenotype + µm position) → GAT → Transformer → gene head.

Everything here works on one :class:`torch_geometric.data.Batch` of *attention windows* (bags of
cells: the cells of a spot, or a chunk of a slide). Names of the linear layers are stable, because
LoRA adapters target them by name (``in_proj``, ``blocks.*.q|k|v|out|ff1|ff2``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._params import ModelParams

if TYPE_CHECKING:  # pragma: no cover
    from torch_geometric.data import Batch

#: logits of the "exp" activation are clipped here (exp(30) ≈ 1e13 counts per 10k: never reached)
_MAX_LOGIT = 30.0
#: starting depth exponent per level: spots start as plain sum pooling (the log1p of sparse spot
#: counts grows with the spot's cells; measured in benchmarks/results/accuracy.md), whole slides as
#: an RNA-weighted mean (deep libraries: no such effect)
DEPTH_INIT = {"spot": 1.0, "bulk": 0.0}
#: floor of a bag's log1p level in the bag-level linear term (its ``expm1`` stays positive)
BAG_MIN_LOG1P = 1e-4
#: a bag's linear log1p level stays below the highest of the training bags plus this margin (no
#: runaway extrapolation of the linear term on unusual windows, e.g. cells outside the spots)
BAG_MARGIN_LOG1P = 1.0


def bag_scale(logit: torch.Tensor, ceiling: torch.Tensor | None = None) -> torch.Tensor:
    """Counts per 10k of a bag-level log1p level: ``expm1`` of it, floored at :data:`BAG_MIN_LOG1P`
    and capped at ``ceiling`` (per gene)."""
    logit = logit.clamp(min=BAG_MIN_LOG1P, max=_MAX_LOGIT)
    if ceiling is not None:
        logit = torch.minimum(logit, ceiling)
    return torch.expm1(logit)


class PositionEncoding(nn.Module):
    """sin/cos features of a position in µm at fixed wavelengths (µm)."""

    def __init__(self, wavelengths_um: tuple[float, ...]) -> None:
        super().__init__()
        freqs = torch.tensor([2 * math.pi / w for w in wavelengths_um], dtype=torch.float32)
        self.freqs: torch.Tensor
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = 4 * len(wavelengths_um)

    def forward(self, pos_um: torch.Tensor) -> torch.Tensor:
        angles = (pos_um[:, :, None] * self.freqs).flatten(1)  # (n, 2 * n_freq)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer encoder layer with explicit q/k/v/out projections and a padding mask.

    Written out (not ``nn.TransformerEncoderLayer``) so that LoRA adapters on ``q``/``v``/``out`` are
    honoured in eval mode too (the fused fast path of PyTorch's layer bypasses them).
    """

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ff_mult * dim)
        self.ff2 = nn.Linear(ff_mult * dim, dim)
        self.dropout = nn.Dropout(dropout)  # on the residual branches (none on attention weights: cheaper)

    def forward(self, h: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, int, int]) -> torch.Tensor:
        """``h``: packed cells (n, dim). ``layout`` = (slot of each cell in the padded (bags × L) grid,
        ``keep`` (bags, L) bool mask, bags, L). Linear layers run on the packed cells only; the
        attention runs on the padded grid with the key padding mask."""
        slot, keep, b, n = layout
        d = h.shape[1]
        x = self.norm1(h)

        def dense(t: torch.Tensor) -> torch.Tensor:
            grid = t.new_zeros(b * n, d).index_copy(0, slot, t)
            return grid.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(
            dense(self.q(x)), dense(self.k(x)), dense(self.v(x)), attn_mask=keep[:, None, None, :]
        )
        h = h + self.dropout(self.out(attn.transpose(1, 2).reshape(b * n, d)[slot]))
        return h + self.dropout(self.ff2(F.gelu(self.ff1(self.norm2(h)))))


class BiTroNet(nn.Module):
    """Cells of a batch of bags → non-negative expression per cell and gene (+ attention logits).

    Parameters
    ----------
    n_features
        Width of ``obsm["X_bitro"]``.
    n_phenotypes
        Number of phenotype categories (index 0 of the embedding is "unknown").
    n_genes
        Genes predicted.
    params
        Architecture (:class:`ModelParams`).
    """

    def __init__(self, *, n_features: int, n_phenotypes: int, n_genes: int, params: ModelParams) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv, GATv2Conv

        p = params
        self.params = p
        self.n_features, self.n_phenotypes, self.n_genes = n_features, n_phenotypes, n_genes
        self.phenotype = nn.Embedding(n_phenotypes + 1, p.phenotype_dim) if p.phenotype_dim > 0 else None
        self.position = PositionEncoding(p.pos_wavelengths_um) if p.pos_wavelengths_um else None
        in_dim = n_features + (p.phenotype_dim if self.phenotype is not None else 0)
        in_dim += self.position.dim if self.position is not None else 0
        self.in_proj = nn.Linear(in_dim, p.hidden)
        self.in_drop = nn.Dropout(p.dropout)
        conv = GATConv if p.gat == "gat" else GATv2Conv
        self.gat = nn.ModuleList(
            [conv(p.hidden, p.hidden // p.gat_heads, heads=p.gat_heads) for _ in range(p.gat_layers)]
        )
        self.gat_norms = nn.ModuleList([nn.LayerNorm(p.hidden) for _ in range(p.gat_layers)])
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(p.hidden, p.transformer_heads, p.ff_mult, p.dropout)
                for _ in range(p.transformer_layers)
            ]
        )
        self.norm = nn.LayerNorm(p.hidden)
        self.head = nn.Linear(p.hidden, n_genes)
        self.skip = nn.Linear(in_dim, n_genes, bias=False) if p.linear_skip else None
        # per-phenotype log-profiles added to every cell's log-expression (row 0: unknown phenotype);
        # zero until `set_profiles` (the deconvolution start of `fit_bitro`)
        self.profiles = nn.Embedding(n_phenotypes + 1, n_genes) if p.phenotype_profiles else None
        if self.profiles is not None:
            nn.init.zeros_(self.profiles.weight)
        if self.skip is not None:  # starts as the plain deep model
            nn.init.zeros_(self.skip.weight)
        self.attn_head = nn.Linear(p.hidden, n_genes) if p.pooling == "attention" else None
        if self.attn_head is not None:
            nn.init.zeros_(self.attn_head.weight)
            nn.init.zeros_(self.attn_head.bias)
        # bag-level linear term (`ModelParams.bag_linear`): log1p level a + B x̄ + c log1p(n) of each bag
        on = p.bag_linear is True  # "auto" is decided by `models.fit` before a network is built
        self.bag_linear = nn.Linear(n_features, n_genes) if on else None
        self.bag_count = nn.Parameter(torch.zeros(n_genes)) if on else None
        self._bag_base: torch.Tensor | None = None  # a + B x̄ of the bags of the last forward pass
        self.bag_ceiling: torch.Tensor | None
        # highest training bag's log1p level + BAG_MARGIN_LOG1P, set by the start
        ceiling = torch.full((n_genes,), _MAX_LOGIT) if self.bag_linear is not None else None
        self.register_buffer("bag_ceiling", ceiling)
        if self.bag_linear is not None:
            nn.init.zeros_(self.bag_linear.weight)
            nn.init.zeros_(self.bag_linear.bias)
        self.rna_head = nn.Linear(p.hidden, 1) if p.normalized else None
        self.depth: nn.Parameter | None = None
        self.ref_cells: torch.Tensor
        self.register_buffer("ref_cells", torch.ones(()))
        if self.rna_head is not None:  # every cell starts with the same RNA content (1)
            nn.init.normal_(self.rna_head.weight, std=0.01)
            nn.init.zeros_(self.rna_head.bias)
            self.depth = nn.Parameter(torch.zeros(n_genes))
        nn.init.normal_(self.head.weight, std=0.01)

    def cell_inputs(self, batch: Batch) -> torch.Tensor:
        """Each cell's input vector: features (+ phenotype embedding, + position encoding)."""
        parts = [batch.x]
        if self.phenotype is not None:
            parts.append(self.phenotype(batch.phenotype))
        if self.position is not None:
            parts.append(self.position(batch.pos))
        return torch.cat(parts, dim=1)

    def embed(self, batch: Batch, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Cell embeddings (n_cells, hidden) after GAT and Transformer, within each window."""
        inputs = self.cell_inputs(batch) if inputs is None else inputs
        h = self.in_drop(F.gelu(self.in_proj(inputs)))
        for conv, norm in zip(self.gat, self.gat_norms, strict=True):
            h = norm(h + F.gelu(conv(h, batch.edge_index)))
        if self.blocks:
            layout = _layout(batch.batch, batch.num_graphs)
            for block in self.blocks:
                h = block(h, layout)
        return self.norm(h)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(values, logits, rna): non-negative expression per cell (n_cells, n_genes); for attention
        pooling the per-cell per-gene attention logits (else ``None``); with the RNA-content head
        the relative RNA content ``r`` of each cell (n_cells, 1) (else ``None``), and then the
        values are ``r`` times the cell's profile."""
        inputs = self.cell_inputs(batch)
        h = self.embed(batch, inputs)
        z = self.head(h)
        if self.skip is not None:
            z = z + self.skip(inputs)
        if self.profiles is not None:
            z = z + self.profiles(batch.phenotype)
        y = torch.exp(z.clamp(max=_MAX_LOGIT)) if self.params.activation == "exp" else F.softplus(z)
        if self.bag_linear is not None:  # every cell times its bag's linear level at the reference size
            self._bag_base = self.bag_linear(_bag_means(batch.x, batch.batch, batch.num_graphs))
            y = y * self._bag_level(self._bag_base, self.ref_cells.reshape(1))[batch.batch]
        s = self.attn_head(h) if self.attn_head is not None else None
        r = None
        if self.rna_head is not None:
            r = torch.exp(self.rna_head(h).clamp(-_MAX_LOGIT, _MAX_LOGIT))
            y = y * r
        return y, s, r

    def init_depth(self, level: str, ref_cells: float, genes: torch.Tensor | None = None) -> None:
        """Set the reference bag size (cells of an average training bag) and start the depth exponent
        at its level's default (:data:`DEPTH_INIT`) for ``genes`` (a bool mask; all genes by default)."""
        with torch.no_grad():
            self.ref_cells.fill_(float(ref_cells) if ref_cells > 0 else 1.0)
            if self.depth is None:
                return
            mask = torch.ones_like(self.depth, dtype=torch.bool) if genes is None else genes
            self.depth[mask] = DEPTH_INIT[level]

    def depth_factor(
        self, n_cells: torch.Tensor, bag_means: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Per-gene measurement factor ``(n / ref_cells) ** depth`` of bags of ``n_cells`` cells
        (n_bags, genes), or ``None`` without the RNA-content head.

        A bag's library grows with its cells, and the mean of log1p counts-per-10k of a sparse gene
        grows with the library (more spots leave zero): a learned per-gene exponent absorbs that
        measurement effect at the training level, so that the cells' profiles stay free of it. It is
        applied to bag predictions at the level the model was trained on only, never to cells.

        With the bag-level linear term it also carries that term's cell-count effect, which depends
        on the bags' mean features ``bag_means`` (default: the bags of the last forward pass)."""
        factor = None
        if self.depth is not None:
            ratio = n_cells.to(self.depth.dtype).clamp(min=1.0) / self.ref_cells
            factor = torch.exp(self.depth[None, :] * torch.log(ratio)[:, None])
        if self.bag_linear is not None:
            # the bag-level term at the bags' own cell counts instead of the reference size; the bags'
            # mean (scaled) features are given, or those of the forward pass just made
            base = self.bag_linear(bag_means) if bag_means is not None else self._bag_base
            if base is None or base.shape[0] != n_cells.shape[0]:
                raise ValueError(
                    "This network has a bag-level linear term (ModelParams.bag_linear): pass the bags' "
                    "mean scaled cell features, `depth_factor(n_cells, bag_means=...)` (bags x features)."
                )
            n = n_cells.to(base.dtype).clamp(min=1.0)
            own = self._bag_level(base, n) / self._bag_level(base, self.ref_cells.reshape(1))
            factor = own if factor is None else factor * own
        return factor

    def _bag_level(self, base: torch.Tensor, n_cells: torch.Tensor) -> torch.Tensor:
        """Counts per 10k ``expm1(a + B x̄ + c log1p(n))`` of bags with linear part ``base`` and
        ``n_cells`` cells (bags, genes)."""
        assert self.bag_count is not None
        return bag_scale(base + self.bag_count[None, :] * torch.log1p(n_cells)[:, None], self.bag_ceiling)

    def set_gene_bias(self, mean_per_cell: torch.Tensor) -> None:
        """Initialise the head bias so that each cell predicts ``mean_per_cell`` (per gene) on average."""
        m = mean_per_cell.clamp(min=1e-6).to(self.head.bias)
        with torch.no_grad():
            if self.params.activation == "exp":
                self.head.bias.copy_(m.log())
            else:
                self.head.bias.copy_(m + torch.log(-torch.expm1(-m)))  # softplus^-1

    def set_profiles(self, log_profiles: torch.Tensor) -> None:
        """Set the per-phenotype log-profiles (rows: phenotype codes, 0 = unknown; genes)."""
        if self.profiles is None:
            raise ValueError("This network has no phenotype profiles (ModelParams.phenotype_profiles=False).")
        with torch.no_grad():
            self.profiles.weight.copy_(log_profiles.to(self.profiles.weight))


def _bag_means(x: torch.Tensor, index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Mean feature vector of the cells of each bag (bags, features)."""
    counts = torch.bincount(index, minlength=n_bags).clamp(min=1).to(x.dtype)
    total = torch.zeros(n_bags, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index, x)
    return total / counts[:, None]


def _layout(index: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Padded-grid layout of cells sorted by bag: (slot per cell, keep mask (bags, L), bags, L)."""
    counts = torch.bincount(index, minlength=n_bags)
    length = int(counts.max()) if counts.numel() else 0
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(index.numel(), device=index.device) - start[index]
    keep = torch.arange(length, device=index.device)[None, :] < counts[:, None]
    return index * length + pos, keep, n_bags, length


def pool_bags(
    y: torch.Tensor,
    s: torch.Tensor | None,
    index: torch.Tensor,
    n_bags: int,
    pooling: str,
    r: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool cells into bags. Returns (bag profiles (n_bags, genes), per-cell contributions (cells, genes));
    the contributions of a bag's cells sum to its profile. With RNA contents ``r`` (sum pooling), a
    bag's profile is ``Σ y / Σ r`` over its cells."""
    if r is not None:
        total = torch.zeros(n_bags, 1, dtype=y.dtype, device=y.device).index_add_(0, index, r)
        contrib = y / total[index]
    elif pooling == "sum":
        contrib = y
    else:
        counts = torch.bincount(index, minlength=n_bags).to(y.dtype)
        if pooling == "mean":
            contrib = y / counts[index, None]
        else:
            from torch_geometric.utils import softmax

            assert s is not None
            contrib = y * softmax(s, index, num_nodes=n_bags) * counts[index, None]
    pooled = torch.zeros(n_bags, y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, index, contrib)
    return pooled, contrib


def design_scale(n: np.ndarray, params: ModelParams, level: str, bag_cells: float) -> np.ndarray:
    """What one cell weighs in its bag's profile (bags of ``n`` cells) as :func:`pool_bags` and the
    depth factor have it at the start of training (:data:`DEPTH_INIT`): 1 (plain sum), ``n̄ / n``
    (whole slides with ``slide_size_norm``), ``1 / n`` (mean) or ``(n / n̄) ** β / n`` (RNA-content
    head, all cells alike at the start); ``n̄`` = ``bag_cells``."""
    n = np.maximum(n, 1.0)
    if params.normalized:
        return (n / bag_cells) ** DEPTH_INIT[level] / n
    if params.pooling == "mean":
        return 1.0 / n
    if level == "bulk" and params.slide_size_norm:
        return bag_cells / n
    return np.ones_like(n)
