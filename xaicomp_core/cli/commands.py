"""The ``info``, ``compress``, ``sweep`` and ``bench`` subcommands of the ``xaicomp`` command line."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from xaicomp_core.cli.common import (
    CommandOutputs,
    add_device_args,
    add_model_args,
    add_plan_args,
    device_from_args,
    fmt_bytes,
    plan_and_session,
    plan_from_args,
    positive_int,
    print_json,
    progress_printer,
    session_from_args,
)
from xaicomp_core.errors import XaicompError


# ----------------------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Built-in models and data sets."""
    from xaicomp_core.io.data import BUILTIN_DATASETS, DATA_DIR
    from xaicomp_core.io.models import BUILTIN_MODELS, DEFAULT_MODEL, TORCHVISION_ARCHS, builtin_card
    from xaicomp_core.plan import CRITERIA
    from xaicomp_core.relevance.lrp import COMPOSITES

    models = []
    for name, spec in BUILTIN_MODELS.items():
        try:
            card = builtin_card(name)
        except XaicompError:
            card = {}
        models.append({
            "name": name, "default": name == DEFAULT_MODEL, "description": spec.description,
            "parameters": card.get("parameters"), "fp32_bytes": card.get("fp32_bytes"),
            "test_accuracy": card.get("test_accuracy"), "eval_accuracy": card.get("eval_accuracy"),
            "target_accuracy": spec.target_accuracy, "training_command": card.get("training", {}).get("command"),
            "training_seconds": card.get("training", {}).get("seconds"),
        })
    datasets = []
    for name, splits in BUILTIN_DATASETS.items():
        rows = {}
        for split, (fname, desc) in splits.items():
            path = DATA_DIR / fname
            rows[split] = {"file": f"assets/data/{fname}", "description": desc,
                           "bytes": path.stat().st_size if path.exists() else None}
        datasets.append({"name": name, "splits": rows, "classes": 10, "image_shape": [28, 28, 1]})
    out = {"models": models, "datasets": datasets, "composites": dict(COMPOSITES),
           "criteria": {k: v[0] for k, v in CRITERIA.items()}, "torchvision_architectures": TORCHVISION_ARCHS}
    if args.json:
        print_json(out)
        return 0
    print("Built-in models:")
    for m in models:
        acc = f"{m['test_accuracy']:.2%} test / {m['eval_accuracy']:.2%} eval" if m["test_accuracy"] else "not trained"
        print(f"  {m['name']:15s} {m['parameters'] or 0:>9,} params  {acc}  {m['description']}")
    print("Built-in data sets:")
    for d in datasets:
        for split, row in d["splits"].items():
            print(f"  {d['name']}/{split:10s} {row['description']}")
    print("Composites: " + ", ".join(COMPOSITES))
    print("Criteria:   " + ", ".join(CRITERIA))
    print("torchvision architectures: " + ", ".join(TORCHVISION_ARCHS) + " (pretrained weights need a download)")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Evaluate one plan."""
    outputs = CommandOutputs(args)  # --save-plan, checked before any work
    plan, session = plan_and_session(args, args.json)
    result = session.evaluate(plan)
    outputs.commit(plan)
    d = result.to_dict(tensors=args.tensors)
    d["model"] = session.info.name
    d["data"] = args.data
    d["reference_samples"] = len(session.x_ref)
    if args.json:
        print_json(d)
        return 0
    s = result.size
    print(f"model      {session.info.name}   data {args.data} ({result.images} images)")
    print(f"plan       {plan.describe()}")
    print(f"accuracy   {result.accuracy:.2%}  (baseline {result.baseline_accuracy:.2%}, "
          f"change {result.accuracy_change * 100:+.2f} points)")
    print(f"sparsity   {result.sparsity:.2%} of prunable weights   mean bits {result.mean_bits:.2f}")
    print(f"size       {fmt_bytes(s.estimated_bytes)} packed vs {fmt_bytes(s.fp32_bytes)} fp32  "
          f"-> {s.compression_ratio:.2f}x, {s.reduction:.1%} smaller")
    sec = s.section_totals()
    print("           " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sec.items()))
    print(f"{'layer':24s} {'shape':>18s} {'sparsity':>9s} {'bits':>6s} {'bytes':>10s}  keep / values encoding")
    for layer in result.layers:
        print(f"{layer.name:24s} {str(tuple(layer.shape)):>18s} {layer.sparsity:>9.1%} {layer.mean_bits:>6.2f} "
              f"{layer.bytes:>10,d}  {layer.encoding}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Pareto sweep."""
    from xaicomp_core.evaluate.sweep import DEFAULT_RATIOS, BitSetting, rows_to_csv, run_sweep

    outputs = CommandOutputs(args, {"-o": args.output})  # checked before any work
    base = plan_from_args(args)
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    try:
        ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else DEFAULT_RATIOS
    except ValueError:
        raise XaicompError(f"cannot parse --ratios {args.ratios!r}; use e.g. 0,0.5,0.9") from None
    bits = [BitSetting.parse(b) for b in (args.bit_settings or ["fp32"])]
    if args.ray is not None:
        from xaicomp_core.evaluate.distributed import require_ray

        require_ray(args.ray or None)  # without ray or with an unreachable address: one line, before any work
    session = session_from_args(args, progress_printer("relevance", True))
    session.composite = base.composite
    if args.ray is None:
        rows = run_sweep(session, criteria, ratios, bits, base, progress_printer("plans", True))
    else:
        from xaicomp_core.evaluate.distributed import run_sweep_ray

        rows = run_sweep_ray(session, criteria, ratios, bits, base, progress_printer("plans", True),
                             address=args.ray or None, threads=args.threads or 1, device=args.device)
    if args.output:
        out = pathlib.Path(args.output)
        outputs.add("-o", json.dumps(rows, indent=2) if out.suffix.lower() == ".json" else rows_to_csv(rows))
    outputs.commit(base)
    if args.json:
        print_json({"model": session.info.name, "rows": rows})
        return 0
    if not args.output:
        print(rows_to_csv(rows), end="")
    else:
        print(f"wrote {len(rows)} rows to {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Performance ratios."""
    from xaicomp_core.bench import run_bench

    device = device_from_args(args)
    res = run_bench(args.model or "fashion-vgg", repeats=args.repeats, threads=args.threads or 2,
                    batch=args.batch, composite=args.composite or "epsilon", device=device,
                    memory_budget_mb=args.memory_budget)
    if args.json:
        print_json(res)
        return 0
    for k, v in res.items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add the ``info``, ``compress``, ``sweep`` and ``bench`` subcommands to the ``xaicomp`` parser."""
    p = subparsers.add_parser("info", help="built-in models and data sets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("compress", help="evaluate one plan: accuracy, sizes, sparsity")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("--tensors", action="store_true", help="include per-tensor size rows in --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = subparsers.add_parser("sweep", help="sweep criteria x prune ratios x bit settings -> CSV/JSON")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("--criteria", default="lrp,magnitude,random", help="comma-separated criteria")
    p.add_argument("--ratios", default=None, help="comma-separated prune ratios (default 0,0.1,...,0.9,0.95)")
    p.add_argument("--bit-settings", nargs="*", default=None,
                   help="bit settings such as fp32 8 4 8,4,2:0.2,0.5 (default fp32)")
    p.add_argument("-o", "--output", default=None, help="write CSV (or .json) here")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="evaluate the plans on Ray workers: on the cluster at ADDRESS (e.g. HEAD:6379), or on a "
                        "local instance sized to this machine without ADDRESS; --threads is then per worker task "
                        "(needs pip install 'xaicomp[ray]')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("bench", help="performance ratios (update_ratio, relevance_ratio)")
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--batch", type=positive_int, default=250)
    p.add_argument("--composite", default=None)
    add_device_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
