"""Pruning criteria: one protocol, many scorers.

A criterion turns the weights (and their LRP relevance) of the compressible layers into a score per weight (higher
means more important, pruned last). Rule criteria (``paper``, ``lrp-zero``) instead name exactly the weights to prune.
Structured criteria (``lrp-filter``) give every weight of an output channel the channel's score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xaicomp_core.errors import PlanError
from xaicomp_core.registry import Registry, RegistryView


@dataclass
class ScoreInputs:
    """What scorers see.

    Attributes
    ----------
    weights : dict of str to Tensor
        Weight tensors of the compressible layers (parameter name -> tensor), output channels in dim 0.
    relevance : dict of str to Tensor or None
        LRP relevance of every parameter (weights and biases), same shapes.
    extra_relevance : dict of str to Tensor
        Relevance of canonizer-created parameters (merged BatchNorm biases).
    seed : int
        Seed for random scores.
    relevance_abs : dict of str to Tensor or None
        Per weight, the sum over classes of |relevance summed over the class's samples| (if computed).
    relevance_of : callable or None
        ``relevance_of(weights) -> RelevanceResult``: the relevance of the same model with some weights replaced
        (``weights`` maps weight names to tensors of their shapes, e.g. the pruned ones), computed with
        :func:`~xaicomp_core.relevance.lrp.compute_relevance` on the same reference images, composite and settings
        as :attr:`relevance`. The session fills it (:meth:`CompressionSession.relevance_of`); None where nobody
        can (then criteria that need it raise :class:`PlanError`). Iterative criteria call it.
    protected : tuple of str
        Weight names the plan keeps dense and fp32 (``protect="first-last"``): never pruned, whatever they score.
    """

    weights: dict[str, torch.Tensor]
    relevance: dict[str, torch.Tensor] | None = None
    extra_relevance: dict[str, torch.Tensor] | None = None
    seed: int = 0
    relevance_abs: dict[str, torch.Tensor] | None = None
    relevance_of: Callable[[dict[str, torch.Tensor]], Any] | None = None
    protected: tuple[str, ...] = ()

    def rel(self, name: str) -> torch.Tensor:
        """Relevance of one weight tensor (raises if relevance is missing)."""
        if self.relevance is None or name not in self.relevance:
            raise PlanError("this criterion needs LRP relevance, which was not computed")
        return self.relevance[name]

    def recompute(self, weights: dict[str, torch.Tensor]) -> Any:
        """The relevance (a ``RelevanceResult``) of the model with ``weights`` replaced (see :attr:`relevance_of`)."""
        if self.relevance_of is None:
            raise PlanError("this criterion recomputes relevance on the modified model, which needs the model and "
                            "the reference images: use a CompressionSession, or pass relevance_of to compress()")
        return self.relevance_of(weights)

    def bias_rel(self, weight_name: str) -> torch.Tensor | None:
        """Relevance of the bias belonging to ``weight_name`` (or the merged BatchNorm bias), if any."""
        bname = weight_name.removesuffix("weight") + "bias"
        for source in (self.relevance or {}, self.extra_relevance or {}):
            if bname in source:
                return source[bname]
        return None


class Criterion:
    """One pruning criterion: a registered object that carries its metadata and scores the weights.

    Subclass it, set the attributes, implement :meth:`scores` (or :meth:`rule_prune` for a rule, or
    :meth:`channel_scores` for a structured criterion) and decorate the class with :func:`register_criterion`:
    plan validation, the CLI's ``--criterion`` choices, the app's criterion list, labels and colours pick it up.

    Attributes
    ----------
    name : str
        Registry name (what plans, the CLI and the app use).
    label : str
        A few words saying what it prunes first, shown after the name in the app's option lists.
    description : str
        One line shown in help texts.
    uses_ratio : bool
        Whether ``plan.prune_ratio`` applies (False for rules that decide by themselves which weights go).
    needs_relevance : bool
        Whether :meth:`scores` / :meth:`rule_prune` read LRP relevance.
    structured : bool
        Whether whole output channels are pruned (then :meth:`channel_scores` ranks them).
    seeded : bool
        Whether the scores depend on ``plan.seed``.
    bit_ranking_needs_relevance : bool
        Whether :meth:`bit_scores` (bit widths ranked "by the criterion") reads relevance.
    colour : str
        Colour of the criterion in every figure.
    rule_text : str
        For criteria without a ratio: how plan summaries describe what is pruned.
    budgeted : bool
        Whether :meth:`budget_scores` sets how many weights each layer loses (then :meth:`scores` only orders the
        weights inside each layer).
    """

    name: str = ""
    label: str = ""
    description: str = ""
    uses_ratio: bool = True
    needs_relevance: bool = True
    structured: bool = False
    seeded: bool = False
    bit_ranking_needs_relevance: bool = True
    colour: str = "#616161"
    rule_text: str = ""
    budgeted: bool = False

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """Per-weight importance, same shapes as the weights (higher = keep). A structured criterion gives every
        weight of an output channel its channel's :meth:`channel_scores`."""
        if not self.structured:
            raise NotImplementedError
        out = {}
        for k, ch in self.channel_scores(inp).items():
            w = inp.weights[k]
            out[k] = ch.view(-1, *([1] * (w.ndim - 1))).expand(w.shape).contiguous()
        return out

    def budget_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """For budgeted criteria (``budgeted = True``): scores whose *global* ranking decides how many weights each
        layer loses at a prune ratio; :meth:`scores` then chooses which ones inside the layer. With
        ``scope="per-layer"`` every layer loses the same fraction and these scores are not read."""
        raise NotImplementedError(f"criterion {self.name!r} is not budgeted")

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor] | None:
        """For rule criteria: boolean tensors marking exactly the weights to prune; else None."""
        return None

    def channel_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """For structured criteria: one score per output channel of each layer (higher = keep)."""
        raise NotImplementedError(f"criterion {self.name!r} is not structured")

    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """Scores that rank the kept weights for bit widths when ``plan.bit_ranking == "criterion"`` (higher = more
        bits). Default: |relevance| (the paper: higher relevance, more bits)."""
        return LRPAbs().scores(inp)

    def cache_key(self, composite: str, seed: int) -> tuple:
        """What the scores depend on besides the weights (the session caches sorted scores per key)."""
        return (self.name, composite if self.needs_relevance else None, seed if self.seeded else None)

    def bit_cache_key(self, composite: str, seed: int) -> tuple:
        """What :meth:`bit_scores` depends on besides the weights."""
        return ("c", self.name, composite if self.bit_ranking_needs_relevance else None,
                seed if self.seeded else None)

    @property
    def display(self) -> str:
        """The label, or the name."""
        return self.label or self.name


CRITERION_REGISTRY: Registry[Criterion] = Registry("criterion", PlanError)


def register_criterion(criterion=None, *, replace: bool = False):
    """Register a criterion (a :class:`Criterion` subclass, used as a class decorator, or an instance).

    Examples
    --------
    >>> @register_criterion
    ... class Bigger(Criterion):
    ...     name, description, needs_relevance = "bigger", "keep the larger weights", False
    ...     def scores(self, inp):
    ...         return {k: w.abs() for k, w in inp.weights.items()}
    """

    def add(c):
        inst = c() if isinstance(c, type) else c
        if not isinstance(inst, Criterion):
            raise PlanError(f"{inst!r} is not a Criterion (subclass xaicomp_core.compress.criteria.Criterion)")
        CRITERION_REGISTRY.register(inst, replace=replace)
        return c

    return add if criterion is None else add(criterion)


def get_criterion(name: str) -> Criterion:
    """Look up a criterion by name (raises :class:`PlanError` naming the choices)."""
    return CRITERION_REGISTRY.get(name)


@register_criterion
class PaperRule(Criterion):
    """The paper's rule: prune exactly the weights with relevance <= 0 (bits ranked by |relevance|)."""

    name = "paper"
    label = "prune relevance ≤ 0"
    description = "paper rule: prune exactly the weights with LRP relevance <= 0"
    uses_ratio = False
    colour = "#6a3d9a"
    rule_text = "prune relevance <= 0 (paper rule)"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) for k in inp.weights}

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) <= 0 for k in inp.weights}


@register_criterion
class LRPAbs(Criterion):
    """|relevance|: weights that carry little relevance either way are pruned first.

    With per-class sums available (the session computes them) the score is ``sum_c |sum_{samples of c} R|``, so
    evidence for one class and counter-evidence for another do not cancel; otherwise ``|sum R|``.
    """

    name = "lrp"
    label = "lowest |relevance| first"
    description = "rank weights by |relevance|, prune the lowest"
    colour = "#d62728"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        if inp.relevance_abs is not None:
            return {k: inp.relevance_abs[k] for k in inp.weights}
        return {k: inp.rel(k).abs() for k in inp.weights}


@register_criterion
class LRPSigned(Criterion):
    """Signed relevance: negative (counter-evidence) weights are pruned first, then zeros, then small positives."""

    name = "lrp-signed"
    label = "negative relevance first"
    description = "rank weights by signed relevance (negatives first)"
    colour = "#ff7f0e"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) for k in inp.weights}

    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.scores(inp)


@register_criterion
class LRPZero(LRPAbs):
    """Prune only the weights whose relevance is exactly zero (never used on the reference data)."""

    name = "lrp-zero"
    label = "only zero relevance (free)"
    description = "prune only weights with exactly zero relevance (free)"
    uses_ratio = False
    colour = "#8c564b"
    rule_text = "prune zero-relevance weights"

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) == 0 for k in inp.weights}


@register_criterion
class Magnitude(Criterion):
    """|weight| (the classic baseline, no relevance needed)."""

    name = "magnitude"
    label = "smallest |weight| first"
    description = "rank weights by |weight| (classic baseline)"
    needs_relevance = False
    bit_ranking_needs_relevance = False
    colour = "#1f77b4"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: w.detach().abs() for k, w in inp.weights.items()}

    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.scores(inp)


@register_criterion
class Random(Criterion):
    """Seeded uniform random scores (sanity baseline); bits are ranked by a second seeded draw."""

    name = "random"
    label = "seeded baseline"
    description = "prune a seeded random subset (sanity baseline)"
    needs_relevance = False
    seeded = True
    bit_ranking_needs_relevance = False
    colour = "#7f7f7f"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        gen = torch.Generator().manual_seed(inp.seed)
        return {k: torch.rand(w.shape, generator=gen, dtype=torch.float64) for k, w in inp.weights.items()}

    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.scores(ScoreInputs(inp.weights, None, None, inp.seed + 1))


@register_criterion
class LRPFilter(Criterion):
    """Yeom et al. (2021): relevance of each output channel (its weights' and bias' relevance summed), normalised
    by the layer's total absolute channel relevance so that layers compare; whole channels are pruned."""

    name = "lrp-filter"
    label = "whole filters by relevance"
    description = "prune whole output channels by summed relevance (Yeom et al., structured)"
    structured = True
    colour = "#17becf"

    def channel_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """Normalised relevance per output channel."""
        out = {}
        for k in inp.weights:
            r = inp.rel(k).double()
            ch = r.reshape(r.shape[0], -1).sum(1)
            b = inp.bias_rel(k)
            if b is not None and b.shape == ch.shape:
                ch = ch + b.double()
            total = ch.abs().sum()
            out[k] = ch / total if total > 0 else ch
        return out


@register_criterion
class MagnitudeFilter(Criterion):
    """Li et al. (2017): the L1 norm of each output channel's weights, divided by the layer's mean channel norm so
    that layers compare; whole channels are pruned. The like-for-like baseline of ``lrp-filter`` (no relevance)."""

    name = "magnitude-filter"
    label = "whole filters by L1 norm"
    description = "prune whole output channels by the L1 norm of their weights (Li et al., structured baseline)"
    structured = True
    needs_relevance = False
    bit_ranking_needs_relevance = False
    colour = "#393b79"

    def channel_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """L1 norm per output channel over the layer's mean channel norm."""
        out = {}
        for k, w in inp.weights.items():
            ch = w.detach().double().reshape(w.shape[0], -1).abs().sum(1)
            mean = ch.mean()
            out[k] = ch / mean if mean > 0 else ch
        return out


    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return Magnitude().scores(inp)


#: name -> (description, uses a prune ratio): a live view of the registry (plugins included).
CRITERIA = RegistryView(CRITERION_REGISTRY, lambda c: (c.description, c.uses_ratio))

BIT_RANKINGS = ("criterion", "relevance", "magnitude")


def bit_scores(ranking: str, criterion: str, inp: ScoreInputs) -> dict[str, torch.Tensor]:
    """Scores that rank kept weights for bit widths (higher = more bits): ``"relevance"`` |relevance|,
    ``"magnitude"`` |weight|, ``"criterion"`` the criterion's own :meth:`Criterion.bit_scores`."""
    if ranking == "relevance":
        return LRPAbs().scores(inp)
    if ranking == "magnitude":
        return Magnitude().scores(inp)
    return get_criterion(criterion).bit_scores(inp)


def bit_cache_key(ranking: str, criterion: str, composite: str, seed: int) -> tuple:
    """What :func:`bit_scores` depends on besides the weights."""
    if ranking == "relevance":
        return ("relevance", composite)
    if ranking == "magnitude":
        return ("magnitude",)
    return get_criterion(criterion).bit_cache_key(composite, seed)


def bit_ranking_needs_relevance(ranking: str, criterion: str) -> bool:
    """Whether the bit ranking reads relevance."""
    if ranking == "relevance":
        return True
    if ranking == "magnitude":
        return False
    return get_criterion(criterion).bit_ranking_needs_relevance
