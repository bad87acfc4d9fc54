"""Performance benchmark: how much a slider release and a relevance pass cost, as ratios to bare passes.

* ``update_ratio`` = median time of ``session.evaluate(plan)`` (a new plan each time: lrp ranking, 8/4/2-bit
  mixed precision per weight, the heaviest path) / median time of a bare fp32 forward over the same evaluation set
  in the same batches.
* ``relevance_ratio`` = median time of :func:`weight_relevance` on a batch / median time of a plain forward+backward
  (gradients of all parameters) on the same batch.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch

from xaicomp_core.evaluate.session import CompressionSession
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


def run_bench(model_name: str = "fashion-vgg", repeats: int = 7, threads: int | None = 2, batch: int = 250,
              composite: str = "epsilon") -> dict[str, Any]:
    """Run the benchmark on a built-in model with the shipped data and return the figures."""
    if threads:
        torch.set_num_threads(threads)
    model = load_builtin_model(model_name)
    ref = load_builtin_dataset("fashion-mnist", "reference")
    ev = load_builtin_dataset("fashion-mnist", "eval")
    session = CompressionSession(model, ref, ev, composite=composite)
    session.relevance()
    x_eval = session.x_eval
    bs = session.eval_batch_size

    def bare_forward() -> None:
        with torch.inference_mode():
            for i in range(0, len(x_eval), bs):
                model(x_eval[i:i + bs])

    bare_forward()
    plans = [CompressionPlan(criterion="lrp", prune_ratio=0.3 + 0.01 * i, bit_levels=[8, 4, 2],
                             bit_split=[0.2, 0.5], composite=composite) for i in range(repeats + 1)]
    session.evaluate(plans[-1])  # warm-up (sorting the scores happens here, once)
    fwd = _timed(bare_forward, repeats)
    it = iter(plans[:repeats])
    upd = _timed(lambda: session.evaluate(next(it)), repeats)

    x, y = session.x_ref[:batch], session.y_ref[:batch]
    grad_model = load_builtin_model(model_name)

    def fwd_bwd() -> None:
        grad_model.zero_grad(set_to_none=True)
        out = grad_model(x)
        onehot = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
        out.backward(onehot)

    fwd_bwd()
    weight_relevance(model, x, y, composite)
    fb = _timed(fwd_bwd, repeats)
    rel = _timed(lambda: weight_relevance(model, x, y, composite, batch_size=batch), repeats)
    med = statistics.median
    info = model_info(model)
    return {
        "model": info.name, "composite": composite,
        "update_ratio": med(upd) / med(fwd), "relevance_ratio": med(rel) / med(fb),
        "evaluate_seconds": med(upd), "forward_seconds": med(fwd),
        "relevance_seconds": med(rel), "forward_backward_seconds": med(fb),
        "relevance_full_reference_seconds_estimate": med(rel) * len(session.x_ref) / batch,
        "eval_images": len(x_eval), "relevance_batch": batch, "repeats": repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {_cpu_name()}, {torch.get_num_threads()} threads",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
