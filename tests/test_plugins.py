"""Extending xaicomp with one file: the example plugin's criterion works in the Python API, in the CLI (loaded
through the real ``xaicomp.plugins`` entry point) and in the app's criterion list; registries reject clashes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from xaicomp_core import (
    CompressionPlan,
    CompressionSession,
    Criterion,
    PlanError,
    compress,
    load_builtin_dataset,
    load_builtin_model,
    register_criterion,
)
from xaicomp_core.compress.criteria import CRITERIA, CRITERION_REGISTRY

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "examples" / "plugin"
NAME = "layer-magnitude"


@pytest.fixture
def plugin():
    """The example plugin's criterion, registered for one test and removed afterwards."""
    sys.path.insert(0, str(PLUGIN_DIR))
    try:
        import xaicomp_example_plugin as mod

        if NAME not in CRITERION_REGISTRY:
            register_criterion(mod.LayerMagnitude)
        yield mod
    finally:
        CRITERION_REGISTRY.unregister(NAME)
        sys.path.remove(str(PLUGIN_DIR))


def test_plugin_criterion_in_session_and_pure_compress(plugin):
    model = load_builtin_model("fashion-lenet")
    ev = load_builtin_dataset("fashion-mnist", "eval").balanced_subset(200)
    ref = load_builtin_dataset("fashion-mnist", "reference").balanced_subset(50)
    session = CompressionSession(model, ref, ev)
    plan = CompressionPlan(criterion=NAME, prune_ratio=0.6, bit_levels=[8, 4], bit_split=[0.5])
    assert NAME in CRITERIA and plan.validate() is plan
    res = session.evaluate(plan)
    assert res.sparsity == pytest.approx(0.6, abs=1e-4)
    assert not session.has_relevance()  # the plugin says it needs no relevance, and none was computed
    # the same plan through the pure function gives the same weights and size
    cw = compress(model, plan)
    assert cw.size.estimated_bytes == res.size.estimated_bytes
    assert bool((cw.keep == session.compress(plan).keep).all())
    # it ranks differently from plain magnitude (normalised per layer)
    mag = session.evaluate(plan.replace(criterion="magnitude"))
    assert [la.sparsity for la in mag.layers] != [la.sparsity for la in res.layers]


def test_registry_rejects_a_clash_and_a_bad_object():
    class Clash(Criterion):
        name = "magnitude"

    with pytest.raises(Exception, match="already registered"):
        register_criterion(Clash)
    with pytest.raises(PlanError, match="not a Criterion"):
        register_criterion(object())
    with pytest.raises(PlanError, match="unknown criterion 'nope'; choose one of paper, lrp"):
        CompressionPlan(criterion="nope").validate()


def test_cli_loads_the_plugin_through_its_entry_point(tmp_path):
    # a dist-info folder on the path is exactly what `pip install examples/plugin` leaves in site-packages
    dist = tmp_path / "xaicomp_example_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xaicomp-example-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[xaicomp.plugins]\nexample = xaicomp_example_plugin\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(PLUGIN_DIR)]))
    cmd = [sys.executable, "-m", "xaicomp_core", "compress", "--model", "fashion-lenet", "--criterion", NAME,
           "--prune", "0.5", "--eval-samples", "100", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["plan"]["criterion"] == NAME and d["sparsity"] == pytest.approx(0.5, abs=1e-4)
    # without the entry point the name is unknown: one readable line, exit 2
    env.pop("PYTHONPATH")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 2 and f"unknown criterion '{NAME}'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_app_lists_the_plugin_criterion(plugin):
    from streamlit.testing.v1 import AppTest

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.sidebar.selectbox(key="sb_builtin").select("fashion-lenet").run()
    at.switch_page("pages/compress.py").run()
    assert not at.exception, [e.value for e in at.exception]
    box = at.selectbox(key="cp_criterion")
    assert NAME in box.options or any(NAME in str(o) for o in box.options)
    box.select(NAME).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
