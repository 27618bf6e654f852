"""A small CNN cell encoder learned from the user's slides (``bs.tl.train_encoder``), saved and reloaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch import TorchEncoder

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    import xarray as xr

FORMAT = "bitro_sc.learned_encoder/1"


def small_cnn(widths: tuple[int, ...] = (16, 32, 32, 64, 64)) -> torch.nn.Module:
    """Conv 3×3 + BatchNorm + ReLU blocks, stride 2 from the second block on every other block,
    then a global average: ``(B, 3, s, s)`` → ``(B, widths[-1])``."""
    import torch

    layers: list[torch.nn.Module] = []
    c_in = 3
    for i, w in enumerate(widths):
        stride = 2 if i % 2 == 1 or i == len(widths) - 1 else 1
        layers += [
            torch.nn.Conv2d(c_in, w, 3, stride=stride, padding=1, bias=False),
            torch.nn.BatchNorm2d(w),
            torch.nn.ReLU(inplace=True),
        ]
        c_in = w
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers)


class LearnedEncoder:
    """A cell encoder trained by :func:`bitro_sc.tl.train_encoder` (or its randomly initialised twin).

    It always crops its own field of view, ``fov_um`` µm resampled to ``input_size`` px, the one it
    was trained on (``fov_um`` of ``bs.tl.cell_features`` is ignored), normalised with the mean / std
    of its training crops. Save with :meth:`save`, reload with :func:`load_encoder` (or pass the
    ``.pt`` path as ``encoder=`` to ``bs.tl.cell_features``).

    Attributes
    ----------
    network
        The CNN (crop → feature vector).
    config
        Architecture and training settings (JSON-serialisable), recorded as the encoder's params.
    """

    def __init__(self, network: torch.nn.Module, config: dict[str, Any]) -> None:
        self.network = network
        self.config = dict(config)
        self.fov_um = float(config["fov_um"])
        self.input_size = int(config["input_size"])
        self.name = str(config.get("name", "learned"))
        self._torch = TorchEncoder(
            network,
            input_size=self.input_size,
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            name=self.name,
        )

    def __repr__(self) -> str:
        return f"LearnedEncoder({self.name!r}, fov_um={self.fov_um}, input_size={self.input_size})"

    @property
    def params(self) -> dict[str, Any]:
        """Architecture, preprocessing and training settings (JSON-serialisable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()}

    def encode(
        self, image: xr.DataArray, cells: pd.DataFrame, *, fov_um: float | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, list[str]]:
        """Features of the cells at the encoder's own field of view."""
        x, _ = self._torch.encode(image, cells, fov_um=self.fov_um, **kwargs)
        return x, [f"{self.name}_{i}" for i in range(x.shape[1])]

    def save(self, path: str | Path) -> Path:
        """Write the weights and configuration to ``path`` (``.pt``); returns the path."""
        import torch

        path = Path(path).expanduser()
        if path.suffix != ".pt":
            raise ValueError(f"Save the encoder to a '.pt' file, got {str(path)!r}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        torch.save({"format": FORMAT, "config": self.config, "state_dict": state}, str(path))
        return path


def load_encoder(path: str | Path) -> LearnedEncoder:
    """Reload an encoder saved by :meth:`LearnedEncoder.save` (weights only, no code is unpickled)."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"No encoder file {str(path)!r}. Train one with `enc = bs.tl.train_encoder(slides)` and "
            "`enc.save(path)`."
        )
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an encoder saved by `LearnedEncoder.save` (format {FORMAT!r}); "
            "for a plain state dict use `bs.encoders.TorchEncoder(module, weights=path)`."
        )
    config = blob["config"]
    net = small_cnn(tuple(int(w) for w in config["widths"]))
    net.load_state_dict(blob["state_dict"])
    return LearnedEncoder(net.eval(), config)
