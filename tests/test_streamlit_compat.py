"""The one Streamlit workaround (``pages/common.py::leave_pages_directory_mode``) is still needed and still works.

A folder named ``pages/`` next to the entry script puts a Streamlit process in legacy (v1) multipage mode until the
first ``st.navigation`` call, and ``AppTest`` resets that flag before each run. If the first test fails, Streamlit
changed: the workaround may be unnecessary (or must change); if the second fails, it no longer takes effect.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_streamlit_still_starts_in_pages_directory_mode():
    from streamlit.runtime.pages_manager import PagesManager

    saved = PagesManager.uses_pages_directory
    try:
        PagesManager.uses_pages_directory = None
        PagesManager(str(ROOT / "app.py"))
        assert PagesManager.uses_pages_directory is True, (
            "Streamlit no longer enters legacy pages/ mode for app.py: revisit leave_pages_directory_mode")
    finally:
        PagesManager.uses_pages_directory = saved


def test_the_workaround_leaves_pages_directory_mode():
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()  # AppTest resets the flag to None; the first run must end in st.navigation mode
    assert not at.exception, [e.value for e in at.exception]
    assert PagesManager.uses_pages_directory is False
    assert at.sidebar.selectbox(key="sb_builtin") is not None  # the frame (app.py's sidebar) ran


def test_the_app_runs_without_streamlits_collection_after_each_run():
    """``.streamlit/config.toml`` switches off ``runner.postScriptGC``: Streamlit's full garbage collection after
    every run holds the GIL before the page hears that the run ended (0.21 s in this app's process). Read back
    through Streamlit's own config loader in the app's folder, so a misspelt key or section fails here."""
    import subprocess

    code = ("from streamlit import config; config.get_config_options(force_reparse=True); "
            "print(config.get_option('runner.postScriptGC'), config.get_where_defined('runner.postScriptGC'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[0] == "False", out
    assert out[1].endswith(".streamlit/config.toml"), out
