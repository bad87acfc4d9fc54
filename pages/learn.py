"""Learn: a guided walkthrough for a class -- what LRP computes, why weights get zero or negative relevance, what
pruning and quantization do -- every step with live numbers from the loaded model."""

from __future__ import annotations

import pathlib

import numpy as np
import streamlit as st

from pages.common import (
    comparison_plan,
    composite,
    control,
    control_value,
    evaluate,
    explain_collapse,
    fmt_bytes,
    fmt_pct,
    fmt_pp,
    get_plan,
    model_label,
    page_session,
    pixel_composite,
    pp_delta,
    result_metrics,
    set_control,
)
from xaicomp_core import CompressionPlan, CompressionSession, XaicompError
from xaicomp_core.viz import figures

HERE = pathlib.Path(__file__).resolve().parent
STEPS = ["1 · The model", "2 · What LRP computes", "3 · Zero and negative", "4 · Pruning", "5 · Quantization",
         "6 · Putting it together"]

session = page_session(
    "Learn: compressing a network with explanations",
    "Six short steps, each illustrated with the model loaded in the sidebar. Use the buttons to move on.")
st.markdown(f"**{model_label(session)}**")

step_control = control("ln_step", STEPS[0])


def _next() -> None:
    current = control_value("ln_step", STEPS[0])
    current = current if current in STEPS else STEPS[0]
    set_control("ln_step", STEPS[min(STEPS.index(current) + 1, len(STEPS) - 1)])


step = step_control.keep(st.segmented_control(
    "Step", STEPS, default=step_control.value if step_control.value in STEPS else STEPS[0], key=step_control.key,
    on_change=step_control.commit, required=True, label_visibility="collapsed") or STEPS[0])
st.divider()
comp = composite()
rel = session.relevance(comp)
names = list(session.layout.names)
class_names = session.class_names


def step_model(session: CompressionSession) -> None:
    st.header("1 · The model and one decision")
    st.markdown("A classifier turns an image into one score per class; the highest score wins. Compression will "
                "change the weights, so we need to know **which weights matter for these decisions**.")
    n = len(session.y_eval)
    c = control("ln_sample", 0)
    i = int(c.keep(st.columns(3)[0].number_input("Evaluation image (index)", 0, n - 1, value=min(int(c.value), n - 1),
                                                 key=c.key, on_change=c.commit)))
    pix = pixel_composite()
    orig, logits = session.input_relevance([i], composite=pix)
    pre = session.info.preprocessing
    img = figures.denormalize(session.x_eval[[i]], pre.mean, pre.std)
    true, pred = int(session.y_eval[i]), int(logits[0].argmax())
    c1, c2 = st.columns([3, 2])
    with c1:
        st.plotly_chart(figures.input_heatmap_grid(img, [orig], [[f"image: {class_names[true]}",
                                                                  f"relevance for '{class_names[true]}' ({pix})"]]),
                        width="stretch", key="ln_img")
    with c2:
        st.metric("True class", class_names[true])
        st.metric("Predicted class", class_names[pred], "right" if pred == true else "wrong",
                  delta_color="normal" if pred == true else "inverse")
        st.metric("Score of the true class", f"{float(logits[0, true]):.2f}",
                  help="The logit LRP starts from: one unit of relevance per image is spread backwards.")
    st.info("The heatmap already is LRP: it shows how the true class' score splits over the pixels. Red pixels "
            "pushed the score up, blue ones down. The next step does the same for **weights**.")
    st.caption(f"Pixel maps use the {pix} rules (change them on the Relevance page); the weights are scored with "
               f"the sidebar's {comp} rules.")


def step_lrp() -> None:
    st.header("2 · What LRP computes for a weight")
    st.markdown("Layer-wise Relevance Propagation passes the class score backwards, layer by layer. With the "
                "**epsilon rule**, the relevance $R_j$ of a neuron is split over its inputs in proportion to their "
                "contribution $a_i w_{ij}$ to its pre-activation $z_j$:")
    st.latex(r"R_{i \leftarrow j} = \frac{a_i\, w_{ij}}{z_j + \epsilon\,\mathrm{sign}(z_j)}\; R_j")
    st.markdown("The share that flows **through weight $w_{ij}$** is its relevance. Summed over all reference images "
                "(and, for convolutions, over all positions the kernel touches), every weight gets one number.")
    st.latex(r"R(w_{ij}) = \sum_{\text{images, positions}} \frac{a_i\, w_{ij}}{z_j + \epsilon\,\mathrm{sign}(z_j)}"
             r"\; R_j")
    st.markdown("**Conservation**: what reaches a layer's weights equals what reaches its inputs, and both are "
                "close to what came from above (the biases and $\\epsilon$ take the rest). Live from this model, "
                f"over {rel.samples} reference images (each starts with one unit of relevance):")
    rows = figures.flow_rows(rel.flows)
    st.dataframe([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                 hide_index=True, width="stretch")
    if rows:
        gap = max(abs(r["weights - inputs"]) for r in rows)
        st.caption(f"Largest gap between weight and input relevance of a layer: {gap:.2g} (rounding only).")


def step_signs() -> None:
    st.header("3 · Why some weights get zero or negative relevance")
    shares = figures.sign_shares(rel.weights, names)
    total = shares[-1]
    c1, c2, c3 = st.columns(3)
    c1.metric("Positive", fmt_pct(total["positive"], 1), border=True)
    c2.metric("Exactly zero", fmt_pct(total["zero"], 1), border=True)
    c3.metric("Negative", fmt_pct(total["negative"], 1), border=True)
    st.markdown(
        "- **Zero**: relevance only flows through active paths. A weight whose input is never positive after a ReLU "
        "(a dead unit, a pixel that is always black, a position max pooling never picks) gets exactly nothing — "
        "on these images it is never used.\n"
        "- **Negative**: $a_i w_{ij}$ pushes the neuron against the direction that helps the true class. Summed "
        "over many images such a weight mostly argued *against* the right answer.\n"
        "- **Positive**: the weight carried evidence for the right class.")
    most_zero = max(shares[:-1], key=lambda r: r["zero"])
    default = names.index(most_zero["layer"] + ".weight") if most_zero["layer"] + ".weight" in names else 0
    c = control("ln_layer", names[default])
    layer = c.keep(st.selectbox("Layer", names, index=c.index_in(names, default), key=c.key, on_change=c.commit,
                                format_func=lambda n: n.removesuffix(".weight")))
    st.plotly_chart(figures.relevance_histogram(rel.weights[layer], f"Weight relevance in {layer}"),
                    width="stretch", key="ln_hist")
    row = shares[names.index(layer)]
    st.caption(f"In {layer.removesuffix('.weight')}: {fmt_pct(row['positive'], 1)} positive, "
               f"{fmt_pct(row['zero'], 1)} exactly zero, {fmt_pct(row['negative'], 1)} negative "
               f"(of {row['weights']:,} weights).")


def step_pruning(session: CompressionSession) -> None:
    st.header("4 · Pruning: remove weights")
    st.markdown("Pruning sets weights to zero and stops storing them. The question is **which ones**. Three "
                "answers, measured live on the evaluation images (all weights kept at fp32 here):")
    zero = evaluate(session, CompressionPlan(criterion="lrp-zero", composite=comp))
    paper_plan = CompressionPlan(criterion="paper", composite=comp)
    paper = evaluate(session, paper_plan)
    if zero is None or paper is None:
        return
    mag = evaluate(session, comparison_plan(paper_plan, paper))
    if mag is None:
        return
    c1, c2, c3 = st.columns(3)
    c1.metric("Zero relevance pruned", fmt_pct(zero.accuracy), **pp_delta(zero.accuracy_change), border=True,
              help=f"{fmt_pct(zero.sparsity, 1)} of the weights removed")
    c2.metric("Paper rule (relevance ≤ 0)", fmt_pct(paper.accuracy), **pp_delta(paper.accuracy_change), border=True,
              help=f"{fmt_pct(paper.sparsity, 1)} of the weights removed")
    c3.metric("Smallest |weight|, same amount", fmt_pct(mag.accuracy), **pp_delta(mag.accuracy_change), border=True,
              help=f"{fmt_pct(mag.sparsity, 1)} of the weights removed")
    st.markdown(
        f"- Removing the **{fmt_pct(zero.sparsity, 1)}** weights with zero relevance changes accuracy by "
        f"**{fmt_pp(zero.accuracy_change)}** — they were never used on the reference images.\n"
        f"- The **paper rule** also removes the negative ones: **{fmt_pct(paper.sparsity, 1)}** pruned, accuracy "
        f"{fmt_pct(paper.accuracy)} ({fmt_pp(paper.accuracy_change)}).\n"
        f"- The classic **magnitude** criterion at the same amount reaches {fmt_pct(mag.accuracy)} "
        f"({fmt_pp(mag.accuracy - paper.accuracy)} against the paper rule).")
    why = explain_collapse(paper_plan, paper)
    if why:
        st.warning(why, icon=":material/psychology_alt:")
    st.caption("Baseline accuracy: " + fmt_pct(session.baseline_accuracy) + ". Try other ratios on the Compress "
               "page; the Trade-offs page draws the whole curve.")


def step_quantization(session: CompressionSession) -> None:
    st.header("5 · Quantization: fewer bits per weight")
    st.markdown("A kept weight needs not 32 bits. With **b bits** it is rounded to one of $2^b$ levels, "
                "$w \\approx s \\cdot q$ with an integer $q$ and one scale $s$ per output channel. The paper gives "
                "**more bits to more relevant weights**.")
    plans = [("8 bits", CompressionPlan.uniform(8, composite=comp)),
             ("4 bits", CompressionPlan.uniform(4, composite=comp)),
             ("2 bits", CompressionPlan.uniform(2, composite=comp)),
             ("8/4/2 by relevance (20/50/30 %)", CompressionPlan(criterion="lrp", bit_levels=[8, 4, 2],
                                                                 bit_split=[0.2, 0.5], composite=comp))]
    results = [(label, evaluate(session, p)) for label, p in plans]
    cols = st.columns(len(results))
    for col, (label, r) in zip(cols, results):
        if r is not None:
            col.metric(label, fmt_pct(r.accuracy), **pp_delta(r.accuracy_change), border=True,
                       help=f"{fmt_bytes(r.size.estimated_bytes)} ({r.compression_ratio:.1f}× smaller)")
            col.caption(f"{fmt_bytes(r.size.estimated_bytes)} · {r.compression_ratio:.1f}× smaller")
    c = control("ln_qlayer", names[0])
    layer = c.keep(st.selectbox("Layer to look at", names, index=c.index_in(names), key=c.key, on_change=c.commit,
                                format_func=lambda n: n.removesuffix(".weight")))
    labels = [label for label, _ in plans]
    c = control("ln_qplan", labels[1])
    choice = c.keep(st.radio("Plan", labels, index=c.index_in(labels, 1), horizontal=True, key=c.key,
                             on_change=c.commit))
    plan = dict(plans)[choice]
    try:
        compressed = session.compress(plan).weights()[layer]
    except XaicompError as e:
        st.error(str(e), icon=":material/warning:")
        return
    original = dict(session.model.named_parameters())[layer].detach()
    st.plotly_chart(figures.quantization_figure(original, compressed, f"{layer}: weights before and after"),
                    width="stretch", key="ln_qfig")
    distinct = len(np.unique(figures.to_numpy(compressed)))
    st.caption(f"The compressed layer holds {distinct:,} distinct values (one set of levels per output channel "
               f"and bit width) instead of {original.numel():,} free floats.")


def step_together(session: CompressionSession) -> None:
    st.header("6 · Putting it together")
    plan = get_plan(session)
    r = evaluate(session, plan)
    if r is None:
        return
    st.markdown(f"Your current plan: **{plan.describe()}**.")
    result_metrics(r)
    st.markdown(
        "1. **Relevance** is computed once on reference images (step 2).\n"
        "2. **Pruning** drops the weights with the least (or non-positive) relevance (steps 3-4).\n"
        "3. **Quantization** gives the remaining weights fewer bits, the most relevant ones the most (step 5).\n"
        "4. The **size** counts everything a real file holds: values (Huffman-coded where that is smaller: the kept "
        "weights are the large ones, so their codes are far from uniform), which weights are kept, each weight's bit "
        "width, scales and the uncompressed biases.")
    st.page_link(HERE / "compress.py", label="Try your own plan on the Compress page", icon=":material/compress:")
    st.page_link(HERE / "tradeoffs.py", label="See the whole size-accuracy curve", icon=":material/show_chart:")


if step == STEPS[0]:
    step_model(session)
elif step == STEPS[1]:
    step_lrp()
elif step == STEPS[2]:
    step_signs()
elif step == STEPS[3]:
    step_pruning(session)
elif step == STEPS[4]:
    step_quantization(session)
else:
    step_together(session)

if step != STEPS[-1]:
    st.button("Next step →", on_click=_next, type="primary", key="ln_next")
