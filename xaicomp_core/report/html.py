"""The stakeholder report: one self-contained HTML file (plots embedded as PNG data URIs, no scripts, no external
links) with the model, the data, the plan, the three sizes, accuracy overall and per class, per-layer charts, the
size/accuracy trade-off curve, relevance heatmaps and the exact commands that reproduce it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xaicomp_core.evaluate.sweep import BitSetting, run_sweep
from xaicomp_core.io.export import codec_sizes, export_packed
from xaicomp_core.io.models import count_parameters
from xaicomp_core.io.sources import CliCommand, Sources
from xaicomp_core.plan import FP32, CompressionPlan
from xaicomp_core.viz.style import criterion_colour, fmt_bytes

if TYPE_CHECKING:
    from xaicomp_core.evaluate.session import CompressionSession, EvaluationResult, LayerStats
    from xaicomp_core.format.size import TensorSize
    from xaicomp_core.io.data import Preprocessing

ProgressFn = Callable[[int, int], None]
DEFAULT_SWEEP_CRITERIA = ("lrp", "magnitude", "random")
DEFAULT_HEATMAP_SAMPLES = 6
DEFAULT_SWEEP_RATIOS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)



# ----------------------------------------------------------------------------------------------------------------
# figure helpers
# ----------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def fig_per_class(class_names: Sequence[str], baseline: Sequence[float], compressed: Sequence[float]) -> str:
    """Grouped horizontal bars: per-class accuracy, original vs compressed (PNG data URI)."""
    plt = _plt()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(7, 0.32 * n + 1.2))
    y = np.arange(n)
    ax.barh(y - 0.2, np.asarray(baseline) * 100, 0.4, label="original", color="#9e9e9e")
    ax.barh(y + 0.2, np.asarray(compressed) * 100, 0.4, label="compressed", color=criterion_colour("lrp"))
    ax.set_yticks(y, list(class_names))
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def fig_layers(layers: list[LayerStats], levels: list[int], size_rows: list[TensorSize]) -> str:
    """Per-layer panels: kept weights by bit width and pruned share; bytes by section vs fp32 (PNG data URI)."""
    plt = _plt()
    names = [layer.name for layer in layers]
    x = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8))
    bottom = np.zeros(len(names))
    cmap = plt.get_cmap("RdPu")
    labels = ["fp32" if b == FP32 else f"{b}" for b in levels]
    for j, lab in enumerate(labels):
        share = np.array([layer.bits_histogram.get(lab, 0) / layer.params for layer in layers])
        color = cmap(0.9 - 0.6 * j / max(len(labels) - 1, 1))
        a1.bar(x, share * 100, bottom=bottom * 100, color=color, label=f"{lab} bit" if lab != "fp32" else "fp32")
        bottom += share
    prot = np.array([layer.bits_histogram.get("fp32", 0) / layer.params if layer.protected else 0 for layer in layers])
    if prot.any() and "fp32" not in labels:
        a1.bar(x, prot * 100, bottom=bottom * 100, color="#455a64", label="protected fp32")
        bottom += prot
    a1.bar(x, (1 - bottom) * 100, bottom=bottom * 100, color="#eeeeee", edgecolor="#bdbdbd", label="pruned")
    a1.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    a1.set_ylabel("share of the layer's weights (%)")
    a1.set_title("kept weights by bit width", fontsize=10)
    a1.legend(fontsize=7, ncol=2)
    rows = {t.name: t for t in size_rows}
    secs = [("value_bytes", "values", "#c2185b"), ("keep_bytes", "keep", "#7b1fa2"),
            ("class_bytes", "classes", "#1976d2"), ("scale_bytes", "scales", "#00796b"),
            ("raw_bytes", "raw", "#455a64")]
    bottom = np.zeros(len(names))
    for key, lab, color in secs:
        vals = np.array([getattr(rows[layer.name + ".weight"], key) if layer.name + ".weight" in rows else 0
                         for layer in layers], dtype=float) / 1e3
        a2.bar(x - 0.2, vals, 0.4, bottom=bottom, color=color, label=lab)
        bottom += vals
    fp = np.array([layer.params * 4 for layer in layers], dtype=float) / 1e3
    a2.bar(x + 0.2, fp, 0.4, color="#bdbdbd", label="fp32 dense")
    a2.set_yscale("log")
    a2.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    a2.set_ylabel("kB (log scale)")
    a2.set_title("weight bytes by section vs fp32", fontsize=10)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def fig_tradeoff(rows: list[dict[str, Any]], current: tuple[float, float], baseline: tuple[float, float]) -> str:
    """Accuracy vs packed size per criterion, with the current plan and the fp32 original (PNG data URI)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for crit in dict.fromkeys(r["criterion"] for r in rows):
        pts = sorted((r["estimated_bytes"], r["accuracy"]) for r in rows if r["criterion"] == crit)
        xs = [p[0] / 1e3 for p in pts]
        ys = [p[1] * 100 for p in pts]
        ax.plot(xs, ys, "o-", ms=4, color=criterion_colour(crit), label=crit)
    ax.plot([current[0] / 1e3], [current[1] * 100], "*", ms=16, color="#ffb300", markeredgecolor="black",
            label="this plan", zorder=5)
    ax.plot([baseline[0] / 1e3], [baseline[1] * 100], "s", ms=8, color="black", label="original (fp32)")
    ax.set_xscale("log")
    ax.set_xlabel("packed size (kB, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def _display_image(x: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    mean = torch.tensor(preprocessing.mean).view(-1, 1, 1)
    std = torch.tensor(preprocessing.std).view(-1, 1, 1)
    img = (x * std + mean).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def fig_heatmaps(images: torch.Tensor, rel_orig: torch.Tensor, rel_comp: torch.Tensor, labels: Sequence[str],
                 pred_orig: Sequence[str], pred_comp: Sequence[str], preprocessing: Preprocessing) -> str:
    """Image / LRP heatmap of the original / of the compressed model, one column per sample (PNG data URI)."""
    plt = _plt()
    k = len(images)
    fig, axes = plt.subplots(3, k, figsize=(1.9 * k, 6.2), squeeze=False)
    for j in range(k):
        img = _display_image(images[j], preprocessing)
        axes[0, j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[0, j].set_title(f"true: {labels[j]}", fontsize=8)
        for row, (rel, pred, who) in enumerate(((rel_orig, pred_orig, "original"), (rel_comp, pred_comp,
                                                                                   "compressed")), start=1):
            r = rel[j].numpy()
            lim = float(np.abs(r).max()) or 1.0
            axes[row, j].imshow(r, cmap="bwr", vmin=-lim, vmax=lim)
            axes[row, j].set_title(f"{who}: {pred[j]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, 0].set_ylabel("LRP original", fontsize=8)
    axes[2, 0].set_ylabel("LRP compressed", fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """A built report: the HTML and the figures behind it."""

    html: str
    sizes: dict[str, int]
    accuracy: float
    baseline_accuracy: float
    sweep_rows: list[dict[str, Any]]

    def write(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the HTML file atomically (an existing file is replaced whole or left as it was); returns the path."""
        from xaicomp_core.io.atomic import atomic_write

        path = pathlib.Path(path)
        atomic_write(path, self.html, "report")
        return path


def default_command(session: CompressionSession, plan: CompressionPlan, output: str = "report.html") -> str:
    """The ``xaicomp report`` command for the session's model (a built-in one by name, else its architecture and a
    weights file to fill in) on the shipped data, as a :class:`~xaicomp_core.io.sources.CliCommand`."""
    return Sources.of_session(session).command("report", plan, output=output)


def export_command(report_command: str, output: str = "model.xcz") -> str:
    """The ``xaicomp export`` command matching a ``xaicomp report`` command (same model, data and plan), writing
    ``output``.

    A :class:`~xaicomp_core.io.sources.CliCommand` (what :func:`default_command`, the CLI and
    :meth:`Sources.command <xaicomp_core.io.sources.Sources.command>` render) is re-rendered from its parts; plain
    text is read into one first (:meth:`CliCommand.parse <xaicomp_core.io.sources.CliCommand.parse>`: shell
    words, so quoted paths stay whole). Options only ``report`` has and its output are dropped.
    """
    cmd = report_command if isinstance(report_command, CliCommand) else CliCommand.parse(report_command)
    return cmd.to("export", output=output)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#212121;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{color:#c2185b;margin-bottom:4px}h2{border-bottom:2px solid #f8bbd0;padding-bottom:4px;margin-top:36px}
.sub{color:#616161;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:8px;padding:12px 16px;min-width:150px}
.card .v{font-size:1.5em;font-weight:600}.card .l{color:#616161;font-size:.85em}
table{border-collapse:collapse;background:#fff;font-size:.88em;margin:8px 0}
th,td{border:1px solid #e0e0e0;padding:4px 8px;text-align:right}th{background:#fce4ec}
td.t,th.t{text-align:left}
pre{background:#263238;color:#eceff1;padding:12px;border-radius:6px;overflow-x:auto;white-space:pre-wrap}
img{max-width:100%;height:auto;background:#fff;border:1px solid #eeeeee;border-radius:4px}
.note{color:#616161;font-size:.9em}
summary{cursor:pointer;color:#c2185b;margin:6px 0}
"""


def build_report(session: CompressionSession, plan: CompressionPlan, *, command: str | None = None,
                 data_label: str | None = None, data_spec: dict[str, Any] | None = None,
                 sweep_criteria: Sequence[str] = DEFAULT_SWEEP_CRITERIA,
                 sweep_ratios: Sequence[float] = DEFAULT_SWEEP_RATIOS, heatmap_samples: int = DEFAULT_HEATMAP_SAMPLES,
                 codec: str = "none", progress: ProgressFn | None = None) -> Report:
    """Build the stakeholder report for ``plan`` on ``session``.

    Parameters
    ----------
    session : CompressionSession
    plan : CompressionPlan
    command : str, optional
        The CLI command that reproduces the report (default: :func:`default_command`).
    data_label : str, optional
        Description of the evaluation data.
    data_spec : dict, optional
        How the evaluation data is loaded by name (recorded in the packed file whose size is reported, exactly as
        ``xaicomp export`` records it; see :func:`~xaicomp_core.io.export.evaluation_record`).
    sweep_criteria, sweep_ratios : sequence
        The trade-off curve: every criterion at every ratio, with the plan's bit setting (the plan's own criterion
        is always included). Empty ``sweep_ratios`` leaves the curve out.
    heatmap_samples : int
        Evaluation images shown with their LRP heatmaps (0 leaves them out).
    codec : str
        Codec of the packed file whose size the report states.
    progress : callable, optional
        ``progress(done, total)`` over the report's steps.

    Returns
    -------
    Report
    """
    criteria = list(dict.fromkeys([plan.criterion, *sweep_criteria]))
    steps = 4 + (len(criteria) if sweep_ratios else 0)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    info = session.info
    result = session.evaluate(plan)
    tick()
    packed = export_packed(session, plan, codec=codec, data_spec=data_spec, data_label=data_label)
    sizes = {"estimated_bytes": result.size.estimated_bytes, "payload_bytes": packed.payload_bytes,
             "file_bytes": packed.file_bytes, "header_bytes": packed.header_bytes,
             "fp32_bytes": result.size.fp32_bytes}
    coded = codec_sizes(packed)
    tick()

    rows: list[dict[str, Any]] = []
    if sweep_ratios:
        base = plan.replace(finetune_epochs=0)
        for crit in criteria:
            rows.extend(run_sweep(session, [crit], list(sweep_ratios), [BitSetting.of(plan)], base))
            tick()

    heat = ""
    if heatmap_samples > 0:
        k = min(heatmap_samples, len(session.x_eval))
        idx = list(range(k))
        rel_o, log_o = session.input_relevance(idx)
        rel_c, log_c = session.input_relevance(idx, plan=plan)
        names = info.class_names
        heat = fig_heatmaps(session.x_eval[idx], rel_o, rel_c, [names[int(session.y_eval[i])] for i in idx],
                            [names[int(i)] for i in log_o.argmax(1)], [names[int(i)] for i in log_c.argmax(1)],
                            info.preprocessing)
    tick()
    figs = {
        "per_class": fig_per_class(result.class_names, result.baseline_per_class_accuracy, result.per_class_accuracy),
        "layers": fig_layers(result.layers, plan.bit_levels, result.size.tensors),
        "tradeoff": fig_tradeoff(rows, (result.size.estimated_bytes, result.accuracy),
                                 (result.size.fp32_bytes, result.baseline_accuracy)) if rows else "",
        "heatmaps": heat,
    }
    tick()
    cmd = command or default_command(session, plan)
    doc = _render(session, plan, result, sizes, coded, packed.codec, rows, figs, cmd, data_label)
    return Report(doc, sizes, result.accuracy, result.baseline_accuracy, rows)


def write_report(path: str | pathlib.Path, session: CompressionSession, plan: CompressionPlan, **kwargs: Any) -> Report:
    """:func:`build_report` and write the HTML to ``path`` (validated before the report is built, written
    atomically)."""
    from xaicomp_core.io.atomic import check_output

    check_output(path, "report")
    rep = build_report(session, plan, **kwargs)
    rep.write(path)
    return rep


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{html.escape(value)}</div><div class="l">{html.escape(label)}</div></div>'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; the first ``left`` columns are left-aligned, the others right-aligned."""
    th = "".join(f'<th class="{"t" if i < left else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"t" if i < left else ""}">{html.escape(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _render(session: CompressionSession, plan: CompressionPlan, result: EvaluationResult, sizes: dict[str, int],
            coded: dict[str, int], codec: str, rows: list[dict[str, Any]], figs: dict[str, str], command: str,
            data_label: str | None) -> str:
    from xaicomp_core import __version__

    info = session.info
    e = html.escape
    n_params = count_parameters(session.model)
    data = data_label or f"evaluation set of {result.images} images"
    ref = f"{len(session.x_ref)} reference images (LRP {e(plan.composite)}, ε = {session.epsilon:g}, " \
          f"relevance of the {e(session.target)} class)"
    acc_change = (result.accuracy - result.baseline_accuracy) * 100
    cards = "".join([
        _card(f"{result.accuracy:.2%}", f"accuracy (original {result.baseline_accuracy:.2%}, "
                                        f"{acc_change:+.2f} points)"),
        _card(fmt_bytes(sizes["estimated_bytes"]), "estimated by the engine"),
        _card(fmt_bytes(sizes["payload_bytes"]), "packed payload"),
        _card(fmt_bytes(sizes["file_bytes"]), f"file on disk (+{sizes['header_bytes']} B header)"),
        _card(fmt_bytes(sizes["fp32_bytes"]), "original fp32 dense"),
        _card(f"{result.size.compression_ratio:.1f}×", "smaller than fp32"),
    ])
    size_rows = [
        ["engine estimate", f"{sizes['estimated_bytes']:,}", "bit accounting of the plan (xaicomp compress)"],
        ["packed payload", f"{sizes['payload_bytes']:,}", "kept values, keep-encoding, classes, scales, raw tensors"],
        ["header", f"{sizes['header_bytes']:,}", "preamble + JSON: model, preprocessing, plan, checksums"],
        ["file on disk", f"{sizes['file_bytes']:,}", f"payload + header (codec: {codec})"],
        ["payload, zlib", f"{coded['zlib']:,}", "optional lossless entropy coding (--codec zlib)"],
        ["payload, lzma", f"{coded['lzma']:,}", "optional lossless entropy coding (--codec lzma)"],
        ["fp32 dense", f"{sizes['fp32_bytes']:,}", "4 bytes per floating-point value of the state dict"],
    ]
    secs = result.size.section_totals()
    sec_rows = [[k, f"{v:,}", f"{v / max(sizes['payload_bytes'], 1):.1%}"] for k, v in secs.items()]
    class_rows = [[c, f"{b:.1%}", f"{a:.1%}", f"{(a - b) * 100:+.1f}"] for c, b, a in
                  zip(result.class_names, result.baseline_per_class_accuracy, result.per_class_accuracy)]
    layer_rows = []
    for layer in result.layers:
        hist = ", ".join(f"{k}: {v:,}" for k, v in layer.bits_histogram.items() if v)
        layer_rows.append([layer.name, layer.kind, "×".join(str(d) for d in layer.shape), f"{layer.params:,}",
                           f"{layer.kept:,}", f"{layer.sparsity:.1%}", f"{layer.mean_bits:.2f}", hist or "-",
                           layer.encoding,
                           f"{layer.bytes:,}",
                           f"{layer.fp32_bytes:,}"])
    sweep_html = ""
    if rows:
        best = sorted(rows, key=lambda r: (r["criterion"], r["prune_ratio"]))
        sweep_html = (f'{_img(figs["tradeoff"], "accuracy versus packed size")}'
                      f'<p class="note">Every criterion at prune ratios {", ".join(f"{r:g}" for r in sorted({r["prune_ratio"] for r in rows}))} '  # noqa: E501
                      f'with this plan\'s bit setting ({e(BitSetting.of(plan).label)}'  # noqa: E501
                      f', {e(plan.granularity)} granularity'
                      + (', without fine-tuning' if plan.finetune_epochs else '')
                      + '). Sizes are packed payload bytes.</p>'
                      + "<details><summary>All points of the curve</summary>"
                      + _table(["criterion", "prune ratio", "accuracy", "packed bytes", "ratio vs fp32", "Pareto"],
                               [[r["criterion"], f"{r['prune_ratio']:g}", f"{r['accuracy']:.2%}",
                                 f"{r['estimated_bytes']:,}", f"{r['compression_ratio']:.1f}×",
                                 "yes" if r.get("pareto") else ""] for r in best]) + "</details>")
    else:
        sweep_html = '<p class="note">No trade-off sweep was requested.</p>'
    heat_html = (_img(figs["heatmaps"], "LRP relevance heatmaps") +
                 '<p class="note">Pixel relevance (LRP) for the true class: red supports it, blue speaks against it. '
                 'Top: the input; middle: the original model; bottom: the compressed model (titles give the '
                 'prediction).</p>') if figs["heatmaps"] else '<p class="note">No heatmaps were requested.</p>'
    export_cmd = export_command(command)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xaicomp report: {e(info.name)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>Compression report: {e(info.name)}</h1>
<p class="sub">{e(plan.describe())}<br>generated {now} by xaicomp {e(__version__)}; self-contained, works offline</p>
<div class="cards">{cards}</div>

<h2>Model and data</h2>
{_table(["", ""], left=2, rows=[["model", info.name], ["architecture", info.arch], ["parameters", f"{n_params:,}"],
                   ["classes", ", ".join(info.class_names)],
                   ["input", f"{info.preprocessing.channels}×{info.preprocessing.input_size[0]}×"
                             f"{info.preprocessing.input_size[1]}, mean {list(info.preprocessing.mean)}, "
                             f"std {list(info.preprocessing.std)}"],
                   ["evaluation data", data], ["relevance from", ref]])}

<h2>Plan</h2>
<p>{e(plan.describe())}</p>
<pre>{e(plan.to_json())}</pre>

<h2>Size: three numbers</h2>
<p class="note">The engine's estimate equals the packed payload byte for byte; the file on disk adds only its
header. fp32 dense is the reference. A mask that leaves zeros in a float tensor would save nothing: these are the
bytes of a file you can download, reload and run.</p>
{_table(["", "bytes", "what"], size_rows)}
<p>Payload by section:</p>
{_table(["section", "bytes", "share"], sec_rows)}

<h2>Accuracy</h2>
<p>Top-1 accuracy {result.accuracy:.2%} ({result.correct:,} of {result.images:,}) against
{result.baseline_accuracy:.2%} ({result.baseline_correct:,}) for the original: {acc_change:+.2f} points.
Sparsity {result.sparsity:.1%} of the prunable weights; mean bit width of the kept weights
{result.mean_bits:.2f}.</p>
{_img(figs["per_class"], "per-class accuracy")}
{_table(["class", "original", "compressed", "change (points)"], class_rows)}

<h2>Per layer</h2>
{_img(figs["layers"], "per-layer bit widths and bytes")}
{_table(["layer", "kind", "shape", "weights", "kept", "sparsity", "mean bits", "bit widths", "keep / values encoding",
         "bytes (with bias)", "fp32 bytes"], layer_rows)}

<h2>Trade-off</h2>
{sweep_html}

<h2>Relevance heatmaps</h2>
{heat_html}

<h2>Reproduce</h2>
<p>This report:</p>
<pre>{e(command)}</pre>
<p>The packed file and its check (reload, compare accuracy to the last image and size to the byte):</p>
<pre>{e(export_cmd)}
xaicomp verify model.xcz --json</pre>
<p>Plan as JSON (<code>--plan plan.json</code>):</p>
<pre>{e(json.dumps(plan.to_dict()))}</pre>
</main></body></html>
"""
