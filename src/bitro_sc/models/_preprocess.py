"""The preprocessing a fitted model owns: encoder identity, feature scaler, phenotype k-means, and the
parameters of spot assignment and the cell graph.

:class:`Preprocessing` is read from the training slides at fit time (and checked to be one and the
same on all of them), stored in the model (and its saved config), and applied on every slide the
model predicts: features computed with another encoder or other settings are refused with the call
that fixes them; features standardised with other statistics are re-standardised from their raw
values with the training scaler; phenotypes that are missing, or that come from another k-means, are
re-assigned with the training k-means. Each correction is logged (logger ``"bitro_sc"``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _sdata
from ._params import DataKeys

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..encoders import FeatureScaler

logger = logging.getLogger("bitro_sc")

#: fields of ``uns["bitro_features"]`` that identify the encoder (the scaler is handled apart)
IDENTITY = ("encoder", "feature_names", "fov_um", "stains")


def features_record(cells: AnnData, keys: DataKeys) -> dict[str, Any] | None:
    """How ``obsm[keys.features_key]`` was computed (encoder identity and scaler), or ``None``."""
    params = cells.uns.get(keys.features_params)
    if not isinstance(params, Mapping):
        return None
    rec: dict[str, Any] = {"encoder": str(params.get("encoder", ""))}
    if params.get("feature_names") is not None:
        rec["feature_names"] = [str(v) for v in params["feature_names"]]
    if params.get("fov_um") is not None:
        rec["fov_um"] = float(params["fov_um"])
    if params.get("stains"):
        rec["stains"] = str(params["stains"])
    scaler = params.get("scaler")
    if isinstance(scaler, Mapping) and "mean" in scaler and "scale" in scaler:
        from ..encoders import FeatureScaler

        rec["scaler"] = FeatureScaler.from_any(scaler).to_dict()
    return rec


def phenotype_record(cells: AnnData, keys: DataKeys) -> dict[str, Any] | None:
    """The k-means behind ``obs[keys.phenotype_key]`` (``bs.tl.phenotypes``), or ``None``."""
    params = cells.uns.get(keys.phenotype_key)
    if not isinstance(params, Mapping) or params.get("cluster_centers") is None:
        return None
    return {
        "n_clusters": int(params.get("n_clusters", len(params["cluster_centers"]))),
        "algorithm": str(params.get("algorithm", "KMeans")),
        "cluster_centers": np.asarray(params["cluster_centers"], dtype=np.float32),
    }


def _differences(model: Mapping[str, Any], slide: Mapping[str, Any]) -> list[str]:
    """Identity fields recorded on both sides that differ, as ``"name: model vs slide"``."""
    out = []
    for name in IDENTITY:
        a, b = model.get(name), slide.get(name)
        if a in (None, "", []) or b in (None, "", []):
            continue
        same = bool(np.isclose(a, b)) if name == "fov_um" else a == b
        if not same:
            if name == "feature_names":
                a, b = f"{len(a)} names ({a[0]}, …)", f"{len(b)} names ({b[0]}, …)"
            out.append(f"{name}: {a!r} (model) vs {b!r} (slide)")
    return out


def _same_scaler(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return True  # nothing to compare: features were not made by `bs.tl.cell_features`
    return bool(
        np.shape(a["mean"]) == np.shape(b["mean"])
        and np.array_equal(a["mean"], b["mean"])
        and np.array_equal(a["scale"], b["scale"])
    )


def _same_centres(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    ca, cb = np.asarray(a["cluster_centers"]), np.asarray(b["cluster_centers"])
    return ca.shape == cb.shape and np.array_equal(ca, cb)


@dataclass
class Preprocessing:
    """What a model needs to turn a slide's cells into its inputs, as it was at fit time.

    Attributes
    ----------
    features
        Encoder identity (``encoder``, ``feature_names``, ``fov_um``, ``stains``) and ``scaler``
        (``mean``, ``scale``, ``n_cells``, ``n_slides``) of ``bs.tl.cell_features``; empty when the
        training features carried no record.
    phenotypes
        The phenotype k-means (``n_clusters``, ``algorithm``, ``cluster_centers``), or ``None``.
    assign
        ``bs.tl.assign_cells`` parameters (``spots_key``), or ``None``.
    graph
        ``bs.tl.cell_graph`` parameters (``n_neighbors`` or ``radius``), or ``None``.
    """

    features: dict[str, Any]
    phenotypes: dict[str, Any] | None = None
    assign: dict[str, Any] | None = None
    graph: dict[str, Any] | None = None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_slides(
        cls, slides: Sequence[SpatialData], keys: DataKeys, *, phenotypes: bool = True
    ) -> Preprocessing:
        """The preprocessing shared by the training ``slides``; an error naming the fix when the slides
        were featurised, standardised or (with ``phenotypes``) clustered differently."""
        tables = [_sdata.cells_table(s, keys.cells_key, features_key=keys.features_key) for s in slides]
        feats = [features_record(t, keys) or {} for t in tables]
        for i, f in enumerate(feats[1:], start=1):
            diff = _differences(feats[0], f)
            if diff:
                raise ValueError(
                    f"Training slides 0 and {i} were featurised differently ({'; '.join(diff)}): a model "
                    "needs one encoder. Run `bs.tl.cell_features(slides, overwrite=True)` on all training "
                    "slides together."
                )
            if not _same_scaler(feats[0].get("scaler"), f.get("scaler")):
                raise ValueError(
                    f"The features of training slides 0 and {i} were standardised with different "
                    "statistics (per-slide scaling), so the same value means different things on them. "
                    "Run `bs.tl.cell_features(slides, overwrite=True)` on all training slides together "
                    "(one scaler), then `bs.tl.phenotypes(slides, overwrite=True)`."
                )
        phen = [
            phenotype_record(t, keys) if phenotypes and keys.phenotype_key in t.obs else None for t in tables
        ]
        for i, p in enumerate(phen[1:], start=1):
            if p is not None and phen[0] is not None and not _same_centres(phen[0], p):
                raise ValueError(
                    f"The phenotypes of training slides 0 and {i} come from different k-means models, so "
                    f"phenotype '0' means different cells on them. Run `bs.tl.phenotypes(slides, "
                    "overwrite=True)` on all training slides together."
                )
        graph = tables[0].uns.get(f"{keys.graph_key}_neighbors")
        graph_params = dict(graph["params"]) if isinstance(graph, Mapping) and "params" in graph else None
        assign = tables[0].uns.get("bitro_assign")
        spots_key = assign.get("spots_key") if isinstance(assign, Mapping) else None
        return cls(
            features=feats[0],
            phenotypes=phen[0] if all(p is not None for p in phen) else None,
            assign={"spots_key": str(spots_key)} if spots_key else None,
            graph={k: graph_params[k] for k in ("n_neighbors", "radius") if k in graph_params}
            if graph_params
            else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (:meth:`from_dict` reads it back exactly)."""
        return _sdata.jsonable(
            {
                "features": self.features,
                "phenotypes": self.phenotypes,
                "assign": self.assign,
                "graph": self.graph,
            }
        )

    @classmethod
    def from_dict(cls, value: Mapping[str, Any] | None) -> Preprocessing | None:
        if not value:
            return None
        feats = dict(value.get("features") or {})
        if feats.get("scaler"):
            from ..encoders import FeatureScaler

            feats["scaler"] = FeatureScaler.from_any(feats["scaler"]).to_dict()
        phen = value.get("phenotypes")
        if phen:
            phen = dict(phen)
            phen["cluster_centers"] = np.asarray(phen["cluster_centers"], dtype=np.float32)
        return cls(
            features=feats, phenotypes=phen or None, assign=value.get("assign"), graph=value.get("graph")
        )

    # --- the fitted objects ---------------------------------------------------------------------
    @property
    def feature_scaler(self) -> FeatureScaler | None:
        """The training :class:`~bitro_sc.encoders.FeatureScaler` (``bs.tl.cell_features(scaler=)``)."""
        from ..encoders import FeatureScaler

        sc = self.features.get("scaler")
        if not sc:
            return None
        return FeatureScaler(
            mean=np.asarray(sc["mean"], dtype=np.float64),
            scale=np.asarray(sc["scale"], dtype=np.float64),
            feature_names=list(self.features.get("feature_names", [])),
            encoder=str(self.features.get("encoder", "")),
            n_cells=int(sc.get("n_cells", 0)),
            n_slides=int(sc.get("n_slides", 0)),
            stains=str(self.features.get("stains", "")),
        )

    @property
    def phenotype_model(self) -> Any:
        """The training phenotype k-means, rebuilt from its centres (``bs.tl.phenotypes(model=)``)."""
        if not self.phenotypes:
            return None
        from sklearn.cluster import KMeans, MiniBatchKMeans
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

        centres = np.asarray(self.phenotypes["cluster_centers"], dtype=np.float32)
        kind = MiniBatchKMeans if self.phenotypes.get("algorithm") == "MiniBatchKMeans" else KMeans
        km = kind(n_clusters=len(centres))
        km.cluster_centers_ = centres
        km.n_features_in_ = centres.shape[1]
        km._n_threads = _openmp_effective_n_threads()
        names = self.features.get("feature_names")
        km.bitro_feature_names_ = list(names) if names else None
        return km

    def encoder_call(self, *, sdata: str = "sdata", features_key: str = "X_bitro") -> str | None:
        """The ``bs.tl.cell_features`` call that reproduces the training features on a new slide, or
        ``None`` when the encoder is unknown."""
        name = self.features.get("encoder")
        if not name:
            return None
        enc = repr(name)
        if name == "morphology" and self.features.get("stains"):
            enc = f"bs.encoders.MorphologyEncoder(stains={self.features['stains']!r})"
        elif name == "niche" and self.features.get("stains"):
            morph = f"bs.encoders.MorphologyEncoder(stains={self.features['stains']!r})"
            enc = f"bs.encoders.NicheEncoder(base={morph})"
        elif name.startswith("timm:"):
            enc = f"{name!r}, weights=<the weights file>"
        elif name not in ("morphology", "niche"):
            enc = f"<the {name!r} encoder>"
        fov = f", fov_um={self.features['fov_um']:g}" if "fov_um" in self.features else ""
        key = "" if features_key == "X_bitro" else f", key_added={features_key!r}"
        scaler = "model.feature_scaler" if "scaler" in self.features else "<the training slides>"
        return f"bs.tl.cell_features({sdata}, encoder={enc}{fov}, scaler={scaler}{key}, overwrite=True)"

    # --- applying it ----------------------------------------------------------------------------
    def check_features(self, cells: AnnData, keys: DataKeys) -> None:
        """Refuse features computed with another encoder or other encoder settings."""
        slide = features_record(cells, keys)
        if slide is None or not self.features:
            return
        diff = _differences(self.features, slide)
        if diff:
            call = (
                self.encoder_call(features_key=keys.features_key) or "`bs.tl.cell_features` with its encoder"
            )
            raise ValueError(
                f"The cell features of this slide (obsm[{keys.features_key!r}]) were computed differently "
                f"from the model's training features ({'; '.join(diff)}); predictions from them would be "
                f"meaningless. Recompute them with the model's encoder: {call}."
            )

    def check_graph(self, cells: AnnData, keys: DataKeys) -> None:
        """Refuse a cell graph built with other settings than the training slides' (the GAT
        aggregates over each cell's neighbours, so another ``k`` or radius shifts predictions
        silently). A kNN graph of a slide with at most ``k`` cells (``k`` clamped to ``n - 1``) and a
        graph without recorded settings are accepted."""
        if not self.graph:
            return
        rec = cells.uns.get(f"{keys.graph_key}_neighbors")
        slide = rec.get("params") if isinstance(rec, Mapping) else None
        if not isinstance(slide, Mapping):
            return
        want_k, want_r = self.graph.get("n_neighbors"), self.graph.get("radius")
        have_k, have_r = slide.get("n_neighbors"), slide.get("radius")
        units_um = slide.get("units") == "um"
        if want_r is not None:
            same = have_r is not None and units_um and bool(np.isclose(float(have_r), float(want_r)))
        elif want_k is not None:
            k = int(want_k)
            same = have_r is None and have_k is not None and int(have_k) in (k, min(k, cells.n_obs - 1))
        else:
            return
        if same:
            return

        def show(k: Any, r: Any, units: Any = "um") -> str:
            if r is not None:
                return f"radius {r:g} {'µm' if units == 'um' else '(units not recorded as µm)'}"
            return f"k={k} nearest neighbours"

        arg = f"radius_um={float(want_r):g}" if want_r is not None else f"k={k}"
        key = "" if keys.graph_key == "spatial" else f", key_added={keys.graph_key!r}"
        raise ValueError(
            f"The cell graph of this slide (obsp[{keys.connectivities!r}]) was built with "
            f"{show(have_k, have_r, slide.get('units'))}, the model's with {show(want_k, want_r)}; the "
            "graph attention layers would see other neighbours and predictions would shift silently. "
            "Rebuild the graph with the model's settings: "
            f"`bs.tl.cell_graph(sdata, {arg}{key}, overwrite=True)`."
        )

    def features_for(self, cells: AnnData, keys: DataKeys) -> tuple[np.ndarray, bool]:
        """``(features in the training scaling, unchanged)``: a slide standardised with other
        statistics is re-standardised from its raw values (``unchanged`` is then ``False``)."""
        x = np.asarray(cells.obsm[keys.features_key])
        self.check_features(cells, keys)
        own = (features_record(cells, keys) or {}).get("scaler")
        ref = self.features.get("scaler")
        if (
            _same_scaler(ref, own)
            or own is None
            or ref is None
            or np.shape(own["mean"]) != np.shape(ref["mean"])
        ):
            return x, True
        logger.info(
            "The slide's features were standardised with other statistics than the model's training "
            "features: re-standardising them from their raw values with the model's scaler."
        )
        from ..encoders import FeatureScaler

        raw = FeatureScaler.from_any(own).inverse_transform(x)
        return FeatureScaler.from_any(ref).transform(raw), False

    def phenotype_labels(
        self, cells: AnnData, keys: DataKeys, x: np.ndarray, unchanged: bool
    ) -> np.ndarray | None:
        """Phenotype labels from the training k-means where the slide's own are missing or come from
        another k-means (or from features in another scaling); ``None``: use ``obs`` as it is."""
        if not self.phenotypes:
            return None
        present = keys.phenotype_key in cells.obs
        if present and unchanged and _same_centres(self.phenotypes, phenotype_record(cells, keys)):
            return None
        reason = (
            "the slide has no phenotypes"
            if not present
            else "the slide's phenotypes come from another k-means or from features in another scaling"
        )
        logger.info(
            "%s: assigning them with the model's phenotype k-means (obs not changed).", reason.capitalize()
        )
        if len(x) == 0:
            return np.zeros(0, dtype=object)
        labels = self.phenotype_model.predict(np.ascontiguousarray(x, dtype=np.float32))
        return labels.astype(str).astype(object)
