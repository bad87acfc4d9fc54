"""The fast exact forward (xaicomp_core/evaluate/fast.py): BatchNorm folded per plan, the same top-1 as the eager
forward on every evaluation image of the built-in models, logits within 1e-4, near-ties settled by the reference,
and a silent fallback to the eager forward for models it does not handle."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from xaicomp_core import CompressionPlan, CompressionSession, load_builtin_model
from xaicomp_core.evaluate.fast import (
    MARGIN_BOUND,
    FastForward,
    Unsupported,
    exact_logits,
    needs_reference,
    ort_available,
    trace_ops,
)
from xaicomp_core.evaluate.session import forward_logits
from xaicomp_core.io.data import as_tensors
from xaicomp_core.io.export import export_packed, verify_packed
from xaicomp_core.io.models import model_info

BUILTINS = ["fashion-vgg", "fashion-lenet", "fashion-resnet"]
PLANS = {
    "lrp-842": CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5]),
    "magnitude-0.8-4bit": CompressionPlan(criterion="magnitude", prune_ratio=0.8, bit_levels=[4]),
    "lrp-filter-0.3": CompressionPlan(criterion="lrp-filter", prune_ratio=0.3),
    "random-0.95-2bit": CompressionPlan(criterion="random", prune_ratio=0.95, bit_levels=[2]),
}
TOL = 1e-4


@pytest.fixture(scope="module", params=BUILTINS)
def full_session(request, fashion_ref, fashion_eval):
    """A session on a built-in model with the whole evaluation set (relevance from 200 reference images)."""
    return CompressionSession(load_builtin_model(request.param), fashion_ref, fashion_eval, reference_samples=200)


def _reference(session: CompressionSession, plan: CompressionPlan | None) -> torch.Tensor:
    """Today's reference: the eager fp32 forward of the (compressed) model, batches of 1000, inference mode."""
    model = session.model if plan is None else session.compressed_model(plan)
    return forward_logits(model, session.x_eval, session.eval_batch_size)


def _assert_exact(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    mism = int((fast.argmax(1) != ref.argmax(1)).sum())
    assert mism == 0, f"{mism} of {len(ref)} top-1 predictions differ from the eager forward"
    delta = float((fast - ref).abs().max())
    assert delta <= TOL, f"max |delta logit| {delta:.3g} > {TOL}"


# ----------------------------------------------------------------------------------------------------------------
# exactness on the built-ins, every evaluation image
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_baseline_is_exact_on_every_image(full_session):
    s = full_session
    assert s.forward_backend in ("onnxruntime", "torch")  # the fast path is in use, not the eager fallback
    assert len(s.x_eval) == 2000
    ref = _reference(s, None)
    _assert_exact(s.baseline_logits, ref)
    assert torch.equal(s.baseline_pred, ref.argmax(1))
    assert s.baseline_correct == int((ref.argmax(1) == s.y_eval).sum())
    assert s.check_unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_compressed_plans_are_exact_on_every_image(full_session, plan_name):
    s = full_session
    plan = PLANS[plan_name]
    ref = _reference(s, plan)
    _assert_exact(s.compressed_logits(plan), ref)
    r = s.evaluate(plan)
    assert torch.equal(r.predictions, ref.argmax(1))
    assert r.correct == int((ref.argmax(1) == s.y_eval).sum())
    if plan.criterion == "lrp-filter" and s.info.name != "fashion-lenet":  # BatchNorm scale/shift overrides
        bns = set(s.compressor.following_bn.values())
        assert any(k.rsplit(".", 1)[0] in bns for k in s.compress(plan).overrides)
    assert s.check_unchanged()


@pytest.mark.parametrize("name", BUILTINS)
def test_every_batchnorm_is_folded(name):
    ops, _ = trace_ops(load_builtin_model(name))
    assert not [op for op in ops if op.kind in ("affine", "relu")]  # folded into convs, fused into their producers
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in load_builtin_model(name).modules())
    assert sum(op.bn is not None for op in ops) == n_bn


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", BUILTINS)
def test_each_backend_is_exact_and_deterministic(name, backend, fashion_eval):
    if backend == "onnxruntime" and not ort_available():
        pytest.skip("onnxruntime is not installed")
    model = load_builtin_model(name)
    info = model_info(model)
    x, _ = as_tensors(fashion_eval.balanced_subset(500), info.preprocessing, info.num_classes, "eval")

    def ref_fn(t: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, t)

    ff = FastForward.build(model, x[:64], ref_fn, backend=backend)
    assert ff is not None and ff.backend == backend
    state = model.state_dict()
    fast = ff.logits(state, x, ref_fn)
    _assert_exact(fast, ref_fn(x))
    assert torch.equal(fast, ff.logits(state, x, ref_fn))


class _Mixed(nn.Module):
    """Everything else the fast path handles: a BatchNorm that cannot be folded (on the input, and after a conv
    whose output also feeds a skip), average and global pooling, BatchNorm1d after a linear layer, functional
    ReLU, ``flatten`` as a method, a conv with bias, stride, dilation and groups, a ReLU module used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(1)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.bn2 = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(12, 10)
        for bn in (self.bn_in, self.bn1, self.bn2):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):  # noqa: D102
        a = self.conv1(self.bn_in(x))
        b = self.relu(self.conv2(a) + a)  # conv1's output feeds two ops: its BatchNorm stays separate
        b = self.relu(self.bn1(b))
        c = torch.relu(self.conv3(self.pool(b)))
        h = torch.nn.functional.relu(self.bn2(self.fc1(self.gap(c).flatten(1))))
        return self.fc2(self.drop(h))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_other_supported_layers_are_exact(backend):
    if backend == "onnxruntime" and not ort_available():
        pytest.skip("onnxruntime is not installed")
    torch.manual_seed(3)
    model = _Mixed().eval()
    kinds = [op.kind for op in trace_ops(model)[0]]
    assert kinds.count("affine") == 2 and "avgpool" in kinds and "gap" in kinds  # bn2 folded into fc1
    x = torch.randn(600, 1, 28, 28)

    def ref_fn(t: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, t)

    ff = FastForward.build(model, x[:64], ref_fn, backend=backend)
    assert ff is not None
    _assert_exact(ff.logits(model.state_dict(), x, ref_fn), ref_fn(x))


# ----------------------------------------------------------------------------------------------------------------
# near-ties
# ----------------------------------------------------------------------------------------------------------------
def test_needs_reference_marks_near_ties_and_non_finite_rows():
    logits = torch.tensor([[5.0, 1.0, 0.0],                     # clear winner
                           [2.0, 2.0 - MARGIN_BOUND / 2, 0.0],  # inside the bound
                           [3.0, 3.0, 3.0],                     # exact tie
                           [1.0, float("nan"), 0.0],            # not finite
                           [float("inf"), 1.0, 0.0]])
    assert needs_reference(logits).tolist() == [False, True, True, True, True]


class _Twins(nn.Module):
    """Every image ties exactly between classes 0 and 1 (identical rows of the last layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 28 * 28, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.fc.weight[1] = self.fc.weight[0]
            self.fc.bias[1] = self.fc.bias[0]
            self.fc.bias[0] += 10.0  # both tied classes win
            self.fc.bias[1] += 10.0

    def forward(self, x):  # noqa: D102
        return self.fc(self.flatten(self.relu(self.bn(self.conv(x)))))


def test_near_ties_take_the_reference_logits(fashion_eval):
    torch.manual_seed(1)
    model = _Twins().eval()
    x = torch.randn(300, 1, 28, 28)
    calls = []

    def ref_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(len(t))
        return forward_logits(model, t)

    ff = FastForward.build(model, x[:32], ref_fn)
    assert ff is not None
    calls.clear()
    ref = ref_fn(x)
    calls.clear()
    fast = ff.logits(model.state_dict(), x, ref_fn)
    assert calls == [300]  # every image is a tie: all re-run by the reference
    assert torch.equal(fast, ref) and torch.equal(fast.argmax(1), ref.argmax(1))
    # without the safeguard the raw logits may break the tie either way; with it, never
    assert bool(needs_reference(ff.raw_logits(model.state_dict(), x)).all())


# ----------------------------------------------------------------------------------------------------------------
# fallback to the eager forward
# ----------------------------------------------------------------------------------------------------------------
class _ShapeTrick(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.GELU()  # not a supported layer
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):  # noqa: D102
        return self.fc(self.act(self.conv(x)).reshape(x.size(0), -1))  # shape trick


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x):  # noqa: D102
        return self.fc(self.flatten(self.conv(self.conv(x))))  # one module used twice


@pytest.mark.parametrize("cls", [_ShapeTrick, _Twice])
def test_unsupported_models_fall_back_to_the_eager_forward(cls, fashion_ref, fashion_eval):
    torch.manual_seed(0)
    model = cls().eval()
    with pytest.raises(Unsupported):
        trace_ops(model)
    s = CompressionSession(model, fashion_ref.balanced_subset(50), fashion_eval.balanced_subset(200))
    assert s.forward_backend == "eager"
    assert torch.equal(s.baseline_logits, forward_logits(model, s.x_eval))
    plan = CompressionPlan(criterion="magnitude", prune_ratio=0.5, bit_levels=[4])
    assert torch.equal(s.compressed_logits(plan), forward_logits(s.compressed_model(plan), s.x_eval))
    assert torch.equal(s.evaluate(plan).predictions, forward_logits(s.compressed_model(plan), s.x_eval).argmax(1))
    assert torch.equal(exact_logits(model, s.x_eval), forward_logits(model, s.x_eval))
    assert s.check_unchanged()


def test_model_with_hooks_falls_back(fashion_eval):
    model = load_builtin_model("fashion-lenet")
    model.features[0].register_forward_hook(lambda m, i, o: o * 2)  # changes the output
    x = fashion_eval.balanced_subset(100)
    s = CompressionSession(model, x, x)
    assert s.forward_backend == "eager"
    assert torch.equal(s.baseline_logits, forward_logits(model, s.x_eval))


def test_without_onnxruntime_the_torch_backend_is_used():
    """onnxruntime made unimportable in a fresh interpreter: the session still builds a fast path (torch)."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "import torch; torch.set_num_threads(2)\n"
        "from xaicomp_core import CompressionSession, load_builtin_model, load_builtin_dataset\n"
        "from xaicomp_core.evaluate.session import forward_logits\n"
        "ev = load_builtin_dataset('fashion-mnist', 'eval').balanced_subset(300)\n"
        "m = load_builtin_model('fashion-resnet')\n"
        "s = CompressionSession(m, ev, ev)\n"
        "ref = forward_logits(m, s.x_eval)\n"
        "assert torch.equal(s.baseline_pred, ref.argmax(1))\n"
        "assert float((s.baseline_logits - ref).abs().max()) <= 1e-4\n"
        "print(s.forward_backend)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "torch"


# ----------------------------------------------------------------------------------------------------------------
# one path for every number; threads
# ----------------------------------------------------------------------------------------------------------------
def test_verify_reproduces_the_session_logits_bit_for_bit(lenet_session):
    plan = PLANS["lrp-filter-0.3"]
    res = export_packed(lenet_session, plan)
    v = verify_packed(res.data, lenet_session.x_eval, lenet_session.y_eval)
    assert v.ok and v.logits_match and v.correct == lenet_session.evaluate(plan).correct


def test_concurrent_calls_give_the_sequential_results(lenet_session):
    plans = [CompressionPlan(criterion="magnitude", prune_ratio=r, bit_levels=[4]) for r in (0.2, 0.5, 0.8, 0.9)]
    expected = [lenet_session.compressed_logits(p) for p in plans]
    got: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        got[i] = lenet_session.compressed_logits(plans[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], expected[i]) for i in range(len(plans)))
    assert lenet_session.check_unchanged()
