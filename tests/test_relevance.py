"""Per-weight LRP relevance against hand computation (float64), conservation, canonizers, model integrity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaicomp_core import COMPOSITES, compute_relevance, weight_relevance
from xaicomp_core.io.archs import FashionResNet, FashionVGG, LeNet5
from xaicomp_core.relevance.lrp import ExactMergeBatchNorm, RelevanceError

EPS = 1e-6


def stab(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (zennit's stabilizer)."""
    return z + eps * ((z == 0).to(z) + z.sign())


def hand_epsilon_lrp(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float = EPS):
    """LRP-epsilon written out: returns ({param name: relevance}, input relevance).

    Linear: R_ij = sum_n a_ni w_ji s_nj with s = R_out / stab(z). Conv: the same sum over batch and all output
    positions, written with explicit patches (unfold) and overlap-adding (fold).
    """
    acts = []
    a = x
    for idx, m in enumerate(model):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            z = m(a)
            acts.append((idx, m, a, z))
            a = z
        else:
            a = m(a)
    out = a
    R = torch.zeros_like(out)
    R[torch.arange(len(y)), y] = 1.0
    rel = {}
    for idx, m, a_in, z in reversed(acts):
        R = R.reshape(z.shape)
        s = R / stab(z, eps)
        if isinstance(m, nn.Linear):
            rel[f"{idx}.weight"] = m.weight * (s.T @ a_in)
            rel[f"{idx}.bias"] = m.bias * s.sum(0)
            R = a_in * (s @ m.weight)
        else:
            k, p, st = m.kernel_size, m.padding, m.stride
            patches = F.unfold(a_in, k, padding=p, stride=st)  # (N, Cin*k*k, L)
            s_flat = s.flatten(2)  # (N, Cout, L)
            w_mat = m.weight.reshape(m.out_channels, -1)
            rel[f"{idx}.weight"] = m.weight * torch.einsum("ncl,nkl->ck", s_flat, patches).view(m.weight.shape)
            rel[f"{idx}.bias"] = m.bias * s_flat.sum((0, 2))
            back = torch.einsum("ck,ncl->nkl", w_mat, s_flat)
            R = a_in * F.fold(back, a_in.shape[2:], k, padding=p, stride=st)
        # walk back through the (elementwise / reshaping) layers in between: relevance passes unchanged
    return rel, R


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()


def _convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 3),
    ).double().eval()


def _random_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("build,shape", [(_mlp, (9, 6)), (_convnet, (5, 2, 8, 8))])
def test_epsilon_matches_hand_computation(build, shape):
    model = build()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    res = compute_relevance(model, x, y, "epsilon", epsilon=EPS, keep_input=True, batch_size=3)
    with torch.no_grad():
        hand, hand_in = hand_epsilon_lrp(model, x, y)
    assert set(res.weights) == set(hand)
    for name, expected in hand.items():
        got = res.weights[name]
        assert got.shape == dict(model.named_parameters())[name].shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9, msg=name)
    torch.testing.assert_close(res.input, hand_in, rtol=0, atol=1e-9)


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_layer_conservation_weights_equal_inputs(composite):
    """Per layer: sum of weight relevance == sum of the layer's input relevance (exactly, for every rule)."""
    model = _random_bn(FashionVGG(width=4)).double().eval()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    res = compute_relevance(model, x, y, composite, batch_size=4)
    assert len(res.flows) == 7
    for name, flow in res.flows.items():
        assert flow.weight == pytest.approx(flow.input, rel=1e-9, abs=1e-9), name
    # the whole relevance flows from the logits (one unit per sample) into the first layer's weights and biases
    total = sum(f.weight + f.bias for f in res.flows.values())
    first = next(iter(reversed(res.flows.values())))
    assert first.input == pytest.approx(res.flows["features.0"].input)
    assert total != 0
    if composite == "epsilon":
        # with a vanishing epsilon: each layer's output relevance = its weights' + biases' relevance
        res = compute_relevance(model, x, y, composite, epsilon=1e-12)
        for name, flow in res.flows.items():
            assert flow.output == pytest.approx(flow.weight + flow.bias, rel=1e-7), name


def test_zplus_gives_negative_weights_zero():
    """epsilon-plus: z+ on convs -> every negative conv weight after a ReLU gets exactly 0 relevance."""
    model = LeNet5().double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    rel = weight_relevance(model, x, torch.tensor([0, 1, 2, 3]), "epsilon-plus")
    w = model.features[3].weight
    r = rel["features.3.weight"]
    assert torch.all(r[w < 0] == 0)
    assert (r[w > 0] != 0).any()


def test_batchnorm_merge_equals_hand_folded_network():
    torch.manual_seed(1)
    bn_model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
    ).double().eval()
    bn = bn_model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-0.5, 0.5)
    conv = bn_model[0]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4)).double().eval()
    with torch.no_grad():
        folded[0].weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded[0].bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        folded[3].load_state_dict(bn_model[4].state_dict())
    x = torch.randn(5, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    with torch.no_grad():
        torch.testing.assert_close(bn_model(x), folded(x))
        hand, _ = hand_epsilon_lrp(folded, x, y)
    rel = weight_relevance(bn_model, x, y, "epsilon")
    torch.testing.assert_close(rel["0.weight"], hand["0.weight"], rtol=0, atol=1e-9)
    torch.testing.assert_close(rel["0.bias"], hand["0.bias"], rtol=0, atol=1e-9)
    torch.testing.assert_close(rel["4.weight"], hand["3.weight"], rtol=0, atol=1e-9)
    assert set(rel) == {"0.weight", "0.bias", "4.weight", "4.bias"}  # no BatchNorm entries


def test_residual_model_conserves_relevance():
    """ResNet with the residual canonizer: pixel relevance + all bias relevance == one unit per sample."""
    model = _random_bn(FashionResNet(width=4)).double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    res = compute_relevance(model, x, y, "epsilon", epsilon=1e-12, stabilizer=1e-12, keep_input=True)
    bias_total = sum(float(v.sum()) for k, v in {**res.weights, **res.extra}.items() if k.endswith("bias"))
    total = float(res.input.sum()) + bias_total
    assert total == pytest.approx(3.0, rel=1e-8)
    # without routing the addition through a Sum layer the skip connections duplicate relevance
    bad = compute_relevance(model, x, y, "epsilon", epsilon=1e-12, stabilizer=1e-12, keep_input=True,
                            canonizers=[ExactMergeBatchNorm()])
    bad_bias = sum(float(v.sum()) for k, v in {**bad.weights, **bad.extra}.items() if k.endswith("bias"))
    assert abs(float(bad.input.sum()) + bad_bias - 3.0) > 0.05


def test_model_left_exactly_as_it_was():
    model = _random_bn(FashionResNet(width=4)).eval()
    params_before = {k: id(p) for k, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 28, 28)
    weight_relevance(model, x, torch.tensor([0, 1, 2, 3]), "epsilon-plus")
    assert {k: id(p) for k, p in model.named_parameters()} == params_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for k, v in state_before.items():
        assert torch.equal(v, state_after[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_same_inputs_give_identical_relevance():
    model = LeNet5().eval()
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    a = weight_relevance(model, x, y)
    b = weight_relevance(copy.deepcopy(model), x, y)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_sum_up():
    model = _convnet()
    x = torch.randn(7, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    one = weight_relevance(model, x, y, batch_size=7)
    many = weight_relevance(model, x, y, batch_size=2)
    for k in one:
        torch.testing.assert_close(one[k], many[k], rtol=0, atol=1e-12)


def test_predicted_target_and_progress():
    model = _mlp()
    x = torch.randn(10, 6, dtype=torch.float64)
    calls = []
    res = compute_relevance(model, x, None, target="predicted", batch_size=4,
                            progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert torch.equal(res.targets, res.logits.argmax(1))


def test_module_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    with pytest.raises(RelevanceError, match="more than once"):
        weight_relevance(Twice().eval(), torch.randn(2, 4), torch.tensor([0, 1]))


def test_unknown_composite_is_a_clear_error():
    from xaicomp_core import XaicompError

    with pytest.raises(XaicompError, match="unknown composite"):
        weight_relevance(_mlp(), torch.randn(2, 6, dtype=torch.float64), torch.tensor([0, 1]), "nope")


def test_by_class_sums():
    """by_class: signed sums unchanged; abs_by_class = sum over classes of |relevance of that class's samples|."""
    model = _convnet()
    x = torch.randn(12, 2, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    plain = compute_relevance(model, x, y, batch_size=5)
    grouped = compute_relevance(model, x, y, batch_size=3, by_class=True, keep_input=True)
    expected_abs = {k: torch.zeros_like(v) for k, v in plain.weights.items()}
    for c in range(3):
        part = weight_relevance(model, x[y == c], y[y == c])
        for k in expected_abs:
            expected_abs[k] += part[k].abs()
    for k in plain.weights:
        torch.testing.assert_close(grouped.weights[k], plain.weights[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(grouped.abs_by_class[k], expected_abs[k], rtol=0, atol=1e-12)
    torch.testing.assert_close(grouped.logits, plain.logits)  # outputs come back in the input order
    assert torch.equal(grouped.targets, y)
    single = compute_relevance(model, x[:1], y[:1], keep_input=True)
    torch.testing.assert_close(grouped.input[:1], single.input, rtol=0, atol=1e-12)
