"""xaicomp -- the Streamlit app: ``streamlit run app.py`` (or ``make run``); both listen on 127.0.0.1 only
(``server.address`` in ``.streamlit/config.toml``), at http://127.0.0.1:8501.

This file draws the sidebar shared by all pages (model, data, LRP settings), stores the choices for
``pages.common.get_session`` and runs the page chosen in ``st.navigation``. The pages hold no maths: they call the
engine (:mod:`xaicomp_core`) and its figure builders.
"""

from __future__ import annotations

import pathlib

import streamlit as st

from pages.common import (
    COMPOSITES,
    DEFAULT_EVAL_SAMPLES,
    DEFAULT_MODEL,
    DEFAULT_REFERENCE_SAMPLES,
    PENDING_COMPOSITE_KEY,
    DataSpec,
    ModelSpec,
    Settings,
    builtin_available,
    declared_inputs,
    digest,
    leave_pages_directory_mode,
    model_choices,
    set_data_note,
    set_settings,
)
from xaicomp_core.device import device_choices
from xaicomp_core.io.pretrained import PretrainedMissing, cached_weights
from xaicomp_core.io.user_code import code_allowed

ROOT = pathlib.Path(__file__).resolve().parent
leave_pages_directory_mode()

st.set_page_config(page_title="xaicomp — compress with explainable AI", page_icon="🗜️", layout="wide",
                   initial_sidebar_state="expanded")
# Less empty space above the page title (more room on a projector). Below 1280 px (a 1024x768 projector with the
# sidebar open) metric values get a smaller font, metric and button labels wrap instead of ending in "…", and the
# Compress page puts its result below the plan instead of beside it (the container keyed cp_plan marks that pair of
# columns).
st.html("""<style>
[data-testid='stMainBlockContainer'] { padding-top: 2.5rem; }
@media (max-width: 1279px) {
  [data-testid='stMetricValue'] { font-size: 1.6rem; }
  [data-testid='stMetricLabel'] *, [data-testid='stMetricDelta'] .stMarkdownEllipsis,
  [data-testid='stMetricDelta'] .stMarkdownEllipsis p {
    white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
  [data-testid^='stBaseButton'] .stMarkdownEllipsis, [data-testid^='stBaseButton'] .stMarkdownEllipsis p {
    white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
  [data-testid='stHorizontalBlock']:has(> [data-testid='stColumn'] .st-key-cp_plan) { flex-wrap: wrap; }
  [data-testid='stHorizontalBlock']:has(> [data-testid='stColumn'] .st-key-cp_plan) > [data-testid='stColumn'] {
    flex: 1 1 100% !important; min-width: 100%; }
}
</style>""")

MODEL_SOURCES = {"builtin": "Built-in (trained)", "torchvision": "torchvision architecture",
                 "upload": "Upload your weights", "onnx": "ONNX model (.onnx)"}
if code_allowed():  # started with `streamlit run app.py -- --allow-code` (or XAICOMP_ALLOW_CODE=1): runs your code
    MODEL_SOURCES["python"] = "Python architecture (your code)"
DATA_SOURCES = {"builtin": "Built-in Fashion-MNIST", "zip": "ImageFolder .zip upload",
                "torchvision": "torchvision folder on disk"}


def _sidebar() -> Settings:
    """Draw the shared sidebar and return the settings it describes."""
    uploads: dict[str, bytes] = {}
    choices = model_choices()
    with st.sidebar:
        st.markdown("### xaicomp")
        st.caption("Compress image classifiers with explainable AI (LRP relevance decides what to prune and how "
                   "many bits each weight keeps).")

        st.markdown("#### Model")
        source = st.radio("Model source", list(MODEL_SOURCES), format_func=MODEL_SOURCES.get, key="sb_model_source",
                          label_visibility="collapsed")
        if source == "builtin":
            names = choices["builtin"]
            arch = st.selectbox("Built-in model", names, index=names.index(DEFAULT_MODEL), key="sb_builtin",
                                persist_state="session",
                                format_func=lambda n: n if builtin_available(n) else f"{n} (weights not trained yet)")
            model = ModelSpec("builtin", arch)
        elif source == "torchvision":
            arch = st.selectbox("Architecture", choices["torchvision"], key="sb_tv_arch", persist_state="session")
            pretrained = st.checkbox("pretrained weights from this machine's torch cache", key="sb_tv_pretrained",
                                     persist_state="session",
                                     help="torchvision's ImageNet weights file, read from $TORCH_HOME/hub/"
                                          "checkpoints (never downloaded). 1,000 outputs: use an ImageFolder whose "
                                          "folders are named after ImageNet classes.")
            if pretrained:
                try:
                    path, _ = cached_weights(arch)
                    st.caption(f"Weights: {path}")
                except PretrainedMissing as e:
                    st.warning(str(e))
            random_weights = False if pretrained else st.checkbox(
                "random weights (untrained, 10 outputs)", key="sb_tv_random", persist_state="session",
                help="Pretrained weights are never downloaded. Random weights let you explore the mechanics; for a "
                     "real model upload its weights.")
            st.caption("Torchvision models see the data resized to 224×224 RGB (no crop, aspect ratio not kept): "
                       "relevance and evaluation take much longer than for the built-in models.")
            model = ModelSpec("torchvision", arch, random_weights=random_weights, pretrained=pretrained)
        elif source == "onnx":
            f = st.file_uploader("ONNX model (no code runs: ONNX is data)", type=["onnx"], key="sb_onnx")
            st.caption("Input channels, size and classes come from the graph. Images are resized to its input size "
                       "(bilinear, aspect ratio not kept). Default preprocessing for ONNX: pixels scaled to [0, 1], "
                       "no mean/std (many exports normalise inside); declare yours below.")
            declared, problem = declared_inputs("sb_onnx", input_size=False)
            if problem:
                st.error(problem)
            if f is not None:
                blob = f.getvalue()
                uploads["weights"] = blob
                model = ModelSpec("onnx", "onnx", weights_name=f.name, digest=digest(blob), declared=declared)
            else:
                model = ModelSpec("onnx", "onnx", declared=declared)
        elif source == "python":
            spec = st.text_input("FILE.py:FACTORY (runs that file)", key="sb_py_spec", persist_state="session",
                                 placeholder="/path/to/mynet.py:build")
            f = st.file_uploader("Weights (.safetensors, .pt, .pth; optional)", type=["safetensors", "pt", "pth"],
                                 key="sb_py_weights")
            st.caption("The factory returns the nn.Module. Declare the input size; pixels default to [0, 1], no "
                       "mean/std.")
            declared, problem = declared_inputs("sb_py")
            if problem:
                st.error(problem)
            blob = f.getvalue() if f is not None else None
            if blob is not None:
                uploads["weights"] = blob
            model = ModelSpec("python", spec.strip() or "python", weights_name=f.name if f is not None else "",
                              digest=digest(blob) if blob is not None else "", declared=declared)
        else:
            arch = st.selectbox("Architecture of the weights", choices["builtin"] + choices["torchvision"],
                                key="sb_up_arch", persist_state="session")
            f = st.file_uploader("Weights (.safetensors, .pt, .pth: a state dict)", type=["safetensors", "pt", "pth"],
                                 key="sb_up_weights")
            if f is not None:
                data = f.getvalue()
                uploads["weights"] = data
                model = ModelSpec("upload", arch, weights_name=f.name, digest=digest(data))
            else:
                model = ModelSpec("upload", arch)

        st.markdown("#### Data")
        dsource = st.radio("Data source", list(DATA_SOURCES), format_func=DATA_SOURCES.get, key="sb_data_source",
                           label_visibility="collapsed")
        if dsource == "builtin":
            data = DataSpec("builtin", "fashion-mnist")
        elif dsource == "zip":
            f = st.file_uploader("Zip with one folder of images per class", type=["zip"], key="sb_data_zip")
            st.caption("Folders named after the model's classes (or 0…N-1). Half of the images (balanced) score "
                       "the weights, the other half measure accuracy.")
            if f is not None:
                blob = f.getvalue()
                uploads["data"] = blob
                data = DataSpec("zip", f.name, digest(blob))
            else:
                data = DataSpec("zip", "")
        else:
            tv_name = st.selectbox("Data set", ["fashion-mnist", "mnist", "cifar10"], key="sb_tv_data",
                                   persist_state="session")
            root = st.text_input("Folder (torchvision root)", key="sb_tv_root", persist_state="session",
                                 placeholder="/data/torchvision")
            data = DataSpec("torchvision", tv_name, root=root)
        # The counts in use: the page replaces this note once the data is loaded (pages.common.show_data_note).
        data_note = st.empty()
        eval_samples = int(st.number_input("Evaluation images", min_value=50, max_value=20_000,
                                           value=DEFAULT_EVAL_SAMPLES, step=50, key="sb_eval_samples",
                                           help="A class-balanced subset of the evaluation data."))
        data = DataSpec(data.source, data.name, data.digest, data.root, eval_samples)

        st.markdown("#### LRP relevance")
        if PENDING_COMPOSITE_KEY in st.session_state:
            st.session_state["sb_composite"] = st.session_state.pop(PENDING_COMPOSITE_KEY)
        comp = st.selectbox("Composite (rules)", list(COMPOSITES), key="sb_composite",
                            help="\n".join(f"- **{k}**: {v}" for k, v in COMPOSITES.items()))
        st.caption(COMPOSITES[comp])
        n_ref = int(st.number_input("Reference samples", min_value=10, max_value=5000,
                                    value=DEFAULT_REFERENCE_SAMPLES, step=50, key="sb_ref_samples",
                                    help="Images whose relevance is summed to score every weight. Computed once "
                                         "per setting and cached."))

        st.markdown("#### Compute")
        devices = device_choices()  # only what this machine has: cuda only where torch sees a GPU
        device = st.selectbox("Device", devices, index=0, key="sb_device",
                              format_func=lambda d: {"auto": "auto (GPU if available)", "cpu": "CPU",
                                                     "cuda": "CUDA GPU"}.get(d, d),
                              help="Where relevance, evaluation and fine-tuning run. Results are the same float32 "
                                   "numbers up to rounding; the exact top-1 rule holds on every device.")
    settings = Settings(model, data, comp, n_ref, device)
    set_settings(settings, uploads)
    set_data_note(data_note, f"Up to {eval_samples:,} images measure accuracy and {n_ref:,} are the LRP reference "
                             "(class-balanced).")
    return settings


_sidebar()

# Absolute paths: the pages resolve the same wherever the entry script is run from.
PAGES = ROOT / "pages"
pages = [
    st.Page(PAGES / "overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page(PAGES / "relevance.py", title="Relevance", icon=":material/local_fire_department:"),
    st.Page(PAGES / "compress.py", title="Compress", icon=":material/compress:"),
    st.Page(PAGES / "tradeoffs.py", title="Trade-offs", icon=":material/show_chart:"),
    st.Page(PAGES / "auto.py", title="Auto", icon=":material/auto_awesome:"),
]
if (PAGES / "export.py").exists():
    pages.append(st.Page(PAGES / "export.py", title="Export", icon=":material/inventory_2:"))
pages.append(st.Page(PAGES / "learn.py", title="Learn", icon=":material/school:"))

st.navigation(pages, position="top").run()
