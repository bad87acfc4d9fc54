"""Does the data fit the model, and how long will the first result take?

* :func:`check_class_count` -- a model whose outputs do not match the data's classes is refused with a message
  that says what to do; it is never evaluated silently. ImageFolder data is mapped onto the model's classes by
  folder names (or numbers), which is the explicit way to evaluate on a subset of a model's classes.
* :func:`plan_budget` -- times one small batch (a forward pass and, when that does not already settle it, LRP on
  one image after a warm-up and on three: the cost per image and the fixed cost) and estimates the seconds to the
  first result (baseline, relevance on the reference images, one compressed evaluation). Above
  :data:`TARGET_SECONDS` it proposes reference and evaluation image counts that bring the first result to about
  that, shown before the long work starts.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xaicomp_core.errors import DataError

if TYPE_CHECKING:
    from torch import nn

    from xaicomp_core.io.data import ImageDataset
    from xaicomp_core.io.models import ModelInfo

#: The first result should come within about this many seconds.
TARGET_SECONDS = 30.0
#: Images per timed batch.
TIMING_BATCH = 8


def check_class_count(info: ModelInfo, data: ImageDataset, label: str = "the data") -> None:
    """Refuse data whose classes do not match the model's outputs.

    ImageFolder data loaded for this model carries the model's class names (its folders were mapped onto them by
    name, number or, when the counts agree, sorted order), so it always passes. A data set with its own classes
    (the shipped Fashion-MNIST, a torchvision folder) must have exactly as many classes as the model has outputs.

    Raises
    ------
    DataError
        With the two counts and the ways forward.
    """
    names = list(getattr(data, "class_names", []) or [])
    if not names or names == list(info.class_names):
        return
    if len(names) != info.num_classes:
        raise DataError(
            f"{info.name} has {info.num_classes} outputs but {label} ({getattr(data, 'name', 'data')}) has "
            f"{len(names)} classes, so its labels would be read as the model's classes 0..{len(names) - 1}: refused. "
            f"Use a model with {len(names)} outputs, or an ImageFolder (directory or .zip) whose class folders are "
            f"named after the model's classes or their numbers (0..{info.num_classes - 1}) to evaluate on those "
            "classes")


@dataclass(frozen=True)
class Budget:
    """Timing of one batch and the first result's estimated duration.

    Attributes
    ----------
    forward_s, relevance_s : float
        Seconds per image of a forward pass and of LRP (relevance_s estimated as 3 forward passes when not timed).
    fixed_s : float
        Seconds LRP takes once, whatever the number of images (preparing the model).
    reference, evaluation : int
        The image counts asked for.
    seconds : float
        Estimated seconds to the first result with those counts.
    proposed_reference, proposed_evaluation : int
        Counts that bring it to about :data:`TARGET_SECONDS` (the same counts when it is already within).
    proposed_seconds : float
        The estimate with the proposed counts.
    """

    forward_s: float
    relevance_s: float
    reference: int
    evaluation: int
    seconds: float
    proposed_reference: int
    proposed_evaluation: int
    proposed_seconds: float
    target: float = TARGET_SECONDS
    fixed_s: float = 0.0

    @property
    def too_slow(self) -> bool:
        """The asked-for counts take noticeably longer than the target."""
        return self.seconds > 1.2 * self.target

    def describe(self) -> str:
        """One line for the CLI and the app."""
        head = (f"one image takes about {self.forward_s * 1e3:.0f} ms forward, {self.relevance_s * 1e3:.0f} ms for "
                f"LRP on this machine: with {self.reference} reference and {self.evaluation} evaluation images the "
                f"first result takes about {self.seconds:.0f} s")
        if not self.too_slow:
            return head
        return (head + f"; for about {self.proposed_seconds:.0f} s use --reference-samples {self.proposed_reference} "
                f"--eval-samples {self.proposed_evaluation}")


def _seconds(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def estimate(forward_s: float, relevance_s: float, reference: int, evaluation: int) -> float:
    """Seconds to the first result: baseline and one compressed evaluation (a forward pass each) plus LRP."""
    return reference * relevance_s + 2 * evaluation * forward_s


def _balanced(n: int, classes: int, most: int) -> int:
    """``n`` cut to ``most``, at least one image per class, a multiple of ``classes`` when at least that many."""
    n = min(most, max(n, classes))
    return n if n < classes else n - n % classes


def plan_budget(model: nn.Module, x_ref: torch.Tensor, y_ref: torch.Tensor, x_eval: torch.Tensor, *,
                reference: int, evaluation: int, composite: str = "epsilon", num_classes: int = 10,
                target: float = TARGET_SECONDS) -> Budget:
    """Time one batch and propose image counts (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Left unchanged.
    x_ref, y_ref : Tensor
        A few reference images (model-ready; three are used) and labels for the LRP timing.
    x_eval : Tensor
        A few evaluation images for the forward timing.
    reference, evaluation : int
        The counts that would be used.
    composite : str
        The LRP composite.
    num_classes : int
        Proposed counts are at least one image per class, and multiples of it when at least that many.
    """
    from xaicomp_core.relevance.lrp import compute_relevance

    xb = x_eval[:TIMING_BATCH]
    with torch.no_grad():
        fwd = _seconds(lambda: model(xb)) / max(1, len(xb))
    rel, fixed = 3 * fwd, 0.0
    if estimate(fwd, rel, reference, evaluation) > target / 3 and len(x_ref) >= 1:
        def lrp(n: int) -> float:
            xr, yr = x_ref[:n], y_ref[:n]
            return _seconds(lambda: compute_relevance(model, xr, yr, composite, batch_size=n, check=False),
                            repeats=1)

        lrp(1)  # warm-up (first-call allocations)
        t1 = lrp(1)
        n = min(3, len(x_ref))
        tn = lrp(n) if n > 1 else t1
        rel = (tn - t1) / (n - 1) if tn > t1 else t1  # noise: take the whole single-image time as per image
        fixed = max(t1 - rel, 0.0)
    return budget_from_timings(fwd, rel, fixed, reference, evaluation, num_classes, target)


def budget_from_timings(forward_s: float, relevance_s: float, fixed_s: float, reference: int, evaluation: int,
                        num_classes: int = 10, target: float = TARGET_SECONDS) -> Budget:
    """The :class:`Budget` for measured per-image times: when the first result would take over 1.2 x ``target``,
    half of the target (less the fixed cost) goes to LRP on the reference images and half to the two evaluations."""
    total = fixed_s + estimate(forward_s, relevance_s, reference, evaluation)
    ref_n, ev_n = reference, evaluation
    if total > 1.2 * target:
        share = max(target - fixed_s, 0.0) / 2
        ref_n = _balanced(int(share / max(relevance_s, 1e-9)), num_classes, reference)
        ev_n = _balanced(int(share / max(2 * forward_s, 1e-9)), num_classes, evaluation)
    return Budget(forward_s, relevance_s, reference, evaluation, total, ref_n, ev_n,
                  fixed_s + estimate(forward_s, relevance_s, ref_n, ev_n), target, fixed_s)


def fmt_seconds(s: float) -> str:
    """``95`` -> ``"1 min 35 s"``."""
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


__all__ = ["TARGET_SECONDS", "Budget", "budget_from_timings", "check_class_count", "estimate", "fmt_seconds",
           "plan_budget"]
