"""Deep encoders: any ``torch.nn.Module`` or a ``timm`` model with local weights, on fixed-µm crops."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from ._tiles import iter_tiles, read_rgb

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    import xarray as xr

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str | None = None) -> str:
    """``device`` as given, else ``"cuda"`` when available, else ``"mps"`` when available, else ``"cpu"``."""
    import torch

    if device is not None:
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """A state dict from a local ``.safetensors``, ``.pt``/``.pth``/``.bin`` file (no download)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Encoder weights {str(path)!r} do not exist. Pass the path of a local weights file "
            "(.safetensors, .pt, .pth or .bin); nothing is downloaded."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
    return state


class TorchEncoder:
    """Any ``torch.nn.Module`` as a cell encoder, with its preprocessing bundled.

    Each cell is cropped as a square of ``fov_um`` µm centred on its centroid (out-of-slide parts are
    white), resampled to ``input_size`` × ``input_size`` pixels (bilinear, after integer
    average-pooling when the crop is more than twice the input size, against aliasing), scaled to
    [0, 1] and normalised with ``mean`` / ``std`` per channel. The slide is streamed in tiles of
    ``tile_um`` µm and crops are fed in batches of ``batch_size``, so memory is bounded.

    The module's output per crop is used as the feature vector: ``(B, D)`` as is, ``(B, D, h, w)``
    averaged over space, ``(B, T, D)`` tokens → the first (class) token; a tuple/list → its first item.

    Parameters
    ----------
    module
        The network (put in ``eval()`` mode, moved to the device at encode time).
    input_size
        Side of the network's input in pixels.
    mean, std
        Channel normalisation of [0, 1] RGB input (ImageNet statistics by default).
    weights
        Optional local state dict to load into ``module`` (strict).
    tile_um
        Side of the tiles the slide is streamed in (µm).
    interpolation
        Resampling of the field of view to ``input_size``: ``"bilinear"``, ``"bicubic"``, ``"nearest"``.
    half
        Half precision (float16); ``None``: on CUDA only.
    name
        Recorded in ``uns["bitro_features"]["encoder"]``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        input_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str | Path | None = None,
        tile_um: float = 1024.0,
        interpolation: str = "bilinear",
        half: bool | None = None,
        name: str | None = None,
    ) -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        if int(input_size) < 1:
            raise ValueError(f"`input_size` must be a positive number of pixels, got {input_size!r}.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("`mean` and `std` need 3 values (R, G, B), with `std` > 0.")
        self.module = module
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.tile_um = float(tile_um)
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"`interpolation` must be 'bilinear', 'bicubic' or 'nearest', got {interpolation!r}."
            )
        self.interpolation = interpolation
        self.half = half
        self.name = name or f"torch:{type(module).__name__}"
        if weights is not None:
            self.module.load_state_dict(load_state_dict(weights))

    @property
    def params(self) -> dict[str, Any]:
        """Preprocessing settings (JSON-serialisable)."""
        return {
            "module": type(self.module).__name__,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "half": self.half,
            "tile_um": self.tile_um,
        }

    def with_weights(self, weights: str | Path) -> TorchEncoder:
        """This encoder with a local state dict loaded into its module."""
        self.module.load_state_dict(load_state_dict(weights))
        return self

    def __repr__(self) -> str:
        return f"TorchEncoder({self.name!r}, input_size={self.input_size})"

    def encode(
        self,
        image: xr.DataArray,
        cells: pd.DataFrame,
        *,
        mpp: float,
        fov_um: float,
        labels: xr.DataArray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[str]]:
        import torch
        from tqdm.auto import tqdm

        dev = torch.device(resolve_device(device))
        half = dev.type == "cuda" if self.half is None else bool(self.half)
        module = self.module.to(dev).eval()
        if half:
            module = module.half()
        n = len(cells)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        out: np.ndarray | None = None
        crops_iter = iter_crops(
            image,
            cells,
            mpp=mpp,
            fov_um=fov_um,
            size=self.input_size,
            batch_size=batch_size,
            tile_um=self.tile_um,
            device=dev,
            interpolation=self.interpolation,
        )
        with torch.inference_mode():
            for idx, crops in tqdm(
                crops_iter,
                total=-(-n // batch_size) if n else 0,
                desc=f"{self.name} features",
                disable=not progress,
            ):
                x = (crops - mean) / std
                feats = _pool_output(module(x.half() if half else x)).float().cpu().numpy()
                if out is None:
                    out = np.full((n, feats.shape[1]), np.nan, dtype=np.float32)
                out[idx] = feats
        if out is None:  # no cells: one blank crop gives the feature dimension
            with torch.inference_mode():
                blank = (torch.ones(1, 3, self.input_size, self.input_size, device=dev) - mean) / std
                dim = _pool_output(module(blank.half() if half else blank)).shape[1]
            out = np.zeros((0, dim), dtype=np.float32)
        names = [f"{self.name.split(':')[-1].split('/')[-1]}_{i}" for i in range(out.shape[1])]
        return out, names


def iter_crops(
    image: xr.DataArray,
    cells: pd.DataFrame,
    *,
    mpp: float,
    fov_um: float,
    size: int,
    batch_size: int = 256,
    tile_um: float = 1024.0,
    device: Any = "cpu",
    interpolation: str = "bilinear",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Cell-centred crops of ``fov_um`` µm resampled to ``size`` px, streamed tile by tile.

    Yields ``(idx, crops)``: positional cell indices and a ``(B, 3, size, size)`` float tensor of RGB
    in [0, 1] (out-of-slide parts white). The crop is average-pooled by an integer factor first when
    it is more than twice the output size (against aliasing), then resampled with ``interpolation``
    (``"bilinear"``, ``"bicubic"`` or ``"nearest"``) at the output pixel centres.
    """
    import torch
    import torch.nn.functional as F

    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(
            f"`interpolation` must be 'bilinear', 'bicubic' or 'nearest', got {interpolation!r}."
        )
    dev = torch.device(device)
    x_px = cells[K.X_PX].to_numpy(dtype=np.float64)
    y_px = cells[K.Y_PX].to_numpy(dtype=np.float64)
    fov_px = fov_um / mpp
    pool = max(int(fov_px // (2 * size)), 1)  # anti-aliasing before strong down-sampling
    margin = math.ceil(fov_px / 2) + pool + 2
    tile_px = max(round(tile_um / mpp), 64)
    shape_yx = (int(image.sizes["y"]), int(image.sizes["x"]))
    # output pixel offsets of a crop, in units of fov (pixel centres)
    steps = (torch.arange(size, dtype=torch.float32, device=dev) + 0.5) / size - 0.5
    for tile in iter_tiles(shape_yx, x_px, y_px, tile_px=tile_px, margin_px=margin):
        rgb = read_rgb(image, tile)
        # inverted so that zero padding outside the slide means white
        t = 255.0 - torch.from_numpy(rgb).to(dev).permute(2, 0, 1)[None].float()
        if pool > 1:
            t = F.avg_pool2d(t, pool, ceil_mode=True)
        th, tw = t.shape[-2:]
        for s in range(0, len(tile.cells), batch_size):
            idx = tile.cells[s : s + batch_size]
            # crop centres in (pooled) tile pixels; pixel i covers [i - .5, i + .5] * pool
            cy = torch.as_tensor((y_px[idx] - tile.y0 + 0.5) / pool - 0.5, device=dev).float()
            cx = torch.as_tensor((x_px[idx] - tile.x0 + 0.5) / pool - 0.5, device=dev).float()
            span = fov_px / pool
            gy = cy[:, None] + steps[None, :] * span  # (B, S)
            gx = cx[:, None] + steps[None, :] * span
            ny = (2 * gy + 1) / th - 1
            nx = (2 * gx + 1) / tw - 1
            grid = torch.stack(
                [nx[:, None, :].expand(-1, size, -1), ny[:, :, None].expand(-1, -1, size)], dim=-1
            )  # (B, S, S, 2) with (x, y) order
            crops = F.grid_sample(
                t, grid.reshape(1, -1, size, 2), mode=interpolation, align_corners=False
            )  # (1, 3, B*S, S)
            crops = crops.view(3, len(idx), size, size).permute(1, 0, 2, 3)
            yield idx, ((255.0 - crops) / 255.0).clamp_(0.0, 1.0)


def _pool_output(y: Any) -> torch.Tensor:
    import torch

    if isinstance(y, tuple | list):
        y = y[0]
    if isinstance(y, dict):
        raise TypeError(
            "The encoder module returned a dict; wrap it in a module that returns one tensor per crop."
        )
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"The encoder module must return a tensor, got {type(y).__name__}.")
    if y.ndim == 4:
        return y.mean(dim=(2, 3))
    if y.ndim == 3:
        return y[:, 0]
    if y.ndim == 2:
        return y
    raise ValueError(f"Cannot turn an encoder output of shape {tuple(y.shape)} into one vector per crop.")


class TimmEncoder:
    """A ``timm`` model with **local** weights (``"timm:<name>"`` in ``bs.tl.cell_features``).

    The model is built with ``timm.create_model(name, pretrained=False, num_classes=0, **create_kwargs)``
    (nothing is downloaded); the weights come from ``weights=`` or, when not given, from timm's copy in
    the local Hugging Face cache (``timm/<name>``, e.g. after ``huggingface-cli download timm/<name>``),
    and are loaded strictly (a classifier head in the file is dropped). The input size, mean / std
    and interpolation come from the model's pretrained ``timm`` data config unless given. Needs the
    ``timm`` extra: ``pip install 'bitro-sc[timm]'``.

    Foundation models plug in the same way, from their local files:

    - **UNI** (MahmoodLab): ``TimmEncoder("vit_large_patch16_224", weights="uni/pytorch_model.bin",
      init_values=1e-5, dynamic_img_size=True)``;
    - **DINOv2**: ``TimmEncoder("vit_small_patch14_dinov2.lvd142m", weights="dinov2_vits14.safetensors")``
      (timm's DINOv2 names; input 518 by default, pass ``input_size=224, img_size=224`` for speed);
    - **DINOv3** or any other network: load it yourself and pass the ``torch.nn.Module`` with its
      preprocessing, ``TorchEncoder(model, input_size=224, mean=..., std=...)``.

    Examples
    --------
    >>> bs.tl.cell_features(sdata, encoder="timm:resnet18", weights="resnet18.safetensors")  # doctest: +SKIP
    """

    def __init__(
        self,
        model_name: str,
        *,
        weights: str | Path | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        tile_um: float = 1024.0,
        **create_kwargs: Any,
    ) -> None:
        if not model_name:
            raise ValueError('A timm encoder needs a model name, e.g. "timm:resnet18".')
        self.model_name = model_name
        self.weights = weights
        self.input_size = input_size
        self.mean = mean
        self.std = std
        self.tile_um = tile_um
        self.create_kwargs = create_kwargs
        self.name = f"timm:{model_name}"
        self._encoder: TorchEncoder | None = None

    def __repr__(self) -> str:
        return f"TimmEncoder({self.model_name!r}, weights={self.weights!r})"

    def with_weights(self, weights: str | Path) -> TimmEncoder:
        """A copy of this encoder that loads ``weights`` (a local file; checked here)."""
        if not Path(weights).expanduser().is_file():
            raise FileNotFoundError(
                f"Encoder weights {str(weights)!r} do not exist. Pass the path of a local weights file "
                "(.safetensors, .pt, .pth or .bin); nothing is downloaded."
            )
        return TimmEncoder(
            self.model_name,
            weights=weights,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            tile_um=self.tile_um,
            **self.create_kwargs,
        )

    @property
    def params(self) -> dict[str, Any]:
        """Model name, weights file and resolved preprocessing (JSON-serialisable)."""
        enc = self._encoder
        return {
            "model": self.model_name,
            "weights": None if self.weights is None else str(self.weights),
            "input_size": enc.input_size if enc else self.input_size,
            "mean": list(enc.mean) if enc else self.mean,
            "std": list(enc.std) if enc else self.std,
            "interpolation": enc.interpolation if enc else None,
            "tile_um": self.tile_um,
            "create_kwargs": {
                k: v for k, v in self.create_kwargs.items() if isinstance(v, int | float | str | bool)
            },
        }

    def cached_weights(self) -> Path:
        """The weights of ``timm/<model_name>`` in the local Hugging Face cache (timm's hub copies).

        Raises with the exact steps to get them when they are not there (nothing is downloaded).
        """
        repo = f"timm/{self.model_name}"
        folder = None
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError

            try:
                folder = Path(snapshot_download(repo, local_files_only=True))
            except LocalEntryNotFoundError:
                folder = None
        except ImportError:  # huggingface_hub missing: only an explicit file can work
            folder = None
        files = []
        if folder is not None:
            files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
        if not files:
            raise FileNotFoundError(
                f"Encoder {self.name!r} needs local weights and none were found: pass `weights=` (path to a "
                f".safetensors / .pth file), or put timm's copy in the Hugging Face cache. Nothing is "
                f"downloaded, and a randomly initialised network gives meaningless features. On a machine "
                f"with internet access: for a gated model accept its terms on https://huggingface.co/{repo} "
                f"and log in with `huggingface-cli login` (or `hf auth login`); then "
                f"`huggingface-cli download {repo}` (or `hf download {repo}`); on an offline cluster copy "
                "~/.cache/huggingface/hub (or $HF_HOME/hub) and set HF_HOME."
            )
        return files[0]

    def build(self) -> TorchEncoder:
        """Create the model and load the weights (checks the weights first, then that timm is installed).

        Weights: ``weights=`` if given, else timm's copy in the local Hugging Face cache
        (``timm/<model_name>``). Preprocessing: the model's pretrained configuration
        (``timm.data.resolve_data_config``: input size, mean / std, interpolation) unless overridden.
        """
        if self._encoder is not None:
            return self._encoder
        weights = self.weights if self.weights is not None else self.cached_weights()
        state = load_state_dict(weights)
        try:
            import timm
        except ImportError as err:
            raise ImportError(
                f"Encoder {self.name!r} needs the `timm` package: pip install 'bitro-sc[timm]'."
            ) from err
        model = timm.create_model(self.model_name, pretrained=False, num_classes=0, **self.create_kwargs)
        head = {k for k in state if k.startswith(("head.", "fc.", "classifier."))}
        own = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in own or k not in head}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"Weights {str(weights)!r} do not match timm model {self.model_name!r}: "
                f"missing {list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]}. "
                "Check the model name and the `create_kwargs` used to train it."
            )
        cfg = timm.data.resolve_data_config({}, model=model)  # the model's pretrained config
        interp = str(cfg.get("interpolation", "bilinear"))
        self._encoder = TorchEncoder(
            model,
            input_size=self.input_size or int(cfg["input_size"][-1]),
            mean=self.mean or tuple(cfg["mean"]),
            std=self.std or tuple(cfg["std"]),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
            tile_um=self.tile_um,
            name=self.name,
        )
        self.weights = weights
        return self._encoder

    def encode(self, image: xr.DataArray, cells: pd.DataFrame, **kwargs: Any) -> tuple[np.ndarray, list[str]]:
        return self.build().encode(image, cells, **kwargs)
