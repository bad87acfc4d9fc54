"""State and helpers shared by all pages of the xaicomp app.

The sidebar (drawn by ``app.py``) stores the user's choices as a :class:`Settings` object in ``st.session_state``.
Pages then call:

* :func:`get_session` -- the shared, cached :class:`~xaicomp_core.CompressionSession` for those settings, with the
  relevance of the chosen LRP composite computed (once, with a progress bar) and cached; :func:`page_session`
  starts a page with its title and caption and stops it when there is no session;
* :func:`get_plan` / :func:`set_plan` -- this browser session's current :class:`~xaicomp_core.CompressionPlan`
  (``get_plan(session)``: fitted to the loaded model and data, see :func:`fit_plan`);
* :func:`control` / :func:`set_control` -- the value of every page control (widget), owned here so that it survives
  errors, reruns, page switches and model or data changes;
* :func:`evaluate` -- ``session.evaluate(plan)`` with plan errors shown as a readable message;
* :func:`model_label` -- a one-line description of what is loaded.

Cached objects (models, data sets, sessions) are shared by all browser sessions and never mutated here: the session
caches relevance and results internally and is thread-safe. Each browser session has its own plan, sweep results
and control values in ``st.session_state``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from torch import nn

from xaicomp_core import (
    CompressionPlan,
    CompressionSession,
    EvaluationResult,
    ImageDataset,
    WeightsError,
    XaicompError,
)
from xaicomp_core.compress.criteria import get_criterion
from xaicomp_core.evaluate.progressive import neighbour_plans
from xaicomp_core.io.fit import Budget, fmt_seconds
from xaicomp_core.io.models import BUILTIN_MODELS, MODELS_DIR, TORCHVISION_ARCHS
from xaicomp_core.io.onnx_import import InputSpec, parse_class_names, parse_floats, parse_size
from xaicomp_core.io.sources import DataSource, ModelSource, Sources, reference_subset, resolve_data
from xaicomp_core.io.user_code import code_allowed
from xaicomp_core.relevance.lrp import COMPOSITES, DEFAULT_COMPOSITE
from xaicomp_core.viz.figures import fmt_bytes, fmt_pct, fmt_pp  # noqa: F401  (re-exported for the pages)

SETTINGS_KEY = "settings"
PLAN_KEY = "plan"
UPLOADS_KEY = "uploads"
PENDING_COMPOSITE_KEY = "_pending_composite"

DEFAULT_MODEL = "fashion-vgg"
#: Rules for pixel heatmaps unless the user picks others: z-box on the first layer and gamma on the other convs give
#: far less noisy pixel maps than plain epsilon (the weights are always scored with the sidebar's composite).
PIXEL_COMPOSITE = "epsilon-gamma-box"
DEFAULT_REFERENCE_SAMPLES = 1000
DEFAULT_EVAL_SAMPLES = 2000
#: Reference and fine-tuning images taken from the training split of a torchvision folder (balanced, disjoint).
FOLDER_REFERENCE_IMAGES = 1000
FOLDER_TRAIN_IMAGES = 5000


#: The Compress page's slider steps (prune ratio and bit thresholds): anticipation computes one step each way.
RATIO_STEP = 0.05
SPLIT_STEP = 0.05
#: The prune-ratio slider's largest position (its positions: 0, RATIO_STEP, ..., RATIO_MAX).
RATIO_MAX = 0.95
#: Evaluation results an app session keeps (about 20 kB each): enough for several browser sessions' anticipated
#: plans (up to MAX_ANTICIPATED each) without evicting one another's.
SESSION_RESULTS = 256


def default_plan(composite: str = DEFAULT_COMPOSITE) -> CompressionPlan:
    """The plan a new browser session starts with: prune 50 % by |LRP relevance|, 8/4/2 bits (20/50/30 %)."""
    return CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5],
                           composite=composite)


# ----------------------------------------------------------------------------------------------------------------
# Settings chosen in the sidebar
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Which model to load.

    ``source`` is ``"builtin"`` (a shipped trained model), ``"torchvision"`` (an architecture with random weights:
    nothing is ever downloaded) or ``"upload"`` (an architecture plus an uploaded weights file, identified by its
    sha256 ``digest``; the bytes live in ``st.session_state["uploads"]``).

    ``"onnx"`` is an uploaded ONNX file (no code runs; ``declared`` holds the preprocessing the user declared) and
    ``"python"`` an architecture defined in Python (``arch`` = ``FILE.py:FACTORY`` on this machine, offered only when
    the app was started with ``--allow-code``) with optional uploaded weights. ``pretrained`` asks a torchvision
    architecture for its pretrained weights from the local torch hub cache.
    """

    source: str = "builtin"
    arch: str = DEFAULT_MODEL
    random_weights: bool = False
    weights_name: str = ""
    digest: str = ""
    declared: InputSpec | None = None
    pretrained: bool = False

    def key(self) -> str:
        """Cache key."""
        return (f"model:{self.source}:{self.arch}:{self.random_weights}:{self.weights_name}:{self.digest}:"
                f"{self.pretrained}:{self.declared!r}")


@dataclass(frozen=True)
class DataSpec:
    """Which images to use: ``"builtin"`` Fashion-MNIST, an ImageFolder ``"zip"`` upload or a ``"torchvision"``
    folder already on disk (``root`` + ``name``)."""

    source: str = "builtin"
    name: str = "fashion-mnist"
    digest: str = ""
    root: str = ""
    eval_samples: int = DEFAULT_EVAL_SAMPLES

    def key(self) -> str:
        """Cache key."""
        return f"data:{self.source}:{self.name}:{self.digest}:{self.root}:{self.eval_samples}"


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar decides: model, data, LRP composite, number of reference samples and the device the
    session computes on (``"auto"``, ``"cpu"`` or ``"cuda"``, see :func:`xaicomp_core.device.resolve_device`)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    composite: str = DEFAULT_COMPOSITE
    reference_samples: int = DEFAULT_REFERENCE_SAMPLES
    device: str = "auto"

    def session_key(self) -> str:
        """Key of the shared session (the composite is not part of it: a session caches relevance per composite)."""
        return f"{self.model.key()}|{self.data.key()}|ref:{self.reference_samples}|device:{self.device}"


def leave_pages_directory_mode() -> None:
    """Make sure this run goes through ``app.py``'s ``st.navigation``, then continue.

    Streamlit treats a ``pages/`` folder next to the entry script as old-style (v1) multipage pages until the first
    ``st.navigation`` call of the process -- and :class:`streamlit.testing.v1.AppTest` resets that flag before each
    run. In that mode the entry script runs as a page (its widgets get other ids, so the first interaction is lost)
    or a page runs without ``app.py`` (no sidebar). If this run is such a run, switch the mode off and rerun.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - layout of Streamlit's internals changed; nothing to fix then
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def get_settings() -> Settings:
    """The sidebar's current settings (defaults if the sidebar has not run yet)."""
    leave_pages_directory_mode()
    s = st.session_state.get(SETTINGS_KEY)
    return s if isinstance(s, Settings) else Settings()


def set_settings(settings: Settings, uploads: dict[str, bytes] | None = None) -> None:
    """Store the sidebar's settings (and the bytes of uploaded files, by kind: ``"weights"``, ``"data"``)."""
    st.session_state[SETTINGS_KEY] = settings
    st.session_state[UPLOADS_KEY] = dict(uploads or {})


def composite() -> str:
    """The LRP composite chosen in the sidebar."""
    return get_settings().composite


def pixel_composite() -> str:
    """The LRP composite for pixel heatmaps: the user's choice on the Relevance page, else :data:`PIXEL_COMPOSITE`."""
    chosen = control_value("rel_pixel_composite")
    return chosen if chosen in COMPOSITES else (PIXEL_COMPOSITE if PIXEL_COMPOSITE in COMPOSITES else composite())


def digest(data: bytes) -> str:
    """Short sha256 of uploaded bytes (the cache key of an upload)."""
    return hashlib.sha256(data).hexdigest()[:16]


def builtin_available(name: str) -> bool:
    """Whether a built-in model's trained weights are present in ``assets/models``."""
    return (MODELS_DIR / f"{name}.safetensors").exists() and (MODELS_DIR / f"{name}.json").exists()


def model_choices() -> dict[str, list[str]]:
    """Names offered in the sidebar: built-in models and torchvision architectures."""
    return {"builtin": list(BUILTIN_MODELS), "torchvision": list(TORCHVISION_ARCHS)}


# ----------------------------------------------------------------------------------------------------------------
# Cached loading (shared by all browser sessions; never mutated)
# ----------------------------------------------------------------------------------------------------------------
def model_source(spec: ModelSpec, weights: bytes | None = None) -> ModelSource:
    """The engine's :class:`~xaicomp_core.io.sources.ModelSource` for the sidebar's model choice (the app never
    downloads anything; an upload without its bytes renders as a placeholder file)."""
    if spec.source == "builtin":
        return ModelSource(spec.arch)
    if spec.source == "torchvision":
        if spec.pretrained:
            return ModelSource(spec.arch)  # from the local torch hub cache only (never downloaded)
        return ModelSource(spec.arch, random_weights=spec.random_weights, download=False)
    if spec.source == "onnx":
        return ModelSource("onnx", weights=b"" if weights is None else weights,
                           weights_name=spec.weights_name or "model.onnx", declared=spec.declared)
    if spec.source == "python":
        return ModelSource(spec.arch, weights=weights or None, weights_name=spec.weights_name, declared=spec.declared)
    if spec.source == "upload":
        return ModelSource(spec.arch, weights=b"" if weights is None else weights, weights_name=spec.weights_name)
    raise XaicompError(f"unknown model source {spec.source!r}")


def data_source(spec: DataSpec, data: bytes | None = None,
                reference_samples: int | None = DEFAULT_REFERENCE_SAMPLES) -> DataSource:
    """The engine's :class:`~xaicomp_core.io.sources.DataSource` for the sidebar's data choice (split by
    :func:`~xaicomp_core.io.sources.resolve_data`, exactly as the CLI splits it)."""
    if spec.source == "builtin":
        return DataSource("builtin", spec.name, eval_samples=spec.eval_samples, reference_samples=reference_samples)
    if spec.source == "zip":
        return DataSource("images", spec.name or "upload.zip", data=b"" if data is None else data,
                          eval_samples=spec.eval_samples, reference_samples=reference_samples)
    if spec.source == "torchvision":
        return DataSource("torchvision", spec.name, spec.root.strip(), eval_samples=spec.eval_samples,
                          reference_samples=reference_samples)
    raise XaicompError(f"unknown data source {spec.source!r}")


def sources_for(settings: Settings, uploads: dict[str, bytes] | None = None) -> Sources:
    """The model and data sources of ``settings``: what :func:`session_for` loads, and what renders the
    equivalent command line (``sources_for(settings).command("report", plan, output=...)``)."""
    uploads = uploads or {}
    return Sources(model_source(settings.model, uploads.get("weights")),
                   data_source(settings.data, uploads.get("data"), settings.reference_samples))


@st.cache_resource(show_spinner="Loading the model…", max_entries=6)
def _cached_model(key: str, _spec: ModelSpec, _weights: bytes | None) -> nn.Module:
    spec = _spec
    if spec.source == "onnx" and not _weights:
        raise XaicompError("upload an ONNX model (.onnx) in the sidebar")
    if spec.source == "python" and not code_allowed():
        raise XaicompError("models defined in Python run code: start the app with `streamlit run app.py -- "
                           "--allow-code` to allow it")
    if spec.source == "torchvision" and not spec.random_weights and not spec.pretrained:
        raise XaicompError(f"{spec.arch}: pretrained weights are never downloaded by this app; tick "
                           "'random weights' or choose 'Upload weights' to load your own file")
    if spec.source == "upload":
        if not _weights:
            raise XaicompError("upload a weights file (.safetensors, .pt or .pth) in the sidebar")
        name = spec.weights_name or "uploaded weights"
        try:
            return model_source(spec, _weights).load()
        except XaicompError:
            raise
        except Exception as e:  # a corrupt file can break the unpickler in many ways
            raise WeightsError(f"{name} is corrupt or not a PyTorch weights file ({type(e).__name__}: "
                               f"{str(e)[:100]})") from None
    return model_source(spec, _weights).load()


@st.cache_resource(show_spinner="Loading the images…", max_entries=6)
def _cached_data(key: str, _spec: DataSpec, _data: bytes | None, image_size: tuple[int, int], channels: int,
                 class_names: tuple[str, ...]) -> tuple[ImageDataset, ImageDataset, ImageDataset | None]:
    """(reference, evaluation, training or None) images for the data spec: the engine's one split policy
    (:func:`~xaicomp_core.io.sources.resolve_data`); all the reference images, :func:`_cached_session` takes its
    share."""
    spec = _spec
    if spec.source == "zip" and not _data:
        raise XaicompError("upload a .zip with one folder of images per class in the sidebar")
    if spec.source == "torchvision" and not spec.root.strip():
        raise XaicompError("enter the folder holding the torchvision data set (the 'root' you gave torchvision)")
    return resolve_data(data_source(spec, _data, reference_samples=None), image_size, channels, class_names)


#: Sessions shared by all browser sessions (at most :data:`MAX_SESSIONS`, the oldest used dropped first).
_SESSIONS: OrderedDict[str, CompressionSession] = OrderedDict()
_SESSIONS_GUARD = threading.Lock()
_BUILD_LOCKS: dict[str, threading.Lock] = {}
#: settings.session_key() -> key of the session built for it (to tell a cold start without loading anything)
_BUILT: dict[str, str] = {}
MAX_SESSIONS = 4


def _shared_session(key: str, build: Callable[[], CompressionSession]) -> CompressionSession:
    """The session cached under ``key``, built once by ``build()`` (another browser session asking for the same key
    meanwhile waits for that one)."""
    with _SESSIONS_GUARD:
        if key in _SESSIONS:
            _SESSIONS.move_to_end(key)
            return _SESSIONS[key]
        lock = _BUILD_LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _SESSIONS_GUARD:
            if key in _SESSIONS:
                return _SESSIONS[key]
        session = build()
        with _SESSIONS_GUARD:
            _SESSIONS[key] = session
            while len(_SESSIONS) > MAX_SESSIONS:
                _SESSIONS.popitem(last=False)
            _BUILD_LOCKS.pop(key, None)
        return session


def session_ready(settings: Settings) -> CompressionSession | None:
    """The cached session for ``settings`` if it exists and holds the relevance of its composite (nothing to wait
    for), else None."""
    with _SESSIONS_GUARD:
        session = _SESSIONS.get(_BUILT.get(settings.session_key(), ""))
    return session if session is not None and session.has_relevance(settings.composite) else None


def session_for(settings: Settings, uploads: dict[str, bytes] | None = None,
                panel: StartupPanel | None = None) -> CompressionSession:
    """The shared, cached session for ``settings`` (relevance not ensured; see :func:`get_session`).

    Also callable outside a page (tests, notebooks): the same settings give the same cached object the app uses.
    With ``panel`` (a cold start in a page), each stage shows its progress and time left there.
    """
    uploads = uploads or {}
    stage = panel.stage if panel is not None else _no_stage
    with stage("model"):
        model = _cached_model(settings.model.key(), settings.model, uploads.get("weights"))
    info = getattr(model, "xaicomp_info", None)
    if info is None:
        raise XaicompError("the loaded model carries no preprocessing information")
    pre = info.preprocessing
    with stage("data"):
        ref, ev, train = _cached_data(settings.data.key(), settings.data, uploads.get("data"),
                                      tuple(pre.input_size), pre.channels, tuple(info.class_names))
    n_ref = max(1, min(settings.reference_samples, len(ref)))
    key = f"{settings.session_key()}|n:{n_ref}"
    with _SESSIONS_GUARD:
        cold = key not in _SESSIONS
    if panel is not None and cold:
        with stage("timing"):
            b = startup_budget(settings, model, ref, ev)
        panel.estimate("baseline", b.forward_s * (len(ev) + 2 * min(256, len(ev))))  # with the trial, eager and fast
        panel.estimate("relevance", b.fixed_s + n_ref * b.relevance_s)
    elif panel is not None:
        panel.skip("timing")
    progress = panel.progress("baseline") if panel is not None else None
    with stage("baseline"):
        session = _shared_session(key, lambda: CompressionSession(
            model, reference_subset(ref, n_ref), ev, reference_samples=n_ref, train_data=train,
            device=settings.device, prepare_progress=progress, cache_size=SESSION_RESULTS))
    _BUILT[settings.session_key()] = key
    return session


def ensure_relevance(session: CompressionSession, composite_name: str, panel: StartupPanel | None = None
                     ) -> None:
    """Compute the relevance for ``composite_name`` once (in ``panel``, or with a progress bar of its own, with the
    time left); later calls return at once."""
    if session.has_relevance(composite_name):
        return
    if panel is not None:
        with panel.stage("relevance"):
            session.relevance(composite_name, progress=panel.progress("relevance"))
        return
    n = len(session.x_ref)
    run_with_progress(f"Computing LRP relevance ({composite_name}) on {n:,} reference images:",
                      lambda progress: session.relevance(composite_name, progress=progress))


def declared_inputs(prefix: str, input_size: bool = True) -> tuple[InputSpec | None, str | None]:
    """Sidebar fields declaring an ONNX or Python model's preprocessing: input size, pixel range, mean, std and class
    names (empty: the defaults). Returns the declaration and a problem to show (None if the fields parse)."""
    size = st.text_input("Input size H,W (empty: the model's)", key=f"{prefix}_size", placeholder="224,224") \
        if input_size else ""
    rng = st.radio("Pixels", ["0-1", "0-255"], key=f"{prefix}_range", horizontal=True,
                   format_func=lambda r: "scaled to [0, 1]" if r == "0-1" else "kept in [0, 255]")
    mean = st.text_input("Mean per channel (empty: none)", key=f"{prefix}_mean", placeholder="0.485,0.456,0.406")
    std = st.text_input("Std per channel (empty: none)", key=f"{prefix}_std", placeholder="0.229,0.224,0.225")
    names = st.text_input("Class names, comma-separated (empty: 0…K-1)", key=f"{prefix}_names")
    try:
        spec = InputSpec(parse_size(size) if size.strip() else None,
                         parse_floats(mean, "mean") if mean.strip() else None,
                         parse_floats(std, "std") if std.strip() else None, 255.0 if rng == "0-255" else 1.0,
                         parse_class_names(names) if names.strip() else None, "the sidebar")
    except XaicompError as e:
        return None, str(e)
    return (None if spec.empty else spec), None


def awaiting_input(settings: Settings) -> str | None:
    """What the sidebar still needs from the user before anything can load (Markdown), or None.

    These are not errors -- nothing went wrong yet -- so the pages show them as an explanation: a torchvision
    architecture without weights, the weights or zip upload not made yet, a torchvision folder not named yet.
    """
    m, d = settings.model, settings.data
    uploads = st.session_state.get(UPLOADS_KEY) or {}
    if m.source == "torchvision" and not m.random_weights:
        return (f"**{m.arch} needs weights.** This app never downloads pretrained weights. Tick **random weights** "
                "in the sidebar to explore the mechanics on an untrained network (its accuracy is chance, about "
                "one class in ten), or choose **Upload your weights** to load your own trained file.")
    if m.source == "onnx" and not uploads.get("weights"):
        return ("**Upload an ONNX model** (.onnx) in the sidebar. ONNX is data: no code runs. Input channels, size and "
                "the number of classes come from the graph; declare how pixels are scaled (default: [0, 1], no "
                "mean/std) and, optionally, the class names.")
    if m.source == "python" and ".py:" not in m.arch:
        return "**Name your architecture** in the sidebar as `FILE.py:FACTORY` (a function returning the nn.Module)."
    if m.source == "upload" and not uploads.get("weights"):
        return (f"**Upload the weights** of your {m.arch} in the sidebar: a state dict as .safetensors, .pt or .pth "
                "(read safely: a pickle that would run code is refused).")
    if d.source == "zip" and not uploads.get("data"):
        return ("**Upload a .zip** in the sidebar with one folder of images per class (named after the model's "
                "classes, or 0…N-1). Half of the images (class-balanced) score the weights, the other half measure "
                "accuracy; a few hundred images or more give meaningful numbers.")
    if d.source == "torchvision" and not d.root.strip():
        return (f"**Enter the folder** that holds the torchvision {d.name} data (the `root` you gave torchvision): "
                "nothing is downloaded.")
    return None


def budget_gate(settings: Settings, uploads: dict[str, bytes] | None = None) -> bool:
    """Before the long work for a big model starts: time one batch and, when the first result would take well over
    :data:`~xaicomp_core.io.fit.TARGET_SECONDS`, propose image counts that fit (buttons: use them, or go on with the
    sidebar's). Returns whether to go on now. Streamlit's Stop button cancels a run that is under way."""
    from xaicomp_core.io import fit

    if settings.model.source == "builtin":
        return True  # the shipped models are small (their first results take seconds, see the README)
    uploads = uploads or {}
    model = _cached_model(settings.model.key(), settings.model, uploads.get("weights"))
    info = model.xaicomp_info
    pre = info.preprocessing
    ref, ev, _ = _cached_data(settings.data.key(), settings.data, uploads.get("data"), tuple(pre.input_size),
                              pre.channels, tuple(info.class_names))
    key = settings.session_key()
    b = startup_budget(settings, model, ref, ev)
    if not b.too_slow or st.session_state.get("_budget_ok") == key:
        return True
    r, e = max(10, b.proposed_reference), max(50, b.proposed_evaluation)
    st.warning(f"**{info.name} is a big model for this machine.** One image takes about {b.forward_s * 1e3:.0f} ms "
               f"forward and {b.relevance_s * 1e3:.0f} ms for LRP: with {b.reference:,} reference and "
               f"{b.evaluation:,} evaluation images the first result takes about {fit.fmt_seconds(b.seconds)}. "
               f"With {r:,} and {e:,} images it takes about "
               f"{fit.fmt_seconds(fit.budget_from_timings(b.forward_s, b.relevance_s, b.fixed_s, r, e).seconds)}.",
               icon=":material/timer:")
    c1, c2 = st.columns(2)
    # callbacks: they run before the next run draws the sidebar, so its widgets take the new counts
    c1.button(f"Use {r:,} reference and {e:,} evaluation images", type="primary", key="budget_use",
              on_click=st.session_state.update, kwargs={"sb_ref_samples": r, "sb_eval_samples": e})
    c2.button(f"Go on with {b.reference:,} and {b.evaluation:,} images", key="budget_go",
              on_click=st.session_state.update, kwargs={"_budget_ok": key})
    return False


def startup_budget(settings: Settings, model: nn.Module, ref: ImageDataset, ev: ImageDataset) -> Budget:
    """One timed batch for ``settings`` (:func:`~xaicomp_core.io.fit.plan_budget`; once per browser session and
    settings): the seconds per image of a forward pass and of LRP, which estimate the first result's stages."""
    from xaicomp_core.io import fit
    from xaicomp_core.io.data import as_tensors

    budgets = st.session_state.setdefault("_budgets", {})
    key = settings.session_key()
    if key not in budgets:
        info = model.xaicomp_info
        pre = info.preprocessing
        xr, yr = as_tensors(ref.subset(list(range(min(32, len(ref))))), pre, info.num_classes, "reference data")
        xe, _ = as_tensors(ev.subset(list(range(min(128, len(ev))))), pre, info.num_classes, "evaluation data")
        budgets[key] = fit.plan_budget(model, xr, yr, xe, reference=min(settings.reference_samples, len(ref)),
                                       evaluation=len(ev), composite=settings.composite,
                                       num_classes=info.num_classes, target=fit.TARGET_SECONDS,
                                       device=settings.device)
    return budgets[key]


def get_session() -> CompressionSession | None:
    """The shared, cached session for the sidebar's settings, with relevance for the chosen composite ensured.

    Loading the model and data and measuring the baseline happen once per (model, data, reference samples) and are
    cached for all browser sessions (``st.cache_resource``); relevance is computed once per composite with a
    progress bar and cached inside the session, so moving a slider never recomputes it.

    Returns
    -------
    CompressionSession or None
        None after showing a readable ``st.error`` if the model, data or relevance could not be prepared.
    """
    settings = get_settings()
    uploads = st.session_state.get(UPLOADS_KEY)
    try:
        if not budget_gate(settings, uploads):
            return None
        session = session_ready(settings)
        if session is None:  # a cold start: every stage with its progress and time left
            name = settings.model.weights_name or settings.model.arch
            panel = StartupPanel(f"Preparing {name} for its first use (once; every page then reuses it)", {
                "model": "Loading the model",
                "data": "Loading the images",
                "timing": "Timing one batch (to estimate the stages below)",
                "baseline": "Measuring the original model on the evaluation images",
                "relevance": f"LRP relevance ({settings.composite}) on the reference images"})
            try:
                session = session_for(settings, uploads, panel)
                ensure_relevance(session, settings.composite, panel)
            finally:
                panel.close()
    except XaicompError as e:
        st.error(str(e), icon=":material/warning:")
        return None
    except Exception as e:  # anything else (an architecture that does not fit the data, ...) is reported, not raised
        st.error(f"Could not prepare the model and data: {type(e).__name__}: {str(e)[:300]}", icon=":material/warning:")
        return None
    return session


def page_session(title: str, caption: str) -> CompressionSession:
    """Start a page: its title and caption, then the shared session from :func:`get_session`.

    Stops the page below an explanation when the sidebar still awaits input (:func:`awaiting_input`), or below the
    readable error that :func:`get_session` shows when there is no session. With a session, the sidebar's data note
    shows the image counts really used, and a warning says when there are too few evaluation images to mean much.
    """
    st.title(title)
    st.caption(caption)
    waiting = awaiting_input(get_settings())
    if waiting:
        st.info(waiting, icon=":material/info:")
        st.stop()
    session = get_session()
    if session is None:
        st.stop()
    show_data_note(session)
    few = few_images_warning(session)
    if few:
        st.warning(few, icon=":material/warning:")
    return session


#: Below this many evaluation images an accuracy is mostly noise (the pages say so).
FEW_EVAL_IMAGES = 100
DATA_NOTE_KEY = "_data_note"


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``correct / n`` (sensible also at 0 % and 100 %)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def few_images_warning(session: CompressionSession) -> str | None:
    """A warning (Markdown) when the evaluation set is too small for its accuracy to mean much, else None."""
    n = len(session.y_eval)
    if n >= FEW_EVAL_IMAGES:
        return None
    lo, hi = wilson_interval(session.baseline_correct, n)
    return (f"**Only {n} evaluation images: the accuracies here say little.** One image is {100 / n:.1f} points; "
            f"the original model's {fmt_pct(session.baseline_accuracy)} ({session.baseline_correct} of {n}) means "
            f"anything from {fmt_pct(lo, 0)} to {fmt_pct(hi, 0)} (95 % binomial interval), and plans a few points "
            f"apart cannot be told apart. Use at least {FEW_EVAL_IMAGES} (better a few hundred) evaluation images.")


def set_data_note(slot: Any, text: str) -> None:
    """Show ``text`` in the sidebar's data note ``slot`` (an ``st.empty``) and keep the slot for this run, so that
    :func:`show_data_note` can replace it with the counts really used once the data is loaded."""
    slot.caption(text)
    st.session_state[DATA_NOTE_KEY] = slot


def show_data_note(session: CompressionSession) -> None:
    """Write the image counts of ``session`` into the sidebar's data note (drawn by ``app.py`` this run)."""
    slot = st.session_state.get(DATA_NOTE_KEY)
    if slot is None:
        return
    s = get_settings()
    n_eval, n_ref = len(session.y_eval), len(session.x_ref)
    asked = ""
    if n_eval < s.data.eval_samples or n_ref < s.reference_samples:
        asked = f" (all the data has; {s.data.eval_samples:,} and {s.reference_samples:,} asked)"
    tune = "; training images for fine-tuning" if session.can_finetune else "; no training images (no fine-tuning)"
    slot.caption(f"In use: {n_eval:,} images measure accuracy, {n_ref:,} are the LRP reference{asked}, "
                 f"class-balanced{tune}.")


# ----------------------------------------------------------------------------------------------------------------
# Plan of this browser session
# ----------------------------------------------------------------------------------------------------------------
def get_plan(session: CompressionSession | None = None) -> CompressionPlan:
    """This browser session's current plan (its ``composite`` always follows the sidebar's LRP setting).

    New sessions start from :func:`default_plan`. With ``session``, the plan fitted to what is loaded
    (:func:`fit_plan`); the stored plan itself is never changed by a model or data change.
    """
    plan = st.session_state.get(PLAN_KEY)
    if not isinstance(plan, CompressionPlan):
        plan = default_plan(composite())
        st.session_state[PLAN_KEY] = plan
    if plan.composite != composite():
        plan = plan.replace(composite=composite())
        st.session_state[PLAN_KEY] = plan
    return plan if session is None else fit_plan(plan, session)[0]


def fit_plan(plan: CompressionPlan, session: CompressionSession) -> tuple[CompressionPlan, list[str]]:
    """``plan`` adapted to the loaded model and data, and one sentence (Markdown) per adaptation.

    The stored plan keeps the user's choices, so they apply again when a model or data set that fits them comes
    back: today the only adaptation is fine-tuning, switched off for data without training images.
    """
    notes = []
    if plan.finetune_epochs and not session.can_finetune:
        notes.append(f"**Fine-tuning is off for this data**: it has no training images (built-in data and "
                     f"torchvision folders have). The plan's {plan.finetune_epochs} epoch(s) apply again there.")
        plan = plan.replace(finetune_epochs=0)
    return plan, notes


def set_plan(plan: CompressionPlan) -> None:
    """Make ``plan`` this browser session's current plan.

    The plan is validated first (a :class:`~xaicomp_core.PlanError` propagates). If its composite differs from the
    sidebar's, the sidebar switches to it on the next rerun. The Compress page's controls (``cp_*``) are redrawn
    from the plan.
    """
    plan = plan.validate()
    st.session_state[PLAN_KEY] = plan
    if plan.composite != composite():
        st.session_state[PENDING_COMPOSITE_KEY] = plan.composite
    reset_controls("cp_")


def remember_plan(plan: CompressionPlan) -> None:
    """Store ``plan`` as the current plan without touching any control (the Compress page's controls describe it)."""
    st.session_state[PLAN_KEY] = plan


# ----------------------------------------------------------------------------------------------------------------
# Controls: the value of every widget of the pages lives here, not in Streamlit's widget state
# ----------------------------------------------------------------------------------------------------------------
#: ``{"values": {name: value}, "generation": {name: int}}`` in ``st.session_state``.
CONTROLS_KEY = "_controls"


@dataclass(frozen=True)
class Control:
    """How to draw one page control: its widget ``key`` and the ``value`` to pass as the widget's default.

    Streamlit forgets a widget's value whenever a run ends without drawing it (an error and ``st.stop()`` above
    it, another page, a condition that hides it), and a value written back with ``st.session_state[key] = ...``
    before the widget is drawn is not always shown by the browser: the widget appears at its default while the
    script reads the stored value. So a control's value is kept here (:func:`control`) and always handed to the
    widget as its default (``value=``, ``index=``, ``default=``); the widget writes changes back through
    :meth:`commit` (``on_change``) and :meth:`keep` (what it returned). The key is the control's name until code
    changes the value (:func:`set_control`): then a new key makes the browser draw a new widget with the new value.
    """

    name: str
    key: str
    value: Any

    def commit(self) -> None:
        """``on_change`` callback: store the widget's new value."""
        if self.key in st.session_state:
            _controls()["values"][self.name] = copy.deepcopy(st.session_state[self.key])

    def keep(self, value: Any) -> Any:
        """Store what the widget returned (call it on the widget's return value) and return it."""
        _controls()["values"][self.name] = copy.deepcopy(value)
        return value

    def index_in(self, options: list[Any], fallback: int = 0) -> int:
        """The value's position in ``options`` (for ``index=``); ``fallback`` if it is not one of them."""
        return options.index(self.value) if self.value in options else fallback


def _controls() -> dict[str, dict[str, Any]]:
    store = st.session_state.get(CONTROLS_KEY)
    if not isinstance(store, dict):
        store = {"values": {}, "generation": {}}
        st.session_state[CONTROLS_KEY] = store
    return store


def control_key(name: str) -> str:
    """The widget key of control ``name`` now (its name, or ``name~N`` after code changed its value N times)."""
    gen = _controls()["generation"].get(name, 0)
    return name if gen == 0 else f"{name}~{gen}"


def fold_norm_checkbox(c: Control, session: CompressionSession, **kwargs: Any) -> bool:
    """The "Store BatchNorm as scale and shift" checkbox of control ``c`` (a plan's ``fold_norm``): off and disabled
    for a model without BatchNorm. ``kwargs`` go to ``st.checkbox`` (e.g. ``on_change`` outside a form)."""
    norms = bool(session.compressor.norms)
    return bool(c.keep(st.checkbox(
        "Store BatchNorm as scale and shift", value=bool(c.value) and norms, key=c.key, disabled=not norms,
        help="One scale and one shift per channel instead of weight, bias, mean and variance: 8 instead of 16 bytes "
             "per channel. The outputs change by float32 rounding only; every number shown is measured on the "
             "folded model." if norms else "This model has no BatchNorm.", **kwargs)))


def control(name: str, default: Any) -> Control:
    """The control ``name``: its stored value, or ``default`` if it has none yet (first visit, after a reset)."""
    values = _controls()["values"]
    return Control(name, control_key(name), copy.deepcopy(values[name]) if name in values else default)


def control_value(name: str, default: Any = None) -> Any:
    """The stored value of control ``name`` (``default`` if none)."""
    return copy.deepcopy(_controls()["values"].get(name, default))


def set_control(name: str, value: Any) -> None:
    """Change a control's value from code; its widget is redrawn with it (under a new key if it was drawn before) on
    this or the next run (call it before the widget is drawn, or from a callback)."""
    store = _controls()
    if name in store["values"]:  # its widget was drawn with the old value: a new key draws a new one
        store["generation"][name] = store["generation"].get(name, 0) + 1
    store["values"][name] = copy.deepcopy(value)


def reset_controls(prefix: str) -> None:
    """Forget the values of the controls whose names start with ``prefix`` (they return to the defaults their page
    passes, e.g. the current plan); their widgets are redrawn under new keys."""
    store = _controls()
    names = {n for n in [*store["values"], *store["generation"]] if n.startswith(prefix)}
    for name in names:
        store["values"].pop(name, None)
        store["generation"][name] = store["generation"].get(name, 0) + 1


def comparison_plan(plan: CompressionPlan, result: EvaluationResult) -> CompressionPlan:
    """The same plan with the classic ``magnitude`` criterion (or ``lrp`` if the plan already uses magnitude),
    pruning the same share of weights, so that the effect of the XAI criterion is visible.

    Ratio criteria keep their ratio; rule criteria (``paper``, ``lrp-zero``) are matched by the share of weights
    they actually pruned. Structured criteria (whole filters) are compared with the other filter criterion
    (``lrp-filter`` against ``magnitude-filter``, the L1-norm baseline) at the share they pruned.
    """
    if get_criterion(plan.criterion).structured:  # filters against filters: like for like
        other = "lrp-filter" if plan.criterion == "magnitude-filter" else "magnitude-filter"
        return plan.replace(criterion=other, prune_ratio=min(round(result.sparsity, 4), 0.99))
    other = "lrp" if plan.criterion == "magnitude" else "magnitude"
    if plan.uses_ratio:
        ratio = plan.prune_ratio
    else:
        ratio = min(round(result.sparsity, 4), 0.99)
    return plan.replace(criterion=other, prune_ratio=ratio)


def split_to_cuts(split: list[float]) -> list[int]:
    """Bit split fractions -> cumulative thresholds in percent (``[0.2, 0.5]`` -> ``[20, 70]``)."""
    out, acc = [], 0.0
    for f in split:
        acc += f
        out.append(int(round(100 * acc)))
    return out


def cuts_to_split(cuts: list[int]) -> list[float]:
    """Cumulative thresholds in percent -> bit split fractions (``[20, 70]`` -> ``[0.2, 0.5]``)."""
    out, prev = [], 0
    for c in cuts:
        out.append(round((c - prev) / 100, 4))
        prev = c
    return out


def with_finetuning(session: CompressionSession, plan: CompressionPlan,
                    work: Callable[[Callable[[int, int], None] | None], Any]) -> Any:
    """``work(progress)``: with a progress bar when ``plan``'s fine-tuned weights must be computed first, else
    ``work(None)``."""
    if not session.needs_finetuning(plan):
        return work(None)
    return run_with_progress(f"Fine-tuning ({plan.finetune_epochs} epochs, {plan.criterion})…", work)


def quietly(session: CompressionSession, plan: CompressionPlan,
            compute: Callable[[CompressionPlan], EvaluationResult]) -> EvaluationResult | None:
    """``compute(plan)`` (``session.estimate`` or ``session.evaluate``) where it needs nothing on screen; None for a
    plan that must be fine-tuned first or one the engine refuses (:func:`evaluate` then shows the progress bar or the
    reason)."""
    if session.needs_finetuning(plan):
        return None
    try:
        return compute(plan)
    except XaicompError:
        return None


def first_numbers(session: CompressionSession, plan: CompressionPlan) -> EvaluationResult | None:
    """The quickest numbers of ``plan``: the exact result if the session has it (a step the user made before, or one
    anticipated in the background), else an estimate from a class-balanced subset (``result.estimate``); None when
    there is nothing quick to show (see :func:`quietly`)."""
    return quietly(session, plan, session.estimate)


def browser_owner() -> str:
    """An id of this browser session (anticipated work is kept and cancelled per browser session)."""
    return st.session_state.setdefault("_owner", uuid.uuid4().hex)


def anticipated_plans(plan: CompressionPlan, result: EvaluationResult) -> list[CompressionPlan]:
    """What the background computes after ``plan`` is shown, most likely next first.

    1. The slider positions one and two steps away (:func:`~xaicomp_core.evaluate.progressive.neighbour_plans`),
       each followed by the comparison plan the page shows for it.
    2. The comparison plan of every other prune-ratio position of the slider, nearest first. A release anywhere
       on the slider then computes only the user's own plan: the comparison below it (a whole second evaluation)
       is ready. For criteria without a prune ratio, or structured ones, only 1.

    Duplicates are left out; the anticipator caps the list at ``MAX_ANTICIPATED`` and skips cached plans.
    """
    ratio_criterion = plan.uses_ratio and not get_criterion(plan.criterion).structured
    plans: list[CompressionPlan] = []
    for p in neighbour_plans(plan, ratio_step=RATIO_STEP, split_step=SPLIT_STEP):
        plans.append(p)
        if ratio_criterion:
            plans.append(comparison_plan(p, result))
    if ratio_criterion:
        n = int(round(RATIO_MAX / RATIO_STEP))
        ratios = sorted((round(k * RATIO_STEP, 6) for k in range(n + 1)), key=lambda r: abs(r - plan.prune_ratio))
        plans += [comparison_plan(plan.replace(prune_ratio=r), result) for r in ratios]
    return list({p.key(): p for p in plans}.values())


def anticipate_neighbours(session: CompressionSession, plan: CompressionPlan, result: EvaluationResult) -> None:
    """While the user reads, evaluate :func:`anticipated_plans` in the background (the neighbouring slider
    positions, then the comparison plans along the prune-ratio slider). Replaces this browser session's earlier
    wishes."""
    session.anticipate(anticipated_plans(plan, result), owner=browser_owner())


def evaluate(session: CompressionSession, plan: CompressionPlan) -> EvaluationResult | None:
    """``session.evaluate(plan)`` (fine-tuning first with a progress bar if the plan asks for it); a plan error is
    shown as a readable message and None is returned."""
    try:
        return with_finetuning(session, plan, lambda progress: session.evaluate(plan, progress))
    except XaicompError as e:
        st.error(str(e), icon=":material/warning:")
        return None


# ----------------------------------------------------------------------------------------------------------------
# Labels and small shared widgets
# ----------------------------------------------------------------------------------------------------------------
def pp_delta(dx: float) -> dict[str, Any]:
    """``st.metric`` keyword arguments for an accuracy change ``dx``: ``+1.25 pp`` green and up, ``-1.25 pp`` red
    and down, and a change that rounds to zero (``+0.00 pp``) grey without an arrow."""
    text = fmt_pp(dx)
    if text == fmt_pp(0.0):
        return {"delta": text, "delta_color": "off", "delta_arrow": "off"}
    return {"delta": text}


def result_metrics(result: EvaluationResult) -> None:
    """Three tiles in a row: accuracy (and its change), size (and the reduction against fp32), compression ratio.

    An estimate (``result.estimate``: first numbers from a class-balanced subset) says so in the label and gives
    its 95 % interval; the exact numbers replace it when they arrive."""
    size = result.size
    c1, c2, c3 = st.columns(3)
    if result.estimate:
        c1.metric("Accuracy (estimate)", f"≈{fmt_pct(result.accuracy, 1)}",
                  f"± {100 * result.accuracy_half_width:.1f} pp (95 %)", delta_color="off", delta_arrow="off",
                  border=True,
                  help=f"Estimated from {result.images} of the {result.eval_images:,} evaluation images (class-"
                       "balanced): the original model's exact accuracy plus the change seen on those images. The "
                       "exact number on all images replaces it in a moment.")
    else:
        c1.metric("Accuracy", fmt_pct(result.accuracy), **pp_delta(result.accuracy_change), border=True,
                  help=f"{result.correct} of {result.images} evaluation images correct "
                       f"(original: {result.baseline_correct}).")
    c2.metric("Size", fmt_bytes(size.estimated_bytes), f"{-100 * size.reduction:.1f}% vs fp32",
              delta_color="inverse", border=True,
              help=f"{size.estimated_bytes:,} bytes estimated for the packed file vs {size.fp32_bytes:,} fp32 bytes.")
    c3.metric("Compression ratio", f"{result.compression_ratio:.2f}×", border=True,
              help="fp32 dense bytes / compressed bytes")


#: An accuracy at most this far above chance (1 / number of classes) is called "close to chance".
NEAR_CHANCE = 0.10
#: A drop of the paper rule larger than this gets the explanation of what the rule removes.
PAPER_DROP = 0.05


def explain_collapse(plan: CompressionPlan, result: EvaluationResult) -> str | None:
    """Why the accuracy fell the way it did (Markdown), from the result's own numbers; None if nothing to explain.

    Near chance (one in the number of classes) it says so and which class the model now answers for most images;
    for the paper rule it says what the rule removes -- each neuron's inhibitory inputs -- and how much of each layer
    that is (the per-layer sparsity of the result).
    """
    k = len(result.class_names)
    chance = 1 / max(k, 1)
    parts = []
    if result.accuracy <= chance + NEAR_CHANCE < result.baseline_accuracy:
        preds = result.predictions.tolist()
        top, count = Counter(preds).most_common(1)[0] if preds else (0, 0)
        near = "" if abs(result.accuracy - chance) < 0.01 else "close to "
        parts.append(f"**{fmt_pct(result.accuracy)} is {near}chance for {k} classes** ({fmt_pct(chance, 0)}, one "
                     f"image in {k}): the compressed model no longer tells the classes apart — it answers "
                     f"*{result.class_names[int(top)]}* for {count / max(len(preds), 1):.0%} of the images.")
    if plan.criterion == "paper" and result.accuracy_change < -PAPER_DROP:
        per_layer = ", ".join(f"{s.name.removesuffix('.weight')} {s.sparsity:.0%}" for s in result.layers)
        parts.append("The paper rule prunes every weight whose relevance is ≤ 0: the unused ones (zero) and the "
                     "**inhibitory inputs** of each neuron (negative relevance: mostly negative weights on active "
                     "inputs, evidence against the class). They are what hold each neuron's output in check; "
                     "without them the remaining excitatory weights drive the same few outputs up for every image. "
                     f"Here the rule removes {fmt_pct(result.sparsity, 1)} of the weights — per layer: "
                     f"{per_layer}.")
    elif parts:
        parts.append(f"{plan.criterion} removed {fmt_pct(result.sparsity, 1)} of the weights; try a lower prune "
                     "ratio or more bits.")
    return " ".join(parts) or None


def model_label(session: CompressionSession | None = None) -> str:
    """One line saying what is loaded, e.g. ``fashion-vgg · fashion-mnist/eval (2000 images) · LRP epsilon · 1000
    reference images``."""
    s = get_settings()
    if session is None:
        return f"{s.model.arch} · {s.data.name} · LRP {s.composite}"
    return (f"{session.info.name} · {len(session.y_eval)} evaluation images · LRP {s.composite} on "
            f"{len(session.x_ref)} reference images")


def session_scope_key(session: CompressionSession) -> str:
    """A key identifying the shared session (for per-browser caches such as sweep results)."""
    return f"{get_settings().session_key()}|{session.model_hash[:12]}|{len(session.x_ref)}"


def per_session_cache(name: str) -> dict[str, Any]:
    """A dict in ``st.session_state`` for this browser session's own cached results (never shared)."""
    store = st.session_state.setdefault("_cache", {})
    return store.setdefault(name, {})


def run_with_progress(label: str, work: Callable[[Callable[[int, int], None]], Any]) -> Any:
    """Run ``work(progress)`` with an ``st.progress`` bar that ``progress(done, total)`` advances, showing the
    time left (extrapolated from the steps done so far)."""
    bar = st.progress(0.0, text=label)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        left = (time.perf_counter() - t0) / done * (total - done) if 0 < done < total else None
        eta = f" · about {left:.0f} s left" if left is not None else ""
        bar.progress(min(done / max(total, 1), 1.0), text=f"{label} {done} / {total}{eta}")

    try:
        return work(progress)
    finally:
        bar.empty()


# ----------------------------------------------------------------------------------------------------------------
# the first use of a model and data set: every stage with its progress and time left
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Stage:
    label: str
    estimate: float | None = None  # seconds, before it starts (from one timed batch)
    started: float | None = None
    took: float | None = None  # seconds, once done
    done: int = 0
    total: int = 0
    first: tuple[float, int] | None = None  # (time, parts done) at the first report of parts

    def report(self, done: int, total: int, now: float) -> None:
        """``done`` parts of ``total`` at ``now``."""
        if self.first is None:
            self.first = (now, done)
        self.done, self.total = done, total

    def left(self, now: float) -> float | None:
        """Seconds left: extrapolated from the rate since the first report of parts (whatever the stage did before
        it, such as building a model, does not count per part), else the estimate less the time spent (None:
        unknown)."""
        if self.took is not None:
            return 0.0
        if self.started is None:
            return self.estimate
        if self.first is not None and self.done > self.first[1]:
            t0, d0 = self.first
            return (now - t0) / (self.done - d0) * (self.total - self.done)
        return None if self.estimate is None else max(self.estimate - (now - self.started), 0.0)


@contextlib.contextmanager
def _no_stage(key: str) -> Iterator[None]:
    yield


class StartupPanel:
    """What a first use of a model and data set waits for, stage by stage, in one box: the stages done (with the
    time they took), the one running (its progress and the time left, extrapolated from the part done or, before
    any part is done, the estimate), the ones to come (their time estimated from one timed batch), and the time left
    in all. The box is removed when the work ends (:meth:`close`)."""

    #: redraw at most this often (seconds)
    INTERVAL = 0.2

    def __init__(self, title: str, stages: dict[str, str]) -> None:
        self.title = title
        self.stages = {key: _Stage(label) for key, label in stages.items()}
        self._slot = st.empty()
        self._drawn = 0.0

    def estimate(self, key: str, seconds: float) -> None:
        """The estimated seconds of a stage that has not started."""
        self.stages[key].estimate = max(0.0, seconds)

    def skip(self, key: str) -> None:
        """Leave out a stage that has nothing to do."""
        self.stages.pop(key, None)

    @contextlib.contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Run a stage: shown as running, then as done with the time it took."""
        stage = self.stages[key]
        stage.started = time.perf_counter()
        self.draw(force=True)
        yield
        stage.took = time.perf_counter() - stage.started
        self.draw(force=True)

    def progress(self, key: str) -> Callable[[int, int], None]:
        """``progress(done, total)`` for a stage's parts."""
        stage = self.stages[key]

        def update(done: int, total: int) -> None:
            stage.report(done, total, time.perf_counter())
            self.draw(force=done >= total)
        return update

    def draw(self, force: bool = False) -> None:
        """Redraw the box (at most every :data:`INTERVAL` seconds unless ``force``)."""
        now = time.perf_counter()
        if not force and now - self._drawn < self.INTERVAL:
            return
        self._drawn = now
        lines: list[str] = []
        running: _Stage | None = None
        total_left: float | None = 0.0
        for stage in self.stages.values():
            if stage.took is not None:
                lines.append(f"- :material/check_circle: {stage.label} — {stage.took:.1f} s")
                continue
            left = stage.left(now)
            total_left = None if left is None or total_left is None else total_left + left
            when = f"about {fmt_seconds(left)}" if left is not None else "estimated once it starts"
            if stage.started is not None:
                running = stage
                part = f"{stage.done:,} / {stage.total:,} · " if stage.total else ""
                lines.append(f"- :material/pending: **{stage.label}** — {part}{when}"
                             + (" left" if left is not None else ""))
            else:
                lines.append(f"- :material/schedule: {stage.label} — {when}")
        head = f"**{self.title}**"
        if total_left is not None:
            head += f" — about {fmt_seconds(total_left)} left in all"
        with self._slot.container(border=True):
            st.markdown(head + "\n\n" + "\n".join(lines))
            if running is not None:
                frac = running.done / running.total if running.total else 0.0
                st.progress(min(max(frac, 0.0), 1.0))

    def close(self) -> None:
        """Remove the box."""
        self._slot.empty()


__all__ = [
    "declared_inputs", "first_numbers", "quietly", "browser_owner", "anticipate_neighbours", "anticipated_plans",
    "RATIO_STEP", "SPLIT_STEP", "RATIO_MAX", "SESSION_RESULTS",
    "COMPOSITES", "Control", "DEFAULT_MODEL", "DataSpec", "ModelSpec", "PIXEL_COMPOSITE", "Settings", "awaiting_input",
    "builtin_available", "comparison_plan", "composite", "control", "control_key", "control_value", "cuts_to_split",
    "default_plan", "digest", "ensure_relevance", "evaluate", "explain_collapse", "few_images_warning", "fit_plan",
    "fmt_bytes", "fmt_pct", "fmt_pp", "get_plan", "get_session", "get_settings", "leave_pages_directory_mode",
    "model_choices", "model_label", "page_session", "per_session_cache", "pixel_composite", "pp_delta",
    "remember_plan", "reset_controls", "result_metrics", "run_with_progress", "session_for", "session_scope_key",
    "session_ready", "set_control", "set_data_note", "startup_budget", "StartupPanel", "set_plan", "set_settings",
    "show_data_note", "split_to_cuts", "wilson_interval",
    "with_finetuning",
]
