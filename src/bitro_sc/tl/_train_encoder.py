"""`bs.tl.train_encoder`: a self-supervised cell encoder learned from the user's own slides."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K
from .. import _sdata

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from spatialdata import SpatialData

    from ..encoders._learned import LearnedEncoder

#: crops are read this much larger than the field of view, room for the scale / shift augmentation
_MARGIN = 1.25


def _sample_crops(
    slides: list[Any],
    *,
    n_cells: int,
    fov_um: float,
    size: int,
    image_key: str | None,
    cells_key: str,
    mpp: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """``(n, 3, size', size')`` uint8 crops of ``fov_um * _MARGIN`` around randomly chosen cells."""
    from ..encoders._torch import iter_crops

    tables = [_sdata.require(s, cells_key, kind="tables", step="run `bs.tl.segment` first") for s in slides]
    counts = np.array([t.n_obs for t in tables])
    if counts.sum() == 0:
        raise ValueError("The slides have no cells; run `bs.tl.segment` first.")
    n = min(int(n_cells), int(counts.sum()))
    chosen = np.sort(rng.choice(int(counts.sum()), size=n, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    big = round(size * _MARGIN)
    out = np.zeros((n, 3, big, big), dtype=np.uint8)
    pos = 0
    for s, table, lo, hi in zip(slides, tables, offsets[:-1], offsets[1:], strict=True):
        pick = chosen[(chosen >= lo) & (chosen < hi)] - lo
        if not len(pick):
            continue
        ikey = _sdata.resolve_image_key(s, image_key)
        image = _sdata.get_image(s, ikey)
        obs = table.obs.iloc[pick]
        for idx, crops in iter_crops(
            image, obs, mpp=_sdata.get_mpp(s, ikey, mpp), fov_um=fov_um * _MARGIN, size=big, batch_size=512
        ):
            out[pos + idx] = np.round(crops.numpy() * 255).astype(np.uint8)
        pos += len(pick)
    return out


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    from skimage.color import hed_from_rgb, rgb_from_hed

    return torch.tensor(hed_from_rgb, dtype=torch.float32), torch.tensor(rgb_from_hed, dtype=torch.float32)


def augment(
    batch: torch.Tensor,
    *,
    size: int,
    gen: torch.Generator,
    stain_jitter: float = 0.05,
    scale: tuple[float, float] = (0.85, 1.15),
    blur_p: float = 0.3,
) -> torch.Tensor:
    """One random H&E-aware view of each crop: scale / shift, flips and 90° rotations, HED stain jitter
    (each stain's optical density scaled by ``1 ± stain_jitter`` and shifted by ``± stain_jitter``),
    small Gaussian blur. ``batch`` is ``(B, 3, s', s')`` float in [0, 1]; returns ``(B, 3, size, size)``."""
    import torch
    import torch.nn.functional as F

    b, _, big, _ = batch.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # scale and shift: the field of view is `size / big` of the stored crop, times a random scale
    s = (size / big) * (scale[0] + (scale[1] - scale[0]) * u(b))
    shift = (1 - s)[:, None] * (u(b, 2) * 2 - 1) * 0.5
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # flips and 90° rotations (the dihedral group)
    k = torch.randint(0, 4, (b,), generator=gen)
    flip = u(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    rotated = x.clone()
    for turns in (1, 2, 3):
        sel = k == turns
        if sel.any():
            rotated[sel] = torch.rot90(x[sel], turns, dims=(2, 3))
    x = rotated
    # stain jitter in HED space (optical density, linear in the stains)
    hed_from_rgb, rgb_from_hed = _hed_matrices()
    od = -torch.log(x.clamp(1 / 255, 1.0))  # (B, 3, H, W)
    hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
    alpha = 1 + stain_jitter * (u(b, 3) * 2 - 1)
    beta = stain_jitter * (u(b, 3) * 2 - 1)
    hed = hed * alpha[:, :, None, None] + beta[:, :, None, None]
    x = torch.exp(-torch.einsum("bdhw,dc->bchw", hed, rgb_from_hed)).clamp(0.0, 1.0)
    # small Gaussian blur on a fraction of the views
    blur = u(b) < blur_p
    if blur.any():
        sigma = 0.3 + 0.7 * u(int(blur.sum()))
        r = torch.arange(-2, 3, dtype=torch.float32)
        k1 = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)
        xb = x[blur]
        nb = xb.shape[0]
        w = k1.repeat_interleave(3, 0)  # (nb*3, 5)
        xb = xb.reshape(1, nb * 3, size, size)
        xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), w[:, None, None, :], groups=nb * 3)
        xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), w[:, None, :, None], groups=nb * 3)
        x = x.clone()
        x[blur] = xb.reshape(nb, 3, size, size)
    return x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2B views of a batch."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_encoder(
    sdatas: SpatialData | Sequence[SpatialData],
    *,
    n_cells: int = 20_000,
    epochs: int = 5,
    fov_um: float = 32.0,
    input_size: int = 32,
    widths: Sequence[int] = (16, 32, 32, 64, 64),
    objective: Literal["simclr"] = "simclr",
    temperature: float = 0.2,
    batch_size: int = 256,
    lr: float = 2e-3,
    stain_jitter: float = 0.05,
    seed: int = 0,
    image_key: str | None = None,
    cells_key: str = K.CELLS,
    mpp: float | None = None,
    device: str | None = None,
    progress: bool = True,
) -> LearnedEncoder:
    """Learn a cell encoder from cell-centred crops of the given slides (self-supervised, SimCLR).

    ``n_cells`` cells are drawn at random over all slides; each is cropped once as a square of
    ``fov_um`` µm (read 25 % larger, for the scale / shift augmentation) resampled to ``input_size``
    px, so slides scanned at different resolutions see the same tissue. A small CNN (``widths``:
    3×3 conv blocks, global average) learns to give two H&E-aware random views of the same cell
    (scale and shift, flips and 90° rotations, stain jitter in HED space, small blur) close
    embeddings and views of other cells distant (SimCLR's NT-Xent loss through a 2-layer projection
    head, dropped afterwards). No expression is used.

    Cost: ``n_cells × epochs`` crop pairs; the defaults (20k cells, 5 epochs, 32 px) took 21 min on one
    thread of a busy 2-core machine (``benchmarks/results/encoders.md``), far less on a GPU.
    Deterministic for a given ``seed`` on CPU.

    Parameters
    ----------
    sdatas
        Slides with a cells table (``bs.tl.segment``).
    n_cells, epochs, batch_size, lr
        Training cells (drawn at random over all slides), passes over them, crop pairs per step and
        Adam's learning rate (cosine decay).
    fov_um, input_size
        Field of view (µm) and its side in pixels at the network's input.
    widths
        Channels of the conv blocks; the last is the feature dimension.
    objective
        ``"simclr"`` (the only one for now).
    temperature, stain_jitter
        NT-Xent temperature; strength of the HED stain jitter.
    seed
        Seeds the cell draw, the initialisation and the augmentations.
    image_key, cells_key, mpp
        Where the H&E and the cells are; the pixel size when the image does not record it.
    device
        Torch device; ``"cuda"`` when available, else CPU.
    progress
        Show a progress bar over the training steps.

    Returns
    -------
    A :class:`bitro_sc.encoders.LearnedEncoder`: pass it (or the path it was saved to with
    ``.save(path)``) as ``bs.tl.cell_features(sdata, encoder=...)`` on any slide.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slide = bs.datasets.toy("nuclei", seed=0, size_px=200, labels=False)
    >>> enc = bs.tl.train_encoder(slide, n_cells=64, epochs=1, batch_size=32, progress=False)
    >>> bs.tl.cell_features(slide, encoder=enc, progress=False)
    >>> slide.tables["cells"].obsm["X_bitro"].shape
    (49, 64)
    """
    import torch
    from tqdm.auto import tqdm

    from ..encoders._learned import LearnedEncoder, small_cnn
    from ..encoders._torch import resolve_device

    if objective != "simclr":
        raise ValueError(f"`objective` must be 'simclr', got {objective!r}.")
    for name, value, low in (
        ("n_cells", n_cells, 2),
        ("input_size", input_size, 8),
        ("batch_size", batch_size, 2),
    ):
        if int(value) < low:
            raise ValueError(f"`{name}` must be at least {low}, got {value!r}.")
    if int(epochs) < 0 or not fov_um > 0 or not temperature > 0:
        raise ValueError("`epochs` must be >= 0, `fov_um` and `temperature` positive.")
    slides = list(sdatas) if isinstance(sdatas, list | tuple) else [sdatas]
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    crops = _sample_crops(
        slides,
        n_cells=n_cells,
        fov_um=fov_um,
        size=input_size,
        image_key=image_key,
        cells_key=cells_key,
        mpp=mpp,
        rng=rng,
    )
    n = len(crops)
    c0 = (crops.shape[2] - input_size) // 2
    centre = crops[:, :, c0 : c0 + input_size, c0 : c0 + input_size]
    mean = (centre.reshape(n, 3, -1).mean(axis=(0, 2)) / 255.0).tolist()
    std = (centre.reshape(n, 3, -1).std(axis=(0, 2)) / 255.0 + 1e-3).tolist()

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    widths = tuple(int(w) for w in widths)
    net = small_cnn(widths)
    dim = widths[-1]
    head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))
    dev = torch.device(resolve_device(device))
    net.to(dev)
    head.to(dev)
    bsz = min(int(batch_size), n)
    steps_per_epoch = max(n // bsz, 1)
    total = steps_per_epoch * int(epochs)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    m = torch.tensor(mean).view(1, 3, 1, 1).to(dev)
    sd = torch.tensor(std).view(1, 3, 1, 1).to(dev)
    losses: list[float] = []
    bar = tqdm(total=total, desc="train_encoder", disable=not progress)
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=gen)
        net.train()
        head.train()
        for st in range(steps_per_epoch):
            idx = order[st * bsz : (st + 1) * bsz]
            batch = torch.from_numpy(crops[idx.numpy()]).float() / 255.0
            v1 = augment(batch, size=input_size, gen=gen, stain_jitter=stain_jitter).to(dev)
            v2 = augment(batch, size=input_size, gen=gen, stain_jitter=stain_jitter).to(dev)
            loss = nt_xent(head(net((v1 - m) / sd)), head(net((v2 - m) / sd)), temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    config = {
        "name": "learned" if epochs else "random_cnn",
        "objective": objective,
        "widths": list(widths),
        "fov_um": float(fov_um),
        "input_size": int(input_size),
        "mean": mean,
        "std": std,
        "n_cells": int(n),
        "n_slides": len(slides),
        "epochs": int(epochs),
        "batch_size": int(bsz),
        "lr": float(lr),
        "temperature": float(temperature),
        "stain_jitter": float(stain_jitter),
        "seed": int(seed),
        "final_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    return LearnedEncoder(net.cpu().eval(), config)
