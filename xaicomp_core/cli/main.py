"""The ``xaicomp`` command line (also ``python -m xaicomp_core``). Every command has ``--json``.

Errors caused by input (files, plans, names) print one line on stderr and exit with status 2; set
``XAICOMP_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from xaicomp_core.errors import PlanError, XaicompError

CLI_COMMANDS = ("info", "compress", "sweep", "bench", "export", "verify", "report")
MODEL_DEFAULTS = {"data": "fashion-mnist", "reference_samples": 1000, "target": "true", "epsilon": 1e-6}


# ----------------------------------------------------------------------------------------------------------------
# shared options
# ----------------------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options choosing the model and the data."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="built-in model (fashion-vgg, fashion-lenet, fashion-resnet); "
                                                 "default fashion-vgg")
    g.add_argument("--arch", default=None, help="architecture for --weights (built-in or torchvision name)")
    g.add_argument("--weights", default=None, help=".safetensors / .pt / .pth state dict for --arch")
    g.add_argument("--random-weights", action="store_true", help="allow random weights for a torchvision --arch "
                                                                 "when pretrained ones cannot be downloaded")
    g.add_argument("--data", default=MODEL_DEFAULTS["data"],
                   help="evaluation data: 'fashion-mnist' (shipped), an ImageFolder directory or .zip, or "
                        "torchvision:NAME:ROOT (mnist, fashion-mnist, cifar10 already on disk)")
    g.add_argument("--reference-data", default=None, help="reference data for relevance (same forms as --data; "
                                                          "default: the shipped reference split or --data)")
    g.add_argument("--train-data", default=None, help="fine-tuning data (same forms as --data; default: the shipped "
                                                      "training split for fashion-mnist)")
    g.add_argument("--reference-samples", type=int, default=MODEL_DEFAULTS["reference_samples"],
                   help="reference samples for relevance")
    g.add_argument("--eval-samples", type=int, default=None, help="use only this many evaluation samples")
    g.add_argument("--target", choices=("true", "predicted"), default=MODEL_DEFAULTS["target"],
                   help="class whose relevance starts LRP")
    g.add_argument("--epsilon", type=float, default=MODEL_DEFAULTS["epsilon"], help="epsilon of the epsilon rule")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """Options describing a compression plan."""
    g = p.add_argument_group("plan")
    g.add_argument("--plan", default=None, help="plan JSON file (other plan options override its fields)")
    g.add_argument("--criterion", default=None, help="paper, lrp, lrp-signed, lrp-zero, magnitude, random, lrp-filter")
    g.add_argument("--prune", type=float, default=None, help="prune ratio in [0, 1)")
    g.add_argument("--bits", default=None, help="bit levels, descending, e.g. 8,4,2 (32 or fp32 keeps fp32)")
    g.add_argument("--split", default=None, help="fractions of kept weights for all levels but the last, e.g. 0.2,0.5")
    g.add_argument("--scope", default=None, choices=("global", "per-layer"))
    g.add_argument("--granularity", default=None, choices=("weight", "channel", "layer"))
    g.add_argument("--bit-ranking", default=None, choices=("criterion", "relevance", "magnitude"))
    g.add_argument("--protect", default=None, choices=("none", "first-last"))
    g.add_argument("--quantizer", default=None, choices=("mse", "absmax"))
    g.add_argument("--composite", default=None,
                   help="LRP composite: epsilon, epsilon-plus, alpha2beta1, epsilon-gamma, epsilon-gamma-box")
    g.add_argument("--seed", type=int, default=None, help="seed of the random criterion and of fine-tuning")
    g.add_argument("--finetune-epochs", type=int, default=None,
                   help="recovery fine-tuning epochs after compression (masks fixed, quantization in the loop)")
    g.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default 0.01)")
    g.add_argument("--save-plan", default=None, help="write the plan as JSON to this file")


def plan_from_args(args: argparse.Namespace):
    """Build and validate the plan from ``--plan`` and the plan options."""
    from xaicomp_core.evaluate.sweep import parse_bits
    from xaicomp_core.plan import CompressionPlan

    if args.plan:
        path = pathlib.Path(args.plan)
        if not path.exists():
            raise PlanError(f"plan file {path} does not exist")
        plan = CompressionPlan.from_json(path.read_text())
    else:
        plan = CompressionPlan()
    changes: dict[str, Any] = {}
    if args.criterion is not None:
        changes["criterion"] = args.criterion
    if args.prune is not None:
        changes["prune_ratio"] = args.prune
    if args.bits is not None:
        try:
            changes["bit_levels"] = parse_bits(args.bits)
        except ValueError:
            raise PlanError(f"cannot parse --bits {args.bits!r}; use e.g. 8,4,2") from None
        if args.split is None and len(changes["bit_levels"]) != len(plan.bit_levels):
            n = len(changes["bit_levels"])
            changes["bit_split"] = [round(1.0 / n, 6)] * (n - 1)
    if args.split is not None:
        try:
            changes["bit_split"] = [float(v) for v in args.split.split(",") if v.strip()]
        except ValueError:
            raise PlanError(f"cannot parse --split {args.split!r}; use e.g. 0.2,0.5") from None
    for attr, field_name in (("scope", "scope"), ("granularity", "granularity"), ("bit_ranking", "bit_ranking"),
                             ("protect", "protect"), ("quantizer", "quantizer"), ("composite", "composite"),
                             ("seed", "seed"), ("finetune_epochs", "finetune_epochs"),
                             ("finetune_lr", "finetune_lr")):
        if getattr(args, attr, None) is not None:
            changes[field_name] = getattr(args, attr)
    plan = plan.replace(**changes).validate()
    if getattr(args, "save_plan", None):
        pathlib.Path(args.save_plan).write_text(plan.to_json() + "\n")
    return plan


def _load_data(spec: str, info, split: str):
    """Data for ``split`` from a ``--data`` spec, prepared for the model described by ``info`` (a ModelInfo)."""
    from xaicomp_core.io.data import load_builtin_dataset, load_image_folder, load_torchvision_folder

    if spec in ("fashion-mnist",):
        return load_builtin_dataset(spec, split)
    if spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise XaicompError("use --data torchvision:NAME:ROOT, e.g. torchvision:fashion-mnist:/data")
        return load_torchvision_folder(parts[2], parts[1], train=(split != "eval"))
    pre = info.preprocessing
    return load_image_folder(spec, image_size=pre.input_size, channels=pre.channels, class_names=info.class_names)


def model_from_args(args: argparse.Namespace):
    """Load the model chosen by the options."""
    from xaicomp_core.io.models import DEFAULT_MODEL, load_model

    if args.weights and not args.arch:
        raise XaicompError("--weights needs --arch (the architecture the weights belong to)")
    if args.model and args.arch:
        raise XaicompError("give either --model or --arch/--weights, not both")
    arch = args.arch or args.model or DEFAULT_MODEL
    return load_model(arch, weights=args.weights, allow_random=args.random_weights)


def _split_data(path: str | None, data: str, info, split: str, fallback):
    """The data for ``split``: ``path`` if given, else that split of the built-in set, else ``fallback``."""
    if path:
        return _load_data(path, info, split)
    if data == "fashion-mnist":
        return _load_data("fashion-mnist", info, split)
    return fallback


def eval_subset(data, n: int | None):
    """``n`` evaluation samples (``--eval-samples``): a class-balanced subset where the data set supports it."""
    if n is None:
        return data
    if n < 1:
        raise XaicompError("--eval-samples must be at least 1")
    return data.balanced_subset(n) if hasattr(data, "balanced_subset") else data


def session_from_args(args: argparse.Namespace, progress=None):
    """Model, data and a :class:`CompressionSession` from the options."""
    import torch

    from xaicomp_core.evaluate.session import CompressionSession
    from xaicomp_core.io.models import model_info

    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_from_args(args)
    info = model_info(model)
    eval_data = _load_data(args.data, info, "eval")
    ref = _split_data(args.reference_data, args.data, info, "reference", fallback=eval_data)
    eval_data = eval_subset(eval_data, args.eval_samples)
    if hasattr(ref, "balanced_subset") and args.reference_samples:
        ref = ref.balanced_subset(args.reference_samples)
    train = _split_data(args.train_data, args.data, info, "train", fallback=None)
    composite = getattr(args, "composite", None) or "epsilon"
    session = CompressionSession(model, ref, eval_data, composite=composite, epsilon=args.epsilon,
                                 target=args.target, reference_samples=args.reference_samples, progress=progress,
                                 train_data=train)
    session.finetune_progress = _progress_printer("fine-tuning", progress is not None)
    return session


def _progress_printer(label: str, enabled: bool):
    if not enabled:
        return None
    state = {"t": 0.0, "t0": time.time()}

    def progress(done: int, total: int) -> None:
        now = time.time()
        if done == total or now - state["t"] > 0.5:
            state["t"] = now
            eta = f", about {(now - state['t0']) / done * (total - done):.0f} s left" if 0 < done < total else ""
            sys.stderr.write(f"\r{label}: {done}/{total}{eta}   ")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return progress


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------------------------------------------
# commands
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
    out = {"models": models, "datasets": datasets, "composites": COMPOSITES,
           "criteria": {k: v[0] for k, v in CRITERIA.items()}, "torchvision_architectures": TORCHVISION_ARCHS}
    if args.json:
        _print_json(out)
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


def plan_and_session(args: argparse.Namespace, quiet: bool):
    """The plan and the session from the options (the session's composite set to the plan's)."""
    plan = plan_from_args(args)
    session = session_from_args(args, _progress_printer("relevance", not quiet))
    if plan.composite != session.composite:
        session.composite = plan.composite
    return plan, session


def cmd_compress(args: argparse.Namespace) -> int:
    """Evaluate one plan."""
    plan, session = plan_and_session(args, args.json)
    result = session.evaluate(plan)
    d = result.to_dict(tensors=args.tensors)
    d["model"] = session.info.name
    d["data"] = args.data
    d["reference_samples"] = len(session.x_ref)
    if args.json:
        _print_json(d)
        return 0
    s = result.size
    print(f"model      {session.info.name}   data {args.data} ({result.images} images)")
    print(f"plan       {plan.describe()}")
    print(f"accuracy   {result.accuracy:.2%}  (baseline {result.baseline_accuracy:.2%}, "
          f"change {result.accuracy_change * 100:+.2f} points)")
    print(f"sparsity   {result.sparsity:.2%} of prunable weights   mean bits {result.mean_bits:.2f}")
    print(f"size       {_fmt_bytes(s.estimated_bytes)} packed vs {_fmt_bytes(s.fp32_bytes)} fp32  "
          f"-> {s.compression_ratio:.2f}x, {s.reduction:.1%} smaller")
    sec = s.section_totals()
    print("           " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sec.items()))
    print(f"{'layer':24s} {'shape':>18s} {'sparsity':>9s} {'bits':>6s} {'bytes':>10s}  keep-encoding")
    for layer in result.layers:
        print(f"{layer.name:24s} {str(tuple(layer.shape)):>18s} {layer.sparsity:>9.1%} {layer.mean_bits:>6.2f} "
              f"{layer.bytes:>10,d}  {layer.keep_encoding}{' (protected)' if layer.protected else ''}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Pareto sweep."""
    from xaicomp_core.evaluate.sweep import DEFAULT_RATIOS, BitSetting, rows_to_csv, run_sweep

    base = plan_from_args(args)
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else DEFAULT_RATIOS
    bits = [BitSetting.parse(b) for b in (args.bit_settings or ["fp32"])]
    session = session_from_args(args, _progress_printer("relevance", True))
    session.composite = base.composite
    rows = run_sweep(session, criteria, ratios, bits, base, _progress_printer("plans", True))
    if args.output:
        out = pathlib.Path(args.output)
        if out.suffix.lower() == ".json":
            out.write_text(json.dumps(rows, indent=2))
        else:
            out.write_text(rows_to_csv(rows))
    if args.json:
        _print_json({"model": session.info.name, "rows": rows})
        return 0
    if not args.output:
        print(rows_to_csv(rows), end="")
    else:
        print(f"wrote {len(rows)} rows to {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Performance ratios."""
    from xaicomp_core.bench import run_bench

    res = run_bench(args.model or "fashion-vgg", repeats=args.repeats, threads=args.threads or 2,
                    batch=args.batch, composite=args.composite or "epsilon")
    if args.json:
        _print_json(res)
        return 0
    for k, v in res.items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    ap = argparse.ArgumentParser(prog="xaicomp", description="Compress image classifiers with LRP relevance.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="built-in models and data sets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compress", help="evaluate one plan: accuracy, sizes, sparsity")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("--tensors", action="store_true", help="include per-tensor size rows in --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("sweep", help="sweep criteria x prune ratios x bit settings -> CSV/JSON")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("--criteria", default="lrp,magnitude,random", help="comma-separated criteria")
    p.add_argument("--ratios", default=None, help="comma-separated prune ratios (default 0,0.1,...,0.9,0.95)")
    p.add_argument("--bit-settings", nargs="*", default=None,
                   help="bit settings such as fp32 8 4 8,4,2:0.2,0.5 (default fp32)")
    p.add_argument("-o", "--output", default=None, help="write CSV (or .json) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="performance ratios (update_ratio, relevance_ratio)")
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--composite", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    try:
        from xaicomp_core.cli import export_cmds

        export_cmds.register(sub)
    except ImportError:
        pass
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaicomp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except XaicompError as e:
        sys.stderr.write(f"xaicomp: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("xaicomp: interrupted\n")
        return 130
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        if os.environ.get("XAICOMP_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(f"xaicomp: error: {e.__class__.__name__}: {msg[:300]}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
