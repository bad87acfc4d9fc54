"""The auto search (evaluate/auto.py and ``xaicomp auto``) on the built-in LeNet with small subsets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from xaicomp_core import CompressionPlan, CompressionSession, XaicompError, load_builtin_model
from xaicomp_core.cli import main
from xaicomp_core.evaluate.auto import (
    AUTO_FINETUNE_BATCH,
    AUTO_FINETUNE_LR,
    AutoSearch,
    _hull,
    auto_compare,
    auto_search,
    compare_summary,
    verdict,
)
from xaicomp_core.evaluate.session import forward_logits

GRID = {"sparsities": (0.0, 0.5, 0.9), "bits": (8, 4, 2)}


def test_hull_by_hand():
    pts = [(100, 0.0, "a"), (80, 0.5, "b"), (60, 1.5, "c"), (50, 4.0, "d"), (40, 4.2, "e"), (70, 3.0, "x"),
           (60, 2.0, "c2"), (30, 9.0, "f"), (90, 0.6, "g")]
    # x (70, 3.0) is worse than c with more bytes; c2 is c with more damage; d (50, 4.0) lies above the segment
    # e-c (4.2 - 2.7 / 2 = 2.85 at 50 bytes); g (90, 0.6) above b-a (0.25 at 90 bytes)
    assert [p[2] for p in _hull(pts)] == ["a", "b", "c", "e", "f"]


@pytest.fixture(scope="module")
def small_session(fashion_ref, fashion_eval):
    s = CompressionSession(load_builtin_model("fashion-lenet"), fashion_ref, fashion_eval.balanced_subset(400),
                           reference_samples=300)
    s.relevance()
    return s


def test_search_finds_a_plan_within_the_budget(small_session):
    s = small_session
    calls = []
    res = auto_search(s, 1.0, budget=8, progress=lambda d, t: calls.append((d, t)), **GRID)
    assert res.evaluations <= 8 and calls and all(t == 8 for _, t in calls)
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))
    plan = res.plan
    names = [n.removesuffix(".weight") for n in s.layout.names]
    assert set(plan.layer_prune) == set(names) == set(plan.layer_bits)
    assert set(plan.layer_prune.values()) <= set(GRID["sparsities"]) and set(plan.layer_bits.values()) <= {8, 4, 2}
    assert CompressionPlan.from_json(plan.to_json()) == plan and plan.criterion == "lrp-x-weight"
    assert not plan.fold_norm and plan.version == 2  # the LeNet has no BatchNorm to fold: a version-2 plan
    # searched on the reference images, reported on the evaluation images
    assert res.search_images == len(s.y_ref)
    base = float((forward_logits(s.model, s.x_ref).argmax(1) == s.y_ref).double().mean())
    assert res.search_baseline == pytest.approx(base)
    assert res.evaluation.images == len(s.y_eval) and res.evaluation.plan == plan
    assert res.feasible and res.search_accuracy >= base - 0.01 - 1e-12
    # the smallest plan within the budget among those tried, at its exact packed size
    within = [h["bytes"] for h in res.history if h["within"]]
    assert res.estimated_bytes == min(within) == s.evaluate(plan).size.estimated_bytes
    assert res.compression_ratio > 3
    # the drop on the evaluation images comes with its paired 95 % interval, counted here by hand
    ev = res.evaluation
    lost = int(((s.baseline_pred == s.y_eval) & (ev.predictions != s.y_eval)).sum())
    won = int(((s.baseline_pred != s.y_eval) & (ev.predictions == s.y_eval)).sum())
    n = len(s.y_eval)
    assert lost + won > 0 and res.evaluation_half_width == pytest.approx(
        196 * ((lost + won - (lost - won) ** 2 / n) / n ** 2) ** 0.5)
    assert s.drop_interval(ev) == (pytest.approx(-100 * ev.accuracy_change), res.evaluation_half_width)
    assert res.to_dict()["evaluation"]["drop_half_width_points"] == res.evaluation_half_width
    assert f"± {res.evaluation_half_width:.2f}" in verdict({"relevance": res})
    with pytest.raises(XaicompError, match="needs an exact evaluation"):
        s.drop_interval(dataclasses.replace(ev, estimate=True))  # first numbers from a subset have none
    # per-layer sparsities are what the plan says
    for layer in res.evaluation.layers:
        assert layer.sparsity == pytest.approx(plan.layer_prune[layer.name], abs=0.5 / layer.params + 1e-9)
        assert layer.mean_bits == plan.layer_bits[layer.name] or layer.sparsity == 1.0


@pytest.mark.slow
def test_the_search_never_looks_at_the_evaluation_images(fashion_ref, fashion_eval):
    # two sessions with the same reference images and different evaluation images find the same plan
    model = load_builtin_model("fashion-lenet")
    found = []
    for ev in (fashion_eval.balanced_subset(200), fashion_eval.balanced_subset(400)):
        s = CompressionSession(model, fashion_ref, ev, reference_samples=200)
        found.append(auto_search(s, 2.0, signal="magnitude", budget=5, **GRID))
    assert found[0].plan == found[1].plan and found[0].history == found[1].history
    assert found[0].evaluation.images == 200 and found[1].evaluation.images == 400


@pytest.mark.slow
def test_compare_and_explicit_search_images(small_session):
    s = small_session
    x, y = s.x_ref[:150], s.y_ref[:150]
    res = auto_compare(s, 1.5, budget=4, search_data=(x, y), signals=("relevance", "magnitude"), **GRID)
    assert set(res) == {"relevance", "magnitude"} and res["magnitude"].plan.criterion == "magnitude"
    assert all(r.search_images == 150 for r in res.values())
    summary = compare_summary(res)
    assert set(summary["signals"]) == {"relevance", "magnitude"}
    assert summary["ratio_relevance_over_magnitude"] == pytest.approx(
        res["relevance"].compression_ratio / res["magnitude"].compression_ratio)
    json.dumps({k: r.to_dict() for k, r in res.items()})
    with pytest.raises(XaicompError, match="unknown signal"):
        AutoSearch(s, "vibes")
    with pytest.raises(XaicompError, match="search_data"):
        AutoSearch(s, search_data="evaluation")
    with pytest.raises(XaicompError, match="max drop"):
        AutoSearch(s, **GRID).run(-1.0)
    with pytest.raises(XaicompError, match="fine-tuning needs training data"):
        AutoSearch(s, finetune_epochs=1)


def test_mix_sets_channels_of_a_layer_at_two_widths_ranked_by_the_signal(small_session):
    s = small_session
    search = AutoSearch(s, "hybrid", mix=(3, 2, 0.5), **GRID)
    assert 2.5 in search.bits
    names = search.layers
    state = {k: (0.5, 8) for k in names}
    state[names[2]] = (0.5, 2.5)
    plan = search.plan_for(state)
    assert names[2] not in plan.layer_bits and set(plan.layer_bits) == set(names) - {names[2]}
    assert plan.bit_levels == [8, 3, 2] and plan.bit_split == [0.0, 0.5] and plan.granularity == "channel"
    assert plan.bit_ranking == "relevance" and plan.scope == "per-layer"
    assert AutoSearch(s, "magnitude", mix=(3, 2, 0.5), **GRID).plan_for(state).bit_ranking == "magnitude"
    res = s.evaluate(plan)
    layer = next(la for la in res.layers if la.name == names[2])
    assert {b for b, n in layer.bits_histogram.items() if n} == {"3", "2"}
    assert 2.3 < layer.mean_bits < 2.7  # about half of the kept weights: whole channels at 3 bits
    assert all(la.mean_bits == 8 for la in res.layers if la.name != names[2])
    found = search.run(1.0, 6)
    assert found.evaluations <= 6 and found.feasible
    with pytest.raises(XaicompError, match="mix"):
        AutoSearch(s, mix=(2, 3, 0.5))


def test_search_with_fine_tuning(fashion_ref, fashion_eval):
    from xaicomp_core import load_builtin_dataset

    train = load_builtin_dataset("fashion-mnist", "train").balanced_subset(300)
    s = CompressionSession(load_builtin_model("fashion-lenet"), fashion_ref, fashion_eval.balanced_subset(200),
                           reference_samples=200, train_data=train)
    res = auto_search(s, 2.0, signal="magnitude", budget=4, finetune_epochs=1, sparsities=(0.0, 0.9),
                      bits=(8, 2))
    assert res.plan.finetune_epochs == 1 and res.evaluation.plan.finetune_epochs == 1
    # the search's fine-tuning recipe is written into the plan (xaicomp compress --plan fine-tunes it the same way)
    assert (res.plan.finetune_batch, res.plan.finetune_lr) == (AUTO_FINETUNE_BATCH, AUTO_FINETUNE_LR) == (32, 0.005)
    assert res.plan.to_dict()["version"] == 4
    other = AutoSearch(s, "magnitude", finetune_epochs=1, finetune_batch=128, finetune_lr=0.01)
    state = {k: (0.0, 8) for k in other.layers}
    assert other.plan_for(state).to_dict()["version"] == 2 and "finetune_batch" not in other.plan_for(state).to_dict()
    assert "finetune_batch" not in AutoSearch(s, "magnitude", finetune_epochs=1).plan_for(state, finetune=False
                                                                                          ).to_dict()
    with pytest.raises(XaicompError, match="batch size must be an integer in 1..4096"):
        AutoSearch(s, "magnitude", finetune_epochs=1, finetune_batch=0)
    phases = [h["phase"] for h in res.history]
    assert phases[0] == "calibration" and "bisection" in phases and len(phases) <= 4
    # the calibration probes are not fine-tuned, every other evaluated plan is (and cached by the session)
    assert not s.needs_finetuning(res.plan)


def test_calibration_takes_at_most_half_the_budget(small_session):
    """A small budget still leaves the search half of it (with 3 probes per layer the calibration alone would take
    every evaluation but one, and the plan found would be the most accurate end of the chain)."""
    for budget in (4, 7):
        res = auto_search(small_session, 1.0, signal="magnitude", budget=budget, **GRID)
        phases = [h["phase"] for h in res.history]
        assert phases.count("calibration") <= budget // 2 and phases[0] == "calibration"
        assert len(phases) - phases.count("calibration") >= budget - budget // 2 or len(phases) < budget
        assert res.compression_ratio > 2


FAST = ["--model", "fashion-lenet", "--reference-samples", "200", "--eval-samples", "300", "--threads", "2"]


@pytest.mark.slow
def test_cli_auto_saves_a_plan_that_compress_reproduces(capsys, tmp_path):
    plan_path = tmp_path / "plan.json"
    rc = main(["auto", *FAST, "--max-drop", "1.0", "--budget", "4", "--signals", "relevance,magnitude",
               "--sparsities", "0,0.5,0.9", "--bit-widths", "8,4",
               "--save-plan", str(plan_path), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = json.loads(out)
    assert d["primary"] == "relevance" and set(d["results"]) == {"relevance", "magnitude"}
    assert d["search_images"] == 200 and d["evaluation_images"] == 300
    rel = d["results"]["relevance"]
    assert rel["evaluations"] <= 4
    plan = CompressionPlan.from_json(plan_path.read_text())
    assert plan.to_dict() == rel["plan"] and d["fold_norm"] is True and not plan.fold_norm  # LeNet: no BatchNorm
    rc = main(["compress", *FAST, "--plan", str(plan_path), "--json"])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert again["accuracy"] == rel["evaluation"]["accuracy"]
    assert again["size"]["estimated_bytes"] == rel["estimated_bytes"]


@pytest.mark.parametrize("args,match", [
    (["--max-drop", "-1"], "--max-drop"),
    (["--budget", "0"], "--budget"),
    (["--signals", "relevance,vibes"], "--signals"),
    (["--sparsities", "0,1.5"], "--sparsities"),
    (["--bit-widths", "8,x"], "--bit-widths"),
    (["--probes", "9"], "--probes"),
    (["--mix", "2,3,0.5"], "--mix"),
    (["--mix", "3,2"], "--mix"),
    (["--start-plan", "/nonexistent/plan.json"], "plan file /nonexistent/plan.json does not exist"),
])
def test_cli_auto_user_errors_are_one_line(capsys, args, match):
    rc = main(["auto", *FAST, *args, "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("xaicomp: error:") and match in lines[0]


def test_plans_without_per_layer_fields_still_load_as_version_1():
    old = {"criterion": "magnitude", "prune_ratio": 0.5, "version": 1}
    plan = CompressionPlan.from_dict(old)
    assert plan.version == 1 and plan.layer_prune == {} and plan.to_dict()["version"] == 1
    new = plan.replace(layer_prune={"features.0": 0.5})
    assert new.to_dict()["version"] == 2 and "layer_prune" in json.loads(new.to_json())
    torch.manual_seed(0)


def test_a_start_plan_within_the_budget_replaces_the_bisection(small_session):
    first = auto_search(small_session, 1.0, signal="magnitude", budget=8, **GRID)
    assert first.feasible
    again = auto_search(small_session, 1.0, signal="magnitude", budget=6, start=first.plan, **GRID)
    phases = [h["phase"] for h in again.history]
    assert "start" in phases and "bisection" not in phases
    assert phases.index("start") == phases.count("calibration")  # measured right after the calibration
    assert again.feasible and again.estimated_bytes <= first.estimated_bytes


def test_a_start_plan_beyond_the_budget_falls_back_to_the_bisection(small_session):
    names = [n.removesuffix(".weight") for n in small_session.layout.names]
    hopeless = CompressionPlan(criterion="magnitude", layer_prune=dict.fromkeys(names, 0.9),
                               layer_bits=dict.fromkeys(names, 2))
    res = auto_search(small_session, 1.0, signal="magnitude", budget=8, start=hopeless, **GRID)
    phases = [h["phase"] for h in res.history]
    assert "start" in phases and "bisection" in phases and res.feasible
    assert next(h for h in res.history if h["phase"] == "start")["within"] is False


def test_start_plans_off_the_grid_are_refused_in_one_line(small_session):
    names = [n.removesuffix(".weight") for n in small_session.layout.names]
    off = CompressionPlan(criterion="magnitude", layer_prune=dict.fromkeys(names, 0.33),
                          layer_bits=dict.fromkeys(names, 4))
    with pytest.raises(XaicompError, match="not on the search's grid"):
        auto_search(small_session, 1.0, signal="magnitude", budget=4, start=off, **GRID)
    with pytest.raises(XaicompError, match="no per-layer setting"):
        auto_search(small_session, 1.0, signal="magnitude", budget=4, start=CompressionPlan(criterion="magnitude"),
                    **GRID)


def test_a_warm_start_searches_without_fine_tuning_first(fashion_ref, fashion_eval):
    from xaicomp_core import load_builtin_dataset

    train = load_builtin_dataset("fashion-mnist", "train").balanced_subset(300)
    s = CompressionSession(load_builtin_model("fashion-lenet"), fashion_ref.balanced_subset(200),
                           fashion_eval.balanced_subset(300), train_data=train)
    calls = []
    res = auto_compare(s, 1.0, signals=["magnitude"], budget=3, finetune_epochs=1, warm_start=6, probes=1,
                       progress=lambda d, t: calls.append((d, t)), **GRID)["magnitude"]
    pre = auto_search(s, 1.0, signal="magnitude", budget=6, probes=1, **GRID)
    assert calls[-1] == (9, 9) and all(t == 9 for _, t in calls)
    phases = [h["phase"] for h in res.history]
    assert "bisection" not in phases and phases.count("start") == 1
    start = next(h for h in res.history if h["phase"] == "start")
    assert start["within"] and res.warm_start == 6 and res.plan.finetune_epochs == 1
    # the fine-tuned search started where the search without fine-tuning ended
    assert start["layers"] == {k: [pre.plan.layer_prune[k], pre.plan.layer_bits[k]] for k in pre.plan.layer_prune}
    assert res.feasible and start["bytes"] >= min(h["bytes"] for h in res.history if h["within"])


def test_the_search_folds_batchnorm_unless_told_not_to(small_session, fashion_ref, fashion_eval):
    vgg = CompressionSession(load_builtin_model("fashion-vgg"), fashion_ref, fashion_eval.balanced_subset(50),
                             reference_samples=50)
    state = {k: (0.5, 4) for k in AutoSearch(vgg, "magnitude").layers}
    folded = AutoSearch(vgg, "magnitude").plan_for(state)
    assert folded.fold_norm is True and folded.version == 3
    plain = AutoSearch(vgg, "magnitude", fold_norm=False).plan_for(state)
    assert plain.fold_norm is False and "fold_norm" not in plain.to_dict()
    assert vgg.evaluate(folded).size.estimated_bytes == vgg.evaluate(plain).size.estimated_bytes - 8 * 320 + 8 * 5
    # a model without BatchNorm has nothing to fold: its plans stay version 2
    lenet_state = {k: (0.5, 4) for k in AutoSearch(small_session, "magnitude").layers}
    assert AutoSearch(small_session, "magnitude").plan_for(lenet_state).fold_norm is False
