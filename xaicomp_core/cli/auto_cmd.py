"""The ``auto`` subcommand: the smallest plan within an accuracy budget (:mod:`xaicomp_core.evaluate.auto`), found
with relevance and, side by side, with magnitude."""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

from xaicomp_core.cli.common import (
    add_model_args,
    fmt_bytes,
    print_json,
    progress_printer,
    read_plan_text,
    session_from_args,
)
from xaicomp_core.errors import XaicompError
from xaicomp_core.evaluate.auto import AUTO_FINETUNE_BATCH, AUTO_FINETUNE_LR


def cmd_auto(args: argparse.Namespace) -> int:
    """Search the smallest plan within ``--max-drop`` points, once per signal."""
    from xaicomp_core.evaluate.auto import BITS, DEFAULT_BUDGET, SIGNALS, SPARSITIES, auto_compare, compare_summary

    if not (math.isfinite(args.max_drop) and 0 <= args.max_drop <= 100):
        raise XaicompError(f"--max-drop must be a number of points in 0..100, got {args.max_drop}")
    budget = DEFAULT_BUDGET if args.budget is None else args.budget
    if budget < 1:
        raise XaicompError(f"--budget must be at least 1 evaluation, got {budget}")
    if not 0 <= args.finetune_epochs <= 100:
        raise XaicompError(f"--finetune-epochs must be in 0..100, got {args.finetune_epochs}")
    if not 0 <= args.warm_start <= 10000:
        raise XaicompError(f"--warm-start must be 0..10000 evaluations, got {args.warm_start}")
    signals = [s.strip() for s in args.signals.split(",") if s.strip()]
    bad = [s for s in signals if s not in SIGNALS]
    if not signals or bad or len(set(signals)) != len(signals):
        raise XaicompError(f"--signals must name distinct signals among {', '.join(SIGNALS)}, got {args.signals!r}")
    try:
        sparsities = [float(v) for v in args.sparsities.split(",") if v.strip()] if args.sparsities else SPARSITIES
        bits = [int(v) for v in args.bit_widths.split(",") if v.strip()] if args.bit_widths else BITS
    except ValueError:
        raise XaicompError("--sparsities and --bit-widths are comma-separated numbers, e.g. 0,0.5,0.9 and 8,4,2"
                           ) from None
    if not sparsities or any(not (0 <= v < 1) for v in sparsities):
        raise XaicompError(f"--sparsities must lie in [0, 1), got {args.sparsities!r}")
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise XaicompError(f"--bit-widths must be integers 1-8, got {args.bit_widths!r}")
    mix = None
    if args.mix:
        parts = [v.strip() for v in args.mix.split(",")]
        try:
            mix = (int(parts[0]), int(parts[1]), float(parts[2])) if len(parts) == 3 else None
        except ValueError:
            mix = None
        if mix is None or not (8 >= mix[0] > mix[1] >= 1 and 0 < mix[2] < 1):
            raise XaicompError(f"--mix must be MORE,FEWER,SHARE with 8 >= MORE > FEWER >= 1 and 0 < SHARE < 1, e.g. "
                               f"3,2,0.5; got {args.mix!r}")
    probes = 3 if args.probes is None else args.probes
    if not 0 <= probes <= 5:
        raise XaicompError(f"--probes must be in 0..5, got {probes}")
    if args.save_plan:
        out = pathlib.Path(args.save_plan)
        if out.is_dir() or not out.parent.exists():
            raise XaicompError(f"cannot write the plan to {out}: not a file in an existing folder")
    start = None
    if args.start_plan:
        from xaicomp_core.plan import CompressionPlan

        start = CompressionPlan.from_json(read_plan_text(args.start_plan))
    session = session_from_args(args, progress_printer("relevance", not args.json))
    if args.composite:
        session.composite = args.composite
    if args.finetune_epochs and not session.can_finetune:
        raise XaicompError("--finetune-epochs needs fine-tuning data (--train-data, or built-in data)")
    results = auto_compare(session, args.max_drop, signals=signals, budget=budget,
                           finetune_epochs=args.finetune_epochs, sparsities=sparsities, bits=bits, probes=probes,
                           mix=mix, fold_norm=args.fold_norm, finetune_batch=args.finetune_batch,
                           finetune_lr=args.finetune_lr,
                           progress=progress_printer("evaluations", not args.json),
                           start=dict.fromkeys(signals, start) if start is not None else None,
                           warm_start=args.warm_start)
    primary = results[signals[0]]
    if args.save_plan:
        pathlib.Path(args.save_plan).write_text(primary.plan.to_json() + "\n")
    summary = compare_summary(results)
    d: dict[str, Any] = {
        "model": session.info.name, "data": args.data, "max_drop_points": args.max_drop, "budget": budget,
        "finetune_epochs": args.finetune_epochs, "finetune_batch": args.finetune_batch,
        "finetune_lr": args.finetune_lr, "search_images": len(session.y_ref),
        "evaluation_images": len(session.y_eval), "sparsities": sorted(set(sparsities)),
        "bits": sorted(set(bits), reverse=True),
        "probes": probes, "mix": list(mix) if mix else None, "fold_norm": args.fold_norm,
        "start_plan": args.start_plan,
        "warm_start": args.warm_start if args.finetune_epochs else 0,
        "primary": signals[0], "saved_plan": args.save_plan, "comparison": summary,
        "results": {k: r.to_dict() for k, r in results.items()},
    }
    if args.json:
        print_json(d)
        return 0
    print(f"model      {session.info.name}   search on {len(session.y_ref)} reference images, reported on "
          f"{len(session.y_eval)} evaluation images   budget {budget} evaluations per signal")
    print(f"{'signal':10s} {'ratio':>7s} {'size':>10s} {'search drop':>12s} {'eval drop (95 %)':>17s} {'evals':>6s}"
          "  plan")
    for k, r in results.items():
        row = summary["signals"][k]
        flag = "" if r.feasible else "  (nothing within the budget; the most accurate plan tried)"
        print(f"{k:10s} {r.compression_ratio:>6.1f}x {fmt_bytes(r.estimated_bytes):>10s} "
              f"{row['search_drop_points']:>11.2f}p {row['evaluation_drop_points']:>9.2f}p "
              f"± {r.evaluation_half_width:<4.2f}p {r.evaluations:>6d}  "
              f"{r.plan.describe()}{flag}")
    if args.save_plan:
        print(f"wrote the {signals[0]} plan to {args.save_plan} (xaicomp compress --plan {args.save_plan})")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``auto`` subcommand to the ``xaicomp`` parser."""
    p = subparsers.add_parser("auto", help="search the smallest plan within an accuracy budget (per-layer "
                                           "sparsity and bits), with relevance and with magnitude")
    add_model_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy budget in points below the original model, on the search (reference) images")
    g.add_argument("--budget", type=int, default=None, help="evaluations on the search images per signal "
                                                           "(default 80; at most half of them calibrate)")
    g.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune every evaluated plan this many epochs (slow: one fine-tuning per evaluation)")
    g.add_argument("--finetune-batch", type=int, default=AUTO_FINETUNE_BATCH,
                   help=f"fine-tuning batch size written into the plans (default {AUTO_FINETUNE_BATCH})")
    g.add_argument("--finetune-lr", type=float, default=AUTO_FINETUNE_LR,
                   help=f"fine-tuning learning rate written into the plans (default {AUTO_FINETUNE_LR})")
    g.add_argument("--warm-start", type=int, default=0, metavar="N",
                   help="with --finetune-epochs: first search each signal without fine-tuning (N evaluations, "
                        "cheap) and start the fine-tuned search from its plan, so fine-tuning never ends larger "
                        "(default 0: off)")
    g.add_argument("--signals", default="hybrid,magnitude",
                   help="signals to search with, side by side; the first one's plan is saved. hybrid: relevance "
                        "allocates, |w| prunes inside a layer; relevance: |R|·|w| inside too; magnitude: no "
                        "relevance at all (default hybrid,magnitude)")
    g.add_argument("--sparsities", default=None, help="per-layer prune ratios to choose from (default "
                                                      "0,0.1,...,0.98)")
    g.add_argument("--bit-widths", default=None, help="per-layer bit widths to choose from (default "
                                                      "8,7,6,5,4,3,2)")
    g.add_argument("--probes", type=int, default=None,
                   help="calibration probes per layer (0-5, default 3; 0: allocate by the signal alone)")
    g.add_argument("--mix", default=None, metavar="MORE,FEWER,SHARE",
                   help="one more per-layer bit setting: SHARE of a layer's output channels at MORE bits, the rest "
                        "at FEWER, channels ranked by the signal (relevance for relevance/hybrid), e.g. 3,2,0.5")
    g.add_argument("--fold-norm", default=True, action=argparse.BooleanOptionalAction,
                   help="plans store every BatchNorm as one scale and shift per channel (8 instead of 16 bytes per "
                        "channel; outputs change by float32 rounding only, and every plan is measured that way; "
                        "default on)")
    g.add_argument("--start-plan", default=None, metavar="PLAN.json",
                   help="start the greedy steps from this plan (per-layer settings on the grid, e.g. a --save-plan of "
                        "the search without fine-tuning) when it is within the budget, instead of the bisection")
    g.add_argument("--composite", default=None, help="LRP composite of the relevance signal (default epsilon)")
    g.add_argument("--save-plan", default=None, help="write the first signal's plan as JSON to this file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_auto)
