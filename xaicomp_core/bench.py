"""Performance benchmark: how much a slider release and a relevance pass cost, as ratios to bare passes.

* ``update_ratio`` = median time of ``session.evaluate(plan)`` (a new plan each time: lrp ranking, 8/4/2-bit
  mixed precision per weight, the heaviest path) / median time of a bare forward of the *unmodified* model (eager
  fp32, BatchNorm not folded, ``torch.inference_mode``) over the same evaluation set in the same batches.
* ``fast_forward_ratio`` = median time of the session's forward alone for a new plan's weights (the fast exact
  forward of :mod:`xaicomp_core.evaluate.fast`: BatchNorm folding, backend build and run, near-tie re-runs;
  ``session.compressed_logits`` of weights compressed beforehand) / the same bare forward.
* ``first_number_ratio`` = median time from a new plan to its first numbers as the app draws them on a slider
  release (``session.estimate``: compress, forward over the class-balanced subset, result with the estimate and its
  uncertainty; sizes exact) / the same bare forward.
* ``release_ratio`` = median engine time of a whole slider release on the Compress page for a plan never seen:
  the first numbers (``session.estimate``), the exact numbers (``session.evaluate``, which runs only the images the
  estimate did not) and the magnitude comparison at the same ratio (another ``session.evaluate``) / the same bare
  forward. The browser test adds what Streamlit and the browser cost (``test-artifacts/browser-latency.json``).
* ``relevance_ratio`` = median time of :func:`weight_relevance` on a batch / median time of a plain forward+backward
  (gradients of all parameters) on the same batch.
* ``backend_ratios``: each fast-forward backend (and the eager forward with a plan's weights) per new plan / the
  bare forward (:func:`compare_backends`).
* ``evaluate_split``: where one ``session.evaluate`` spends its time (:func:`profile_evaluate`).
* ``peak_rss_mb`` per stage (``evaluation``: building the session, i.e. the fast forward and the baseline pass over
  the evaluation set; ``relevance``: the session's relevance pass): the process's peak resident memory during the
  stage (:func:`~xaicomp_core.device.peak_rss_mb`, ``VmHWM`` on Linux; the peak is reset before each stage where
  Linux allows it, see ``peak_rss_per_stage``), next to ``rss_before_mb``; on CUDA also ``peak_cuda_mb``
  (``torch.cuda.max_memory_allocated``, reset before each stage).

Bare and measured passes alternate within each repeat, so that a change of machine load hits both.
"""

from __future__ import annotations

import cProfile
import platform
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xaicomp_core.device import current_rss_mb, on_device, peak_rss_mb, reset_peak_rss, resolve_device
from xaicomp_core.evaluate.fast import BACKENDS, TRIAL_IMAGES, FastForward, ort_available
from xaicomp_core.evaluate.session import CompressionSession, forward_logits
from xaicomp_core.io.data import load_builtin_dataset
from xaicomp_core.io.models import load_builtin_model, model_info
from xaicomp_core.plan import CompressionPlan
from xaicomp_core.relevance.lrp import weight_relevance


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _interleaved(fns: dict[str, Callable[[int], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each ``fn(i)`` for i in range(repeats), the functions taking turns within each repeat."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            out[k].append(time.perf_counter() - t0)
    return out


def _bare_forward(model: nn.Module, x: torch.Tensor, batch_size: int) -> Callable[..., None]:
    """The denominator: eager fp32 forward of the unmodified model under inference_mode, in the session's
    batches (on the model's device, each batch moved there as the session moves it)."""
    dev = next(model.parameters()).device

    def run(*_: Any) -> None:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size].to(dev)).cpu()
    return run


def compare_backends(session: CompressionSession, plans: list[CompressionPlan], repeats: int
                     ) -> dict[str, float]:
    """Median seconds of the forward of a new plan's weights with every fast-forward backend available here, and
    with the eager forward (weights copied into the working model), each / the bare forward's median.

    The weights of ``plans`` (at least ``repeats``) are compressed beforehand; each backend gets them in turn.
    """
    model, x, bs = session.model, session.x_eval, session.eval_batch_size
    cws = [session.compress(p) for p in plans[:repeats]]
    states = [cw.state_dict(session._state) for cw in cws]
    work = session._work

    def eager(i: int) -> None:
        with session._lock:
            session._load(cws[i])
            try:
                forward_logits(work, x, bs)
            finally:
                session._load(None)

    fns: dict[str, Callable[[int], Any]] = {"bare": _bare_forward(model, x, bs), "eager": eager}
    for name in BACKENDS:
        if name == "onnxruntime" and not ort_available():
            continue
        ff = FastForward.build(work, x[:TRIAL_IMAGES], lambda t: forward_logits(work, t, bs), backend=name,
                               device=session.device, max_batch=bs)
        if ff is not None:
            fns[name] = (lambda f: lambda i: f.logits(states[i], x, lambda t: forward_logits(work, t, bs)))(ff)
    times = _interleaved(fns, repeats)
    bare = statistics.median(times.pop("bare"))
    return {k: statistics.median(v) / bare for k, v in times.items()}


#: (label, function name, file name ending) whose cumulative time :func:`profile_evaluate` reports
_SPLIT = [
    ("compress", "compress", "compress/compress.py"),
    ("compress.masks", "ratio_mask", "compress/layout.py"),
    ("compress.masks", "channel_mask", "compress/layout.py"),
    ("compress.masks", "counts_mask", "compress/layout.py"),
    ("compress.allocate_bits", "allocate_bits", "compress/quantize.py"),
    ("compress.quantize", "quantize", "compress/quantize.py"),
    ("compress.size_accounting", "compute_size", "format/size.py"),
    ("forward", "_forward", "evaluate/session.py"),
    ("forward.state_dict", "state_dict", "compress/compress.py"),
    ("forward.fold_batchnorm", "params", "evaluate/fast.py"),
    ("forward.backend_build", "prepare", "evaluate/fast.py"),
    ("forward.backend_run", "run", "evaluate/fast.py"),
    ("forward.near_tie_reference", "eager", "evaluate/session.py"),
    ("result_assembly", "_result", "evaluate/session.py"),
]


def profile_evaluate(session: CompressionSession, plan: CompressionPlan) -> dict[str, float]:
    """Profile one ``session.evaluate(plan)`` (a plan not evaluated before) and return the seconds of its parts
    (cumulative, under cProfile), ``total`` and ``other`` (total minus compress, forward and result assembly)."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    session.evaluate(plan)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {"total": total}
    for label, func, file in _SPLIT:
        sec = sum(v[3] for (f, _, name), v in stats.items() if name == func and f.replace("\\", "/").endswith(file))
        out[label] = out.get(label, 0.0) + sec
    out["other"] = total - out["compress"] - out["forward"] - out["result_assembly"]
    return out


def _stage(memory: dict[str, dict[str, Any]], name: str, device: torch.device, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as the stage ``name`` and record its peak memory in ``memory``."""
    cuda = device.type == "cuda"
    per_stage = reset_peak_rss()
    before = current_rss_mb()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    memory.setdefault("peak_rss_mb", {})[name] = round(peak_rss_mb(), 1)
    memory.setdefault("rss_before_mb", {})[name] = None if before is None else round(before, 1)
    memory.setdefault("peak_rss_per_stage", {})[name] = per_stage
    if cuda:
        torch.cuda.synchronize(device)
        memory.setdefault("peak_cuda_mb", {})[name] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def run_bench(model_name: str = "fashion-vgg", repeats: int = 7, threads: int | None = 2, batch: int = 250,
              composite: str = "epsilon", backends: bool = True, device: str | torch.device = "auto",
              memory_budget_mb: float | None = None) -> dict[str, Any]:
    """Run the benchmark on a built-in model with the shipped data and return the figures (``backends=False``
    skips :func:`compare_backends`). ``device`` and ``memory_budget_mb`` go to the session (and the bare passes
    run on the same device)."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    model = load_builtin_model(model_name)
    ref = load_builtin_dataset("fashion-mnist", "reference")
    ev = load_builtin_dataset("fashion-mnist", "eval")
    memory: dict[str, dict[str, Any]] = {}
    session = _stage(memory, "evaluation", dev, lambda: CompressionSession(
        model, ref, ev, composite=composite, device=dev, memory_budget_mb=memory_budget_mb))
    _stage(memory, "relevance", dev, session.relevance)
    x_eval = session.x_eval
    bs = session.eval_batch_size
    bare_model = on_device(model, dev)
    bare_forward = _bare_forward(bare_model, x_eval, bs)
    bare_forward()

    def lrp_plan(ratio: float) -> CompressionPlan:
        return CompressionPlan(criterion="lrp", prune_ratio=ratio, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5],
                               composite=composite)

    plans = [lrp_plan(0.3 + 0.01 * i) for i in range(repeats + 1)]
    session.evaluate(plans[-1])  # warm-up (sorting the scores happens here, once)
    fast_cws = [session.compress(lrp_plan(0.6 + 0.01 * i)) for i in range(repeats)]
    # first numbers of a new plan, as the app draws them on a slider release: session.estimate (compress + forward
    # over the class-balanced subset + result), a plan never seen before
    first_plans = [lrp_plan(0.31 + 0.01 * i + 0.005) for i in range(repeats)]
    release_plans = [lrp_plan(0.41 + 0.01 * i + 0.0025) for i in range(repeats)]

    def release(i: int) -> None:  # what the Compress page asks the engine for on a slider release
        session.estimate(release_plans[i])
        session.evaluate(release_plans[i])
        session.evaluate(release_plans[i].replace(criterion="magnitude"))

    times = _interleaved({"bare": bare_forward, "update": lambda i: session.evaluate(plans[i]),
                          "fast": lambda i: session.compressed_logits(fast_cws[i]),
                          "first": lambda i: session.estimate(first_plans[i]), "release": release}, repeats)
    fwd, upd, fast, first = times["bare"], times["update"], times["fast"], times["first"]
    split = profile_evaluate(session, lrp_plan(0.25))
    backend_ratios = compare_backends(session, [lrp_plan(0.7 + 0.01 * i) for i in range(repeats)], repeats) \
        if backends else {}

    x, y = session.x_ref[:batch].to(dev), session.y_ref[:batch].to(dev)
    grad_model = load_builtin_model(model_name).to(dev)

    def fwd_bwd() -> None:
        grad_model.zero_grad(set_to_none=True)
        out = grad_model(x)
        onehot = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
        out.backward(onehot)
        if dev.type == "cuda":  # the timer must see the kernels finish
            torch.cuda.synchronize(dev)

    fwd_bwd()
    weight_relevance(bare_model, x, y, composite, device=dev)
    rt = _interleaved({"fb": lambda i: fwd_bwd(),
                       "rel": lambda i: weight_relevance(bare_model, x, y, composite, batch_size=batch, device=dev)},
                      repeats)
    fb, rel = rt["fb"], rt["rel"]
    med = statistics.median
    info = model_info(model)
    return {
        "model": info.name, "composite": composite,
        "update_ratio": med(upd) / med(fwd), "relevance_ratio": med(rel) / med(fb),
        "first_number_ratio": med(first) / med(fwd), "first_number_images": len(session.quick_idx),
        "release_ratio": med(times["release"]) / med(fwd), "release_seconds": med(times["release"]),
        "fast_forward_ratio": med(fast) / med(fwd), "forward_backend": session.forward_backend,
        "backend_ratios": backend_ratios,
        "evaluate_split_seconds": split,
        "evaluate_seconds": med(upd), "forward_seconds": med(fwd), "fast_forward_seconds": med(fast),
        "first_number_seconds": med(first),
        "relevance_seconds": med(rel), "forward_backward_seconds": med(fb),
        "relevance_full_reference_seconds_estimate": med(rel) * len(session.x_ref) / batch,
        "eval_images": len(x_eval), "relevance_batch": batch, "repeats": repeats,
        "device": str(dev), "memory_budget_mb": memory_budget_mb, "eval_batch_size": bs,
        "relevance_batch_size": session.relevance_batch_size, **memory,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {_cpu_name()}, {torch.get_num_threads()} threads",
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
