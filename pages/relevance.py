"""Relevance: where the LRP relevance of the weights sits -- per layer, per channel pair, per kernel -- and which
pixels the original and the compressed model rely on."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages.common import (
    composite,
    control,
    control_value,
    get_plan,
    model_label,
    page_session,
    per_session_cache,
    pixel_composite,
    session_scope_key,
    set_control,
)
from xaicomp_core import COMPOSITES, CompressionSession, RelevanceResult, XaicompError
from xaicomp_core.viz import figures

session = page_session(
    "Relevance",
    "LRP spreads each image's class score back over the network. Summed over the reference images, every "
    "weight gets a relevance: **red = evidence for the true class, blue = against it, white = none**.")
comp = composite()
rel = session.relevance(comp)
names = list(session.layout.names)
st.markdown(f"**{model_label(session)}**")

# ---------------------------------------------------------------------------------------------------- per layer
shares = figures.sign_shares(rel.weights, names)
total = shares[-1]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Weights scored", f"{total['weights']:,}", border=True)
c2.metric("Positive relevance", figures.fmt_pct(total["positive"], 1), border=True,
          help="Weights that carried evidence for the true class.")
c3.metric("Exactly zero", figures.fmt_pct(total["zero"], 1), border=True,
          help="Weights that never received any signal on the reference images: pruning them changes nothing.")
c4.metric("Negative relevance", figures.fmt_pct(total["negative"], 1), border=True,
          help="Weights that, summed over the images, argued against the true class.")

left, right = st.columns(2, gap="large")
with left:
    st.subheader("Sign of the relevance per layer")
    st.caption("Share of each layer's weights with positive, exactly zero and negative summed relevance. The "
               "paper rule prunes all zero and negative ones.")
    st.plotly_chart(figures.sign_share_figure(shares), width="stretch", key="rel_signs")
with right:
    st.subheader("Relevance mass vs weight count")
    st.caption("Each layer's share of all weights next to its share of the total |relevance|. Layers with much "
               "less relevance than weights are where a global LRP criterion prunes most.")
    st.plotly_chart(figures.mass_vs_count_figure(figures.mass_vs_count(rel.weights, names)), width="stretch",
                    key="rel_mass")


# ---------------------------------------------------------------------------------------------------- one layer
@st.fragment
def layer_detail(session: CompressionSession, rel: RelevanceResult, names: list[str]) -> None:
    """Heatmap of one layer's weight relevance and a drill-down into one filter (reruns alone)."""
    st.divider()
    st.subheader("Weight relevance of one layer")
    c = control("rel_layer", names[0])
    layer = c.keep(st.selectbox("Layer", names, index=c.index_in(names), key=c.key, on_change=c.commit,
                                format_func=lambda n: f"{n.removesuffix('.weight')}  "
                                f"({' × '.join(map(str, session.layout.shapes[names.index(n)]))})"))
    r = rel.weights[layer]
    is_conv = r.ndim > 2
    mat = figures.weight_matrix(r)
    if is_conv:
        st.caption("Each cell is one kernel: the relevance of its weights summed over the kernel's positions — rows "
                   "are output channels (filters), columns input channels. Colours are clipped at the 99th "
                   "percentile of |R|.")
        x_title, y_title = "input channel", "output channel (filter)"
    else:
        st.caption("The weight matrix itself: rows are outputs, columns inputs. Colours are clipped at the 99th "
                   "percentile of |R|.")
        x_title, y_title = "input", "output"
    st.plotly_chart(figures.relevance_heatmap(mat, "", x_title, y_title, height=460 if mat.shape[0] > 20 else 300),
                    width="stretch", key="rel_heatmap")
    row_sum = mat.sum(1)
    st.caption(f"Total relevance of this layer's weights: {float(mat.sum()):.4g} "
               f"(most relevant {y_title}: {int(np.argmax(row_sum))}, least: {int(np.argmin(row_sum))}).")

    if is_conv:
        st.markdown("**Drill down into one filter**")
        n_out = int(r.shape[0])
        order = np.argsort(-row_sum)
        default = int(order[0])
        if control_value("rel_filter_layer") != layer:  # another layer: start at its most relevant filter
            set_control("rel_filter", default)
            set_control("rel_filter_layer", layer)
        c = control("rel_filter", default)
        f = int(c.keep(st.number_input(f"Filter (output channel 0…{n_out - 1}; the most relevant is {default})", 0,
                                       n_out - 1, value=min(int(c.value), n_out - 1), key=c.key, on_change=c.commit)))
        weights = dict(session.model.named_parameters())[layer].detach()
        st.caption(f"Filter {f}: one tile per input channel, relevance (left) and the weights themselves (right). "
                   f"Summed relevance {float(row_sum[f]):.4g}; rank {int(np.where(order == f)[0][0]) + 1} of {n_out}.")
        st.plotly_chart(figures.kernel_figure(r[f], weights[f]), width="stretch", key="rel_kernel")


layer_detail(session, rel, names)


# ---------------------------------------------------------------------------------------------------- inputs
@st.fragment
def input_heatmaps(session: CompressionSession) -> None:
    """Pixel relevance of chosen samples, original and compressed model side by side."""
    st.subheader("Which pixels does the model use?")
    plan = get_plan(session)
    st.caption("Pixel relevance for the true class: red pixels speak for it, blue against it. The right column "
               f"uses the compressed model of the current plan (**{plan.describe()}**, set on the Compress page).")
    n = len(session.y_eval)
    names = session.class_names
    c = control("rel_samples", list(range(min(4, n))))
    chosen = c.keep(st.multiselect("Evaluation images", list(range(n)), default=[i for i in c.value if i < n][:6],
                                   key=c.key, on_change=c.commit, max_selections=6,
                                   format_func=lambda i: f"#{i} {names[int(session.y_eval[i])]}"))
    c1, c2 = st.columns([2, 1])
    comps = list(COMPOSITES)
    c = control("rel_pixel_composite", pixel_composite())
    pix = c.keep(c1.selectbox("LRP rules for the pixel heatmaps", comps, index=c.index_in(comps), key=c.key,
                              on_change=c.commit,
                              help="The weights are scored with the sidebar's rules. Pixel maps are easier to read "
                                   "with epsilon-gamma-box (z-box on the first layer, gamma on the other convs)."))
    c = control("rel_compare", True)
    compare = c.keep(c2.toggle("Also show the compressed model", value=c.value, key=c.key, on_change=c.commit))
    if not chosen:
        st.info("Choose at least one image.")
        return
    cache = per_session_cache("input_relevance")
    key = (session_scope_key(session), pix, tuple(chosen), plan.key() if compare else None)
    try:
        if key not in cache:
            with st.spinner("Computing pixel relevance…"):
                orig, logits = session.input_relevance(chosen, composite=pix)
                comp_rel = session.input_relevance(chosen, plan=plan, composite=pix) if compare else None
            cache.clear()
            cache[key] = (orig, logits, comp_rel)
        orig, logits, comp_rel = cache[key]
    except XaicompError as e:
        st.error(str(e), icon=":material/warning:")
        return
    pre = session.info.preprocessing
    imgs = figures.denormalize(session.x_eval[chosen], pre.mean, pre.std)
    pred = logits.argmax(1).tolist()
    rels = [orig]
    cpred: list[int] = []
    if comp_rel is not None:
        rels.append(comp_rel[0])
        cpred = comp_rel[1].argmax(1).tolist()
    titles = []
    for k, i in enumerate(chosen):
        row = [f"#{i}: {names[int(session.y_eval[i])]}", f"original → {names[pred[k]]}"]
        if cpred:
            row.append(f"compressed → {names[cpred[k]]}")
        titles.append(row)
    st.plotly_chart(figures.input_heatmap_grid(imgs, rels, titles), width="stretch", key="rel_inputs")
    st.caption("Title: true class of the image; above each heatmap, the class that model predicts. Both heatmaps "
               "of a row share one colour scale.")


st.divider()
input_heatmaps(session)
