"""Hugging Face ``transformers`` vision models as cell encoders, from local files only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._torch import IMAGENET_MEAN, IMAGENET_STD, TorchEncoder

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd
    import torch
    import xarray as xr

#: PIL resampling codes of image-processor configs -> torch grid_sample modes
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
TOKENS = ("cls", "mean", "cls+mean")


def missing_weights_message(repo: str) -> str:
    """How to get a Hugging Face model into the local cache (gated models included)."""
    return (
        f"The Hugging Face model {repo!r} is not in the local cache and is not a local folder; nothing is "
        "downloaded. On a machine with internet access:\n"
        "  1. for a gated model (UNI, Virchow, H-optimus, DINOv3, ...): accept its terms on "
        f"https://huggingface.co/{repo}, then log in: `huggingface-cli login` (or `hf auth login`) "
        "with a read token;\n"
        f"  2. download it: `huggingface-cli download {repo}` (or `hf download {repo}`), or in Python "
        f"`huggingface_hub.snapshot_download({repo!r})`;\n"
        "  3. on an offline cluster, copy the cache folder (~/.cache/huggingface/hub, or $HF_HOME/hub) "
        "and set HF_HOME, or pass the downloaded folder: encoder='hf:/path/to/folder'."
    )


class _TokenPool:
    """Wraps a transformers model: pixel values -> one vector per image (class / mean token)."""

    def __new__(cls, model: Any, token: str, n_prefix: int) -> Any:
        import torch

        class TokenPool(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = self.model(pixel_values=x)
                hidden = getattr(out, "last_hidden_state", None)
                if hidden is None:
                    hidden = out[0]
                if hidden.ndim == 4:  # CNN feature map (B, D, h, w): spatial mean
                    return hidden.mean(dim=(2, 3))
                if hidden.ndim != 3:
                    raise ValueError(f"Unexpected model output of shape {tuple(hidden.shape)}.")
                cls_tok = hidden[:, 0]
                mean_tok = hidden[:, n_prefix:].mean(dim=1)
                if token == "cls":
                    return cls_tok
                if token == "mean":
                    return mean_tok
                return torch.cat([cls_tok, mean_tok], dim=1)

        return TokenPool()


class HFEncoder:
    """A ``transformers`` vision model (``"hf:<org>/<repo>"`` / ``"hf-hub:..."`` in ``cell_features``).

    The model is loaded with ``AutoModel.from_pretrained(..., local_files_only=True)`` from the local
    Hugging Face cache (``"org/repo"``) or a folder (``"hf:/path/to/folder"``); nothing is downloaded,
    and a missing model raises with the exact steps to get it (login for gated models, download,
    offline copy). Preprocessing follows the model's own ``preprocessor_config.json``: input size
    (``crop_size`` when the processor centre-crops, else ``size``), ``image_mean`` / ``image_std``
    and the resampling filter; any of them can be overridden. The field of view stays fixed in µm
    (``fov_um`` of ``cell_features``) and is resampled to the input size. Crops are batched and
    streamed tile by tile (:class:`TorchEncoder`), on the GPU in half precision when there is one.

    Parameters
    ----------
    model
        ``"<org>/<repo>"`` in the local cache, or a local folder saved with ``save_pretrained``.
    token
        ViTs: ``"cls"`` (class token), ``"mean"`` (mean of the patch tokens, register tokens
        excluded) or ``"cls+mean"`` (both, concatenated). CNNs: the spatial mean of the last map.
    input_size, mean, std, interpolation
        Override the model's preprocessing.
    revision
        Branch, tag or commit of a cached model.
    half
        Half precision; ``None``: on CUDA only.
    tile_um
        Tile side (µm) of the streaming.

    Examples
    --------
    >>> bs.tl.cell_features(sdata, encoder="hf:MahmoodLab/UNI2-h")  # doctest: +SKIP
    >>> enc = bs.encoders.HFEncoder("facebook/dinov2-small", token="cls+mean")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str,
        *,
        token: Literal["cls", "mean", "cls+mean"] = "cls",
        input_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        revision: str | None = None,
        half: bool | None = None,
        tile_um: float = 1024.0,
    ) -> None:
        if not model:
            raise ValueError('A Hugging Face encoder needs a model, e.g. "hf:facebook/dinov2-small".')
        if token not in TOKENS:
            raise ValueError(f"`token` must be one of {TOKENS}, got {token!r}.")
        self.model = str(model)
        self.token = token
        self.input_size = input_size
        self.mean = mean
        self.std = std
        self.interpolation = interpolation
        self.revision = revision
        self.half = half
        self.tile_um = float(tile_um)
        self.name = f"hf:{self.model}"
        self._encoder: TorchEncoder | None = None
        self._commit: str | None = None

    def __repr__(self) -> str:
        return f"HFEncoder({self.model!r}, token={self.token!r})"

    @property
    def params(self) -> dict[str, Any]:
        """Model, resolved preprocessing and commit (JSON-serialisable; resolved once built)."""
        enc = self._encoder
        return {
            "model": self.model,
            "token": self.token,
            "revision": self.revision,
            "commit": self._commit,
            "input_size": enc.input_size if enc else self.input_size,
            "mean": list(enc.mean) if enc else self.mean,
            "std": list(enc.std) if enc else self.std,
            "interpolation": enc.interpolation if enc else self.interpolation,
            "half": self.half,
            "tile_um": self.tile_um,
        }

    def _source(self) -> tuple[str, bool]:
        """The local folder to load (a given folder, or the cached snapshot of a repo id)."""
        path = Path(self.model).expanduser()
        if path.is_dir():
            return str(path), True
        if self.model.startswith(("/", ".", "~")) or self.model.count("/") != 1:
            raise FileNotFoundError(
                f"Hugging Face model folder {self.model!r} does not exist. Pass a folder written by "
                "`save_pretrained` / `huggingface-cli download --local-dir`, or a repo id '<org>/<repo>' "
                "that is in the local cache."
            )
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:  # the cached snapshot folder: loading from it never touches the network
            folder = snapshot_download(self.model, revision=self.revision, local_files_only=True)
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(missing_weights_message(self.model)) from err
        self._commit = Path(folder).name
        return folder, True

    @staticmethod
    def _preprocessor(folder: str) -> dict[str, Any]:
        f = Path(folder) / "preprocessor_config.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def build(self) -> TorchEncoder:
        """Load the model (local files only) and resolve its preprocessing; checks before any work."""
        if self._encoder is not None:
            return self._encoder
        source, _ = self._source()
        try:
            import transformers
        except ImportError as err:
            raise ImportError(
                f"Encoder {self.name!r} needs the `transformers` package: pip install 'bitro-sc[hf]'."
            ) from err
        try:
            model = transformers.AutoModel.from_pretrained(source, local_files_only=True)
        except OSError as err:
            raise OSError(
                f"Could not load a transformers model from {source!r} ({err}). The folder needs the "
                f"config.json and weights of a complete download; {missing_weights_message(self.model)}"
            ) from err
        proc = self._preprocessor(source)
        cfg = model.config
        crop = proc.get("crop_size") if proc.get("do_center_crop", False) else None
        size = crop or proc.get("size") or {}
        side: Any
        if isinstance(size, int):
            side = size
        else:
            side = size.get("height") or size.get("shortest_edge") or getattr(cfg, "image_size", 224)
        if isinstance(side, list | tuple):
            side = side[-1]
        n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        module = _TokenPool(model, self.token, n_prefix)
        self._encoder = TorchEncoder(
            module,
            input_size=int(self.input_size or side),
            mean=tuple(self.mean or proc.get("image_mean") or IMAGENET_MEAN),
            std=tuple(self.std or proc.get("image_std") or IMAGENET_STD),
            interpolation=self.interpolation or _RESAMPLE.get(int(proc.get("resample", 2)), "bilinear"),
            half=self.half,
            tile_um=self.tile_um,
            name=self.name,
        )
        return self._encoder

    def encode(self, image: xr.DataArray, cells: pd.DataFrame, **kwargs: Any) -> tuple[np.ndarray, list[str]]:
        return self.build().encode(image, cells, **kwargs)

    def module(self) -> torch.nn.Module:
        """The wrapped network (image batch -> one vector per image)."""
        return self.build().module
