"""The ``export``, ``verify`` and ``report`` subcommands of the ``xaicomp`` command line.

* ``xaicomp export --model fashion-vgg --criterion lrp --prune 0.5 --bits 8,4,2 --split 0.2,0.5 -o model.xcz``
  writes the packed file (optionally ``--dense model.safetensors`` and ``--onnx model.onnx``);
* ``xaicomp verify model.xcz --json`` reloads it, recounts its size with the engine and re-measures accuracy on the
  data it was exported with;
* ``xaicomp report ... -o report.html`` writes the self-contained stakeholder report.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

from xaicomp_core.cli.common import (
    CommandOutputs,
    add_device_args,
    add_model_args,
    add_plan_args,
    check_eval_samples,
    data_label,
    device_from_args,
    fmt_bytes,
    nonnegative_int,
    plan_and_session,
    positive_int,
    print_json,
    progress_printer,
    sources_from_args,
)
from xaicomp_core.errors import XaicompError
from xaicomp_core.io.fit import check_class_count
from xaicomp_core.io.sources import CliCommand, DataSource, evaluation_data
from xaicomp_core.report.html import DEFAULT_HEATMAP_SAMPLES, DEFAULT_SWEEP_CRITERIA


def _sizes_line(file_bytes: int, header_bytes: int, payload_bytes: int, stored: int, codec: str) -> str:
    if codec == "none":
        return f"{file_bytes:,} bytes = payload {payload_bytes:,} + header {header_bytes:,}"
    return (f"{file_bytes:,} bytes = payload {stored:,} ({codec}; {payload_bytes:,} before coding) + header "
            f"{header_bytes:,}")


# ----------------------------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """Write the packed file (and optionally dense safetensors and ONNX)."""
    from xaicomp_core.io.export import dense_bytes, export_packed, onnx_bytes

    t0 = time.perf_counter()
    # every output is checked before any work and written at the end: all of them, or none
    outputs = CommandOutputs(args, {"-o": args.output, "--dense": args.dense, "--onnx": args.onnx})
    sources = sources_from_args(args)
    plan, session = plan_and_session(args, args.json, sources)
    out = pathlib.Path(args.output)
    res = export_packed(session, plan, codec=args.codec, data_spec=sources.data_spec(),
                        data_label=data_label(args, session))
    outputs.add("-o", res.data)
    ev = res.header["evaluation"]
    d: dict[str, Any] = {"file": str(out), "model": session.info.name, "plan": plan.to_dict(),
                         "description": plan.describe(), **res.summary(),
                         "accuracy": ev["accuracy"], "expected_accuracy": ev["accuracy"],
                         "baseline_accuracy": ev["baseline_accuracy"], "correct": ev["correct"],
                         "images": ev["images"]}
    if args.dense:
        dense = dense_bytes(session, plan)
        outputs.add("--dense", dense)
        d["dense_file"], d["dense_bytes"] = args.dense, len(dense)
    if args.onnx:
        onnx = onnx_bytes(session.compressed_model(plan), session.info.preprocessing)
        outputs.add("--onnx", onnx)
        d["onnx_file"], d["onnx_bytes"] = args.onnx, len(onnx)
    outputs.commit(plan)
    d["seconds"] = time.perf_counter() - t0
    if args.json:
        print_json(d)
        return 0
    line = _sizes_line(d["file_bytes"], d["header_bytes"], d["payload_bytes"], d["stored_payload_bytes"], args.codec)
    print(f"wrote {out}: {line}")
    print(f"estimate  {d['estimated_bytes']:,} bytes (engine)   fp32 {d['fp32_bytes']:,} bytes   "
          f"{d['fp32_bytes'] / d['file_bytes']:.1f}x smaller on disk")
    print(f"accuracy  {ev['accuracy']:.2%} on {ev['images']} images (original {ev['baseline_accuracy']:.2%})")
    if args.dense:
        print(f"dense     {args.dense}: {d['dense_bytes']:,} bytes (dequantized fp32 safetensors)")
    if args.onnx:
        print(f"onnx      {args.onnx}: {d['onnx_bytes']:,} bytes")
    # verify never opens a data path recorded in the file: the command names the data again
    again = [] if sources.data.kind == "builtin" or sources.data.data is not None else ["--data", sources.data.spec()]
    print(f"check it: {CliCommand('verify', [out, *again])}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Reload a packed file, recount its size and re-measure accuracy."""
    import torch

    from xaicomp_core.format.packing import read_packed
    from xaicomp_core.io.data import as_tensors
    from xaicomp_core.io.export import evaluation_from_header, verify_packed

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_from_args(args)
    if not args.file:
        raise XaicompError("name the packed file to verify: xaicomp verify FILE.xcz [--model model.onnx] "
                           "[--data DATA]")
    pm = read_packed(args.file)
    model_file = _verify_model_file(args, pm.info)
    x = y = None
    label = None
    ev = evaluation_from_header(pm.header) or {}
    spec = ev.get("data_spec")
    recorded_path = False
    if not args.no_eval:
        if args.data is not None:
            spec = {"data": args.data, "eval_samples": args.eval_samples}
        elif spec:
            # the file is untrusted: only data it names by built-in name is loaded; a path in it is never opened
            recorded_path = DataSource.from_record(spec).kind != "builtin"
            n = spec.get("eval_samples") if args.eval_samples is None else args.eval_samples
            spec = None if recorded_path else {"data": spec["data"], "eval_samples": n}
        if spec:
            source = DataSource.from_record(spec)
            check_eval_samples(source.eval_samples)
            pre = pm.info.preprocessing
            data = evaluation_data(source, pre.input_size, pre.channels, pm.info.class_names)
            check_class_count(pm.info, data, "the evaluation data")
            x, y = as_tensors(data, pre, pm.info.num_classes, "evaluation data")
            label = f"{source.spec()} ({len(y)} images)"
    res = verify_packed(pm, x, y, label, model_file=model_file, device=device,
                        memory_budget_mb=args.memory_budget)
    d = {"file": str(args.file), **res.to_dict()}
    if x is None:
        d["note"] = "accuracy not measured: " + (
            "--no-eval given" if args.no_eval else
            "the file names its evaluation data by a local path, which verify never opens; pass --data"
            if recorded_path else "the file records no data to evaluate on; pass --data")
    if args.json:
        print_json(d)
    else:
        line = _sizes_line(res.file_bytes, res.header_bytes, res.payload_bytes, res.stored_payload_bytes, res.codec)
        print(f"file      {args.file}: {line}")
        print(f"estimate  {res.estimated_bytes:,} bytes (engine, from the decoded file)   "
              f"fp32 {res.fp32_bytes:,} bytes")
        print(f"model     {res.model} ({res.arch}); {res.description}")
        if res.accuracy is not None:
            exp = f"{res.expected_accuracy:.2%}" if res.expected_accuracy is not None else "not recorded"
            print(f"accuracy  {res.accuracy:.2%} on {res.data} (at export: {exp}); "
                  f"logits identical: {res.logits_match}")
        else:
            print(d["note"])
        print("OK" if res.ok else "FAILED")
    if not res.ok:
        sys.stderr.write("xaicomp: verification failed: " + "; ".join(res.problems) + "\n")
        return 1
    return 0


def _verify_model_file(args: argparse.Namespace, info: Any) -> str | None:
    """``verify --model model.onnx`` / ``--model-py FILE.py:FACTORY``: the architecture to rebuild the file's model
    from (None: the file's own record). Declared preprocessing must be what the file was exported with."""
    from xaicomp_core.cli.common import declared_from_args
    from xaicomp_core.io.onnx_import import is_onnx_name

    declared = declared_from_args(args)
    if declared is not None:
        pre = declared.preprocessing(info.preprocessing.channels, info.preprocessing.input_size)
        if pre != info.preprocessing or (declared.class_names and list(declared.class_names) != info.class_names):
            raise XaicompError(f"{args.file} was exported with preprocessing {info.preprocessing.to_dict()} and its "
                               "own class names; the declared ones differ (verify always uses the file's)")
    if args.model_py:
        return str(args.model_py)
    if args.model and not is_onnx_name(args.model):
        from xaicomp_core.io.models import BUILTIN_MODELS

        if args.model in BUILTIN_MODELS and args.model == info.arch:
            return None
        raise XaicompError(f"verify --model takes the model's .onnx file (the file holds {info.name})")
    return args.model or None


def cmd_report(args: argparse.Namespace) -> int:
    """Write the stakeholder HTML report."""
    from xaicomp_core.report.html import DEFAULT_SWEEP_RATIOS, build_report

    outputs = CommandOutputs(args, {"-o": args.output})  # checked before any work
    sources = sources_from_args(args)
    plan, session = plan_and_session(args, args.json, sources)
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()] if args.ratios is not None else \
            list(DEFAULT_SWEEP_RATIOS)
    except ValueError:
        raise XaicompError(f"cannot parse --ratios {args.ratios!r}; use e.g. 0,0.5,0.9") from None
    extra: list[tuple[str, str]] = []
    if args.criteria != DEFAULT_CRITERIA:
        extra.append(("--criteria", args.criteria))
    if args.ratios is not None:
        extra.append(("--ratios", args.ratios))
    if args.heatmaps != DEFAULT_HEATMAPS:
        extra.append(("--heatmaps", str(args.heatmaps)))
    if args.codec != "none":
        extra.append(("--codec", args.codec))
    command = sources.command("report", plan, options=extra, output=args.output)
    t0 = time.perf_counter()
    rep = build_report(session, plan, command=command, data_label=data_label(args, session),
                       data_spec=sources.data_spec(),
                       sweep_criteria=criteria, sweep_ratios=ratios, heatmap_samples=args.heatmaps,
                       codec=args.codec, progress=progress_printer("report", not args.json))
    outputs.add("-o", rep.html)
    outputs.commit(plan)
    d = {"file": args.output, "html_bytes": len(rep.html.encode("utf-8")), "command": str(command),
         "accuracy": rep.accuracy, "baseline_accuracy": rep.baseline_accuracy, **rep.sizes,
         "sweep_points": len(rep.sweep_rows), "seconds": time.perf_counter() - t0}
    if args.json:
        print_json(d)
    else:
        print(f"wrote {args.output} ({fmt_bytes(d['html_bytes'])}, self-contained): accuracy {rep.accuracy:.2%}, "
              f"packed file {d['file_bytes']:,} bytes")
    return 0


DEFAULT_CRITERIA = ",".join(DEFAULT_SWEEP_CRITERIA)
DEFAULT_HEATMAPS = DEFAULT_HEATMAP_SAMPLES


def register(subparsers: Any) -> None:
    """Add the ``export``, ``verify`` and ``report`` subcommands to the ``xaicomp`` parser."""
    from xaicomp_core.format.packing import CODECS

    p = subparsers.add_parser("export", help="write the packed compressed model (.xcz), optionally dense "
                                             "safetensors and ONNX")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("-o", "--output", required=True, help="packed file to write (e.g. model.xcz)")
    p.add_argument("--codec", choices=CODECS, default="none", help="lossless entropy coding of the payload")
    p.add_argument("--dense", default=None, help="also write dense safetensors with the dequantized weights")
    p.add_argument("--onnx", default=None, help="also write ONNX of the compressed model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("verify", help="reload a packed file: checksums, size vs estimate, accuracy")
    p.add_argument("file", nargs="?", default=None, help="packed file (.xcz)")
    p.add_argument("--model", default=None, help="the model's .onnx file to rebuild the architecture from "
                                                 "(default: the graph stored in the packed file)")
    p.add_argument("--model-py", default=None, metavar="FILE.py:FACTORY",
                   help="rebuild a model defined in Python from this code (runs it: only code you trust)")
    for flag in ("--input-size", "--pixel-range", "--mean", "--std", "--class-names"):
        p.add_argument(flag, default=None, help="as for export (checked against the file's; the file's are used)")
    p.add_argument("--reference-samples", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help="evaluation data (default: the data recorded in the file)")
    p.add_argument("--eval-samples", type=int, default=None, help="use only this many evaluation samples")
    p.add_argument("--no-eval", action="store_true", help="check the file and its size only")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_device_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("report", help="write the self-contained HTML report for a plan")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    p.add_argument("--criteria", default=DEFAULT_CRITERIA, help="criteria of the trade-off curve")
    p.add_argument("--ratios", default=None, help="prune ratios of the trade-off curve (empty: no curve)")
    p.add_argument("--heatmaps", type=nonnegative_int, default=DEFAULT_HEATMAPS,
                   help="evaluation images with LRP heatmaps")
    p.add_argument("--codec", choices=CODECS, default="none", help="codec of the packed file the report sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
