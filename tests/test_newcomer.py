"""A newcomer's calls on a real HER2ST section: the default genes cover EPCAM, plots at both levels."""

from __future__ import annotations

import logging
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K


@pytest.mark.slow
@pytest.mark.realdata
def test_default_fit_on_her2st_predicts_epcam_and_plots_it_at_spot_and_cell_level(
    her2st_dir, tmp_path, caplog, capsys
):
    d = her2st_dir
    sdata = bs.io.read_st(d / "C2_HE.jpg", d / "C2_counts.tsv.gz", d / "C2_selection.tsv")
    # the README's calls, verbatim: fit_bitro runs the missing steps itself, one log line each
    bs.tl.segment(sdata)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="bitro_sc"):
        model = bs.tl.fit_bitro(sdata)
    ran = [r.getMessage() for r in caplog.records if "running bs.tl." in r.getMessage()]
    for step in ("cell_features", "phenotypes", "assign_cells", "cell_graph"):
        assert sum(f"running bs.tl.{step}(" in line for line in ran) == 1, (step, ran)
    # the progress bar counts epochs and shows the losses and the time left (elapsed<left)
    bar = capsys.readouterr().err
    assert re.search(
        r"\d+/\d+ \[\d+:\d+<\d+:\d+, +[\d.]+(s/epoch|epoch/s), train_loss=[\d.]+, val_loss=", bar
    ), bar[-500:]
    assert {"EPCAM", "KRT19", "ERBB2", "CD74", "FN1"} <= set(model.genes)  # the marker panel
    bs.tl.predict_bitro(sdata, model)
    bs.pl.expression(sdata, "EPCAM", save=tmp_path / "spot.png")
    bs.tl.predict_bitro(sdata, model, level="cell")
    bs.pl.expression(sdata, "EPCAM", level="cell", save=tmp_path / "cell.png")
    assert (tmp_path / "spot.png").stat().st_size > 10_000
    assert (tmp_path / "cell.png").stat().st_size > 10_000
    cells, spots = sdata.tables[K.CELLS], sdata.tables[K.TABLE]
    assert cells.X is None  # predictions live in the layer only
    # one coordinate convention: obsm["spatial"] in pixels on both tables, µm in obs
    mpp = bs.get_mpp(sdata, K.IMAGE)
    np.testing.assert_allclose(cells.obsm[K.SPATIAL] * mpp, cells.obs[[K.X_UM, K.Y_UM]].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(spots.obsm[K.SPATIAL] * mpp, spots.obs[[K.X_UM, K.Y_UM]].to_numpy(), rtol=1e-6)
    not_fitted = next(str(g) for g in spots.var_names if g not in set(model.genes))
    for level in ("spot", "cell"):
        with pytest.raises(KeyError, match=f"'{not_fitted}' was not predicted"):
            bs.pl.expression(sdata, not_fitted, level=level)
