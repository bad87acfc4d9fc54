"""Criteria that combine relevance with magnitude, and relevance recomputed while pruning.

What the measurements on ``fashion-vgg`` and a third-party MNIST MLP point to (issue 16):

* ranking weights by |relevance| alone spreads the pruning badly over layers (per-weight relevance falls with layer
  size, so the largest layer goes first) *and* picks worse weights inside a layer than |weight|;
* |relevance| x |weight| comes closest to magnitude;
* on a net whose first layer holds most weights, "each layer's sparsity from the global relevance ranking, |weight|
  inside the layer" wins.

Each criterion here is one registered class whose docstring is its recipe. They are registered when
:mod:`xaicomp_core` is imported.
"""

from __future__ import annotations

import torch

from xaicomp_core.compress.criteria import Criterion, LRPAbs, ScoreInputs, get_criterion, register_criterion


def abs_relevance(inp: ScoreInputs) -> dict[str, torch.Tensor]:
    """|R| per weight as ``lrp`` ranks it: ``sum_c |sum_{samples of c} R|`` when the per-class sums were computed
    (the session computes them), else ``|sum R|``."""
    return LRPAbs().scores(inp)


@register_criterion
class RelevanceTimesWeight(Criterion):
    """|R|·|w|: the weight's |relevance| (as ``lrp`` ranks it, :func:`abs_relevance`) times its |weight|; the lowest
    products are pruned first (globally, or in every layer with ``scope="per-layer"``). Bits are ranked by the same
    product.

    Recipe: ``score_i = |R_i| * |w_i|``; prune the ``ratio`` lowest scores.
    """

    name = "lrp-x-weight"
    label = "smallest |R|·|w| first"
    description = "rank weights by |relevance| x |weight|, prune the lowest"
    colour = "#00897b"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        rel = abs_relevance(inp)
        return {k: rel[k].double() * w.detach().abs().double() for k, w in inp.weights.items()}

    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.scores(inp)


@register_criterion
class RelevanceBudgetMagnitude(Criterion):
    """Relevance decides how many weights each layer loses, |weight| which ones.

    Recipe (``scope="global"``): rank *all* compressible weights by |R| (:func:`abs_relevance`); the lowest
    ``round(ratio * n)`` of them give each layer its count ``k_l``; then prune, in every layer, its ``k_l`` weights of
    smallest |w|. The total sparsity is exactly the ratio; only the per-layer counts come from relevance. With
    ``scope="per-layer"`` every layer loses the same fraction, so this is magnitude pruning per layer. Bits are
    ranked by |R| (the default).
    """

    name = "lrp-budget-magnitude"
    label = "layer budgets by relevance, smallest |weight| inside"
    description = "per-layer sparsities from the global |relevance| ranking, |weight| selects inside each layer"
    budgeted = True
    colour = "#9c27b0"

    def budget_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return abs_relevance(inp)

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: w.detach().abs() for k, w in inp.weights.items()}


@register_criterion
class RelevanceBudgetTimesWeight(RelevanceBudgetMagnitude):
    """Relevance decides how many weights each layer loses, |R|·|w| which ones.

    Recipe (``scope="global"``): per-layer counts ``k_l`` from the global |R| ranking exactly as
    ``lrp-budget-magnitude``; inside every layer prune its ``k_l`` weights of smallest ``|R| * |w|``.
    """

    name = "lrp-budget-x-weight"
    label = "layer budgets by relevance, smallest |R|·|w| inside"
    description = "per-layer sparsities from the global |relevance| ranking, |relevance| x |weight| inside each layer"
    colour = "#6d4c41"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return RelevanceTimesWeight().scores(inp)


@register_criterion
class IterativeRelevance(Criterion):
    """Prune a step, recompute relevance on the pruned model, repeat.

    Recipe, for the schedule :attr:`steps` = ``(s_1 < s_2 < ... < s_K)`` and the step score of :attr:`step_score`
    (``lrp``: |R|): start from the relevance of the unpruned model; at step ``j`` prune, among the weights still
    kept, the lowest-scoring ones until ``round(s_j * n)`` of the ``n`` compressible weights are pruned; recompute
    relevance (same reference images, composite and settings) on the model with those weights set to zero; repeat.
    The weights left after ``s_K`` are ranked by the relevance of the model pruned at ``s_K``.

    A prune ratio ``r`` between ``s_j`` and ``s_{j+1}`` keeps the first ``j`` steps whole and takes the rest of the
    way by the relevance recomputed after step ``j``, so one score table (``K`` recomputations, cached per schedule
    by the session) serves every ratio: a weight pruned in step ``j`` scores ``j + (its rank within the step) /
    (weights in the step)``. Ratios up to ``s_1`` equal the step score on the unpruned model. With
    ``scope="per-layer"`` each layer prunes its lowest weights of that same (globally pruned) order. Protected layers
    never take part. Bits are ranked by |R| of the unpruned model (the default).
    """

    name = "lrp-iterative"
    label = "lowest |relevance| first, recomputed while pruning"
    description = "prune in steps (50/70/80/90 %), recomputing relevance on the pruned model after each"
    colour = "#e91e63"
    #: Cumulative prune ratios after which relevance is recomputed (ascending, each in (0, 1)).
    steps: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    #: The criterion whose scores rank the weights in each step (computed on the current pruned model).
    step_score: str = "lrp"

    def cache_key(self, composite: str, seed: int) -> tuple:  # noqa: D102
        return (*super().cache_key(composite, seed), tuple(self.steps), self.step_score)

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        steps = [float(s) for s in self.steps]
        if any(not 0.0 < s < 1.0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"{self.name}: steps must be ascending and in (0, 1), got {self.steps}")
        scorer = get_criterion(self.step_score)
        names = list(inp.weights)
        free = [k for k in names if k not in set(inp.protected)]
        sizes = [inp.weights[k].numel() for k in free]
        n = sum(sizes)
        out = {k: torch.full(inp.weights[k].shape, float(len(steps) + 1), dtype=torch.float64) for k in names}
        if n == 0:
            return out
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        result = torch.zeros(n, dtype=torch.float64)
        pruned = torch.zeros(n, dtype=torch.bool)
        current = inp
        done = 0
        for level, s in enumerate([*steps, None]):
            sc = scorer.scores(current)
            flat = torch.cat([sc[k].detach().reshape(-1).double() for k in free])
            remaining = torch.nonzero(~pruned).squeeze(1)
            order = remaining[torch.argsort(flat[remaining], stable=True)]
            target = n if s is None else int(round(s * n))
            take = order[:max(0, target - done)]
            result[take] = level + (torch.arange(len(take), dtype=torch.float64) + 0.5) / max(len(take), 1)
            pruned[take] = True
            done += len(take)
            if s is None:
                break
            masked = {k: w.detach().clone() for k, w in inp.weights.items()}
            for j, k in enumerate(free):
                gone = pruned[bounds[j]:bounds[j + 1]].view(inp.weights[k].shape)
                masked[k][gone] = 0
            rel = inp.recompute(masked)
            current = ScoreInputs(masked, rel.weights, rel.extra, inp.seed, rel.abs_by_class, inp.relevance_of,
                                  inp.protected)
        for j, k in enumerate(free):
            out[k] = result[bounds[j]:bounds[j + 1]].view(inp.weights[k].shape).clone()
        return out


@register_criterion
class IterativeRelevanceTimesWeight(IterativeRelevance):
    """``lrp-iterative`` with |R|·|w| (``lrp-x-weight``) as the step score.

    Recipe: exactly ``lrp-iterative``'s (same schedule, caching and scores between steps), except that each step
    prunes the smallest ``|R| * |w|`` of the current pruned model instead of the smallest |R|.
    """

    name = "lrp-x-weight-iterative"
    label = "smallest |R|·|w| first, recomputed while pruning"
    description = "prune by |relevance| x |weight| in steps (50/70/80/90 %), recomputing relevance after each"
    colour = "#3949ab"
    step_score = "lrp-x-weight"
