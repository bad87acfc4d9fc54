"""The fused LRP-epsilon pass (relevance/fused.py) against the zennit path, the hand computations and the dispatch."""

from __future__ import annotations

import copy

import pytest
import torch
from test_relevance import EPS, _convnet, _mlp, _random_bn, hand_epsilon_lrp
from torch import nn
from torchvision.models.resnet import Bottleneck

from xaicomp_core.io.archs import FashionResNet, FashionVGG
from xaicomp_core.io.data import as_tensors
from xaicomp_core.io.models import load_builtin_model, model_info
from xaicomp_core.relevance import fused as fused_mod
from xaicomp_core.relevance import lrp
from xaicomp_core.relevance.lrp import ExactMergeBatchNorm, RelevanceError, compute_relevance

BUILTIN = ["fashion-vgg", "fashion-lenet", "fashion-resnet"]


def rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (0 where both are all zero)."""
    scale = float(expected.abs().max())
    diff = float((got - expected).abs().max())
    return diff / scale if scale > 0 else diff


def flow_table(res) -> tuple[list[str], list[str], torch.Tensor]:
    names = sorted(res.flows)
    rules = [res.flows[n].rule for n in names]
    values = torch.tensor([[res.flows[n].input, res.flows[n].output, res.flows[n].weight, res.flows[n].bias]
                           for n in names], dtype=torch.float64)
    return names, rules, values


def assert_same(fused, zennit, tol: float, input_tol: float | None = None) -> None:
    """Every part of two RelevanceResults agrees to ``tol`` relative (per tensor)."""
    assert list(fused.weights) == list(zennit.weights)
    for k, v in zennit.weights.items():
        assert fused.weights[k].shape == v.shape and fused.weights[k].dtype == v.dtype, k
        assert rel_diff(fused.weights[k], v) <= tol, (k, rel_diff(fused.weights[k], v))
    assert sorted(fused.extra) == sorted(zennit.extra)
    for k, v in zennit.extra.items():
        assert rel_diff(fused.extra[k], v) <= tol, (k, rel_diff(fused.extra[k], v))
    assert (fused.abs_by_class is None) == (zennit.abs_by_class is None)
    if zennit.abs_by_class is not None:
        assert list(fused.abs_by_class) == list(zennit.abs_by_class)
        for k, v in zennit.abs_by_class.items():
            assert rel_diff(fused.abs_by_class[k], v) <= tol, (k, rel_diff(fused.abs_by_class[k], v))
    assert (fused.input is None) == (zennit.input is None)
    if zennit.input is not None:
        assert rel_diff(fused.input, zennit.input) <= (tol if input_tol is None else input_tol)
    f_names, f_rules, f_values = flow_table(fused)
    z_names, z_rules, z_values = flow_table(zennit)
    assert f_names == z_names and f_rules == z_rules
    assert rel_diff(f_values, z_values) <= tol
    assert rel_diff(fused.logits, zennit.logits) <= tol
    assert torch.equal(fused.targets, zennit.targets)
    assert fused.samples == zennit.samples and fused.composite == zennit.composite


@pytest.fixture
def builds(monkeypatch):
    """Counts the fused networks built (the real class, only counted), to see which path ran."""
    made = []

    class Counted(fused_mod.FusedEpsilon):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lrp, "FusedEpsilon", Counted)
    return made


def _builtin(name: str, fashion_ref, n: int = 40):
    model = load_builtin_model(name)
    x, y = as_tensors(fashion_ref, model_info(model).preprocessing, 10)
    return model, x[:n], y[:n]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_models_fused_equals_zennit(name, fashion_ref, builds):
    """Same memory layout as zennit's hooks compute in (contiguous NCHW): the same numbers, to 1e-4."""
    model, x, y = _builtin(name, fashion_ref)
    x = x.clone(memory_format=torch.contiguous_format)
    kw = dict(keep_input=True, by_class=True, batch_size=16)
    zennit = compute_relevance(model, x, y, fused=False, **kw)
    assert not builds
    fused = compute_relevance(model, x, y, **kw)  # auto: the fused path
    assert builds
    assert_same(fused, zennit, 1e-4)
    plain = compute_relevance(model, x, y, batch_size=16)  # no input relevance: the first layer skips its gradient
    assert_same(plain, compute_relevance(model, x, y, batch_size=16, fused=False), 1e-4)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_models_float32_in_the_data_layout(name, fashion_ref, builds):
    """The shipped data as it is (1-channel strides that PyTorch runs channels-last): both paths compute in the
    model's own layout, so float32 agrees to 1e-4 (without the layout hook zennit's path ran NCHW: 9e-4 on the
    ResNet's layer3)."""
    model, x, y = _builtin(name, fashion_ref)
    assert x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)
    kw = dict(keep_input=True, by_class=True, batch_size=20)
    zennit = compute_relevance(model, x, y, fused=False, **kw)
    assert not builds
    fused = compute_relevance(model, x, y, **kw)
    assert builds
    assert_same(fused, zennit, 1e-4, input_tol=float("inf"))  # max pooling may route a tie to another pixel
    assert rel_diff(fused.input.flatten(1).sum(1), zennit.input.flatten(1).sum(1)) <= 1e-4


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_models_float64_in_the_data_layout(name, fashion_ref):
    """The data's own layout (channels-last strides, like the model itself computes in) against zennit's, in float64
    where rounding does not hide a wrong rule: parameters, flows and per-sample input relevance agree."""
    model, x, y = _builtin(name, fashion_ref, 24)
    model = copy.deepcopy(model).double()
    x = x.double()
    assert x.is_contiguous(memory_format=torch.channels_last)
    kw = dict(keep_input=True, by_class=True, batch_size=8)
    fused = compute_relevance(model, x, y, fused=True, **kw)
    zennit = compute_relevance(model, x, y, fused=False, **kw)
    # max pooling may route a tie between equal neighbours (flat background) to another of them: per-pixel input
    # relevance is compared through its per-sample totals
    assert_same(fused, zennit, 1e-9, input_tol=float("inf"))
    assert rel_diff(fused.input.flatten(1).sum(1), zennit.input.flatten(1).sum(1)) <= 1e-9


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("build,shape", [(_mlp, (9, 6)), (_convnet, (5, 2, 8, 8))])
def test_hand_computation_both_paths(build, shape, fused):
    model = build()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    res = compute_relevance(model, x, y, "epsilon", epsilon=EPS, keep_input=True, batch_size=3, fused=fused)
    with torch.no_grad():
        hand, hand_in = hand_epsilon_lrp(model, x, y)
    assert set(res.weights) == set(hand)
    for name, expected in hand.items():
        torch.testing.assert_close(res.weights[name], expected, rtol=0, atol=1e-9, msg=name)
    torch.testing.assert_close(res.input, hand_in, rtol=0, atol=1e-9)
    # the first layer's input flow without its input gradient (sum s (z - b)) is the same sum
    plain = compute_relevance(model, x, y, "epsilon", epsilon=EPS, batch_size=3, fused=fused)
    first = next(reversed(plain.flows.values()))
    assert first.input == pytest.approx(float(hand_in.sum()), rel=1e-9, abs=1e-12)


def _odd_layers() -> nn.Module:
    """Unmerged BatchNorm (Pass), in-place activations, average pooling (Norm), dropout, a bias-free conv."""
    return nn.Sequential(
        nn.BatchNorm2d(2), nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1, True),
        nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Dropout(0.5), nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Identity(), nn.Linear(6, 3),
    ).double()


def _bottleneck_net() -> nn.Module:
    """torchvision Bottleneck blocks (one plain, one strided with a downsample branch), average pooling."""
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        Bottleneck(8, 2), Bottleneck(8, 4, stride=2, downsample=down), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


@pytest.mark.parametrize("build,shape", [
    (lambda: _random_bn(FashionVGG(width=4)).double(), (6, 1, 28, 28)),
    (lambda: _random_bn(FashionResNet(width=4)).double(), (5, 1, 28, 28)),
    (lambda: _random_bn(_bottleneck_net()), (5, 1, 10, 10)),
    (lambda: _random_bn(_odd_layers()), (7, 2, 8, 8)),
    (_mlp, (9, 6)),
])
def test_float64_nets_fused_equals_zennit(build, shape, builds):
    model = build().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    for kw in (dict(keep_input=True, batch_size=4), dict(by_class=True, batch_size=2),
               dict(target="predicted", by_class=True, epsilon=1e-3, stabilizer=1e-4)):
        zennit = compute_relevance(model, x, y, fused=False, **kw)
        fused = compute_relevance(model, x, y, **kw)
        assert_same(fused, zennit, 1e-9)
    assert len(builds) == 3


def test_merged_batchnorm_bias_goes_to_extra():
    model = _random_bn(_odd_layers()).eval()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    res = compute_relevance(model, x, y, fused=True)
    assert list(res.extra) == ["1.bias"]  # the bias-free conv followed by BatchNorm
    assert "1.bias" not in res.weights and res.extra["1.bias"].shape == (4,)
    assert res.extra["1.bias"].abs().sum() > 0


def test_progress_predicted_and_check():
    model = _convnet()
    x = torch.randn(10, 2, 8, 8, dtype=torch.float64)
    calls = []
    res = compute_relevance(model, x, None, target="predicted", batch_size=4, fused=True,
                            progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert torch.equal(res.targets, res.logits.argmax(1))
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(x), rtol=0, atol=1e-12)

    class Reordered(nn.Module):  # BatchNorm registered after the conv but applied after the ReLU: merging is wrong
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.bn(torch.relu(self.conv(x))).flatten(1))

    bad = _random_bn(Reordered()).double().eval()
    xb = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    for fused in (True, False):
        with pytest.raises(RelevanceError, match="canonized model's outputs differ"):
            compute_relevance(bad, xb, torch.tensor([0, 1, 0]), fused=fused)


def test_model_left_untouched_and_mode_restored():
    model = _random_bn(FashionVGG(width=4)).train()
    params_before = {k: id(p) for k, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_relevance(model, torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), fused=True, keep_input=True)
    assert model.training
    assert {k: id(p) for k, p in model.named_parameters()} == params_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) in (FashionVGG, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten,
                           nn.Linear, nn.Dropout) for m in model.modules())


def test_other_composite_falls_back(builds):
    model = _convnet()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    res = compute_relevance(model, x, y, "epsilon-plus")
    assert not builds
    ref = compute_relevance(model, x, y, "epsilon-plus", fused=False)
    assert all(torch.equal(res.weights[k], ref.weights[k]) for k in ref.weights)
    with pytest.raises(RelevanceError, match="'epsilon' composite only"):
        compute_relevance(model, x, y, "epsilon-plus", fused=True)
    compute_relevance(model, x, y, canonizers=[ExactMergeBatchNorm()])  # explicit canonizers: zennit's hooks
    assert not builds
    with pytest.raises(RelevanceError, match="automatic canonizers"):
        compute_relevance(model, x, y, canonizers=[], fused=True)


def test_unsupported_module_falls_back(builds):
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    assert "LayerNorm" in fused_mod.unsupported_reason(model)
    res = compute_relevance(model, x, y)
    assert not builds
    ref = compute_relevance(model, x, y, fused=False)
    assert all(torch.equal(res.weights[k], ref.weights[k]) for k in ref.weights)
    with pytest.raises(RelevanceError, match="LayerNorm"):
        compute_relevance(model, x, y, fused=True)
    assert "single layer" in fused_mod.unsupported_reason(nn.Linear(3, 2))
    shared = nn.Linear(4, 4)
    assert "more than once" in fused_mod.unsupported_reason(nn.Sequential(shared, nn.ReLU(), shared))


def test_module_called_twice_falls_back_to_zennits_refusal(builds):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model = Twice().eval()
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(RelevanceError, match="more than once per forward pass; LRP needs"):  # zennit's check
        compute_relevance(model, x, y)
    assert builds  # the fused pass saw it first and handed over
    with pytest.raises(RelevanceError, match="fused LRP-epsilon pass does not apply.*more than once"):
        compute_relevance(model, x, y, fused=True)


def test_in_place_forward_falls_back(builds):
    class InPlace(nn.Module):  # changes a conv output in place: the fused pass cannot keep it, zennit's hooks can
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            z = self.conv(x)
            z += 0.5
            return self.fc(torch.relu(z).flatten(1))

    model = InPlace().double().eval()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    res = compute_relevance(model, x, y, keep_input=True)
    assert builds
    ref = compute_relevance(model, x, y, keep_input=True, fused=False)
    assert_same(res, ref, 0.0)
