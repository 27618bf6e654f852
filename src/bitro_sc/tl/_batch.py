"""`bs.tl.run_batch`: prepare many slides, one zarr store per slide, resumable, optionally on a cluster.

Layout under ``stores``::

    <name>.zarr                 the finished slide: every element but the image (unless
                                ``write_image=True``); ``attrs["bitro_batch"]`` lists its steps
    .<name>.partial/<i>_<step>.pkl
                                checkpoint of a finished step of an unfinished slide: the elements that
                                step added or changed (tables always), pickled (writing a zarr store
                                per step costs seconds even for a tiny slide); made under a temporary
                                name and renamed when complete, so a checkpoint is whole or absent
    .<name>.partial/predictions.zarr
                                cell-level predictions, written by row blocks as they are computed
                                (``predict_bitro(store=...)``) and copied into ``<name>.zarr``

A resumed run skips slides whose store already holds every requested step, reloads the checkpoints
of an interrupted slide and goes on from its first unfinished step. A slide whose step raises is
reported as failed and the run goes on with the next slide; its finished steps stay checkpointed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _keys as K

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData

#: per-slide steps of a batch run, in this order
BATCH_STEPS = ("segment", "cell_features", "assign_cells", "cell_graph", "predict")
_ATTR = "bitro_batch"


@dataclass
class SlideJob:
    """One slide of a batch: its store name and how to read it (``reader(**kwargs)``).

    ``reader`` is the name of a ``bs.io`` reader (``"read_wsi"``, ``"read_visium"``, …) or a callable
    returning a SpatialData (it must be picklable to run on a cluster).
    """

    name: str
    reader: str | Callable[..., SpatialData]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def read(self) -> SpatialData:
        if callable(self.reader):
            return self.reader(**self.kwargs)
        from .. import io

        return getattr(io, self.reader)(**self.kwargs)


def _check_steps(steps: Sequence[str]) -> list[str]:
    bad = [s for s in steps if s not in BATCH_STEPS]
    if bad:
        raise ValueError(f"Unknown batch step(s) {bad}; batch steps are {list(BATCH_STEPS)} (in this order).")
    order = [BATCH_STEPS.index(s) for s in steps]
    if order != sorted(set(order)):
        raise ValueError(f"Batch steps must appear once each, in the order {list(BATCH_STEPS)}; got {steps}.")
    return list(steps)


def _run_step(sdata: SpatialData, step: str, params: Mapping[str, Any]) -> None:
    from . import assign_cells, cell_features, cell_graph, predict_bitro, segment

    kw = dict(params)
    if step == "segment":
        segment(sdata, progress=False, **{"overwrite": True, **kw})
    elif step == "cell_features":
        cell_features(sdata, progress=False, **{"overwrite": True, **kw})
    elif step == "assign_cells":
        assign_cells(sdata, **{"overwrite": True, **kw})
    elif step == "cell_graph":
        cell_graph(sdata, **{"overwrite": True, **kw})
    else:  # predict
        model = kw.pop("model")
        predict_bitro(sdata, model, **{"level": "cell", "overwrite": True, **kw})


def _elements(sdata: SpatialData, *, images: bool) -> dict[str, dict[str, Any]]:
    kinds = (
        ("images", "labels", "shapes", "points", "tables")
        if images
        else ("labels", "shapes", "points", "tables")
    )
    return {k: dict(getattr(sdata, k)) for k in kinds}


def _write(path: Path, elements: Mapping[str, Mapping[str, Any]], attrs: Mapping[str, Any]) -> None:
    """Write a SpatialData of ``elements`` to ``path`` atomically (temporary name, then rename)."""
    from spatialdata import SpatialData

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with (
        warnings.catch_warnings()
    ):  # zarr's notice about a future default, and tables of slides without cells
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        warnings.filterwarnings("ignore", message="The table is annotating.*not present")
        SpatialData(**{k: dict(v) for k, v in elements.items()}, attrs=dict(attrs)).write(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def _save_checkpoint(path: Path, elements: Mapping[str, Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump({k: dict(v) for k, v in elements.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _load_into(sdata: SpatialData, source: Path) -> None:
    """Add the elements of a checkpoint (``.pkl``, written by this module) or of a finished store."""
    if source.suffix == ".pkl":
        with source.open("rb") as f:
            saved = pickle.load(f)  # our own checkpoint of this slide, never foreign data
    else:
        from spatialdata import read_zarr

        store = read_zarr(source)
        saved = {k: dict(getattr(store, k)) for k in ("labels", "shapes", "points", "tables")}
    for kind in ("labels", "shapes", "points", "tables"):
        for name, element in saved.get(kind, {}).items():
            sdata[name] = element  # later checkpoints replace what earlier ones held


def _stored_steps(store: Path) -> list[str]:
    import zarr

    try:
        attrs: dict[str, Any] = dict(zarr.open_group(str(store), mode="r").attrs)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ValueError(
            f"{store} is not a readable zarr store ({err}); delete it so that the slide is redone."
        ) from err
    return list(attrs.get(_ATTR, {}).get("steps", []))


def process_slide(
    job: SlideJob,
    *,
    stores: str | Path,
    steps: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    write_image: bool = False,
) -> dict[str, Any]:
    """Run the missing ``steps`` of one slide and write its store; returns a summary row.

    Never raises for a failing step (the row says ``status="failed"`` and the error); ``KeyboardInterrupt``
    and other non-``Exception`` exits propagate, leaving the finished steps checkpointed.
    """
    t0 = time.perf_counter()
    started = time.time()
    params = params or {}
    stores = Path(stores)
    final = stores / f"{job.name}.zarr"
    partial = stores / f".{job.name}.partial"
    row: dict[str, Any] = {"slide": job.name, "status": "done", "steps_run": "", "steps_skipped": ""}
    ran: list[str] = []
    done: list[str] = []
    try:
        if final.exists():
            done = _stored_steps(final)
            if all(s in done for s in steps):
                row.update(status="skipped", steps_skipped=",".join(steps))
                row["n_cells"] = _n_cells(final)
                row["seconds"] = time.perf_counter() - t0
                return row
        sdata = job.read()
        if final.exists():
            _load_into(sdata, final)
        checkpoints = sorted(partial.glob("*.pkl")) if partial.exists() else []
        for ckpt in checkpoints:  # in step order (`<i>_<step>.pkl`)
            step = ckpt.stem.split("_", 1)[1]
            if step in steps:
                _load_into(sdata, ckpt)
                done.append(step)
        for step in steps:
            if step in done:
                continue
            before = {
                n: id(e) for kind in ("labels", "shapes", "points") for n, e in getattr(sdata, kind).items()
            }
            kw = dict(params.get(step, {}))
            if step == "predict" and kw.get("level", "cell") == "cell":
                # cell-level predictions go to disk by row blocks (bounded memory on 10⁶ cells); the
                # final store copies them chunk by chunk, then the partial folder is removed
                partial.mkdir(parents=True, exist_ok=True)
                kw.setdefault("store", partial / "predictions.zarr")
            _run_step(sdata, step, kw)
            ran.append(step)
            elements = _elements(sdata, images=False)
            for kind in ("labels", "shapes", "points"):
                elements[kind] = {n: e for n, e in elements[kind].items() if before.get(n) != id(e)}
            partial.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(partial / f"{BATCH_STEPS.index(step)}_{step}.pkl", elements)
        all_steps = [s for s in BATCH_STEPS if s in set(done) | set(ran)]
        attrs = {**dict(sdata.attrs), _ATTR: {"steps": all_steps, "reader": _reader_name(job)}}
        _write(final, _elements(sdata, images=write_image), attrs)
        if partial.exists():
            shutil.rmtree(partial)
        table = sdata.tables.get(K.CELLS)
        row["n_cells"] = None if table is None else int(table.n_obs)
    except Exception as err:
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
        row["traceback"] = traceback.format_exc()
    row["steps_run"] = ",".join(ran)
    row["steps_skipped"] = ",".join(s for s in steps if s in done)
    row["seconds"] = time.perf_counter() - t0
    row["started"], row["finished"] = started, time.time()
    return row


def _reader_name(job: SlideJob) -> str:
    return job.reader if isinstance(job.reader, str) else getattr(job.reader, "__name__", "callable")


def _n_cells(store: Path) -> int | None:
    import zarr

    group: Any = zarr.open_group(str(store), mode="r")
    if "tables" not in group or K.CELLS not in group["tables"]:
        return None
    obs = group["tables"][K.CELLS]["obs"]
    index = obs.attrs.get("_index", "_index")
    return int(obs[index].shape[0])


def _on_worker(job: SlideJob, **kwargs: Any) -> dict[str, Any]:
    """A slide as a cluster task: seceded from the worker's thread pool, so its own tile tasks
    (segmentation, features) run on the cluster too instead of waiting for a free thread."""
    from distributed import worker_client

    with worker_client():
        return process_slide(job, **kwargs)


def run_batch(
    slides: Sequence[SlideJob | Mapping[str, Any]],
    *,
    stores: str | Path,
    steps: Sequence[str] = ("segment", "cell_features", "cell_graph"),
    params: Mapping[str, Mapping[str, Any]] | None = None,
    reader: str | Callable[..., SpatialData] = "read_wsi",
    write_image: bool = False,
    client: Any = None,
    max_parallel: int | None = None,
    progress: bool = True,
    on_slide: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Prepare slides one zarr store each, resumably, one after another or in parallel on a cluster.

    Parameters
    ----------
    slides
        :class:`SlideJob` s, or mappings of reader arguments (``name`` or ``sample_id`` names the store;
        otherwise the stem of ``path`` / ``image``).
    stores
        Folder of the per-slide stores (``<name>.zarr``) and of the checkpoints of unfinished slides.
    steps
        Per-slide steps, in the order of :data:`BATCH_STEPS`: ``segment``, ``cell_features``,
        ``assign_cells``, ``cell_graph``, ``predict`` (``bs.tl.predict_bitro``, ``level="cell"`` by
        default, with ``params["predict"]["model"]`` a model or the path of a saved one; cell-level
        values go to disk by row blocks, ``store`` defaulting to the slide's partial folder).
    params
        Keyword arguments of each step. Features are standardised per slide unless
        ``params["cell_features"]["scaler"]`` gives the reference (a featurised slide, its store path,
        or a :class:`~bitro_sc.encoders.FeatureScaler`); a model re-applies its own training scaling
        when it predicts, and the raw values stay recoverable (``uns["bitro_features"]["scaler"]``).
    reader
        ``bs.io`` reader name (or callable) for slides given as mappings.
    write_image
        Also copy the image into the store (by default the store holds the results; the image stays
        in its source file).
    client
        A ``distributed.Client``: slides run as cluster tasks, up to ``max_parallel`` at once (default:
        the cluster's worker threads), and their tile work spreads over the cluster. ``None``: one
        slide after another in this process (a ``distributed.Client`` active in it still receives the
        tile work of segmentation and features through dask).
    max_parallel
        Most slides in flight at once on a cluster (each holds its cells in its worker's memory).
    progress
        A progress bar over slides.
    on_slide
        Called with each slide's summary row as it finishes.

    Returns
    -------
    One row per slide: ``slide``, ``status`` (``done``, ``skipped`` or ``failed``), ``steps_run``,
    ``steps_skipped``, ``n_cells``, ``seconds``, ``error`` (and ``traceback`` of failures), ``started`` /
    ``finished`` (wall-clock seconds since the epoch; skipped slides have none).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    steps = _check_steps(steps)
    jobs = [s if isinstance(s, SlideJob) else _job(s, reader) for s in slides]
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Slide names {dup} occur more than once; give each slide a distinct `sample_id`.")
    params = _resolve_params(steps, params or {})
    stores = Path(stores)
    stores.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"stores": stores, "steps": steps, "params": params, "write_image": write_image}
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress) as bar:

        def finish(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{row['slide']}: {row['status']}")
            if on_slide is not None:
                on_slide(row)

        if client is None:
            for job in jobs:
                finish(process_slide(job, **kw))
        else:
            _run_on_client(client, jobs, kw, max_parallel, finish)
    order = {n: i for i, n in enumerate(names)}
    table = pd.DataFrame(rows).sort_values("slide", key=lambda c: c.map(order)).reset_index(drop=True)
    for col in ("error", "n_cells"):
        if col not in table:
            table[col] = None
    return table


def _run_on_client(
    client: Any, jobs: list[SlideJob], kw: dict[str, Any], max_parallel: int | None, finish: Callable
) -> None:
    from distributed import as_completed

    if max_parallel is None:
        max_parallel = max(1, sum(client.nthreads().values()))
    pending = list(jobs)

    def submit(job: SlideJob) -> Any:
        return client.submit(
            _on_worker, job, key=f"bitro-slide-{job.name}-{time.time_ns()}", pure=False, **kw
        )

    futures = as_completed([submit(pending.pop(0)) for _ in range(min(max_parallel, len(pending)))])
    for future in futures:
        finish(future.result())  # process_slide reports step failures in its row
        if pending:
            futures.add(submit(pending.pop(0)))


def _job(entry: Mapping[str, Any], reader: str | Callable[..., SpatialData]) -> SlideJob:
    kwargs = dict(entry)
    name = kwargs.pop("name", None) or kwargs.get(K.SAMPLE_ID)
    if name is None:
        source = kwargs.get("path") or kwargs.get("image")
        if source is None:
            raise ValueError(f"Cannot name the store of slide {entry}: give it a `sample_id` (or `name`).")
        name = Path(str(source)).name.split(".")[0]
    return SlideJob(str(name), reader, kwargs)


def _resolve_params(
    steps: Sequence[str], params: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Load what every slide shares once: the model of ``predict``, a store path given as ``scaler``."""
    out = {k: dict(v) for k, v in params.items()}
    extra = sorted(set(out) - set(steps))
    if extra:
        raise ValueError(f"params for step(s) {extra} that are not run; steps: {list(steps)}.")
    if "predict" in steps:
        model = out.get("predict", {}).get("model")
        if model is None:
            raise ValueError(
                "The predict step needs params['predict']['model'] (a model or a saved model path)."
            )
        if isinstance(model, str | Path):
            from ..models import BiTroModel

            out["predict"]["model"] = BiTroModel.load(model)
    scaler = out.get("cell_features", {}).get("scaler")
    if isinstance(scaler, str | Path):
        from spatialdata import read_zarr

        from ..encoders import FeatureScaler

        cells_key = out["cell_features"].get("cells_key", K.CELLS)
        ref = read_zarr(scaler, selection=("tables",))
        out["cell_features"]["scaler"] = FeatureScaler.from_any(ref, cells_key=cells_key)
    return out
