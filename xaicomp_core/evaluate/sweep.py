"""Sweeps over criteria x prune ratios x bit settings, and Pareto fronts of size vs accuracy."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xaicomp_core.errors import PlanError
from xaicomp_core.evaluate.session import CompressionSession, EvaluationResult
from xaicomp_core.plan import FP32, CompressionPlan

ProgressFn = Callable[[int, int], None]

DEFAULT_RATIOS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


@dataclass(frozen=True)
class BitSetting:
    """Bit levels and split, e.g. ``BitSetting((8, 4, 2), (0.2, 0.5))``."""

    levels: tuple[int, ...] = (FP32,)
    split: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        """Short label such as ``8/4/2 (20/50/30)`` or ``fp32``."""
        names = ["fp32" if b == FP32 else str(b) for b in self.levels]
        if len(names) == 1:
            return names[0] if names[0] == "fp32" else f"{names[0]}-bit"
        shares = [*self.split, max(0.0, 1 - sum(self.split))]
        return "/".join(names) + " (" + "/".join(f"{s * 100:.0f}" for s in shares) + ")"

    @classmethod
    def parse(cls, text: str) -> BitSetting:
        """Parse ``"8,4,2:0.2,0.5"``, ``"4"`` or ``"fp32"``."""
        levels_txt, _, split_txt = text.partition(":")
        try:
            levels = tuple(parse_bits(levels_txt))
            split = tuple(float(v) for v in split_txt.split(",")) if split_txt.strip() else ()
        except ValueError:
            raise PlanError(f"cannot parse bit setting {text!r}; use e.g. 8,4,2:0.2,0.5 or 4 or fp32") from None
        return cls(levels, split)

    @classmethod
    def of(cls, plan: CompressionPlan) -> BitSetting:
        """The bit setting of ``plan``."""
        return cls(tuple(plan.bit_levels), tuple(plan.bit_split))


def parse_bits(text: str) -> list[int]:
    """Parse ``"8,4,2"`` / ``"fp32"`` / ``"32"`` into bit widths (32 = fp32)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        out.append(FP32 if p in ("fp32", "32", "float") else int(p))
    if not out:
        raise ValueError("no bit widths")
    return out


def sweep_plans(criteria: Sequence[str], ratios: Sequence[float], bits: Sequence[BitSetting],
                base: CompressionPlan | None = None) -> list[CompressionPlan]:
    """All plans of the grid (rule criteria such as ``paper`` get one plan per bit setting)."""
    base = base or CompressionPlan()
    plans = []
    for crit in criteria:
        for b in bits:
            uses_ratio = base.replace(criterion=crit).uses_ratio
            for r in (ratios if uses_ratio else [0.0]):
                plans.append(base.replace(criterion=crit, prune_ratio=float(r), bit_levels=list(b.levels),
                                          bit_split=list(b.split)).validate())
    return plans


def pareto_flags(sizes: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """True for points no other point beats (smaller or equal size and higher or equal accuracy, one strictly)."""
    flags = []
    for i, (s, a) in enumerate(zip(sizes, accuracies)):
        dominated = any(s2 <= s and a2 >= a and (s2 < s or a2 > a)
                        for j, (s2, a2) in enumerate(zip(sizes, accuracies)) if j != i)
        flags.append(not dominated)
    return flags


def run_sweep(session: CompressionSession, criteria: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS,
              bits: Sequence[BitSetting] = (BitSetting(),), base: CompressionPlan | None = None,
              progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Evaluate the grid; one row per plan with accuracy, sparsity, bits, size and a Pareto flag per criterion.

    This is the single-process path; :func:`xaicomp_core.evaluate.distributed.run_sweep_ray` evaluates the same
    plans on Ray workers and builds the same rows with :func:`sweep_rows`.
    """
    plans = sweep_plans(criteria, ratios, bits, base)
    results = []
    for i, plan in enumerate(plans):
        results.append(session.evaluate(plan))
        if progress is not None:
            progress(i + 1, len(plans))
    return sweep_rows(plans, results)


def sweep_row(plan: CompressionPlan, r: EvaluationResult) -> dict[str, Any]:
    """The sweep row of ``plan`` from its exact result ``r`` (without the Pareto flag :func:`sweep_rows` adds)."""
    return {
        "criterion": plan.criterion, "prune_ratio": plan.prune_ratio,
        "bits": BitSetting.of(plan).label,
        "granularity": plan.granularity, "scope": plan.scope, "composite": plan.composite,
        "accuracy": r.accuracy, "baseline_accuracy": r.baseline_accuracy, "sparsity": r.sparsity,
        "mean_bits": r.mean_bits, "estimated_bytes": r.size.estimated_bytes, "fp32_bytes": r.size.fp32_bytes,
        "compression_ratio": r.compression_ratio, "reduction": r.reduction, "plan": plan.to_json(indent=None),
    }


def sweep_rows(plans: Sequence[CompressionPlan], results: Sequence[EvaluationResult]) -> list[dict[str, Any]]:
    """One row per plan (``results[i]`` is the exact result of ``plans[i]``), in the order of ``plans``, each with
    a ``pareto`` flag among the rows of its criterion."""
    rows = [sweep_row(p, r) for p, r in zip(plans, results, strict=True)]
    for crit in set(row["criterion"] for row in rows):
        idx = [i for i, row in enumerate(rows) if row["criterion"] == crit]
        flags = pareto_flags([rows[i]["estimated_bytes"] for i in idx], [rows[i]["accuracy"] for i in idx])
        for i, f in zip(idx, flags):
            rows[i]["pareto"] = f
    return rows


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of sweep rows."""
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def smallest_within(rows: list[dict[str, Any]], max_drop: float = 0.01) -> dict[str, Any] | None:
    """The row with the fewest bytes whose accuracy is at most ``max_drop`` below the baseline."""
    ok = [r for r in rows if r["accuracy"] >= r["baseline_accuracy"] - max_drop - 1e-12]
    return min(ok, key=lambda r: r["estimated_bytes"]) if ok else None
