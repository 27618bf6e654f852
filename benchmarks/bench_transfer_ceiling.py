"""How much signal do a few bulk slides carry for a spot base? (issue 17, item 2; a diagnostic).

On one synthetic draw of ``bench_transfer.py`` (its cache, ``--cache``) and one model seed, every
row is scored like the spot -> bulk rows there: mean per-gene Pearson (50 HVGs of spot slide 1)
across the last 24 bulk slides, which no model here sees.

- ``zero-shot``: the spot base (spot slides 1-3) as is.
- ``zero-shot route``: the common start of the transfer routes (gene head matched to the target
  slides' scale, depth exponent restarted at bulk level, the base's attention window), untrained.
- ``forced <policy>``: ``fit_bitro(bulk[:n], transfer="spatial", policy=<policy>)`` with the
  trained route forced: the route choice may not keep zero-shot (no noise margin) and no shrunk
  candidate is offered; the epochs are still chosen by the target's own validation (4 slides:
  leave-one-slide-out; 8 and 16: the ``validation="auto"`` held-out slides).
- ``auto``: ``policy="auto"`` as shipped (route choice with the noise margin).
- ``auto, validation=0``: the same with ``validation=0``: no held-out split, so at bulk level the
  route is chosen by leave-one-slide-out folds over the first 4 slides (cross-validated Pearson
  with the noise margin) at any number of slides.
- ``lora, E epochs fixed``: LoRA trained on all ``n`` slides for exactly ``E`` epochs, no
  validation. Not a usable choice (E is read off the test slides); it bounds what LoRA could do.
- ``scratch``: a bulk model trained from scratch on ``n`` slides.

The forcing patches ``bitro_sc.models._fit.select_route`` and ``SHRINK`` inside this process only.

``python benchmarks/bench_transfer_ceiling.py --draw 7 --seed 0 --cache /tmp/t17 --out
/tmp/i17b/ceiling_d7s0.csv``
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_transfer import TEST_BULK, draw_slides


@contextmanager
def forced(mode: str) -> Iterator[None]:
    """Inside: the transfer route choice returns a trained route (``mode="trained"``: the best by
    the choice's own criterion, zero-shot excluded) or zero-shot (``"zero"``), and offers no shrunk
    candidates."""
    from bitro_sc.models import _fit

    orig_select, orig_shrink = _fit.select_route, _fit.SHRINK

    def select(*args: Any, **kwargs: Any) -> dict[str, Any]:
        sel = orig_select(*args, **kwargs)
        if mode == "zero":
            name = "zero-shot"
            history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": []}
        else:
            trained = [n for n in sel["scores"] if n != "zero-shot"]
            cv = sel["cv_pearson"]
            name = max(trained, key=lambda n: cv[n]) if cv else min(trained, key=lambda n: sel["scores"][n])
            val = sel["curves"][name][1:]
            history = {"epoch": list(range(len(val))), "train_loss": val, "val_loss": val}
        sel.update(chosen=name, route=name, shrink=1.0, epochs=sel["epochs_by_route"][name], history=history)
        sel["forced"] = mode
        return sel

    _fit.select_route, _fit.SHRINK = select, ()
    try:
        yield
    finally:
        _fit.select_route, _fit.SHRINK = orig_select, orig_shrink


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draw", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="4,8,16", help="numbers of target bulk slides")
    p.add_argument("--policies", default="lora,head,full", help="forced routes")
    p.add_argument("--auto", default="8,16", help="target sizes that also run policy='auto'")
    p.add_argument("--loo", default="", help="target sizes that also run policy='auto' with validation=0")
    p.add_argument("--fixed", default="3,10", help="fixed LoRA epochs without validation ('' : none)")
    p.add_argument("--scratch", default="16,32", help="target sizes of the scratch rows")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--cache", default="/tmp/bitro_transfer")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import anndata as ad
    import torch

    import bitro_sc as bs

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bulk, spots = draw_slides(args.draw, Path(args.cache), t0)
    held = bulk[-TEST_BULK:]
    genes = bs.pp.highly_variable_genes([spots[0].tables["table"]], n_top=50)
    seed = args.seed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ("draw", "seed", "target_n", "method", "score", "epochs", "chosen", "seconds")
    new = not out.exists()
    handle = out.open("a", newline="")
    writer = csv.DictWriter(handle, fieldnames=fields)
    if new:
        writer.writeheader()

    def score(model: Any) -> float:
        light = [bs.tl.prediction_table(model, s, level="bulk", key_added="x") for s in held]
        df = bs.tl.evaluate(
            ad.concat(light, merge="first"), layer="x", genes=genes, top_hvg=None, level="bulk"
        )
        return float(df["pearson"].mean())

    def row(n: int, method: str, fit: Callable[[], Any]) -> None:
        t = time.perf_counter()
        model = fit()
        route = model.record.get("route") or {}
        writer.writerow(
            {
                "draw": args.draw,
                "seed": seed,
                "target_n": n,
                "method": method,
                "score": round(score(model), 5),
                "epochs": route.get("epochs", model.record.get("best_epoch")),
                "chosen": route.get("chosen", ""),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        handle.flush()
        print(f"[{time.perf_counter() - t0:7.1f} s] n={n} {method} done", flush=True)

    kw: dict[str, Any] = {"epochs": args.epochs, "seed": seed, "progress": False, "genes": genes}
    base = bs.tl.fit_bitro(spots[:3], **kw)
    row(0, "zero-shot", lambda: base)
    for n in [int(v) for v in args.targets.split(",") if v]:
        target = bulk[:n]

        def adapt(mode: str, policy: str, target: list = target) -> Any:
            with forced(mode):
                return bs.tl.fit_bitro(target, transfer="spatial", base=base, policy=policy, **kw)

        if args.policies:
            row(n, "zero-shot route", lambda adapt=adapt: adapt("zero", "lora"))
        for policy in [v for v in args.policies.split(",") if v]:
            row(n, f"forced {policy}", lambda adapt=adapt, policy=policy: adapt("trained", policy))
        if str(n) in args.auto.split(","):
            row(
                n,
                "auto",
                lambda target=target: bs.tl.fit_bitro(target, transfer="spatial", base=base, **kw),
            )
        if str(n) in args.loo.split(","):
            row(
                n,
                "auto, validation=0 (leave-one-slide-out)",
                lambda target=target: bs.tl.fit_bitro(
                    target, transfer="spatial", base=base, validation=0, **kw
                ),
            )
        for e in [int(v) for v in args.fixed.split(",") if v]:
            fixed = {**kw, "epochs": e}
            row(
                n,
                f"lora, {e} epochs fixed",
                lambda target=target, fixed=fixed: bs.tl.fit_bitro(
                    target, transfer="spatial", base=base, policy="lora", validation=None, **fixed
                ),
            )
    for n in [int(v) for v in args.scratch.split(",") if v]:
        row(n, "scratch", lambda n=n: bs.tl.fit_bitro(bulk[:n], level="bulk", **kw))
    handle.close()


if __name__ == "__main__":
    main()
