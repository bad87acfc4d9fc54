"""What the ``xaicomp`` subcommands share: the model/data and plan options, the sources and plan they describe, the
session built from them, progress printers and formatters. Imports no command module."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

from xaicomp_core.errors import PlanError, XaicompError
from xaicomp_core.evaluate.session import CompressionSession
from xaicomp_core.io.models import DEFAULT_MODEL, model_info
from xaicomp_core.io.onnx_import import (
    InputSpec,
    input_statement,
    is_onnx_name,
    parse_class_names,
    parse_floats,
    parse_size,
)
from xaicomp_core.io.sources import (
    DEFAULT_DATA,
    DEFAULT_EPSILON,
    DEFAULT_REFERENCE_SAMPLES,
    DEFAULT_TARGET,
    DataSource,
    ModelSource,
    Sources,
)
from xaicomp_core.plan import CompressionPlan

MODEL_DEFAULTS = {"data": DEFAULT_DATA, "reference_samples": DEFAULT_REFERENCE_SAMPLES, "target": DEFAULT_TARGET,
                  "epsilon": DEFAULT_EPSILON}
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------------
# shared options
# ----------------------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options choosing the model and the data."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="built-in model (fashion-vgg, fashion-lenet, fashion-resnet; "
                                                 "default fashion-vgg) or an ONNX file (model.onnx)")
    g.add_argument("--model-py", default=None, metavar="FILE.py:FACTORY",
                   help="your own architecture: FACTORY() in FILE.py returns the nn.Module (runs that file: only "
                        "for code you trust); weights from --weights")
    g.add_argument("--arch", default=None, help="architecture for --weights (built-in or torchvision name)")
    g.add_argument("--weights", default=None, help=".safetensors / .pt / .pth state dict for --arch or --model-py")
    g.add_argument("--pretrained", action="store_true",
                   help="a torchvision --arch with its pretrained weights from the local torch hub cache "
                        "($TORCH_HOME/hub/checkpoints; never downloaded)")
    g.add_argument("--input-size", default=None, metavar="H,W",
                   help="ONNX / --model-py: input size images are resized to (default: the ONNX graph's)")
    g.add_argument("--pixel-range", choices=("0-1", "0-255"), default=None,
                   help="ONNX / --model-py: pixels scaled to [0, 1] (default) or kept in [0, 255]")
    g.add_argument("--mean", default=None, help="ONNX / --model-py: per-channel mean, e.g. 0.485,0.456,0.406 "
                                                "(default none)")
    g.add_argument("--std", default=None, help="ONNX / --model-py: per-channel std (default none)")
    g.add_argument("--class-names", default=None,
                   help="ONNX / --model-py: class names, comma-separated or a .txt/.json file (default 0..K-1)")
    g.add_argument("--random-weights", action="store_true", help="allow random weights for a torchvision --arch "
                                                                 "when pretrained ones cannot be downloaded")
    g.add_argument("--no-download", action="store_true",
                   help="never download pretrained weights: a torchvision --arch with --random-weights is then a "
                        "randomly initialised 10-class model (what the app offers)")
    g.add_argument("--data", default=MODEL_DEFAULTS["data"],
                   help="evaluation data: 'fashion-mnist' (shipped), an ImageFolder directory or .zip, or "
                        "torchvision:NAME:ROOT (mnist, fashion-mnist, cifar10 already on disk); an ImageFolder is "
                        "split into disjoint reference and evaluation halves, a torchvision folder gives reference "
                        "and fine-tuning images from its training split")
    g.add_argument("--reference-data", default=None, help="reference data for relevance (same forms as --data; "
                                                          "default: the reference split of --data)")
    g.add_argument("--train-data", default=None, help="fine-tuning data (same forms as --data; default: the "
                                                      "training split of --data, none for an ImageFolder)")
    g.add_argument("--reference-samples", type=int, default=MODEL_DEFAULTS["reference_samples"],
                   help="reference samples for relevance")
    g.add_argument("--eval-samples", type=int, default=None, help="use only this many evaluation samples")
    g.add_argument("--target", choices=("true", "predicted"), default=MODEL_DEFAULTS["target"],
                   help="class whose relevance starts LRP")
    g.add_argument("--epsilon", type=finite_float, default=MODEL_DEFAULTS["epsilon"],
                   help="epsilon of the epsilon rule")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_device_args(g)


def add_device_args(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device`` and ``--memory-budget``: where relevance, evaluation, fine-tuning and export compute, and how
    much memory one batch may take."""
    from xaicomp_core.device import CUDA_FREE_SHARE, DEFAULT_MEMORY_BUDGET_MB, DEVICES

    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="where relevance, evaluation and fine-tuning run: auto (a CUDA GPU if torch sees one, else "
                        "the CPU), cpu or cuda (default auto)")
    g.add_argument("--memory-budget", type=positive_float, default=None, metavar="MB",
                   help="memory one relevance or evaluation batch may take, in MB: batches shrink to fit (default "
                        f"{DEFAULT_MEMORY_BUDGET_MB:.0f} on the CPU, {100 * CUDA_FREE_SHARE:.0f}%% of the free GPU "
                        "memory on CUDA)")


def device_from_args(args: argparse.Namespace) -> Any:
    """The :class:`torch.device` of ``--device`` (one readable error line for ``cuda`` without a GPU)."""
    from xaicomp_core.device import resolve_device

    return resolve_device(getattr(args, "device", None) or "auto", "--device")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """Options describing a compression plan."""
    # choices come from the registries (plugins included); names are checked by the plan, so an unknown one is one
    # readable line naming the choices
    from xaicomp_core.plan import (
        BIT_RANKINGS,
        COMPOSITE_REGISTRY,
        CRITERION_REGISTRY,
        GRANULARITIES,
        PROTECT,
        QUANTIZER_REGISTRY,
        SCOPES,
    )

    g = p.add_argument_group("plan")
    g.add_argument("--plan", default=None, help="plan JSON file (other plan options override its fields)")
    g.add_argument("--criterion", default=None, help=", ".join(CRITERION_REGISTRY.names()))
    g.add_argument("--prune", type=float, default=None, help="prune ratio in [0, 1)")
    g.add_argument("--bits", default=None, help="bit levels, descending, e.g. 8,4,2 (32 or fp32 keeps fp32)")
    g.add_argument("--split", default=None, help="fractions of kept weights for all levels but the last, e.g. 0.2,0.5")
    g.add_argument("--scope", default=None, choices=SCOPES)
    g.add_argument("--granularity", default=None, choices=GRANULARITIES)
    g.add_argument("--bit-ranking", default=None, choices=BIT_RANKINGS)
    g.add_argument("--protect", default=None, choices=PROTECT)
    g.add_argument("--quantizer", default=None, help=", ".join(QUANTIZER_REGISTRY.names()))
    g.add_argument("--composite", default=None, help="LRP composite: " + ", ".join(COMPOSITE_REGISTRY.names()))
    g.add_argument("--seed", type=int, default=None, help="seed of the random criterion and of fine-tuning")
    g.add_argument("--finetune-epochs", type=int, default=None,
                   help="recovery fine-tuning epochs after compression (masks fixed, quantization in the loop)")
    g.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default 0.01)")
    g.add_argument("--finetune-batch", type=int, default=None, help="fine-tuning batch size (default 128)")
    g.add_argument("--layer-prune", default=None, metavar="LAYER=RATIO,...",
                   help="per-layer prune ratios, e.g. features.0=0.3,classifier.1=0.95 (other layers: --prune)")
    g.add_argument("--layer-bits", default=None, metavar="LAYER=BITS,...",
                   help="per-layer bit widths, each one of --bits, e.g. features.0=8,classifier.1=2")
    g.add_argument("--fold-norm", default=None, action=argparse.BooleanOptionalAction,
                   help="store every BatchNorm as one scale and shift per channel (8 instead of 16 bytes; outputs "
                        "change by float32 rounding only)")
    g.add_argument("--save-plan", default=None, help="write the plan as JSON to this file")


# ----------------------------------------------------------------------------------------------------------------
# plan, sources and session from the options
# ----------------------------------------------------------------------------------------------------------------
def plan_from_args(args: argparse.Namespace) -> CompressionPlan:
    """Build and validate the plan from ``--plan`` and the plan options (and write ``--save-plan``)."""
    from xaicomp_core.evaluate.sweep import parse_bits

    if args.plan:
        plan = CompressionPlan.from_json(read_plan_text(args.plan))
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
                             ("finetune_lr", "finetune_lr"), ("finetune_batch", "finetune_batch"),
                             ("fold_norm", "fold_norm")):
        if getattr(args, attr, None) is not None:
            changes[field_name] = getattr(args, attr)
    for attr, field_name, cast in (("layer_prune", "layer_prune", float), ("layer_bits", "layer_bits", int)):
        if getattr(args, attr, None) is not None:
            changes[field_name] = parse_per_layer(getattr(args, attr), "--" + attr.replace("_", "-"), cast)
    return plan.replace(**changes).validate()


#: A plan file is a few hundred bytes; anything larger than this is not one.
MAX_PLAN_BYTES = 1024 * 1024


def read_plan_text(path: str | pathlib.Path) -> str:
    """The text of a ``--plan`` file: a regular file of at most :data:`MAX_PLAN_BYTES`, UTF-8 (a UTF-8 byte-order
    mark is allowed); anything else is one :class:`PlanError` line."""
    from xaicomp_core.io.safe import read_regular, show_path

    raw = read_regular(path, MAX_PLAN_BYTES, "plan file", PlanError)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PlanError(f"plan file {show_path(path)} is UTF-16 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PlanError(f"plan file {show_path(path)} is not UTF-8 text (a binary file?)") from None


# ----------------------------------------------------------------------------------------------------------------
# outputs: validated before any work, written together at the end
# ----------------------------------------------------------------------------------------------------------------
def input_files(args: argparse.Namespace) -> dict[str, str | None]:
    """The files the options read (label -> path), which no output may overwrite."""
    from xaicomp_core.io.data import BUILTIN_DATASETS

    def data_path(spec: str | None) -> str | None:
        if not spec or spec in BUILTIN_DATASETS:
            return None
        return spec.split(":", 2)[2] if spec.startswith("torchvision:") and spec.count(":") >= 2 else spec

    def existing(path: str | None) -> str | None:  # options naming a file or a name (--model fashion-vgg)
        return path if path and os.path.lexists(path) else None

    model_py = getattr(args, "model_py", None)
    return {"--model": existing(getattr(args, "model", None)),
            "--model-py": model_py.rsplit(":", 1)[0] if model_py else None,
            "--class-names": existing(getattr(args, "class_names", None)),
            "--weights": getattr(args, "weights", None), "--plan": getattr(args, "plan", None),
            "--data": data_path(getattr(args, "data", None)),
            "--reference-data": data_path(getattr(args, "reference_data", None)),
            "--train-data": data_path(getattr(args, "train_data", None))}


class CommandOutputs:
    """The output files of one command: validated when created (before any computation: folder exists and is
    writable, target not a directory, no output aliasing an input or another output), then written together by
    :meth:`commit` (all of them or none; see :mod:`xaicomp_core.io.atomic`). ``--save-plan`` is one of them.

    Parameters
    ----------
    args : argparse.Namespace
        The command's options (inputs and ``--save-plan`` are read from it).
    outputs : mapping
        Option -> path of the command's own outputs (None: not asked for).
    """

    def __init__(self, args: argparse.Namespace, outputs: dict[str, str | None] | None = None) -> None:
        from xaicomp_core.io.atomic import OutputGroup, check_outputs

        self.paths = {k: v for k, v in {**(outputs or {}),
                                         "--save-plan": getattr(args, "save_plan", None)}.items() if v}
        inputs = input_files(args)
        check_outputs(self.paths, inputs)
        self.group = OutputGroup(inputs)

    def add(self, option: str, data: bytes | str) -> None:
        """Queue the bytes (or UTF-8 text) of output ``option``."""
        self.group.add(self.paths[option], data, option)

    def commit(self, plan: CompressionPlan | None = None) -> dict[str, int]:
        """Write every queued output (and ``--save-plan`` with ``plan``); returns option -> bytes written."""
        if "--save-plan" in self.paths and plan is not None:
            self.add("--save-plan", plan.to_json() + "\n")
        return self.group.commit()


def parse_per_layer(text: str, flag: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    """``"features.0=0.3,classifier.1=0.95"`` -> ``{"features.0": 0.3, "classifier.1": 0.95}`` (empty text: {})."""
    out: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = cast(value.strip())
        except ValueError:
            raise PlanError(f"cannot parse {flag} item {item!r}; use LAYER=VALUE, e.g. classifier.1=0.9") from None
    return out


def _int_at_least(text: str, low: int) -> int:
    """An integer of at least ``low`` from option text (argparse's error on anything else)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    v = finite_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return v


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return v


def check_eval_samples(n: int | None) -> int | None:
    """``--eval-samples`` (None: all), refused below 1."""
    if n is not None and n < 1:
        raise XaicompError("--eval-samples must be at least 1")
    return n


def declared_from_args(args: argparse.Namespace) -> InputSpec | None:
    """The preprocessing and class names declared with ``--input-size``, ``--pixel-range``, ``--mean``, ``--std``
    and ``--class-names`` (None if none is given)."""
    size, rng = getattr(args, "input_size", None), getattr(args, "pixel_range", None)
    mean, std, names = (getattr(args, k, None) for k in ("mean", "std", "class_names"))
    if size is None and rng is None and mean is None and std is None and names is None:
        return None
    return InputSpec(None if size is None else parse_size(size), None if mean is None else parse_floats(mean, "--mean"),
                     None if std is None else parse_floats(std, "--std"), 255.0 if rng == "0-255" else 1.0,
                     None if names is None else parse_class_names(names), "the command line")


def model_source_from_args(args: argparse.Namespace) -> ModelSource:
    """The model the options choose: ``--model`` (built-in name or ONNX file), ``--model-py`` (+ ``--weights``),
    or ``--arch`` (+ ``--weights`` / ``--pretrained`` / ``--random-weights``)."""
    model_py = getattr(args, "model_py", None)
    declared = declared_from_args(args)
    if model_py:
        if args.model or args.arch:
            raise XaicompError("give one of --model, --model-py or --arch, not several")
        return ModelSource(model_py, weights=args.weights or None, declared=declared)
    if args.weights and not args.arch:
        raise XaicompError("--weights needs --arch or --model-py (the architecture the weights belong to)")
    if args.model and args.arch:
        raise XaicompError("give either --model or --arch/--weights, not both")
    if getattr(args, "pretrained", False) and (not args.arch or args.weights):
        raise XaicompError("--pretrained goes with a torchvision --arch (and no --weights)")
    if args.model and is_onnx_name(args.model):
        return ModelSource(args.model, declared=declared)
    if declared is not None:
        raise XaicompError("--input-size, --pixel-range, --mean, --std and --class-names are for an ONNX --model or "
                           "--model-py")
    return ModelSource(args.arch or args.model or DEFAULT_MODEL, weights=args.weights or None,
                       random_weights=args.random_weights, download=not getattr(args, "no_download", False))


def sources_from_args(args: argparse.Namespace) -> Sources:
    """The model and data sources (and relevance settings) the options describe."""
    model = model_source_from_args(args)
    data = DataSource.parse(args.data, eval_samples=check_eval_samples(args.eval_samples),
                            reference_samples=args.reference_samples,
                            reference=DataSource.parse(args.reference_data) if args.reference_data else None,
                            train=DataSource.parse(args.train_data) if getattr(args, "train_data", None) else None)
    return Sources(model, data, target=args.target, epsilon=args.epsilon)


def session_from_args(args: argparse.Namespace, progress: ProgressFn | None = None,
                      sources: Sources | None = None) -> CompressionSession:
    """The sources of the options (``sources`` if already built by :func:`sources_from_args`) loaded into a
    :class:`CompressionSession`."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_from_args(args)  # before any loading: a missing GPU is the first thing said
    sources = sources_from_args(args) if sources is None else sources
    composite = getattr(args, "composite", None) or "epsilon"
    model = sources.load_model()
    info = model_info(model)
    statement = input_statement(info)
    if statement:
        sys.stderr.write(f"xaicomp: {statement}\n")
    splits = sources.load_data(info)
    budget = _budget_line(model, info, splits, sources, composite, device)
    session = sources.session(composite=composite, progress=progress, model=model, splits=splits, device=device,
                              memory_budget_mb=getattr(args, "memory_budget", None))
    session.finetune_progress = progress_printer("fine-tuning", progress is not None)
    if budget.forward_s * len(splits.reference) < 5.0:
        _whole_data_line(session, splits, sources)
    return session


def _whole_data_line(session: CompressionSession, splits: Any, sources: Sources) -> None:
    """For an ImageFolder split into reference and evaluation halves: the original model's accuracy on both halves
    together as well (what a tool that runs the model over the whole folder reports)."""
    from xaicomp_core.evaluate.session import forward_logits
    from xaicomp_core.io.data import as_tensors

    data = sources.data
    if data.kind != "images" or data.reference is not None:
        return
    info = session.info
    x, y = as_tensors(splits.reference, info.preprocessing, info.num_classes, "reference data")
    correct = int((forward_logits(session.model, x).argmax(1) == y).sum()) + int(session.baseline_correct)
    n_ref, n_ev = len(y), len(session.y_eval)
    whole = data.eval_samples is None and (data.reference_samples is None or n_ref < data.reference_samples)
    where = f"all {n_ref + n_ev} images of {data.name}" if whole else f"the {n_ref + n_ev} images used"
    sys.stderr.write(f"xaicomp: original accuracy {session.baseline_accuracy:.2%} on the {n_ev} evaluation images "
                     f"(the baseline reported), {correct / (n_ref + n_ev):.2%} on {where} ({n_ref} reference + "
                     f"{n_ev} evaluation)\n")


def _budget_line(model: Any, info: Any, splits: Any, sources: Sources, composite: str, device: Any = None) -> Any:
    """Time one batch; when the first result would take well over :data:`~xaicomp_core.io.fit.TARGET_SECONDS`,
    say so and propose image counts before the long work starts (Ctrl+C cancels)."""
    from xaicomp_core.io.data import as_tensors
    from xaicomp_core.io.fit import plan_budget

    pre = info.preprocessing
    ref = splits.reference
    ev = splits.evaluation
    xr, yr = as_tensors(ref.subset(list(range(min(32, len(ref))))), pre, info.num_classes, "reference data")
    xe, _ = as_tensors(ev.subset(list(range(min(128, len(ev))))), pre, info.num_classes, "evaluation data")
    budget = plan_budget(model, xr, yr, xe, reference=len(ref), evaluation=len(ev), composite=composite,
                         num_classes=info.num_classes, device=device)
    if budget.too_slow:
        sys.stderr.write(f"xaicomp: {budget.describe()} (Ctrl+C cancels)\n")
    return budget


def plan_and_session(args: argparse.Namespace, quiet: bool,
                     sources: Sources | None = None) -> tuple[CompressionPlan, CompressionSession]:
    """The plan and the session from the options (the session's composite set to the plan's)."""
    plan = plan_from_args(args)
    session = session_from_args(args, progress_printer("relevance", not quiet), sources)
    if plan.composite != session.composite:
        session.composite = plan.composite
    return plan, session


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------
def progress_printer(label: str, enabled: bool) -> ProgressFn | None:
    """A ``progress(done, total)`` that writes ``label: done/total, about N s left`` to stderr (None if not
    ``enabled``)."""
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


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON."""
    print(json.dumps(obj, indent=2))


def fmt_bytes(n: float) -> str:
    """``1234`` -> ``1.2 KB`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def data_label(args: argparse.Namespace, session: CompressionSession) -> str:
    """``"<--data> (<n> images)"`` for the evaluation data of ``session``."""
    return f"{args.data} ({len(session.y_eval)} images)"
