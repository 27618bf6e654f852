"""Knobs of the BiTro model and of its training loop (frozen dataclasses that accept dicts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_type_hints

from .. import _keys as K
from .. import _sdata

_P = TypeVar("_P", bound="_Params")


class _Params:
    """Shared constructor / validation for the parameter dataclasses."""

    @classmethod
    def coerce(cls: type[_P], value: _P | Mapping[str, Any] | None) -> _P:
        """``value`` as an instance: ``None`` → defaults, a mapping → fields (unknown keys are an error)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            unknown = sorted(set(value) - names)
            if unknown:
                raise TypeError(
                    f"Unknown {cls.__name__} field(s) {unknown}; valid fields are {sorted(names)}."
                )
            return cls(**dict(value))
        raise TypeError(f"Expected a {cls.__name__}, a dict or None; got {type(value).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            hint = hints[f.name]
            if getattr(hint, "__origin__", None) is Literal and value not in get_args(hint):
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be one of {list(get_args(hint))}, got {value!r}."
                )
            if isinstance(value, list):  # keep the dataclass hashable / frozen
                object.__setattr__(self, f.name, tuple(value))


@dataclass(frozen=True)
class ModelParams(_Params):
    """Architecture of the BiTro network.

    Parameters
    ----------
    hidden
        Width of the cell embedding (64 by default: a few hundred training spots overfit wider
        networks within a few epochs; see ``benchmarks/results/accuracy.md``).
    phenotype_dim
        Size of the phenotype embedding (0: phenotypes unused).
    pos_wavelengths_um
        Wavelengths (µm) of the sin/cos encoding of a cell's position relative to the centroid of
        its attention window (its spot, or its chunk of a slide). Empty (default): no position
        input. On synthetic spots the within-spot position only added noise features (mean spot
        Pearson over 4 held-out slides 0.315 without, 0.294 with 100-400 µm wavelengths;
        ``benchmarks/results/accuracy.md``); give wavelengths where the layout inside a window
        matters.
    gat_layers, gat_heads, gat
        Graph attention over the cell graph inside a bag (``"gat"`` = ``GATConv``,
        ``"gatv2"`` = ``GATv2Conv``); residual connection and LayerNorm after each layer.
        ``gat_layers=0`` skips the graph (no ``obsp`` graph needed).
    transformer_layers, transformer_heads, ff_mult
        Pre-norm Transformer encoder over the cells of a bag (explicit q/k/v/out ``nn.Linear``).
    dropout
        Dropout in the Transformer and the input projection. 0.3 (default) rather than 0.1:
        cell-level median Pearson vs truth 0.64 / 0.595 instead of 0.62 / 0.57 on two synthetic
        draws (plain sums; ``benchmarks/results/accuracy.md``), spot level equal.
    activation
        Non-negative per-cell output: ``"exp"`` (log-linear, default) or ``"softplus"``; a learnable
        per-gene bias lets predictions go below the mean.
    pooling
        MIL pooling of cells into a bag: ``"sum"`` (default), ``"mean"`` or gene-wise ``"attention"``
        (cell weights ``n · softmax`` per gene, so a bag's cell contributions still sum to it).
    rna_head
        With ``pooling="sum"``: each cell also predicts its RNA content ``r > 0`` and its
        expression ``y = r · p`` (``p``: the cell's profile in counts per 10k); a bag's profile is
        ``Σ y / Σ r`` times a learned per-gene depth factor ``(n / n̄) ** β`` (see
        :meth:`BiTroNet.depth_factor`), i.e. the summed expression of its cells library-normalised
        like the target. At spot level ``Σ r`` is also tied to each spot's library size
        (``TrainParams.library_weight``). ``None`` (default): on for spots, off for whole slides.
        Measured on synthetic spots (``benchmarks/results/accuracy.md``, 4 slides of 2000 µm,
        leave-one-slide-out, two draws): cell-level median Pearson vs truth 0.72 / 0.65 with it,
        0.64 / 0.595 with plain sums, spot level equal. ``False``: the plain sum ``Σ y`` is
        compared with the normalised target, and cell values are shares of their bag.
    linear_skip
        Add a linear map from each cell's input (features, phenotype embedding) straight to its
        log-expression, next to the deep path (zero-initialised). Measured with ``rna_head=True``
        on synthetic slides (``benchmarks/results/accuracy.md``): cell-level median Pearson vs
        truth 0.479 instead of 0.392 (seed-0 slides) and 0.416 instead of 0.393 (seed-1 slides),
        spot level +0.017 / -0.011, HER2ST within noise; but a spot model trained from scratch
        then beats LoRA transfer from a bulk base, so it is off by default.
    linear_start
        How a fresh network's linear parts start. ``"ridge"`` (default): a ridge regression of the
        training bags' log1p targets on their mean cell features and ``log1p`` cell count is solved
        in closed form (penalty by grouped cross-validation, as the ``"ridge"`` baseline;
        :func:`bitro_sc.models._linear.ridge_start`); at spot level each gene's depth exponent
        (RNA-content head) starts at the ridge's cell-count effect, and the linear skip (when on)
        at its feature weights, so training starts from the ridge fit and the deep path adds to
        it. ``"constant"``: depth exponents at 1 for spots (:data:`~bitro_sc.models._net.DEPTH_INIT`)
        and a zero skip. With phenotype profiles (their deconvolution start already explains the
        bags) the skip starts at zero. Measured on HER2ST (morphology, leave-one-section-out, 3
        seeds, ``benchmarks/results/encoders.md``): ``"ridge"`` raised the marker-panel Pearson
        from 0.273 to 0.307 (ridge baseline 0.328), HEST score unchanged on average (0.154; lower
        on 2 of 4 held-out sections); on the synthetic spot benchmark (4 slides, seed 0,
        ``benchmarks/results/accuracy.md``) spot Pearson 0.424 vs 0.425 and cell level 0.709 vs
        0.718 with ``"constant"``. Needs at least 2 training spots.
    bag_linear
        A bag-level linear term: every bag's profile is multiplied by ``expm1(a + B x̄ + c log1p(n))``
        (``x̄`` the mean features of its cells, ``n`` its cells; per gene ``a``, ``B``, ``c``) and
        the cells' values by the same with ``n`` at the average training bag's size, so the network
        models what a ridge on bag-mean features misses. With ``linear_start="ridge"`` it starts at
        that ridge fit **exactly** (a closed-form ridge of the bags' log1p targets, as the
        ``"ridge"`` baseline), the deep path at a constant 1 and the depth exponents at 0: training
        starts from the ridge baseline's spot predictions in the quantity the loss fits. The
        level is capped at the highest training bag's log1p target + 1 (no runaway
        extrapolation on unusual windows). Transfer from a base model drops the term.
        ``None`` / ``"auto"`` (default): for spots with ``linear_start="ridge"`` and no phenotype
        profiles, chosen by validation: the network is trained with and without the term on the
        training bags and the one with the lower validation loss is kept (and refitted), so a
        fit costs one more training run; without validation bags, and elsewhere, off. Measured
        (``benchmarks/results/encoders.md``, 2026-12-05): on HER2ST (morphology, 3 seeds) the term
        forced on raised the marker-panel Pearson from 0.307 to 0.337 (ridge 0.328) and lowered the
        HEST score from 0.154 to 0.143 (ridge 0.139); on synthetic spots it lowered the spot score
        from 0.424 to 0.395 and the cell level from 0.709 to 0.479 (the cells of a spot share its
        linear level, and the deep path learns less), hence the choice by validation: ``"auto"``
        gave 0.334 markers / 0.145 HEST on HER2ST (term chosen in 11 of 12 fits) and 0.424 / 0.709
        on the synthetic spots (never chosen).
    phenotype_profiles
        A table of per-phenotype log-profiles added to every cell's log-expression, started by a
        deconvolution of the training bags before the first step: each gene's non-negative least
        squares fit of the bag targets on the bags' cell counts per phenotype (``bs.tl.phenotypes``),
        so the network starts from "a cell expresses its phenotype's profile" and learns the rest.
        ``None`` (default): on for whole-slide (bulk) training, off for spots. Measured
        (``benchmarks/results/accuracy.md``): on synthetic bulk (30 training / 10 held-out slides)
        the mean per-gene Pearson across held-out slides rose from 0.107 to 0.185 (ridge 0.144)
        and cell maps from bulk-only training from 0.14 to 0.30 against the truth; on synthetic
        spots it lowered the spot score (0.285 with the deconvolution start, 0.303 without it, vs
        0.315 with no profiles; 4 held-out slides). Needs ``activation="exp"``.
    slide_size_norm
        With ``pooling="sum"`` (no RNA-content head), scale a whole slide's sum of cell values by
        ``n̄ / n`` (``n`` its cells, ``n̄`` those of an average training bag): a bulk library is
        normalised to counts per 10k whatever the size of the slide, so the plain sum would
        predict more of every gene on bigger slides. Spots are unaffected (the log1p of sparse spot
        counts does grow with the spot's cells). ``True`` by default; checkpoints written before
        it load with ``False``.
    lora_r, lora_alpha, lora_dropout
        LoRA adapters used for transfer (``policy="lora"``).
    """

    hidden: int = 64
    phenotype_dim: int = 16
    pos_wavelengths_um: tuple[float, ...] = ()
    gat_layers: int = 2
    gat_heads: int = 4
    gat: Literal["gat", "gatv2"] = "gat"
    transformer_layers: int = 2
    transformer_heads: int = 8
    ff_mult: int = 2
    dropout: float = 0.3
    activation: Literal["exp", "softplus"] = "exp"
    pooling: Literal["sum", "mean", "attention"] = "sum"
    rna_head: bool | None = None
    linear_skip: bool = False
    linear_start: Literal["ridge", "constant"] = "ridge"
    bag_linear: bool | Literal["auto"] | None = None
    phenotype_profiles: bool | None = None
    slide_size_norm: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    @property
    def normalized(self) -> bool:
        """Whether bags pool as ``Σ y / Σ r`` (sum pooling with the RNA-content head)."""
        return self.pooling == "sum" and bool(self.rna_head)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "pos_wavelengths_um", tuple(float(w) for w in self.pos_wavelengths_um))
        if self.hidden % self.transformer_heads or self.hidden % max(self.gat_heads, 1):
            raise ValueError(
                f"ModelParams.hidden={self.hidden} must be divisible by transformer_heads="
                f"{self.transformer_heads} and gat_heads={self.gat_heads}."
            )
        if self.phenotype_profiles and self.activation != "exp":
            raise ValueError("ModelParams.phenotype_profiles needs activation='exp' (log-profiles add up).")
        if self.hidden < 1 or self.gat_layers < 0 or self.transformer_layers < 0:
            raise ValueError("ModelParams: hidden must be >= 1 and layer counts >= 0.")

    def resolved(self, level: str) -> ModelParams:
        """These parameters with the automatic (``None``) choices made for training at ``level``:
        ``phenotype_profiles`` on for whole-slide bags, ``rna_head`` on for spots, whose libraries
        supervise it (``benchmarks/results/accuracy.md``)."""
        params = self
        if params.phenotype_profiles is None:
            params = dataclasses.replace(params, phenotype_profiles=level == "bulk")
        if params.rna_head is None:
            params = dataclasses.replace(params, rna_head=level == "spot")
        if params.bag_linear in (None, "auto"):
            ok = level == "spot" and params.linear_start == "ridge" and not params.phenotype_profiles
            params = dataclasses.replace(params, bag_linear="auto" if ok else False)
        return params


@dataclass(frozen=True)
class TrainParams(_Params):
    """Training loop of `bs.tl.fit_bitro`.

    Parameters
    ----------
    epochs
        Maximum number of passes over the training bags.
    lr, weight_decay
        AdamW settings. ``lr=None`` (default): ``1e-3``, or ``3e-3`` when training LoRA adapters
        (``policy="lora"`` transfer; at ``1e-3`` the adapters trailed training from scratch in
        ``benchmarks/results/accuracy.md``).
    batch_size
        Spots per step (``level="spot"``); slides per step (``level="bulk"``).
    patience
        Early stopping: epochs without improvement of the validation loss (0: off). With the
        bag-level linear term (``ModelParams.bag_linear``) the start itself — the ridge fit —
        competes with every epoch: when no epoch lowers the validation loss below the start's, the
        start is kept (best epoch ``-1``; the refit then trains 0 epochs).
    loss
        ``"mse"`` on log1p counts-per-10k (default) or ``"poisson"`` on counts.
    chunk_cells
        Cells per attention window when a whole slide is one bag (exact chunked gradient).
    max_cells_per_spot
        Spots with more cells are subsampled to this many (random, per step) for training.
    drop_cells
        Probability of dropping each cell of a training spot at each step (at least one cell is
        kept; the depth factor still sees the spot's full number of cells): a MIL augmentation.
    grad_clip
        Gradient norm clip (0: off).
    refit
        After early stopping on the validation bags has chosen the number of epochs, train again
        from the start on all bags (training + validation) for that many epochs (default ``True``;
        nothing to do without a validation split). The validation history stays in the run record,
        the refit's losses are in ``record["refit"]``. It doubles the training time. Measured
        (``benchmarks/results/accuracy.md``): HER2ST leave-one-section-out 0.139 / 0.140 / 0.139
        over 3 seeds instead of 0.132 (seed 0); synthetic spots +0.004 to +0.007 spot score and
        +0.006 to +0.026 cell score; synthetic bulk 0.169 instead of 0.185 (ridge 0.144).
    library_weight
        Spot-level training with the RNA-content head (``ModelParams.rna_head``): weight of a
        second loss that ties each spot's summed cell RNA contents ``Σ r`` to its measured library
        size (squared log-ratio, the library in units of an average training cell's share). It
        is what makes ``r`` an RNA content rather than a free scale that trades off with the
        profiles. 0: off.
    gene_weights
        Spot-level training: ``"variance"`` weighs each gene's loss by the inverse variance of its
        log1p targets over the training spots (mean weight 1), so that every gene counts alike in
        the shared network as in a per-gene regression (with equal weights, the genes that vary
        most dominate the gradient); ``"none"`` (default): all genes alike.
    """

    LR: ClassVar[float] = 1e-3
    LORA_LR: ClassVar[float] = 3e-3

    epochs: int = 50
    lr: float | None = None
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 8
    loss: Literal["mse", "poisson"] = "mse"
    chunk_cells: int = 256
    max_cells_per_spot: int = 128
    drop_cells: float = 0.0
    grad_clip: float = 1.0
    refit: bool = True
    library_weight: float = 1.0
    gene_weights: Literal["none", "variance"] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        bad_lr = self.lr is not None and self.lr <= 0
        if self.epochs < 1 or self.batch_size < 1 or self.chunk_cells < 1 or bad_lr:
            raise ValueError("TrainParams: epochs, batch_size and chunk_cells must be >= 1 and lr > 0.")
        if not self.library_weight >= 0:
            raise ValueError(f"TrainParams.library_weight must be >= 0, got {self.library_weight!r}.")

    def resolved(self, *, lora: bool) -> TrainParams:
        """These parameters with ``lr=None`` made concrete: :data:`LORA_LR` when training LoRA
        adapters (they trail training from scratch at :data:`LR`), else :data:`LR`."""
        if self.lr is not None:
            return self
        return dataclasses.replace(self, lr=self.LORA_LR if lora else self.LR)


@dataclass(frozen=True)
class DataKeys:
    """Where a model reads its data on a slide: the keys of the tables and of their columns.

    Every field defaults to the data contract's name (:mod:`bitro_sc._keys`). A fitted model
    records the keys it was trained on (``record["keys"]``) and predicts with them unless told
    otherwise.

    Parameters
    ----------
    table_key, bulk_key, cells_key
        Spot table, bulk table (one row per slide) and cells table.
    features_key
        ``obsm`` of the cells table with the cell features (``bs.tl.cell_features(key_added=)``).
    phenotype_key
        ``obs`` column of the cells table with the phenotype (``bs.tl.phenotypes(key_added=)``).
    spot_key
        ``obs`` column of the cells table with each cell's spot (``bs.tl.assign_cells(key_added=)``).
    graph_key
        Prefix of the cell graph in ``obsp`` (``f"{graph_key}_connectivities"``,
        ``bs.tl.cell_graph(key_added=)``).
    """

    table_key: str = K.TABLE
    bulk_key: str = K.BULK
    cells_key: str = K.CELLS
    features_key: str = K.FEATURES
    phenotype_key: str = K.PHENOTYPE
    spot_key: str = K.SPOT_ID
    graph_key: str = K.SPATIAL

    @property
    def connectivities(self) -> str:
        """``obsp`` key of the cell graph's connectivities."""
        return f"{self.graph_key}_connectivities"

    @property
    def features_params(self) -> str:
        """``uns`` key of the cells table that records how the features were computed."""
        return _sdata.features_params_key(self.features_key)

    def target(self, level: str) -> str:
        """The table holding ``level`` (``"spot"``, ``"bulk"`` or ``"cell"``)."""
        return _sdata.level_table_key(
            level, table_key=self.table_key, bulk_key=self.bulk_key, cells_key=self.cells_key
        )

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def replace(self, **changes: str | None) -> DataKeys:
        """A copy with the given keys changed (``None`` values are ignored)."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    @classmethod
    def coerce(cls, value: DataKeys | Mapping[str, Any] | None) -> DataKeys:
        """``value`` as keys: ``None`` → defaults; a mapping (e.g. ``record["keys"]`` of a saved model)
        → its known fields (unknown entries are ignored, missing ones take the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: str(v) for k, v in value.items() if k in names})
        raise TypeError(f"Expected DataKeys, a dict or None; got {type(value).__name__}.")
