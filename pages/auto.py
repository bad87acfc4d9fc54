"""Auto: the smallest plan within an accuracy budget, searched once per signal (relevance, hybrid, magnitude) and
shown side by side. The search, the numbers and the sentence saying which signal won are the engine's
(:mod:`xaicomp_core.evaluate.auto`); this page draws the form, the progress and the results, keeps them per browser
session, and hands a plan to the Compress page."""

from __future__ import annotations

import streamlit as st

from pages.common import (
    UPLOADS_KEY,
    control,
    fmt_bytes,
    fmt_pct,
    fold_norm_checkbox,
    get_settings,
    model_label,
    page_session,
    per_session_cache,
    pp_delta,
    run_with_progress,
    session_scope_key,
    set_plan,
    sources_for,
)
from xaicomp_core import CompressionPlan, XaicompError
from xaicomp_core.evaluate.auto import DEFAULT_BUDGET, SIGNALS, AutoResult, auto_compare, layer_bits_text, verdict
from xaicomp_core.relevance.lrp import DEFAULT_COMPOSITE

session = page_session(
    "Auto",
    "Search the smallest plan within an accuracy budget: per layer, a prune ratio and a bit width. The search "
    "measures accuracy on the reference images only and reports the plan it found on the evaluation images, "
    "which it never saw. Each signal runs the same search with the same number of evaluations.")
st.markdown(f"**{model_label(session)}**")
settings = get_settings()
if st.session_state.pop("au_open_compress", False):  # set by the button's callback, which made the plan current
    st.switch_page("pages/compress.py")


def _open_in_compress(plan: CompressionPlan) -> None:
    """Button callback (it survives any rerun before the next run): make ``plan`` the current plan, whose controls
    the Compress page then draws, and go there on the next run."""
    set_plan(plan)
    st.session_state["au_open_compress"] = True


with st.form("auto_form", border=True):
    c1, c2, c3, c4, c5 = st.columns([1.2, 1.2, 2, 1.2, 1.2])
    c = control("au_max_drop", 1.0)
    max_drop = float(c.keep(c1.number_input(
        "Max accuracy drop (points)", min_value=0.0, max_value=100.0, value=float(c.value), step=0.25, key=c.key,
        help="Below the original model's accuracy on the search (reference) images.")))
    c = control("au_budget", DEFAULT_BUDGET)
    budget = int(c.keep(c2.number_input(
        "Evaluations per signal", min_value=1, max_value=1000, value=int(c.value), step=10, key=c.key,
        help="Each evaluation is one forward pass over the search images (plus fine-tuning, if asked).")))
    c = control("au_signals", ["hybrid", "magnitude"])
    signals = c.keep(c3.multiselect(
        "Signals, side by side", list(SIGNALS), default=[s for s in c.value if s in SIGNALS], key=c.key,
        help="\n".join(f"- **{k}**: {v['text']}" for k, v in SIGNALS.items())))
    c = control("au_ft_epochs", 0)
    epochs = int(c.keep(c4.number_input(
        "Fine-tuning epochs", min_value=0, max_value=20, value=int(c.value), key=c.key,
        disabled=not session.can_finetune,
        help="Fine-tune every evaluated plan first, as the saved plan will be (in batches of 32 images at a "
             "learning rate of 0.005; slow: one fine-tuning per evaluation)." if session.can_finetune
        else "This data has no training images.")))
    c = control("au_warm_start", DEFAULT_BUDGET)
    warm = int(c.keep(c5.number_input(
        "Warm start (evaluations)", min_value=0, max_value=1000, value=int(c.value), step=10, key=c.key,
        disabled=not session.can_finetune,
        help="With fine-tuning: first search each signal this many evaluations without fine-tuning (fast) and start "
             "the fine-tuned search from its plan, so fine-tuning never ends with a larger plan. 0: off.")))
    fold = fold_norm_checkbox(control("au_fold_norm", True), session)  # in a form: no on_change
    # A callback (not the button's return value) so that the request survives any rerun before it is handled.
    st.form_submit_button("Run search", type="primary", icon=":material/search:",
                          on_click=lambda: st.session_state.update(au_requested=True))
if not session.can_finetune:
    epochs = 0
if not epochs:
    warm = 0
st.caption("Leaving the page stops a search under way; a finished search stays here (per browser session) until "
           "the next one.")

cache = per_session_cache("auto")
request = (session_scope_key(session), settings.composite, max_drop, budget, tuple(signals), epochs, warm, fold)
if st.session_state.pop("au_requested", False):
    if not signals:
        st.error("Choose at least one signal.", icon=":material/warning:")
    else:
        try:
            results = run_with_progress(
                f"Searching ({', '.join(signals)}; {budget + warm} evaluations each): evaluations", lambda progress:
                auto_compare(session, max_drop, signals=signals, budget=budget, finetune_epochs=epochs,
                             composite=settings.composite, progress=progress, warm_start=warm, fold_norm=fold))
            cache.clear()
            cache[request] = results
        except XaicompError as e:
            st.error(str(e), icon=":material/warning:")

shown: tuple | None = request if request in cache else next(iter(cache), None)
if shown is not None and shown[0] != request[0]:  # a search of another model or data set: not shown here
    shown = None
if shown is None:
    st.info("Set the budget and the signals, then press **Run search**. On the built-in models a search of 80 "
            "evaluations per signal takes seconds (LeNet) to a few minutes (VGG).", icon=":material/info:")
    st.stop()
if shown != request:
    st.info("Showing the last search; its settings differ from the form — press **Run search** to update.",
            icon=":material/info:")
results: dict[str, AutoResult] = cache[shown]
_, _, drop_shown, budget_shown, signals_shown, epochs_shown, warm_shown, fold_shown = shown

st.info(verdict(results), icon=":material/balance:")

columns = st.columns(len(results))
for col, (name, r) in zip(columns, results.items()):
    ev = r.evaluation
    search_drop = 100 * (r.search_baseline - r.search_accuracy)
    with col:
        st.subheader(name)
        st.caption(SIGNALS[name]["text"])
        if not r.feasible:
            st.warning(f"No plan within {r.max_drop:g} points on the search images in {r.evaluations} evaluations: "
                       "this is the most accurate plan tried.", icon=":material/warning:")
        st.metric("Compression ratio", f"{r.compression_ratio:.2f}×", border=True,
                  help="fp32 dense bytes / packed bytes")
        st.metric("Size", fmt_bytes(r.estimated_bytes), f"{-100 * ev.size.reduction:.1f}% vs fp32",
                  delta_color="inverse", border=True, help=f"{r.estimated_bytes:,} bytes packed")
        st.metric("Accuracy (evaluation images)", fmt_pct(ev.accuracy), **pp_delta(ev.accuracy_change), border=True,
                  help=f"{ev.correct:,} of {ev.images:,} evaluation images correct (original: "
                       f"{ev.baseline_correct:,}); the search never saw them.")
        st.metric("Drop: search / evaluation", f"{search_drop:.2f} / {-100 * ev.accuracy_change:.2f} "
                  f"± {r.evaluation_half_width:.2f} pt",
                  border=True, help=f"Points below the original model on the {r.search_images:,} search images "
                                    f"(what the budget limits) and on the {ev.images:,} evaluation images, with "
                                    "the half-width of its 95 % interval: on a few thousand images a drop near "
                                    "1 point is known only to within most of a point.")
        st.caption(f"{r.evaluations} of {r.budget} evaluations · {r.seconds:.1f} s · {fmt_pct(ev.sparsity, 1)} "
                   f"pruned · {ev.mean_bits:.2f} mean bits"
                   + (f" · started from the plan found in {r.warm_start} evaluations without fine-tuning"
                      if r.warm_start else ""))
        st.dataframe([{"layer": la.name, "weights": la.params, "pruned": fmt_pct(la.sparsity, 1),
                       "bits": layer_bits_text(r.plan, la.name), "size": fmt_bytes(la.bytes)} for la in ev.layers],
                     hide_index=True, width="stretch", key=f"au_layers_{name}",
                     column_config={"weights": st.column_config.NumberColumn(format="localized")})
        st.button("Open this plan in Compress", key=f"au_open_{name}", icon=":material/compress:", width="stretch",
                  on_click=_open_in_compress, args=(r.plan,))
        st.download_button("Download plan JSON", r.plan.to_json() + "\n", file_name=f"xaicomp-auto-{name}.json",
                           mime="application/json", key=f"au_json_{name}", icon=":material/download:",
                           on_click="ignore", width="stretch")

with st.expander("Reproduce on the command line"):
    options = [("--max-drop", f"{drop_shown:g}"), ("--budget", str(budget_shown)),
               ("--signals", ",".join(signals_shown))]
    if epochs_shown:
        options.append(("--finetune-epochs", str(epochs_shown)))
        if warm_shown:
            options.append(("--warm-start", str(warm_shown)))
    if settings.composite != DEFAULT_COMPOSITE:
        options.append(("--composite", settings.composite))
    if not fold_shown:
        options.append(("--no-fold-norm",))
    options.append(("--save-plan", "plan.json"))
    try:
        sources = sources_for(settings, st.session_state.get(UPLOADS_KEY))
        auto_cmd, compress_cmd = (str(sources.command("auto", options=options)),
                                  str(sources.command("compress", options=[("--plan", "plan.json")])))
    except XaicompError:
        auto_cmd, compress_cmd = "xaicomp auto " + " ".join(" ".join(o) for o in options), \
            "xaicomp compress --plan plan.json"
    st.code(f"{auto_cmd}\n{compress_cmd}", language="bash")
    st.caption(f"The first command runs the same search and saves the first signal's plan ({signals_shown[0]}) to "
               "plan.json; the second evaluates a saved plan (also the JSON downloaded above). An uploaded file "
               "appears as a placeholder path to replace with your file.")
