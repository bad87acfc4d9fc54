"""The paper rule explained by the engine (evaluate/explain.py) on the built-in LeNet."""

from __future__ import annotations

import math

import pytest
import torch

from xaicomp_core import CompressionPlan, XaicompError
from xaicomp_core.evaluate.explain import explain_paper_rule, explain_plan, explain_to_rows


def test_paper_rule_explained(lenet_session):
    s = lenet_session
    e = explain_paper_rule(s, images=32)
    rel = s.relevance()
    layout = s.layout
    for i, la in enumerate(e.layers):
        r = rel.weights[layout.names[i]]
        # the rule prunes exactly relevance <= 0: nothing positive, and the shares are those of the signs
        assert la.pruned_positive == 0.0
        assert la.pruned_negative == pytest.approx(float((r < 0).double().mean()))
        assert la.pruned_zero == pytest.approx(float((r == 0).double().mean()))
        assert la.pruned_share == pytest.approx(la.pruned_negative + la.pruned_zero)
        assert la.negative_share == pytest.approx(la.pruned_negative)
    flat = torch.cat([rel.weights[n].reshape(-1) for n in layout.names])
    assert e.pruned_share == pytest.approx(float((flat <= 0).double().mean()))
    # activations: the original's mean |logit| by hand, and the growth the rule causes at the logits
    with torch.no_grad():
        logits = s.model(s.x_eval[:32])
    assert e.mean_abs_logit_original == pytest.approx(float(logits.abs().double().mean()), rel=1e-5)
    assert e.layers[-1].growth == pytest.approx(e.mean_abs_logit_compressed / e.mean_abs_logit_original)
    assert e.layers[-1].growth > 2
    # the model is left predicting (nearly) one class, at chance level
    assert e.chance == pytest.approx(0.1)
    assert e.at_chance and e.accuracy == s.evaluate(CompressionPlan("paper")).accuracy
    assert e.dominant_share > 0.5 and e.dominant_class in s.class_names
    assert "chance level" in e.summary and "negative relevance" in e.summary and "grow" in e.summary
    rows = explain_to_rows(e)
    assert [r["layer"] for r in rows] == [n.removesuffix(".weight") for n in layout.names]
    d = e.to_dict()
    assert d["plan"]["criterion"] == "paper" and len(d["layers"]) == len(layout.names)


def test_a_working_plan_is_not_at_chance(lenet_session):
    e = explain_plan(lenet_session, CompressionPlan("magnitude", 0.5), images=16)
    assert not e.at_chance and e.accuracy > 0.8
    assert e.pruned_share == pytest.approx(0.5, abs=1e-4)
    assert e.pruned_negative + e.pruned_zero + e.pruned_positive == pytest.approx(e.pruned_share)
    assert e.pruned_positive > 0.1  # magnitude does not look at the sign
    assert all(0.3 < la.growth < 3 for la in e.layers) and not any(math.isinf(la.growth) for la in e.layers)
    assert "keeps working" in e.summary
    with pytest.raises(XaicompError, match="at least one image"):
        explain_plan(lenet_session, CompressionPlan("magnitude", 0.5), images=0)
