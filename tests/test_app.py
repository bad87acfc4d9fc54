"""The Streamlit app through ``streamlit.testing.v1.AppTest``: every page renders, the numbers shown are the engine's,
sliders, criteria and models switch, bad input gives readable errors and the app keeps working.

``XAICOMP_TEST_MODEL`` picks another built-in model for the default-model tests (default: the app's default).
"""

from __future__ import annotations

import io
import os
import pathlib
import sys
import zipfile

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from xaicomp_core import CompressionPlan, CompressionSession, load_builtin_dataset, load_builtin_model
from xaicomp_core.format.size import compute_size
from xaicomp_core.viz.figures import fmt_bytes, fmt_pct, fmt_pp

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the app's pages package
DEFAULT_MODEL = "fashion-vgg"
MODEL = os.environ.get("XAICOMP_TEST_MODEL", DEFAULT_MODEL)
PAGES = ["overview", "relevance", "compress", "tradeoffs", "auto", "learn"]
TIMEOUT = 300
DEFAULT_PLAN = CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])


# ------------------------------------------------------------------------------------------------------- helpers
def new_app(model: str = MODEL) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if model != DEFAULT_MODEL:
        at.sidebar.selectbox(key="sb_builtin").select(model).run()
    ok(at)
    return at


def ok(at: AppTest) -> AppTest:
    """No exception and no error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"pages/{page}.py").run()
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def deltas(at: AppTest) -> dict[str, str]:
    return {m.label: m.delta for m in at.metric}


def errors(at: AppTest) -> str:
    return " | ".join(str(e.value) for e in at.error)


def infos(at: AppTest) -> str:
    return " | ".join(str(e.value) for e in at.info)


def warnings(at: AppTest) -> str:
    return " | ".join(str(e.value) for e in at.warning)


def key(at: AppTest, name: str) -> str:
    """The widget key of the app's control ``name`` now (``pages.common.control_key``: the name, or ``name~N`` after
    the app changed its value from code)."""
    store = at.session_state["_controls"] if "_controls" in at.session_state else {"generation": {}}  # noqa: SIM401
    gen = store["generation"].get(name, 0)
    return name if gen == 0 else f"{name}~{gen}"


def controls(at: AppTest) -> dict:
    """What the Compress page's main controls show."""
    return {"criterion": at.selectbox(key=key(at, "cp_criterion")).value,
            "ratio": at.slider(key=key(at, "cp_ratio")).value,
            "levels": list(at.multiselect(key=key(at, "cp_levels")).value)}


def assert_shows(at: AppTest, res, prefix: str = "") -> None:
    """The Compress page's metric cards show exactly the engine's result ``res``."""
    m, d = metrics(at), deltas(at)
    assert m["Accuracy"] == fmt_pct(res.accuracy)
    assert d["Accuracy"] == fmt_pp(res.accuracy_change)
    assert m["Size"] == fmt_bytes(res.size.estimated_bytes)
    assert d["Size"] == f"{-100 * res.size.reduction:.1f}% vs fp32"
    assert m["Compression ratio"] == f"{res.compression_ratio:.2f}×"
    assert m["Weights pruned"] == fmt_pct(res.sparsity, 1)
    assert m["Mean bits (kept)"] == f"{res.mean_bits:.2f}"
    assert m["Original accuracy"] == fmt_pct(res.baseline_accuracy)
    captions = " ".join(c.value for c in at.caption)
    assert f"{res.correct:,} / {res.images:,} images correct" in captions
    assert f"{res.size.estimated_bytes:,} bytes vs {res.size.fp32_bytes:,} bytes fp32" in captions


def engine_session(model: str) -> CompressionSession:
    """An independent engine session with the app's default settings (1000 reference, 2000 evaluation images, the
    5000 training images for fine-tuning)."""
    return CompressionSession(load_builtin_model(model), load_builtin_dataset("fashion-mnist", "reference"),
                              load_builtin_dataset("fashion-mnist", "eval"), reference_samples=1000,
                              train_data=load_builtin_dataset("fashion-mnist", "train"))


def shared_session(model: str) -> CompressionSession:
    """The engine session the app caches for ``model`` with the default sidebar settings (results are cached per
    plan, so checking a displayed plan against it costs nothing; ``test_shared_session_is_the_engine`` checks it
    against an independent session)."""
    from pages.common import ModelSpec, Settings, session_for

    return session_for(Settings(model=ModelSpec("builtin", model)))


@pytest.fixture(scope="module")
def app() -> AppTest:
    """One app instance on the default model, shared by the tests that only read it."""
    return new_app()


@pytest.fixture(scope="module")
def engine(app) -> CompressionSession:
    s = shared_session(MODEL)
    assert s.has_relevance("epsilon"), "the app did not share its session"
    return s


@pytest.fixture(scope="module")
def lenet_engine() -> CompressionSession:
    new_app("fashion-lenet")
    s = shared_session("fashion-lenet")
    assert s.has_relevance("epsilon")
    return s


def test_shared_session_is_the_engine(lenet_engine):
    """The app's cached session gives exactly what an independent engine session gives, and is never mutated."""
    independent = engine_session("fashion-lenet")
    for plan in (DEFAULT_PLAN, DEFAULT_PLAN.replace(criterion="magnitude", prune_ratio=0.8)):
        a, b = lenet_engine.evaluate(plan), independent.evaluate(plan)
        assert (a.accuracy, a.size.estimated_bytes, a.mean_bits) == (b.accuracy, b.size.estimated_bytes, b.mean_bits)
    assert lenet_engine.check_unchanged()


# ------------------------------------------------------------------------------------------------------- pages
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(app, engine, page):
    ok(goto(app, page))
    assert app.title, "page has no title"
    if page == "overview":
        m = metrics(app)
        assert m["Baseline accuracy"] == fmt_pct(engine.baseline_accuracy)
        assert m["Size as fp32"] == fmt_bytes(engine.fp32_bytes())
        assert m["Parameters"] == f"{sum(p.numel() for p in engine.model.parameters()):,}"
        assert m["Conv / linear layers"] == str(len(engine.layout.names))
    elif page == "relevance":
        from xaicomp_core.viz import figures

        total = figures.sign_shares(engine.relevance().weights, engine.layout.names)[-1]
        m = metrics(app)
        assert m["Exactly zero"] == fmt_pct(total["zero"], 1)
        assert m["Negative relevance"] == fmt_pct(total["negative"], 1)
        assert len(app.get("plotly_chart")) >= 5  # signs, mass, layer heatmap, filter drill-down, inputs
        biggest = max(engine.layout.names, key=lambda n: engine.layout.sizes[engine.layout.names.index(n)])
        app.selectbox(key="rel_layer").select(biggest).run()  # the largest matrix is drawn as an image
        ok(app)
        app.selectbox(key="rel_layer").select(engine.layout.names[0]).run()
        app.number_input(key="rel_filter").set_value(1).run()
        ok(app)
    elif page == "compress":
        assert_shows(app, engine.evaluate(DEFAULT_PLAN))
    elif page in ("tradeoffs", "auto"):
        assert any(b.label == ("Run sweep" if page == "tradeoffs" else "Run search") for b in app.button)


def test_export_page_is_listed_and_renders(app):
    ok(goto(app, "export"))


def test_learn_walkthrough_every_step(lenet_engine):
    app = goto(new_app("fashion-lenet"), "learn")
    steps = list(app.button_group(key="ln_step").options)
    assert len(steps) == 6
    for step in steps:
        app.button_group(key=key(app, "ln_step")).set_value(step).run()
        ok(app)
        assert any(h.value.startswith(step.split(" ")[0]) for h in app.header), step
    assert not any(b.key == "ln_next" for b in app.button)  # the last step has no "next"
    app.button_group(key=key(app, "ln_step")).set_value(steps[0]).run()
    app.button(key="ln_next").click().run()
    ok(app)
    assert key(app, "ln_step") != "ln_step"  # a step set by code is drawn by a new widget
    assert app.button_group(key=key(app, "ln_step")).value == steps[1]
    assert any(h.value.startswith(steps[1].split(" ")[0]) for h in app.header)
    # the step survives a visit to another page
    app.button_group(key=key(app, "ln_step")).set_value(steps[2]).run()
    goto(goto(app, "overview"), "learn")
    ok(app)
    assert app.button_group(key=key(app, "ln_step")).value == steps[2]
    assert any(h.value.startswith(steps[2].split(" ")[0]) for h in app.header)


# ------------------------------------------------------------------------------------------------------- compress
def test_prune_slider_shows_engine_values(engine):
    at = goto(new_app(), "compress")
    ok(at)
    res50 = engine.evaluate(DEFAULT_PLAN)
    assert_shows(at, res50)
    at.slider(key="cp_ratio").set_value(75).run()
    ok(at)
    res75 = engine.evaluate(DEFAULT_PLAN.replace(prune_ratio=0.75))
    assert_shows(at, res75)
    assert metrics(at)["Size"] != fmt_bytes(res50.size.estimated_bytes)
    # the comparison with the magnitude criterion at the same pruning budget
    mag = engine.evaluate(DEFAULT_PLAN.replace(criterion="magnitude", prune_ratio=0.75))
    assert metrics(at)["Accuracy with magnitude"] == fmt_pct(mag.accuracy)
    assert metrics(at)["lrp vs magnitude"] == fmt_pp(res75.accuracy - mag.accuracy)
    # bit thresholds
    at.slider(key="cp_cut3").set_value((40, 80)).run()
    ok(at)
    assert_shows(at, engine.evaluate(DEFAULT_PLAN.replace(prune_ratio=0.75, bit_split=[0.4, 0.4])))
    assert at.session_state["plan"].bit_split == [0.4, 0.4]


def test_fold_norm_checkbox_stores_batchnorm_as_scale_and_shift(engine, lenet_engine):
    at = goto(new_app(), "compress")
    ok(at)
    assert not at.checkbox(key="cp_fold_norm").value
    at.checkbox(key="cp_fold_norm").check().run()
    ok(at)
    folded = engine.evaluate(DEFAULT_PLAN.replace(fold_norm=True))
    assert at.session_state["plan"] == DEFAULT_PLAN.replace(fold_norm=True)
    assert_shows(at, folded)
    assert folded.size.estimated_bytes == engine.evaluate(DEFAULT_PLAN).size.estimated_bytes - 8 * 320 + 8 * 5
    # a model without BatchNorm: the box is there, switched off and disabled
    at = goto(new_app("fashion-lenet"), "compress")
    ok(at)
    assert at.checkbox(key="cp_fold_norm").disabled


def test_criterion_switch(lenet_engine):
    engine = lenet_engine
    at = goto(new_app("fashion-lenet"), "compress")
    at.selectbox(key="cp_criterion").select("magnitude").run()
    ok(at)
    mag = engine.evaluate(DEFAULT_PLAN.replace(criterion="magnitude"))
    assert_shows(at, mag)
    assert "Accuracy with lrp" in metrics(at)  # magnitude is compared with lrp
    at.selectbox(key="cp_criterion").select("paper").run()
    ok(at)
    assert at.slider(key="cp_ratio").disabled
    paper = engine.evaluate(DEFAULT_PLAN.replace(criterion="paper"))
    assert_shows(at, paper)
    # the magnitude comparison prunes the share the paper rule pruned
    ref = engine.evaluate(DEFAULT_PLAN.replace(criterion="magnitude", prune_ratio=min(round(paper.sparsity, 4), .99)))
    assert metrics(at)["Accuracy with magnitude"] == fmt_pct(ref.accuracy)
    at.selectbox(key="cp_criterion").select("lrp-filter").run()
    ok(at)
    assert_shows(at, engine.evaluate(DEFAULT_PLAN.replace(criterion="lrp-filter")))
    at.radio(key="cp_granularity").set_value("channel").run()
    ok(at)
    assert_shows(at, engine.evaluate(DEFAULT_PLAN.replace(criterion="lrp-filter", granularity="channel")))


def test_invalid_bit_split_shows_error_and_recovers(lenet_engine):
    engine = lenet_engine
    at = goto(new_app("fashion-lenet"), "compress")
    at.multiselect(key="cp_levels").set_value([8, 6, 4, 2]).run()
    ok(at)
    at.slider(key="cp_cut4_0").set_value(90).run()  # cumulative 90 % > the next threshold (50 %)
    assert not at.exception
    assert "bit split fractions must lie in [0, 1]" in errors(at)
    at.slider(key="cp_cut4_0").set_value(10).run()
    ok(at)
    plan = DEFAULT_PLAN.replace(bit_levels=[8, 6, 4, 2], bit_split=[0.1, 0.4, 0.25])
    assert_shows(at, engine.evaluate(plan))
    at.multiselect(key="cp_levels").set_value([4, 8]).run()  # any order; two levels split 50/50 by default
    ok(at)
    assert at.session_state["plan"].bit_levels == [8, 4]
    assert_shows(at, engine.evaluate(DEFAULT_PLAN.replace(bit_levels=[8, 4], bit_split=[0.5])))
    at.multiselect(key="cp_levels").set_value([]).run()
    assert "Choose at least one bit level" in errors(at)


def test_browser_sessions_have_their_own_plan(engine):
    a = goto(new_app(), "compress")
    b = goto(new_app(), "compress")
    a.slider(key="cp_ratio").set_value(80).run()
    b.run()
    ok(a)
    ok(b)
    assert a.session_state["plan"].prune_ratio == 0.8
    assert b.session_state["plan"].prune_ratio == 0.5
    assert_shows(b, engine.evaluate(DEFAULT_PLAN))
    assert engine.check_unchanged()


# ------------------------------------------------------------------------------------------ models, data, errors
def test_switch_model(lenet_engine):
    at = new_app()
    at.sidebar.selectbox(key="sb_builtin").select("fashion-lenet").run()
    ok(at)
    assert metrics(at)["Parameters"] == "61,706"
    assert metrics(at)["Baseline accuracy"] == fmt_pct(lenet_engine.baseline_accuracy)
    goto(at, "compress")
    ok(at)
    assert_shows(at, lenet_engine.evaluate(DEFAULT_PLAN))
    at.slider(key="cp_ratio").set_value(90).run()
    ok(at)
    assert_shows(at, lenet_engine.evaluate(DEFAULT_PLAN.replace(prune_ratio=0.9)))


@pytest.mark.slow
def test_recovery_finetuning(lenet_engine):
    at = goto(new_app("fashion-lenet"), "compress")
    at.slider(key="cp_ratio").set_value(90).run()
    at.number_input(key="cp_ft_epochs").set_value(1).run()
    ok(at)
    plan = DEFAULT_PLAN.replace(prune_ratio=0.9, finetune_epochs=1)
    tuned = lenet_engine.evaluate(plan)
    assert_shows(at, tuned)
    untuned = lenet_engine.evaluate(plan.replace(finetune_epochs=0))
    # fine-tuning keeps masks, classes and scale groups; only the Huffman-coded values follow the new codes (and
    # which kept weights sit at a zero code, stored as pruned where cheaper: priced here with the plan's masks)
    same = ("keep", "class", "scale", "raw")

    def as_planned(p):
        cw = lenet_engine.compress(p)
        q = cw.quant
        return {k: v for k, v in compute_size(cw.layout, cw.keep, q.klass, q.group_count, q.levels, p.granularity,
                                              {**lenet_engine.compressor.state, **cw.overrides}, codes=q.codes,
                                              zeros_as_pruned=False).section_totals().items() if k in same}

    assert as_planned(plan) == as_planned(plan.replace(finetune_epochs=0))
    assert tuned.accuracy > untuned.accuracy  # ... and recovers accuracy lost at 90 % pruning
    assert at.session_state["plan"].finetune_epochs == 1
    # the recipe: the plan default until another is chosen; then the plan and the numbers are the engine's with it
    box = at.selectbox(key="cp_ft_recipe")
    assert box.value == (128, 0.01) and not box.disabled and len(box.options) == 2
    box.set_value((32, 0.005)).run()
    ok(at)
    assert (at.session_state["plan"].finetune_batch, at.session_state["plan"].finetune_lr) == (32, 0.005)
    assert_shows(at, lenet_engine.evaluate(plan.replace(finetune_batch=32, finetune_lr=0.005)))
    at.number_input(key="cp_ft_epochs").set_value(0).run()
    assert at.selectbox(key="cp_ft_recipe").disabled


def test_sweep_on_tradeoffs(lenet_engine):
    from xaicomp_core.evaluate.sweep import smallest_within

    at = goto(new_app("fashion-lenet"), "tradeoffs")
    at.multiselect(key="tr_criteria").set_value(["paper", "lrp", "magnitude"])
    next(b for b in at.button if b.label == "Run sweep").click()
    at.run()
    ok(at)
    assert metrics(at)["Plans evaluated"] == "11"  # 5 ratios each for lrp and magnitude, one plan for the rule
    assert len(at.get("plotly_chart")) == 1
    assert len(at.get("download_button")) == 2
    rows = next(iter(at.session_state["_cache"]["sweeps"].values()))
    for r in rows:
        res = lenet_engine.evaluate(CompressionPlan.from_json(r["plan"]))
        assert (r["accuracy"], r["estimated_bytes"]) == (res.accuracy, res.size.estimated_bytes)
    best = smallest_within(rows, 0.01)
    shown = metrics(at)["Smallest within 1 pp of the original"]
    assert shown == (fmt_bytes(best["estimated_bytes"]) if best else "none")
    # the table says what the rule really pruned, not the (unused) prune ratio
    table = at.dataframe[0].value
    paper_row = table[table["criterion"] == "paper"].iloc[0]
    paper = lenet_engine.evaluate(DEFAULT_PLAN.replace(criterion="paper"))
    assert paper_row["asked"] == "rule"
    assert paper_row["pruned"] == fmt_pct(paper.sparsity, 1) != "0.0%"
    lrp_rows = table[table["criterion"] == "lrp"]
    assert all(a.endswith("%") for a in lrp_rows["asked"])
    # the form's choices survive a visit to another page (the sweep shown still matches them)
    goto(goto(at, "overview"), "tradeoffs")
    ok(at)
    assert at.multiselect(key=key(at, "tr_criteria")).value == ["paper", "lrp", "magnitude"]
    assert "settings differ" not in infos(at)


def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_bad_uploads_show_errors_and_app_keeps_working():
    at = new_app("fashion-lenet")
    at.sidebar.radio(key="sb_model_source").set_value("upload").run()
    ok(at)  # nothing went wrong yet: an explanation, not an error
    assert "Upload the weights" in infos(at)
    # not a weights file at all
    junk = ("junk.pt", b"this is not torch", "application/octet-stream")
    at.sidebar.file_uploader(key="sb_up_weights").set_value(junk)
    at.run()
    assert not at.exception
    assert "junk.pt" in errors(at) and "corrupt" in errors(at)
    # real weights for another architecture
    at.sidebar.selectbox(key="sb_up_arch").select("fashion-vgg").run()
    at.sidebar.file_uploader(key="sb_up_weights").set_value(
        ("lenet.pt", _state_dict_bytes(load_builtin_model("fashion-lenet")), "application/octet-stream"))
    at.run()
    assert not at.exception
    assert "do not fit" in errors(at)
    # the right architecture: loads, and every page works
    at.sidebar.selectbox(key="sb_up_arch").select("fashion-lenet").run()
    ok(at)
    assert metrics(at)["Parameters"] == "61,706"
    assert "lenet.pt" in " ".join(m.value for m in at.markdown)
    ok(goto(at, "compress"))
    # a torchvision architecture without weights: never downloaded, a readable message
    at.sidebar.radio(key="sb_model_source").set_value("torchvision").run()
    ok(at)  # an explanation of what to do, not an error
    assert "never downloads" in infos(at) and "random weights" in infos(at)
    # back to a built-in model: the page works again
    at.sidebar.radio(key="sb_model_source").set_value("builtin").run()
    ok(at)
    assert "Accuracy" in metrics(at)


def _zip_of_eval_images(n_per_class: int = 4, classes: int = 10) -> bytes:
    """An ImageFolder zip of shipped evaluation images (PNG files written with PIL), ``n_per_class`` per class."""
    ds = load_builtin_dataset("fashion-mnist", "eval")
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in range(classes):
            for k, i in enumerate(np.flatnonzero(ds.labels == c)[:n_per_class]):
                png = io.BytesIO()
                Image.fromarray(ds.images[i]).save(png, format="PNG")
                z.writestr(f"mydata/{c}/img{k}.png", png.getvalue())
    return buf.getvalue()


def test_data_uploads():
    at = new_app("fashion-lenet")
    at.sidebar.radio(key="sb_data_source").set_value("zip").run()
    ok(at)
    assert "Upload a .zip" in infos(at)
    at.sidebar.file_uploader(key="sb_data_zip").set_value(("broken.zip", b"PK not really", "application/zip"))
    at.run()
    assert not at.exception
    assert "broken.zip is not a valid zip file" in errors(at)
    at.sidebar.file_uploader(key="sb_data_zip").set_value(("mine.zip", _zip_of_eval_images(), "application/zip"))
    at.run()
    ok(at)
    assert "20 evaluation images" in " ".join(m.value for m in at.markdown)
    ok(goto(at, "compress"))
    assert metrics(at)["Original accuracy"].endswith("%")
    # a folder that does not exist
    at.sidebar.radio(key="sb_data_source").set_value("torchvision").run()
    at.sidebar.text_input(key="sb_tv_root").input("/nonexistent/torchvision").run()
    assert not at.exception
    assert "/nonexistent/torchvision" in errors(at)


# --------------------------------------------------- the plan's controls survive errors, uploads, pages and models
def _change_plan(at: AppTest) -> CompressionPlan:
    """Move three Compress controls away from the default plan; return the plan they then describe."""
    at.slider(key=key(at, "cp_ratio")).set_value(70).run()
    at.multiselect(key=key(at, "cp_levels")).set_value([8, 4]).run()
    at.radio(key=key(at, "cp_granularity")).set_value("channel").run()
    ok(at)
    return DEFAULT_PLAN.replace(prune_ratio=0.7, bit_levels=[8, 4], bit_split=[0.5], granularity="channel")


def assert_controls_show(at: AppTest, plan: CompressionPlan) -> None:
    """The controls show ``plan``, the page's current plan is ``plan`` and the result caption describes it."""
    assert controls(at) == {"criterion": plan.criterion, "ratio": round(100 * plan.prune_ratio),
                            "levels": plan.bit_levels}
    assert at.radio(key=key(at, "cp_granularity")).value == plan.granularity
    assert at.session_state["plan"] == plan
    assert plan.describe() in " ".join(c.value for c in at.caption)


def test_plan_survives_data_error_and_upload(lenet_engine):
    """Zip data chosen (the page stops above the controls), a broken zip (an error), then a valid one: the controls
    still show the plan, the next touch changes only that control, and the built-in data gives the engine's numbers
    for the plan."""
    at = goto(new_app("fashion-lenet"), "compress")
    plan = _change_plan(at)
    assert_shows(at, lenet_engine.evaluate(plan))
    at.sidebar.radio(key="sb_data_source").set_value("zip").run()
    ok(at)
    assert "Upload a .zip" in infos(at) and not at.slider  # stopped before the controls were drawn
    at.sidebar.file_uploader(key="sb_data_zip").set_value(("broken.zip", b"PK not really", "application/zip"))
    at.run()
    assert "broken.zip is not a valid zip file" in errors(at) and not at.slider
    at.sidebar.file_uploader(key="sb_data_zip").set_value(("mine.zip", _zip_of_eval_images(6), "application/zip"))
    at.run()
    ok(at)
    assert_controls_show(at, plan)
    at.slider(key=key(at, "cp_ratio")).set_value(75).run()
    ok(at)
    plan = plan.replace(prune_ratio=0.75)
    assert_controls_show(at, plan)
    at.sidebar.radio(key="sb_data_source").set_value("builtin").run()
    ok(at)
    assert_controls_show(at, plan)
    assert_shows(at, lenet_engine.evaluate(plan))


def test_plan_survives_failed_weight_uploads(lenet_engine):
    at = goto(new_app("fashion-lenet"), "compress")
    plan = _change_plan(at)
    at.sidebar.radio(key="sb_model_source").set_value("upload").run()
    assert "Upload the weights" in infos(at) and not at.slider
    junk = ("junk.pt", b"this is not torch", "application/octet-stream")
    at.sidebar.file_uploader(key="sb_up_weights").set_value(junk)
    at.run()
    assert "junk.pt" in errors(at) and not at.slider
    at.sidebar.radio(key="sb_model_source").set_value("builtin").run()
    ok(at)
    assert_controls_show(at, plan)
    assert_shows(at, lenet_engine.evaluate(plan))
    at.multiselect(key=key(at, "cp_levels")).set_value([8, 4, 2]).run()  # a third level: the default thresholds
    ok(at)
    assert at.slider(key=key(at, "cp_cut3")).value == (20, 70)
    assert_shows(at, lenet_engine.evaluate(plan.replace(bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])))


def test_plan_survives_page_switch_and_model_change(lenet_engine, engine):
    at = goto(new_app("fashion-lenet"), "compress")
    plan = _change_plan(at)
    at.selectbox(key=key(at, "cp_criterion")).select("magnitude").run()
    plan = plan.replace(criterion="magnitude")
    goto(goto(at, "overview"), "compress")
    ok(at)
    assert_controls_show(at, plan)
    assert_shows(at, lenet_engine.evaluate(plan))
    at.sidebar.selectbox(key="sb_builtin").select(MODEL).run()  # another model: the same plan applied to it
    ok(at)
    assert_controls_show(at, plan)
    assert_shows(at, engine.evaluate(plan))


def test_invalid_controls_keep_the_last_valid_plan(lenet_engine):
    at = goto(new_app("fashion-lenet"), "compress")
    plan = _change_plan(at)
    at.multiselect(key=key(at, "cp_levels")).set_value([]).run()
    assert "Choose at least one bit level" in errors(at)
    assert "last valid plan" in infos(at)
    assert_shows(at, lenet_engine.evaluate(plan))  # the result of the last valid plan stays on screen
    at.slider(key=key(at, "cp_ratio")).set_value(60).run()  # other controls still move; the plan waits for bits
    assert at.session_state["plan"] == plan
    at.multiselect(key=key(at, "cp_levels")).set_value([4]).run()
    ok(at)
    plan = plan.replace(prune_ratio=0.6, bit_levels=[4], bit_split=[])
    assert at.session_state["plan"] == plan
    assert_shows(at, lenet_engine.evaluate(plan))


def test_fit_plan_without_training_data(lenet_session, lenet_engine):
    """A plan with fine-tuning on data without training images is evaluated without it, and says so; the stored plan
    keeps its epochs for data that has training images."""
    from pages.common import fit_plan

    plan = DEFAULT_PLAN.replace(finetune_epochs=2)
    assert not lenet_session.can_finetune
    fitted, notes = fit_plan(plan, lenet_session)
    assert fitted == plan.replace(finetune_epochs=0)
    assert len(notes) == 1 and "no training images" in notes[0] and "2 epoch" in notes[0]
    assert fit_plan(plan, lenet_engine) == (plan, [])


def test_other_pages_keep_their_controls(lenet_engine):
    at = goto(new_app("fashion-lenet"), "relevance")
    layer = lenet_engine.layout.names[2]
    at.selectbox(key=key(at, "rel_layer")).select(layer).run()
    at.multiselect(key=key(at, "rel_samples")).set_value([5, 7]).run()
    ok(at)
    goto(goto(at, "compress"), "relevance")
    ok(at)
    assert at.selectbox(key=key(at, "rel_layer")).value == layer
    assert at.multiselect(key=key(at, "rel_samples")).value == [5, 7]


# ------------------------------------------------------------------------------------ screens that explain themselves
def test_paper_rule_explains_chance(lenet_engine):
    at = goto(new_app("fashion-lenet"), "compress")
    at.selectbox(key=key(at, "cp_criterion")).select("paper").run()
    ok(at)
    res = lenet_engine.evaluate(DEFAULT_PLAN.replace(criterion="paper"))
    assert_shows(at, res)
    assert res.accuracy <= 0.2  # the paper's rule drops the model to about chance (README, RESULTS.md)
    why = warnings(at)
    assert "chance for 10 classes" in why and "inhibitory inputs" in why
    assert fmt_pct(res.sparsity, 1) in why
    for layer in res.layers:  # how much of each layer the rule removed, from the engine's result
        assert f"{layer.name.removesuffix('.weight')} {layer.sparsity:.0%}" in why
    from xaicomp_core.evaluate.explain import explain_plan

    expl = explain_plan(lenet_engine, DEFAULT_PLAN.replace(criterion="paper"))  # the engine's measured explanation
    assert expl.summary in " ".join(m.value for m in at.markdown)
    rows = next(d.value for d in at.dataframe if "of which R < 0" in d.value.columns)
    assert list(rows["pruned"]) == [fmt_pct(la.pruned_share, 1) for la in expl.layers]
    at.selectbox(key=key(at, "cp_criterion")).select("lrp").run()
    ok(at)
    assert "chance" not in warnings(at)


def test_neutral_accuracy_change_is_grey(lenet_engine):
    from streamlit.proto.Metric_pb2 import Metric

    at = goto(new_app("fashion-lenet"), "compress")
    lossy = next(m for m in at.metric if m.label == "Accuracy")
    assert lossy.delta.startswith("-") and lossy.proto.color == Metric.RED and lossy.proto.direction == Metric.DOWN
    at.slider(key=key(at, "cp_ratio")).set_value(0).run()
    at.multiselect(key=key(at, "cp_levels")).set_value([32]).run()  # nothing pruned, fp32: the original model
    ok(at)
    same = next(m for m in at.metric if m.label == "Accuracy")
    assert same.delta == "+0.00 pp"
    assert same.proto.color == Metric.GRAY and same.proto.direction == Metric.NONE


def test_wilson_interval():
    from pages.common import wilson_interval

    lo, hi = wilson_interval(9, 9)  # textbook values of the 95 % Wilson score interval
    assert round(lo, 3) == 0.701 and hi == 1.0
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 3) == 0.278
    lo, hi = wilson_interval(50, 100)
    assert round(lo, 3) == 0.404 and round(hi, 3) == 0.596


def test_few_images_warning_and_sidebar_counts():
    from pages.common import wilson_interval

    at = new_app("fashion-lenet")
    note = " ".join(c.value for c in at.sidebar.caption)
    assert "In use: 2,000 images measure accuracy, 1,000 are the LRP reference" in note
    at.sidebar.radio(key="sb_data_source").set_value("zip").run()
    at.sidebar.file_uploader(key="sb_data_zip").set_value(
        ("tiny.zip", _zip_of_eval_images(2, classes=9), "application/zip"))  # 18 images: 9 score, 9 evaluate
    at.run()
    ok(at)
    note = " ".join(c.value for c in at.sidebar.caption)
    assert "In use: 9 images measure accuracy, 9 are the LRP reference" in note and "no fine-tuning" in note
    warn = warnings(at)
    assert "Only 9 evaluation images" in warn
    baseline = metrics(at)["Baseline accuracy"]
    n_correct = round(float(baseline.rstrip("%")) / 100 * 9)
    lo, hi = wilson_interval(n_correct, 9)
    assert f"{baseline} ({n_correct} of 9)" in warn
    assert f"from {fmt_pct(lo, 0)} to {fmt_pct(hi, 0)}" in warn
    # the counts follow the sidebar's numbers
    at.sidebar.radio(key="sb_data_source").set_value("builtin").run()
    at.sidebar.number_input(key="sb_eval_samples").set_value(500).run()
    at.sidebar.number_input(key="sb_ref_samples").set_value(300).run()
    ok(at)
    assert not warnings(at)
    note = " ".join(c.value for c in at.sidebar.caption)
    assert "In use: 500 images measure accuracy, 300 are the LRP reference" in note


def test_torchvision_without_weights_is_explained_not_an_error():
    at = new_app("fashion-lenet")
    at.sidebar.radio(key="sb_model_source").set_value("torchvision").run()
    ok(at)
    assert "needs weights" in infos(at) and "random weights" in infos(at)
    assert not at.metric  # nothing loaded until the user decides


# ------------------------------------------------------------------------------------------------------- auto
def test_auto_panel_shows_the_engine_search_and_hands_the_plan_to_compress(tmp_path, capsys):
    """The Auto page runs the engine's search (the same numbers as ``auto_compare`` with the same arguments), says
    which signal won in the engine's words, hands a per-layer plan to Compress (which shows and evaluates exactly
    that plan), renders CLI commands that reproduce it, and reports a bad request as one readable line."""
    import json
    import shlex

    from pages.common import DataSpec, ModelSpec, Settings, session_for
    from xaicomp_core.cli.main import main as cli_main
    from xaicomp_core.evaluate.auto import auto_compare, verdict

    at = new_app("fashion-lenet")
    at.sidebar.number_input(key="sb_eval_samples").set_value(300).run()
    at.sidebar.number_input(key="sb_ref_samples").set_value(200).run()
    goto(at, "auto")
    ok(at)
    assert "Run search" in infos(at) and not at.metric
    # no signal: one readable line, and the page keeps working
    at.multiselect(key="au_signals").set_value([])
    next(b for b in at.button if b.label == "Run search").click()
    at.run()
    assert errors(at) == "Choose at least one signal."
    at.number_input(key="au_budget").set_value(6)
    at.number_input(key="au_max_drop").set_value(1.5)
    at.multiselect(key="au_signals").set_value(["hybrid", "magnitude"])
    next(b for b in at.button if b.label == "Run search").click()
    at.run()
    ok(at)
    session = session_for(Settings(model=ModelSpec("builtin", "fashion-lenet"), data=DataSpec(eval_samples=300),
                                   reference_samples=200))
    assert (len(session.y_eval), len(session.y_ref)) == (300, 200)
    expect = auto_compare(session, 1.5, signals=["hybrid", "magnitude"], budget=6, composite="epsilon")
    shown = next(iter(at.session_state["_cache"]["auto"].values()))
    assert list(shown) == ["hybrid", "magnitude"]
    for k, r in expect.items():
        assert shown[k].plan == r.plan and shown[k].history == r.history
    assert verdict(expect) in infos(at)
    tiles = [(m.label, m.value, m.delta) for m in at.metric]
    assert len(tiles) == 8  # four per signal, side by side
    for r, chunk, frame in zip(expect.values(), (tiles[:4], tiles[4:]), at.dataframe):
        ev = r.evaluation
        assert chunk[0][1] == f"{r.compression_ratio:.2f}×"
        assert chunk[1][1] == fmt_bytes(r.estimated_bytes)
        assert (chunk[2][1], chunk[2][2]) == (fmt_pct(ev.accuracy), fmt_pp(ev.accuracy_change))
        search_drop = 100 * (r.search_baseline - r.search_accuracy)
        half = r.evaluation_half_width
        assert half > 0 and chunk[3][1] == f"{search_drop:.2f} / {-100 * ev.accuracy_change:.2f} ± {half:.2f} pt"
        table = frame.value
        assert list(table["layer"]) == [la.name for la in ev.layers]
        assert list(table["bits"]) == [str(r.plan.layer_bits[la.name]) for la in ev.layers]
    # the commands reproduce the search on the command line (same model, data, split and plan)
    code = at.code[0].value.splitlines()
    auto_cmd = shlex.split(code[0])
    assert auto_cmd[:2] == ["xaicomp", "auto"] and code[1].split()[:2] == ["xaicomp", "compress"]
    saved = tmp_path / "plan.json"
    argv = [str(saved) if w == "plan.json" else w for w in auto_cmd[1:]]
    assert cli_main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"]["hybrid"]["plan"] == expect["hybrid"].plan.to_dict()
    assert out["results"]["hybrid"]["compression_ratio"] == expect["hybrid"].compression_ratio
    assert CompressionPlan.from_json(saved.read_text()) == expect["hybrid"].plan
    # the hand-over: Compress shows the per-layer plan and evaluates exactly it
    at.button(key="au_open_hybrid").click().run()
    ok(at)
    plan = expect["hybrid"].plan
    assert at.session_state["plan"] == plan
    if at.title[0].value != "Compress":  # AppTest does not follow a script's st.switch_page; a browser does
        goto(at, "compress")
        ok(at)
    assert at.session_state["plan"] == plan
    assert "per-layer plan" in infos(at)
    layer_table = at.dataframe[0].value  # the per-layer table above the controls
    assert list(layer_table["bits"]) == [str(plan.layer_bits[k]) for k in plan.layer_bits]
    assert controls(at)["criterion"] == plan.criterion
    assert controls(at)["levels"] == plan.bit_levels
    assert_shows(at, expect["hybrid"].evaluation)
    # the search stays on its page (per browser session) after the visit, and only for the data it was run on
    goto(at, "auto")
    ok(at)
    assert verdict(expect) in infos(at)
    at.sidebar.number_input(key="sb_eval_samples").set_value(350).run()
    ok(at)
    assert verdict(expect) not in infos(at) and "Run search" in infos(at) and not at.metric


@pytest.mark.slow
def test_auto_panel_warm_starts_a_fine_tuned_search():
    """With fine-tuning, the Auto page first searches without it and starts from that plan (the engine's
    ``warm_start``), says so under each signal, and the command it shows does the same."""
    from pages.common import DataSpec, ModelSpec, Settings, session_for
    from xaicomp_core.evaluate.auto import auto_compare

    at = new_app("fashion-lenet")
    at.sidebar.number_input(key="sb_eval_samples").set_value(300).run()
    at.sidebar.number_input(key="sb_ref_samples").set_value(200).run()
    goto(at, "auto")
    at.number_input(key="au_budget").set_value(2)
    at.number_input(key="au_ft_epochs").set_value(1)
    at.number_input(key="au_warm_start").set_value(5)
    at.multiselect(key="au_signals").set_value(["magnitude"])
    next(b for b in at.button if b.label == "Run search").click()
    at.run(timeout=600)
    ok(at)
    session = session_for(Settings(model=ModelSpec("builtin", "fashion-lenet"), data=DataSpec(eval_samples=300),
                                   reference_samples=200))
    expect = auto_compare(session, 1.0, signals=["magnitude"], budget=2, finetune_epochs=1, warm_start=5,
                          composite="epsilon")["magnitude"]
    shown = next(iter(at.session_state["_cache"]["auto"].values()))["magnitude"]
    assert shown.plan == expect.plan and shown.history == expect.history and shown.warm_start == expect.warm_start
    assert any(h["phase"] == "start" for h in shown.history)
    if shown.warm_start:
        assert any("started from the plan found in 5 evaluations" in c.value for c in at.caption)
    assert "--warm-start 5" in at.code[0].value and "--finetune-epochs 1" in at.code[0].value
