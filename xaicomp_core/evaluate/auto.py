"""Search the smallest plan within an accuracy budget (``xaicomp auto``).

The search chooses, for every compressible layer, a prune ratio (from :data:`SPARSITIES`) and a bit width (from
:data:`BITS`); the result is an ordinary :class:`~xaicomp_core.CompressionPlan` with ``layer_prune`` and
``layer_bits`` (reproducible with ``xaicomp compress --plan``). A *signal* decides the order and the allocation:

* ``relevance``: weights inside a layer are pruned by the smallest |R|·|w| (criterion ``lrp-x-weight``), and the
  damage of a layer's setting is predicted as ``sum_i |R_i| |w_i - q_i| / |w_i|`` (the first-order change of the
  weight's relevance when it is quantized to ``q_i`` or pruned, ``q_i = 0``). LRP conserves relevance from layer to
  layer, so these sums compare across layers as they are;
* ``hybrid``: pruning by the smallest |w| inside a layer, the relevance damage to allocate (issue 16's "relevance
  sets the layer budgets, magnitude selects inside");
* ``magnitude`` (the same search with relevance replaced by magnitude): pruning by the smallest |w|, damage
  ``sum_i |w_i - q_i| / sum_i |w_i|`` per layer (weights' scales do not compare across layers, BatchNorm rescales
  them, so each layer's error is relative to its own total).

How it searches (a rate-distortion allocation calibrated by real evaluations, as in ModelOpt's ``auto_quantize``
-- scores per layer and format, then a constrained choice -- followed by AIMET-style greedy per-layer steps):

1. **Table** (no evaluation): every (sparsity, bits) setting is applied to all layers at once, once per setting;
   each layer's packed bytes and predicted damage are read off (both depend on that layer's setting only).
2. **Calibration** (``probes`` evaluations per layer that matters, default 3, at most half the budget in all, the
   layers that can save the most bytes first): each layer alone compressed to
   about 25 and 10 % of its size along its hull and to its smallest setting; the predicted damage is mapped onto
   the measured accuracy drop, piecewise linearly (the sensitivity curves of AIMET's greedy selection, sampled where
   the signal says the efficient settings are). The signal says how damage grows with sparsity and bits *within*
   a layer, the measurements how much each layer matters. With ``probes=0`` the signal's damage is compared across
   layers as it is.
3. **Chain** (no evaluation): per layer, the lower convex hull of (bytes, damage); all hull steps merged by damage
   per byte saved give one chain of plans from the most accurate (dense 8 bits) to the smallest -- the plans that
   minimise ``bytes + lambda * damage`` as ``lambda`` falls.
4. **Bisection** (about ``log2(chain length)`` evaluations): the longest prefix of the chain whose accuracy on the
   search images is within ``max_drop`` points of the original model's. A **start** plan (``start=``, ``xaicomp auto
   --start-plan``; e.g. what the search found without fine-tuning, for a search that fine-tunes) replaces it when it
   is within the budget: one evaluation, and the search cannot end with a larger plan than its start.
5. **Greedy** (the rest of the budget): from there, the chain of the settings still allowed is re-derived from the
   current plan and its first ``m`` steps are tried at once, kept only if the accuracy stays within the budget
   (``m`` doubles after a success and halves after a failure); a single step that fails rules out its setting and
   every setting of that layer at least as aggressive (as much sparsity or more and as few bits or fewer; with any
   number of bits when the step added sparsity without taking bits away). When no step is left, **exchanges**: one
   layer tightened and another relaxed, saving at least 1 % of the bytes in all, the least predicted net damage per
   byte first; a successful exchange reopens the single steps.

Accuracy is measured on the *search images* only (by default the session's reference images, which are never its
evaluation images); the chosen plan is then evaluated once on the evaluation images, which the search never saw.
The budget counts evaluations on the search images (each one forward pass; with ``finetune_epochs`` every plan but
the calibration probes is fine-tuned first, as the saved plan will be). The built-in reference images come from the
training split, where the original model is more accurate (96.2 % vs 93.6 % for ``fashion-vgg``); the reported
evaluation drop can therefore differ from the search drop either way, and the result says both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xaicomp_core.errors import XaicompError
from xaicomp_core.evaluate.session import CompressionSession, EvaluationResult, forward_logits
from xaicomp_core.plan import DEFAULT_FINETUNE_BATCH, DEFAULT_FINETUNE_LR, CompressionPlan

#: Per-layer prune ratios the search chooses from.
SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95,
                                  0.97, 0.98)
#: Per-layer bit widths the search chooses from.
BITS: tuple[int, ...] = (8, 7, 6, 5, 4, 3, 2)
#: Calibration probes compress one layer to its smallest setting and to about these fractions of its largest packed
#: size (the first ``probes - 1``).
PROBE_FRACTIONS = (0.25, 0.1, 0.5, 0.04)
#: Steps of the chain the greedy phase first tries at once.
GREEDY_START = 4
#: An exchange (one layer tightened, another relaxed) must save at least this fraction of the plan's bytes.
EXCHANGE_MIN = 0.01
#: The signals: the criterion that orders weights inside a layer, and how damage is weighted and normalised.
SIGNALS: dict[str, dict[str, Any]] = {
    "relevance": {"criterion": "lrp-x-weight", "importance": "relevance", "normalise": False,
                  "text": "prune by |R|·|w| inside layers; allocate by predicted relevance damage"},
    "hybrid": {"criterion": "magnitude", "importance": "relevance", "normalise": False,
               "text": "prune by |w| inside layers; allocate by predicted relevance damage"},
    "magnitude": {"criterion": "magnitude", "importance": "magnitude", "normalise": True,
                  "text": "prune by |w| inside layers; allocate by relative weight error"},
}
DEFAULT_BUDGET = 80
#: The search's fine-tuning recipe: batch size and learning rate (plans default to 128 and 0.01). On 8,000 held-out
#: Fashion-MNIST test images this recovered 0.3-0.8 points more than the plan default after 2 epochs on the
#: VGG's auto plans (docs/ARCHITECTURE.md, "Fine-tuning recipe"), at about 1.4 times the time per fine-tuning.
AUTO_FINETUNE_BATCH = 32
AUTO_FINETUNE_LR = 0.005
#: The fine-tuning recipes (batch size, learning rate) the Compress page offers and the held-out check compares.
FINETUNE_RECIPES: dict[str, tuple[int, float]] = {"plan default": (DEFAULT_FINETUNE_BATCH, DEFAULT_FINETUNE_LR),
                                                  "xaicomp auto": (AUTO_FINETUNE_BATCH, AUTO_FINETUNE_LR)}

ProgressFn = Callable[[int, int], None]
#: (sparsity, bits) of one layer; bits is a whole width, or the width of the mix (:attr:`AutoSearch.mix`) as a
#: fraction, e.g. 2.5 for half of the channels at 3 and half at 2 bits.
Setting = tuple[float, float]


@dataclass
class AutoResult:
    """What one search found.

    Attributes
    ----------
    signal : str
        ``"relevance"`` or ``"magnitude"``.
    plan : CompressionPlan
        The smallest plan found within the budget on the search images (the most accurate one tried if none was).
    feasible : bool
        Whether ``plan`` is within ``max_drop`` on the search images.
    search_accuracy, search_baseline : float
        Accuracy of ``plan`` and of the original model on the search images.
    search_images : int
    estimated_bytes : int
        Packed size of ``plan``.
    evaluation : EvaluationResult
        ``plan`` on the session's evaluation images (never used by the search).
    evaluations : int
        Evaluations on the search images used (at most the budget).
    history : list of dict
        Every evaluated plan: phase, bytes, accuracy on the search images, whether it was within the budget.
    seconds : float
    evaluation_half_width : float
        Half-width in points of the 95 % interval of the drop on the evaluation images
        (:meth:`CompressionSession.drop_interval`).
    warm_start : int
        Evaluations of the search without fine-tuning whose plan this one started from (:func:`auto_compare`'s
        ``warm_start``; 0: none, or not within the budget).
    """

    signal: str
    plan: CompressionPlan
    feasible: bool
    max_drop: float
    search_accuracy: float
    search_baseline: float
    search_images: int
    estimated_bytes: int
    evaluation: EvaluationResult
    evaluations: int
    budget: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    warm_start: int = 0
    evaluation_half_width: float = 0.0

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes / packed bytes of the plan."""
        return self.evaluation.compression_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (the evaluation without per-tensor rows)."""
        ev = self.evaluation
        return {
            "signal": self.signal, "how": SIGNALS[self.signal]["text"], "plan": self.plan.to_dict(),
            "description": self.plan.describe(), "feasible_on_search_images": self.feasible,
            "max_drop_points": self.max_drop,
            "search": {"images": self.search_images, "accuracy": self.search_accuracy,
                       "baseline_accuracy": self.search_baseline,
                       "drop_points": 100 * (self.search_baseline - self.search_accuracy)},
            "evaluation": {"images": ev.images, "accuracy": ev.accuracy, "baseline_accuracy": ev.baseline_accuracy,
                           "drop_points": -100 * ev.accuracy_change,
                           "drop_half_width_points": self.evaluation_half_width,
                           "within_max_drop": -100 * ev.accuracy_change <= self.max_drop + 1e-9,
                           "sparsity": ev.sparsity, "mean_bits": ev.mean_bits},
            "estimated_bytes": ev.size.estimated_bytes, "fp32_bytes": ev.size.fp32_bytes,
            "compression_ratio": ev.compression_ratio,
            "layers": [{"name": la.name, "sparsity": la.sparsity, "bits": la.mean_bits, "bytes": la.bytes}
                       for la in ev.layers],
            "evaluations": self.evaluations, "budget": self.budget, "seconds": self.seconds,
            "warm_start": self.warm_start, "history": self.history,
        }


def _hull(points: list[tuple[int, float, Setting]]) -> list[tuple[int, float, Setting]]:
    """Lower convex hull of (bytes, damage, setting), from the least damage (most bytes) to the fewest bytes."""
    best: dict[int, tuple[int, float, Setting]] = {}
    for p in points:  # per byte count, the least damage
        if p[0] not in best or p[1] < best[p[0]][1]:
            best[p[0]] = p
    pts = sorted(best.values(), key=lambda p: (p[0], p[1]))
    # keep only Pareto points: fewer bytes must mean more damage
    pareto: list[tuple[int, float, Setting]] = []
    for p in pts:
        if not pareto or p[1] < pareto[-1][1]:
            pareto.append(p)
    hull: list[tuple[int, float, Setting]] = []
    for p in pareto:  # ascending bytes, descending damage: the lower-left convex chain
        while len(hull) >= 2:
            (b1, d1, _), (b2, d2, _) = hull[-2], hull[-1]
            # drop the middle point if it lies on or above the segment from hull[-2] to p
            if (d2 - d1) * (p[0] - b1) >= (p[1] - d1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull[::-1]


class AutoSearch:
    """The search for one session and one signal (see the module docstring).

    Parameters
    ----------
    session : CompressionSession
    signal : {"relevance", "magnitude"}
    search_data : "reference" or (inputs, labels)
        The images whose accuracy the search optimises: the session's reference images (default) or model-ready
        tensors given explicitly. Never the evaluation images the result reports.
    sparsities, bits : sequence
        The per-layer settings to choose from.
    finetune_epochs : int
        Fine-tune every evaluated plan this many epochs first (on the session's training data), as the plan will be.
    finetune_batch, finetune_lr : int, float
        The fine-tuning recipe written into the plans (default :data:`AUTO_FINETUNE_BATCH`,
        :data:`AUTO_FINETUNE_LR`).
    composite, quantizer : str
        LRP composite of the relevance signal; quantizer of the plans.
    probes : int
        Calibration probes per layer (:meth:`_calibrate`); 0: the signal's damage is compared across layers as it
        is (no evaluation spent on calibration).
    mix : (int, int, float), optional
        One more bit setting per layer: the share ``mix[2]`` of the layer's output channels at ``mix[0]`` bits and
        the rest at ``mix[1]``, channels ranked by the signal (``bit_ranking`` "relevance" for the relevance and
        hybrid signals, "magnitude" for magnitude). In the plan such a layer is left out of ``layer_bits`` and
        takes the plan's ``bit_levels``/``bit_split`` per channel within the layer (``scope="per-layer"``); one
        mix per search, since a plan has one split.
    fold_norm : bool
        Plans store every BatchNorm as scale and shift (:attr:`CompressionPlan.fold_norm`, default True: 8 bytes per
        channel instead of 16, outputs changed by float32 rounding only; every plan is measured folded). Ignored for
        a model without BatchNorm.
    """

    def __init__(self, session: CompressionSession, signal: str = "relevance", *,
                 search_data: str | tuple[torch.Tensor, torch.Tensor] = "reference",
                 sparsities: Sequence[float] = SPARSITIES, bits: Sequence[int] = BITS, finetune_epochs: int = 0,
                 composite: str | None = None, quantizer: str = "mse", probes: int = 3,
                 mix: tuple[int, int, float] | None = None, fold_norm: bool = True,
                 finetune_batch: int = AUTO_FINETUNE_BATCH, finetune_lr: float = AUTO_FINETUNE_LR) -> None:
        if signal not in SIGNALS:
            raise XaicompError(f"unknown signal {signal!r}; choose one of {', '.join(SIGNALS)}")
        if finetune_epochs and not session.can_finetune:
            raise XaicompError("fine-tuning needs training data; this session has none")
        self.session = session
        self.signal = signal
        self.spec = SIGNALS[signal]
        self.composite = composite or session.composite
        self.quantizer = quantizer
        self.finetune_epochs = int(finetune_epochs)
        self.finetune_recipe = {"finetune_batch": int(finetune_batch), "finetune_lr": float(finetune_lr)}
        if self.finetune_epochs:
            CompressionPlan(finetune_epochs=self.finetune_epochs, **self.finetune_recipe).validate()  # one line if bad
        if not 0 <= int(probes) <= len(PROBE_FRACTIONS) + 1:
            raise XaicompError(f"probes per layer must be in 0..{len(PROBE_FRACTIONS) + 1}, got {probes}")
        self.probes = int(probes)
        self.sparsities = sorted({float(s) for s in sparsities})
        self.bits: list[float] = sorted({int(b) for b in bits}, reverse=True)
        if not self.sparsities or not self.bits or any(not 0 <= s < 1 for s in self.sparsities):
            raise XaicompError("the search needs sparsities in [0, 1) and at least one bit width")
        self.fold_norm = bool(fold_norm) and bool(session.compressor.norms)  # nothing to fold: plans stay version 2
        self.mix = None
        if mix is not None:
            hi, lo, share = int(mix[0]), int(mix[1]), float(mix[2])
            if not (8 >= hi > lo >= 1 and 0 < share < 1):
                raise XaicompError(f"a mix is (more bits, fewer bits, share at more bits) with 8 >= more > fewer "
                                   f">= 1 and a share in (0, 1), got {mix}")
            self.mix = (hi, lo, share)
            self.bits = sorted({*self.bits, lo + share * (hi - lo)}, reverse=True)
        if search_data == "reference":
            self.x, self.y = session.x_ref, session.y_ref
        elif isinstance(search_data, tuple) and len(search_data) == 2:
            self.x, self.y = search_data
        else:
            raise XaicompError("search_data must be 'reference' or (inputs, labels)")
        if len(self.y) == 0:
            raise XaicompError("no search images")
        layout = session.layout
        self.layers = [layout.names[i].removesuffix(".weight") for i in layout.compressible]
        self.baseline = float((forward_logits(session.model, self.x).argmax(1) == self.y).double().mean())
        self._acc: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    # --------------------------------------------------------------------------------------------------------
    def plan_for(self, state: dict[str, Setting], finetune: bool = True) -> CompressionPlan:
        """The plan of per-layer settings ``state`` (layer -> (sparsity, bits)), fine-tuned as the search is unless
        ``finetune`` is False."""
        whole = {k: int(b) for k, (_, b) in state.items() if b == int(b)}
        mixed = self.mix is not None and len(whole) < len(state)
        levels = sorted({*whole.values(), *(self.mix[:2] if mixed else ())}, reverse=True)
        split, extra = [0.0] * (len(levels) - 1), {"bit_ranking": "magnitude", "granularity": "layer"}
        if mixed:
            hi, lo, share = self.mix
            split = [share if b == hi else (1 - share if b == lo else 0.0) for b in levels[:-1]]
            extra = {"bit_ranking": "relevance" if self.spec["importance"] == "relevance" else "magnitude",
                     "granularity": "channel", "scope": "per-layer"}
        recipe = self.finetune_recipe if finetune and self.finetune_epochs else {}
        return CompressionPlan(criterion=self.spec["criterion"], prune_ratio=0.0, bit_levels=levels,
                               bit_split=split, quantizer=self.quantizer, composite=self.composite,
                               finetune_epochs=self.finetune_epochs if finetune else 0, **recipe,
                               layer_prune={k: s for k, (s, _) in state.items()}, layer_bits=whole,
                               fold_norm=self.fold_norm,
                               **extra).validate()

    def table(self) -> tuple[dict[str, dict[Setting, tuple[int, float]]], int]:
        """Per layer and setting: (packed bytes of the layer's weight, predicted damage); and the bytes of the
        rest (biases, normalisation, protected layers), the same for every setting."""
        s = self.session
        layout = s.layout
        w = s.compressor.weights_flat.double()
        if self.spec["importance"] == "relevance":
            rel = s.relevance(self.composite)
            source = rel.abs_by_class if rel.abs_by_class is not None else {k: v.abs() for k, v in rel.weights.items()}
            importance = layout.flat({n: source[n] for n in layout.names}).double().abs()
        else:
            importance = w.abs()
        ratio = torch.where(w != 0, importance / w.abs().clamp(min=1e-30), torch.zeros_like(w))
        totals = {i: float(importance[layout.layer_slice(i)].sum()) for i in layout.compressible}
        table: dict[str, dict[Setting, tuple[int, float]]] = {k: {} for k in self.layers}
        rest = 0
        for sp in self.sparsities:
            for b in self.bits:
                state = {k: (sp, b) for k in self.layers}
                cw = s.compressor.compress(self.plan_for(state, finetune=False), s.relevance,
                                           s.relevance_of)
                err = (w - cw.quant.values.double()).abs() * ratio
                sizes = {t.name: t.total for t in cw.size.tensors}
                rest = sum(v for n, v in sizes.items() if n not in set(layout.names))
                for k, i in zip(self.layers, layout.compressible):
                    d = float(err[layout.layer_slice(i)].sum())
                    if self.spec["normalise"]:
                        d /= max(totals[i], 1e-30)
                    table[k][(sp, b)] = (sizes[layout.names[i]], d)
        return table, rest

    def _calibrate(self, table: dict[str, dict[Setting, tuple[int, float]]],
                   check: Callable[..., bool | None]) -> dict[str, dict[Setting, tuple[int, float]]]:
        """Measured sensitivity curves: each layer alone at :attr:`probes` settings of its hull (its smallest one and
        those nearest :data:`PROBE_FRACTIONS` of its largest size), the others at their most accurate setting, never
        fine-tuned.
        A layer's predicted damage is then mapped onto the measured accuracy drop (points, non-decreasing,
        piecewise linear through the probes, linear beyond the last one), so that damage compares across layers
        as accuracy does while the signal still says how it grows between the probes. Layers whose compression
        saves under 1 % of the model's bytes are not probed (they get the median drop per unit of damage)."""
        hulls = {k: _hull([(nb, d, st) for st, (nb, d) in table[k].items()]) for k in self.layers}
        base_state = {k: hulls[k][0][2] for k in self.layers}
        total = sum(h[0][0] for h in hulls.values())
        curves: dict[str, tuple[list[float], list[float]]] = {}
        for k in sorted(self.layers, key=lambda k: -(hulls[k][0][0] - hulls[k][-1][0])):
            h = hulls[k]
            if h[0][0] - h[-1][0] < 0.01 * total or len(h) < 2:
                continue
            picks: list[tuple[int, float, Setting]] = []
            picks = [h[-1]]  # the smallest setting: between the probes the curve is interpolated, not extrapolated
            for frac in PROBE_FRACTIONS[:self.probes - 1]:
                p = min(h[1:], key=lambda q: abs(q[0] - frac * h[0][0]))
                if p not in picks:
                    picks.append(p)
            xs, ys = [h[0][1]], [0.0]
            for _nb, d, st in sorted(picks, key=lambda q: q[1]):
                probe = dict(base_state)
                probe[k] = st
                if check(probe, "calibration", False) is None:
                    break
                drop = 100 * (self.baseline - self._acc[self.plan_for(probe, finetune=False).key()])
                xs.append(d)
                ys.append(max(drop, ys[-1], 0.0))
            if len(xs) > 1:
                curves[k] = (xs, ys)
        slopes = sorted(ys[-1] / max(xs[-1] - xs[0], 1e-30) for xs, ys in curves.values())
        median = slopes[len(slopes) // 2] if slopes else 1.0
        dmax = max((d for t in table.values() for _, d in t.values()), default=1.0) or 1.0

        def mapped(k: str, d: float) -> float:
            tie = 1e-6 * d / dmax  # equal measured drops: the signal's damage decides
            if k not in curves:
                return median * max(d - hulls[k][0][1], 0.0) + tie
            xs, ys = curves[k]
            if d <= xs[0]:
                return tie
            for (x1, y1), (x2, y2) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
                if d <= x2:
                    return y1 + (y2 - y1) * (d - x1) / max(x2 - x1, 1e-30) + tie
            x1, y1, x2, y2 = xs[-2], ys[-2], xs[-1], ys[-1]
            slope = max((y2 - y1) / max(x2 - x1, 1e-30), y2 / max(x2 - xs[0], 1e-30), 1e-9)
            return y2 + slope * (d - x2) + tie

        return {k: {st: (nb, mapped(k, d)) for st, (nb, d) in t.items()} for k, t in table.items()}

    def accuracy(self, plan: CompressionPlan) -> float:
        """Top-1 of ``plan`` on the search images (cached per plan)."""
        key = plan.key()
        if key not in self._acc:
            cw = self.session.compress(plan)
            pred = self.session.compressed_logits(cw, self.x).argmax(1)
            self._acc[key] = float((pred == self.y).double().mean())
        return self._acc[key]

    # --------------------------------------------------------------------------------------------------------
    def start_state(self, plan: CompressionPlan) -> dict[str, Setting]:
        """The per-layer settings of ``plan`` (its ``layer_prune`` and ``layer_bits`` for every searched layer, as
        :meth:`plan_for` writes them), for :meth:`run`'s ``start``.

        Raises
        ------
        XaicompError
            If a layer is missing or its setting is not one this search chooses from.
        """
        state: dict[str, Setting] = {}
        for k in self.layers:
            if k not in plan.layer_prune or k not in plan.layer_bits:
                raise XaicompError(f"the start plan has no per-layer setting for {k} (use a plan from xaicomp auto)")
            st = (float(plan.layer_prune[k]), int(plan.layer_bits[k]))
            if st[0] not in self.sparsities or st[1] not in self.bits:
                raise XaicompError(f"the start plan's setting of {k} ({st[0]:g} pruned, {st[1]} bits) is not on "
                                   "the search's grid")
            state[k] = st
        return state

    def run(self, max_drop: float = 1.0, budget: int = DEFAULT_BUDGET,
            progress: ProgressFn | None = None, start: CompressionPlan | None = None) -> AutoResult:
        """Search (see the module docstring) and evaluate the plan found on the session's evaluation images.

        Parameters
        ----------
        max_drop : float
            Accuracy budget in percentage points below the original model, on the search images.
        budget : int
            Evaluations on the search images, at most.
        progress : callable, optional
            ``progress(done, budget)`` after each evaluation.
        start : CompressionPlan, optional
            A plan of per-layer settings on this search's grid (e.g. the result of the same search without
            fine-tuning): measured first, and if it is within the budget the greedy steps start from it instead of
            from the bisection, so the search cannot end with a larger plan than ``start`` (larger by its size table,
            which prices the codes before any fine-tuning; the result states the exact size).
        """
        start_state = self.start_state(start) if start is not None else None
        if not max_drop >= 0:
            raise XaicompError(f"max drop must be at least 0 points, got {max_drop}")
        if budget < 1:
            raise XaicompError(f"the search needs a budget of at least 1 evaluation, got {budget}")
        t0 = time.perf_counter()
        table, rest = self.table()
        limit = self.baseline - max_drop / 100 - 1e-12
        used = 0
        best: tuple[int, CompressionPlan, float] | None = None  # smallest feasible: (bytes, plan, accuracy)
        fallback: tuple[float, CompressionPlan, int] | None = None  # most accurate tried

        def size_of(state: dict[str, Setting]) -> int:
            return rest + sum(table[k][state[k]][0] for k in self.layers)

        def check(state: dict[str, Setting], phase: str, finetune: bool = True) -> bool | None:
            """Whether ``state`` is within the budget (None when the evaluation budget is spent)."""
            nonlocal used, best, fallback
            plan = self.plan_for(state, finetune)
            cached = plan.key() in self._acc
            if not cached and used >= (budget // 2 if phase == "calibration" else budget):
                return None  # (calibration takes at most half the budget: the rest is the search's)
            acc = self.accuracy(plan)
            nbytes = size_of(state)
            ok = acc >= limit
            if not cached:
                used += 1
                self.history.append({"phase": phase, "bytes": nbytes, "search_accuracy": acc, "within": ok,
                                     "layers": {k: list(v) for k, v in state.items()}})
                if progress is not None:
                    progress(used, budget)
            if finetune or not self.finetune_epochs:  # a fine-tuning search returns a fine-tuned plan
                if ok and (best is None or nbytes < best[0]):
                    best = (nbytes, plan, acc)
                if fallback is None or acc > fallback[0]:
                    fallback = (acc, plan, nbytes)
            return ok

        if self.probes:
            table = self._calibrate(table, check)
        # chain: every layer's hull steps, merged by (calibrated) damage per byte saved
        hulls = {k: _hull([(nb, d, st) for st, (nb, d) in table[k].items()]) for k in self.layers}
        state = {k: hulls[k][0][2] for k in self.layers}
        steps = []
        for k, h in hulls.items():
            for (b1, d1, _), (b2, d2, st) in zip(h, h[1:]):
                steps.append(((d2 - d1) / max(b1 - b2, 1), k, st))
        steps.sort(key=lambda t: t[0])
        chain = [dict(state)]
        for _, k, st in steps:
            state = dict(chain[-1])
            state[k] = st
            chain.append(state)
        # bisection: the longest feasible prefix (the end of the chain, the smallest plan, is taken as infeasible
        # unless everything before it is feasible)
        lo, hi = 0, len(chain)
        if start_state is not None and check(start_state, "start"):
            current = dict(start_state)
        else:
            if check(chain[0], "bisection"):
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    ok = check(chain[mid], "bisection")
                    if ok is None:
                        break
                    lo, hi = (mid, hi) if ok else (lo, mid)
            current = dict(chain[lo])
        # greedy: from there, the (calibrated) chain of the settings still allowed, re-derived from the current
        # plan; try its first m steps at once (m doubles after a success, halves after a failure); a single step
        # that fails rules out that setting and every setting of that layer at least as aggressive (as sparse or
        # sparser with as few bits or fewer; with any bits when the step added sparsity and no fewer bits)
        rejected: dict[str, list[Setting]] = {k: [] for k in self.layers}

        def allowed(k: str, st: Setting) -> bool:
            return not any(st[0] >= r[0] and st[1] <= r[1] for r in rejected[k])

        m = GREEDY_START
        tried: set[tuple] = set()
        hulls_all = {k: _hull([(nb, d, st) for st, (nb, d) in table[k].items()]) for k in self.layers}
        while best is not None and used < budget:
            steps = []
            for k in self.layers:
                nb0, d0 = table[k][current[k]]
                pts = [(nb, d, st) for st, (nb, d) in table[k].items()
                       if (nb < nb0 and allowed(k, st)) or st == current[k]]
                h = _hull(pts)
                if h[0][2] != current[k]:
                    h = [(nb0, d0, current[k]), *h]
                for (b1, d1, _), (b2, d2, st) in zip(h, h[1:]):
                    steps.append(((d2 - d1) / max(b1 - b2, 1), k, st))
            if not steps:
                # exchange: tighten one layer and relax another for fewer bytes in all, the least predicted net
                # damage per net byte saved first (pairs of hull settings; each pair tried once)
                total_now = size_of(current)
                pairs = []
                for k in self.layers:
                    nbk, dk = table[k][current[k]]
                    for j in self.layers:
                        nbj, dj = table[j][current[j]]
                        if j == k:
                            continue
                        for nb1, d1, s1 in hulls_all[k]:
                            if nb1 >= nbk:
                                continue
                            for nb2, d2, s2 in hulls_all[j]:
                                net = (nbk - nb1) - (nb2 - nbj)
                                if nb2 <= nbj or d2 >= dj or net < EXCHANGE_MIN * total_now:
                                    continue
                                key = (k, s1, j, s2, tuple(sorted(current.items())))
                                if key not in tried:
                                    pairs.append(((d1 - dk + d2 - dj) / net, -net, key))
                if not pairs:
                    break
                _, _, key = min(pairs)
                tried.add(key)
                k, s1, j, s2, _ = key
                trial = dict(current)
                trial[k], trial[j] = s1, s2
                ok = check(trial, "exchange")
                if ok is None:
                    break
                if ok:
                    current = trial
                    rejected = {k: [] for k in self.layers}  # a new neighbourhood: single steps may pass again
                    m = GREEDY_START
                continue
            steps.sort(key=lambda t: t[0])
            m = max(1, min(m, len(steps)))
            trial = dict(current)
            for _, k, st in steps[:m]:
                trial[k] = st
            ok = check(trial, "greedy")
            if ok is None:
                break
            if ok:
                current = trial
                m *= 2
            elif m > 1:
                m //= 2
            else:
                _, k, st = steps[0]
                # a failed step that adds sparsity while keeping as many bits or more condemns the sparsity itself
                sp0, b0 = current[k]
                rejected[k].append((st[0], 99) if st[0] > sp0 and st[1] >= b0 else st)
        if best is not None:
            nbytes, plan, acc = best
            feasible = True
        else:
            assert fallback is not None
            acc, plan, nbytes = fallback
            feasible = False
        evaluation = self.session.evaluate(plan)
        return AutoResult(self.signal, plan, feasible, float(max_drop), acc, self.baseline, len(self.y),
                          evaluation.size.estimated_bytes, evaluation, used, int(budget), self.history,
                          time.perf_counter() - t0,
                          evaluation_half_width=self.session.drop_interval(evaluation)[1])


def auto_search(session: CompressionSession, max_drop: float = 1.0, *, signal: str = "relevance",
                budget: int = DEFAULT_BUDGET, finetune_epochs: int = 0,
                search_data: str | tuple[torch.Tensor, torch.Tensor] = "reference",
                progress: ProgressFn | None = None, start: CompressionPlan | None = None,
                **kwargs: Any) -> AutoResult:
    """The smallest plan within ``max_drop`` points found with ``budget`` evaluations (see :class:`AutoSearch`;
    ``start``: :meth:`AutoSearch.run`)."""
    search = AutoSearch(session, signal, search_data=search_data, finetune_epochs=finetune_epochs, **kwargs)
    return search.run(max_drop, budget, progress, start)


def auto_compare(session: CompressionSession, max_drop: float = 1.0, *,
                 signals: Sequence[str] = ("hybrid", "magnitude"), budget: int = DEFAULT_BUDGET,
                 finetune_epochs: int = 0, search_data: str | tuple[torch.Tensor, torch.Tensor] = "reference",
                 progress: ProgressFn | None = None, start: Mapping[str, CompressionPlan] | None = None,
                 warm_start: int = 0, **kwargs: Any) -> dict[str, AutoResult]:
    """The same search once per signal, with the same budget each (``progress(done, total)`` over all of them).

    ``start`` maps a signal to the plan its search starts from (:meth:`AutoSearch.run`). With ``warm_start`` > 0 and
    ``finetune_epochs`` > 0, each signal is first searched without fine-tuning (``warm_start`` evaluations, cheap) and
    the fine-tuned search starts from the plan found when it is within the budget, so fine-tuning in the loop never
    ends with a larger plan than the search without it; ``progress`` then counts both searches.
    """
    if warm_start < 0:
        raise XaicompError(f"the warm start needs 0 or more evaluations, got {warm_start}")
    warm = int(warm_start) if finetune_epochs else 0
    total = (budget + warm) * len(signals)
    out: dict[str, AutoResult] = {}
    starts = dict(start or {})

    def shifted(offset: int) -> ProgressFn:
        """``progress`` of one search, counted on from ``offset`` evaluations of the whole comparison."""
        return lambda done, _total: progress(offset + done, total) if progress is not None else None

    for n, sig in enumerate(signals):
        offset = n * (budget + warm)
        started = 0
        if warm:
            pre = auto_search(session, max_drop, signal=sig, budget=warm, finetune_epochs=0, search_data=search_data,
                              progress=shifted(offset), start=starts.get(sig), **kwargs)
            if pre.feasible:
                starts[sig] = pre.plan
                started = warm
        out[sig] = auto_search(session, max_drop, signal=sig, budget=budget, finetune_epochs=finetune_epochs,
                               search_data=search_data, progress=shifted(offset + warm), start=starts.get(sig),
                               **kwargs)
        if started and any(h["phase"] == "start" and h["within"] for h in out[sig].history):
            out[sig].warm_start = started
        if progress is not None:
            progress(offset + budget + warm, total)
    return out


def compare_summary(results: dict[str, AutoResult]) -> dict[str, Any]:
    """Side by side: per signal the ratio, bytes and accuracies, and which signal found the smaller plan."""
    rows = {k: {"compression_ratio": r.compression_ratio, "estimated_bytes": r.estimated_bytes,
                "search_drop_points": 100 * (r.search_baseline - r.search_accuracy),
                "evaluation_drop_points": -100 * r.evaluation.accuracy_change,
                "evaluation_drop_half_width_points": r.evaluation_half_width, "feasible": r.feasible,
                "evaluations": r.evaluations} for k, r in results.items()}
    feasible = {k: r for k, r in results.items() if r.feasible}
    smallest = min(feasible, key=lambda k: feasible[k].estimated_bytes) if feasible else None
    return {"signals": rows, "smallest": smallest,
            "ratio_relevance_over_magnitude": (results["relevance"].compression_ratio
                                               / results["magnitude"].compression_ratio)
            if {"relevance", "magnitude"} <= set(results) else None}


#: Signals that use relevance (to order weights inside a layer, to allocate across layers, or both).
RELEVANCE_SIGNALS: tuple[str, ...] = ("relevance", "hybrid")


def _kb(nbytes: float) -> str:
    return f"{nbytes / 1000:,.1f} kB"


def layer_bits_text(plan: CompressionPlan, layer: str) -> str:
    """A layer's bit width in ``plan``: ``"3"``, or its per-channel mix, e.g. ``"3/2 (50/50 % of channels)"``."""
    if layer in plan.layer_bits:
        return str(plan.layer_bits[layer])
    shares = [*plan.bit_split, max(0.0, 1 - sum(plan.bit_split))]
    used = [(b, f) for b, f in zip(plan.bit_levels, shares) if f > 0]
    return ("/".join(str(b) for b, _ in used) + " (" + "/".join(f"{100 * f:.0f}" for _, f in used)
            + f" % of channels by {plan.bit_ranking})")


def _setting(r: AutoResult, layer: str) -> str:
    return f"{r.plan.layer_prune.get(layer, 0.0):.0%} pruned at {layer_bits_text(r.plan, layer)} bits"


def verdict(results: dict[str, AutoResult]) -> str:
    """Which signal found the smallest plan and by how much, in plain words (Markdown), from the results' own numbers.

    The winner is the smallest plan within the accuracy budget on the search images. The text names the margin
    (bytes and ratio), says plainly when magnitude (no relevance) wins, locates the difference (the layer whose
    packed bytes differ most between the two smallest plans, with both settings), and gives every plan's drop on the
    evaluation images, which the search never saw (flagging drops above the budget).

    Parameters
    ----------
    results : dict of str to AutoResult
        One search per signal (:func:`auto_compare`), on the same session and budget.

    Returns
    -------
    str
    """
    if not results:
        raise XaicompError("no search results to compare")
    first = next(iter(results.values()))
    drop, n_eval = first.max_drop, first.evaluation.images
    feasible = sorted((k for k, r in results.items() if r.feasible), key=lambda k: results[k].estimated_bytes)
    parts: list[str] = []
    if not feasible:
        parts.append(f"No signal found a plan within {drop:g} points on the {first.search_images:,} search images "
                     f"with {first.budget} evaluations each; shown is each signal's most accurate plan tried. Allow "
                     "a larger drop or more evaluations.")
    else:
        win = feasible[0]
        w = results[win]
        if len(results) == 1:
            parts.append(f"**{win}** found {w.compression_ratio:.1f}× ({_kb(w.estimated_bytes)}) within {drop:g} "
                         f"points on the search images.")
        elif len(feasible) == 1:
            others = ", ".join(k for k in results if k != win)
            parts.append(f"**{win}** found {w.compression_ratio:.1f}× ({_kb(w.estimated_bytes)}); {others} found "
                         f"no plan within {drop:g} points with the same {w.budget} evaluations.")
        else:
            second = feasible[1]
            o = results[second]
            if w.estimated_bytes == o.estimated_bytes:
                parts.append(f"**{win} and {second} tie** at {w.compression_ratio:.1f}× ({_kb(w.estimated_bytes)}).")
            else:
                saved = 1 - w.estimated_bytes / o.estimated_bytes
                parts.append(f"**{win}** found the smallest plan: {w.compression_ratio:.1f}× "
                             f"({_kb(w.estimated_bytes)}) against {second}'s {o.compression_ratio:.1f}× "
                             f"({_kb(o.estimated_bytes)}), {saved:.1%} fewer bytes.")
                diff = {la.name: la.bytes for la in w.evaluation.layers}
                gaps = [(abs(la.bytes - diff.get(la.name, la.bytes)), la) for la in o.evaluation.layers]
                gap, layer = max(gaps, key=lambda t: t[0]) if gaps else (0, None)
                if layer is not None and gap > 0:
                    total = sum(la.params for la in o.evaluation.layers) or 1
                    wb = diff[layer.name]
                    parts.append(f"The largest difference is in `{layer.name}` ({layer.params:,} weights, "
                                 f"{layer.params / total:.0%} of the compressible ones): {win} "
                                 f"{_setting(w, layer.name)} ({_kb(wb)}), {second} {_setting(o, layer.name)} "
                                 f"({_kb(layer.bytes)}).")
            if "magnitude" in results:
                mag = results["magnitude"]
                best_rel = next((k for k in feasible if k in RELEVANCE_SIGNALS), None)
                if win == "magnitude":
                    parts.append("**Relevance did not help here**: magnitude alone, with the same search and the "
                                 "same number of evaluations, found the smallest plan"
                                 + (f" ({best_rel}: {results[best_rel].compression_ratio:.1f}×)." if best_rel
                                    else "; no relevance signal found a plan within the budget."))
                elif win in RELEVANCE_SIGNALS and mag.feasible:
                    parts.append(f"Relevance helped: {win} is {w.compression_ratio / mag.compression_ratio:.2f}× "
                                 f"the ratio magnitude reached ({mag.compression_ratio:.1f}×).")
    drops = []
    for k, r in results.items():
        d = -100 * r.evaluation.accuracy_change + 0.0  # (no "-0.00")
        drops.append(f"{k} {d:.2f} ± {r.evaluation_half_width:.2f}" + (" (above the budget)" if d > drop + 1e-9
                                                                         else ""))
    parts.append(f"On the {n_eval:,} evaluation images, which the search never saw, the drops are "
                 + ", ".join(drops) + " points (± the half-width of the 95 % interval: on this many images a "
                 "drop is known only that well). The search measures on its own images (by default the reference "
                 "images, from the training split), so the two drops can differ either way.")
    if feasible:
        over = {k for k, r in results.items() if -100 * r.evaluation.accuracy_change > drop + 1e-9}
        held = [k for k in feasible[1:] if k not in over]
        if feasible[0] in over and held:
            parts.append(f"**Caution**: {feasible[0]}'s plan is over the budget on the evaluation images while "
                         f"{', '.join(held)}'s is not, so its win on the search images does not carry over here.")
    return " ".join(parts)
