"""Pruning criteria: one protocol, many scorers.

A criterion turns the weights (and their LRP relevance) of the compressible layers into a score per weight (higher
means more important, pruned last). Rule criteria (``paper``, ``lrp-zero``) instead name exactly the weights to prune.
Structured criteria (``lrp-filter``) give every weight of an output channel the channel's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from xaicomp_core.errors import PlanError


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
    """

    weights: dict[str, torch.Tensor]
    relevance: dict[str, torch.Tensor] | None = None
    extra_relevance: dict[str, torch.Tensor] | None = None
    seed: int = 0
    relevance_abs: dict[str, torch.Tensor] | None = None

    def rel(self, name: str) -> torch.Tensor:
        """Relevance of one weight tensor (raises if relevance is missing)."""
        if self.relevance is None or name not in self.relevance:
            raise PlanError("this criterion needs LRP relevance, which was not computed")
        return self.relevance[name]

    def bias_rel(self, weight_name: str) -> torch.Tensor | None:
        """Relevance of the bias belonging to ``weight_name`` (or the merged BatchNorm bias), if any."""
        bname = weight_name.removesuffix("weight") + "bias"
        for source in (self.relevance or {}, self.extra_relevance or {}):
            if bname in source:
                return source[bname]
        return None


class Criterion(Protocol):
    """One pruning criterion."""

    name: str
    structured: bool
    needs_relevance: bool

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:
        """Per-weight importance, same shapes as the weights (higher = keep)."""
        ...

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor] | None:
        """For rule criteria: boolean tensors marking exactly the weights to prune; else None."""
        ...


class _Base:
    name = ""
    structured = False
    needs_relevance = True

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor] | None:
        return None


class LRPAbs(_Base):
    """|relevance|: weights that carry little relevance either way are pruned first.

    With per-class sums available (the session computes them) the score is ``sum_c |sum_{samples of c} R|``, so
    evidence for one class and counter-evidence for another do not cancel; otherwise ``|sum R|``.
    """

    name = "lrp"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        if inp.relevance_abs is not None:
            return {k: inp.relevance_abs[k] for k in inp.weights}
        return {k: inp.rel(k).abs() for k in inp.weights}


class LRPSigned(_Base):
    """Signed relevance: negative (counter-evidence) weights are pruned first, then zeros, then small positives."""

    name = "lrp-signed"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) for k in inp.weights}


class PaperRule(LRPSigned):
    """The paper's rule: prune exactly the weights with relevance <= 0."""

    name = "paper"

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) <= 0 for k in inp.weights}


class LRPZero(LRPAbs):
    """Prune only the weights whose relevance is exactly zero (never used on the reference data)."""

    name = "lrp-zero"

    def rule_prune(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: inp.rel(k) == 0 for k in inp.weights}


class Magnitude(_Base):
    """|weight| (the classic baseline, no relevance needed)."""

    name = "magnitude"
    needs_relevance = False

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: w.detach().abs() for k, w in inp.weights.items()}


class Random(_Base):
    """Seeded uniform random scores (sanity baseline)."""

    name = "random"
    needs_relevance = False

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        gen = torch.Generator().manual_seed(inp.seed)
        return {k: torch.rand(w.shape, generator=gen, dtype=torch.float64) for k, w in inp.weights.items()}


class LRPFilter(_Base):
    """Yeom et al. (2021): relevance of each output channel (its weights' and bias' relevance summed), normalised
    by the layer's total absolute channel relevance so that layers compare; whole channels are pruned."""

    name = "lrp-filter"
    structured = True

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

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        out = {}
        for k, ch in self.channel_scores(inp).items():
            w = inp.weights[k]
            out[k] = ch.view(-1, *([1] * (w.ndim - 1))).expand(w.shape).contiguous()
        return out


CRITERION_REGISTRY: dict[str, Criterion] = {c.name: c for c in (
    PaperRule(), LRPAbs(), LRPSigned(), LRPZero(), Magnitude(), Random(), LRPFilter())}


def get_criterion(name: str) -> Criterion:
    """Look up a criterion by name."""
    try:
        return CRITERION_REGISTRY[name]
    except KeyError:
        raise PlanError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERION_REGISTRY)}") from None


def bit_scores(ranking: str, criterion: str, inp: ScoreInputs) -> dict[str, torch.Tensor]:
    """Scores that rank kept weights for bit widths (higher = more bits).

    ``ranking="criterion"`` uses |relevance| for the relevance criteria (the paper: higher relevance, more bits),
    |weight| for ``magnitude`` and seeded random scores for ``random``.
    """
    if ranking == "relevance":
        return LRPAbs().scores(inp)
    if ranking == "magnitude":
        return Magnitude().scores(inp)
    if criterion == "magnitude":
        return Magnitude().scores(inp)
    if criterion == "random":
        return Random().scores(ScoreInputs(inp.weights, None, None, inp.seed + 1))
    if criterion == "lrp-signed":
        return LRPSigned().scores(inp)
    return LRPAbs().scores(inp)
