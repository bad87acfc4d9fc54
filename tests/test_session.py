"""CompressionSession: exact baseline, sparsity, rules, caching, no mutation, working-copy correctness."""

from __future__ import annotations

import pytest
import torch

from xaicomp_core import CompressionPlan, CompressionSession, load_builtin_model
from xaicomp_core.evaluate.fast import exact_logits
from xaicomp_core.format.packing import pack
from xaicomp_core.io.models import state_dict_hash


def test_no_compression_reproduces_baseline_exactly(lenet_session):
    r = lenet_session.evaluate(CompressionPlan(prune_ratio=0.0, bit_levels=[32]))
    assert r.accuracy == r.baseline_accuracy
    assert torch.equal(r.predictions, lenet_session.baseline_pred)
    assert r.sparsity == 0 and r.mean_bits == 32
    assert r.size.estimated_bytes == r.size.fp32_bytes and r.compression_ratio == 1.0


@pytest.mark.parametrize("criterion", ["lrp", "lrp-signed", "magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_prune_ratio_gives_that_sparsity(lenet_session, criterion, scope):
    r = lenet_session.evaluate(CompressionPlan(criterion=criterion, prune_ratio=0.5, scope=scope))
    assert r.sparsity == pytest.approx(0.5, abs=0.01)
    if scope == "per-layer":
        for layer in r.layers:
            assert layer.sparsity == pytest.approx(0.5, abs=0.01)


def test_lrp_filter_is_structured(lenet_session):
    r = lenet_session.evaluate(CompressionPlan(criterion="lrp-filter", prune_ratio=0.3))
    assert r.sparsity == pytest.approx(0.3, abs=0.05)
    assert r.layers[-1].sparsity == 0  # the classifier's channels are classes
    cw = lenet_session.compress(CompressionPlan(criterion="lrp-filter", prune_ratio=0.3))
    from xaicomp_core.compress.layout import is_channel_structured

    assert all(is_channel_structured(cw.layout, cw.keep, i) for i in range(len(cw.layout.names)))


def test_removed_filters_output_exactly_zero(fashion_ref, fashion_eval):
    """lrp-filter removes filters: the channel's bias and following BatchNorm are zeroed, so it outputs 0."""
    model = load_builtin_model("fashion-resnet")
    s = CompressionSession(model, fashion_ref.balanced_subset(100), fashion_eval.balanced_subset(100))
    plan = CompressionPlan(criterion="lrp-filter", prune_ratio=0.3)
    cw = s.compress(plan)
    assert cw.overrides  # zeroed BatchNorm scale/shift of removed channels
    compressed = s.compressed_model(plan)
    acts = {}
    compressed.stem[2].register_forward_hook(lambda m, i, o: acts.__setitem__("stem", o))
    with torch.inference_mode():
        compressed(s.x_eval[:8])
    i = cw.layout.names.index("stem.0.weight")
    removed = ~cw.keep[cw.layout.layer_slice(i)].view(cw.layout.channels[i], -1).any(1)
    assert bool(removed.any()) and bool((acts["stem"][:, removed] == 0).all())
    assert torch.equal(s.compressed_logits(plan, s.x_eval[:8]), exact_logits(s.compressed_model(plan), s.x_eval[:8]))
    assert s.check_unchanged()
    # unstructured plans keep biases as they are
    assert not s.compress(CompressionPlan(criterion="magnitude", prune_ratio=0.9)).overrides


def test_paper_and_zero_rules_prune_exactly_those_weights(lenet_session):
    rel = lenet_session.relevance().weights
    layout = lenet_session.layout
    flat_rel = layout.flat(rel)
    cw = lenet_session.compress(CompressionPlan(criterion="paper"))
    assert torch.equal(~cw.keep, flat_rel <= 0)
    cw = lenet_session.compress(CompressionPlan(criterion="lrp-zero"))
    assert torch.equal(~cw.keep, flat_rel == 0)


def test_working_copy_equals_a_fresh_compressed_model(lenet_session):
    plan = CompressionPlan(criterion="lrp", prune_ratio=0.6, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])
    r = lenet_session.evaluate(plan)
    model = lenet_session.compressed_model(plan)
    with torch.inference_mode():
        logits = model(lenet_session.x_eval)
    assert torch.equal(logits.argmax(1), r.predictions)
    logits = exact_logits(model, lenet_session.x_eval)  # the session's (fast exact) forward
    assert torch.equal(lenet_session.compressed_logits(plan), logits)
    # evaluating other plans in between leaves no trace
    lenet_session.evaluate(CompressionPlan(criterion="magnitude", prune_ratio=0.9, bit_levels=[2]))
    assert torch.equal(lenet_session.compressed_logits(plan), logits)


def test_cached_model_is_never_mutated(lenet_session):
    h = state_dict_hash(lenet_session.model)
    for ratio in (0.1, 0.7, 0.95):
        lenet_session.evaluate(CompressionPlan(criterion="lrp", prune_ratio=ratio, bit_levels=[4]))
    lenet_session.compressed_model(CompressionPlan(prune_ratio=0.5))
    assert state_dict_hash(lenet_session.model) == h == lenet_session.model_hash
    assert lenet_session.check_unchanged()


def test_results_are_cached_and_deterministic(lenet_session):
    plan = CompressionPlan(criterion="random", prune_ratio=0.4, seed=7)
    a = lenet_session.evaluate(plan)
    assert lenet_session.evaluate(plan) is a
    b = lenet_session.evaluate(plan.replace(seed=8))
    assert a.size.estimated_bytes != b.size.estimated_bytes or not torch.equal(a.predictions, b.predictions)


def test_mixed_precision_bits_and_protection(lenet_session):
    r = lenet_session.evaluate(CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2],
                                               bit_split=[0.2, 0.5]))
    assert r.mean_bits == pytest.approx(0.2 * 8 + 0.5 * 4 + 0.3 * 2, abs=0.01)
    assert r.compression_ratio > 5
    p = lenet_session.evaluate(CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[4],
                                               protect="first-last"))
    assert p.layers[0].sparsity == 0 and p.layers[0].mean_bits == 32 and p.layers[0].protected
    assert p.layers[-1].sparsity == 0 and p.layers[-1].protected
    assert p.layers[1].mean_bits == 4
    assert p.sparsity == pytest.approx(0.5, abs=0.01)


def test_per_class_accuracy_is_consistent(lenet_session):
    r = lenet_session.evaluate(CompressionPlan(criterion="lrp", prune_ratio=0.7))
    # the evaluation subset is class-balanced, so the mean of per-class accuracies is the accuracy
    assert sum(r.per_class_accuracy) / 10 == pytest.approx(r.accuracy)
    d = r.to_dict()
    assert set(d["per_class_accuracy"]) == set(r.class_names)
    for key in ("accuracy", "baseline_accuracy", "sparsity", "compression_ratio", "size", "layers"):
        assert key in d


def test_relevance_is_computed_once_per_composite(lenet_session):
    a = lenet_session.relevance()
    assert lenet_session.relevance() is a
    assert lenet_session.has_relevance("epsilon")


def test_session_accepts_tensor_pairs_and_other_composites(fashion_ref, fashion_eval):
    model = load_builtin_model("fashion-lenet")
    pre = model.xaicomp_info.preprocessing
    x, y = fashion_eval.balanced_subset(200).tensors(pre)
    s = CompressionSession(model, fashion_ref.balanced_subset(100), (x, y), composite="epsilon-plus")
    r = s.evaluate(CompressionPlan(criterion="paper", composite="epsilon-plus"))
    # z+ gives every negative conv weight zero relevance, so the paper rule prunes at least those
    conv_w = model.features[3].weight
    assert r.layers[1].sparsity >= float((conv_w < 0).float().mean()) - 1e-9
    assert s.has_relevance("epsilon-plus") and not s.has_relevance("epsilon")


def test_input_relevance_for_original_and_compressed(lenet_session):
    h0, logits0 = lenet_session.input_relevance([0, 1, 2])
    h1, _ = lenet_session.input_relevance([0, 1, 2], CompressionPlan(criterion="lrp", prune_ratio=0.8))
    assert h0.shape == (3, 28, 28) and logits0.shape == (3, 10)
    assert not torch.equal(h0, h1)


def test_finetune_keeps_masks_bits_and_size(fashion_ref, fashion_eval):
    from xaicomp_core import load_builtin_dataset

    model = load_builtin_model("fashion-lenet")
    train = load_builtin_dataset("fashion-mnist", "train").balanced_subset(1000)
    s = CompressionSession(model, fashion_ref.balanced_subset(200), fashion_eval.balanced_subset(500),
                           train_data=train)
    plan = CompressionPlan(criterion="magnitude", prune_ratio=0.9, bit_levels=[4, 2], bit_split=[0.3])
    base = s.compress(plan)
    steps = []
    tuned_plan = plan.replace(finetune_epochs=1)
    tuned = s.compress(tuned_plan, progress=lambda d, t: steps.append((d, t)))
    assert steps[-1] == (8, 8)
    assert torch.equal(tuned.keep, base.keep) and torch.equal(tuned.quant.klass, base.quant.klass)
    # the same sections but the values, which are sized from the fine-tuned codes (as the packed file holds them)
    for t0, t1 in zip(base.size.tensors, tuned.size.tensors):
        assert (t0.keep_bytes, t0.class_bytes, t0.scale_bytes, t0.raw_bytes) == (
            t1.keep_bytes, t1.class_bytes, t1.scale_bytes, t1.raw_bytes)
    assert tuned.size.estimated_bytes == pack(tuned, model.state_dict(), s.info).payload_bytes
    assert not torch.equal(tuned.quant.values, base.quant.values)
    r0, r1 = s.evaluate(plan), s.evaluate(tuned_plan)
    assert r1.accuracy > r0.accuracy  # 90 % pruned at 4/2 bits loses a lot; one epoch recovers some
    assert r1.sparsity == r0.sparsity and r1.size.estimated_bytes == tuned.size.estimated_bytes
    # the plan's batch size is the fine-tuning's: 1,000 images in batches of 32 are 32 steps, and other weights
    steps.clear()
    small = s.compress(tuned_plan.replace(finetune_batch=32), progress=lambda d, t: steps.append((d, t)))
    assert steps[-1] == (32, 32) and not torch.equal(small.quant.values, tuned.quant.values)
    assert torch.equal(small.keep, base.keep) and small.size.estimated_bytes == pack(
        small, model.state_dict(), s.info).payload_bytes
    assert s.check_unchanged()
    no_train = CompressionSession(model, fashion_ref.balanced_subset(50), fashion_eval.balanced_subset(100))
    from xaicomp_core import PlanError

    with pytest.raises(PlanError, match="needs training data"):
        no_train.evaluate(tuned_plan)


@pytest.mark.parametrize("name", ["fashion-vgg", "fashion-resnet"])
def test_baseline_in_parts_with_progress(name, fashion_ref, fashion_eval):
    """The constructor reports the baseline pass image by image (the app's cold-start panel), and the logits
    computed in parts are exactly those of one pass."""
    model = load_builtin_model(name)
    seen = []
    parts = CompressionSession(model, fashion_ref, fashion_eval, reference_samples=20,
                               prepare_progress=lambda done, total: seen.append((done, total)))
    with parts._lock:
        whole = parts._forward()  # the whole evaluation set in one call of the fast forward
    n = len(parts.y_eval)
    assert seen[0] == (0, n) and seen[-1] == (n, n) and len(seen) > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert torch.equal(parts.baseline_logits, whole)
