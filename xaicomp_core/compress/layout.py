"""Masks from scores.

All compressible weights of a model are handled as one flat vector (layers concatenated in parameter order, each
flattened row-major so that the output channel is the slowest index), described by a :class:`LayerLayout`. Sorting
happens once per score table; a new prune ratio only slices the sorted order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerLayout:
    """The conv/linear weight tensors of a model as one flat vector.

    Attributes
    ----------
    names : list of str
        Weight parameter names, in parameter order.
    shapes : list of tuple
        Their shapes (output channels first).
    protected : list of bool
        Layers kept dense and fp32 by the plan (excluded from pruning and quantization).
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    protected: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.protected:
            self.protected = [False] * len(self.names)
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.channels = [int(s[0]) for s in self.shapes]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.channel_offsets = [0]
        for c in self.channels:
            self.channel_offsets.append(self.channel_offsets[-1] + c)
        self.total = self.offsets[-1]
        self.total_channels = self.channel_offsets[-1]
        per = [torch.arange(c).repeat_interleave(n // c) + co
               for c, n, co in zip(self.channels, self.sizes, self.channel_offsets)]
        self.channel_of = torch.cat(per) if per else torch.zeros(0, dtype=torch.long)
        self.layer_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.sizes)])
        self.layer_of_channel = torch.cat([torch.full((c,), i, dtype=torch.long)
                                           for i, c in enumerate(self.channels)])
        self.protected_flat = torch.cat([torch.full((n,), p, dtype=torch.bool)
                                         for n, p in zip(self.sizes, self.protected)])
        self.compressible = [i for i, p in enumerate(self.protected) if not p]
        self.n_compressible = sum(self.sizes[i] for i in self.compressible)

    @classmethod
    def from_model(cls, model: nn.Module, protect: str = "none") -> LayerLayout:
        """Layout of all conv/linear weights of ``model``; ``protect="first-last"`` protects the first and last."""
        names, shapes = [], []
        for mname, m in model.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and isinstance(m.weight, torch.Tensor):
                names.append(f"{mname}.weight" if mname else "weight")
                shapes.append(tuple(m.weight.shape))
        protected = [False] * len(names)
        if protect == "first-last" and names:
            protected[0] = protected[-1] = True
        return cls(names, shapes, protected)

    def with_protect(self, protect: str) -> LayerLayout:
        """The same layers with another protection setting."""
        protected = [False] * len(self.names)
        if protect == "first-last" and self.names:
            protected[0] = protected[-1] = True
        return LayerLayout(list(self.names), list(self.shapes), protected)

    def flat(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Concatenate per-layer tensors into the flat vector."""
        parts = [tensors[n].detach().reshape(-1) for n in self.names]
        out = torch.cat(parts) if parts else torch.zeros(0)
        return out.to(dtype) if dtype is not None else out

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer views of a flat vector, reshaped to the weight shapes."""
        return {n: flat[a:b].view(s) for n, s, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:])}

    def layer_slice(self, i: int) -> slice:
        """Flat slice of layer ``i``."""
        return slice(self.offsets[i], self.offsets[i + 1])


@dataclass
class SortedScores:
    """Scores sorted once: global ascending order over compressible weights and per-layer orders."""

    flat: torch.Tensor
    global_order: torch.Tensor
    layer_orders: dict[int, torch.Tensor]

    @classmethod
    def build(cls, layout: LayerLayout, flat: torch.Tensor) -> SortedScores:
        """Sort ``flat`` scores (protected layers excluded)."""
        flat = flat.double()
        idx = torch.nonzero(~layout.protected_flat).squeeze(1)
        order = idx[torch.argsort(flat[idx], stable=True)]
        layer_orders = {}
        for i in layout.compressible:
            sl = layout.layer_slice(i)
            layer_orders[i] = torch.argsort(flat[sl], stable=True) + sl.start
        return cls(flat, order, layer_orders)


def ratio_mask(layout: LayerLayout, scores: SortedScores, ratio: float, scope: str) -> torch.Tensor:
    """Keep-mask pruning the lowest-scoring ``ratio`` of compressible weights (globally or in every layer)."""
    keep = torch.ones(layout.total, dtype=torch.bool)
    if ratio <= 0:
        return keep
    if scope == "global":
        k = int(round(ratio * layout.n_compressible))
        keep[scores.global_order[:k]] = False
    else:
        for i, order in scores.layer_orders.items():
            k = int(round(ratio * layout.sizes[i]))
            keep[order[:k]] = False
    return keep


def prune_counts(layout: LayerLayout, budget: SortedScores | None, ratio: float, scope: str,
                 fixed: dict[int, float] | None = None) -> dict[int, int]:
    """How many weights each compressible layer loses.

    Layers in ``fixed`` (layer index -> prune ratio) lose ``round(ratio_i * size_i)``. The others share ``ratio``:
    with ``scope="global"`` the lowest ``round(ratio * n)`` of their ``n`` weights in the global order of ``budget``
    decide how many each loses (``budget`` is required then), with ``"per-layer"`` each loses
    ``round(ratio * size)``.
    """
    fixed = fixed or {}
    counts = {i: int(round(fixed[i] * layout.sizes[i])) for i in layout.compressible if i in fixed}
    free = [i for i in layout.compressible if i not in fixed]
    if not free:
        return counts
    if scope != "global":
        counts.update({i: int(round(ratio * layout.sizes[i])) for i in free})
        return counts
    if budget is None:
        raise ValueError("a global prune ratio needs the scores whose ranking sets the layer budgets")
    order = budget.global_order
    if fixed:
        is_free = torch.zeros(len(layout.names), dtype=torch.bool)
        is_free[free] = True
        order = order[is_free[layout.layer_of[order]]]
    k = int(round(ratio * sum(layout.sizes[i] for i in free)))
    per = torch.bincount(layout.layer_of[order[:k]], minlength=len(layout.names))
    counts.update({i: int(per[i]) for i in free})
    return counts


def counts_mask(layout: LayerLayout, scores: SortedScores, counts: dict[int, int]) -> torch.Tensor:
    """Keep-mask pruning, in every layer ``i`` of ``counts``, its ``counts[i]`` lowest-scoring weights (the order
    inside each layer comes from ``scores``; which layers lose how many from :func:`prune_counts`)."""
    keep = torch.ones(layout.total, dtype=torch.bool)
    for i, k in counts.items():
        if k > 0:
            keep[scores.layer_orders[i][:k]] = False
    return keep


def rule_mask(layout: LayerLayout, prune_flat: torch.Tensor) -> torch.Tensor:
    """Keep-mask from a boolean "prune this" vector (protected layers are always kept)."""
    return ~(prune_flat.bool() & ~layout.protected_flat)


def channel_mask(layout: LayerLayout, channel_scores: torch.Tensor, ratio: float, scope: str,
                 exclude_layers: set[int] | None = None) -> torch.Tensor:
    """Structured keep-mask: remove whole output channels, lowest score first, until ``ratio`` of the compressible
    weights is removed (globally or per layer). Every layer keeps at least its best channel; ``exclude_layers``
    (e.g. the classifier, whose channels are classes) are never touched."""
    keep_ch = torch.ones(layout.total_channels, dtype=torch.bool)
    if ratio <= 0:
        return keep_ch[layout.channel_of]
    exclude = set(exclude_layers or ()) | {i for i, p in enumerate(layout.protected) if p}
    sizes = torch.tensor([layout.sizes[i] // layout.channels[i] for i in range(len(layout.names))],
                         dtype=torch.float64)[layout.layer_of_channel]
    scores = channel_scores.double()
    groups = [list(range(len(layout.names)))] if scope == "global" else [[i] for i in range(len(layout.names))]
    for group in groups:
        layers = [i for i in group if i not in exclude]
        if not layers:
            continue
        cand = []
        for i in layers:
            a, b = layout.channel_offsets[i], layout.channel_offsets[i + 1]
            ch = torch.arange(a, b)
            best = ch[torch.argmax(scores[a:b])]
            cand.append(ch[ch != best])
        cand_t = torch.cat(cand)
        if len(cand_t) == 0:
            continue
        order = cand_t[torch.argsort(scores[cand_t], stable=True)]
        base = sum(layout.sizes[i] for i in group if not layout.protected[i])
        target = ratio * base
        cum = torch.cumsum(sizes[order], 0)
        # number of channels whose removal brings the pruned count closest to the target
        j = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)))
        if j < len(cum) and (j == 0 or abs(float(cum[j]) - target) < abs(float(cum[j - 1]) - target)):
            j += 1
        keep_ch[order[:j]] = False
    return keep_ch[layout.channel_of]


def is_channel_structured(layout: LayerLayout, keep: torch.Tensor, i: int) -> bool:
    """Whether layer ``i``'s mask keeps or drops whole output channels only."""
    m = keep[layout.layer_slice(i)].view(layout.channels[i], -1)
    return bool((m.all(1) | ~m.any(1)).all())
