"""The device-agnostic engine and memory-bounded batches.

CPU tests: ``device="cpu"`` and ``"auto"`` give the default's numbers bit for bit (on a machine without a GPU), the
default memory budget keeps the built-in models' batches, a smaller budget gives smaller batches and the same
predictions, ``--device cuda`` without a GPU is one error line (exit 2), and the relevance and evaluation passes of a
torchvision ResNet-18 at 224x224 stay within a memory budget (peak resident memory measured in fresh processes).
One test runs the CUDA path; it is skipped where torch sees no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from xaicomp_core import CompressionPlan, CompressionSession, load_builtin_model
from xaicomp_core.cli.main import main
from xaicomp_core.device import (
    DeviceError,
    device_choices,
    measure_memory_cost,
    memory_budget_bytes,
    resolve_device,
)
from xaicomp_core.io.data import as_tensors
from xaicomp_core.io.models import state_dict_hash
from xaicomp_core.relevance.lrp import compute_relevance, weight_relevance

NO_GPU_LINE = ("xaicomp: error: --device cuda: no CUDA GPU is available on this machine "
               "(torch.cuda.is_available() is False)")
PLAN = CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])


def _session(ref, ev, **kw) -> CompressionSession:
    return CompressionSession(load_builtin_model("fashion-lenet"), ref, ev, reference_samples=120, **kw)


@pytest.fixture(scope="module")
def small(fashion_ref, fashion_eval):
    return fashion_ref, fashion_eval.balanced_subset(300)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert "cpu" in device_choices() and device_choices()[0] == "auto"
    assert ("cuda" in device_choices()) == torch.cuda.is_available()
    with pytest.raises(DeviceError, match="choose one of auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="positive"):
        memory_budget_bytes(torch.device("cpu"), 0)


def _no_gpu(monkeypatch) -> None:
    """This machine's CUDA answer must be "no GPU" for the error line; where a GPU exists, torch is told so (the
    real answer cannot be produced there)."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    _no_gpu(monkeypatch)
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda")
    assert str(err.value) == "device cuda: no CUDA GPU is available on this machine " \
                             "(torch.cuda.is_available() is False)"
    for argv in (["compress", "--model", "fashion-lenet", "--device", "cuda"],
                 ["verify", str(tmp_path / "missing.xcz"), "--device", "cuda"],
                 ["bench", "--device", "cuda"],
                 ["export", "--model", "fashion-lenet", "-o", str(tmp_path / "m.xcz"), "--device", "cuda"]):
        assert main(argv) == 2, argv
        err_text = capsys.readouterr().err
        assert err_text.strip().splitlines() == [NO_GPU_LINE], argv
    assert main(["compress", "--device", "tpu"]) == 2
    assert "--device: invalid choice" in capsys.readouterr().err
    assert main(["compress", "--memory-budget", "0"]) == 2
    assert "--memory-budget: must be above 0" in capsys.readouterr().err


def _same_result(a, b) -> None:
    assert torch.equal(a.predictions, b.predictions)
    assert (a.accuracy, a.baseline_accuracy, a.size.estimated_bytes) == (b.accuracy, b.baseline_accuracy,
                                                                        b.size.estimated_bytes)


def test_cpu_and_auto_equal_the_default(small):
    ref, ev = small
    base = _session(ref, ev)
    auto = _session(ref, ev, device="auto")
    cpu = _session(ref, ev, device="cpu")
    assert base.device == auto.device
    assert (base.relevance_batch_size, base.eval_batch_size) == (250, 1000)  # the default budget keeps them
    r0 = base.relevance()
    assert all(torch.equal(r0.weights[k], auto.relevance().weights[k]) for k in r0.weights)
    _same_result(base.evaluate(PLAN), auto.evaluate(PLAN))
    if not torch.cuda.is_available():  # then the default is the CPU: the same numbers bit for bit
        assert cpu.device == base.device == torch.device("cpu")
        r1 = cpu.relevance()
        for k, v in r0.weights.items():
            assert torch.equal(v, r1.weights[k]) and torch.equal(r0.abs_by_class[k], r1.abs_by_class[k])
        _same_result(base.evaluate(PLAN), cpu.evaluate(PLAN))
    assert all(v.device.type == "cpu" for v in cpu.relevance().weights.values())
    assert cpu.evaluate(PLAN).predictions.device.type == "cpu"


def test_weight_relevance_device_and_budget(small):
    ref, _ = small
    model = load_builtin_model("fashion-lenet")
    before = state_dict_hash(model)
    x, y = as_tensors(ref, model.xaicomp_info.preprocessing, 10, "reference data")
    x, y = x[:64], y[:64]
    plain = weight_relevance(model, x, y, device="cpu")
    auto = weight_relevance(model, x, y)
    assert all(torch.equal(plain[k], auto[k]) for k in plain) or torch.cuda.is_available()
    # a budget that allows a few images per batch: the same relevance up to the order of the float32 sums
    cost = measure_memory_cost(model, x)
    budget_mb = (4 * cost.params + 8 * cost.relevance_image_bytes()) / 2**20
    seen = []
    small_batches = compute_relevance(model, x, y, memory_budget_mb=budget_mb, device="cpu",
                                      progress=lambda done, total: seen.append(done))
    assert seen[0] == 8 and len(seen) == 8
    for k, v in plain.items():
        torch.testing.assert_close(small_batches.weights[k], v, rtol=1e-4, atol=1e-6 * float(v.abs().max()))
    assert state_dict_hash(model) == before
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_small_budget_same_predictions(small):
    ref, ev = small
    base = _session(ref, ev, device="cpu")
    cost = base.memory_cost
    budget_mb = (2 * cost.params + 64 * cost.evaluation_image_bytes()) / 2**20
    tight = _session(ref, ev, device="cpu", memory_budget_mb=budget_mb)
    assert tight.eval_batch_size == 64 and tight.relevance_batch_size < 250
    assert torch.equal(base.baseline_pred, tight.baseline_pred)
    assert torch.equal(base.evaluate(PLAN).predictions, tight.evaluate(PLAN).predictions)


def test_cli_device_cpu_and_budget(capsys):
    common = ["compress", "--model", "fashion-lenet", "--eval-samples", "200", "--reference-samples", "100",
              "--prune", "0.5", "--json"]
    assert main(common) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*common, "--device", "cpu", "--memory-budget", "512"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    if not torch.cuda.is_available():
        assert cpu["accuracy"] == default["accuracy"] and cpu["size"] == default["size"]


def test_bench_reports_peak_memory():
    from xaicomp_core.bench import run_bench

    res = run_bench("fashion-lenet", repeats=1, threads=1, batch=32, backends=False, device="cpu")
    for stage in ("relevance", "evaluation"):
        assert res["peak_rss_mb"][stage] > 0 and res["rss_before_mb"][stage] > 0
        assert res["peak_rss_mb"][stage] >= res["rss_before_mb"][stage] - 1
    assert res["device"] == "cpu" and "peak_cuda_mb" not in res


@pytest.mark.slow
def test_app_sidebar_offers_the_devices_this_machine_has():
    import pathlib

    from streamlit.testing.v1 import AppTest

    root = pathlib.Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the app's pages package
    at = AppTest.from_file(str(root / "app.py"), default_timeout=300)
    at.run()
    box = at.sidebar.selectbox(key="sb_device")
    assert list(box.options) == [box.format_func(d) for d in device_choices()] and box.value == "auto"
    assert at.session_state["settings"].device == "auto"
    box.select("cpu").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["settings"].device == "cpu"


# ----------------------------------------------------------------------------------------------------------------
# memory: a torchvision ResNet-18 at 224x224, peak resident memory of each pass measured in a fresh process
# ----------------------------------------------------------------------------------------------------------------
_PROBE = r"""
import json, sys
import torch, torchvision
torch.set_num_threads(1)
import onnx, onnxruntime  # noqa: F401  (libraries mapped before the measurement: their code is not a batch)
from xaicomp_core.device import current_rss_mb, measure_memory_cost, peak_rss_mb, reset_peak_rss
from xaicomp_core.evaluate.session import CompressionSession
from xaicomp_core.io.data import Preprocessing
from xaicomp_core.io.models import ModelInfo, attach_info
from xaicomp_core.relevance.lrp import compute_relevance

stage, budget = sys.argv[1], (None if sys.argv[2] == "none" else float(sys.argv[2]))
torch.manual_seed(0)
info = ModelInfo("resnet18", "resnet18", [str(i) for i in range(10)], Preprocessing((224, 224), 3, (0.5,) * 3,
                                                                                   (0.5,) * 3))
model = attach_info(torchvision.models.resnet18(num_classes=10), info)
x_ref, y_ref = torch.randn(16, 3, 224, 224), torch.zeros(16, dtype=torch.long)  # one class: one group of 16
x_ev, y_ev = torch.randn(32, 3, 224, 224), torch.arange(32) % 10
cost = measure_memory_cost(model, x_ref)
reset_peak_rss()
before = current_rss_mb()
if stage == "relevance":
    batches = []
    compute_relevance(model, x_ref, y_ref, batch_size=16, by_class=True, memory_budget_mb=budget, device="cpu",
                      progress=lambda done, total: batches.append(done))
    batch = batches[0]
else:
    s = CompressionSession(model, (x_ref[:2], y_ref[:2]), (x_ev, y_ev), device="cpu", memory_budget_mb=budget,
                           eval_batch_size=32)
    batch = s.eval_batch_size
print(json.dumps({"growth_mb": peak_rss_mb() - before, "batch": batch, "activations_mb": cost.activations / 2**20,
                  "largest_mb": cost.largest / 2**20}))
"""


def _probe(stage: str, budget: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, stage, budget], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resnet18_relevance_within_budget():
    """400 MB allows 2 of the 16 images per batch: the relevance pass's peak stays within those 400 MB, while the
    same pass with the whole group of 16 in one batch takes well over 400 MB (so the bound can fail)."""
    bounded, whole = _probe("relevance", "400"), _probe("relevance", "none")
    assert bounded["batch"] == 2 and whole["batch"] == 16
    assert bounded["growth_mb"] <= 400, bounded
    assert whole["growth_mb"] > 400, whole
    # the 14 images not held at once: at least half of their measured activations less memory
    assert whole["growth_mb"] - bounded["growth_mb"] >= 0.5 * 14 * bounded["activations_mb"], (bounded, whole)


@pytest.mark.slow
def test_resnet18_evaluation_within_budget():
    """Building the session runs the fast forward's trial and the baseline pass over 32 evaluation images. A
    115 MB budget allows 2 images per batch: above the fixed cost (the same pass one image at a time) its peak
    grows by at most the budget; all 32 at once grows by more than that."""
    one, bounded, whole = _probe("evaluation", "1"), _probe("evaluation", "115"), _probe("evaluation", "none")
    assert (one["batch"], bounded["batch"], whole["batch"]) == (1, 2, 32)
    assert bounded["growth_mb"] - one["growth_mb"] <= 115, (one, bounded)
    assert whole["growth_mb"] - one["growth_mb"] > 115, (one, whole)
    assert whole["growth_mb"] - bounded["growth_mb"] >= 0.5 * 30 * bounded["largest_mb"], (bounded, whole)


# ----------------------------------------------------------------------------------------------------------------
# the CUDA path
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU on this machine: the CUDA path is tested where one is present")
def test_cuda_path_matches_cpu(small, tmp_path):
    from xaicomp_core.io.export import export_packed, verify_packed

    ref, ev = small
    model = load_builtin_model("fashion-vgg")
    before = state_dict_hash(model)
    cpu = CompressionSession(model, ref, ev, reference_samples=120, device="cpu")
    gpu = CompressionSession(model, ref, ev, reference_samples=120, device="cuda")
    assert gpu.device.type == "cuda" and gpu.forward_backend in ("torch", "eager")
    assert all(p.device.type == "cpu" for p in model.parameters()) and state_dict_hash(model) == before
    r_cpu, r_gpu = cpu.relevance(), gpu.relevance()
    for k, v in r_cpu.weights.items():  # float32 rounding, amplified by the epsilon rule where z is near 0
        assert r_gpu.weights[k].device.type == "cpu"
        assert float((r_gpu.weights[k] - v).norm()) <= 1e-2 * float(v.norm()) + 1e-12, k
    # predictions: the same top-1 wherever the CPU's margin is beyond the fast path's near-tie bound
    from xaicomp_core.evaluate.fast import needs_reference

    safe = ~needs_reference(cpu.baseline_logits)
    assert torch.equal(cpu.baseline_pred[safe], gpu.baseline_pred[safe])
    torch.testing.assert_close(gpu.baseline_logits, cpu.baseline_logits, rtol=1e-4, atol=1e-3)
    plan = CompressionPlan(criterion="magnitude", prune_ratio=0.5, bit_levels=[8, 4], bit_split=[0.5])
    res_cpu, res_gpu = cpu.evaluate(plan), gpu.evaluate(plan)
    assert res_gpu.predictions.device.type == "cpu"
    safe = ~needs_reference(cpu.compressed_logits(plan))
    assert torch.equal(res_cpu.predictions[safe], res_gpu.predictions[safe])
    path = tmp_path / "m.xcz"
    export_packed(gpu, plan, path)
    v_gpu = verify_packed(path, gpu.x_eval, gpu.y_eval, device="cuda")
    v_cpu = verify_packed(path, cpu.x_eval, cpu.y_eval, device="cpu")
    assert v_gpu.ok and v_gpu.data_matches and v_gpu.correct == res_gpu.correct
    assert abs(v_cpu.correct - v_gpu.correct) <= int((~safe).sum())
    assert state_dict_hash(model) == before
