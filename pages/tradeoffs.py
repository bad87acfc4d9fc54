"""Trade-offs: size-vs-accuracy curves per criterion (Pareto fronts), the current plan marked; CSV and PNG."""

from __future__ import annotations

import streamlit as st

from pages.common import (
    control,
    evaluate,
    fmt_bytes,
    fmt_pct,
    fmt_pp,
    get_plan,
    model_label,
    page_session,
    per_session_cache,
    run_with_progress,
    session_scope_key,
)
from xaicomp_core import CRITERIA, PlanError
from xaicomp_core.evaluate.sweep import DEFAULT_RATIOS, BitSetting, rows_to_csv, run_sweep, smallest_within
from xaicomp_core.viz import figures

RATIO_SETS = {
    "quick (0, 25, 50, 75, 90 %)": [0.0, 0.25, 0.5, 0.75, 0.9],
    "fine (0-95 % in steps of 10, plus 95 %)": list(DEFAULT_RATIOS),
}

session = page_session(
    "Trade-offs",
    "Each point is one compressed model: how big it is against how accurate it stays. Filled points are "
    "Pareto-optimal for their criterion (no other plan of that criterion is both smaller and more accurate). "
    "The star is the current plan from the Compress page.")
st.markdown(f"**{model_label(session)}**")
plan = get_plan(session)
BITS_CHOICES = ["as in the current plan", "fp32 (pruning only)", "both"]

# Widgets in a form take no on_change: their values are kept when the form is submitted (the run that draws them).
with st.form("sweep_form", border=True):
    c1, c2, c3 = st.columns([2, 2, 2])
    names = list(CRITERIA)
    c = control("tr_criteria", [n for n in ("paper", "lrp", "magnitude") if n in names])
    criteria = c.keep(c1.multiselect("Criteria", names, default=[n for n in c.value if n in names], key=c.key))
    c = control("tr_ratios", next(iter(RATIO_SETS)))
    ratio_set = c.keep(c2.selectbox("Prune ratios", list(RATIO_SETS), index=c.index_in(list(RATIO_SETS)), key=c.key,
                                    help="Rule criteria (paper, lrp-zero) decide by themselves what to prune: one "
                                         "point per bit setting, at the share they prune."))
    c = control("tr_bits", BITS_CHOICES[0])
    bits_choice = c.keep(c3.selectbox("Bit widths", BITS_CHOICES, index=c.index_in(BITS_CHOICES), key=c.key))
    # A callback (not the button's return value) so that the request survives any rerun before it is handled.
    st.form_submit_button("Run sweep", type="primary", on_click=lambda: st.session_state.update(tr_requested=True))

current_bits = BitSetting.of(plan)
bits = {"as in the current plan": [current_bits], "fp32 (pruning only)": [BitSetting()],
        "both": list(dict.fromkeys([current_bits, BitSetting()]))}[bits_choice]
ratios = RATIO_SETS[ratio_set]
cache = per_session_cache("sweeps")
key = (session_scope_key(session), tuple(criteria), tuple(ratios), tuple(bits), plan.replace(
    criterion="lrp", prune_ratio=0.0, bit_levels=[32], bit_split=[]).key())

if st.session_state.pop("tr_requested", False):
    if not criteria:
        st.error("Choose at least one criterion.", icon=":material/warning:")
    else:
        try:
            rows = run_with_progress("Sweeping plans…", lambda progress: run_sweep(
                session, criteria, ratios, bits, base=plan, progress=progress))
            cache.clear()
            cache[key] = rows
        except PlanError as e:
            st.error(str(e), icon=":material/warning:")

rows = cache.get(key)
if rows is None and cache:
    rows = next(iter(cache.values()))
    st.info("Showing the last sweep; its settings differ from the form — press **Run sweep** to update.")
if not rows:
    st.info("Choose criteria and ratios, then press **Run sweep**. Each plan takes about one pass over the "
            "evaluation images; results of plans seen before come from the cache.")
    st.stop()

res = evaluate(session, plan)
current = None
if res is not None:
    current = {"estimated_bytes": res.size.estimated_bytes, "accuracy": res.accuracy,
               "label": f"current plan ({plan.criterion})"}
title = f"{session.info.name}: size vs accuracy"
st.plotly_chart(figures.pareto_figure(rows, current), width="stretch", key="tr_pareto")

best = smallest_within(rows, 0.01)
m1, m2, m3 = st.columns(3)
m1.metric("Plans evaluated", len(rows), border=True)
if best is not None:
    m2.metric("Smallest within 1 pp of the original", fmt_bytes(best["estimated_bytes"]),
              f"{best['compression_ratio']:.1f}× smaller", delta_color="off", delta_arrow="off", border=True,
              help=f"{best['criterion']}, {fmt_pct(best['sparsity'], 1)} of the weights pruned, bits "
                   f"{best['bits']}: accuracy {fmt_pct(best['accuracy'])}")
    m3.metric("…found by", best["criterion"], f"pruned {fmt_pct(best['sparsity'], 1)} · {best['bits']}",
              delta_color="off", delta_arrow="off", border=True)
else:
    m2.metric("Smallest within 1 pp of the original", "none", border=True)

st.subheader("Best plans per criterion")
st.caption("Pareto-optimal plans of each criterion, smallest first. **asked**: the prune ratio of the plan (rule "
           "criteria such as the paper rule decide by themselves); **pruned**: the share of weights really removed.")


def _asked(r: dict) -> str:
    return f"{r['prune_ratio']:.0%}" if CRITERIA[r["criterion"]][1] else "rule"


table = [{"criterion": r["criterion"], "asked": _asked(r), "pruned": fmt_pct(r["sparsity"], 1), "bits": r["bits"],
          "accuracy": fmt_pct(r["accuracy"]), "change": fmt_pp(r["accuracy"] - r["baseline_accuracy"]),
          "size": fmt_bytes(r["estimated_bytes"]), "ratio": f"{r['compression_ratio']:.1f}×"}
         for r in sorted((r for r in rows if r.get("pareto")), key=lambda r: (r["criterion"], r["estimated_bytes"]))]
st.dataframe(table, hide_index=True, width="stretch")

d1, d2, _ = st.columns([1, 1, 1])
d1.download_button("Download CSV", rows_to_csv(rows), file_name="xaicomp-sweep.csv", mime="text/csv",
                   key="tr_csv", icon=":material/download:", on_click="ignore")
d2.download_button("Download PNG", lambda: figures.pareto_png(rows, current, title),  # drawn on the click
                   file_name="xaicomp-pareto.png", mime="image/png", key="tr_png", icon=":material/image:",
                   on_click="ignore")
