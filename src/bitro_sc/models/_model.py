"""`BiTroModel`: the trained network with everything needed to apply it to a new slide."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _keys as K
from .. import _sdata
from ._bags import Partition, SlideCells, spatial_chunks
from ._data import FeatureStats, slide_cells
from ._params import DataKeys, ModelParams, TrainParams
from ._preprocess import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from spatialdata import SpatialData

    from ..encoders import FeatureScaler
    from ._net import BiTroNet

_FORMAT = "bitro_sc.BiTroModel/1"
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"
#: LoRA targets: input projection, attention q / v / out and the feed-forward layers. The GAT layers
#: (torch_geometric ``GATConv``) are not adapted: peft cannot target their linear maps by module type,
#: so under the "lora" policy they stay frozen with the rest of the base.
LORA_TARGETS = r"^(in_proj|blocks\.\d+\.(q|v|out|ff1|ff2))$"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class BiTroModel:
    """A fitted BiTro model: network weights, genes, input scaling and run record.

    Returned by :func:`bitro_sc.tl.fit_bitro`; applied with :func:`bitro_sc.tl.predict_bitro`;
    saved with :meth:`save` (safetensors weights + JSON config) and restored with :meth:`load`.

    Attributes
    ----------
    genes
        Genes predicted, in column order.
    level
        Level the model was trained on (``"spot"`` or ``"bulk"``).
    levels
        Levels it can predict: ``("spot", "bulk", "cell")``.
    record
        Run record (config, genes, HVGs, keys, split, history, parameter counts, matched / new genes).
    preprocessing
        The preprocessing of the training features (encoder identity, feature scaler, phenotype
        k-means, assignment and graph parameters; ``None`` for models saved before it was recorded).
        Every prediction refuses features of another encoder, re-standardises features scaled with
        other statistics and re-assigns missing or foreign phenotypes with the training k-means.
    keys
        The :class:`~bitro_sc.models.DataKeys` it was trained on (``record["keys"]``; the defaults
        for models saved before keys were recorded): predictions read the same keys unless told
        otherwise.
    """

    levels: tuple[str, ...] = K.PREDICT_LEVELS

    def __init__(
        self,
        net: BiTroNet,
        *,
        genes: list[str],
        level: str,
        stats: FeatureStats,
        phenotypes: list[str],
        params: ModelParams,
        train_params: TrainParams,
        bag_cells: float,
        lora: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        record: dict[str, Any] | None = None,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.net = net
        self.genes = list(genes)
        self.level = level
        self.stats = stats
        self.phenotypes = list(phenotypes)
        self.params = params
        self.train_params = train_params
        self.bag_cells = float(bag_cells)
        self.lora = lora
        self.meta = meta or {}
        self.record: dict[str, Any] = record or {"genes": list(genes), "hvgs": []}
        self.preprocessing = preprocessing

    def __repr__(self) -> str:
        lora = ", LoRA" if self.lora else ""
        return (
            f"BiTroModel(level={self.level!r}, {len(self.genes)} genes, {self.n_features} features, "
            f"{len(self.phenotypes)} phenotypes{lora})"
        )

    @property
    def n_features(self) -> int:
        return int(self.stats.mean.shape[0])

    @property
    def window_cells(self) -> int:
        """Cells per attention window on a whole slide: the training chunk size of a bulk model, the
        mean number of cells per spot of a spot model."""
        if self.level == "bulk":
            return int(self.train_params.chunk_cells)
        return max(round(self.bag_cells), 1)

    @property
    def feature_scaler(self) -> FeatureScaler | None:
        """The training feature scaler (``bs.tl.cell_features(slide, scaler=model.feature_scaler)``)."""
        return self.preprocessing.feature_scaler if self.preprocessing is not None else None

    @property
    def phenotype_model(self) -> Any:
        """The training phenotype k-means (``bs.tl.phenotypes(slide, model=model.phenotype_model)``)."""
        return self.preprocessing.phenotype_model if self.preprocessing is not None else None

    @property
    def keys(self) -> DataKeys:
        return DataKeys.coerce(self.record.get("keys"))

    @property
    def history(self) -> pd.DataFrame:
        """Training history (one row per epoch: train_loss, val_loss)."""
        return pd.DataFrame(self.record.get("history", {}))

    # ------------------------------------------------------------------------------------------
    def _inputs(
        self,
        sdata: SpatialData,
        *,
        need_spots: bool,
        keys: DataKeys | None = None,
        **key_overrides: str | None,
    ) -> SlideCells:
        return slide_cells(
            sdata,
            stats=self.stats,
            phenotypes=self.phenotypes,
            need_graph=self.params.gat_layers > 0,
            need_spots=need_spots,
            keys=(keys or self.keys).replace(**key_overrides),
            prep=self.preprocessing,
            need_phenotypes=bool(self.phenotypes)
            and (self.params.phenotype_dim > 0 or bool(self.params.phenotype_profiles)),
        )

    def _scale_for(self, level: str, bag_cells: float) -> float:
        """Factor for predicting at another level than trained with plain sum-like pooling: per-cell
        values are shares of the training bag, so a bag of another size is rescaled by the size
        ratio (not needed with mean pooling or the RNA-content head, nor for whole slides with
        ``slide_size_norm``, which the network scales itself)."""
        p = self.params
        if p.pooling == "mean" or p.normalized or level == self.level or bag_cells <= 0:
            return 1.0
        if level == "bulk" and p.slide_size_norm and p.pooling == "sum":
            return 1.0
        return self.bag_cells / bag_cells

    def predict_arrays(
        self,
        sdata: SpatialData,
        *,
        level: Literal["spot", "bulk", "cell"] = "spot",
        device: str | torch.device | None = None,
        keys: DataKeys | None = None,
        table_key: str | None = None,
        cells_key: str | None = None,
        out: Any = None,
    ) -> np.ndarray:
        """Predictions (counts per 1e4) as an array: spot-table rows (spot; NaN rows for spots without
        cells), one slide profile (bulk, shape ``(1, genes)``) or cells-table rows (cell).

        ``out`` (``level="cell"`` only): an array-like of shape cells × genes (float32, NaN fill)
        with slice assignment, e.g. a zarr array chunked by rows, that receives the predictions
        block by block (only a band of rows is ever held in memory); it is returned."""
        keys = (keys or self.keys).replace(table_key=table_key, cells_key=cells_key)
        return self._predict(sdata, level=level, device=device, keys=keys, out=out)[0]

    def _predict(
        self,
        sdata: SpatialData,
        *,
        level: str,
        device: str | torch.device | None,
        keys: DataKeys,
        out: Any = None,
    ) -> tuple[Any, np.ndarray | None]:
        """(predictions, RNA content per cell or None); the RNA contents only for ``level="cell"``.
        ``out``: see :meth:`predict_arrays`."""
        import torch

        from ._sink import RowBlocks, sweep, window_first_rows
        from ._slide import slide_cell_values, with_depth
        from ._train import SPOT_BATCH, spot_values

        _sdata.check_level(level, K.PREDICT_LEVELS)
        if out is not None and level != "cell":
            raise ValueError(f"`out` is for level='cell' predictions only, not level={level!r}.")
        table_key = keys.table_key
        dev = resolve_device(device)
        net = self.net.to(dev).eval()
        if level == "spot":
            if table_key not in sdata.tables:
                raise KeyError(
                    f"The SpatialData object has no spot table {table_key!r}; predict `level='cell'`."
                )
            slide = self._inputs(sdata, need_spots=True, keys=keys)
            n_spots = sdata.tables[table_key].n_obs
            part = slide.spot_partition(n_spots)
            groups = np.flatnonzero(part.sizes() > 0)
            out = np.full((n_spots, len(self.genes)), np.nan, dtype=np.float32)
            prof = spot_values(net, slide, part, groups, device=dev, calibrate=self.level == "spot")
            mean_cells = float(part.sizes()[groups].mean()) if groups.size else 0.0
            out[groups] = prof * self._scale_for("spot", mean_cells)
            return out, None
        slide = self._inputs(sdata, need_spots=False, keys=keys)
        shape = (slide.n_cells, len(self.genes))
        if out is not None and tuple(out.shape) != shape:
            raise ValueError(f"`out` has shape {tuple(out.shape)}; the slide's cells × genes are {shape}.")
        if level == "bulk" or self.level == "bulk":
            part = slide.chunk_partition(self.window_cells)
            if level == "cell":
                target = out if out is not None else np.full(shape, np.nan, dtype=np.float32)
                sink = RowBlocks(target, scale=self._scale_for("bulk", slide.n_cells))
                rna = slide_cell_values(net, slide, part, device=dev, out=sink)[1]
                return target, rna
            values, rna = slide_cell_values(net, slide, part, device=dev)
            if rna is not None:
                profile = torch.from_numpy(values.sum(0, keepdims=True) / rna.sum()).to(dev)
                if self.level == "bulk":
                    with torch.no_grad():
                        n = torch.tensor([float(slide.n_cells)], device=dev)
                        profile = with_depth(net, profile, n)
                return profile.cpu().numpy(), None
            return values.sum(0, keepdims=True) * self._scale_for("bulk", slide.n_cells), None
        # cell level, spot-trained model: spot cells in their spot's window, others in small chunks
        n_spots = sdata.tables[table_key].n_obs if table_key in sdata.tables else 0
        values = out if out is not None else np.full(shape, np.nan, dtype=np.float32)
        sink = RowBlocks(values)
        rna_all = np.full(slide.n_cells, np.nan, dtype=np.float32) if self.params.normalized else None
        windows = []  # each partition holds only its own cells: spot cells, then the others
        if n_spots and (slide.spot_index >= 0).any():
            part = slide.spot_partition(n_spots)
            windows.append((part, np.flatnonzero(part.sizes() > 0)))
        outside = np.flatnonzero(slide.spot_index < 0)
        if outside.size:
            group = np.full(slide.n_cells, -1, dtype=np.int64)
            group[outside] = spatial_chunks(slide.xy_um[outside], self.window_cells)
            part = Partition.build(group, int(group.max()) + 1, slide.graph)
            windows.append((part, np.arange(part.n_groups)))
        batches = []  # batches of SPOT_BATCH windows, visited in order of their smallest cell row
        for part, groups in windows:
            first = window_first_rows(part.order, part.cell_ptr)
            for start in range(0, len(groups), SPOT_BATCH):
                chunk = groups[start : start + SPOT_BATCH]
                batches.append((int(first[chunk].min()), (part, chunk)))
        for part, chunk in sweep(batches, sink):
            spot_values(net, slide, part, chunk, device=dev, cells_out=sink, rna_out=rna_all)
        return values, rna_all

    def predict_cells_into(
        self,
        out: Any,
        sdata: SpatialData,
        *,
        keys: DataKeys | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray | None:
        """Cell-level predictions written into ``out`` (cells-table rows × :attr:`genes`, float32,
        NaN fill; e.g. a zarr array chunked by rows) block by block, holding only a band of rows
        in memory; returns the cells' RNA contents (``None`` without the RNA-content head). The
        values are those of ``predict_frame(sdata, level="cell")``, bit for bit."""
        return self._predict(sdata, level="cell", device=device, keys=keys or self.keys, out=out)[1]

    def predict_frame(
        self,
        sdata: SpatialData,
        *,
        level: Literal["spot", "bulk", "cell"] = "spot",
        keys: DataKeys | None = None,
        device: str | torch.device | None = None,
        table_key: str | None = None,
        bulk_key: str | None = None,
        cells_key: str | None = None,
    ) -> pd.DataFrame:
        """Predictions (counts per 1e4, not log) as a DataFrame, rows = obs_names of the target table.

        ``keys``: where to read the slide (default: :attr:`keys`, those of training); ``table_key``,
        ``bulk_key`` and ``cells_key`` override single keys. ``level="bulk"``: rows = the slide's bulk
        table (other samples' rows NaN), or one row named after the slide's ``sample_id`` when it has
        no bulk table. See :class:`~bitro_sc.models.ExpressionModel`.
        """
        keys = (keys or self.keys).replace(table_key=table_key, bulk_key=bulk_key, cells_key=cells_key)
        values, rna = self._predict(sdata, level=level, device=device, keys=keys)
        if level == "spot":
            index = sdata.tables[keys.table_key].obs_names
        elif level == "cell":
            index = sdata.tables[keys.cells_key].obs_names
        elif keys.bulk_key in sdata.tables:
            table = sdata.tables[keys.bulk_key]
            full = np.full((table.n_obs, len(self.genes)), np.nan, dtype=np.float32)
            full[_sdata.bulk_row(sdata, bulk_key=keys.bulk_key)] = values[0]
            values, index = full, table.obs_names
        else:
            index = pd.Index([_sdata.sample_id(sdata)])
        frame = pd.DataFrame(values, index=pd.Index(index).astype(str), columns=pd.Index(self.genes))
        if rna is not None:
            frame.attrs["rna_content"] = rna
        return frame

    # ------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the weights)."""
        return _sdata.jsonable(
            {
                "format": _FORMAT,
                "genes": self.genes,
                "level": self.level,
                "n_features": self.n_features,
                "phenotypes": self.phenotypes,
                "feature_mean": self.stats.mean,
                "feature_std": self.stats.std,
                "model": self.params.to_dict(),
                "train": self.train_params.to_dict(),
                "bag_cells": self.bag_cells,
                "lora": self.lora,
                "meta": self.meta,
                "record": self.record,
                "preprocessing": self.preprocessing.to_dict() if self.preprocessing is not None else None,
                "package_version": _package_version(),
            }
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path/model.safetensors`` (weights, LoRA adapters included) and ``path/config.json``
        (with the weights' SHA-256), each atomically (a temporary file moved into place)."""
        from ._files import write_model

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; pass a folder path to save the model in.")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass `overwrite=True` or another path.")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        write_model(path, state, self.config(), weights=_WEIGHTS, config_name=_CONFIG)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = "cpu") -> BiTroModel:
        """Restore a model written by :meth:`save`.

        Refused with the reason: a truncated or corrupted file, weights that do not match the
        checksum in the config, a config of another format or architecture, one written by a newer
        bitro_sc, feature statistics whose length differs from the model's input width.
        """
        from ._files import load_bitro

        return load_bitro(cls, Path(path), device=device, weights=_WEIGHTS, config_name=_CONFIG, fmt=_FORMAT)


def _package_version() -> str:
    from .. import __version__

    return str(__version__)


def build_net(
    *,
    n_features: int,
    n_phenotypes: int,
    n_genes: int,
    params: ModelParams,
    lora: dict[str, Any] | None = None,
) -> BiTroNet:
    """A fresh network, with LoRA adapters injected when ``lora`` (a peft ``LoraConfig`` dict) is given."""
    from ._net import BiTroNet

    net = BiTroNet(n_features=n_features, n_phenotypes=n_phenotypes, n_genes=n_genes, params=params)
    if lora:
        inject_lora(net, lora)
    return net


def lora_config(params: ModelParams) -> dict[str, Any]:
    return {
        "r": params.lora_r,
        "lora_alpha": params.lora_alpha,
        "lora_dropout": params.lora_dropout,
        "target_modules": LORA_TARGETS,
    }


def inject_lora(net: BiTroNet, lora: dict[str, Any]) -> None:
    """Inject peft LoRA adapters into ``net`` in place (all non-adapter weights become frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(**lora), net)
