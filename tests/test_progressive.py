"""Progressive evaluation (an estimate from a class-balanced subset first, exact numbers next) and background
anticipation of neighbouring plans (bounded, superseded by newer wishes, stepping aside for the foreground)."""

from __future__ import annotations

import time

import pytest
import torch

from xaicomp_core import CompressionPlan, CompressionSession, load_builtin_dataset, load_builtin_model
from xaicomp_core.evaluate.progressive import (
    MAX_ANTICIPATED,
    cancel_all,
    estimate_accuracy,
    neighbour_plans,
    quick_indices,
)

PLAN = CompressionPlan(criterion="magnitude", prune_ratio=0.8, bit_levels=[4, 2], bit_split=[0.5])


@pytest.fixture(scope="module")
def session() -> CompressionSession:
    model = load_builtin_model("fashion-lenet")
    return CompressionSession(model, load_builtin_dataset("fashion-mnist", "reference").balanced_subset(100),
                              load_builtin_dataset("fashion-mnist", "eval"))


def test_quick_subset_is_class_balanced_and_small(session):
    idx = session.quick_idx
    assert len(idx) == 250 and len(set(idx.tolist())) == 250
    counts = torch.bincount(session.y_eval[idx], minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    assert torch.equal(quick_indices(torch.arange(10) % 2), torch.arange(10))  # tiny sets: everything


def test_paired_estimate_by_hand():
    # 10 subset images, 100 in all; the compressed model loses images 0 and 1 and wins image 9
    base = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    comp = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    est = estimate_accuracy(comp, base, 0.85, 100)
    assert est.accuracy == pytest.approx(0.85 - 0.1)
    var = (3 + 1) / (10 + 2) - 0.1 ** 2
    assert est.stderr == pytest.approx((var / 10 * 0.9) ** 0.5)
    same = estimate_accuracy(base, base, 0.85, 100)
    assert same.accuracy == pytest.approx(0.85) and same.stderr > 0  # no flips seen is not certainty
    full = estimate_accuracy(comp, base, 0.85, 10)
    assert full.stderr == 0


def test_estimate_then_exact(session):
    plan = PLAN.replace(prune_ratio=0.83)
    est = session.estimate(plan)
    assert est.estimate and est.images == 250 and est.eval_images == 2000
    exact = session.evaluate(plan)
    assert not exact.estimate and exact.images == 2000
    # sizes, sparsity and bits are exact already in the estimate
    assert est.size.estimated_bytes == exact.size.estimated_bytes
    assert est.sparsity == exact.sparsity and est.mean_bits == exact.mean_bits
    # the estimate is close, within its stated uncertainty (4 standard errors, a failure chance far below 1e-3)
    assert abs(est.accuracy - exact.accuracy) <= 4 * est.accuracy_stderr + 1e-9
    # its subset predictions are the exact predictions on those images
    assert torch.equal(est.predictions, exact.predictions[session.quick_idx])
    assert session.estimate(plan) is exact  # once exact numbers exist, they are the first numbers


def test_each_image_runs_once_per_plan(session, monkeypatch):
    """The exact evaluation after an estimate runs only the images the estimate did not, on the same prepared
    fast forward, and its predictions equal a plan evaluated at once (the eager forward's top-1 on every image)."""
    fast = session._fast
    seen, prepared = [], []
    real_raw, real_prepare = fast.raw_logits, fast.prepare
    monkeypatch.setattr(fast, "raw_logits", lambda state, x, prep=None: seen.append(len(x)) or real_raw(state, x,
                                                                                                          prep))
    monkeypatch.setattr(fast, "prepare", lambda state: prepared.append(1) or real_prepare(state))
    plan = PLAN.replace(prune_ratio=0.71)
    session.estimate(plan)
    exact = session.evaluate(plan)
    assert seen == [250, 1750] and len(prepared) == 1
    at_once = PLAN.replace(prune_ratio=0.71, seed=1)  # magnitude ignores the seed: the same weights, a new key
    assert torch.equal(session.evaluate(at_once).predictions, exact.predictions)
    assert seen[-1] == 2000
    from xaicomp_core.evaluate.forward import forward_logits
    with torch.inference_mode():
        eager = forward_logits(session.compressed_model(plan), session.x_eval)
    assert torch.equal(eager.argmax(1), exact.predictions)


def test_anticipated_neighbours_are_cache_hits_equal_to_direct_evaluation(session):
    plan = PLAN.replace(prune_ratio=0.7)
    nbrs = neighbour_plans(plan)
    assert [round(p.prune_ratio, 2) for p in nbrs[:4]] == [0.75, 0.65, 0.8, 0.6]
    assert all(p.bit_split != plan.bit_split for p in nbrs[4:])
    session.anticipate(nbrs, owner="a")
    assert session.anticipator.wait_idle(timeout=600)
    assert all(session.is_cached(p) for p in nbrs)
    fresh = CompressionSession(session.model, (session.x_ref, session.y_ref), (session.x_eval, session.y_eval))
    for p in nbrs[:3]:
        a, b = session.cached(p), fresh.evaluate(p)
        assert torch.equal(a.predictions, b.predictions) and a.size.estimated_bytes == b.size.estimated_bytes


def test_background_waits_for_the_foreground(session):
    plans = [PLAN.replace(prune_ratio=r) for r in (0.41, 0.42)]
    with session.foreground():
        session.anticipate(plans, owner="b")
        time.sleep(1.0)  # the worker is running but must not complete anything while the foreground is held
        assert not any(session.is_cached(p) for p in plans)
    assert session.anticipator.wait_idle(timeout=600)
    assert all(session.is_cached(p) for p in plans)


def test_newer_wishes_replace_older_ones_and_are_bounded(session):
    with session.foreground():  # keep the worker paused while the wishes change
        session.anticipate([PLAN.replace(prune_ratio=0.3 + 0.001 * i) for i in range(20)], owner="c")
        assert session.anticipator.pending("c") <= MAX_ANTICIPATED
        newer = [PLAN.replace(prune_ratio=0.2), PLAN.replace(prune_ratio=0.21)]
        session.anticipate(newer, owner="c")
        assert session.anticipator.pending("c") <= 2
        session.cancel_anticipation("c")
        assert session.anticipator.pending("c") == 0
        session.anticipate(newer, owner="d")
        session.anticipate(newer, owner="e")
        assert session.anticipator.pending() == 4
        cancel_all()  # every session's, every owner's (what the tests do after each module)
        assert session.anticipator.pending() == 0
    assert session.anticipator.wait_idle(timeout=600)
    assert not session.is_cached(PLAN.replace(prune_ratio=0.21))


def test_background_starts_only_after_a_grace_period(session):
    """Work the user waits for is drawn before background work takes the cores: a plan asked for in the background
    starts no sooner than FOREGROUND_GRACE seconds after the last foreground call ended (a lower bound, whatever
    the machine's load), and is then computed."""
    from xaicomp_core.evaluate.session import FOREGROUND_GRACE

    plan = PLAN.replace(prune_ratio=0.62)
    with session.foreground():
        session.anticipate([plan], owner="grace")
    ended = time.monotonic()
    while time.monotonic() - ended < 0.8 * FOREGROUND_GRACE:
        assert not session.is_cached(plan) and plan.key() not in session._partial  # no image run yet
        time.sleep(0.01)
    assert session.anticipator.wait_idle(120)
    assert session.is_cached(plan)


def test_app_anticipates_the_comparison_at_every_prune_ratio(session):
    """After a release the app asks for the slider's neighbours (each with its comparison plan) first, then the
    comparison plan at every prune-ratio position, nearest first: a later release anywhere on the slider finds the
    comparison below it ready. Rule criteria (no prune ratio) get their neighbours only."""
    import pathlib
    import sys

    root = str(pathlib.Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # the app's pages package
    from pages.common import RATIO_MAX, RATIO_STEP, SPLIT_STEP, anticipated_plans, comparison_plan, default_plan

    plan = default_plan().replace(composite="epsilon")
    result = session.evaluate(plan.replace(criterion="magnitude"))  # only a rule criterion's comparison reads it
    plans = anticipated_plans(plan, result)
    keys = [p.key() for p in plans]
    assert len(keys) == len(set(keys)) <= MAX_ANTICIPATED
    nbrs = neighbour_plans(plan, ratio_step=RATIO_STEP, split_step=SPLIT_STEP)
    assert plans[:2 * len(nbrs)] == [q for p in nbrs for q in (p, comparison_plan(p, result))]
    positions = [round(k * RATIO_STEP, 6) for k in range(int(round(RATIO_MAX / RATIO_STEP)) + 1)]
    assert len(positions) == 20 and positions[-1] == 0.95
    comparisons = {comparison_plan(plan.replace(prune_ratio=r), result).key(): r for r in positions}
    assert set(comparisons) <= set(keys)  # the comparison at every position
    tail = [comparisons[k] for k in keys[2 * len(nbrs):]]
    assert tail == sorted(tail, key=lambda r: abs(r - plan.prune_ratio))  # nearest first
    assert all(p.criterion == "magnitude" for p in plans[2 * len(nbrs):])

    rule = plan.replace(criterion="paper")
    assert [p.criterion for p in anticipated_plans(rule, result)] == ["paper"] * len(neighbour_plans(rule))
