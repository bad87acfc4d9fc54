"""Compress: choose a criterion, prune ratio and bit widths; see accuracy and size at once.

The panel has three parts, each a function: :func:`plan_controls` (the plan's widgets; their values live in
``pages.common``'s control store, so an error elsewhere, a page switch or a model change never resets them),
:func:`show_result` (the engine's evaluation of the plan) and :func:`show_comparison` (the same plan with the classic
criterion). They run in one ``st.fragment``: moving a slider reruns only this panel (never the sidebar or the
relevance), and the engine answers from cached relevance and sorted scores with one forward pass over the
evaluation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import streamlit as st

from pages.common import (
    RATIO_MAX,
    RATIO_STEP,
    UPLOADS_KEY,
    anticipate_neighbours,
    comparison_plan,
    control,
    cuts_to_split,
    evaluate,
    explain_collapse,
    first_numbers,
    fit_plan,
    fmt_bytes,
    fmt_pct,
    fmt_pp,
    fold_norm_checkbox,
    get_plan,
    get_settings,
    model_label,
    page_session,
    pp_delta,
    quietly,
    remember_plan,
    result_metrics,
    sources_for,
    split_to_cuts,
)
from xaicomp_core import CRITERIA, CompressionPlan, CompressionSession, EvaluationResult, PlanError, XaicompError
from xaicomp_core.evaluate.auto import FINETUNE_RECIPES
from xaicomp_core.evaluate.explain import explain_plan
from xaicomp_core.plan import BIT_RANKINGS, FP32, GRANULARITIES, QUANTIZERS, SCOPES
from xaicomp_core.viz import figures
from xaicomp_core.viz.style import criterion_option

LEVEL_OPTIONS = [FP32, 8, 7, 6, 5, 4, 3, 2, 1]
MAX_LEVELS = 4
#: The fine-tuning recipes offered, (batch size, learning rate), by their names.
RECIPE_NAMES = {recipe: name for name, recipe in FINETUNE_RECIPES.items()}


def _recipe_label(recipe: tuple[int, float]) -> str:
    batch, lr = recipe
    name = RECIPE_NAMES.get(tuple(recipe))
    return f"batch {batch}, learning rate {lr:g}" + (f" ({name})" if name else "")


def _bits_label(b: int) -> str:
    return "fp32" if b == FP32 else f"{b} bits"


def _cut_defaults(plan: CompressionPlan, n: int) -> list[int]:
    """Cumulative thresholds (percent) for ``n`` bit levels: the plan's if it has ``n`` levels, else even-ish ones."""
    if len(plan.bit_levels) == n:
        return split_to_cuts(plan.bit_split)
    return {2: [50], 3: [20, 70]}.get(n, [min(100, 25 * (i + 1)) for i in range(n - 1)])


def plan_controls(plan: CompressionPlan, session: CompressionSession) -> CompressionPlan | None:
    """Draw the plan's controls; return the plan they describe (None, with a message, if it is invalid).

    Each control starts from its stored value, or from ``plan`` (the current plan) the first time. A plan with
    per-layer settings (``layer_prune`` / ``layer_bits``, e.g. from the Auto page) keeps them: they are shown as a
    table, the controls set the rest, and a button drops them.
    """
    if plan.layer_prune or plan.layer_bits:
        layers = list(dict.fromkeys([*plan.layer_prune, *plan.layer_bits]))
        st.info(f"**A per-layer plan** (e.g. from the Auto page): {len(plan.layer_prune)} layer(s) have their own "
                f"prune ratio and {len(plan.layer_bits)} their own bit width (table). For those layers the prune "
                "ratio, bit shares and granularity below do not apply; the criterion still chooses the weights "
                "inside each layer, and the quantizer and fine-tuning apply. Removing a bit level the table uses "
                "makes the plan invalid.", icon=":material/layers:")
        st.dataframe([{"layer": k, "pruned": f"{plan.layer_prune[k]:.0%}" if k in plan.layer_prune else "ratio below",
                       "bits": str(plan.layer_bits[k]) if k in plan.layer_bits else "levels below"} for k in layers],
                     hide_index=True, width="stretch", key="cp_layer_plan")
        st.button("Drop the per-layer settings (the controls alone)", key="cp_drop_layers", on_click=remember_plan,
                  args=(plan.replace(layer_prune={}, layer_bits={}),))
    names = list(CRITERIA)
    c = control("cp_criterion", plan.criterion)
    criterion = c.keep(st.selectbox(
        "Criterion", names, index=c.index_in(names, names.index("lrp") if "lrp" in names else 0),
        format_func=criterion_option, key=c.key, on_change=c.commit,
        help="\n".join(f"- **{k}**: {v[0]}" for k, v in CRITERIA.items())))
    uses_ratio = CRITERIA[criterion][1]
    c = control("cp_ratio", int(round(100 * plan.prune_ratio)))
    label = "Prune ratio (% of weights removed)" if uses_ratio else f"Prune ratio (not used: {criterion} decides)"
    ratio = c.keep(st.slider(label, 0, int(round(100 * RATIO_MAX)), value=c.value, step=int(round(100 * RATIO_STEP)),
                             key=c.key, on_change=c.commit, disabled=not uses_ratio, format="%d%%"))
    if not uses_ratio:
        st.caption(f"**{criterion}** decides by itself which weights to prune ({CRITERIA[criterion][0]}); the "
                   "result shows the share it removed.")

    st.markdown("**Bit widths of the kept weights**")
    c = control("cp_levels", list(plan.bit_levels))
    max_levels = max(MAX_LEVELS, len(plan.bit_levels)) if plan.layer_bits else MAX_LEVELS  # per-layer widths
    levels = c.keep(st.multiselect(
        "Bit levels", LEVEL_OPTIONS, default=[b for b in c.value if b in LEVEL_OPTIONS][:max_levels], key=c.key,
        on_change=c.commit, format_func=_bits_label, max_selections=max_levels,
        help="Higher-ranked kept weights get the first level, the rest the next ones."))
    levels = sorted(set(levels), reverse=True)
    n = len(levels)
    defaults = _cut_defaults(plan, n)
    cuts: list[int] = []
    if n == 2:
        c = control("cp_cut2", defaults[0])
        cuts = [c.keep(st.slider(f"Share at {_bits_label(levels[0])} (the rest {_bits_label(levels[1])})", 0, 100,
                                 value=c.value, step=5, key=c.key, on_change=c.commit, format="%d%%"))]
    elif n == 3:
        c = control("cp_cut3", tuple(defaults))
        a, b = c.keep(st.slider(f"Thresholds: top → {_bits_label(levels[0])} | middle → {_bits_label(levels[1])} | "
                                f"rest → {_bits_label(levels[2])}", 0, 100, value=tuple(c.value), step=5, key=c.key,
                                on_change=c.commit, format="%d%%"))
        cuts = [a, b]
    elif n >= 4:
        for i in range(n - 1):
            c = control(f"cp_cut{n}_{i}", defaults[i])
            cuts.append(c.keep(st.slider(f"Top share up to {_bits_label(levels[i])} (cumulative)", 0, 100,
                                         value=c.value, step=5, key=c.key, on_change=c.commit, format="%d%%")))
    if n >= 2:
        shares = [*cuts_to_split(cuts), 1 - cuts[-1] / 100]
        st.caption(" · ".join(f"{max(s, 0):.0%} at {_bits_label(b)}" for s, b in zip(shares, levels))
                   + " of the kept weights, ranked by the bit ranking below.")
    c = control("cp_granularity", plan.granularity)
    granularity = c.keep(st.radio(
        "Bit width chosen per", list(GRANULARITIES), index=c.index_in(list(GRANULARITIES)), key=c.key,
        on_change=c.commit, horizontal=True,
        help="weight: each kept weight gets its own width (the paper; costs a class id per weight); channel: one "
             "width per output channel; layer: one per layer."))
    with st.expander("More settings"):
        c = control("cp_scope", plan.scope)
        scope = c.keep(st.radio("Scope", list(SCOPES), index=c.index_in(list(SCOPES)), key=c.key,
                                on_change=c.commit, horizontal=True,
                                help="global: rank all weights together; per-layer: the same share in every layer."))
        c = control("cp_protect", plan.protect == "first-last")
        protect = c.keep(st.checkbox("Keep first and last layer dense fp32", value=c.value, key=c.key,
                                     on_change=c.commit))
        c = control("cp_ranking", plan.bit_ranking)
        ranking = c.keep(st.selectbox("Bit ranking", list(BIT_RANKINGS), index=c.index_in(list(BIT_RANKINGS)),
                                      key=c.key, on_change=c.commit,
                                      help="What ranks kept weights for bits: the criterion's score, |relevance| "
                                           "or |weight|."))
        c = control("cp_quantizer", plan.quantizer)
        quantizer = c.keep(st.selectbox("Quantizer", list(QUANTIZERS), index=c.index_in(list(QUANTIZERS)),
                                        key=c.key, on_change=c.commit,
                                        help="mse: clipping with least squared error per channel; absmax: scale = "
                                             "max|w|."))
        c = control("cp_seed", plan.seed)
        seed = int(c.keep(st.number_input("Seed (random criterion)", 0, 10_000, value=int(c.value), key=c.key,
                                          on_change=c.commit)))
        c = control("cp_ft_epochs", plan.finetune_epochs)
        epochs = int(c.keep(st.number_input(
            "Recovery fine-tuning (epochs)", 0, 20, value=int(c.value), key=c.key, on_change=c.commit,
            disabled=not session.can_finetune,
            help="Train the kept weights on the training images with masks and bit widths fixed and quantization "
                 "in the loop; the size changes only through the Huffman-coded values, which follow the new codes. "
                 "Takes seconds to minutes per plan (cached).")))
        c = control("cp_ft_recipe", (plan.finetune_batch, plan.finetune_lr))
        recipes = [*RECIPE_NAMES, *([tuple(c.value)] if tuple(c.value) not in RECIPE_NAMES else [])]
        batch, lr = c.keep(st.selectbox(
            "Fine-tuning recipe", recipes, index=recipes.index(tuple(c.value)), key=c.key, on_change=c.commit,
            format_func=_recipe_label, disabled=not session.can_finetune or not epochs,
            help="Images per step and learning rate (SGD, momentum 0.9, cosine decay). Batches of 32 at 0.005 take "
                 "4 times as many steps in the same epochs and recovered more accuracy on held-out images "
                 "(RESULTS.md, held-out check); the plan default is every earlier plan's."))
        if not session.can_finetune:
            st.caption("Fine-tuning needs training images (built-in data or a torchvision folder); this data has "
                       "none, so the plan is evaluated without it.")
        c = control("cp_fold_norm", plan.fold_norm)
        fold = fold_norm_checkbox(c, session, on_change=c.commit)
    if not levels:
        st.error("Choose at least one bit level (fp32 keeps the kept weights unquantized).", icon=":material/warning:")
        return None
    try:
        return CompressionPlan(criterion=criterion, prune_ratio=ratio / 100, scope=scope,
                               protect="first-last" if protect else "none", bit_levels=levels,
                               bit_split=cuts_to_split(cuts), bit_ranking=ranking, granularity=granularity,
                               quantizer=quantizer, composite=plan.composite, seed=seed, finetune_epochs=epochs,
                               finetune_lr=lr, finetune_batch=batch,
                               layer_prune=dict(plan.layer_prune),
                               layer_bits=dict(plan.layer_bits), fold_norm=fold).validate()
    except PlanError as e:
        st.error(str(e), icon=":material/warning:")
        return None


def show_explanation(session: CompressionSession, plan: CompressionPlan) -> None:
    """The engine's :func:`~xaicomp_core.evaluate.explain.explain_plan` of ``plan``: a summary and one row per layer."""
    try:
        expl = explain_plan(session, plan)
    except XaicompError as e:
        st.error(str(e), icon=":material/warning:")
        return
    st.markdown(expl.summary)
    st.dataframe([{"layer": la.name, "weights": la.params, "pruned": fmt_pct(la.pruned_share, 1),
                   "of which R < 0": fmt_pct(la.pruned_negative, 1), "R = 0": fmt_pct(la.pruned_zero, 1),
                   "R > 0": fmt_pct(la.pruned_positive, 1),
                   "mean |output| ×": "from 0" if math.isinf(la.growth) else f"{la.growth:,.3g}"}
                  for la in expl.layers], hide_index=True, width="stretch",
                 column_config={"weights": st.column_config.NumberColumn(format="localized")})
    st.caption(f"Shares of each layer's weights; mean |output| of the compressed layer over the original's on "
               f"{expl.images} evaluation images (before BatchNorm).")


def result_tiles(result: EvaluationResult) -> None:
    """The six tiles and the one-line summary of a result (an estimate says what it is and how sure it is)."""
    plan, size = result.plan, result.size
    result_metrics(result)
    c4, c5, c6 = st.columns(3)
    c4.metric("Weights pruned", fmt_pct(result.sparsity, 1), border=True,
              help="Share of the compressible conv/linear weights set to zero and not stored.")
    c5.metric("Mean bits (kept)", f"{result.mean_bits:.2f}", border=True,
              help="Average bit width of the kept weights (32 = fp32).")
    c6.metric("Original accuracy", fmt_pct(result.baseline_accuracy), border=True)
    if result.estimate:
        st.caption(f"**{plan.describe()}** — first numbers: sizes exact, accuracy estimated from {result.images} "
                   f"class-balanced images of {result.eval_images:,} ({result.seconds:.2f} s); the exact accuracy "
                   "on all images follows.")
    else:
        st.caption(f"**{plan.describe()}** — {result.correct:,} / {result.images:,} images correct (exact); "
                   f"{size.estimated_bytes:,} bytes vs {size.fp32_bytes:,} bytes fp32 "
                   f"(evaluated in {result.seconds:.2f} s).")


def show_result(session: CompressionSession, plan: CompressionPlan, notes: list[str],
                exact_done: Callable[[EvaluationResult], None] | None = None) -> EvaluationResult | None:
    """The engine's numbers of ``plan``, drawn first: an estimate from a class-balanced subset at once (unless the
    exact result is cached), replaced in place by the exact numbers; then the charts. ``exact_done(result)`` is
    called as soon as the exact numbers are drawn, before the charts are built."""
    for note in notes:
        st.info(note, icon=":material/info:")
    tiles = st.empty()
    first = first_numbers(session, plan)
    if first is not None and first.estimate:
        with tiles.container():
            result_tiles(first)
    result = evaluate(session, plan)
    if result is None:
        tiles.empty()
        return None
    with tiles.container():
        result_tiles(result)
    if exact_done is not None:
        exact_done(result)
    size = result.size
    why = explain_collapse(plan, result)
    if why:
        st.warning(why, icon=":material/psychology_alt:")
        with st.expander("Measured: what was pruned, by relevance sign, and how each layer's output changes"):
            show_explanation(session, plan)

    # only the open tab's chart is built and sent (the browser draws one chart, not three, after each release)
    t1, t2, t3 = st.tabs(["Per layer", "Per class", "Where the bytes go"], key="cp_tabs", on_change="rerun")
    if t1.open:
        with t1:
            st.caption("Bars: share of each layer's weights pruned. Dots: mean bit width of the weights it keeps.")
            st.plotly_chart(figures.layer_stats_figure(result.layers), width="stretch", key="cp_layers")
    if t2.open:
        with t2:
            st.caption("Top-1 accuracy per class, original vs compressed.")
            st.plotly_chart(figures.per_class_figure(result.class_names, [
                ("original", result.baseline_per_class_accuracy), ("compressed", result.per_class_accuracy)]),
                width="stretch", key="cp_classes")
    if t3.open:
        with t3:
            st.caption("Everything a real file must hold: kept values (at their widths, or Huffman-coded per layer "
                       "where that is smaller), which weights are kept, the width of each weight, scales, and fp32 "
                       "biases and norms.")
            st.plotly_chart(figures.size_sections_figure(size.section_totals(), size.fp32_bytes), width="stretch",
                            key="cp_sections")
    with st.expander("Reproduce on the command line"):
        try:
            command = str(sources_for(get_settings(), st.session_state.get(UPLOADS_KEY)).command("compress", plan))
        except XaicompError:
            command = f"xaicomp compress {plan.cli_args()}"
        st.code(command, language="bash")
        st.caption("The same model, data and plan on the command line (an uploaded file appears as a placeholder "
                   "path to replace with your file).")
    return result


def show_comparison(session: CompressionSession, plan: CompressionPlan, result: EvaluationResult,
                    ready: EvaluationResult | None = None) -> None:
    """The same pruning budget and bit widths chosen by the other criterion (magnitude, or lrp for magnitude);
    ``ready``: its evaluation, computed earlier by :func:`evaluate_comparison` (None: evaluated here, with a plan
    error shown or a fine-tuning progress bar)."""
    other = comparison_plan(plan, result)
    st.subheader(f"Does the explanation help? The same plan with **{other.criterion}**")
    st.caption(f"{other.describe()} — the same share of weights pruned and the same bit widths, chosen by "
               f"{other.criterion} instead of {plan.criterion}.")
    if ready is not None:
        ref = ready
    else:
        with st.spinner(f"Evaluating the {other.criterion} plan…"):
            ref = evaluate(session, other)
    if ref is None:
        return
    d1, d2, d3 = st.columns(3)
    d1.metric(f"Accuracy with {other.criterion}", fmt_pct(ref.accuracy), **pp_delta(ref.accuracy_change),
              border=True)
    d2.metric(f"Size with {other.criterion}", fmt_bytes(ref.size.estimated_bytes),
              f"{-100 * ref.size.reduction:.1f}% vs fp32", delta_color="inverse", border=True)
    gain = result.accuracy - ref.accuracy
    d3.metric(f"{plan.criterion} vs {other.criterion}", fmt_pp(gain), border=True,
              help="Accuracy of this plan minus accuracy of the comparison plan.")
    size_gap = result.size.estimated_bytes - ref.size.estimated_bytes
    acc_text = (f"keeps **{abs(100 * gain):.2f} pp {'more' if gain > 0 else 'less'}** accuracy than"
                if gain else "reaches **the same accuracy** as")
    size_text = (f"and is **{fmt_bytes(abs(size_gap))} {'smaller' if size_gap < 0 else 'larger'}**" if size_gap
                 else "at the same size")
    st.markdown(f"With the same pruning budget, **{plan.criterion}** {acc_text} **{other.criterion}** {size_text} "
                "(the sizes differ when the criteria keep weights that are cheaper or dearer to encode).")
    st.dataframe(figures.comparison_rows([(f"{plan.criterion} (this plan)", result), (other.criterion, ref)]),
                 hide_index=True, width="stretch")


def evaluate_comparison(session: CompressionSession, plan: CompressionPlan, result: EvaluationResult
                        ) -> EvaluationResult | None:
    """The comparison plan's exact numbers, computed right after your plan's; None for a plan to fine-tune first or
    one the engine refuses (:func:`show_comparison` then evaluates it, with its progress bar or its error).

    Called before the charts are built: the browser draws your plan's numbers meanwhile, and the charts and the
    comparison are sent together afterwards. Drawing the charts first would make the browser render them on the
    cores the comparison's forward pass runs on (measured slower in the real browser)."""
    return quietly(session, comparison_plan(plan, result), session.evaluate)


@st.fragment
def compress_panel(session: CompressionSession) -> None:
    """Controls, live metrics and charts (rerun alone when a control changes). The whole run has priority over the
    session's background work (anticipated neighbours wait between chunks until it ends)."""
    with session.foreground():
        _compress_panel(session)
    # only now, when this run is done, the neighbours of what is on screen are computed in the background
    result = st.session_state.get("_cp_last_result")
    if result is not None:
        anticipate_neighbours(session, result.plan, result)


def _compress_panel(session: CompressionSession) -> None:
    st.session_state.pop("_cp_last_result", None)
    stored = get_plan()
    left, right = st.columns([1, 2.2], gap="large")
    with left, st.container(key="cp_plan"):
        st.subheader("Plan")
        plan = plan_controls(stored, session)
    pending = []
    if plan is None:
        plan = stored
        pending = [f"The controls do not describe a valid plan yet; the result is the last valid plan's "
                   f"(**{plan.describe()}**)."]
    else:
        remember_plan(plan)
    plan, notes = fit_plan(plan, session)
    notes = pending + notes
    comparison: list[EvaluationResult | None] = []
    with right:
        st.subheader("Result")
        result = show_result(session, plan, notes, lambda r: comparison.append(evaluate_comparison(session, plan, r)))
    if result is None:
        return
    st.divider()
    show_comparison(session, plan, result, comparison[0] if comparison else None)
    st.session_state["_cp_last_result"] = result


session = page_session(
    "Compress",
    "Prune the least relevant weights and give the most relevant ones more bits. Every number below comes "
    "from evaluating the compressed model on the evaluation images.")
st.markdown(f"**{model_label(session)}**")
compress_panel(session)
