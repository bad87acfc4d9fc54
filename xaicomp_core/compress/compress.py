"""The pure compression step: ``compress(model, plan, relevance) -> CompressedWeights``.

A plan flows through four small steps, each in its own module: the criterion scores the weights
(:mod:`~xaicomp_core.compress.criteria`), the scores become a keep-mask (:mod:`~xaicomp_core.compress.layout`), the
kept weights get bit classes and are quantized (:mod:`~xaicomp_core.compress.quantize`), and the size of the packed
file is counted (:mod:`~xaicomp_core.format.size`). :class:`Compressor` holds what these steps need from one model
(its flat weights, layouts, state dict) and caches the sorted scores, so that a new prune ratio only slices a sorted
order; :func:`compress` is the same without a cache. Nothing here evaluates or modifies the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from xaicomp_core.compress.criteria import (
    ScoreInputs,
    bit_cache_key,
    bit_ranking_needs_relevance,
    bit_scores,
    get_criterion,
)
from xaicomp_core.compress.layout import (
    LayerLayout,
    SortedScores,
    channel_mask,
    counts_mask,
    prune_counts,
    ratio_mask,
    rule_mask,
)
from xaicomp_core.compress.quantize import Quantized, allocate_bits, quantize
from xaicomp_core.errors import PlanError, XaicompError
from xaicomp_core.format.size import SizeBreakdown, compute_size
from xaicomp_core.plan import CompressionPlan


@dataclass
class CompressedWeights:
    """A plan applied to the weights (no evaluation): masks, classes, codes, scales and sizes."""

    plan: CompressionPlan
    layout: LayerLayout
    keep: torch.Tensor
    quant: Quantized
    size: SizeBreakdown
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self) -> dict[str, torch.Tensor]:
        """Dequantized weight tensors by parameter name."""
        return self.layout.split(self.quant.values)

    def state_dict(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``base`` (the original state dict) with the compressed weights and the ``overrides`` (for filter
        pruning: the bias and the following BatchNorm's scale and shift of every removed channel set to zero)."""
        out = {k: v for k, v in base.items()}
        out.update(self.overrides)
        for name, w in self.weights().items():
            out[name] = w.to(base[name].dtype)
        return out


def following_batchnorms(model: nn.Module) -> dict[str, str]:
    """Conv/linear module name -> name of the BatchNorm registered right after it (module leaves in registration
    order, as zennit's BatchNorm merging pairs them)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    out = {}
    for (n1, m1), (n2, m2) in zip(leaves, leaves[1:]):
        if isinstance(m1, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and isinstance(
                m2, nn.modules.batchnorm._BatchNorm) and m2.num_features == (
                m1.out_channels if not isinstance(m1, nn.Linear) else m1.out_features):
            out[n1] = n2
    return out


def _relevance_parts(relevance) -> tuple[dict | None, dict | None, dict | None]:
    """(weights, extra, abs_by_class) of a RelevanceResult or a plain dict."""
    if relevance is None:
        return None, None, None
    if isinstance(relevance, Mapping):
        return dict(relevance), None, None
    return relevance.weights, relevance.extra, relevance.abs_by_class


def layer_indices(layout: LayerLayout, per_layer: Mapping[str, object], what: str) -> dict[int, object]:
    """Layer index -> value for a plan's per-layer mapping keyed by layer (module) names such as ``features.0``
    (``features.0.weight`` is accepted too); unknown or protected layers raise :class:`PlanError`."""
    index = {n.removesuffix(".weight") if n != "weight" else "": i for i, n in enumerate(layout.names)}
    out: dict[int, object] = {}
    for name, value in per_layer.items():
        key = name.removesuffix(".weight") if name != "weight" else ""
        if key not in index:
            choices = ", ".join(n or "(root)" for n in index)
            raise PlanError(f"{what}: the model has no conv/linear layer {name!r}; its layers are {choices}")
        if layout.protected[index[key]]:
            raise PlanError(f"{what}: layer {name!r} is protected (kept dense and fp32) by the plan")
        out[index[key]] = value
    return out


#: The state-dict entries of a BatchNorm that ``fold_norm`` rewrites.
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


class Compressor:
    """What compressing needs from one model, computed once, with the sorted scores cached (thread-safe).

    Parameters
    ----------
    model : torch.nn.Module
        Read only (weights are copied).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layout = LayerLayout.from_model(model)
        if not self.layout.names:
            raise XaicompError("the model has no conv or linear layers to compress")
        own = dict(model.named_parameters())
        self.weights = {n: own[n].detach().clone() for n in self.layout.names}
        self.weights_flat = self.layout.flat(self.weights).float()
        self.state = {k: v.detach() for k, v in model.state_dict().items()}
        self.following_bn = following_batchnorms(model)
        #: BatchNorm modules that ``fold_norm`` can store as scale and shift (affine, with running statistics): eps
        self.norms = {n: float(m.eps) for n, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats
                      and all(f"{n}.{t}" in self.state for t in NORM_TENSORS)}
        self._layouts = {"none": self.layout}
        self._sorted: dict[tuple, SortedScores] = {}
        self._channel_scores: dict[tuple, torch.Tensor] = {}
        self._lock = threading.RLock()

    def layout_for(self, protect: str) -> LayerLayout:
        """Layer layout for a protection setting."""
        with self._lock:
            if protect not in self._layouts:
                self._layouts[protect] = self.layout.with_protect(protect)
            return self._layouts[protect]

    def needs_relevance(self, plan: CompressionPlan) -> bool:
        """Whether compressing ``plan`` reads LRP relevance (its criterion, or its bit ranking with more than one
        level and some layer whose bits are not fixed by ``plan.layer_bits``)."""
        crit = get_criterion(plan.criterion)
        if crit.needs_relevance:
            return True
        if len(plan.bit_levels) < 2 or not bit_ranking_needs_relevance(plan.bit_ranking, plan.criterion):
            return False
        layout = self.layout_for(plan.protect)
        return len(layer_indices(layout, plan.layer_bits, "layer_bits")) < len(layout.compressible)

    def _sorted_scores(self, key: tuple, layout: LayerLayout, make: Callable[[], dict[str, torch.Tensor]]
                       ) -> SortedScores:
        full = (*key, tuple(layout.protected))
        if full not in self._sorted:
            self._sorted[full] = SortedScores.build(layout, layout.flat(make(), torch.float64))
        return self._sorted[full]

    def compress(self, plan: CompressionPlan, relevance=None,
                 relevance_of: Callable[[dict[str, torch.Tensor], str], object] | None = None) -> CompressedWeights:
        """Apply ``plan``: masks, bit classes, quantized values and the size breakdown.

        Parameters
        ----------
        plan : CompressionPlan
        relevance : RelevanceResult, dict or callable, optional
            Needed when :meth:`needs_relevance`; a callable is called with the plan's composite.
        relevance_of : callable, optional
            ``relevance_of(weights, composite) -> RelevanceResult``: relevance of the model with ``weights``
            replaced, on the reference images (for criteria that recompute relevance, e.g. ``lrp-iterative``;
            :attr:`ScoreInputs.relevance_of`).
        """
        plan.validate()
        with self._lock:
            crit = get_criterion(plan.criterion)
            rel = None
            if self.needs_relevance(plan):
                rel = relevance(plan.composite) if callable(relevance) else relevance
                if rel is None:
                    raise PlanError(f"criterion {plan.criterion!r} with bit ranking {plan.bit_ranking!r} needs LRP "
                                    "relevance: pass relevance=weight_relevance(model, inputs, targets)")
            weights, extra, rel_abs = _relevance_parts(rel)
            composite = plan.composite
            layout = self.layout_for(plan.protect)
            inp = ScoreInputs(self.weights, weights, extra, plan.seed, rel_abs,
                              (lambda w: relevance_of(w, composite)) if relevance_of is not None else None,
                              tuple(n for n, p in zip(layout.names, layout.protected) if p))
            fixed_prune = layer_indices(layout, plan.layer_prune, "layer_prune")
            fixed_bits = layer_indices(layout, plan.layer_bits, "layer_bits")
            overrides: dict[str, torch.Tensor] = {}
            rule = crit.rule_prune(inp)
            if rule is not None:
                keep = rule_mask(layout, layout.flat(rule))
            elif crit.structured:
                ck = crit.cache_key(plan.composite, plan.seed)
                if ck not in self._channel_scores:
                    ch = crit.channel_scores(inp)
                    self._channel_scores[ck] = torch.cat([ch[n] for n in layout.names])
                keep = channel_mask(layout, self._channel_scores[ck], plan.prune_ratio, plan.scope,
                                    exclude_layers={len(layout.names) - 1})
                overrides = self.structured_overrides(layout, keep)
            else:
                ck = crit.cache_key(plan.composite, plan.seed)
                scores = self._sorted_scores(("prune", *ck), layout, lambda: crit.scores(inp))
                budgeted = crit.budgeted and plan.scope == "global"
                if not fixed_prune and not budgeted:
                    keep = ratio_mask(layout, scores, plan.prune_ratio, plan.scope)
                else:
                    # per-layer counts from the plan and/or one ranking, the order inside each layer from another
                    budget = (self._sorted_scores(("budget", *ck), layout, lambda: crit.budget_scores(inp))
                              if budgeted else scores)
                    counts = prune_counts(layout, budget, plan.prune_ratio, plan.scope,
                                          {i: float(r) for i, r in fixed_prune.items()})
                    keep = counts_mask(layout, scores, counts)
            levels = list(plan.bit_levels)
            free_keep = keep
            if fixed_bits:
                fixed_flat = torch.zeros(layout.total, dtype=torch.bool)
                for i in fixed_bits:
                    fixed_flat[layout.layer_slice(i)] = True
                free_keep = keep & ~fixed_flat
            if len(levels) > 1 and len(fixed_bits) < len(layout.compressible):
                bkey = ("bits", *bit_cache_key(plan.bit_ranking, plan.criterion, plan.composite, plan.seed))
                bs = self._sorted_scores(bkey, layout, lambda: bit_scores(plan.bit_ranking, plan.criterion, inp))
                desc = bs.global_order.flip(0)
                layer_desc = {i: o.flip(0) for i, o in bs.layer_orders.items()}
                klass = allocate_bits(layout, free_keep, bs.flat, desc, layer_desc, levels, plan.bit_split,
                                      plan.granularity, plan.scope)
            else:
                klass = allocate_bits(layout, free_keep, self.weights_flat, torch.zeros(0, dtype=torch.long), {},
                                      levels[:1], [], plan.granularity, plan.scope)
            for i, bits in fixed_bits.items():
                sl = layout.layer_slice(i)
                klass[sl] = torch.where(keep[sl], levels.index(int(bits)), -1).to(torch.int8)
            quant = quantize(layout, self.weights_flat, keep, klass, levels, plan.quantizer)
            if plan.fold_norm:
                overrides = self.folded_norms(overrides)
            return CompressedWeights(plan, layout, keep, quant,
                                     self.size_of(layout, keep, quant, plan.granularity, overrides), overrides)

    def size_of(self, layout: LayerLayout, keep: torch.Tensor, quant: Quantized, granularity: str,
                overrides: dict[str, torch.Tensor] | None = None) -> SizeBreakdown:
        """The packed size of quantized weights ``quant`` with keep-mask ``keep`` (e.g. fine-tuned weights on a
        plan's masks and classes: their codes decide the Huffman-coded values) and the plan's ``overrides`` of
        other tensors (a tensor whose elements are all equal is stored as one number)."""
        state = {**self.state, **overrides} if overrides else self.state
        return compute_size(layout, keep, quant.klass, quant.group_count, quant.levels, granularity, state,
                            codes=quant.codes)

    def folded_norms(self, overrides: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``overrides`` plus every BatchNorm (:attr:`norms`) as scale and shift: ``weight = w / sqrt(var + eps)``
        and ``bias = b - mean * weight`` (computed in float64, rounded once to the parameter's dtype), a zero
        ``running_mean`` and a ``running_var`` of ``1 - eps``, so that the layer computes ``x * weight + bias`` up
        to float32 rounding. Values already overridden (the zeroed scale and shift of removed filters) are folded
        as they are."""
        out = dict(overrides)
        for n, eps in self.norms.items():
            t = {k: out.get(f"{n}.{k}", self.state[f"{n}.{k}"]) for k in NORM_TENSORS}
            scale = t["weight"].double() / torch.sqrt(t["running_var"].double() + eps)
            shift = t["bias"].double() - t["running_mean"].double() * scale
            out[f"{n}.weight"] = scale.to(t["weight"].dtype)
            out[f"{n}.bias"] = shift.to(t["bias"].dtype)
            out[f"{n}.running_mean"] = torch.zeros_like(t["running_mean"])
            out[f"{n}.running_var"] = torch.full_like(t["running_var"], 1.0 - eps)
        return out

    def structured_overrides(self, layout: LayerLayout, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Filter removal: for every output channel without kept weights, zero its bias and the scale and shift of
        the BatchNorm right after the layer, so that the channel's output is exactly 0 (as if the filter were
        gone) instead of a constant."""
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(layout.names):
            if layout.protected[i]:
                continue
            ch_kept = keep[layout.layer_slice(i)].view(layout.channels[i], -1).any(1)
            removed = ~ch_kept
            if not bool(removed.any()):
                continue
            targets = [name.removesuffix("weight") + "bias"]
            bn = self.following_bn.get(name.removesuffix(".weight"))
            if bn is not None:
                targets += [f"{bn}.weight", f"{bn}.bias"]
            for t in targets:
                if t in self.state and self.state[t].shape == removed.shape:
                    v = self.state[t].clone()
                    v[removed] = 0
                    out[t] = v
        return out


def compress(model: nn.Module, plan: CompressionPlan, relevance=None,
             relevance_of: Callable[[dict[str, torch.Tensor], str], object] | None = None) -> CompressedWeights:
    """Apply a compression plan to a model's weights (pure: the model is read, never modified; nothing is cached).

    Parameters
    ----------
    model : torch.nn.Module
    plan : CompressionPlan
    relevance : RelevanceResult or dict of str to Tensor, optional
        LRP relevance of the weights (:func:`~xaicomp_core.weight_relevance` or
        :func:`~xaicomp_core.compute_relevance`); needed when the criterion or the bit ranking reads relevance.
    relevance_of : callable, optional
        ``relevance_of(weights, composite) -> RelevanceResult`` for criteria that recompute relevance on the
        modified model (see :meth:`Compressor.compress`).

    Returns
    -------
    CompressedWeights
        Keep-mask, bit classes, quantized values, the size breakdown; ``.state_dict(model.state_dict())`` gives
        the compressed weights.
    """
    return Compressor(model).compress(plan, relevance, relevance_of)
