"""Export: the current plan as real files -- the packed model (its size is the number shown everywhere), dense
safetensors and ONNX to run elsewhere, the plan as JSON and the self-contained HTML report.

The estimated, payload and file sizes stand side by side; a reload check reads the packed bytes back and re-measures
accuracy on the evaluation set. The page holds no maths: packing, verification and the report are engine calls.
"""

from __future__ import annotations

import math
import re

import streamlit as st

from pages.common import (
    DEFAULT_EVAL_SAMPLES,
    DEFAULT_REFERENCE_SAMPLES,
    control,
    fmt_bytes,
    fmt_pct,
    get_plan,
    get_settings,
    model_label,
    page_session,
    per_session_cache,
    run_with_progress,
    session_scope_key,
    with_finetuning,
)
from xaicomp_core import CompressionPlan, CompressionSession, XaicompError
from xaicomp_core.format.packing import CODECS, SECTION_KEYS, PackResult
from xaicomp_core.io.export import dense_bytes, export_packed, onnx_bytes, verify_packed
from xaicomp_core.report.html import build_report, export_command

CODEC_LABELS = {"none": "none (payload = estimate)", "zlib": "zlib", "lzma": "lzma (xz)"}


def _slug(session: CompressionSession, plan: CompressionPlan) -> str:
    """A file-name stem such as ``fashion-vgg-lrp50-8-4-2``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", session.info.name).strip("-") or "model"
    bits = "-".join("fp32" if b == 32 else str(b) for b in plan.bit_levels)
    prune = f"{plan.criterion}{round(plan.prune_ratio * 100)}" if plan.uses_ratio else plan.criterion
    return f"{name}-{prune}-{bits}"


def _data_spec() -> dict | None:
    """How ``xaicomp verify`` can reload the evaluation data (only for the built-in data)."""
    data = get_settings().data
    if data.source != "builtin":
        return None
    return {"data": data.name, "eval_samples": data.eval_samples}


def _report_command(session: CompressionSession, plan: CompressionPlan, out: str) -> str:
    """The ``xaicomp report`` command matching the sidebar and the plan."""
    s = get_settings()
    info = session.info
    parts = ["xaicomp report"]
    if s.model.source == "builtin":
        parts.append(f"--model {info.arch}")
    else:
        parts.append(f"--arch {s.model.arch}" + (" --weights YOUR_WEIGHTS_FILE" if s.model.source == "upload"
                                                 else " --random-weights"))
    if s.data.source == "builtin":
        if s.data.eval_samples < DEFAULT_EVAL_SAMPLES:
            parts.append(f"--eval-samples {s.data.eval_samples}")
    else:
        parts.append("--data YOUR_DATA")
    if s.reference_samples != DEFAULT_REFERENCE_SAMPLES:
        parts.append(f"--reference-samples {s.reference_samples}")
    parts += [plan.cli_args(), f"-o {out}"]
    return " ".join(parts)


def _request(action: str) -> None:
    """Button callback: remember the request in the session state (it survives a rerun of the script)."""
    st.session_state[f"_ex_request_{action}"] = True


def _requested(action: str) -> bool:
    """Whether the button of ``action`` was pressed since the last time this was asked."""
    return bool(st.session_state.pop(f"_ex_request_{action}", False))


session = page_session(
    "Export",
    "The current plan as files you can download, reload and run. The packed file stores only what the plan "
    "keeps, at the bits it gives; its payload is exactly the size the engine estimates, and the file adds only "
    "a small JSON header.")
plan = get_plan(session)
st.markdown(f"**{model_label(session)}**  \nPlan: {plan.describe()}")
st.page_link("pages/compress.py", label="Change the plan on the Compress page", icon=":material/tune:")

codec_control = control("ex_codec", list(CODECS)[0])
codec = codec_control.keep(st.radio(
    "Lossless entropy coding of the payload", list(CODECS), index=codec_control.index_in(list(CODECS)),
    format_func=CODEC_LABELS.get, horizontal=True, key=codec_control.key, on_change=codec_control.commit,
    help="zlib or lzma from the Python standard library squeeze the packed payload further; the reader decodes it "
         "before unpacking. 'none' keeps the file = estimate + header."))

cache = per_session_cache("export")
key = (session_scope_key(session), plan.key(), codec)
try:
    if key not in cache:
        with_finetuning(session, plan, lambda progress: session.compress(plan, progress))
        with st.spinner("Packing…"):
            cache[key] = export_packed(session, plan, codec=codec, data_spec=_data_spec(),
                                       data_label=model_label(session))
except XaicompError as e:
    st.error(str(e), icon="⚠️")
    st.stop()
res: PackResult = cache[key]
ev = res.header["evaluation"]

st.subheader("Size")
c1, c2, c3, c4 = st.columns(4, border=True)
c1.metric("Estimated", fmt_bytes(res.estimated_bytes), help=f"{res.estimated_bytes:,} bytes: the engine's bit "
          "accounting of the plan (the number on the Compress page).")
c2.metric("Packed payload", fmt_bytes(res.payload_bytes),
          delta=f"{res.payload_bytes - res.estimated_bytes:+,} B vs estimate", delta_color="off", delta_arrow="off",
          help=f"{res.payload_bytes:,} bytes: kept values (at their bit widths, or Huffman-coded per layer where "
               "that is smaller), which weights are kept, bit classes, scales and the raw tensors (biases, "
               "normalisation; a tensor whose elements are all equal, such as the mean and variance of a BatchNorm "
               "stored as scale and shift, is one number).")
c3.metric("File on disk", fmt_bytes(res.file_bytes),
          delta=f"+{res.header_bytes:,} B header", delta_color="off", delta_arrow="off",
          help=f"{res.file_bytes:,} bytes = payload ({res.stored_payload_bytes:,} B as stored, codec {codec}) + "
               f"header ({res.header_bytes:,} B: model, preprocessing, plan, checksums).")
c4.metric("Original fp32", fmt_bytes(res.header["fp32_bytes"]),
          delta=f"{res.header['fp32_bytes'] / res.file_bytes:.1f}× larger than the file", delta_color="off",
          delta_arrow="off",
          help="4 bytes per floating-point value of the state dict.")
if codec != "none":
    st.caption(f"With {codec} the payload is stored in {res.stored_payload_bytes:,} bytes instead of "
               f"{res.payload_bytes:,} ({res.stored_payload_bytes / max(res.payload_bytes, 1):.1%}).")
st.caption(f"Accuracy of this compressed model on the {ev['images']:,} evaluation images: {fmt_pct(ev['accuracy'])} "
           f"(original {fmt_pct(ev['baseline_accuracy'])}). The file records it with a digest of the logits.")

with st.expander("What is in the file", icon=":material/inventory_2:"):
    rows = []
    for t in res.header["tensors"]:
        if t["kind"] == "omitted":
            continue
        raw = {"raw": 4 * math.prod(t["shape"]), "constant": 4}.get(t["kind"], 0)
        rows.append({"tensor": t["name"], "shape": "×".join(map(str, t["shape"])), "stored as": t["kind"],
                     "keep encoding": t.get("keep", "-"),
                     "values": t.get("values", "fixed") if t["kind"] == "compressed" else "-",
                     "kept": t.get("kept", math.prod(t["shape"])),
                     "keep B": t.get("keep_bytes", 0), "classes B": t.get("class_bytes", 0),
                     "scales B": t.get("scale_bytes", 0), "values B": t.get("value_bytes", 0),
                     "raw B": raw, "total B": raw + sum(t.get(k, 0) for k in SECTION_KEYS)})
    st.dataframe(rows, hide_index=True, width="stretch")
    st.caption("Format: docs/FORMAT.md (bit-packed, LSB-first; a reader can be written in any language).")

st.subheader("Reload check")
vkey = ("verify", *key)
st.button("Reload the packed file and re-measure", key="ex_verify", icon=":material/verified:", on_click=_request,
          args=("verify",))
if _requested("verify"):
    with st.spinner("Reading the file back and running the evaluation set…"):
        try:
            cache[vkey] = verify_packed(res.data, session.x_eval, session.y_eval)
        except XaicompError as e:
            st.error(str(e), icon="⚠️")
v = cache.get(vkey)
if v is not None:
    if v.ok and v.logits_match:
        st.success(f"Reloaded from {v.file_bytes:,} bytes: accuracy {fmt_pct(v.accuracy)} ({v.correct} of "
                   f"{v.images}), the same as the session to the last image; logits identical; payload = estimate "
                   f"({v.payload_bytes:,} B).", icon=":material/check_circle:")
    elif v.ok:
        st.info(f"Reloaded: accuracy {fmt_pct(v.accuracy)}, equal to the session's; payload = estimate.")
    else:
        st.error("The check failed: " + "; ".join(v.problems), icon=":material/error:")

st.subheader("Download")
stem = _slug(session, plan)
d1, d2, d3 = st.columns(3)
d1.download_button("Packed model (.xcz)", res.data, file_name=f"{stem}.xcz", mime="application/octet-stream",
                   key="ex_dl_packed", icon=":material/download:", type="primary", on_click="ignore",
                   help="The compressed model. Check it with `xaicomp verify` after downloading.")
d1.caption(f"{res.file_bytes:,} bytes")
d2.download_button("Dense weights (.safetensors)", lambda: dense_bytes(session, plan),
                   file_name=f"{stem}.safetensors", mime="application/octet-stream", key="ex_dl_dense",
                   icon=":material/download:", on_click="ignore",
                   help="The dequantized weights as an ordinary fp32 state dict (as large as the original), for "
                        "tools that cannot read the packed file.")
d2.caption(f"about {res.header['fp32_bytes']:,} bytes (fp32)")
d3.download_button("Plan (.json)", plan.to_json() + "\n", file_name=f"{stem}.plan.json", mime="application/json",
                   key="ex_dl_plan", icon=":material/download:", on_click="ignore",
                   help="Reproduce with `xaicomp export --plan plan.json`.")
d3.caption(plan.describe())

e1, e2, e3 = st.columns(3)
e1.download_button("ONNX (.onnx)", lambda: onnx_bytes(session.compressed_model(plan), session.info.preprocessing),
                   file_name=f"{stem}.onnx", mime="application/octet-stream", key="ex_dl_onnx",
                   icon=":material/download:", on_click="ignore",
                   help="The compressed model (dequantized fp32 weights) for onnxruntime and other runtimes.")
rkey = ("report", *key)
e2.button("Build the HTML report", key="ex_build_report", icon=":material/description:", on_click=_request,
          args=("report",),
          help="Trade-off sweep (lrp, magnitude, random), heatmaps and per-layer charts; takes a few seconds.")
report_cmd = _report_command(session, plan, f"{stem}.html")
if _requested("report"):
    try:
        cache[rkey] = run_with_progress("Building the report…", lambda progress: build_report(
            session, plan, command=report_cmd, data_label=model_label(session), data_spec=_data_spec(), codec=codec,
            progress=progress))
    except XaicompError as e:
        st.error(str(e), icon="⚠️")
rep = cache.get(rkey)
if rep is not None:
    e3.download_button("HTML report", rep.html.encode("utf-8"), file_name=f"{stem}.html", mime="text/html",
                       key="ex_dl_report", icon=":material/download:", type="primary", on_click="ignore",
                       help="One self-contained file: plots embedded, works offline.")
    e3.caption(f"{len(rep.html.encode('utf-8')):,} bytes, self-contained")
else:
    e3.caption("Build the report first.")

st.subheader("Same files from the command line")
st.code(f"{export_command(report_cmd).replace('-o model.xcz', f'-o {stem}.xcz')}"
        + (f" --codec {codec}" if codec != "none" else "") + f"\nxaicomp verify {stem}.xcz\n{report_cmd}",
        language="bash", wrap_lines=True)
