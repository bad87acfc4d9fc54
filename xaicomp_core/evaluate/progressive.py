"""Progressive and anticipated evaluation: first numbers from a class-balanced subset, exact numbers next, and
neighbouring slider positions computed in the background while the user reads.

* :func:`quick_indices` picks the subset; :func:`estimate_accuracy` turns the subset's predictions into an estimate
  of the full-set accuracy with its standard error. The estimate is *paired*: the compressed model's accuracy on the
  subset minus the original model's on the same images, added to the original model's exact full-set accuracy. Most
  images are classified alike by both models, so the paired difference varies far less than the accuracy itself.
* :class:`Anticipator` is one background worker per session: per owner (one browser session) a short list of plans
  to evaluate, replaced -- not queued -- by the owner's next call, and work that steps aside for foreground calls
  between chunks of images (:meth:`~xaicomp_core.evaluate.session.CompressionSession.foreground`).
"""

from __future__ import annotations

import atexit
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xaicomp_core.plan import CompressionPlan

#: Images in the first, estimated numbers of a plan (class-balanced).
QUICK_IMAGES = 250
#: Images per chunk of a background evaluation: the longest a foreground call waits for the background.
BACKGROUND_CHUNK = 250
#: At most this many plans wait per owner; older wishes are dropped, never queued. The app asks for up to 8 slider
#: neighbours with their comparisons and the comparison plan at each of the 20 prune-ratio positions.
MAX_ANTICIPATED = 32


def quick_indices(labels: torch.Tensor, n: int = QUICK_IMAGES, num_classes: int | None = None) -> torch.Tensor:
    """Indices of a class-balanced, seeded subset of the evaluation set (all images if it has at most ``2 n``)."""
    from xaicomp_core.io.data import balanced_indices

    total = len(labels)
    if total <= 2 * n:
        return torch.arange(total)
    k = int(num_classes or (int(labels.max()) + 1))
    idx = balanced_indices(labels.numpy().astype(np.int64), n, k, seed=0)
    return torch.from_numpy(np.sort(idx)).long()


@dataclass(frozen=True)
class AccuracyEstimate:
    """Full-set accuracy estimated from a subset.

    Attributes
    ----------
    accuracy : float
        Estimate of the full-set accuracy (paired with the original model, clipped to [0, 1]).
    stderr : float
        Its standard error (finite-population corrected); a 95 % interval is about ``± 1.96 stderr``.
    images, total : int
        Subset size and full-set size.
    """

    accuracy: float
    stderr: float
    images: int
    total: int

    @property
    def half_width(self) -> float:
        """Half-width of the 95 % interval."""
        return 1.96 * self.stderr


def estimate_accuracy(correct: torch.Tensor, baseline_correct: torch.Tensor, baseline_accuracy: float,
                      total: int) -> AccuracyEstimate:
    """Paired estimate of the full-set accuracy from a subset.

    Parameters
    ----------
    correct, baseline_correct : Tensor of bool
        Per subset image: the compressed and the original model's prediction is right.
    baseline_accuracy : float
        The original model's exact accuracy on the full set.
    total : int
        Images in the full set.
    """
    n = len(correct)
    d = correct.double() - baseline_correct.double()
    mean = float(d.mean()) if n else 0.0
    if n >= total:
        return AccuracyEstimate(min(1.0, max(0.0, baseline_accuracy + mean)), 0.0, n, total)
    # variance of the per-image change, with one pseudo-flip so that a subset without flips is not certain
    flips = float((d != 0).sum())
    var = max((flips + 1.0) / (n + 2.0) - mean * mean, 0.0)
    fpc = 1.0 - n / total
    stderr = math.sqrt(var / n * fpc)
    return AccuracyEstimate(min(1.0, max(0.0, baseline_accuracy + mean)), stderr, n, total)


def paired_drop(base_pred: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy drop in points of ``pred`` against ``base_pred`` on the same images (labels ``y``), and the
    half-width of its 95 % interval, paired: only the images on which the two disagree about correctness count
    (normal approximation of the difference of two paired proportions). Unlike :func:`estimate_accuracy`, which
    estimates a fixed set's accuracy from a subset of it, this is the uncertainty of the drop as a property of the
    images' distribution: no finite-population correction, and no pseudo-flip."""
    n = len(y)
    lost = int(((base_pred == y) & (pred != y)).sum())
    won = int(((base_pred != y) & (pred == y)).sum())
    var = max(lost + won - (lost - won) ** 2 / n, 0.0) / n ** 2
    return 100 * (lost - won) / n, 100 * 1.96 * math.sqrt(var)


class Anticipator:
    """Background evaluation of plans the user is likely to ask for next (bounded, cancellable, per owner).

    Parameters
    ----------
    evaluate : callable
        ``evaluate(plan, should_pause)`` computes and caches one plan; it calls ``should_pause()`` between chunks of
        work and waits while it returns True (the session's foreground has priority).
    is_cached : callable
        ``is_cached(plan)``: skip plans already evaluated.
    """

    def __init__(self, evaluate: Callable[[CompressionPlan], object], is_cached: Callable[[CompressionPlan], bool]
                 ) -> None:
        self._evaluate = evaluate
        self._is_cached = is_cached
        self._pending: OrderedDict[str, list[CompressionPlan]] = OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.done = 0
        self.failed = 0
        self.current: CompressionPlan | None = None
        _LIVE.add(self)

    def submit(self, plans: Sequence[CompressionPlan], owner: str = "default") -> None:
        """Replace ``owner``'s waiting plans by ``plans`` (at most :data:`MAX_ANTICIPATED`, first ones first)."""
        todo = [p for p in plans if not self._is_cached(p)][:MAX_ANTICIPATED]
        with self._cond:
            self._pending.pop(owner, None)
            if todo:
                self._pending[owner] = todo
            self._stopped = False
            if todo and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="xaicomp-anticipate", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def cancel(self, owner: str | None = None) -> None:
        """Drop ``owner``'s waiting plans (all owners' with None). A plan being computed finishes its chunk."""
        with self._cond:
            if owner is None:
                self._pending.clear()
            else:
                self._pending.pop(owner, None)
            self._cond.notify_all()

    def pending(self, owner: str | None = None) -> int:
        """Plans waiting (for ``owner``, or for all)."""
        with self._cond:
            if owner is not None:
                return len(self._pending.get(owner, []))
            return sum(len(v) for v in self._pending.values())

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (the plan being computed should end at its next chunk)."""
        return self._stopped

    def idle(self) -> bool:
        """Nothing waiting and nothing being computed."""
        with self._cond:
            return not any(self._pending.values()) and self.current is None

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until :meth:`idle` (tests and benchmarks); returns whether it became idle in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._pending.values()) and self.current is None, timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker after its current plan (and wait up to ``timeout`` seconds for it to end)."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if timeout is not None and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _next(self) -> CompressionPlan | None:
        # round-robin over owners: the first plan of the owner that waited longest
        for owner in list(self._pending):
            plans = self._pending[owner]
            while plans:
                plan = plans.pop(0)
                if not self._is_cached(plan):
                    self._pending.move_to_end(owner)
                    if not plans:
                        del self._pending[owner]
                    return plan
            del self._pending[owner]
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                plan = None
                while not self._stopped:
                    plan = self._next()
                    if plan is not None:
                        break
                    self.current = None
                    self._cond.notify_all()
                    if not self._cond.wait(timeout=30.0):
                        return  # idle for a while: the thread ends, the next submit starts a new one
                if self._stopped:
                    self.current = None
                    self._cond.notify_all()
                    return
                self.current = plan
            try:
                self._evaluate(plan)
                self.done += 1
            except Exception:  # a plan that fails here fails again, readably, when the user asks for it
                self.failed += 1
            finally:
                with self._cond:
                    self.current = None
                    self._cond.notify_all()


_LIVE: weakref.WeakSet[Anticipator] = weakref.WeakSet()


def cancel_all() -> None:
    """Drop the waiting plans of every live anticipator (the plan being computed finishes)."""
    for a in list(_LIVE):
        a.cancel()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, let every worker finish its chunk: a thread still inside a torch or onnxruntime kernel
    while the interpreter tears down aborts the process."""
    for a in list(_LIVE):
        a.stop(timeout=60.0)


def neighbour_plans(plan: CompressionPlan, ratio_step: float = 0.05, split_step: float = 0.05) -> list[CompressionPlan]:
    """The plans one slider step away from ``plan``, nearest first: prune ratio ± one step (then ± two), and each bit
    threshold ± one step. Invalid neighbours (out of range, thresholds out of order) are left out."""
    out: list[CompressionPlan] = []
    if plan.uses_ratio:
        for k in (1, -1, 2, -2):
            r = round(plan.prune_ratio + k * ratio_step, 6)
            if 0.0 <= r < 1.0:
                out.append(plan.replace(prune_ratio=r))
    for i in range(len(plan.bit_split)):
        for k in (1, -1):
            split = list(plan.bit_split)
            split[i] = round(split[i] + k * split_step, 6)
            out.append(plan.replace(bit_split=split))
    valid = []
    for p in out:
        try:
            valid.append(p.validate())
        except Exception:
            continue
    return valid
