"""The hybrid, |R|·|w| and iterative criteria and the hooks they use (budgets, per-layer plan fields, relevance of a
modified model): masks on a tiny hand-made net equal the recipes worked out by hand; sparsity equals the ratio; the
session caches the iterative scores per schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaicomp_core import CompressionPlan, PlanError, compress, compute_relevance
from xaicomp_core.compress.criteria import CRITERION_REGISTRY, ScoreInputs, get_criterion

# Two bias-free linear layers: "0" (2x3) and "2" (2x2); flat order a00 a01 a02 a10 a11 a12 b00 b01 b10 b11.
W_A = torch.tensor([[0.1, -0.2, 0.3], [-0.4, 0.5, -0.6]])
W_B = torch.tensor([[0.7, -0.8], [0.9, -1.0]])
R_A = torch.tensor([[5.0, 1.0, 4.0], [2.0, 6.0, 3.5]])
R_B = torch.tensor([[1.1, 3.0], [1.5, 0.25]])
NAMES = ["a00", "a01", "a02", "a10", "a11", "a12", "b00", "b01", "b10", "b11"]


def tiny_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W_A)
        net[2].weight.copy_(W_B)
    return net.eval()


RELEVANCE = {"0.weight": R_A, "2.weight": R_B}


def pruned(net: nn.Module, plan: CompressionPlan, relevance=RELEVANCE, relevance_of=None) -> set[str]:
    cw = compress(net, plan, relevance, relevance_of)
    return {n for n, k in zip(NAMES, cw.keep.tolist()) if not k}


def test_new_criteria_are_registered_with_their_recipe():
    for name in ("lrp-x-weight", "lrp-budget-magnitude", "lrp-budget-x-weight", "lrp-iterative",
                 "lrp-x-weight-iterative"):
        c = CRITERION_REGISTRY.get(name)
        assert c.uses_ratio and c.needs_relevance and c.description and c.label
        assert "Recipe" in type(c).__doc__ or "recipe" in type(c).__doc__.lower()


def test_relevance_times_weight_by_hand():
    # |R|*|w|: a 0.5 0.2 1.2 0.8 3.0 2.1, b 0.77 2.4 1.35 0.25 -> ascending a01 b11 a00 b00 a10 a02 b10 a12 b01 a11
    net = tiny_net()
    assert pruned(net, CompressionPlan("lrp-x-weight", 0.3)) == {"a01", "b11", "a00"}
    assert pruned(net, CompressionPlan("lrp-x-weight", 0.5)) == {"a01", "b11", "a00", "b00", "a10"}
    # per layer, 50 %: a loses its 3 lowest products (a01 a00 a10), b its 2 (b11 b00)
    assert pruned(net, CompressionPlan("lrp-x-weight", 0.5, scope="per-layer")) == {"a01", "a00", "a10", "b11",
                                                                                    "b00"}
    s = get_criterion("lrp-x-weight").scores(ScoreInputs({"0.weight": W_A}, {"0.weight": R_A}))["0.weight"]
    torch.testing.assert_close(s, (R_A * W_A.abs()).double())


def test_budget_hybrids_by_hand():
    # |R| ascending: b11 .25, a01 1, b00 1.1, b10 1.5, a10 2, b01 3, a12 3.5, a02 4, a00 5, a11 6.
    # At 50 % the lowest five (b11 a01 b00 b10 a10) give the budgets: layer a loses 2, layer b loses 3.
    net = tiny_net()
    # |w| inside: a's two smallest are a00 (.1) and a01 (.2); b's three smallest b00 (.7) b01 (.8) b10 (.9)
    assert pruned(net, CompressionPlan("lrp-budget-magnitude", 0.5)) == {"a00", "a01", "b00", "b01", "b10"}
    # |R|*|w| inside: a's two lowest products a01 (.2) a00 (.5); b's three lowest b11 (.25) b00 (.77) b10 (1.35)
    assert pruned(net, CompressionPlan("lrp-budget-x-weight", 0.5)) == {"a01", "a00", "b11", "b00", "b10"}
    # the per-layer counts are exactly those of lrp (|R|) pruning, which picks the five lowest |R| themselves
    lrp = pruned(net, CompressionPlan("lrp", 0.5))
    assert lrp == {"b11", "a01", "b00", "b10", "a10"}
    assert sum(n[0] == "a" for n in lrp) == 2
    # per-layer scope: every layer loses the same fraction, so the budget hybrid is magnitude pruning per layer
    assert pruned(net, CompressionPlan("lrp-budget-magnitude", 0.5, scope="per-layer")) == pruned(
        net, CompressionPlan("magnitude", 0.5, scope="per-layer"))


def test_per_layer_prune_ratios_and_bits_by_hand():
    net = tiny_net()
    # layer "0" loses 1/3 (its 2 smallest |w|: a00 a01); the free layer "2" prunes 50 % of its 4 (b00 b01)
    plan = CompressionPlan("magnitude", 0.5, layer_prune={"0": 1 / 3})
    assert pruned(net, plan) == {"a00", "a01", "b00", "b01"}
    # the hybrid's budgets only spread the free layers' share: with "2" fixed at 25 % (b00), layer "0" alone
    # takes the global 50 % of its 6 weights, the three smallest |w|
    plan = CompressionPlan("lrp-budget-magnitude", 0.5, layer_prune={"2": 0.25})
    assert pruned(net, plan) == {"a00", "a01", "a02", "b00"}
    plan = CompressionPlan("magnitude", 0.0, bit_levels=[8, 2], bit_split=[0.5], bit_ranking="magnitude",
                           layer_bits={"0": 2})
    cw = compress(net, plan)
    assert cw.quant.klass[:6].tolist() == [1] * 6  # layer "0" all 2 bits
    assert sorted(cw.quant.klass[6:].tolist()) == [0, 0, 1, 1]  # layer "2" by the split: half 8 bits, half 2
    assert plan.to_dict()["version"] == 2 and CompressionPlan.from_json(plan.to_json()) == plan
    assert "layer_bits" not in CompressionPlan().to_dict() and CompressionPlan().to_dict()["version"] == 1
    with pytest.raises(PlanError, match="no conv/linear layer 'nope'"):
        compress(net, CompressionPlan("magnitude", layer_prune={"nope": 0.5}))
    with pytest.raises(PlanError, match="not among bit_levels"):
        CompressionPlan("magnitude", layer_bits={"0": 4}).validate()
    with pytest.raises(PlanError, match="prune ratio must be in"):
        CompressionPlan("magnitude", layer_prune={"0": 1.0}).validate()
    with pytest.raises(PlanError, match="decides by a rule"):
        CompressionPlan("paper", layer_prune={"0": 0.5}).validate()
    with pytest.raises(PlanError, match="protected"):
        compress(net, CompressionPlan("magnitude", protect="first-last", layer_prune={"0": 0.5}))


def _relevance_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The real relevance of ``net`` with some weights replaced (what the session's relevance_of computes)."""

    def relevance_of(weights, composite):
        import copy

        m = copy.deepcopy(net)
        with torch.no_grad():
            for name, value in weights.items():
                dict(m.named_parameters())[name].copy_(value)
        return compute_relevance(m, x, y, composite, by_class=True)

    return relevance_of


def test_iterative_relevance_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    rel_of = _relevance_of(net, x, y)
    rel = compute_relevance(net, x, y, by_class=True)
    n = 6 * 8 + 8 * 3
    names = ["0.weight", "2.weight"]

    def flat_abs(r):
        return torch.cat([r.abs_by_class[k].reshape(-1) for k in names]).double()

    # by hand: prune the lowest |R| to 50 %, recompute on the pruned model, prune to 70 %, recompute, ...
    steps = [0.5, 0.7, 0.8, 0.9]
    gone = torch.zeros(n, dtype=torch.bool)
    r = rel
    masks = {}
    for s in steps:
        sc = flat_abs(r)
        sc[gone] = float("inf")
        k = int(round(s * n)) - int(gone.sum())
        gone[torch.argsort(sc, stable=True)[:k]] = True
        masks[s] = gone.clone()
        w = {"0.weight": net[0].weight.detach().clone(), "2.weight": net[2].weight.detach().clone()}
        w["0.weight"].view(-1)[gone[:48]] = 0
        w["2.weight"].view(-1)[gone[48:]] = 0
        r = rel_of(w, "epsilon")
    for s in steps:
        cw = compress(net, CompressionPlan("lrp-iterative", s), rel, rel_of)
        assert torch.equal(~cw.keep, masks[s]), s
    # between steps: the first steps whole, the rest by the relevance after step 0.7
    sc = flat_abs(rel_of({"0.weight": net[0].weight.detach() * ~masks[0.7][:48].view(8, 6),
                          "2.weight": net[2].weight.detach() * ~masks[0.7][48:].view(3, 8)}, "epsilon"))
    sc[masks[0.7]] = float("inf")
    expect = masks[0.7].clone()
    expect[torch.argsort(sc, stable=True)[:int(round(0.75 * n)) - int(masks[0.7].sum())]] = True
    assert torch.equal(~compress(net, CompressionPlan("lrp-iterative", 0.75), rel, rel_of).keep, expect)
    # up to the first step it is lrp itself
    assert torch.equal(compress(net, CompressionPlan("lrp-iterative", 0.3), rel, rel_of).keep,
                       compress(net, CompressionPlan("lrp", 0.3), rel).keep)
    with pytest.raises(PlanError, match="recomputes relevance"):
        compress(net, CompressionPlan("lrp-iterative", 0.6), rel)


@pytest.mark.parametrize("criterion", ["lrp-x-weight", "lrp-budget-magnitude", "lrp-budget-x-weight"])
def test_sparsity_equals_the_ratio(lenet_session, criterion):
    n = lenet_session.layout.n_compressible
    for ratio in (0.7, 0.9):
        res = lenet_session.evaluate(CompressionPlan(criterion, ratio))
        assert res.sparsity == round(ratio * n) / n
        assert 0.1 <= res.accuracy <= 1.0


def test_session_caches_the_iterative_scores_per_schedule(lenet_session):
    calls = []
    real = lenet_session.relevance_of

    def counting(weights, composite=None):
        calls.append(composite)
        return real(weights, composite)

    lenet_session.relevance_of = counting
    try:
        a = lenet_session.evaluate(CompressionPlan("lrp-iterative", 0.85))
        assert len(calls) == len(get_criterion("lrp-iterative").steps)
        b = lenet_session.evaluate(CompressionPlan("lrp-iterative", 0.95))
        lenet_session.evaluate(CompressionPlan("lrp-iterative", 0.6, bit_levels=[4]))
        assert len(calls) == 4  # one score table serves every ratio and bit setting
        n = lenet_session.layout.n_compressible
        assert (a.sparsity, b.sparsity) == (round(0.85 * n) / n, round(0.95 * n) / n)
    finally:
        del lenet_session.relevance_of
