"""The app in a real browser: Playwright drives Debian's chromium against ``streamlit run app.py``.

Starts the app on 127.0.0.1 on a free port, visits every page, moves the prune-ratio slider, checks that the metrics
change to the engine's values for the new plan, measures slider release -> updated metrics, and saves screenshots to
test-artifacts/screenshots/ (``make screenshots`` sets ``XAICOMP_SCREENSHOTS=docs/screenshots`` to refresh the
README's pictures). Chromium must be installed (``make test`` installs Debian's package when it can, ``.ci/run``
always); the tests fail with one line saying what to install if it is missing. ``XAICOMP_TEST_MODEL`` picks another
built-in model (default: the app's default); ``XAICOMP_CHROMIUM`` another chromium binary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHOTS = ROOT / os.environ.get("XAICOMP_SCREENSHOTS", "test-artifacts/screenshots")
CHROMIUM = os.environ.get("XAICOMP_CHROMIUM", "")
#: The line .ci/browser prints when chromium is missing.
MISSING = ("xaicomp: chromium not found: the browser tests need Debian's chromium (as root: apt-get install chromium "
           "chromium-driver), or XAICOMP_CHROMIUM=/path/to/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
DEFAULT_MODEL = "fashion-vgg"
MODEL = os.environ.get("XAICOMP_TEST_MODEL", DEFAULT_MODEL)
LOAD_TIMEOUT_MS = 240_000  # first load: model, baseline and relevance on a busy 2-core machine

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``streamlit run app.py`` on a free port; stopped (and its log shown on failure) in the finalizer."""
    with serve(tmp_path_factory.mktemp("streamlit")) as url:
        yield url


@contextlib.contextmanager
def serve(folder: pathlib.Path):
    """A fresh ``streamlit run app.py`` process on a free port of 127.0.0.1 (its log in ``folder``); stopped by its
    PID at the end."""
    port = _free_port()
    log_path = folder / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 - must stay open while the server runs
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1", "--server.port",
         str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    SERVER_PIDS[url] = proc.pid
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"streamlit did not answer on {url} within 90 s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        if "Traceback" in log_path.read_text():
            print(log_path.read_text()[-4000:])


#: url -> PID of the server process behind it
SERVER_PIDS: dict[str, int] = {}


def wait_server_quiet(url: str, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Wait until the server's process has used (almost) no CPU for ``quiet_s`` seconds: its background work (the
    anticipated neighbours) is done, so a bare forward measured now is not slowed by it."""
    def cpu_ticks() -> int:
        fields = pathlib.Path(f"/proc/{SERVER_PIDS[url]}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)

    deadline = time.time() + timeout_s
    prev, since = cpu_ticks(), time.time()
    while time.time() < deadline:
        time.sleep(0.2)
        now = cpu_ticks()
        if now - prev > 2:  # more than 20 ms of CPU in 0.2 s (at 100 ticks per second): still busy
            since = time.time()
        elif time.time() - since >= quiet_s:
            return
        prev = now


def chromium_path() -> str | None:
    """The chromium binary (the same lookup as .ci/browser): ``XAICOMP_CHROMIUM``, else Debian's, else on PATH."""
    if CHROMIUM:
        return CHROMIUM if os.access(CHROMIUM, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.fail(MISSING, pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


# ------------------------------------------------------------------------------------------------------- helpers
def wait_idle(page, timeout: int = LOAD_TIMEOUT_MS) -> float:
    """Wait until no script or fragment run is going on (for half a second) and no spinner is left; return when the
    page became idle (a ``time.perf_counter()`` value: the half second of checking is not part of the wait)."""
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            const idle = app && app.getAttribute('data-test-script-state') === 'notRunning'
                && !document.querySelector('[data-testid="stSpinner"]');
            const now = performance.now();
            if (!idle) { window.__xcIdleSince = undefined; return false; }
            if (window.__xcIdleSince === undefined) { window.__xcIdleSince = now; }
            return now - window.__xcIdleSince > 500;
        }""", timeout=timeout, polling=20)
    idle_for_ms = page.evaluate("() => performance.now() - window.__xcIdleSince")
    return time.perf_counter() - idle_for_ms / 1000


def no_exception(page) -> None:
    exc = page.locator('[data-testid="stException"]')
    assert exc.count() == 0, exc.first.inner_text()


def metric(page, label: str) -> str:
    """The displayed value of the st.metric whose label is exactly ``label``."""
    box = shown(page, "stMetric").filter(has=page.locator('[data-testid="stMetricLabel"]', has_text=label))
    for i in range(box.count()):
        el = box.nth(i)
        if el.locator('[data-testid="stMetricLabel"]').inner_text().strip() == label:
            return el.locator('[data-testid="stMetricValue"]').inner_text().strip()
    raise AssertionError(f"no metric labelled {label!r}")


def goto_page(page, title: str) -> None:
    page.locator('[data-testid="stTopNavLink"]', has_text=title).first.click()
    page.wait_for_selector(f'h1:has-text("{title}")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)


def open_app(browser, app_url: str):
    """A new browser session (its own context) on the app with ``MODEL`` loaded and the Overview page drawn.

    Returns the page and the list that collects its JavaScript errors.
    """
    page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url)
    page.wait_for_selector('[data-testid="stSidebar"]', timeout=LOAD_TIMEOUT_MS)
    if MODEL != DEFAULT_MODEL:
        page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
        page.get_by_role("option", name=MODEL, exact=True).click()
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Baseline accuracy")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    return page, errors


def test_cold_start_shows_every_stage_with_time_left(browser, tmp_path):
    """A fresh server: the first page shows the preparation stage by stage, with the time left, then removes it."""
    with serve(tmp_path) as url:
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(url)
        panel = page.locator('[data-testid="stMarkdownContainer"]', has_text="left in all").first
        panel.wait_for(timeout=LOAD_TIMEOUT_MS)
        seen = {panel.inner_text()}
        while page.locator('[data-testid="stMetricLabel"]:has-text("Baseline accuracy")').count() == 0:
            if panel.count():
                with contextlib.suppress(Exception):  # the box may be replaced between the two calls
                    seen.add(panel.inner_text(timeout=1000))
            page.wait_for_timeout(50)
        text = "\n".join(seen)
        for stage in ("Loading the model", "Loading the images", "Measuring the original model",
                      "LRP relevance (epsilon) on the reference images"):
            assert stage in text, text
        assert "s left" in text and "about" in text
        wait_idle(page)
        assert page.locator('[data-testid="stMarkdownContainer"]', has_text="left in all").count() == 0
        no_exception(page)
        page.close()


def open_compress(page) -> None:
    """Go to the Compress page and wait for its metrics."""
    goto_page(page, "Compress")
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Accuracy with")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)


@functools.cache
def engine_session():
    """An independent engine session on ``MODEL`` with the app's default data (not the app's own)."""
    from xaicomp_core import CompressionSession, load_builtin_dataset, load_builtin_model

    session = CompressionSession(load_builtin_model(MODEL), load_builtin_dataset("fashion-mnist", "reference"),
                                 load_builtin_dataset("fashion-mnist", "eval"), reference_samples=1000)
    session.relevance()
    return session


def engine_result(ratio: int, fold_norm: bool = False):
    """The engine's result for the app's default plan at a prune ratio of ``ratio`` % (BatchNorm stored as scale and
    shift with ``fold_norm``)."""
    from xaicomp_core import CompressionPlan

    return engine_session().evaluate(CompressionPlan(criterion="lrp", prune_ratio=ratio / 100, bit_levels=[8, 4, 2],
                                                     bit_split=[0.2, 0.5], fold_norm=fold_norm))


def shown(page, testid: str):
    """Elements ``data-testid=testid`` of the current run: not inside a container Streamlit marks stale (under load
    the frontend can keep a stale copy of a widget in the DOM after the run; the user does not see it)."""
    return page.locator(f'xpath=//*[@data-testid="{testid}"][not(ancestor::*[@data-stale="true"])]')


def prune_slider(page):
    """The (visually hidden) range input of the Compress page's prune-ratio slider."""
    widget = shown(page, "stSlider").filter(has_text="Prune ratio")
    return widget.locator('input[type="range"]')


def drag_prune_slider(page, percent: float) -> float:
    """Drag the prune-ratio thumb to about ``percent`` (the slider spans 0..95 %); returns the release time."""
    thumb = prune_slider(page).locator("xpath=../..")  # the positioned thumb around the range input
    thumb.scroll_into_view_if_needed()
    box = thumb.bounding_box()
    track = thumb.locator("xpath=..").bounding_box()
    assert box is not None and track is not None
    x0, y0 = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * percent / 95, y0, steps=8)
    page.mouse.up()
    return time.perf_counter()


def bare_forward_seconds(repeats: int = 3) -> float:
    """The benchmarks' denominator, measured in this run: the eager fp32 forward of the unmodified model over the
    evaluation set (BatchNorm unfolded, inference_mode, batches of 1000), median of ``repeats``."""
    import statistics

    import torch

    from xaicomp_core import load_builtin_dataset, load_builtin_model, model_info
    from xaicomp_core.io.data import as_tensors

    model = load_builtin_model(MODEL)
    x, _ = as_tensors(load_builtin_dataset("fashion-mnist", "eval"), model_info(model).preprocessing, 10)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), 1000):
                model(x[i:i + 1000])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


CHANGED_JS = """(old) => {
    const ms = [...document.querySelectorAll('[data-testid="stMetric"]')];
    const m = ms.find(e => e.querySelector('[data-testid="stMetricLabel"]').innerText.trim() === 'Size');
    return m && m.querySelector('[data-testid="stMetricValue"]').innerText.trim() !== old;
}"""


T0 = time.perf_counter()


def scroll_to(page, text: str) -> None:
    """Scroll so that the heading holding ``text`` is at the top of the view."""
    page.get_by_text(text).first.evaluate("e => e.scrollIntoView({block: 'start'})")


def shot(page, name: str) -> pathlib.Path:
    print(f"[{time.perf_counter() - T0:6.1f} s] screenshot {name}")
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.wait_for_timeout(600)  # let plotly finish drawing
    page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000
    return path


# ------------------------------------------------------------------------------------------------------- test
def test_every_page_and_slider(browser, app_url, artifacts):
    page, errors = open_app(browser, app_url)
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert metric(page, "Baseline accuracy").endswith("%")
    shots = [shot(page, "overview")]

    goto_page(page, "Relevance")
    page.wait_for_selector("text=Which pixels does the model use?", timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert page.locator('[data-testid="stPlotlyChart"]').count() >= 4
    shots.append(shot(page, "relevance"))
    scroll_to(page, "Which pixels does the model use?")
    shots.append(shot(page, "relevance-inputs"))

    # ---------------------------------------------------------------- Compress: move the slider, time the update
    wait_server_quiet(app_url)
    bare = bare_forward_seconds()
    open_compress(page)
    no_exception(page)
    before = {k: metric(page, k) for k in ("Accuracy", "Size", "Weights pruned")}
    assert before["Weights pruned"] == "50.0%"
    slider = prune_slider(page)
    assert slider.input_value() == "50"
    # Four drags to positions never seen before (each at least three steps from every position visited: the
    # background anticipates the user's plan one and two steps away). The first is hurried: at once after the page
    # opened, so the background has not reached the comparison plan (magnitude) at that prune ratio yet and both
    # plans are computed after the release; it is reported on its own, not in the medians. Before each of the other
    # three the user reads for a while: the server anticipates meanwhile, including the comparison plan at every
    # prune ratio, so those releases compute the user's own plan and take the comparison from the background. The
    # denominator is measured in this run, on the quiet machine, right before the slider moves (for the hurried
    # drag: right before the page opened).
    drags = []
    for target, hurried in ((10, True), (65, False), (85, False), (25, False)):
        if not hurried:
            page.wait_for_timeout(8000)
            wait_server_quiet(app_url)
            bare = bare_forward_seconds()
        t_release = drag_prune_slider(page, target)
        page.wait_for_function(CHANGED_JS, arg=before["Size"], timeout=60_000, polling=10)
        latency = time.perf_counter() - t_release
        idle = wait_idle(page) - t_release  # when the page became idle, not when the check ended
        no_exception(page)
        ratio = int(slider.input_value())
        after = {k: metric(page, k) for k in ("Accuracy", "Size", "Weights pruned")}
        assert abs(ratio - target) <= 5
        assert after["Size"] != before["Size"]
        assert after["Weights pruned"] == f"{ratio:.1f}%"
        drags.append({"prune_ratio": ratio, "hurried": hurried, "release_to_metrics_s": round(latency, 3),
                      "release_to_idle_s": round(idle, 3), "bare_forward_s": round(bare, 3),
                      "release_to_metrics_ratio": round(latency / bare, 3),
                      "release_to_idle_ratio": round(idle / bare, 3), "load_average": list(os.getloadavg())})
        print(f"[{time.perf_counter() - T0:6.1f} s] {'hurried ' if hurried else ''}drag to {ratio} %: metrics "
              f"{latency:.3f} s, idle {idle:.3f} s, bare forward {bare:.3f} s")
        if target == 65:
            shots.append(shot(page, "compress"))
            scroll_to(page, "Does the explanation help?")
            shots.append(shot(page, "compress-comparison"))
        before = after

    # ---------------------------------------------------------------- Trade-offs: run a sweep
    goto_page(page, "Trade-offs")
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Bit widths").click()
    page.get_by_role("option", name="fp32 (pruning only)", exact=True).click()  # the quickest sweep
    page.get_by_role("button", name="Run sweep").click()
    page.wait_for_selector('[data-testid="stDownloadButton"]', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert page.locator('[data-testid="stPlotlyChart"]').count() >= 1
    shots.append(shot(page, "tradeoffs"))

    if page.locator('[data-testid="stTopNavLink"]', has_text="Export").count():
        goto_page(page, "Export")
        no_exception(page)
        shots.append(shot(page, "export"))

    goto_page(page, "Learn")
    no_exception(page)
    shots.append(shot(page, "learn"))
    page.get_by_role("button", name="Next step").click()
    page.wait_for_selector("text=What LRP computes for a weight", timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert not errors, errors

    # ---------------------------------------------------------------- the displayed numbers are the engine's
    import torch

    from xaicomp_core.viz.figures import fmt_bytes, fmt_pct

    print(f"[{time.perf_counter() - T0:6.1f} s] independent engine check")
    res = engine_result(ratio)
    assert after["Size"] == fmt_bytes(res.size.estimated_bytes)
    assert after["Accuracy"] == fmt_pct(res.accuracy)

    import statistics

    read = [d for d in drags if not d["hurried"]]
    hurried = [d for d in drags if d["hurried"]][0]
    report = {"model": MODEL, "drags": drags,
              "release_to_metrics_ratio": statistics.median(d["release_to_metrics_ratio"] for d in read),
              "release_to_idle_ratio": statistics.median(d["release_to_idle_ratio"] for d in read),
              "hurried_release_to_metrics_ratio": hurried["release_to_metrics_ratio"],
              "hurried_release_to_idle_ratio": hurried["release_to_idle_ratio"],
              "goals": {"release_to_metrics_ratio": 0.35, "release_to_idle_ratio": 1.0},
              "load_average": list(os.getloadavg()),
              "engine_evaluate_s": round(res.seconds, 3), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "torch_threads": torch.get_num_threads(), "screenshots": [os.path.relpath(p, ROOT) for p in shots]}
    (artifacts / "browser-latency.json").write_text(json.dumps(report, indent=2))
    print(f"\nslider release -> updated metrics: median {report['release_to_metrics_ratio']:.2f}x a bare forward, "
          f"-> idle {report['release_to_idle_ratio']:.2f}x over {len(read)} drags to positions never seen ({MODEL}; "
          f"engine {res.seconds:.3f} s); hurried drag: {hurried['release_to_metrics_ratio']:.2f}x and "
          f"{hurried['release_to_idle_ratio']:.2f}x")
    page.close()


def test_auto_search_then_open_its_plan_in_compress(browser, app_url):
    """Auto: a small search in the real app, then "Open this plan in Compress": the Compress page shows that plan
    (its per-layer settings) with the size and evaluation accuracy the Auto page reported."""
    page, errors = open_app(browser, app_url)
    goto_page(page, "Auto")
    budget = page.get_by_role("spinbutton", name="Evaluations per signal")
    budget.fill("8")
    page.get_by_role("button", name="Run search").click()
    opened = page.get_by_role("button", name="Open this plan in Compress")
    opened.first.wait_for(timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert opened.count() == 2  # hybrid and magnitude, side by side
    size, accuracy = metric(page, "Size"), metric(page, "Accuracy (evaluation images)")  # the first column's
    opened.first.click()
    page.wait_for_selector('h1:has-text("Compress")', timeout=LOAD_TIMEOUT_MS)
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Accuracy with")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert page.get_by_text("per-layer", exact=False).count() > 0  # the handed-over plan's per-layer settings
    assert metric(page, "Size") == size
    assert metric(page, "Accuracy") == accuracy
    assert not errors, errors
    page.close()


def test_two_sessions_compress_at_once(browser, app_url):
    """Two browsers move the prune slider to different values at the same time; each sees only its own plan."""
    (a, a_errors), (b, b_errors) = open_app(browser, app_url), open_app(browser, app_url)
    pages = [a, b]
    for page in pages:
        open_compress(page)
        assert prune_slider(page).input_value() == "50"
    size0 = metric(a, "Size")
    assert metric(b, "Size") == size0
    # release both thumbs back to back: the server evaluates the two plans concurrently
    drag_prune_slider(a, 80)
    drag_prune_slider(b, 20)
    for page in pages:
        page.wait_for_function(CHANGED_JS, arg=size0, timeout=60_000, polling=50)
        wait_idle(page)
        no_exception(page)
    ra, rb = int(prune_slider(a).input_value()), int(prune_slider(b).input_value())
    assert ra > 60 and rb < 40

    from xaicomp_core.viz.figures import fmt_bytes, fmt_pct

    for page, ratio in ((a, ra), (b, rb)):
        res = engine_result(ratio)
        assert metric(page, "Weights pruned") == f"{ratio:.1f}%"
        assert metric(page, "Size") == fmt_bytes(res.size.estimated_bytes)
        assert metric(page, "Accuracy") == fmt_pct(res.accuracy)
    # a rerun of one session (here: a page switch and back) still shows its own plan, not the other's
    goto_page(b, "Overview")
    goto_page(b, "Compress")
    assert int(prune_slider(b).input_value()) == rb
    assert not a_errors and not b_errors, a_errors + b_errors
    for page in pages:
        page.close()


# ------------------------------------------------------------- the plan survives errors and uploads in the browser
def shown_controls(page) -> dict:
    """What the Compress page's main controls show in the browser (not what the server holds)."""
    crit = shown(page, "stSelectbox").filter(has_text="Criterion").first
    levels = shown(page, "stMultiSelect").filter(has_text="Bit levels").first
    return {"criterion": crit.locator('input[role="combobox"]').input_value().split(" — ")[0],
            "ratio": prune_slider(page).input_value(),
            "levels": levels.locator("[data-tag]").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")}


FOLD_LABEL = "Store BatchNorm as scale and shift"


def fold_checked(page) -> bool:
    """Whether the Compress page's BatchNorm checkbox (under More settings) shows ticked in the browser."""
    box = shown(page, "stCheckbox").filter(has_text=FOLD_LABEL).first
    return box.locator('input[type="checkbox"]').is_checked()


def click_to_check(label, tries: int = 3) -> int:
    """Click ``label`` (of a checkbox or radio option) until its input shows checked; return the clicks it took.

    A click can be lost in the browser while the page is still laying out under it (an expander opening, charts
    drawn beside it on a loaded machine): the input stays as it was and no run starts. The input's checked state
    changes in the browser at once, whatever the server's load, so only such a lost click is repeated (at most
    ``tries`` clicks in all); an input that was checked and then reset by the app's run is never clicked again, so
    the caller's check of what the page shows still fails."""
    box = label.locator("input")
    for attempt in range(1, tries + 1):
        label.click()
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            if box.is_checked():
                return attempt
            time.sleep(0.05)
    raise AssertionError(f"{tries} clicks on {label} left it unchecked")


def tick_fold(page) -> None:
    """Open More settings, tick the BatchNorm checkbox and wait for the new size."""
    wait_idle(page)  # a click during a run can land on a widget the run is about to replace
    before = metric(page, "Size")
    shown(page, "stExpander").filter(has_text="More settings").first.locator("summary").first.click()
    box = shown(page, "stCheckbox").filter(has_text=FOLD_LABEL).first
    clicks = click_to_check(box.locator("label"))
    try:
        page.wait_for_function(CHANGED_JS, arg=before, timeout=60_000, polling=50)
    except Exception as e:
        state = page.evaluate("""() => ({
            script: document.querySelector('[data-testid="stApp"]').getAttribute('data-test-script-state'),
            boxes: [...document.querySelectorAll('[data-testid="stCheckbox"]')].map(e => [e.innerText.slice(0, 40),
                e.querySelector('input').checked, !!e.closest('[data-stale="true"]')])})""")
        page.screenshot(path=str(ROOT / "test-artifacts" / "tick_fold_failure.png"), full_page=True)
        raise AssertionError(f"the size did not change after ticking the BatchNorm box ({clicks} click(s); size "
                             f"{before} before): {state}") from e
    wait_idle(page)


def press_prune_slider(page, key: str) -> None:
    """One keyboard step of the prune-ratio slider (committed on key down), then wait for the new metrics."""
    before = metric(page, "Size")
    prune_slider(page).focus()
    page.keyboard.press(key)
    page.wait_for_function(CHANGED_JS, arg=before, timeout=60_000, polling=50)
    wait_idle(page)


def sidebar_choose(page, label: str) -> None:
    click_to_check(page.locator('[data-testid="stSidebar"] label', has_text=label).first)


def sidebar_upload(page, path: pathlib.Path) -> None:
    page.locator('[data-testid="stSidebar"] input[type="file"]').first.set_input_files(str(path))


def result_caption(page) -> str:
    return shown(page, "stCaptionContainer").filter(has_text="images correct").first.inner_text()


def image_zip(path: pathlib.Path, per_class: int = 6) -> pathlib.Path:
    """A small ImageFolder zip (one folder per class) of shipped evaluation images, written with PIL."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from xaicomp_core import load_builtin_dataset

    ds = load_builtin_dataset("fashion-mnist", "eval")
    with zipfile.ZipFile(path, "w") as z:
        for c in range(10):
            for k, i in enumerate(np.flatnonzero(ds.labels == c)[:per_class]):
                png = io.BytesIO()
                Image.fromarray(ds.images[i]).save(png, format="PNG")
                z.writestr(f"mydata/{c}/img{k}.png", png.getvalue())
    return path


def test_plan_survives_errors_and_uploads(browser, app_url, tmp_path):
    """Error -> upload -> controls in chromium: the controls keep showing the plan after the page stopped above them
    (zip data chosen but not uploaded, a weights file that is not one), the next key press moves only the prune ratio,
    and back on the built-in data the numbers are the engine's for the plan the controls show."""
    page, errors = open_app(browser, app_url)
    open_compress(page)
    default = {"criterion": "lrp", "ratio": "50", "levels": ["8 bits", "4 bits", "2 bits"]}
    assert shown_controls(page) == default and not fold_checked(page)
    tick_fold(page)  # a control under an expander: it must survive the sequence below as well
    assert fold_checked(page)
    press_prune_slider(page, "ArrowRight")
    plan = dict(default, ratio="55")
    assert shown_controls(page) == plan

    sidebar_choose(page, "ImageFolder .zip upload")
    page.wait_for_selector("text=Upload a .zip", timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    assert prune_slider(page).count() == 0  # the page stopped above the controls
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0  # an explanation, not an error
    sidebar_upload(page, image_zip(tmp_path / "mine.zip"))
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Original accuracy")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert shown_controls(page) == plan and fold_checked(page)
    assert "prune 55% by lrp" in result_caption(page)
    press_prune_slider(page, "ArrowRight")  # the next touch of a control: only that control changes
    plan = dict(plan, ratio="60")
    assert shown_controls(page) == plan
    assert "prune 60% by lrp" in result_caption(page)
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0

    sidebar_choose(page, "Upload your weights")
    page.wait_for_selector("text=Upload the weights", timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not torch")
    sidebar_upload(page, junk)
    page.wait_for_selector('[data-testid="stAlertContentError"]:has-text("junk.pt")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)

    sidebar_choose(page, "Built-in (trained)")
    sidebar_choose(page, "Built-in Fashion-MNIST")
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Original accuracy")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    no_exception(page)
    assert shown_controls(page) == plan
    press_prune_slider(page, "ArrowLeft")
    plan = dict(plan, ratio="55")
    assert shown_controls(page) == plan
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Accuracy with")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)

    from xaicomp_core.viz.figures import fmt_bytes, fmt_pct

    assert fold_checked(page)
    res = engine_result(55, fold_norm=True)
    assert metric(page, "Size") == fmt_bytes(res.size.estimated_bytes)
    assert metric(page, "Accuracy") == fmt_pct(res.accuracy)
    assert "prune 55% by lrp" in result_caption(page) and "BatchNorm stored as scale and shift" in result_caption(page)
    assert not errors, errors
    page.close()


TRUNCATED_JS = """() => [...document.querySelectorAll(
        '[data-testid="stMetric"] .stMarkdownEllipsis, [data-testid^="stBaseButton"] .stMarkdownEllipsis')]
    .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)"""


def test_small_screen(browser, app_url, artifacts):
    """At 1024x768 with the sidebar open (a classroom projector) no metric or button text ends in "…", the Compress
    page shows its result below the plan, and nothing scrolls sideways. Screenshots: test-artifacts/screenshots/."""
    page = browser.new_page(viewport={"width": 1024, "height": 768}, device_scale_factor=1)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url)
    page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Baseline accuracy")', timeout=LOAD_TIMEOUT_MS)
    wait_idle(page)
    out = artifacts / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    for title in ("Overview", "Relevance", "Compress", "Trade-offs", "Export", "Learn"):
        if title != "Overview":
            goto_page(page, title)
        if title == "Compress":
            page.wait_for_selector('[data-testid="stMetricLabel"]:has-text("Accuracy with")', timeout=LOAD_TIMEOUT_MS)
            wait_idle(page)
            plan = page.locator('[data-testid="stSelectbox"]').filter(has_text="Criterion").first.bounding_box()
            result = page.locator('[data-testid="stMetric"]').first.bounding_box()
            assert plan is not None and result is not None
            assert result["y"] > plan["y"] + plan["height"]  # below the plan, not squeezed beside it
        no_exception(page)
        page.wait_for_timeout(600)
        page.screenshot(path=str(out / f"1024-{title.lower()}.png"))
        truncated = page.evaluate(TRUNCATED_JS)
        assert not truncated, f"{title}: text cut off at 1024x768: {truncated}"
        main = page.locator('[data-testid="stMain"]').evaluate("e => [e.scrollWidth, e.clientWidth]")
        assert main[0] <= main[1] + 2, f"{title} scrolls sideways at 1024x768: {main}"
    assert not errors, errors
    page.close()
