"""Why a plan's accuracy is what it is, measured by the engine: per layer the share pruned, how much of it had
negative, exactly-zero or positive relevance, and how the layer's activations change (mean |output| of the
compressed model vs the original on a few evaluation images), plus whether the accuracy is at chance level.

Made for the paper's rule (prune relevance <= 0): it removes each neuron's inhibitory inputs (negative relevance),
activations then grow layer after layer and the model predicts one class. :func:`explain_plan` shows that for any
plan; :attr:`PlanExplanation.summary` says it in sentences.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from xaicomp_core.errors import XaicompError
from xaicomp_core.evaluate.session import CompressionSession
from xaicomp_core.plan import CompressionPlan

#: Evaluation images whose activations are compared.
EXPLAIN_IMAGES = 64


@dataclass
class LayerExplanation:
    """One compressible layer.

    Attributes
    ----------
    name : str
        Layer (module) name.
    params : int
        Weights in the layer.
    pruned_share : float
        Fraction of the layer's weights pruned.
    pruned_negative, pruned_zero, pruned_positive : float
        Fractions of the layer's weights that were pruned *and* had negative, exactly zero or positive relevance
        (they add up to ``pruned_share``).
    negative_share, zero_share : float
        Fractions of all the layer's weights with negative or exactly zero relevance (pruned or not).
    mean_abs_original, mean_abs_compressed : float
        Mean |output| of the layer (its conv/linear output, before any BatchNorm) on the images, original and
        compressed model.
    growth : float
        ``mean_abs_compressed / mean_abs_original`` (inf if the original is 0).
    """

    name: str
    params: int
    pruned_share: float
    pruned_negative: float
    pruned_zero: float
    pruned_positive: float
    negative_share: float
    zero_share: float
    mean_abs_original: float
    mean_abs_compressed: float
    growth: float


@dataclass
class PlanExplanation:
    """What :func:`explain_plan` measured.

    Attributes
    ----------
    plan : CompressionPlan
    layers : list of LayerExplanation
    pruned_share, pruned_negative, pruned_zero, pruned_positive : float
        Over all compressible weights: fractions pruned, and pruned with negative / zero / positive relevance.
    accuracy, baseline_accuracy : float
        On the session's evaluation images.
    chance : float
        ``1 / number of classes``.
    at_chance : bool
        Whether the accuracy is within two binomial standard errors (at least one point) of chance.
    dominant_class : str
        The class the compressed model predicts most often, and ``dominant_share`` how often (0-1).
    mean_abs_logit_original, mean_abs_logit_compressed : float
        Mean |logit| on the images (the last layer's output).
    images : int
        Evaluation images the activations come from.
    summary : str
        The findings in two or three sentences.
    """

    plan: CompressionPlan
    layers: list[LayerExplanation]
    pruned_share: float
    pruned_negative: float
    pruned_zero: float
    pruned_positive: float
    accuracy: float
    baseline_accuracy: float
    chance: float
    at_chance: bool
    dominant_class: str
    dominant_share: float
    mean_abs_logit_original: float
    mean_abs_logit_compressed: float
    images: int
    composite: str
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        for row in d["layers"]:
            if math.isinf(row["growth"]):
                row["growth"] = None
        return d


def _mean_abs_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, float]:
    """Mean |output| of the named modules of ``model`` on ``x``."""
    modules = dict(model.named_modules())
    sums: dict[str, float] = {}
    handles = []
    for name in names:
        def hook(_m, _inp, out, name=name):
            sums[name] = float(out.detach().abs().double().mean())

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return sums


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else 1.0)


def _fmt_growth(g: float) -> str:
    if math.isinf(g):
        return "from 0"
    return f"×{g:,.0f}" if g >= 100 else f"×{g:.3g}"


def explain_plan(session: CompressionSession, plan: CompressionPlan, images: int = EXPLAIN_IMAGES,
                 composite: str | None = None) -> PlanExplanation:
    """Per layer: the share pruned, its relevance sign, and the activation growth it causes (see the module).

    Parameters
    ----------
    session : CompressionSession
    plan : CompressionPlan
        Any plan (fine-tuned ones are fine-tuned first, as :meth:`CompressionSession.evaluate` does).
    images : int
        How many evaluation images (the first ones, class-balanced for the built-in data) the activations use.
    composite : str, optional
        Composite of the relevance whose sign is counted (default: the plan's).

    Returns
    -------
    PlanExplanation
    """
    if images < 1:
        raise XaicompError("need at least one image to compare activations")
    result = session.evaluate(plan)
    cw = session.compress(plan)
    layout = cw.layout
    rel = session.relevance(composite or plan.composite)
    r = layout.flat({n: rel.weights[n] for n in layout.names}).double()
    pruned = ~cw.keep & ~layout.protected_flat
    neg, zero = r < 0, r == 0
    x = session.x_eval[:images]
    modules = [n.removesuffix(".weight") for n in layout.names]
    before = _mean_abs_outputs(session.model, modules, x)
    after = _mean_abs_outputs(session.compressed_model(cw), modules, x)
    rows = []
    for i, name in enumerate(modules):
        sl = layout.layer_slice(i)
        n = layout.sizes[i]
        p = pruned[sl]
        rows.append(LayerExplanation(
            name, n, float(p.sum()) / n, float((p & neg[sl]).sum()) / n, float((p & zero[sl]).sum()) / n,
            float((p & ~neg[sl] & ~zero[sl]).sum()) / n, float(neg[sl].sum()) / n, float(zero[sl].sum()) / n,
            before[name], after[name], _ratio(after[name], before[name])))
    total = max(layout.n_compressible, 1)
    n_cls = session.info.num_classes
    chance = 1.0 / n_cls
    n_img = len(session.y_eval)
    tol = max(0.01, 2 * math.sqrt(chance * (1 - chance) / max(n_img, 1)))
    counts = torch.bincount(result.predictions, minlength=n_cls)
    dom = int(counts.argmax())
    names = session.class_names
    expl = PlanExplanation(
        plan, rows, float(pruned.sum()) / total, float((pruned & neg).sum()) / total,
        float((pruned & zero).sum()) / total, float((pruned & ~neg & ~zero).sum()) / total, result.accuracy,
        result.baseline_accuracy, chance, result.accuracy <= chance + tol,
        names[dom] if dom < len(names) else str(dom), float(counts[dom]) / max(n_img, 1),
        before[modules[-1]], after[modules[-1]], len(x), composite or plan.composite)
    expl.summary = summarise(expl)
    return expl


def summarise(e: PlanExplanation) -> str:
    """Two or three sentences: what was pruned (by relevance sign), what it did to the activations, and whether
    the model is left at chance."""
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    parts = [f"The plan ({e.plan.describe()}) prunes {pct(e.pruned_share)} of the weights: "
             f"{pct(e.pruned_negative)} with negative relevance (counter-evidence: a neuron's inhibitory inputs), "
             f"{pct(e.pruned_zero)} with exactly zero relevance and {pct(e.pruned_positive)} with positive "
             "relevance."]
    grew = [la for la in e.layers if la.growth > 1.5]
    if grew and len(grew) >= len(e.layers) // 2 + 1:
        first, last = e.layers[0], e.layers[-1]
        peak = max(e.layers, key=lambda la: la.growth)
        via = f", {_fmt_growth(peak.growth)} in {peak.name}" if peak is not last and peak is not first else ""
        parts.append(f"Without them the layers' outputs grow layer after layer (mean |output| "
                     f"{_fmt_growth(first.growth)} in {first.name}{via}, {_fmt_growth(last.growth)} in {last.name}: "
                     f"mean |logit| {e.mean_abs_logit_original:,.3g} → {e.mean_abs_logit_compressed:,.4g}).")
    else:
        growth = [la.growth for la in e.layers]
        parts.append(f"The layers' mean |output| stays between {_fmt_growth(min(growth))} and "
                     f"{_fmt_growth(max(growth))} of the original's.")
    acc = f"accuracy {pct(e.accuracy)} (original {pct(e.baseline_accuracy)})"
    if e.at_chance:
        parts.append(f"The model is left at chance level: {acc}, chance is 1/{round(1 / e.chance)} = {pct(e.chance)}"
                     f"; it predicts {e.dominant_class!r} for {pct(e.dominant_share)} of the images.")
    else:
        parts.append(f"The model keeps working: {acc}, well above chance ({pct(e.chance)}).")
    return " ".join(parts)


def explain_to_rows(e: PlanExplanation) -> list[dict[str, Any]]:
    """One table row per layer (percentages and the growth factor), for a page or a report."""
    return [{"layer": la.name, "weights": la.params, "pruned %": 100 * la.pruned_share,
             "pruned, negative R %": 100 * la.pruned_negative, "pruned, zero R %": 100 * la.pruned_zero,
             "pruned, positive R %": 100 * la.pruned_positive, "mean |output| original": la.mean_abs_original,
             "mean |output| compressed": la.mean_abs_compressed, "growth": la.growth} for la in e.layers]


def explain_paper_rule(session: CompressionSession, composite: str | None = None,
                       images: int = EXPLAIN_IMAGES) -> PlanExplanation:
    """:func:`explain_plan` for the paper's rule (prune relevance <= 0, weights kept fp32)."""
    return explain_plan(session, CompressionPlan(criterion="paper", composite=composite or session.composite),
                        images)
