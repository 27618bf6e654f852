"""Expression models: BiTro (network, bags, the whole training algorithm, transfer, checkpoints) and
the HEST-style baselines, behind one protocol.

Public names load lazily (``import bitro_sc.models`` does not import torch):

- :func:`fit` — train a :class:`BiTroModel` (the algorithm behind ``bs.tl.fit_bitro``);
- :func:`fit_cohort` — bulk training on slides streamed from their zarr stores, in one process or
  data-parallel over several (``strategy="ddp"``);
- :class:`BiTroModel` — a fitted model (``save`` / ``load``, ``predict_frame``);
- :class:`BaselineModel`, :func:`fit_baseline` — ridge / mean baselines (``bs.tl.fit_baseline``);
- :class:`ModelParams`, :class:`TrainParams` — architecture and training knobs;
- :class:`DataKeys` — where a model reads a slide (tables, features, phenotype, spot id, graph);
- :class:`ExpressionModel` — the protocol ``bs.tl.predict_bitro`` accepts (BiTro, baselines).

The low-level layer, for custom training loops and benchmarks: :class:`BiTroNet` (the network),
:class:`SlideCells` (one slide's cells: features, phenotypes, µm positions, graph, spot index),
:class:`SpotSet` / :class:`BulkSlide` (spot bags / a whole slide with its targets),
:func:`train` (the spot training loop) and :func:`slide_step` (one exact whole-slide step).

Modules: ``_params`` (knobs, keys), ``_data`` (slides → cell arrays and bags), ``_bags`` (bags →
PyG batches), ``_net`` (the network, pooling), ``_slide`` (whole slides: chunked exact gradient),
``_train`` (spot loop, training loop), ``_split`` (validation split, genes), ``_start`` (fresh
start), ``_deconv`` (deconvolution start), ``_transfer`` (everything about transfer), ``_fit``
(the algorithm), ``_model`` (BiTroModel), ``_baseline`` (ridge / mean), ``_protocol``.
"""

from __future__ import annotations

from .._lazy import attach

_EXPORTS = {
    "fit": "_fit",
    "fit_cohort": "_ddp",
    "BiTroModel": "_model",
    "BaselineModel": "_baseline",
    "fit_baseline": "_baseline",
    "DataKeys": "_params",
    "ModelParams": "_params",
    "TrainParams": "_params",
    "ExpressionModel": "_protocol",
    "BiTroNet": "_net",
    "SlideCells": "_bags",
    "SpotSet": "_bags",
    "BulkSlide": "_bags",
    "train": "_train",
    "slide_step": "_slide",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
