"""Integrity and isolation: the shared model never changes, no temporary files are left, limits are configured."""

from __future__ import annotations

import pathlib
import tempfile

import pytest
import torch

from xaicomp_core import CompressionPlan, export_packed
from xaicomp_core.io.export import dense_bytes, onnx_bytes
from xaicomp_core.io.models import state_dict_hash
from xaicomp_core.report.html import build_report

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_model_hash_unchanged_by_evaluations_and_exports_and_no_temp_files(lenet_session, tmp_path, monkeypatch):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    h = state_dict_hash(lenet_session.model)
    plans = [CompressionPlan(criterion="lrp", prune_ratio=r, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])
             for r in (0.3, 0.6, 0.9)] + [CompressionPlan(criterion="lrp-filter", prune_ratio=0.4, bit_levels=[4])]
    for plan in plans:
        lenet_session.evaluate(plan)
        export_packed(lenet_session, plan, tmp_path / "m.xcz")
    dense_bytes(lenet_session, plans[0])
    onnx_bytes(lenet_session.compressed_model(plans[0]), lenet_session.info.preprocessing)
    build_report(lenet_session, plans[1], sweep_criteria=["lrp"], sweep_ratios=[0.0, 0.5], heatmap_samples=2)
    assert state_dict_hash(lenet_session.model) == h == lenet_session.model_hash
    assert list(private_tmp.iterdir()) == []


def test_concurrent_evaluations_do_not_mix(lenet_session):
    """Two threads (two browser sessions sharing the cached session) evaluating different plans at once."""
    import threading

    plans = {"a": CompressionPlan(criterion="magnitude", prune_ratio=0.8, bit_levels=[2]),
             "b": CompressionPlan(criterion="random", prune_ratio=0.2, seed=11)}
    fresh = {k: p.replace(seed=p.seed + 100) if k == "a" else p.replace(scope="per-layer")
             for k, p in plans.items()}
    expected = {k: lenet_session.compressed_logits(p).argmax(1) for k, p in fresh.items()}
    results: dict[str, list] = {"a": [], "b": []}

    def work(key: str) -> None:
        for _ in range(3):
            results[key].append(lenet_session.evaluate(fresh[key]).predictions)
            with lenet_session._lock:
                lenet_session._results.clear()  # force real work every time

    threads = [threading.Thread(target=work, args=(k,)) for k in fresh]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in fresh:
        assert all(torch.equal(p, expected[k]) for p in results[k]), k
    assert lenet_session.check_unchanged()


def test_upload_limit_is_configured():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    limit = config["server"]["maxUploadSize"]
    assert isinstance(limit, int) and 1 <= limit <= 1024
    from xaicomp_core.io.models import MAX_WEIGHTS_BYTES

    assert limit * 2**20 <= MAX_WEIGHTS_BYTES  # the core never refuses what the app accepts


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_inputs_are_refused_by_the_session(bad):
    from xaicomp_core import CompressionSession, DataError, load_builtin_model

    x = torch.zeros(4, 1, 28, 28)
    x[1, 0, 3, 3] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        CompressionSession(load_builtin_model("fashion-lenet"), (x, torch.arange(4)), (torch.zeros(2, 1, 28, 28),
                                                                                      torch.tensor([0, 1])))
