"""Plans, criteria, masks, bit allocation, the quantizer and size accounting (hand-checked on small cases)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from xaicomp_core import CompressionPlan, PlanError
from xaicomp_core.compress.criteria import CRITERION_REGISTRY, LRPFilter, ScoreInputs, get_criterion
from xaicomp_core.compress.layout import (
    LayerLayout,
    SortedScores,
    channel_mask,
    is_channel_structured,
    ratio_mask,
    rule_mask,
)
from xaicomp_core.compress.quantize import allocate_bits, dequantize_codes, quantize
from xaicomp_core.format.size import class_bits, compute_size, index_bits, keep_encoding


# ---------------------------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------------------------
def test_plan_json_round_trip_and_version():
    plan = CompressionPlan(criterion="lrp", prune_ratio=0.4, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5],
                           granularity="channel", scope="per-layer", protect="first-last", composite="epsilon-plus")
    back = CompressionPlan.from_json(plan.to_json())
    assert back == plan
    assert json.loads(plan.to_json())["version"] == 1
    assert "8,4,2" in plan.cli_args() and "--granularity channel" in plan.cli_args()


@pytest.mark.parametrize("changes,match", [
    ({"prune_ratio": 1.0}, r"prune ratio must be in \[0, 1\)"),
    ({"prune_ratio": -0.1}, "prune ratio"),
    ({"criterion": "vibes"}, "unknown criterion"),
    ({"bit_levels": [8, 9], "bit_split": [0.5]}, "bit widths must be 1-8"),
    ({"bit_levels": [0]}, "bit widths must be 1-8"),
    ({"bit_levels": [2, 4], "bit_split": [0.5]}, "descending"),
    ({"bit_levels": [8, 4, 2], "bit_split": [0.5]}, "need 2 split"),
    ({"bit_levels": [8, 4, 2], "bit_split": [0.7, 0.5]}, "more than 1"),
    ({"granularity": "atom"}, "unknown granularity"),
    ({"composite": "nope"}, "unknown composite"),
])
def test_plan_validation_messages(changes, match):
    with pytest.raises(PlanError, match=match):
        CompressionPlan(**changes).validate()


def test_future_and_malformed_plans():
    d = CompressionPlan().to_dict()
    d["version"] = 99
    with pytest.raises(PlanError, match="newer"):
        CompressionPlan.from_dict(d)
    with pytest.raises(PlanError, match="not valid JSON"):
        CompressionPlan.from_json("{oops")
    with pytest.raises(PlanError, match="unknown plan field"):
        CompressionPlan.from_dict({"criterion": "lrp", "colour": "red"})


# ---------------------------------------------------------------------------------------------------------------
# layout, criteria and masks
# ---------------------------------------------------------------------------------------------------------------
def _layout() -> tuple[LayerLayout, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    w = {"a.weight": torch.randn(4, 2, 3, 3), "b.weight": torch.randn(3, 10), "c.weight": torch.randn(2, 3)}
    return LayerLayout(list(w), [tuple(v.shape) for v in w.values()]), w


def test_layout_flat_split_and_channels():
    layout, w = _layout()
    flat = layout.flat(w)
    assert layout.total == 72 + 30 + 6 and layout.total_channels == 9
    back = layout.split(flat)
    assert all(torch.equal(back[k], w[k]) for k in w)
    assert layout.channel_of[:18].tolist() == [0] * 18
    assert layout.channel_of[72:82].tolist() == [4] * 10


def test_criteria_scores():
    layout, w = _layout()
    rel = {k: torch.randn_like(v) for k, v in w.items()}
    rel["a.weight"][0, 0] = 0.0
    inp = ScoreInputs(w, rel)
    assert torch.equal(get_criterion("lrp").scores(inp)["b.weight"], rel["b.weight"].abs())
    assert torch.equal(get_criterion("magnitude").scores(inp)["b.weight"], w["b.weight"].abs())
    assert torch.equal(get_criterion("paper").rule_prune(inp)["a.weight"], rel["a.weight"] <= 0)
    zero = get_criterion("lrp-zero").rule_prune(inp)["a.weight"]
    assert int(zero.sum()) == 9 and bool(zero[0, 0].all())
    r1 = get_criterion("random").scores(ScoreInputs(w, None, None, 3))
    r2 = get_criterion("random").scores(ScoreInputs(w, None, None, 3))
    assert all(torch.equal(r1[k], r2[k]) for k in w)
    ch = LRPFilter().channel_scores(inp)["b.weight"]
    expect = rel["b.weight"].sum(1).double()
    torch.testing.assert_close(ch, expect / expect.abs().sum())
    assert set(CRITERION_REGISTRY) == {"paper", "lrp", "lrp-signed", "lrp-zero", "magnitude", "random", "lrp-filter",
                                       "magnitude-filter", "lrp-x-weight", "lrp-budget-magnitude",
                                       "lrp-budget-x-weight", "lrp-iterative", "lrp-x-weight-iterative"}
    with pytest.raises(PlanError, match="needs LRP relevance"):
        get_criterion("lrp").scores(ScoreInputs(w, None))


def test_ratio_mask_global_and_per_layer():
    layout, w = _layout()
    scores = SortedScores.build(layout, layout.flat({k: v.abs() for k, v in w.items()}))
    keep = ratio_mask(layout, scores, 0.5, "global")
    assert int((~keep).sum()) == 54
    flat = layout.flat(w).abs()
    assert flat[~keep].max() <= flat[keep].min()
    keep = ratio_mask(layout, scores, 0.5, "per-layer")
    for i in range(3):
        assert int((~keep[layout.layer_slice(i)]).sum()) == round(0.5 * layout.sizes[i])
    protected = layout.with_protect("first-last")
    scores_p = SortedScores.build(protected, layout.flat({k: v.abs() for k, v in w.items()}))
    keep = ratio_mask(protected, scores_p, 0.5, "global")
    assert bool(keep[protected.layer_slice(0)].all()) and bool(keep[protected.layer_slice(2)].all())
    assert int((~keep).sum()) == 15
    assert bool(rule_mask(protected, torch.ones(layout.total, dtype=torch.bool))[:72].all())


def test_channel_mask_removes_whole_channels_and_keeps_one():
    layout, w = _layout()
    scores = torch.arange(9, dtype=torch.float64)
    keep = channel_mask(layout, scores, 0.5, "global", exclude_layers={2})
    for i in range(3):
        assert is_channel_structured(layout, keep, i)
    assert bool(keep[layout.layer_slice(2)].all())
    pruned = int((~keep).sum())
    assert abs(pruned - 0.5 * layout.total) <= 18  # closest whole-channel count
    keep = channel_mask(layout, scores, 0.99, "global", exclude_layers={2})
    for i in (0, 1):  # each layer keeps its best channel
        assert bool(keep[layout.layer_slice(i)].any())


# ---------------------------------------------------------------------------------------------------------------
# bit allocation and the quantizer
# ---------------------------------------------------------------------------------------------------------------
def test_allocate_bits_per_weight_by_fraction():
    layout, w = _layout()
    keep = torch.ones(layout.total, dtype=torch.bool)
    keep[:10] = False
    scores = torch.rand(layout.total, dtype=torch.float64)
    desc = torch.argsort(scores, descending=True)
    klass = allocate_bits(layout, keep, scores, desc, {}, [8, 4, 2], [0.2, 0.5], "weight", "global")
    assert bool((klass[:10] == -1).all())
    n = int(keep.sum())
    counts = torch.bincount(klass[keep].long(), minlength=3).tolist()
    assert counts == [round(0.2 * n), round(0.7 * n) - round(0.2 * n), n - round(0.7 * n)]
    kept_scores = scores[keep]
    kept_class = klass[keep]
    assert kept_scores[kept_class == 0].min() >= kept_scores[kept_class == 1].max()
    assert kept_scores[kept_class == 1].min() >= kept_scores[kept_class == 2].max()


def test_allocate_bits_channel_and_layer_granularity():
    layout, w = _layout()
    keep = torch.ones(layout.total, dtype=torch.bool)
    scores = torch.rand(layout.total, dtype=torch.float64)
    k = allocate_bits(layout, keep, scores, torch.argsort(scores, descending=True), {}, [8, 2], [0.5], "channel",
                      "global")
    for c in range(layout.total_channels):
        assert len(set(k[layout.channel_of == c].tolist())) == 1
    k = allocate_bits(layout, keep, scores, torch.argsort(scores, descending=True), {}, [8, 2], [0.5], "layer",
                      "global")
    for i in range(3):
        assert len(set(k[layout.layer_slice(i)].tolist())) == 1


def test_quantizer_math():
    layout, w = _layout()
    flat = layout.flat(w)
    keep = torch.ones(layout.total, dtype=torch.bool)
    for bits in (8, 4, 2):
        klass = torch.zeros(layout.total, dtype=torch.int8)
        for method in ("absmax", "mse"):
            q = quantize(layout, flat, keep, klass, [bits], method)
            qmax = 2 ** (bits - 1) - 1
            assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2 * qmax
            # every value is code * scale of its (channel, class) group
            s = q.scales[layout.channel_of, 0]
            back = dequantize_codes(q.codes, torch.full((layout.total,), bits), s)
            assert torch.equal(back, q.values)
            n_levels = len(torch.unique(q.values[layout.layer_slice(1)][:10]))
            assert n_levels <= 2 * qmax + 1
            if method == "absmax":  # error at most half a step
                assert bool(((q.values - flat).abs() <= s / 2 + 1e-6).all())
        err_mse = (quantize(layout, flat, keep, klass, [bits], "mse").values - flat).pow(2).sum()
        err_abs = (quantize(layout, flat, keep, klass, [bits], "absmax").values - flat).pow(2).sum()
        assert err_mse <= err_abs + 1e-9
    # mixed widths: groups wider than the clipping search use max|w| / qmax, narrower ones are searched
    klass = (torch.arange(layout.total) % 2).to(torch.int8)
    q = quantize(layout, flat, keep, klass, [8, 2], "mse")
    wide = klass == 0
    amax8 = torch.zeros(layout.total_channels).scatter_reduce_(0, layout.channel_of[wide], flat[wide].abs(), "amax")
    torch.testing.assert_close(q.scales[:, 0], amax8 / 127)
    assert bool(((q.values - flat).abs()[wide] <= (amax8 / 127 / 2)[layout.channel_of[wide]] + 1e-6).all())
    amax2 = torch.tensor([float(flat[(layout.channel_of == c) & ~wide].abs().max())
                          for c in range(layout.total_channels)])
    assert bool((q.scales[:, 1] <= amax2 + 1e-6).all())
    # 1 bit: +-mean|w| per channel
    q = quantize(layout, flat, keep, torch.zeros(layout.total, dtype=torch.int8), [1])
    c0 = flat[:18]
    torch.testing.assert_close(q.values[:18], torch.where(c0 >= 0, 1.0, -1.0) * c0.abs().mean())
    # fp32 class and pruned weights
    keep[5] = False
    q = quantize(layout, flat, keep, torch.where(keep, 0, -1).to(torch.int8), [32])
    assert q.values[5] == 0 and torch.equal(q.values[keep], flat[keep])


# ---------------------------------------------------------------------------------------------------------------
# size accounting
# ---------------------------------------------------------------------------------------------------------------
def test_keep_encoding_choices():
    assert keep_encoding(100, 100, 4, False) == ("dense", 0)
    assert keep_encoding(100, 50, 4, False) == ("bitmask", 13)
    assert keep_encoding(1000, 3, 4, False) == ("indices", math.ceil(3 * 10 / 8))
    assert keep_encoding(1000, 997, 4, False) == ("pruned-indices", 4)
    assert keep_encoding(1000, 500, 10, True) == ("channels", 2)
    assert keep_encoding(1000, 0, 10, False) == ("indices", 0)
    assert keep_encoding(1000, 100, 4, False, (3, 60)) == ("rice", 60)
    assert keep_encoding(1000, 900, 4, False, (3, 60)) == ("rice-pruned", 60)
    assert keep_encoding(1000, 500, 4, False, (1, 125)) == ("bitmask", 125)  # ties go to the bitmask
    assert index_bits(1024) == 10 and index_bits(1025) == 11 and index_bits(1) == 1
    assert class_bits(1) == 0 and class_bits(2) == 1 and class_bits(3) == 2


def test_size_matches_hand_count():
    layout, w = _layout()
    state = {"a.weight": w["a.weight"], "a.bias": torch.tensor([0.0, 1.0, 2.0, 3.0]),
             "bn.running_mean": torch.zeros(4), "bn.running_var": torch.tensor([-0.0, 0.0, 0.0, 0.0]),
             "bn.num_batches_tracked": torch.tensor(3), "b.weight": w["b.weight"], "c.weight": w["c.weight"]}
    keep = torch.ones(layout.total, dtype=torch.bool)
    keep[layout.layer_slice(1)] = False
    keep[72:75] = True  # 3 of 30 kept in b
    scores = layout.flat(w).abs().double()
    klass = allocate_bits(layout, keep, scores, torch.argsort(scores, descending=True), {}, [8, 32], [0.5],
                          "weight", "global")
    q = quantize(layout, layout.flat(w), keep, klass, [8, 32])
    size = compute_size(layout, keep, klass, q.group_count, [8, 32], "weight", state, codes=q.codes)
    rows = {t.name: t for t in size.tensors}
    assert "bn.num_batches_tracked" not in rows
    assert rows["a.bias"].kind == "raw" and rows["a.bias"].raw_bytes == 16
    # all elements equal: one float32 (format version 3); -0.0 and 0.0 are different bit patterns, so not constant
    assert rows["bn.running_mean"].kind == "constant" and rows["bn.running_mean"].raw_bytes == 4
    assert rows["bn.running_var"].kind == "raw" and rows["bn.running_var"].raw_bytes == 16
    a = rows["a.weight"]
    n8 = int((klass[:72] == 0).sum())
    assert a.keep_bytes == 0 and a.class_bytes == 9 and a.value_bytes == math.ceil((n8 * 8 + (72 - n8) * 32) / 8)
    assert a.scale_bytes == 4 * int((q.group_count[:4, 0] > 0).sum())
    b = rows["b.weight"]
    # kept positions 0, 1, 2 of 30: gaps 0, 0, 0 -> Rice with k = 0 is three 0-bits, one byte (indices: 15 bits)
    assert b.kept == 3 and b.keep_encoding == "rice" and b.keep_param == 0 and b.keep_bytes == 1
    assert size.fp32_bytes == 4 * (72 + 4 + 4 + 4 + 30 + 6)
    assert size.estimated_bytes == sum(t.total for t in size.tensors)
    assert size.compression_ratio == pytest.approx(size.fp32_bytes / size.estimated_bytes)
