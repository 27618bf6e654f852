"""bs.datasets.synthetic: layout per kind, truth consistency, determinism, lazy == eager, round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import bitro_sc as bs
from bitro_sc import _keys as K
from bitro_sc import _sdata

TINY = {"size_um": 300.0, "n_genes": 60}


@pytest.fixture(scope="module")
def tiny():
    return bs.datasets.synthetic(seed=1, return_truth=True, **TINY)


@pytest.fixture(scope="module")
def small():
    # big enough for every region and a few dozen spots
    return bs.datasets.synthetic(seed=3, return_truth=True, size_um=700.0, n_genes=60)


def _image(sdata):
    return np.asarray(_sdata.get_image(sdata, K.IMAGE).values)


def test_visium_layout_follows_the_data_contract(small):
    sdata, _truth = small
    img = _sdata.get_image(sdata, K.IMAGE)
    assert img.dtype == np.uint8
    assert img.dims == ("c", "y", "x")
    assert img.shape == (3, 1400, 1400)
    assert hasattr(img.data, "dask")
    assert _sdata.get_mpp(sdata, K.IMAGE) == pytest.approx(0.5)
    assert _sdata.mpp_source(sdata, K.IMAGE) == "synthetic"
    assert _sdata.slide_info(sdata) == {K.SAMPLE_ID: "S0", K.PATIENT_ID: "P0"}

    spots = sdata.shapes[K.SPOTS]
    table = sdata.tables[K.TABLE]
    n = len(spots)
    assert n > 10
    np.testing.assert_allclose(spots["radius"], 27.5 / 0.5)
    assert list(spots.index) == list(range(n))
    # hexagonal 100 µm pitch: every spot's nearest neighbour is 100 µm away
    xy = np.c_[spots.geometry.x, spots.geometry.y]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(n) * 1e9
    np.testing.assert_allclose(d.min(axis=1) * 0.5, 100.0, rtol=1e-6)
    np.testing.assert_allclose(table.obsm[K.SPATIAL], xy)

    assert sp.issparse(table.X)
    assert table.X.format == "csr"
    x = table.X.toarray()
    np.testing.assert_array_equal(x, np.round(x))
    assert table.shape == (n, 60)
    assert table.var_names[:3].tolist() == ["EPCAM", "COL1A1", "PTPRC"]
    assert table.var_names.is_unique
    for col in (K.SPOT_ID, K.REGION, K.IN_TISSUE, "array_row", "array_col", K.SAMPLE_ID, K.PATIENT_ID):
        assert col in table.obs
    np.testing.assert_array_equal(table.obs[K.SPOT_ID], np.arange(n))
    assert set(table.obs[K.REGION]) == {K.SPOTS}
    assert table.uns["spatialdata_attrs"]["region"] == K.SPOTS
    # visium array coordinates: column parity follows the row
    assert ((table.obs["array_row"] % 2) == (table.obs["array_col"] % 2)).all()
    assert K.BULK not in sdata.tables
    assert "cell_labels" not in sdata.labels
    assert K.CELLS not in sdata.shapes


def test_st_layout_has_100um_spots_on_a_200um_square_grid():
    sdata = bs.datasets.synthetic(kind="st", seed=2, size_um=900.0, n_genes=20)
    spots = sdata.shapes[K.SPOTS]
    table = sdata.tables[K.TABLE]
    np.testing.assert_allclose(spots["radius"], 50.0 / 0.5)
    xy = np.c_[spots.geometry.x, spots.geometry.y] * 0.5
    n = len(xy)
    assert n >= 4
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(n) * 1e9
    assert d.min() == pytest.approx(200.0)
    r, c = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    assert table.obs_names.tolist() == [f"{a}x{b}" for a, b in zip(c, r, strict=True)]
    np.testing.assert_allclose(xy[:, 0] - xy[0, 0], (c - c[0]) * 200.0)


def test_bulk_kind_has_one_row_equal_to_the_sum_over_all_cells():
    sdata, truth = bs.datasets.synthetic(kind="bulk", seed=4, return_truth=True, **TINY)
    assert K.SPOTS not in sdata.shapes
    assert K.TABLE not in sdata.tables
    bulk = sdata.tables[K.BULK]
    assert bulk.shape == (1, 60)
    assert bulk.obs_names.tolist() == ["S0"]
    assert bulk.obs[K.SAMPLE_ID].tolist() == ["S0"]
    assert bulk.obs[K.PATIENT_ID].tolist() == ["P0"]
    np.testing.assert_array_equal(
        np.asarray(bulk.X).ravel(), np.asarray(truth.expression.X.sum(axis=0)).ravel()
    )
    assert (truth.cells["spot_id"] == -1).all()


def test_spot_counts_are_the_sum_of_their_cells(small):
    sdata, truth = small
    table = sdata.tables[K.TABLE]
    cells = truth.cells
    x = truth.expression.X.toarray()
    spot_of = cells["spot_id"].to_numpy()
    assert (spot_of >= 0).sum() > 100
    expected = np.zeros(table.shape)
    np.add.at(expected, spot_of[spot_of >= 0], x[spot_of >= 0])
    np.testing.assert_array_equal(table.X.toarray(), expected)
    # the assignment is geometric: centroid inside the 27.5 µm disc
    spots = sdata.shapes[K.SPOTS]
    inside = spot_of >= 0
    sx, sy = spots.geometry.x.to_numpy()[spot_of[inside]], spots.geometry.y.to_numpy()[spot_of[inside]]
    dist_um = np.hypot(cells["x_px"].to_numpy()[inside] - sx, cells["y_px"].to_numpy()[inside] - sy) * 0.5
    assert dist_um.max() <= 27.5
    # a cell outside every disc is > 27.5 µm from every spot centre
    allxy = np.c_[spots.geometry.x, spots.geometry.y]
    out = ~inside
    dmin = np.min(
        np.linalg.norm(np.c_[cells["x_px"], cells["y_px"]][out][:, None] - allxy[None], axis=-1), axis=1
    )
    assert (dmin * 0.5 > 27.5).all()


def test_truth_labels_match_the_cells_table(tiny):
    from skimage.measure import regionprops

    sdata, truth = tiny
    labels = truth.labels
    assert isinstance(labels, np.ndarray)
    assert labels.dtype == np.uint32
    assert labels.shape == _image(sdata).shape[1:]
    cells = truth.cells.set_index("cell_id")
    props = {p.label: p for p in regionprops(labels)}
    assert sorted(props) == sorted(cells.index)
    area = np.array([props[i].area for i in cells.index]) * 0.25
    np.testing.assert_allclose(area, cells["area_um2"])
    cy, cx = np.array([props[i].centroid for i in cells.index]).T
    np.testing.assert_allclose(cx, cells["x_px"], atol=1e-9)
    np.testing.assert_allclose(cy, cells["y_px"], atol=1e-9)
    np.testing.assert_allclose(cells["x_um"], cells["x_px"] * 0.5)
    # touching / overlapping nuclei exist: some nuclei share a border with another
    from scipy import ndimage

    grown = ndimage.grey_dilation(labels, size=3)
    assert ((grown != labels) & (labels > 0)).sum() > 0


def test_no_cells_on_glass(small):
    from scipy import ndimage

    sdata, truth = small
    img = _image(sdata).astype(float)
    # glass: bright and unsaturated, over a 10 µm neighbourhood
    bright = ndimage.uniform_filter(img.mean(axis=0), 21) > 225
    sat = ndimage.uniform_filter(img.max(axis=0) - img.min(axis=0), 21) < 25
    glass = bright & sat
    assert glass.mean() > 0.05  # the slide has glass around the tissue
    yx = np.rint(truth.cells[["y_px", "x_px"]].to_numpy()).astype(int)
    assert glass[yx[:, 0], yx[:, 1]].sum() == 0


def test_density_and_type_morphology_are_realistic(small):
    sdata, truth = small
    cells = truth.cells
    area = cells.groupby("cell_type", observed=True)["area_um2"].median()
    assert area["lymphocyte"] < 0.5 * area["tumour"]
    assert 20 < area["lymphocyte"] < 50
    assert 60 < area["tumour"] < 160
    ratio = cells["minor_axis_um"] / cells["major_axis_um"]
    by_type = ratio.groupby(cells["cell_type"], observed=True).median()
    assert by_type["fibroblast"] < 0.45 < by_type["lymphocyte"]
    # nuclei per mm² of tissue: tissue = not glass-bright
    img = _image(sdata).astype(float)
    from scipy import ndimage

    tissue = ndimage.uniform_filter(img.mean(axis=0), 21) < 225
    dens = len(cells) / (tissue.sum() * 0.25 * 1e-6)
    assert 1800 < dens < 4200
    per_spot = cells.loc[cells["spot_id"] >= 0].groupby("spot_id").size()
    assert 3 < per_spot.median() * (100 / 55) ** 2 / 1.0 < 45  # ~20–25 per 100 µm disc


def test_expression_follows_visible_cell_types(small):
    sdata, truth = small
    expr = truth.expression
    cells = truth.cells
    for gene, ctype in [("EPCAM", "tumour"), ("COL1A1", "fibroblast"), ("PTPRC", "lymphocyte")]:
        rate = expr[:, gene].layers["rate"].ravel()
        is_t = (cells["cell_type"] == ctype).to_numpy()
        assert rate[is_t].mean() > 5 * rate[~is_t].mean()
    # spots: EPCAM tracks the number of tumour cells in the spot
    table = sdata.tables[K.TABLE]
    n_tum = (
        cells[cells["cell_type"] == "tumour"]
        .groupby("spot_id")
        .size()
        .reindex(range(table.n_obs), fill_value=0)
    )
    epcam = table[:, "EPCAM"].X.toarray().ravel()
    assert np.corrcoef(n_tum.to_numpy(), epcam)[0, 1] > 0.7
    assert (truth.expression.layers["rate"] >= 0).all()
    np.testing.assert_array_equal(expr.obsm["spatial"], cells[["x_px", "y_px"]].to_numpy())


def test_same_seed_same_slides_and_different_seeds_differ(tiny):
    sdata, truth = tiny
    again, truth2 = bs.datasets.synthetic(seed=1, return_truth=True, **TINY)
    np.testing.assert_array_equal(_image(sdata), _image(again))
    np.testing.assert_array_equal(truth.labels, truth2.labels)
    np.testing.assert_array_equal(sdata.tables[K.TABLE].X.toarray(), again.tables[K.TABLE].X.toarray())
    other = bs.datasets.synthetic(seed=2, **TINY)
    assert not np.array_equal(_image(sdata), _image(other))


def test_several_slides_group_into_patients_and_differ():
    slides = bs.datasets.synthetic(4, kind="bulk", seed=0, size_um=200.0, n_genes=10)
    assert isinstance(slides, list)
    assert len(slides) == 4
    info = [_sdata.slide_info(s) for s in slides]
    assert [i[K.SAMPLE_ID] for i in info] == ["S0", "S1", "S2", "S3"]
    patients = [i[K.PATIENT_ID] for i in info]
    assert sorted(set(patients)) == ["P0", "P1"]
    assert all(patients.count(p) == 2 for p in set(patients))
    imgs = [_image(s) for s in slides]
    assert not np.array_equal(imgs[0], imgs[1])
    assert [s.tables[K.BULK].obs_names[0] for s in slides] == ["S0", "S1", "S2", "S3"]


def test_lazy_rendering_equals_eager_rendering(tiny):
    import dask.array as da

    sdata, truth = tiny
    lazy, ltruth = bs.datasets.synthetic(seed=1, return_truth=True, lazy=True, chunk_px=128, **TINY)
    limg = _sdata.get_image(lazy, K.IMAGE).data
    assert limg.chunksize == (3, 128, 128)
    assert isinstance(ltruth.labels, da.Array)
    np.testing.assert_array_equal(limg.compute(), _image(sdata))
    np.testing.assert_array_equal(ltruth.labels.compute(), truth.labels)
    # one block alone (no neighbours computed) is the same too
    np.testing.assert_array_equal(limg[:, 256:384, 128:256].compute(), _image(sdata)[:, 256:384, 128:256])


def test_zarr_round_trip_is_unchanged(tmp_path, tiny):
    import spatialdata

    sdata, _ = tiny
    path = tmp_path / "syn.zarr"
    sdata.write(path)
    back = spatialdata.read_zarr(path)
    np.testing.assert_array_equal(_image(back), _image(sdata))
    assert _sdata.get_mpp(back, K.IMAGE) == pytest.approx(0.5)
    assert _sdata.slide_info(back) == _sdata.slide_info(sdata)
    t0, t1 = sdata.tables[K.TABLE], back.tables[K.TABLE]
    np.testing.assert_array_equal(t0.X.toarray(), t1.X.toarray())
    assert t0.obs_names.tolist() == t1.obs_names.tolist()
    np.testing.assert_allclose(back.shapes[K.SPOTS]["radius"], sdata.shapes[K.SPOTS]["radius"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "xenium"}, "kind"),
        ({"n_patients": 3}, "n_patients"),
        ({"mpp": 0}, "mpp"),
        ({"size_um": 10}, "size_um"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bs.datasets.synthetic(2, **kwargs)


def test_spatial_programs_follow_the_neighbourhood(small):
    from scipy.stats import spearmanr

    _, truth = small
    cells = truth.cells
    rate = truth.expression.layers["rate"]
    genes = truth.expression.var_names
    tum = (cells["cell_type"] == "tumour").to_numpy()
    # hypoxia rises with depth inside a nest (tumour cells only)
    r_hyp = spearmanr(cells.loc[tum, "depth_um"], rate[tum, genes.get_loc("VEGFA")])[0]
    assert r_hyp > 0.3
    # CAF genes fall with the distance of a fibroblast from the nearest nest
    fib = ((cells["cell_type"] == "fibroblast") & (cells["depth_um"] < 0)).to_numpy()
    assert fib.sum() > 20
    r_caf = spearmanr(-cells.loc[fib, "depth_um"], rate[fib, genes.get_loc("POSTN")])[0]
    assert r_caf < -0.4


@pytest.mark.slow
def test_large_lazy_slide_is_a_pyramid_whose_blocks_do_not_depend_on_chunking():
    sdata, truth = bs.datasets.synthetic(
        seed=5, size_um=2100.0, n_genes=10, lazy=True, chunk_px=512, return_truth=True
    )
    element = sdata.images[K.IMAGE]
    assert sorted(element.children) == ["scale0", "scale1"]
    img = _sdata.get_image(sdata, K.IMAGE).data
    assert img.shape == (3, 4200, 4200)
    assert img.chunksize == (3, 512, 512)
    assert truth.labels.shape == (4200, 4200)
    other, truth2 = bs.datasets.synthetic(
        seed=5, size_um=2100.0, n_genes=10, lazy=True, chunk_px=300, return_truth=True
    )
    region = (slice(None), slice(1900, 2200), slice(2000, 2400))  # straddles blocks of both
    a = img[region].compute()
    np.testing.assert_array_equal(a, _sdata.get_image(other, K.IMAGE).data[region].compute())
    np.testing.assert_array_equal(truth.labels[region[1:]].compute(), truth2.labels[region[1:]].compute())
    assert a.std() > 5  # tissue, not an empty block


def test_gene_seed_shares_the_gene_model_between_cohorts():
    """Cohorts with one ``gene_seed`` express genes alike per cell type; another biology does not
    (compared on the synthetic genes, whose cell-type programs are drawn from the gene seed)."""
    kw = {"size_um": 300.0, "n_genes": 150, "return_truth": True}

    def type_profiles(t):
        rate = np.log(np.asarray(t.expression.layers["rate"]) + 1e-3)
        syn = t.expression.var_names.str.startswith("SYN")
        types = t.cells["cell_type"].to_numpy()
        return np.concatenate(
            [(rate[types == c].mean(axis=0) - rate.mean(axis=0))[syn] for c in ("tumour", "fibroblast")]
        )

    _, first = bs.datasets.synthetic(seed=1, **kw)
    _, same = bs.datasets.synthetic(seed=2, gene_seed=1, **kw)
    _, other = bs.datasets.synthetic(seed=2, **kw)
    assert list(same.expression.var_names) == list(first.expression.var_names)
    r_same = np.corrcoef(type_profiles(first), type_profiles(same))[0, 1]
    r_other = np.corrcoef(type_profiles(first), type_profiles(other))[0, 1]
    assert r_same > 0.9, r_same
    assert r_other < 0.5, r_other
    with pytest.raises(ValueError, match="gene_seed"):
        bs.datasets.synthetic(gene_seed=1.5, size_um=300.0)
