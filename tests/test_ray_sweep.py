"""Sweeps on Ray (``xaicomp sweep --ray``, ``make results RAY=...``): the same rows as in-process, relevance shared
from the driver, a killed worker's plans retried, and one readable line without the ray package.

Ray runs as a local instance bound to 127.0.0.1 without dashboard; every test shuts it down again."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray

from xaicomp_core.cli.main import main
from xaicomp_core.evaluate.distributed import RAY_MISSING, RayEvaluator, ray_instance, run_sweep_ray
from xaicomp_core.evaluate.session import CompressionSession
from xaicomp_core.evaluate.sweep import BitSetting, run_sweep
from xaicomp_core.io.data import load_builtin_dataset
from xaicomp_core.io.models import load_builtin_model
from xaicomp_core.plan import CompressionPlan
from xaicomp_core.relevance.lrp import compute_relevance

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["--model", "fashion-lenet", "--reference-samples", "100", "--eval-samples", "300"]
BITS = [BitSetting(), BitSetting.parse("4"), BitSetting.parse("8,4,2:0.2,0.5")]


@pytest.fixture(scope="module", autouse=True)
def ray_token(tmp_path_factory):
    """Ray's token authentication (its default) with one token file of this module's own, so that Ray writes none
    to ~/.ray; Ray reads the token once per process, hence one token for all tests here."""
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(secrets.token_hex(32))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it to "token" when it starts an instance: undone after
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        yield token


@pytest.fixture
def ray_local():
    """A local 2-CPU Ray instance on 127.0.0.1 (no dashboard), shut down after the test."""
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def small_session():
    model = load_builtin_model("fashion-lenet")
    ref = load_builtin_dataset("fashion-mnist", "reference").balanced_subset(100)
    ev = load_builtin_dataset("fashion-mnist", "eval").balanced_subset(300)
    return CompressionSession(model, ref, ev)


def _fresh(session: CompressionSession) -> CompressionSession:
    """A new session on the same model and data (empty caches)."""
    return CompressionSession(session.model, (session.x_ref, session.y_ref), (session.x_eval, session.y_eval))


@pytest.mark.slow
def test_ray_rows_equal_in_process_rows_and_use_the_drivers_relevance(ray_local, small_session):
    criteria, ratios = ["lrp", "magnitude", "random"], [0.0, 0.5, 0.8, 0.95]
    local = run_sweep(small_session, criteria, ratios, BITS)
    seen: list[tuple[int, int]] = []
    rows = run_sweep_ray(_fresh(small_session), criteria, ratios, BITS,
                         progress=lambda done, total: seen.append((done, total)))
    assert rows == local  # every field, same order
    assert len(rows) == 36 and any(r["pareto"] for r in rows)
    assert seen[-1] == (36, 36) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert ray.is_initialized()  # an instance started by the caller is left running

    # the workers use the relevance the driver shares, never their own: seed the driver with the relevance of
    # another composite under the name "epsilon"; Ray must reproduce the in-process rows of that seeded session
    other = compute_relevance(small_session.model, small_session.x_ref, small_session.y_ref, "alpha2beta1",
                              by_class=True)
    seeded = _fresh(small_session)
    seeded.set_relevance(dataclasses.replace(other, composite="epsilon"), "epsilon")
    seeded_local = run_sweep(seeded, ["lrp"], ratios, BITS[:1])
    assert [r["accuracy"] for r in seeded_local] != [r["accuracy"] for r in local if r["criterion"] == "lrp"][:4]
    seeded_ray = _fresh(small_session)
    seeded_ray.set_relevance(dataclasses.replace(other, composite="epsilon"), "epsilon")
    assert run_sweep_ray(seeded_ray, ["lrp"], ratios, BITS[:1]) == seeded_local


def test_set_relevance_refuses_another_models_relevance(small_session):
    rel = small_session.relevance()
    name = small_session.layout.names[0]
    wrong = dataclasses.replace(rel, weights={**rel.weights, name: rel.weights[name][:1]})
    from xaicomp_core.errors import XaicompError

    with pytest.raises(XaicompError, match="another model"):
        _fresh(small_session).set_relevance(wrong)


def _ray_workers_running(task: str) -> list[int]:
    """PIDs of this process's Ray workers whose process title says they are running ``task`` now."""
    me = os.getpid()
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(f"ray::{task}"):
                continue
            pid = int(entry.name)
            while pid > 1:  # a descendant of this test process (its raylet's worker), not another session's
                pid = int((pathlib.Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    out.append(int(entry.name))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.slow
def test_a_killed_worker_has_its_plans_retried(ray_local, small_session):
    # lrp-iterative plans recompute the relevance of pruned models: slow enough to catch a worker at work
    plans = [CompressionPlan(criterion=c, prune_ratio=r) for c in ("lrp-iterative", "magnitude")
             for r in (0.3, 0.6, 0.9)]
    expected = [small_session.evaluate(p) for p in plans]
    evaluator = RayEvaluator(_fresh(small_session))
    box: dict = {}

    def sweep() -> None:
        try:
            box["results"] = evaluator.evaluate(plans)
        except Exception as e:  # e.g. WorkerCrashedError when the plan was not retried
            box["error"] = e

    worker = threading.Thread(target=sweep)
    worker.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and worker.is_alive() and time.time() < deadline:
        running = _ray_workers_running("evaluate_plan")
        if running:
            killed = running[0]
            os.kill(killed, signal.SIGKILL)
        else:
            time.sleep(0.02)
    assert killed is not None, "no worker was caught running a plan"
    worker.join(300)
    assert not worker.is_alive()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # reaped by the raylet
            os.kill(killed, 0)
            time.sleep(0.05)
    assert "error" not in box, box.get("error")
    results = box["results"]
    assert [r.plan.key() for r in results] == [p.key() for p in plans]
    assert [(r.accuracy, r.size.estimated_bytes, r.sparsity, r.mean_bits) for r in results] == [
        (r.accuracy, r.size.estimated_bytes, r.sparsity, r.mean_bits) for r in expected]


@pytest.mark.slow
def test_cli_sweep_ray_starts_and_stops_a_local_instance_and_prints_the_same_rows(capsys, tmp_path):
    with ray_instance() as r:  # no address: a local instance sized to the machine
        assert r.cluster_resources()["CPU"] == os.cpu_count()
    assert not ray.is_initialized()

    args = ["sweep", *SMALL, "--ratios", "0,0.5,0.9", "--criteria", "lrp,magnitude", "--bit-settings", "fp32",
            "4", "--json"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*args, "--ray"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == local
    assert "plans: 12/12" in captured.err
    assert not ray.is_initialized()  # the instance --ray started is shut down

    out = tmp_path / "rows.csv"
    assert main(["sweep", *SMALL, "--ratios", "0.5", "--criteria", "magnitude", "--ray", "local", "-o",
                 str(out)]) == 0
    assert out.read_text().splitlines()[0].startswith("criterion,prune_ratio,bits")
    assert not ray.is_initialized()


def _untimed(obj):
    """``obj`` without the wall-clock fields (keys ending in ``seconds``)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not str(k).endswith("seconds")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.mark.slow
def test_results_on_ray_equal_results_in_process(ray_local, tmp_path):
    from xaicomp_core.results import main as results_main

    quick = ["--models", "fashion-lenet", "--quick", "--threads", "2"]
    assert results_main([*quick, "--out", str(tmp_path / "local")]) == 0
    assert results_main([*quick, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    local, on_ray = (json.loads((tmp_path / d / "results" / "summary.json").read_text())["models"]["fashion-lenet"]
                     for d in ("local", "ray"))
    # every number, fine-tuned plans included (each task uses --threads torch threads, like the driver)
    assert _untimed(on_ray) == _untimed(local)
    assert ray.is_initialized()


@pytest.mark.slow
def test_cli_sweep_ray_connects_to_a_running_cluster(capsys, ray_token):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # its own short temp dir (Unix socket paths are short): no ray_current_cluster left in /tmp/ray
    temp = tempfile.mkdtemp(prefix="xcr", dir="/tmp")
    head = subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:  # until the head's GCS accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
                time.sleep(0.5)
        args = ["sweep", *SMALL, "--ratios", "0,0.9", "--criteria", "lrp,random", "--json"]
        assert main(args) == 0
        local = json.loads(capsys.readouterr().out)
        # a fresh process, like a user's: with an explicit address Ray uses token authentication only when told
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token)}
        done = subprocess.run([sys.executable, "-m", "xaicomp_core", *args, "--ray", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == local
        assert head.poll() is None  # the cluster itself keeps running after the sweep disconnected
    finally:
        head.terminate()  # `ray start --block` stops its processes on SIGTERM
        head.wait(120)
        shutil.rmtree(temp, ignore_errors=True)


def test_without_ray_one_readable_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails like a missing package
    line = f"xaicomp: error: {RAY_MISSING}\n"
    assert RAY_MISSING == "--ray needs the ray package: pip install 'xaicomp[ray]'"
    assert main(["sweep", *SMALL, "--ratios", "0.5", "--criteria", "magnitude", "--ray"]) == 2
    assert capsys.readouterr().err == line
    from xaicomp_core.results import main as results_main

    assert results_main(["--models", "fashion-lenet", "--quick", "--out", str(tmp_path), "--ray"]) == 2
    assert capsys.readouterr().err == line
    assert not (tmp_path / "results" / "summary.json").exists()


def test_an_unreachable_cluster_is_one_line_before_any_work(capsys):
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["sweep", *SMALL, "--ratios", "0.5", "--criteria", "magnitude", "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xaicomp: error: cannot reach the Ray cluster at '127.0.0.1:{port}'")
    assert err.count("\n") == 1 and "relevance" not in err
    assert not ray.is_initialized()


def test_engine_and_other_commands_work_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import xaicomp_core, xaicomp_core.evaluate.distributed, xaicomp_core.results\n"
            "from xaicomp_core.cli.main import main\n"
            "sys.exit(main(['info', '--json']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fashion-lenet" in done.stdout
