"""The BiTro network, bags and the exact chunked whole-slide gradient (bitro_sc.models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitro_sc.datasets._toy import graph_knn, toy_cells
from bitro_sc.models import BiTroModel, ExpressionModel, ModelParams, TrainParams
from bitro_sc.models._bags import BulkSlide, Partition, SlideCells, make_batch, spatial_chunks
from bitro_sc.models._net import BiTroNet, pool_bags
from bitro_sc.models._slide import loss_fn, slide_cell_values, slide_profile, slide_step

torch.set_num_threads(1)
SMALL = ModelParams(hidden=16, phenotype_dim=4, gat_heads=2, transformer_heads=2, dropout=0.2)


def _slide(n: int = 600, seed: int = 0) -> SlideCells:
    c = toy_cells(n, seed=seed, n_features=8)
    conn, _ = graph_knn(c["xy"])
    return SlideCells(c["features"], c["type"] + 1, c["xy"], conn, np.full(n, -1, dtype=np.int64))


def _grads(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def test_params_accept_dicts_and_reject_unknown_options() -> None:
    p = ModelParams.coerce({"hidden": 32, "pos_wavelengths_um": [10, 20]})
    assert p.hidden == 32
    assert p.pos_wavelengths_um == (10.0, 20.0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelParams(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Unknown TrainParams field"):
        TrainParams.coerce({"epoch": 3})


def test_spatial_chunks_are_compact_and_cover_every_cell_once() -> None:
    xy = np.random.default_rng(0).uniform(0, 1000, size=(5000, 2)).astype(np.float32)
    group = spatial_chunks(xy, 250)
    assert np.bincount(group).tolist() == [250] * 20
    # a Z-order chunk spans far less than the slide (1000 µm): compact patches of tissue
    spans = [np.ptp(xy[group == g], axis=0).max() for g in range(20)]
    assert np.median(spans) < 600


def test_partition_keeps_only_edges_inside_each_window() -> None:
    slide = _slide(400)
    group = spatial_chunks(slide.xy_um, 50)
    part = Partition.build(group, int(group.max()) + 1, slide.graph)
    assert part.order.size == 400
    coo = slide.graph.tocoo()
    inside = int((group[coo.row] == group[coo.col]).sum())
    assert part.edges.shape[1] == inside
    batch, cells = make_batch([slide], [part], [(0, 0), (0, 3)])
    assert batch.num_graphs == 2
    assert batch.x.shape[0] == cells.size == part.sizes()[0] + part.sizes()[3]
    assert int(batch.edge_index.max()) < cells.size
    # edges never connect the two windows
    b = batch.batch.numpy()
    assert (b[batch.edge_index[0].numpy()] == b[batch.edge_index[1].numpy()]).all()


def test_linear_skip_starts_as_the_plain_model_and_then_adds_a_linear_path() -> None:
    slide = _slide(120)
    part = slide.chunk_partition(40)
    batch, _ = make_batch([slide], [part], [(0, 0), (0, 1)])
    rna = ModelParams(**{**SMALL.to_dict(), "rna_head": True})
    plain = BiTroNet(n_features=8, n_phenotypes=4, n_genes=5, params=rna).eval()
    params = ModelParams(**{**rna.to_dict(), "linear_skip": True})
    skip = BiTroNet(n_features=8, n_phenotypes=4, n_genes=5, params=params).eval()
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["skip.weight"]
    assert not unexpected
    assert skip.skip is not None
    assert plain.skip is None
    with torch.no_grad():
        torch.testing.assert_close(skip(batch)[0], plain(batch)[0])  # zero-initialised
        torch.nn.init.normal_(skip.skip.weight, std=0.5)
        y, _, r = skip(batch)
        expected = plain(batch)[0] / r * torch.exp(skip.skip(skip.cell_inputs(batch))) * r
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-6)


def test_cell_dropout_keeps_a_cell_per_window_and_reports_full_sizes() -> None:
    slide = _slide(400)
    part = Partition.build(spatial_chunks(slide.xy_um, 50), 8, slide.graph)
    windows = [(0, g) for g in range(8)]
    rng = np.random.default_rng(0)
    full, _ = make_batch([slide], [part], windows)
    dropped, cells = make_batch([slide], [part], windows, drop_cells=0.5, rng=rng)
    assert torch.equal(dropped.n_cells, torch.as_tensor(part.sizes()[:8]))
    assert torch.equal(full.n_cells, dropped.n_cells)
    kept = torch.bincount(dropped.batch, minlength=8)
    assert (kept >= 1).all()
    assert 0.3 < kept.sum().item() / full.x.shape[0] < 0.7
    assert int(dropped.edge_index.max()) < cells.size  # the graph follows the kept cells
    b = dropped.batch.numpy()
    assert (b[dropped.edge_index[0].numpy()] == b[dropped.edge_index[1].numpy()]).all()
    only, _ = make_batch([slide], [part], windows, drop_cells=0.999, rng=rng)
    assert (torch.bincount(only.batch, minlength=8) == 1).all()


def test_padding_does_not_change_a_bags_prediction() -> None:
    """A bag predicted alone equals the same bag predicted next to a larger (padded) one."""
    slide = _slide(290)
    part = Partition.build(spatial_chunks(slide.xy_um, 20), 15, slide.graph)
    net = BiTroNet(n_features=8, n_phenotypes=4, n_genes=5, params=SMALL).eval()
    with torch.no_grad():
        alone, _ = make_batch([slide], [part], [(0, 14)])
        together, _ = make_batch([slide], [part], [(0, 0), (0, 14)])
        y1, s1, r1 = net(alone)
        y2, s2, r2 = net(together)
        p1, _ = pool_bags(y1, s1, alone.batch, 1, "sum", r1)
        p2, _ = pool_bags(y2, s2, together.batch, 2, "sum", r2)
    assert part.sizes()[14] < part.sizes()[0]  # the last chunk is smaller: it gets padded
    torch.testing.assert_close(p1[0], p2[1], rtol=1e-5, atol=1e-5)


def test_head_can_predict_below_the_mean() -> None:
    net = BiTroNet(n_features=8, n_phenotypes=0, n_genes=3, params=SMALL)
    net.set_gene_bias(torch.tensor([0.001, 1.0, 50.0]))
    assert torch.allclose(torch.exp(net.head.bias), torch.tensor([0.001, 1.0, 50.0]), rtol=1e-4)


@pytest.mark.parametrize(("pooling", "rna_head"), [("sum", True), ("sum", False), ("attention", False)])
def test_chunked_slide_gradient_equals_full_bag_gradient(pooling: str, rna_head: bool) -> None:
    slide = _slide(700)
    part = slide.chunk_partition(64)
    target = np.random.default_rng(1).uniform(1, 50, size=6).astype(np.float32)
    item = BulkSlide(slide, part, target, 1e4)
    torch.manual_seed(0)
    params = ModelParams(**{**SMALL.to_dict(), "pooling": pooling, "rna_head": rna_head})
    net = BiTroNet(n_features=8, n_phenotypes=4, n_genes=6, params=params)
    if net.attn_head is not None:
        torch.nn.init.normal_(net.attn_head.weight, std=0.5)
    if net.rna_head is not None:  # cells of unequal RNA content, so the normalisation matters
        torch.nn.init.normal_(net.rna_head.weight, std=0.5)
    net.train()  # dropout on: both passes must draw the same masks
    loss = slide_step(net, item, loss="mse", device=torch.device("cpu"), seed=3, cells_per_batch=200)
    chunked = _grads(net)
    net.zero_grad()
    pooled = slide_profile(net, slide, part, device=torch.device("cpu"), seed=3, cells_per_batch=200)
    full = loss_fn(pooled[None], torch.from_numpy(target)[None], torch.tensor([1e4]), "mse")
    full.backward()
    reference = _grads(net)
    assert loss == pytest.approx(float(full), rel=1e-5)
    assert chunked.abs().max() > 0
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize(
    ("pooling", "rna_head"), [("sum", True), ("sum", False), ("mean", True), ("attention", True)]
)
def test_cell_values_pool_to_the_slide_profile(pooling: str, rna_head: bool) -> None:
    """RNA-content head: the profile is Σ values / Σ rna; otherwise cell values sum to it."""
    slide = _slide(500)
    part = slide.chunk_partition(100)
    params = ModelParams(**{**SMALL.to_dict(), "pooling": pooling, "rna_head": rna_head})
    net = BiTroNet(n_features=8, n_phenotypes=4, n_genes=4, params=params)
    assert (net.rna_head is not None) == (pooling == "sum" and rna_head)
    if net.attn_head is not None:
        torch.nn.init.normal_(net.attn_head.weight, std=0.5)
    if net.rna_head is not None:
        torch.nn.init.normal_(net.rna_head.weight, std=0.5)
    net.eval()
    cells, rna = slide_cell_values(net, slide, part, device=torch.device("cpu"))
    with torch.no_grad():
        profile = slide_profile(net, slide, part, device=torch.device("cpu")).numpy()
    assert np.isfinite(cells).all()
    if net.rna_head is None:
        assert rna is None
        np.testing.assert_allclose(cells.sum(0), profile, rtol=1e-4)
    else:
        assert rna is not None
        assert rna.std() > 0.05  # unequal contents: a plain mean would differ
        np.testing.assert_allclose(cells.sum(0) / rna.sum(), profile, rtol=1e-4)
        assert not np.allclose(cells.mean(0), profile, rtol=1e-3)


def test_bag_profile_does_not_grow_with_its_cell_count() -> None:
    """With the RNA-content head a bag of identical cells predicts one cell's profile, whatever
    the number of cells (plain sum pooling grows with it)."""
    from torch_geometric.data import Batch, Data

    params = ModelParams(**{**SMALL.to_dict(), "gat_layers": 0, "transformer_layers": 0, "rna_head": True})
    net = BiTroNet(n_features=8, n_phenotypes=0, n_genes=3, params=params).eval()
    x = torch.randn(1, 8)
    profiles = []
    for n in (1, 5, 40):
        data = Data(x=x.repeat(n, 1), phenotype=torch.zeros(n, dtype=torch.long), pos=torch.zeros(n, 2))
        batch = Batch.from_data_list([data])
        with torch.no_grad():
            y, s, r = net(batch)
            profiles.append(pool_bags(y, s, batch.batch, 1, "sum", r)[0][0])
    torch.testing.assert_close(profiles[0], profiles[1])
    torch.testing.assert_close(profiles[0], profiles[2])


def test_protocol_recognises_models_by_their_members() -> None:
    class Constant:
        def __init__(self) -> None:
            self.genes = ["a"]
            self.levels = ("spot",)
            self.record = {"genes": ["a"], "hvgs": []}

        def predict_frame(self, sdata, *, level="spot", keys=None):
            raise NotImplementedError

    assert isinstance(Constant(), ExpressionModel)
    assert not isinstance(object(), ExpressionModel)
    assert BiTroModel.levels == ("spot", "bulk", "cell")


def test_deconvolution_recovers_phenotype_profiles_from_bags() -> None:
    """Bags built from known per-phenotype profiles: the start recovers their ratios; unseen codes get 0."""
    from bitro_sc.models._deconv import deconvolve, log1p_match

    rng = np.random.default_rng(0)
    true = rng.gamma(2.0, 1.0, size=(3, 6))  # phenotype codes 1-3 (0 = unknown, never seen)
    counts = rng.integers(0, 12, size=(200, 3)).astype(float)
    design = np.c_[np.zeros(200), counts]
    targets = counts @ true * 50.0  # deep bags: log1p ≈ log, the fit is exact up to one scale
    per_cell = targets.mean(axis=0) / counts.sum(axis=1).mean()
    out = deconvolve(design, targets, per_cell)
    assert out.shape == (4, 6)
    assert np.all(out[0] == 0.0)
    np.testing.assert_allclose(out[1:] - out[1], np.log(true / true[0]), atol=1e-3)
    # the per-gene scale matches the mean of log1p of the targets
    fitted = design @ (np.exp(out) * per_cell)
    np.testing.assert_allclose(np.log1p(fitted).mean(0), np.log1p(targets).mean(0), atol=1e-3)
    np.testing.assert_allclose(log1p_match(fitted, targets), 0.0, atol=1e-3)


def test_bulk_profile_does_not_grow_with_the_slide() -> None:
    """With slide-size normalisation a slide and two copies of it side by side predict the same bulk
    profile (per-cell values are shares of a reference slide); cell values still sum to the profile."""
    params = ModelParams(**{**SMALL.to_dict(), "gat_layers": 0, "transformer_layers": 0})
    net = BiTroNet(n_features=8, n_phenotypes=4, n_genes=4, params=params).eval()
    net.init_depth("bulk", 300.0)
    one = _slide(300)
    two = SlideCells(
        np.vstack([one.features, one.features]),
        np.r_[one.phenotype, one.phenotype],
        np.vstack([one.xy_um, one.xy_um + np.float32(5000.0)]),
        None,
        np.full(600, -1, dtype=np.int64),
    )
    cpu = torch.device("cpu")
    with torch.no_grad():
        p1 = slide_profile(net, one, one.chunk_partition(100), device=cpu).numpy()
        p2 = slide_profile(net, two, two.chunk_partition(100), device=cpu).numpy()
    np.testing.assert_allclose(p1, p2, rtol=1e-5)
    cells, _ = slide_cell_values(net, two, two.chunk_partition(100), device=cpu)
    np.testing.assert_allclose(cells.sum(0), p2, rtol=1e-4)
    raw = BiTroNet(
        n_features=8,
        n_phenotypes=4,
        n_genes=4,
        params=ModelParams(**{**params.to_dict(), "slide_size_norm": False}),
    )
    raw.load_state_dict(net.state_dict())
    with torch.no_grad():
        q2 = slide_profile(raw.eval(), two, two.chunk_partition(100), device=cpu).numpy()
    np.testing.assert_allclose(q2, 2 * p1, rtol=1e-5)  # the plain sum: twice one slide's (ref = its size)
