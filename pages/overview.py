"""Overview: what is loaded -- layers, parameters, fp32 size, baseline accuracy, sample images with predictions."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages.common import fmt_bytes, fmt_pct, model_label, page_session
from xaicomp_core.io.models import count_parameters
from xaicomp_core.viz import figures

session = page_session(
    "Overview",
    "The model and data loaded in the sidebar: its compressible layers, its size as fp32 and how well it "
    "classifies the evaluation images before any compression.")

info = session.info
layout = session.layout
n_params = count_parameters(session.model)
st.markdown(f"**{model_label(session)}**")

c1, c2, c3, c4 = st.columns(4)
c1.metric("Conv / linear layers", len(layout.names), help="Layers whose weights can be pruned and quantized.")
c2.metric("Parameters", f"{n_params:,}", help=f"{layout.total:,} of them are conv/linear weights.")
c3.metric("Size as fp32", fmt_bytes(session.fp32_bytes()),
          help=f"{session.fp32_bytes():,} bytes: 4 bytes per floating-point number of the state dict.")
c4.metric("Baseline accuracy", fmt_pct(session.baseline_accuracy),
          help=f"{session.baseline_correct} of {len(session.y_eval)} evaluation images classified correctly.")

left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("Layers")
    st.caption("Every conv and linear weight tensor; output channels come first in the shape.")
    modules = dict(session.model.named_modules())
    rows = []
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes):
        mod = modules.get(name.rsplit(".", 1)[0])
        rows.append({"layer": name.removesuffix(".weight"), "type": type(mod).__name__ if mod is not None else "?",
                     "weight shape": " × ".join(str(s) for s in shape), "weights": size,
                     "share of weights": f"{100 * size / layout.total:.1f}%"})
    st.dataframe(rows, hide_index=True, width="stretch",
                 column_config={"weights": st.column_config.NumberColumn(format="localized")})
with right:
    st.subheader("Accuracy per class")
    st.caption("Top-1 accuracy of the original model on each class of the evaluation set.")
    st.plotly_chart(figures.per_class_figure(session.class_names, [("original", session.baseline_per_class)]),
                    width="stretch", key="ov_per_class")
    card = info.card or {}
    if card:
        with st.expander("Model card"):
            st.write(card.get("description", ""))
            facts = {k: card[k] for k in ("parameters", "fp32_bytes", "test_accuracy", "eval_accuracy")
                     if k in card}
            st.json(facts, expanded=True)
            if "training" in card and isinstance(card["training"], dict):
                st.code(card["training"].get("command", ""), language="bash")

st.subheader("Sample images and predictions")
st.caption("The first evaluation images with the original model's prediction (green: right, red: wrong).")
n_show = 16
idx = np.arange(min(n_show, len(session.y_eval)))
pre = info.preprocessing
imgs = figures.denormalize(session.x_eval[idx], pre.mean, pre.std)
pred = session.baseline_pred[idx].tolist()
true = session.y_eval[idx].tolist()
names = session.class_names
titles = [f"{names[p]}" if p == t else f"{names[p]} (is {names[t]})" for p, t in zip(pred, true)]
colours = ["#2e7d32" if p == t else "#c62828" for p, t in zip(pred, true)]
st.plotly_chart(figures.sample_grid(imgs, titles, cols=8, colours=colours), width="stretch", key="ov_samples")
