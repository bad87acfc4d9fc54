"""Figure builders and relevance aggregations (xaicomp_core.viz.figures): pure functions, checked against hand-computed
values and against the engine."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from xaicomp_core import CompressionPlan
from xaicomp_core.viz import figures


# ------------------------------------------------------------------------------------------------ formatting
def test_formatting():
    assert figures.fmt_bytes(512) == "512 B"
    assert figures.fmt_bytes(12_345) == "12.3 kB"
    assert figures.fmt_bytes(1_749_480) == "1.75 MB"
    assert figures.fmt_pct(0.9125) == "91.25%"
    assert figures.fmt_pct(0.5, 1) == "50.0%"
    assert figures.fmt_pp(-0.0125) == "-1.25 pp"
    assert figures.fmt_pp(0.001) == "+0.10 pp"
    assert figures.fmt_pp(-0.00001) == "+0.00 pp"  # no "-0.00"


# ------------------------------------------------------------------------------------------------ aggregation
def test_weight_matrix_sums_conv_kernels():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 3, 5, 5))
    m = figures.weight_matrix(torch.from_numpy(r))
    assert m.shape == (4, 3)
    np.testing.assert_allclose(m[2, 1], r[2, 1].sum())
    lin = rng.normal(size=(7, 9))
    np.testing.assert_array_equal(figures.weight_matrix(lin), lin)
    with pytest.raises(ValueError):
        figures.weight_matrix(np.zeros(5))


def test_block_reduce_preserves_sum_and_bounds_size():
    m = np.arange(1000 * 37, dtype=float).reshape(1000, 37)
    red, rb, cb = figures.block_reduce(m, 100, 10)
    assert red.shape[0] <= 100 and red.shape[1] <= 10
    assert (rb, cb) == (10, 4)
    assert red.sum() == pytest.approx(m.sum())
    assert red[0, 0] == pytest.approx(m[:10, :4].sum())
    same, rb, cb = figures.block_reduce(m[:5, :5], 10, 10)
    assert (rb, cb) == (1, 1) and np.array_equal(same, m[:5, :5])


def test_symmetric_limit():
    a = np.concatenate([np.linspace(-1, 1, 1001), [1000.0]])
    assert figures.symmetric_limit(a, 99) < 2  # the outlier does not set the scale
    assert figures.symmetric_limit(a, 100) == 1000
    assert figures.symmetric_limit(np.zeros(10)) == 1.0


def test_diverging_rgb_red_positive_blue_negative():
    rgb = figures.diverging_rgb(np.array([[1.0, 0.0, -1.0, np.nan]]), limit=1.0)
    pos, zero, neg, nan = rgb[0]
    assert pos[0] > pos[2] + 50  # red
    assert neg[2] > neg[0] + 50  # blue
    assert zero.min() > 235  # white
    assert abs(int(nan[0]) - int(nan[2])) < 3 and nan[0] > 200  # light grey
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)


def test_sign_shares_counts():
    rel = {"a.weight": torch.tensor([[1.0, 0.0], [-2.0, 3.0]]), "b.weight": torch.tensor([[0.0, 0.0, -1.0]])}
    rows = figures.sign_shares(rel)
    assert [r["layer"] for r in rows] == ["a", "b", "all"]
    assert rows[0]["positive"] == 0.5 and rows[0]["zero"] == 0.25 and rows[0]["negative"] == 0.25
    assert rows[1]["zero"] == pytest.approx(2 / 3)
    assert rows[2]["weights"] == 7
    assert rows[2]["positive"] == pytest.approx(2 / 7) and rows[2]["negative"] == pytest.approx(2 / 7)
    for r in rows:
        assert r["positive"] + r["zero"] + r["negative"] == pytest.approx(1)


def test_mass_vs_count():
    rel = {"a.weight": torch.tensor([1.0, -1.0, 0.0, 0.0]), "b.weight": torch.tensor([6.0])}
    rows = figures.mass_vs_count(rel)
    assert rows[0]["weight_share"] == pytest.approx(0.8) and rows[1]["weight_share"] == pytest.approx(0.2)
    assert rows[0]["relevance_share"] == pytest.approx(0.25) and rows[1]["relevance_share"] == pytest.approx(0.75)
    assert rows[0]["signed_relevance"] == 0.0


def test_kernel_mosaic_places_tiles():
    k = np.arange(5 * 3 * 3, dtype=float).reshape(5, 3, 3)
    m = figures.kernel_mosaic(k, cols=3, pad=1)
    assert m.shape == (2 * 4 - 1, 3 * 4 - 1)
    np.testing.assert_array_equal(m[0:3, 4:7], k[1])
    np.testing.assert_array_equal(m[4:7, 4:7], k[4])
    assert np.isnan(m[3]).all() and np.isnan(m[4:7, 8:]).all()


def test_denormalize_inverts_preprocessing():
    from xaicomp_core import Preprocessing

    pre = Preprocessing((4, 4), 1, (0.3,), (0.4,))
    raw = np.random.default_rng(1).integers(0, 256, size=(2, 4, 4), dtype=np.uint8)
    back = figures.denormalize(pre.apply(raw), pre.mean, pre.std)
    np.testing.assert_allclose(back, raw / 255.0, atol=1e-6)
    pre3 = Preprocessing((4, 4), 3, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    rgb = np.random.default_rng(2).integers(0, 256, size=(1, 4, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(figures.denormalize(pre3.apply(rgb), pre3.mean, pre3.std), rgb / 255.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ figures
def test_relevance_heatmap_small_and_large():
    m = np.array([[1.0, -2.0], [0.5, 0.0]])
    fig = figures.relevance_heatmap(m, "t", limit=2.0)
    hm = fig.data[0]
    assert isinstance(hm, go.Heatmap)
    assert hm.zmin == -2.0 and hm.zmax == 2.0 and hm.zmid == 0
    big = np.random.default_rng(0).normal(size=(300, 200))
    fig = figures.relevance_heatmap(big, max_cells=10_000)
    assert isinstance(fig.data[0], go.Image) and fig.data[0].source.startswith("data:image/png;base64")
    assert fig.data[1].marker.showscale  # colour bar still shown
    with pytest.raises(ValueError):
        figures.relevance_heatmap(np.zeros(3))


def test_kernel_and_share_figures():
    fig = figures.kernel_figure(np.ones((4, 3, 3)), -np.ones((4, 3, 3)), "f")
    assert len(fig.data) == 2
    rows = figures.sign_shares({"a.weight": torch.tensor([1.0, -1.0, 0.0, 2.0])})
    fig = figures.sign_share_figure(rows)
    assert [t.name for t in fig.data] == ["positive", "zero", "negative"]
    assert list(fig.data[0].x) == [50.0, 50.0]
    fig = figures.mass_vs_count_figure(figures.mass_vs_count({"a.weight": torch.ones(3), "b.weight": torch.ones(1)}))
    assert list(fig.data[0].y) == [75.0, 25.0]


def test_sample_grid_titles_follow_images():
    imgs = np.zeros((10, 5, 5))
    titles = [f"img{i}" for i in range(10)]
    fig = figures.sample_grid(imgs, titles, cols=4)
    assert sorted(a.text for a in fig.layout.annotations) == sorted(titles)
    assert len(fig.data) == 10


def test_input_heatmap_grid_shares_row_scale():
    imgs = np.zeros((2, 6, 6))
    r1 = np.zeros((2, 6, 6))
    r1[0, 0, 0] = 4.0
    r2 = -r1 / 2
    fig = figures.input_heatmap_grid(imgs, [r1, r2], [["a", "b", "c"], ["d", "e", "f"]], percentile=100)
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 4
    assert heatmaps[0].zmax == heatmaps[1].zmax == 4.0
    with pytest.raises(ValueError):
        figures.input_heatmap_grid(imgs, [r1], [["a"], ["b"]])


def test_pareto_figure_and_png():
    rows = [{"criterion": c, "estimated_bytes": b, "accuracy": a, "pareto": p, "prune_ratio": r, "bits": "fp32",
             "baseline_accuracy": 0.9}
            for c, b, a, p, r in [("lrp", 1000, 0.85, True, 0.5), ("lrp", 2000, 0.9, True, 0.0),
                                  ("magnitude", 1000, 0.8, True, 0.5)]]
    fig = figures.pareto_figure(rows, {"estimated_bytes": 1500, "accuracy": 0.88, "label": "current"})
    names = [t.name for t in fig.data]
    assert names == ["lrp", "magnitude", "current"]
    assert list(fig.data[0].x) == [1000, 2000]
    png = figures.pareto_png(rows, {"estimated_bytes": 1500, "accuracy": 0.88})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_histograms():
    fig = figures.relevance_histogram(np.array([0.0, 0.0, 1.0, -1.0, 0.5]))
    zero_bar = fig.data[1]
    assert list(zero_bar.y) == [2]
    assert sum(fig.data[0].y) == 3
    fig = figures.quantization_figure(np.linspace(-1, 1, 50), np.round(np.linspace(-1, 1, 50)))
    assert len(fig.data) == 2


# ------------------------------------------------------------------------------------------------ with the engine
def test_sign_shares_match_paper_rule(lenet_session):
    """The paper rule prunes exactly the weights with relevance <= 0: its sparsity is the zero + negative share."""
    rel = lenet_session.relevance().weights
    total = figures.sign_shares(rel, lenet_session.layout.names)[-1]
    res = lenet_session.evaluate(CompressionPlan(criterion="paper"))
    assert res.sparsity == pytest.approx(total["zero"] + total["negative"], abs=1e-12)
    zeros = sum(int((rel[n] == 0).sum()) for n in lenet_session.layout.names)
    assert total["zero"] * total["weights"] == pytest.approx(zeros)


def test_flow_rows_conserve(lenet_session):
    rows = figures.flow_rows(lenet_session.relevance().flows)
    assert len(rows) == len(lenet_session.layout.names)
    for r in rows:
        assert abs(r["weights - inputs"]) <= 1e-3 * (abs(r["to inputs"]) + 1)


def test_engine_result_figures(lenet_session):
    res = lenet_session.evaluate(CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4],
                                                 bit_split=[0.5]))
    fig = figures.layer_stats_figure(res.layers)
    assert list(fig.data[0].y) == pytest.approx([100 * layer.sparsity for layer in res.layers])
    assert list(fig.data[1].y) == pytest.approx([layer.mean_bits for layer in res.layers])
    sections = res.size.section_totals()
    fig = figures.size_sections_figure(sections, res.size.fp32_bytes)
    assert sum(t.x[0] for t in fig.data[:-1]) == res.size.estimated_bytes
    fig = figures.per_class_figure(res.class_names, [("compressed", res.per_class_accuracy)])
    assert list(fig.data[0].y) == pytest.approx([100 * v for v in res.per_class_accuracy])
    rows = figures.comparison_rows([("lrp", res)])
    assert rows[0]["bytes"] == res.size.estimated_bytes and rows[0]["accuracy"] == figures.fmt_pct(res.accuracy)
    w = dict(lenet_session.model.named_parameters())["features.0.weight"].detach()
    fig = figures.kernel_figure(lenet_session.relevance().weights["features.0.weight"][0], w[0])
    assert len(fig.data) == 2
