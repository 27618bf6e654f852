"""Whole slides as one bag: chunked forward passes, the exact chunked gradient, slide profiles.

Whole slides (bulk level) are one bag each, whatever their number of cells. The slide is cut into
spatially coherent chunks of ``chunk_cells`` cells (Z-order), the attention window of the
Transformer and the GAT (graph edges between chunks are cut). The slide's sum-pooled profile is a
sum of chunk terms, so the gradient of the loss is computed exactly in two passes:

1. forward every chunk without gradients, accumulate the pooled profile and compute
   ``dLoss/dPooled``;
2. re-run each chunk with gradients and back-propagate that upstream gradient
   (``torch.autograd.backward(chunk_terms, grad)``).

Memory is bounded by one batch of chunks, time is linear in cells. Dropout draws the same random
numbers in both passes (each chunk batch runs under its own seed). Gene-wise attention pooling is
exact too (its numerator and denominator are sums of chunk terms under a common shift).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..pp._expression import TARGET_SUM
from ._bags import BulkSlide, Partition, SlideCells, make_batch

if TYPE_CHECKING:  # pragma: no cover
    from ._net import BiTroNet
    from ._sink import RowBlocks

#: cells per forward batch when a slide is processed in chunks (several chunks per batch)
CELLS_PER_BATCH = 4096


def loss_fn(
    pred: torch.Tensor,
    target: torch.Tensor,
    lib: torch.Tensor,
    kind: str,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss over bags and genes; ``pred``/``target`` in counts per 10k, ``lib`` library sizes;
    ``weights`` (genes, mean 1): per-gene weights of the loss (``None``: all genes alike)."""
    if kind == "mse":
        err = (torch.log1p(pred) - torch.log1p(target)) ** 2
    else:
        scale = (lib / TARGET_SUM)[:, None]
        mu = pred * scale + 1e-8
        k = target * scale
        err = 2 * (torch.xlogy(k, k) - k * torch.log(mu) - k + mu)  # Poisson deviance
    return (err * weights).mean() if weights is not None else err.mean()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under its own torch seed without disturbing the global random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def chunk_batches(part: Partition, cells_per_batch: int) -> list[list[int]]:
    sizes = part.sizes()
    out: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for g, s in enumerate(sizes):
        if s == 0:
            continue
        if cur and n + s > cells_per_batch:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += int(s)
    if cur:
        out.append(cur)
    return out


def _terms(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    groups: list[int],
    device: torch.device,
    shift: torch.Tensor | None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Pooling terms of some chunks: [Σ y], [Σ y, Σ r] (RNA-content head) or, for attention,
    [Σ e^(s-m) y, Σ e^(s-m)] and m."""
    batch, _ = make_batch([slide], [part], [(0, g) for g in groups], device=device)
    y, s, r = net(batch)
    if r is not None:
        return [y.sum(0), r.sum(0)], None
    if s is None:
        return [y.sum(0)], None
    m = s.detach().max(0).values if shift is None else shift
    w = torch.exp(s - m)
    return [(w * y).sum(0), w.sum(0)], m


def _combine(
    acc: tuple[list[torch.Tensor], torch.Tensor | None] | None,
    new: tuple[list[torch.Tensor], torch.Tensor | None],
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    if acc is None:
        return new
    (terms, m), (nterms, nm) = acc, new
    if m is None or nm is None:
        return [a + b for a, b in zip(terms, nterms, strict=True)], None
    top = torch.maximum(m, nm)
    a, b = torch.exp(m - top), torch.exp(nm - top)
    return [t * a + u * b for t, u in zip(terms, nterms, strict=True)], top


def slide_scale(net: BiTroNet, n_cells: int) -> torch.Tensor | float:
    """Factor of a whole slide's summed cell values under plain sum pooling with ``slide_size_norm``:
    ``ref_cells / n``. A deep bulk library is normalised to counts per 10k whatever the slide's
    size, so the sum is scaled to a slide of the reference size (cell values stay shares of a bag
    of ``ref_cells`` cells, the average training bag). 1 otherwise."""
    p = net.params
    if p.pooling == "sum" and not p.normalized and p.slide_size_norm and n_cells > 0:
        return net.ref_cells / n_cells
    return 1.0


def _finalize(terms: list[torch.Tensor], net: BiTroNet, n_cells: int) -> torch.Tensor:
    """A whole slide's profile from its summed chunk terms."""
    params = net.params
    pooling = params.pooling
    if params.normalized:
        return terms[0] / terms[1]
    if pooling == "sum":
        return terms[0] * slide_scale(net, n_cells)
    if pooling == "mean":
        return terms[0] / n_cells
    return n_cells * terms[0] / terms[1]


def slide_profile(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    *,
    device: torch.device,
    seed: int = 0,
    cells_per_batch: int = CELLS_PER_BATCH,
) -> torch.Tensor:
    """Pooled profile (genes,) of a whole slide; differentiable when grad is enabled (reference path
    that keeps every chunk's graph in memory: small slides and tests only)."""
    acc = None
    for bi, groups in enumerate(chunk_batches(part, cells_per_batch)):
        with seeded(seed + bi, device):
            acc = _combine(acc, _terms(net, slide, part, groups, device, None))
    if acc is None:
        raise ValueError("The slide has no cells: run `bs.tl.segment` on it (or drop it).")
    return _calibrated(net, _finalize(acc[0], net, int(part.order.size)), int(part.order.size))


def with_depth(net: BiTroNet, pooled: torch.Tensor, n_cells: torch.Tensor) -> torch.Tensor:
    """Bag profiles (bags, genes) times the net's depth factor for bags of ``n_cells`` cells (at
    the training level; unchanged without the RNA-content head)."""
    factor = net.depth_factor(n_cells)
    return pooled if factor is None else pooled * factor


def _calibrated(net: BiTroNet, profile: torch.Tensor, n_cells: int) -> torch.Tensor:
    """One slide's ``profile`` (genes,) through :func:`with_depth`."""
    return with_depth(net, profile[None], torch.tensor([float(n_cells)], device=profile.device))[0]


def slide_step(
    net: BiTroNet,
    item: BulkSlide,
    *,
    loss: str,
    device: torch.device,
    seed: int,
    scale: float = 1.0,
    cells_per_batch: int = CELLS_PER_BATCH,
    amp: bool = False,
) -> float:
    """Accumulate into ``.grad`` the exact gradient of ``scale * loss(slide profile)``; return the loss.

    Two passes over the chunks (see the module docstring); peak memory is one batch of chunks.
    ``amp``: the network's forward passes run under bfloat16 autocast (CPU and CUDA, no loss
    scaling needed); the chunk terms, the pooled profile and the loss stay float32.
    """
    batches = chunk_batches(item.part, cells_per_batch)
    n = int(item.part.order.size)
    acc = None

    def forward(
        groups: list[int], shift: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, m = _terms(net, item.slide, item.part, groups, device, shift)
        return [t.float() for t in out], (None if m is None else m.float())

    with torch.no_grad():
        for bi, groups in enumerate(batches):
            with seeded(seed + bi, device):
                acc = _combine(acc, forward(groups, None))
    if acc is None:
        raise ValueError("The slide has no cells: run `bs.tl.segment` on it (or drop it).")
    terms, shift = acc
    leaves = [t.detach().requires_grad_(True) for t in terms]
    pooled = _calibrated(net, _finalize(leaves, net, n), n)
    target = torch.as_tensor(item.target, dtype=pooled.dtype, device=device)[None]
    lib = torch.tensor([item.lib], dtype=pooled.dtype, device=device)
    value = loss_fn(pooled[None], target, lib, loss) * scale
    extra: list[torch.Tensor] = [net.depth] if net.depth is not None and net.depth.requires_grad else []
    grads = list(torch.autograd.grad(value, [*leaves, *extra]))
    for param, grad in zip(extra, grads[len(leaves) :], strict=True):  # the depth exponent's share
        param.grad = grad if param.grad is None else param.grad + grad
    grads = grads[: len(leaves)]
    for bi, groups in enumerate(batches):
        with seeded(seed + bi, device):
            chunk_terms, _ = forward(groups, shift)
        torch.autograd.backward(chunk_terms, list(grads))
    return float(value.detach()) / scale


def slide_cell_values(
    net: BiTroNet,
    slide: SlideCells,
    part: Partition,
    *,
    device: torch.device,
    cells_per_batch: int | None = None,
    out: RowBlocks | None = None,
) -> tuple[np.ndarray | Any, np.ndarray | None]:
    """Per-cell values (n_cells, genes) of a whole slide and the cells' RNA contents (n_cells,) or
    ``None`` (eval; rows of cells outside the partition are NaN).

    With the RNA-content head the values are each cell's expression ``r · p`` and the slide profile
    is ``values.sum(0) / rna.sum()``; otherwise they are contributions that sum to the profile.
    ``out``: where the values go, by row blocks (the values returned are its target); default a
    new in-memory array."""
    from ._sink import RowBlocks, sweep, window_first_rows

    pooling = net.params.pooling
    batches = chunk_batches(part, cells_per_batch or CELLS_PER_BATCH)
    n = int(part.order.size)
    if out is None:
        out = RowBlocks(np.full((slide.n_cells, net.n_genes), np.nan, dtype=np.float32))
    first = window_first_rows(part.order, part.cell_ptr)
    rna = np.full(slide.n_cells, np.nan, dtype=np.float32) if net.params.normalized else None
    with torch.no_grad():
        shift = denom = None
        if pooling == "attention":
            acc = None
            for groups in batches:
                acc = _combine(acc, _terms(net, slide, part, groups, device, None))
            assert acc is not None
            shift, denom = acc[1], acc[0][1]
        for groups in sweep([(int(first[groups].min()), groups) for groups in batches], out):
            batch, cells = make_batch([slide], [part], [(0, g) for g in groups], device=device)
            y, s, r = net(batch)
            if rna is not None:
                assert r is not None
                rna[cells] = r[:, 0].float().cpu().numpy()
            elif pooling == "mean":
                y = y / n
            elif pooling == "sum":
                y = y * slide_scale(net, n)
            elif pooling == "attention":
                assert s is not None
                assert shift is not None
                assert denom is not None
                y = n * torch.exp(s - shift) * y / denom
            out[cells] = y.float().cpu().numpy()
    return out.target, rna
