"""Reproducible experiments behind RESULTS.md (``make results``).

    python -m xaicomp_core.results [--models fashion-vgg,fashion-lenet,fashion-resnet] [--quick] [--out DIR]

For every built-in model: pruning curves (accuracy vs sparsity 0-95 %) per criterion without and with recovery
fine-tuning and their areas; the paper's rule (shares of weights with relevance <= 0, = 0, < 0 per layer, and what
pruning them does) per composite; mixed-precision size-vs-accuracy Pareto fronts (relevance-ranked vs
magnitude-ranked vs uniform bits, per weight / channel / layer); the smallest packed size within 1 point of top-1
per criterion, without and with fine-tuning; the auto search (``xaicomp auto``) with the relevance, hybrid and
magnitude signals side by side; every plan within 1 point, with and without relevance; the table "where relevance
helps and where it does not" (pruning, bit allocation, auto search, each with its measured reason); the benchmark.
Writes ``results/summary.json``, PNG plots under ``docs/results/`` and ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import pathlib
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from xaicomp_core.bench import _cpu_name, run_bench
from xaicomp_core.errors import DataError
from xaicomp_core.evaluate.auto import FINETUNE_RECIPES
from xaicomp_core.evaluate.progressive import paired_drop
from xaicomp_core.evaluate.session import CompressionSession
from xaicomp_core.evaluate.sweep import pareto_flags
from xaicomp_core.io.atomic import atomic_write
from xaicomp_core.io.data import load_builtin_dataset
from xaicomp_core.io.models import builtin_card, load_builtin_model
from xaicomp_core.plan import CompressionPlan

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The criteria that combine relevance and magnitude (compress/hybrid_criteria.py).
HYBRID_CRITERIA = ["lrp-x-weight", "lrp-budget-magnitude", "lrp-budget-x-weight", "lrp-iterative",
                   "lrp-x-weight-iterative"]
CURVE_CRITERIA = ["lrp", "lrp-signed", "magnitude", "random", "lrp-filter", *HYBRID_CRITERIA]
#: Criteria whose curves also get fine-tuned points (the hybrid ones are not fine-tuned: 25 more fine-tunings per
#: model would add most of an hour to ``make results`` on a 2-core machine).
FT_CURVE_CRITERIA = ["lrp", "lrp-signed", "magnitude", "random", "lrp-filter"]
#: The auto search (``xaicomp auto``) in ``make results``: its signals, accuracy budget and evaluations per signal.
AUTO_SIGNALS = ("relevance", "hybrid", "magnitude")
AUTO_MAX_DROP = 1.0
AUTO_BUDGET = 80
#: The auto search with fine-tuning in the loop (every plan it measures is fine-tuned first, as the saved plan will
#: be): only on the model the project's goals name, about 10 s per 2-epoch fine-tuning there on 2 cores.
AUTO_FT_MODELS = ("fashion-vgg",)
AUTO_FT_SIGNALS = ("hybrid", "magnitude")
AUTO_FT_BUDGET = 60
#: Sections ``--only`` can rerun into an existing results/summary.json (the rest of it is kept as it is): ``auto``
#: (and the tables that read it: within 1 point, where relevance helps), ``auto-finetuned`` (which starts from the
#: summary's ``auto`` plans) and ``holdout`` (which checks the summary's auto plans on held-out test images).
PARTIAL_SECTIONS = ("auto", "auto-finetuned", "holdout")
#: The held-out check: the seeds of each fine-tuning recipe (``evaluate.auto.FINETUNE_RECIPES``) on each fine-tuned
#: auto plan.
HOLDOUT_SEEDS = (0, 1, 2)
#: Prune ratios of the "where relevance helps" table.
WHERE_RATIOS = (0.7, 0.8, 0.9)
CURVE_RATIOS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
FT_RATIOS = [0.5, 0.7, 0.8, 0.9, 0.95]
PAPER_COMPOSITES = ["epsilon", "epsilon-plus", "alpha2beta1"]
UNIFORM_BITS = [8, 6, 4, 3, 2]
MIXED = [((8, 4, 2), (0.2, 0.5)), ((8, 4, 2), (0.1, 0.3)), ((4, 2), (0.3,)), ((8, 4, 2, 1), (0.05, 0.25, 0.4))]
MP_RATIOS = [0.0, 0.5, 0.8, 0.9]
HEADLINE_CRITERIA = ["lrp", "lrp-signed", "magnitude", "random", "lrp-filter", "paper"]
#: Composite per criterion: Yeom et al. score filters with z+ on the convolutions (epsilon-plus); with plain epsilon,
#: filters with negative summed relevance (common in the first layers) would be removed first.
CRITERION_COMPOSITE = {"lrp-filter": "epsilon-plus"}
FT_EPOCHS_CURVE = 1
FT_EPOCHS_HEADLINE = 2


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _row(r, **extra: Any) -> dict[str, Any]:
    return {"accuracy": r.accuracy, "sparsity": r.sparsity, "mean_bits": r.mean_bits,
            "estimated_bytes": r.size.estimated_bytes, "compression_ratio": r.compression_ratio,
            "reduction": r.reduction, "plan": r.plan.to_dict(), **extra}


def auc(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Normalised area under an accuracy-vs-sparsity curve (trapezoid rule, divided by the x range)."""
    xs_a, ys_a = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(xs_a)
    xs_a, ys_a = xs_a[order], ys_a[order]
    width = xs_a[-1] - xs_a[0]
    return float(np.sum((xs_a[1:] - xs_a[:-1]) * (ys_a[1:] + ys_a[:-1]) / 2) / width) if width > 0 else float(
        ys_a[0])


# ----------------------------------------------------------------------------------------------------------------
def curve_plan(criterion: str, ratio: float) -> CompressionPlan:
    """The plan of one point of a pruning curve (fp32 weights)."""
    return CompressionPlan(criterion=criterion, prune_ratio=ratio,
                           composite=CRITERION_COMPOSITE.get(criterion, "epsilon"))


def high_sparsity_auc(points: Sequence[dict[str, Any]], ratios: Sequence[float]) -> float | None:
    """Area under accuracy vs sparsity (not fine-tuned) over the curve's points at the high-sparsity ``ratios``
    (those that are also fine-tuned), or None without such points."""
    pts = [p for p in points if p["prune_ratio"] in ratios]
    return auc([p["sparsity"] for p in pts], [p["accuracy"] for p in pts]) if pts else None


def pruning_curves(s: CompressionSession, ratios: Sequence[float], ft_ratios: Sequence[float],
                   criteria: Sequence[str]) -> dict[str, Any]:
    """Accuracy vs sparsity per criterion (fp32 weights), without and with fine-tuning."""
    out: dict[str, Any] = {}
    for crit in criteria:
        pts = []
        for ratio in ratios:
            plan = curve_plan(crit, ratio)
            r = s.evaluate(plan)
            row = {"prune_ratio": ratio, "sparsity": r.sparsity, "accuracy": r.accuracy}
            if ratio in ft_ratios and s.can_finetune and crit in FT_CURVE_CRITERIA:
                row["accuracy_finetuned"] = s.evaluate(plan.replace(finetune_epochs=FT_EPOCHS_CURVE)).accuracy
            pts.append(row)
        ft_pts = [p for p in pts if "accuracy_finetuned" in p]
        out[crit] = {
            "points": pts,
            "auc": auc([p["sparsity"] for p in pts], [p["accuracy"] for p in pts]),
            "auc_high_sparsity_finetuned": auc([p["sparsity"] for p in ft_pts],
                                               [p["accuracy_finetuned"] for p in ft_pts]) if ft_pts else None,
            "auc_high_sparsity": high_sparsity_auc(pts, ft_ratios),
        }
        _log(f"  curve {crit}: auc {out[crit]['auc']:.4f}")
    return out


def paper_rule(s: CompressionSession, composites: Sequence[str]) -> dict[str, Any]:
    """Shares of weights with relevance <= 0 / = 0 / < 0 and what pruning them does, per composite."""
    out = {}
    for comp in composites:
        rel = s.relevance(comp).weights
        layers = []
        tot = {"weights": 0, "le0": 0, "zero": 0, "neg": 0}
        for name in s.layout.names:
            r = rel[name]
            row = {"layer": name.removesuffix(".weight"), "weights": r.numel(), "le0": int((r <= 0).sum()),
                   "zero": int((r == 0).sum()), "neg": int((r < 0).sum())}
            layers.append(row)
            for k in tot:
                tot[k] += row[k]
        paper = s.evaluate(CompressionPlan(criterion="paper", composite=comp))
        zero = s.evaluate(CompressionPlan(criterion="lrp-zero", composite=comp))
        same = {}
        for crit in ("lrp", "magnitude", "random"):
            same[crit] = s.evaluate(CompressionPlan(criterion=crit, prune_ratio=min(paper.sparsity, 0.999),
                                                    composite=comp)).accuracy
        out[comp] = {"layers": layers, "total": tot, "accuracy_paper": paper.accuracy,
                     "sparsity_paper": paper.sparsity, "accuracy_zero": zero.accuracy, "sparsity_zero": zero.sparsity,
                     "accuracy_same_sparsity": same,
                     "paper_finetuned": s.evaluate(CompressionPlan(criterion="paper", composite=comp,
                                                                   finetune_epochs=FT_EPOCHS_CURVE)).accuracy
                     if s.can_finetune else None}
        _log(f"  paper rule {comp}: prunes {paper.sparsity:.1%} -> {paper.accuracy:.2%}")
    return out


def mixed_precision_plans(ratios: Sequence[float]) -> Iterator[tuple[CompressionPlan, dict[str, Any]]]:
    """The plans of :func:`mixed_precision`, each with the fields of its row."""
    for ratio in ratios:
        for crit in ("lrp", "magnitude"):
            base = CompressionPlan(criterion=crit, prune_ratio=ratio)
            for b in UNIFORM_BITS:
                yield (base.replace(bit_levels=[b], bit_split=[]),
                       {"family": f"uniform ({crit} pruning)", "bits": str(b), "ranking": "-", "granularity": "weight"})
            for levels, split in MIXED:
                for ranking in ("relevance", "magnitude"):
                    for gran in ("weight", "channel", "layer"):
                        yield (base.replace(bit_levels=list(levels), bit_split=list(split), bit_ranking=ranking,
                                            granularity=gran),
                               {"family": f"{ranking}-ranked bits ({crit} pruning)",
                                "bits": "/".join(map(str, levels)) + " (" + "/".join(
                                    f"{x * 100:.0f}" for x in (*split, 1 - sum(split))) + ")",
                                "ranking": ranking, "granularity": gran})


def mixed_precision(s: CompressionSession, ratios: Sequence[float]) -> list[dict[str, Any]]:
    """Size vs accuracy for uniform bits and relevance- vs magnitude-ranked mixed precision."""
    rows = [_row(s.evaluate(plan), **extra) for plan, extra in mixed_precision_plans(ratios)]
    flags = pareto_flags([r["estimated_bytes"] for r in rows], [r["accuracy"] for r in rows])
    for r, f in zip(rows, flags):
        r["pareto"] = f
    _log(f"  mixed precision: {len(rows)} plans")
    return rows


def headline(s: CompressionSession, candidates: dict[str, list[CompressionPlan]], max_drop: float = 0.01,
             ft_attempts: int = 4) -> dict[str, Any]:
    """Smallest packed size within ``max_drop`` of the baseline, per criterion, without and with fine-tuning."""
    out: dict[str, Any] = {}
    limit = s.baseline_accuracy - max_drop - 1e-12
    for crit, plans in candidates.items():
        evaluated = sorted((s.evaluate(p) for p in plans), key=lambda r: r.size.estimated_bytes)
        ok = [r for r in evaluated if r.accuracy >= limit]
        best = ok[0] if ok else None
        entry: dict[str, Any] = {"no_finetune": _best(best, s)}
        if s.can_finetune:
            best_ft = best
            tried = 0
            # plans smaller than the best one without fine-tuning that lose at most 25 points before it, by size;
            # bisect: a plan that recovers to within the limit sends the search to the smaller half
            cands = [r for r in evaluated if (best is None or r.size.estimated_bytes < best.size.estimated_bytes)
                     and r.accuracy >= s.baseline_accuracy - 0.25]
            lo, hi = 0, len(cands) - 1
            while lo <= hi and tried < ft_attempts:
                mid = (lo + hi) // 2
                tried += 1
                rf = s.evaluate(cands[mid].plan.replace(finetune_epochs=FT_EPOCHS_HEADLINE))
                if rf.accuracy >= limit:
                    if best_ft is None or rf.size.estimated_bytes < best_ft.size.estimated_bytes:
                        best_ft = rf
                    hi = mid - 1
                else:
                    lo = mid + 1
            entry["finetune"] = _best(best_ft, s)
            entry["finetune_attempts"] = tried
        out[crit] = entry
        nf = entry["no_finetune"]
        ft = entry.get("finetune") or {}
        _log(f"  headline {crit}: {nf.get('ratio', 0):.1f}x no-FT, {ft.get('ratio', 0):.1f}x FT")
    return out


def _best(r, s: CompressionSession) -> dict[str, Any]:
    if r is None:
        return {}
    return {"ratio": r.compression_ratio, "reduction": r.reduction, "accuracy": r.accuracy,
            "accuracy_drop": s.baseline_accuracy - r.accuracy, "estimated_bytes": r.size.estimated_bytes,
            "sparsity": r.sparsity, "mean_bits": r.mean_bits, "plan": r.plan.to_dict(),
            "command": f"xaicomp compress --model {s.info.name} --plan plan.json  # plan: {r.plan.cli_args()}"}


def headline_candidates(criteria: Sequence[str], ratios: Sequence[float]) -> dict[str, list[CompressionPlan]]:
    """Plans searched for the headline: each criterion x ratio x bit setting (uniform 8/4/3 bits, and the mixed
    settings per weight, per channel and per layer), bits ranked by the criterion's own score."""
    settings = [([b], [], "weight") for b in (8, 4, 3)] + [
        (list(levels), list(split), gran) for levels, split in MIXED for gran in ("weight", "channel", "layer")]
    out = {}
    for crit in criteria:
        plans = []
        for ratio in (ratios if crit != "paper" else [0.0]):
            for levels, split, gran in settings:
                plans.append(CompressionPlan(criterion=crit, prune_ratio=ratio, bit_levels=levels, bit_split=split,
                                             granularity=gran, composite=CRITERION_COMPOSITE.get(crit, "epsilon")))
        out[crit] = plans
    return out


def yeom_equal_size(s: CompressionSession, mp_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy of relevance-guided unstructured compression vs Yeom et al. filter pruning at (about) equal size."""
    out = []
    for ratio in (0.3, 0.5, 0.7):
        for bits in (8, 4):
            f = s.evaluate(CompressionPlan(criterion="lrp-filter", prune_ratio=ratio, bit_levels=[bits],
                                           composite=CRITERION_COMPOSITE["lrp-filter"]))
            target = f.size.estimated_bytes
            cands = [r for r in mp_rows if r["estimated_bytes"] <= target and "lrp pruning" in r["family"]]
            best = max(cands, key=lambda r: r["accuracy"]) if cands else None
            out.append({"filter_ratio": ratio, "bits": bits, "filter_bytes": target, "filter_accuracy": f.accuracy,
                        "lrp_bytes": best["estimated_bytes"] if best else None,
                        "lrp_accuracy": best["accuracy"] if best else None,
                        "lrp_plan": best["plan"] if best else None})
    return out


def _auto_runs(s: CompressionSession, quick: bool, signals: Sequence[str], budget: int, finetune_epochs: int,
               label: str, start: dict[str, CompressionPlan] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`~xaicomp_core.evaluate.auto.auto_compare` for ``signals`` (``start``: per signal, the plan its search
    starts from): the section's common fields and the results by signal. ``quick``: 6 evaluations on a coarse
    grid."""
    from xaicomp_core.evaluate.auto import auto_compare, compare_summary, verdict

    grid: dict[str, Any] = {"sparsities": (0.0, 0.5, 0.8, 0.9), "bits": (8, 4, 3, 2)} if quick else {}
    budget = 6 if quick else budget
    results = auto_compare(s, AUTO_MAX_DROP, signals=signals, budget=budget, finetune_epochs=finetune_epochs,
                           start=start, **grid)
    out: dict[str, Any] = {"max_drop_points": AUTO_MAX_DROP, "budget": budget, "search_images": len(s.y_ref),
                           "grid": "coarse (quick)" if quick else "default", "summary": compare_summary(results),
                           "verdict": verdict(results), "signals": {}}
    for sig, r in results.items():
        d = r.to_dict()
        d["history_length"] = len(d.pop("history"))
        out["signals"][sig] = d
        _log(f"  auto {sig}{label}: {r.compression_ratio:.1f}x, search drop "
             f"{100 * (r.search_baseline - r.search_accuracy):.2f} pt, evaluation drop "
             f"{-100 * r.evaluation.accuracy_change:.2f} pt ({r.evaluations} evaluations)")
    return out, results


def auto_section(s: CompressionSession, quick: bool = False) -> dict[str, Any]:
    """The auto search (:mod:`xaicomp_core.evaluate.auto`) once per signal in :data:`AUTO_SIGNALS`, without
    fine-tuning during the search; each plan found is then also fine-tuned :data:`FT_EPOCHS_HEADLINE` epochs once, to
    show what recovery adds. ``quick``: 6 evaluations on a coarse grid."""
    t0 = time.time()
    out, results = _auto_runs(s, quick, AUTO_SIGNALS, AUTO_BUDGET, 0, "")
    if s.can_finetune:
        for sig, r in results.items():
            rf = s.evaluate(r.plan.replace(finetune_epochs=FT_EPOCHS_HEADLINE))
            out["signals"][sig]["finetuned"] = {"epochs": FT_EPOCHS_HEADLINE, "accuracy": rf.accuracy,
                                                "drop_points": -100 * rf.accuracy_change, "plan": rf.plan.to_dict()}
    out["seconds"] = time.time() - t0
    return out


def auto_finetuned_section(s: CompressionSession, quick: bool = False,
                           auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """The auto search with fine-tuning in the loop, once per signal in :data:`AUTO_FT_SIGNALS`: every plan the
    search measures is first fine-tuned :data:`FT_EPOCHS_HEADLINE` epochs (the calibration probes are not), so the
    plan found is the smallest that holds *after* recovery. With ``auto`` (the model's :func:`auto_section`), each
    signal's search starts from the plan the same signal found without fine-tuning (instead of its bisection), so
    fine-tuning in the loop never ends with a larger plan than the search without it. ``quick``: 6 evaluations on a
    coarse grid."""
    t0 = time.time()
    start = {sig: CompressionPlan.from_dict(auto["signals"][sig]["plan"]) for sig in AUTO_FT_SIGNALS
             if auto and sig in auto.get("signals", {})}
    out, _ = _auto_runs(s, quick, AUTO_FT_SIGNALS, AUTO_FT_BUDGET, FT_EPOCHS_HEADLINE, ", fine-tuned in the loop",
                        start or None)
    out.update(finetune_epochs=FT_EPOCHS_HEADLINE, date=datetime.date.today().isoformat(), seconds=time.time() - t0,
               started_from_auto=sorted(start))
    return out


def holdout_section(s: CompressionSession, m: dict[str, Any], quick: bool = False,
                    root: str | None = None) -> dict[str, Any]:
    """How the drops of the summary's auto plans carry over to the Fashion-MNIST test images outside the evaluation
    set (:func:`~xaicomp_core.io.data.load_fashion_mnist_holdout`, 8,000 images; a class-balanced 1,000 with
    ``quick``): each auto plan (without and with fine-tuning in the loop) on them, with 95 % intervals; for each
    fine-tuned auto plan, the fine-tuning recipes of :data:`~xaicomp_core.evaluate.auto.FINETUNE_RECIPES` with the
    seeds :data:`HOLDOUT_SEEDS` (one with ``quick``) on the search, evaluation and held-out images; and the auto
    search of :data:`AUTO_SIGNALS` run on a class-balanced half of the held-out images instead of the reference
    images, its plans checked on the evaluation images and on the other half."""
    from xaicomp_core.evaluate.session import forward_logits
    from xaicomp_core.io.data import as_tensors, balanced_indices, load_fashion_mnist_holdout

    t0 = time.time()
    hold = load_fashion_mnist_holdout(root)
    if quick:
        hold = hold.balanced_subset(1000)
    xh, yh = as_tensors(hold, s.info.preprocessing, s.info.num_classes, "held-out images")
    base_h = forward_logits(s.model, xh).argmax(1)
    base_r = forward_logits(s.model, s.x_ref).argmax(1)

    def measure(plan: CompressionPlan) -> dict[str, Any]:
        cw = s.compress(plan)
        ev, ev_half = s.drop_interval(s.evaluate(plan))
        ho, ho_half = paired_drop(base_h, s.compressed_logits(cw, xh).argmax(1), yh)
        se, _ = paired_drop(base_r, s.compressed_logits(cw, s.x_ref).argmax(1), s.y_ref)
        return {"estimated_bytes": cw.size.estimated_bytes, "ratio": cw.size.compression_ratio,
                "search_drop_points": se, "evaluation_drop_points": ev, "evaluation_half_width": ev_half,
                "holdout_drop_points": ho, "holdout_half_width": ho_half}

    plans = []
    for section in ("auto", "auto_finetuned"):
        for sig, d in (m.get(section) or {}).get("signals", {}).items():
            plan = CompressionPlan.from_dict(d["plan"])
            _log(f"held-out check: {section} {sig}")
            plans.append({"section": section, "signal": sig, "plan": plan.to_dict(), **measure(plan)})
    recipes = []
    for sig, d in (m.get("auto_finetuned") or {}).get("signals", {}).items():
        plan = CompressionPlan.from_dict(d["plan"])
        for label, (batch, lr) in FINETUNE_RECIPES.items():
            runs = []
            for seed in HOLDOUT_SEEDS[:1] if quick else HOLDOUT_SEEDS:
                _log(f"held-out check: {sig} plan fine-tuned by the {label} recipe, seed {seed}")
                runs.append({"seed": seed, **measure(plan.replace(finetune_batch=batch, finetune_lr=lr, seed=seed))})
            recipes.append({"signal": sig, "recipe": label, "finetune_batch": batch, "finetune_lr": lr,
                            "runs": runs, "mean_holdout_drop_points": float(np.mean([r["holdout_drop_points"]
                                                                                     for r in runs])),
                            "mean_evaluation_drop_points": float(np.mean([r["evaluation_drop_points"]
                                                                          for r in runs]))})
    # the search itself on unseen images: half of the held-out images to search on, the other half to check
    from xaicomp_core.evaluate.auto import auto_compare

    half = balanced_indices(hold.labels, len(hold) // 2, hold.num_classes, seed=3)
    other = np.setdiff1d(np.arange(len(hold)), half)
    t_half, t_other = torch.from_numpy(half), torch.from_numpy(other)
    grid: dict[str, Any] = {"sparsities": (0.0, 0.5, 0.8, 0.9), "bits": (8, 4, 3, 2)} if quick else {}
    _log(f"held-out check: the auto search on {len(half):,} held-out images")
    found = auto_compare(s, AUTO_MAX_DROP, signals=AUTO_SIGNALS, budget=6 if quick else AUTO_BUDGET,
                         search_data=(xh[t_half], yh[t_half]), **grid)
    searched = []
    for sig, r in found.items():
        cw = s.compress(r.plan)
        ev, ev_half = s.drop_interval(r.evaluation)
        ch, ch_half = paired_drop(base_h[t_other], s.compressed_logits(cw, xh[t_other]).argmax(1), yh[t_other])
        searched.append({"signal": sig, "plan": r.plan.to_dict(), "estimated_bytes": r.estimated_bytes,
                         "ratio": r.compression_ratio, "feasible": r.feasible,
                         "search_drop_points": 100 * (r.search_baseline - r.search_accuracy),
                         "evaluation_drop_points": ev, "evaluation_half_width": ev_half,
                         "check_drop_points": ch, "check_half_width": ch_half, "evaluations": r.evaluations})
    return {"images": len(yh), "source": hold.name, "baseline_accuracy": float((base_h == yh).double().mean()),
            "plans": plans, "recipes": recipes,
            "search_on_holdout": {"search_images": len(half), "check_images": len(other),
                                  "budget": 6 if quick else AUTO_BUDGET, "signals": searched},
            "date": datetime.date.today().isoformat(), "seconds": time.time() - t0}


def within_one_point(s: CompressionSession, best_by_criterion: dict[str, Any], auto: dict[str, Any],
                     max_drop: float = 0.01) -> dict[str, Any]:
    """Every plan within ``max_drop`` of the baseline on the evaluation images, without fine-tuning: the grid's best
    per criterion (chosen on the evaluation images) and each auto plan (chosen on the reference images) that holds
    on the evaluation images; and the largest ratio among those that use relevance (to prune, rank bits or allocate
    per layer) and among those that do not."""
    from xaicomp_core.compress.criteria import get_criterion
    from xaicomp_core.evaluate.auto import RELEVANCE_SIGNALS

    rows = []
    for crit, e in best_by_criterion.items():
        b = e["no_finetune"]
        if b:
            rows.append({"source": "grid", "name": crit, "uses_relevance": bool(get_criterion(crit).needs_relevance),
                         "ratio": b["ratio"], "accuracy": b["accuracy"], "drop_points": 100 * b["accuracy_drop"],
                         "estimated_bytes": b["estimated_bytes"], "plan": b["plan"]})
    for sig, d in auto["signals"].items():
        ev = d["evaluation"]
        if ev["drop_points"] <= 100 * max_drop + 1e-9:
            rows.append({"source": "auto", "name": f"auto {sig}", "uses_relevance": sig in RELEVANCE_SIGNALS,
                         "ratio": d["compression_ratio"], "accuracy": ev["accuracy"], "drop_points": ev["drop_points"],
                         "estimated_bytes": d["estimated_bytes"], "plan": d["plan"]})
    rows.sort(key=lambda r: -r["ratio"])

    def best(flag: bool) -> dict[str, Any]:
        return next((r for r in rows if r["uses_relevance"] == flag), {})

    return {"rows": rows, "best_with_relevance": best(True), "best_without_relevance": best(False)}


def where_relevance_helps(s: CompressionSession, curves: dict[str, Any], mp_rows: list[dict[str, Any]],
                          auto: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of "where relevance helps and where it does not", each from measured numbers: pruning at
    :data:`WHERE_RATIOS` (the best relevance-using curve criterion vs magnitude; why: the sparsity each gives the
    largest layer), bit allocation (relevance- vs magnitude-ranked bits on the same pruning; why: in how many of the
    pairs and at what size), and the auto search (the smallest relevance-using plan vs magnitude's; why: the largest
    layer's setting in each)."""
    from xaicomp_core.compress.criteria import get_criterion
    from xaicomp_core.evaluate.auto import RELEVANCE_SIGNALS

    layout = s.layout
    largest = max(layout.compressible, key=lambda i: layout.sizes[i])
    big, big_n = layout.names[largest].removesuffix(".weight"), layout.sizes[largest]
    share = big_n / sum(layout.sizes[i] for i in layout.compressible)
    big_text = f"{big} ({share:.0%} of the weights)"
    rows: list[dict[str, Any]] = []
    rel_crits = [c for c in curves if get_criterion(c).needs_relevance]

    def layer_sparsity(crit: str, ratio: float) -> float:
        res = s.evaluate(curve_plan(crit, ratio))  # cached: the curve evaluated it
        return next(la.sparsity for la in res.layers if la.name == big)

    for ratio in WHERE_RATIOS:
        acc = {c: p["accuracy"] for c, v in curves.items() for p in v["points"] if abs(p["prune_ratio"] - ratio) < 1e-9}
        if "magnitude" not in acc or not any(c in acc for c in rel_crits):
            continue
        best = max((c for c in rel_crits if c in acc), key=lambda c: acc[c])
        sp = {c: layer_sparsity(c, ratio) for c in dict.fromkeys([best, "lrp", "magnitude"]) if c in acc}
        why = f"{big_text} pruned " + ", ".join(f"{v:.1%} by {c}" for c, v in sp.items())
        rows.append({"what": f"pruning {ratio:.0%}", "relevance": best, "relevance_value": acc[best],
                     "magnitude_value": acc["magnitude"], "unit": "accuracy", "gain_points":
                     100 * (acc[best] - acc["magnitude"]), "helps": acc[best] > acc["magnitude"], "why": why,
                     "largest_layer_sparsity": sp})
    pairs: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in mp_rows:
        if r["ranking"] in ("relevance", "magnitude"):
            p = r["plan"]
            pairs.setdefault((p["criterion"], p["prune_ratio"], r["bits"], r["granularity"]), {})[r["ranking"]] = r
    both = [d for d in pairs.values() if len(d) == 2]
    if both:
        gains = [d["relevance"]["accuracy"] - d["magnitude"]["accuracy"] for d in both]
        sizes = [d["relevance"]["estimated_bytes"] / d["magnitude"]["estimated_bytes"] - 1 for d in both]
        wins = sum(g > 0 for g in gains)
        ties = sum(g == 0 for g in gains)
        rows.append({"what": "bit allocation", "relevance": "relevance-ranked bits",
                     "relevance_value": float(np.mean([d["relevance"]["accuracy"] for d in both])),
                     "magnitude_value": float(np.mean([d["magnitude"]["accuracy"] for d in both])),
                     "unit": "mean accuracy", "gain_points": 100 * float(np.mean(gains)),
                     "helps": float(np.mean(gains)) > 0, "pairs": len(both), "wins": wins, "ties": ties,
                     "why": f"more accurate in {wins} of {len(both)} pairs ({ties} ties; same pruning, bit widths and "
                            f"shares), best {100 * max(gains):+.2f} pt, worst {100 * min(gains):+.2f} pt, size "
                            f"{100 * float(np.mean(sizes)):+.1f}% on average"})
    sig = auto["signals"]
    rel = [k for k in sig if k in RELEVANCE_SIGNALS and sig[k]["feasible_on_search_images"]]
    if "magnitude" in sig and rel:
        k = min(rel, key=lambda k: sig[k]["estimated_bytes"])
        a, m = sig[k], sig["magnitude"]
        la = {x["name"]: x for x in a["layers"]}
        lm = {x["name"]: x for x in m["layers"]}
        gap = max(la, key=lambda n: abs(la[n]["bytes"] - lm[n]["bytes"]))
        a_plan, m_plan = CompressionPlan.from_dict(a["plan"]), CompressionPlan.from_dict(m["plan"])

        def setting(plan: CompressionPlan, layer: str) -> str:
            return f"{plan.layer_prune.get(layer, 0):.0%}/{plan.layer_bits.get(layer)}b"

        why = (f"{big_text}: {setting(a_plan, big)} ({k}) vs {setting(m_plan, big)} (magnitude)"
               + (f"; largest byte difference in {gap}: {setting(a_plan, gap)} vs {setting(m_plan, gap)}"
                  if gap != big else "")
               + f"; evaluation drops {a['evaluation']['drop_points'] + 0.0:.2f} vs "
                 f"{m['evaluation']['drop_points'] + 0.0:.2f} pt")
        rows.append({"what": f"auto search (≤ {auto['max_drop_points']:g} pt on the search images)",
                     "relevance": f"auto {k}", "relevance_value": a["compression_ratio"],
                     "magnitude_value": m["compression_ratio"] if m["feasible_on_search_images"] else None,
                     "unit": "ratio", "gain_ratio": a["compression_ratio"] / m["compression_ratio"],
                     "helps": (not m["feasible_on_search_images"]) or a["estimated_bytes"] < m["estimated_bytes"],
                     "why": why})
    return rows


def known_plans(s: CompressionSession, ratios: Sequence[float], ft_ratios: Sequence[float],
                criteria: Sequence[str], composites: Sequence[str], mp_ratios: Sequence[float],
                candidates: dict[str, list[CompressionPlan]]) -> list[CompressionPlan]:
    """The plans :func:`run_model` evaluates that are known before any result (for ``--ray``; a plan missing here
    is still evaluated, in this process)."""
    ft = s.can_finetune
    plans = [curve_plan(c, r) for c in criteria for r in ratios]
    plans += [curve_plan(c, r).replace(finetune_epochs=FT_EPOCHS_CURVE) for c in criteria for r in ratios
              if ft and r in ft_ratios and c in FT_CURVE_CRITERIA]
    for comp in composites:
        plans += [CompressionPlan(criterion="paper", composite=comp),
                  CompressionPlan(criterion="lrp-zero", composite=comp)]
        plans += [CompressionPlan(criterion="paper", composite=comp, finetune_epochs=FT_EPOCHS_CURVE)] if ft else []
    plans += [plan for plan, _ in mixed_precision_plans(mp_ratios)]
    plans += [plan for group in candidates.values() for plan in group]
    return plans


def _ray_progress(name: str) -> Any:
    state = {"t": 0.0}

    def progress(done: int, total: int) -> None:
        if done == total or time.time() - state["t"] > 30:
            state["t"] = time.time()
            _log(f"  {name}: {done}/{total} plans done on Ray, {total - done} left")

    return progress


# ----------------------------------------------------------------------------------------------------------------
def model_session(name: str, quick: bool = False, threads: int = 2) -> CompressionSession:
    """The session every experiment of ``name`` runs on: the shipped reference, evaluation and training images
    (small class-balanced subsets with ``quick``)."""
    torch.set_num_threads(threads)
    model = load_builtin_model(name)
    ref = load_builtin_dataset("fashion-mnist", "reference")
    ev = load_builtin_dataset("fashion-mnist", "eval")
    train = load_builtin_dataset("fashion-mnist", "train")
    if quick:
        ref, ev, train = ref.balanced_subset(200), ev.balanced_subset(400), train.balanced_subset(500)
    return CompressionSession(model, ref, ev, train_data=train, cache_size=100_000)


def run_model(name: str, quick: bool = False, threads: int = 2, ray: bool = False) -> dict[str, Any]:
    """All experiments for one built-in model; with ``ray`` the plans known before any result (every one but the
    fine-tuning bisection of the headline and the paper rule's equal-sparsity comparisons) are first evaluated on
    the Ray workers of the running instance (see :func:`xaicomp_core.evaluate.distributed.ray_instance`), each
    task with ``threads`` torch threads like this process, so the numbers are the same as without Ray."""
    t0 = time.time()
    s = model_session(name, quick, threads)
    model = s.model
    _log(f"{name}: baseline {s.baseline_accuracy:.2%} on {len(s.y_eval)} images")
    ratios = [0.0, 0.5, 0.9] if quick else CURVE_RATIOS
    ft_ratios = [0.9] if quick else FT_RATIOS
    criteria = ["lrp", "magnitude", "lrp-filter", "lrp-x-weight", "lrp-budget-magnitude"] if quick else CURVE_CRITERIA
    composites = ["epsilon"] if quick else PAPER_COMPOSITES
    mp_ratios = [0.5] if quick else MP_RATIOS
    hl_ratios = [0.5, 0.8] if quick else [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]
    hl_criteria = ["lrp", "magnitude"] if quick else HEADLINE_CRITERIA
    if ray:
        from xaicomp_core.evaluate.distributed import RayEvaluator

        plans = known_plans(s, ratios, ft_ratios, criteria, composites, mp_ratios,
                            headline_candidates(hl_criteria, hl_ratios))
        n = RayEvaluator(s, threads=threads).prefetch(plans, _ray_progress(name))
        _log(f"{name}: {n} plans evaluated on Ray")
    res: dict[str, Any] = {"model": name, "baseline_accuracy": s.baseline_accuracy, "fp32_bytes": s.fp32_bytes(),
                           "parameters": sum(p.numel() for p in model.parameters()), "eval_images": len(s.y_eval),
                           "reference_images": len(s.y_ref), "train_images": len(s.train_tensors()[1]),
                           "card": {k: builtin_card(name)[k] for k in ("test_accuracy", "eval_accuracy")}}
    res["pruning_curves"] = pruning_curves(s, ratios, ft_ratios, criteria)
    res["paper_rule"] = paper_rule(s, composites)
    res["mixed_precision"] = mixed_precision(s, mp_ratios)
    res["best_by_criterion"] = headline(s, headline_candidates(hl_criteria, hl_ratios),
                                        ft_attempts=1 if quick else 5)
    best_nf = max((v["no_finetune"] for v in res["best_by_criterion"].values() if v["no_finetune"]),
                  key=lambda b: b["ratio"], default={})
    best_ft = max((v.get("finetune") or {} for v in res["best_by_criterion"].values()),
                  key=lambda b: b.get("ratio", 0), default={})
    res["best_ratio_at_1pt"] = {"no_finetune": best_nf, "finetune": best_ft}
    res["yeom_equal_size"] = yeom_equal_size(s, res["mixed_precision"])
    res["auto"] = auto_section(s, quick)
    if quick or name in AUTO_FT_MODELS:
        res["auto_finetuned"] = auto_finetuned_section(s, quick, res["auto"])
    try:
        res["holdout"] = holdout_section(s, res, quick)
    except DataError as e:
        _log(f"{name}: held-out check skipped: {e}")
    res["within_1pt"] = within_one_point(s, res["best_by_criterion"], res["auto"])
    res["where_relevance_helps"] = where_relevance_helps(s, res["pruning_curves"], res["mixed_precision"], res["auto"])
    if not quick:
        res["bench"] = run_bench(name, repeats=5, threads=threads)
    res["seconds"] = time.time() - t0
    assert s.check_unchanged()
    _log(f"{name}: done in {res['seconds']:.0f}s")
    return res


# ----------------------------------------------------------------------------------------------------------------
def plot_model(res: dict[str, Any], out_dir: pathlib.Path) -> list[str]:
    """PNG plots for one model; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = res["model"]
    files = []

    def save(fig, what: str) -> None:
        fig.tight_layout()
        f = f"{name}-{what}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(out_dir / f, buf.getvalue())
        plt.close(fig)
        files.append(f)

    colors = {"lrp": "#c2185b", "lrp-signed": "#7b1fa2", "magnitude": "#1565c0", "random": "#757575",
              "lrp-filter": "#ef6c00"}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for crit, c in res["pruning_curves"].items():
        xs = [p["sparsity"] for p in c["points"]]
        ax.plot(xs, [p["accuracy"] for p in c["points"]], "-o", ms=3, color=colors.get(crit) or _colour(crit),
                label=crit)
        ft = [p for p in c["points"] if "accuracy_finetuned" in p]
        if ft:
            ax.plot([p["sparsity"] for p in ft], [p["accuracy_finetuned"] for p in ft], "--",
                    color=colors.get(crit) or _colour(crit), alpha=0.8)
    ax.axhline(res["baseline_accuracy"], color="k", lw=0.8, ls=":")
    ax.set_xlabel("sparsity (fraction of conv/linear weights pruned)")
    ax.set_ylabel("top-1 accuracy (shipped eval set)")
    ax.set_title(f"{name}: pruning curves (solid: no fine-tune, dashed: {FT_EPOCHS_CURVE}-epoch fine-tune)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "pruning")

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    fams = {}
    for r in res["mixed_precision"]:
        key = "uniform bits" if r["family"].startswith("uniform") else (
            "relevance-ranked mixed" if r["ranking"] == "relevance" else "magnitude-ranked mixed")
        fams.setdefault(key, []).append(r)
    fam_colors = {"uniform bits": "#1565c0", "relevance-ranked mixed": "#c2185b", "magnitude-ranked mixed": "#2e7d32"}
    for key, rows in fams.items():
        xs = np.array([r["estimated_bytes"] / 1000 for r in rows])
        ys = np.array([r["accuracy"] for r in rows])
        ax.scatter(xs, ys, s=8, alpha=0.35, color=fam_colors[key])
        flags = pareto_flags(list(xs), list(ys))
        px, py = xs[flags], ys[flags]
        o = np.argsort(px)
        ax.plot(px[o], py[o], "-", color=fam_colors[key], label=f"{key} (Pareto front)")
    ax.axhline(res["baseline_accuracy"] - 0.01, color="k", lw=0.8, ls=":", label="baseline - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("packed size (kB, log scale)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(max(0.0, res["baseline_accuracy"] - 0.3), min(1.0, res["baseline_accuracy"] + 0.03))
    ax.set_title(f"{name}: size vs accuracy (fp32 = {res['fp32_bytes'] / 1000:.0f} kB)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    save(fig, "pareto")

    comp = res["paper_rule"].get("epsilon")
    if comp:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        layers = [layer["layer"] for layer in comp["layers"]]
        zero = np.array([layer["zero"] / layer["weights"] for layer in comp["layers"]])
        neg = np.array([layer["neg"] / layer["weights"] for layer in comp["layers"]])
        x = np.arange(len(layers))
        ax.bar(x, zero, color="#9e9e9e", label="relevance = 0")
        ax.bar(x, neg, bottom=zero, color="#1565c0", label="relevance < 0")
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share of the layer's weights")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: weights the paper rule prunes (epsilon composite)")
        ax.legend(fontsize=8)
        save(fig, "paper-rule")
    return files


def _colour(criterion: str) -> str | None:
    """The registered colour of a criterion (None for one not registered here)."""
    from xaicomp_core.compress.criteria import get_criterion

    try:
        return get_criterion(criterion).colour
    except Exception:  # a summary from a run with a plugin criterion
        return None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.2f}%"


def _where_lines(summary: dict[str, Any]) -> list[str]:
    """The cross-model table "where relevance helps and where it does not" (empty for summaries without it)."""
    rows = [(name, r) for name, m in summary["models"].items() for r in m.get("where_relevance_helps", [])]
    if not rows:
        return []
    L = ["## Where relevance helps and where it does not", "",
         "Measured in this run (no fine-tuning). Pruning: the most accurate relevance-using curve criterion vs "
         "magnitude at the same share of weights removed; bit allocation: relevance- vs magnitude-ranked bit widths "
         "on the same pruning, bit widths and shares (all pairs of the mixed-precision grid); auto search: the "
         "smallest plan a relevance-using signal found within the budget vs the magnitude signal's, with the same "
         "number of evaluations. *Why* gives the measured quantity behind the difference.", "",
         "| model | comparison | with relevance | magnitude | helps? | why (measured) |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        if r["unit"] == "ratio":
            mag = "nothing within" if r["magnitude_value"] is None else f"{r['magnitude_value']:.1f}×"
            rel, diff = f"{r['relevance_value']:.1f}× ({r['relevance']})", f"{r['gain_ratio']:.2f}× the ratio"
        else:
            rel = f"{_pct(r['relevance_value'])} ({r['relevance']})"
            mag, diff = _pct(r["magnitude_value"]), f"{r['gain_points']:+.2f} pt"
        L.append(f"| {name} | {r['what']} | {rel} | {mag} | {'yes' if r['helps'] else '**no**'}, {diff} | "
                 f"{r['why']} |")
    return [*L, ""]


def _auto_lines(m: dict[str, Any]) -> list[str]:
    """Per model: the auto search per signal and every plan within 1 point (empty for summaries without them)."""
    a = m.get("auto")
    if not a:
        return []
    L = ["", f"### Auto search: smallest plan within {a['max_drop_points']:g} point (`xaicomp auto`)", "",
         f"Per-layer sparsity and bit width searched with {a['budget']} evaluations per signal on the "
         f"{a['search_images']:,} reference images ({a['grid']} grid, {a['seconds'] / 60:.1f} minutes for all "
         "signals), the plan found then evaluated once on the evaluation images, which the search never saw. No "
         "fine-tuning during the search (one fine-tuning per evaluation is too slow for `make results`); the last "
         "column fine-tunes the plan found, once.", "",
         "| signal | ratio | size | search drop | evaluation drop | fine-tuned drop | evaluations | plan |",
         "|---|---|---|---|---|---|---|---|"]
    for sig, d in a["signals"].items():
        ft = d.get("finetuned")
        flag = "" if d["feasible_on_search_images"] else " (nothing within the budget; most accurate tried)"
        ft_cell = "–" if not ft else f"{ft['drop_points'] + 0.0:.2f} pt ({ft['epochs']} epochs)"
        L.append(f"| {sig} | {d['compression_ratio']:.1f}× | {d['estimated_bytes'] / 1000:.1f} kB | "
                 f"{d['search']['drop_points'] + 0.0:.2f} pt | {d['evaluation']['drop_points'] + 0.0:.2f} pt | "
                 f"{ft_cell} | {d['evaluations']} | {d['description']}{flag} |")
    L += ["", a["verdict"]]
    w = m.get("within_1pt")
    if w:
        L += ["", "### Within 1 point on the evaluation images, with and without relevance", "",
              "Grid plans are the best per criterion of the headline grid (chosen on the evaluation images); auto "
              "plans were chosen on the reference images and are listed when they also hold on the evaluation "
              "images. *Uses relevance*: to prune, rank bits or allocate per layer.", "",
              "| plan | uses relevance | ratio | accuracy | drop |", "|---|---|---|---|---|"]
        for r in w["rows"]:
            L.append(f"| {r['name']} ({r['source']}) | {'yes' if r['uses_relevance'] else 'no'} | "
                     f"{r['ratio']:.1f}× | {_pct(r['accuracy'])} | {r['drop_points'] + 0.0:.2f} pt |")
        br, bn = w["best_with_relevance"], w["best_without_relevance"]
        if br and bn:
            L += ["", f"Best with relevance: **{br['ratio']:.1f}×** ({br['name']}); best without: **{bn['ratio']:.1f}×"
                  f"** ({bn['name']}): relevance {'reaches at least' if br['ratio'] >= bn['ratio'] else 'stays below'}"
                  f" the size of the best plan without it ({br['ratio'] / bn['ratio']:.2f}×)."]
    return L


def _auto_finetuned_lines(m: dict[str, Any]) -> list[str]:
    """Per model: the auto search with fine-tuning in the loop (empty for summaries without it)."""
    a = m.get("auto_finetuned")
    if not a:
        return []
    L = ["", f"### Auto search with {a['finetune_epochs']}-epoch fine-tuning in the loop (`xaicomp auto "
         f"--finetune-epochs {a['finetune_epochs']}`)", "",
         f"The same search, but every plan it measures is fine-tuned first (the calibration probes are not): "
         f"{a['budget']} evaluations per signal on the {a['search_images']:,} reference images, "
         f"{a['seconds'] / 60:.1f} minutes for {len(a['signals'])} signals (run on {a['date']})"
         + (f"; the searches of {', '.join(a['started_from_auto'])} start from the plan the same signal found "
            f"without fine-tuning in the search above, instead of from their bisection (the same as `xaicomp auto "
            f"--finetune-epochs {a['finetune_epochs']} --warm-start {m['auto']['budget']}`)"
            if a.get("started_from_auto") and m.get("auto") else "")
         + ". The plan found is evaluated once on the evaluation images, fine-tuned as the saved plan says.", "",
         "| signal | ratio | size | search drop | evaluation drop | evaluations | plan |",
         "|---|---|---|---|---|---|---|"]
    for sig, d in a["signals"].items():
        flag = "" if d["feasible_on_search_images"] else " (nothing within the budget; most accurate tried)"
        L.append(f"| {sig} | {d['compression_ratio']:.1f}× | {d['estimated_bytes'] / 1000:.1f} kB | "
                 f"{d['search']['drop_points'] + 0.0:.2f} pt | {d['evaluation']['drop_points'] + 0.0:.2f} pt | "
                 f"{d['evaluations']} | {d['description']}{flag} |")
    return [*L, "", a["verdict"]]


def _holdout_lines(m: dict[str, Any]) -> list[str]:
    """Per model: the held-out check of the auto plans and of the fine-tuning recipes (empty without it)."""
    h = m.get("holdout")
    if not h:
        return []
    names = {"auto": "auto", "auto_finetuned": "auto, fine-tuned in the loop"}
    L = ["", f"### Held-out check: {h['images']:,} more test images (`python -m xaicomp_core.results --only holdout`)",
         "", f"The {h['images']:,} Fashion-MNIST test images outside the evaluation set (the original model "
         f"{_pct(h['baseline_accuracy'])} there), which no search, choice or fine-tuning ever saw, read from "
         f"Debian's `dataset-fashion-mnist` (run on {h['date']}). Drops are paired (the same images before and "
         "after), with the half-width of their 95 % interval: a drop near 1 point is known to about ±0.8 points on "
         f"the 2,000 evaluation images and to about ±0.4 on these {h['images']:,}, so a plan that holds on the "
         "evaluation images can fail here and the other way round.", "",
         "| search | signal | ratio | size | search drop | evaluation drop | held-out drop |",
         "|---|---|---|---|---|---|---|"]
    for r in h["plans"]:
        L.append(f"| {names.get(r['section'], r['section'])} | {r['signal']} | {r['ratio']:.1f}× | "
                 f"{r['estimated_bytes'] / 1000:.1f} kB | {r['search_drop_points']:.2f} pt | "
                 f"{r['evaluation_drop_points']:.2f} ± {r['evaluation_half_width']:.2f} pt | "
                 f"{r['holdout_drop_points']:.2f} ± {r['holdout_half_width']:.2f} pt |")
    if h["recipes"]:
        L += ["", "Fine-tuning recipes on the fine-tuned auto plans (the same masks and bit widths; 2 epochs on the "
              "5,000 training images; one row per recipe, seeds " + ", ".join(
                  str(r["seed"]) for r in h["recipes"][0]["runs"]) + "):", "",
              "| plan | recipe | batch | learning rate | search drops | evaluation drops | held-out drops | "
              "mean held-out drop | sizes |", "|---|---|---|---|---|---|---|---|---|"]
        for r in h["recipes"]:
            def cells(key: str, runs: list = r["runs"]) -> str:
                return " / ".join(f"{x[key]:.2f}" for x in runs)
            L.append(f"| {r['signal']} | {r['recipe']} | {r['finetune_batch']} | {r['finetune_lr']:g} | "
                     f"{cells('search_drop_points')} | {cells('evaluation_drop_points')} | "
                     f"{cells('holdout_drop_points')} | **{r['mean_holdout_drop_points']:.2f} pt** | "
                     + " / ".join(f"{x['estimated_bytes'] / 1000:.1f}" for x in r["runs"]) + " kB |")
    so = h.get("search_on_holdout")
    if so:
        L += ["", f"The auto search (no fine-tuning, {so['budget']} evaluations per signal) run on "
              f"{so['search_images']:,} of these images instead of the reference images, its plans checked on the "
              f"evaluation images and on the other {so['check_images']:,} held-out images:", "",
              "| signal | ratio | size | search drop | evaluation drop | drop on the other half |",
              "|---|---|---|---|---|---|"]
        for r in so["signals"]:
            flag = "" if r["feasible"] else " (nothing within the budget)"
            L.append(f"| {r['signal']} | {r['ratio']:.1f}×{flag} | {r['estimated_bytes'] / 1000:.1f} kB | "
                     f"{r['search_drop_points']:.2f} pt | {r['evaluation_drop_points']:.2f} ± "
                     f"{r['evaluation_half_width']:.2f} pt | {r['check_drop_points']:.2f} ± "
                     f"{r['check_half_width']:.2f} pt |")
    return L


def best_auto_finetuned(m: dict[str, Any], max_drop: float = 1.0) -> dict[str, Any]:
    """The smallest plan of the fine-tuned auto search that also holds on the evaluation images ({} if none)."""
    rows = [(sig, d) for sig, d in (m.get("auto_finetuned") or {}).get("signals", {}).items()
            if d["feasible_on_search_images"] and d["evaluation"]["drop_points"] <= max_drop + 1e-9]
    if not rows:
        return {}
    sig, d = max(rows, key=lambda r: r[1]["compression_ratio"])
    return {"signal": sig, "ratio": d["compression_ratio"], "estimated_bytes": d["estimated_bytes"],
            "reduction": 1 - d["estimated_bytes"] / m["fp32_bytes"], "accuracy": d["evaluation"]["accuracy"],
            "plan": d["plan"]}


def write_markdown(summary: dict[str, Any], path: pathlib.Path, plot_dir: str, discussion: str) -> None:
    """RESULTS.md from the summary."""
    L: list[str] = []
    meta = summary["meta"]
    L += ["# Results", "",
          f"Generated by `make results` (`python -m xaicomp_core.results`) on {meta['date']} on {meta['machine']} "
          f"with torch {meta['torch']}, in {meta['seconds'] / 60:.0f} minutes. Every number below comes from "
          "`results/summary.json`; every plan there can be re-checked with `xaicomp compress --plan`.", "",
          "Accuracy is top-1 on the shipped class-balanced evaluation set (2,000 Fashion-MNIST test images); "
          "relevance uses the 1,000 shipped reference images (LRP-epsilon unless stated); fine-tuning uses the 5,000 "
          "shipped training images with masks and bit classes fixed and quantization in the loop, in batches of 128 "
          "at a learning rate of 0.01 (the plan default) except where a plan says otherwise (the auto search's: 32 "
          "at 0.005). Sizes are the "
          "packed payload (`estimated_bytes`, equal to the bytes `xaicomp export` writes, header excluded) against "
          "fp32 dense; the kept values are Huffman-coded per layer where that is smaller, and a plan with `fold_norm` "
          "stores BatchNorm as scale and shift (packed format versions 2 and 3, `docs/FORMAT.md`)."]
    for run in meta.get("partial_runs", []):
        L += ["", f"Rerun since with `{run['command']}` on {run['date']} ({run['machine']}, "
              f"{run['seconds'] / 60:.0f} minutes): the {run['section']} section of {run['model']}."]
    L += [""]
    L += ["## Headline: smallest packed size within 1 point of top-1", "",
          "| model | fp32 | baseline | best, no fine-tune | best, fine-tuned (grid) | criterion (no FT / FT) | "
          "auto search, fine-tuned in the loop |",
          "|---|---|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        nf, ft = m["best_ratio_at_1pt"]["no_finetune"], m["best_ratio_at_1pt"]["finetune"]

        def cell(b: dict) -> str:
            if not b:
                return "–"
            return (f"**{b['ratio']:.1f}×** ({b['reduction'] * 100:.1f}% smaller, {b['estimated_bytes'] / 1000:.1f} "
                    f"kB), {_pct(b['accuracy'])}")

        af = best_auto_finetuned(m)
        af_cell = f"{cell(af)} ({af['signal']} signal)" if af else "–"
        L.append(f"| {name} | {m['fp32_bytes'] / 1000:.0f} kB | {_pct(m['baseline_accuracy'])} | {cell(nf)} | "
                 f"{cell(ft)} | {nf.get('plan', {}).get('criterion', '–')} / {ft.get('plan', {}).get('criterion', '–')}"
                 f" | {af_cell} |")
    L += ["", "The paper reports a 64% size reduction; the project's goal on `fashion-vgg` is ≥ 10× without and "
          "≥ 20× with fine-tuning.", ""]
    L += _where_lines(summary)
    for name, m in summary["models"].items():
        L += [f"## {name}", "", f"Baseline {_pct(m['baseline_accuracy'])} on the evaluation set "
              f"({_pct(m['card']['test_accuracy'])} on the full 10k test set); {m['parameters']:,} parameters, "
              f"fp32 {m['fp32_bytes'] / 1000:.1f} kB. Experiments took {m['seconds'] / 60:.1f} minutes.", ""]
        L += ["### Best size within 1 point, per criterion", "",
              "| criterion | no fine-tune | plan | fine-tuned | plan |", "|---|---|---|---|---|"]
        for crit, e in m["best_by_criterion"].items():
            nf, ft = e["no_finetune"], e.get("finetune") or {}

            def c2(b: dict) -> tuple[str, str]:
                if not b:
                    return "–", "–"
                p = CompressionPlan.from_dict(b["plan"])
                return (f"{b['ratio']:.1f}× ({_pct(b['accuracy'])})", f"`{p.cli_args()}`")

            a, b = c2(nf)
            c, d = c2(ft)
            L.append(f"| {crit} | {a} | {b} | {c} | {d} |")
        L += ["", "### Pruning curves (fp32 weights)", "", f"![pruning curves]({plot_dir}/{name}-pruning.png)", "",
              "| criterion | AUC 0–95% | AUC 50–95% | AUC 50–95%, fine-tuned | " + " | ".join(
                  f"{p['prune_ratio'] * 100:.0f}%" for p in next(iter(m["pruning_curves"].values()))["points"]) + " |",
              "|---|---|---|---|" + "---|" * len(next(iter(m["pruning_curves"].values()))["points"])]
        for crit, c in m["pruning_curves"].items():
            accs = " | ".join(f"{p['accuracy'] * 100:.1f}" + (f" ({p['accuracy_finetuned'] * 100:.1f})"
                                                            if "accuracy_finetuned" in p else "") for p in c["points"])
            high, high_ft = c["auc_high_sparsity"], c["auc_high_sparsity_finetuned"]
            L.append(f"| {crit} | {c['auc']:.4f} | {'–' if high is None else f'{high:.4f}'} | "
                     f"{'–' if high_ft is None else f'{high_ft:.4f}'} | {accs} |")
        L += ["", "Cells: accuracy % without (with) fine-tuning. `lrp-filter` is Yeom et al.'s filter pruning with "
              "their z+ rule on the convolutions (composite `epsilon-plus`); removed filters output exactly zero "
              "(their bias and BatchNorm are zeroed); its sparsity is the closest whole-channel count to the ratio "
              "and the classifier is never filter-pruned. The hybrid criteria ("
              + ", ".join(f"`{c}`" for c in HYBRID_CRITERIA) + ") combine relevance and magnitude (recipes in "
              "`compress/hybrid_criteria.py`); they are not fine-tuned here (25 more fine-tunings per model would add "
              "most of an hour on two cores).", ""]
        L += ["### The paper's rule (prune relevance ≤ 0)", "", f"![paper rule]({plot_dir}/{name}-paper-rule.png)", "",
              "| composite | relevance ≤ 0 | = 0 | < 0 | accuracy after pruning ≤ 0 | fine-tuned | after pruning = 0 "
              "only | lrp / magnitude / random at the same sparsity |", "|---|---|---|---|---|---|---|---|"]
        for comp, p in m["paper_rule"].items():
            t = p["total"]
            same = p["accuracy_same_sparsity"]
            L.append(f"| {comp} | {t['le0'] / t['weights']:.1%} | {t['zero'] / t['weights']:.1%} | "
                     f"{t['neg'] / t['weights']:.1%} | {_pct(p['accuracy_paper'])} | {_pct(p['paper_finetuned'])} | "
                     f"{_pct(p['accuracy_zero'])} ({p['sparsity_zero']:.1%} pruned) | {_pct(same['lrp'])} / "
                     f"{_pct(same['magnitude'])} / {_pct(same['random'])} |")
        eps = m["paper_rule"].get("epsilon")
        if eps:
            L += ["", "Per layer (epsilon): " + "; ".join(
                f"{row['layer']} {row['le0'] / row['weights']:.0%} ≤ 0 ({row['zero'] / row['weights']:.0%} zero)"
                for row in eps["layers"]) + "."]
        L += ["", "### Mixed precision: size vs accuracy", "", f"![pareto]({plot_dir}/{name}-pareto.png)", ""]
        mp = m["mixed_precision"]
        L += ["Pareto-optimal plans (over all families):", "",
              "| size | ratio | accuracy | sparsity | bits | ranking | granularity | family |",
              "|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in mp if r["pareto"]), key=lambda r: r["estimated_bytes"]):
            L.append(f"| {r['estimated_bytes'] / 1000:.1f} kB | {r['compression_ratio']:.1f}× | "
                     f"{_pct(r['accuracy'])} | {r['sparsity']:.0%} | {r['bits']} | {r['ranking']} | "
                     f"{r['granularity']} | {r['family']} |")
        L += ["", "Same bits and pruning, relevance- vs magnitude-ranked bit allocation (mean over the pruning ratios "
              "of the accuracy and size, per weight / channel / layer granularity):", "",
              "| bits | granularity | relevance-ranked | magnitude-ranked |", "|---|---|---|---|"]
        groups: dict[tuple, dict[str, list]] = {}
        for r in mp:
            if r["ranking"] == "-" or "lrp pruning" not in r["family"]:
                continue
            groups.setdefault((r["bits"], r["granularity"]), {}).setdefault(r["ranking"], []).append(r)
        for (bits, gran), d in groups.items():
            def fmt(rows: list) -> str:
                return (f"{np.mean([x['accuracy'] for x in rows]) * 100:.2f}%, "
                        f"{np.mean([x['estimated_bytes'] for x in rows]) / 1000:.1f} kB")
            L.append(f"| {bits} | {gran} | {fmt(d.get('relevance', []))} | {fmt(d.get('magnitude', []))} |")
        L += ["", "### Against Yeom et al. filter pruning at equal size", "",
              "| filter pruning | size | accuracy | best LRP-guided plan ≤ that size | accuracy |",
              "|---|---|---|---|---|"]
        for y in m["yeom_equal_size"]:
            lp = CompressionPlan.from_dict(y["lrp_plan"]).cli_args() if y["lrp_plan"] else "–"
            L.append(f"| {y['filter_ratio']:.0%} of weights, {y['bits']}-bit | {y['filter_bytes'] / 1000:.1f} kB | "
                     f"{_pct(y['filter_accuracy'])} | `{lp}` ({(y['lrp_bytes'] or 0) / 1000:.1f} kB) | "
                     f"{_pct(y['lrp_accuracy'])} |")
        L += _auto_lines(m)
        L += _auto_finetuned_lines(m)
        L += _holdout_lines(m)
        if "bench" in m:
            b = m["bench"]
            L += ["", "### Performance (`xaicomp bench`)", "",
                  f"update_ratio **{b['update_ratio']:.2f}** (evaluate {b['evaluate_seconds'] * 1000:.0f} ms vs bare "
                  f"forward {b['forward_seconds'] * 1000:.0f} ms over {b['eval_images']} images); relevance_ratio "
                  f"**{b['relevance_ratio']:.2f}** (weight_relevance {b['relevance_seconds'] * 1000:.0f} ms vs forward+"
                  f"backward {b['forward_backward_seconds'] * 1000:.0f} ms on {b['relevance_batch']} images); "
                  f"{b['threads']} threads, {b['machine']}."]
        L.append("")
    L += ["## Discussion", "", discussion.strip(), ""]
    atomic_write(path, "\n".join(L))


def _machine(threads: int) -> str:
    """The machine line of a summary's meta."""
    return f"{platform.machine()}, {_cpu_name()}, {threads} threads"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry."""
    ap = argparse.ArgumentParser(prog="python -m xaicomp_core.results", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fashion-vgg,fashion-lenet,fashion-resnet")
    ap.add_argument("--quick", action="store_true", help="tiny grid on small subsets (for tests)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT), help="folder receiving results/, docs/results/ and RESULTS.md")
    ap.add_argument("--from-summary", action="store_true", help="only re-render plots and RESULTS.md")
    ap.add_argument("--only", choices=PARTIAL_SECTIONS, default=None,
                    help="rerun only this section for --models into the existing results/summary.json (the rest is "
                         "kept; the summary's meta records the partial run), then re-render")
    ap.add_argument("--holdout-root", default=None, metavar="FOLDER",
                    help="raw Fashion-MNIST idx files for the held-out check (default: Debian's dataset-fashion-mnist "
                         "package, /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="evaluate the plans on Ray workers (--threads each): on the cluster at ADDRESS (e.g. "
                         "HEAD:6379), or on a local instance sized to this machine without ADDRESS or with 'local'")
    args = ap.parse_args(argv)
    if args.ray is not None and not args.from_summary:
        from xaicomp_core.errors import XaicompError
        from xaicomp_core.evaluate.distributed import require_ray

        try:
            require_ray(args.ray or None)
        except XaicompError as e:
            print(f"xaicomp: error: {e}", file=sys.stderr)
            return 2
    out = pathlib.Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    plot_dir = out / "docs" / "results"
    plot_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out / "results" / "summary.json"
    t0 = time.time()
    if args.from_summary:
        summary = json.loads(summary_path.read_text())
    elif args.only:
        if not summary_path.exists():
            print(f"xaicomp: error: --only needs an existing {summary_path} (run make results first)", file=sys.stderr)
            return 2
        summary = json.loads(summary_path.read_text())
        missing = [name for name in args.models.split(",") if name not in summary["models"]]
        if missing:  # before any work: nothing is computed for a summary that cannot take it
            print(f"xaicomp: error: {summary_path} has no results for {', '.join(missing)}", file=sys.stderr)
            return 2
        if args.only == "holdout":
            from xaicomp_core.io.data import load_fashion_mnist_holdout

            try:
                load_fashion_mnist_holdout(args.holdout_root)  # before any work: the images must be there
            except DataError as e:
                print(f"xaicomp: error: {e}", file=sys.stderr)
                return 2
        for name in args.models.split(","):
            if args.only == "auto-finetuned" and not (args.quick or name in AUTO_FT_MODELS):
                _log(f"{name}: no auto search with fine-tuning in the loop (only {', '.join(AUTO_FT_MODELS)}, as in a "
                     "full run)")
                continue
            t1 = time.time()
            m, s = summary["models"][name], model_session(name, args.quick, args.threads)
            if args.only == "holdout":
                m["holdout"] = holdout_section(s, m, args.quick, args.holdout_root)
            elif args.only == "auto":
                m["auto"] = auto_section(s, args.quick)
                m["within_1pt"] = within_one_point(s, m["best_by_criterion"], m["auto"])
                m["where_relevance_helps"] = where_relevance_helps(s, m["pruning_curves"], m["mixed_precision"],
                                                                   m["auto"])
            else:
                m["auto_finetuned"] = auto_finetuned_section(s, args.quick, m.get("auto"))
            runs = summary["meta"].setdefault("partial_runs", [])
            runs[:] = [r for r in runs if (r["section"], r["model"]) != (args.only, name)]  # superseded
            runs.append({
                "section": args.only, "model": name, "date": datetime.date.today().isoformat(),
                "seconds": time.time() - t1, "machine": _machine(args.threads),
                "command": "python -m xaicomp_core.results " + " ".join(argv or sys.argv[1:])})
        atomic_write(summary_path, json.dumps(summary, indent=1) + "\n")
    else:
        with contextlib.ExitStack() as stack:
            if args.ray is not None:
                from xaicomp_core.evaluate.distributed import ray_instance

                stack.enter_context(ray_instance(args.ray or None))
            models = {name: run_model(name, args.quick, args.threads, ray=args.ray is not None)
                      for name in args.models.split(",")}
        summary = {"meta": {"date": datetime.date.today().isoformat(), "seconds": time.time() - t0,
                            "machine": _machine(args.threads),
                            "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
                            "command": "python -m xaicomp_core.results " + " ".join(argv or sys.argv[1:])},
                   "models": models}
        atomic_write(summary_path, json.dumps(summary, indent=1) + "\n")
    for m in summary["models"].values():
        plot_model(m, plot_dir)
    disc_path = out / "results" / "discussion.md"
    discussion = disc_path.read_text() if disc_path.exists() else "(no discussion written yet)"
    write_markdown(summary, out / "RESULTS.md", "docs/results", discussion)
    _log(f"wrote {summary_path}, {plot_dir} and {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
