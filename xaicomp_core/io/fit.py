"""Does the data fit the model, and how long will the first result take?

* :func:`check_class_count` -- a model whose outputs do not match the data's classes is refused with a message
  that says what to do; it is never evaluated silently. ImageFolder data is mapped onto the model's classes by
  folder names (or numbers), which is the explicit way to evaluate on a subset of a model's classes.
* :func:`plan_budget` -- times small batches (a forward pass and, when that does not already settle it, LRP, each
  at two batch sizes: the cost per image and the cost per call apart) and estimates the seconds to the first result
  (baseline, relevance on the reference images, one compressed evaluation). Above
  :data:`TARGET_SECONDS` it proposes reference and evaluation image counts that bring the first result to about
  that, shown before the long work starts.
"""

from __future__ import annotations

import math
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
#: The asked-for counts are called too slow above this many times the target.
SLOW_FACTOR = 2.0
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
        """The asked-for counts take well over the target (twice: small batches on a busy machine overstate the
        cost of the batched work)."""
        return self.seconds > SLOW_FACTOR * self.target

    def describe(self) -> str:
        """One line for the CLI and the app."""
        head = (f"one image takes about {self.forward_s * 1e3:.0f} ms forward, {self.relevance_s * 1e3:.0f} ms for "
                f"LRP on this machine: with {self.reference} reference and {self.evaluation} evaluation images the "
                f"first result takes about {self.seconds:.0f} s")
        if not self.too_slow:
            return head
        return (head + f"; for about {self.proposed_seconds:.0f} s use --reference-samples {self.proposed_reference} "
                f"--eval-samples {self.proposed_evaluation}")


def _seconds(fn, repeats: int = 2, warm: bool = True) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one untimed call if ``warm``): on a busy machine the
    noise only ever adds time, so the minimum is the best estimate of the work itself."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def estimate(forward_s: float, relevance_s: float, reference: int, evaluation: int) -> float:
    """Seconds to the first result: baseline and one compressed evaluation (a forward pass each) plus LRP."""
    return reference * relevance_s + 2 * evaluation * forward_s


def _balanced(n: int, classes: int, most: int) -> int:
    """``n`` cut to ``most``, at least one image per class, a multiple of ``classes`` when at least that many."""
    n = min(most, max(n, classes))
    return n if n < classes else n - n % classes


def per_image(run, start: int, most: int, limit: float) -> tuple[float, float]:
    """Seconds per image and fixed seconds per call of ``run(n)`` (which returns the seconds ``n`` images took):
    ``n`` doubles from ``start`` while a call stays under ``limit`` seconds and images are left (at most ``most``);
    the cost per image is the slope between the last two sizes, so the cost of each call (large on a busy machine,
    and for a small model larger than the work itself) is not counted per image."""
    n = max(1, min(start, most))
    prev: tuple[int, float] | None = None
    while True:
        t = run(n)
        if t > limit or 2 * n > most:
            break
        prev, n = (n, t), 2 * n
    if prev is not None and t > prev[1]:
        slope = (t - prev[1]) / (n - prev[0])
        return slope, max(t - slope * n, 0.0)
    return t / n, 0.0


def plan_budget(model: nn.Module, x_ref: torch.Tensor, y_ref: torch.Tensor, x_eval: torch.Tensor, *,
                reference: int, evaluation: int, composite: str = "epsilon", num_classes: int = 10,
                target: float = TARGET_SECONDS, device: str | torch.device | None = None) -> Budget:
    """Time one batch and propose image counts (see the module docstring).

    The forward pass is timed on :data:`TIMING_BATCH` images and on twice as many while that stays quick
    (:func:`per_image`). LRP is timed only when the forward timing does not already put the first result well
    within the target, the same way from two images on; its fixed cost (preparing the model) is counted once.

    Parameters
    ----------
    model : nn.Module
        Left unchanged.
    x_ref, y_ref : Tensor
        A few reference images (model-ready; up to 32 are used) and labels for the LRP timing.
    x_eval : Tensor
        A few evaluation images (up to 128) for the forward timing.
    reference, evaluation : int
        The counts that would be used.
    composite : str
        The LRP composite.
    num_classes : int
        Proposed counts are at least one image per class, and multiples of it when at least that many.
    device : {"auto", "cpu", "cuda"} or torch.device, optional
        Where the work will run (default: the model's device); the timing runs there, on a copy of the model.
    """
    from xaicomp_core.device import module_device, on_device, resolve_device
    from xaicomp_core.relevance.lrp import compute_relevance

    dev = module_device(model) if device is None else resolve_device(device)
    model = on_device(model, dev)
    x_eval = x_eval[:128].to(dev)

    def forward(n: int) -> float:
        xb = x_eval[:n]

        def run() -> None:
            model(xb)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        with torch.no_grad():
            return _seconds(run)

    fwd, _ = per_image(forward, TIMING_BATCH, min(len(x_eval), 128), 0.5)
    rel, fixed = 3 * fwd, 0.0
    if estimate(fwd, rel, reference, evaluation) > target / 3 and len(x_ref) >= 1:
        def lrp(k: int) -> float:
            xr, yr = x_ref[:k], y_ref[:k]
            return _seconds(lambda: compute_relevance(model, xr, yr, composite, batch_size=k, check=False,
                                                      device=dev), warm=k == 2)

        rel, fixed = per_image(lrp, 2, min(len(x_ref), 32), 1.0)
    return budget_from_timings(fwd, rel, fixed, reference, evaluation, num_classes, target)


def budget_from_timings(forward_s: float, relevance_s: float, fixed_s: float, reference: int, evaluation: int,
                        num_classes: int = 10, target: float = TARGET_SECONDS) -> Budget:
    """The :class:`Budget` for measured per-image times: when the first result would take over
    :data:`SLOW_FACTOR` x ``target``,
    half of the target (less the fixed cost) goes to LRP on the reference images and half to the two evaluations."""
    total = fixed_s + estimate(forward_s, relevance_s, reference, evaluation)
    ref_n, ev_n = reference, evaluation
    if total > SLOW_FACTOR * target:
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
           "per_image", "plan_budget"]
