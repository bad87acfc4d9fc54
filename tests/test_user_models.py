"""Your own model: Python-defined architectures (explicit opt-in), pretrained torchvision weights from a local
torch hub cache (never downloaded), the first-result time budget, and a torchvision ResNet-18 through ONNX."""

from __future__ import annotations

import io
import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xaicomp_core import CompressionPlan, CompressionSession, load_model
from xaicomp_core.cli import main
from xaicomp_core.errors import WeightsError
from xaicomp_core.io.export import export_packed, verify_packed
from xaicomp_core.io.fit import Budget, budget_from_timings, plan_budget
from xaicomp_core.io.onnx_import import InputSpec
from xaicomp_core.io.pretrained import PretrainedMissing, weights_file
from xaicomp_core.io.sources import DataSource, ModelSource, Sources
from xaicomp_core.io.user_code import code_allowed

NET_PY = textwrap.dedent('''
    import torch
    from torch import nn

    CALLS = []

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(2))
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))

    def build():
        CALLS.append(1)
        return TinyNet()
''')


@pytest.fixture()
def net_py(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(NET_PY)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(NET_PY, str(path), "exec"), ns)
    ref = ns["build"]().eval()
    from safetensors.torch import save_file

    weights = tmp_path / "mynet.safetensors"
    save_file(ref.state_dict(), str(weights))
    return {"path": path, "weights": weights, "ref": ref}


def test_python_factory_with_weights(net_py):
    spec = f"{net_py['path']}:build"
    with pytest.raises(WeightsError, match="declare the input size"):
        load_model(spec, weights=str(net_py["weights"]))
    model = load_model(spec, weights=str(net_py["weights"]), declared=InputSpec(input_size=(28, 28)))
    info = model.xaicomp_info
    assert info.num_classes == 10 and info.preprocessing.channels == 1 and info.preprocessing.input_size == (28, 28)
    # declared nothing about pixels: [0, 1], no mean/std (never Fashion-MNIST's)
    assert info.preprocessing.mean == (0.0,) and info.preprocessing.std == (1.0,)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net_py["ref"](x))
    # weights that do not fit are named
    bad = net_py["path"].parent / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 32)}, str(bad))
    with pytest.raises(WeightsError, match="head.weight"):
        load_model(spec, weights=str(bad), declared=InputSpec(input_size=(28, 28)))
    with pytest.raises(WeightsError, match="no function 'nope'"):
        load_model(f"{net_py['path']}:nope", declared=InputSpec(input_size=(28, 28)))


def test_python_factory_sidecar_and_cli_round_trip(net_py, capsys, tmp_path):
    (net_py["path"].parent / "mynet.py.json").write_text(json.dumps({"input_size": [28, 28], "mean": [0.286],
                                                                    "std": [0.353]}))
    common = ["--model-py", f"{net_py['path']}:build", "--weights", str(net_py["weights"]),
              "--reference-samples", "60", "--eval-samples", "100", "--threads", "2"]
    rc = main(["compress", *common, "--prune", "0.3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    d = json.loads(captured.out)
    assert 0 <= d["baseline_accuracy"] <= 1
    out = tmp_path / "py.xcz"
    assert main(["export", *common, "--prune", "0.3", "-o", str(out), "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    # a packed file never makes xaicomp run code: verify needs the same FILE.py:FACTORY again
    rc = main(["verify", str(out), "--data", "fashion-mnist", "--eval-samples", "100"])
    assert rc == 2 and "--model-py" in capsys.readouterr().err
    rc = main(["verify", str(out), "--model-py", f"{net_py['path']}:build", "--data", "fashion-mnist",
               "--eval-samples", "100", "--json"])
    v = json.loads(capsys.readouterr().out)
    assert rc == 0 and v["ok"] and v["accuracy"] == e["accuracy"]
    # the rendered command carries the factory, the weights and the declared preprocessing
    src = ModelSource(f"{net_py['path']}:build", weights=str(net_py["weights"]),
                      declared=InputSpec(input_size=(28, 28)))
    assert src.kind == "python"
    words = src.cli_words()
    assert words[:4] == ["--model-py", f"{net_py['path']}:build", "--weights", str(net_py["weights"])]
    assert "--input-size" in words


def test_code_runs_only_on_explicit_opt_in(monkeypatch):
    monkeypatch.delenv("XAICOMP_ALLOW_CODE", raising=False)
    assert not code_allowed(["streamlit", "run", "app.py"])
    assert code_allowed(["app.py", "--allow-code"])
    monkeypatch.setenv("XAICOMP_ALLOW_CODE", "1")
    assert code_allowed(["app.py"])


# ----------------------------------------------------------------------------------------------------------------
# pretrained torchvision weights
# ----------------------------------------------------------------------------------------------------------------
ARCH = "squeezenet1_1"  # torchvision's smallest ImageNet classifier (1.2 M parameters)


def test_pretrained_from_local_cache_only(tmp_path, monkeypatch, capsys):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, url = weights_file(ARCH)
    assert str(path).startswith(str(tmp_path)) and path.name == url.rsplit("/", 1)[1]
    with pytest.raises(PretrainedMissing) as e:
        load_model(ARCH)
    msg = str(e.value)
    assert path.name in msg and str(path.parent) in msg and "\n" not in msg
    rc = main(["compress", "--arch", ARCH, "--pretrained"])
    err = capsys.readouterr().err
    assert rc == 2 and path.name in err
    # random weights saved under torchvision's file name stand in for the real file
    torch.manual_seed(0)
    state = torchvision.models.get_model(ARCH, weights=None).state_dict()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = load_model(ARCH)
    info = model.xaicomp_info
    assert info.source == "pretrained" and info.num_classes == 1000 and info.class_names[0] == "tench"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # 1000 ImageNet outputs on the 10 Fashion-MNIST classes: refused, never evaluated
    rc = main(["compress", "--arch", ARCH, "--pretrained", "--eval-samples", "20", "--reference-samples", "10"])
    err = capsys.readouterr().err
    assert rc == 2 and "1000 outputs" in err and "10 classes" in err


# ----------------------------------------------------------------------------------------------------------------
# time budget
# ----------------------------------------------------------------------------------------------------------------
def test_budget_times_one_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    b = plan_budget(model, x, y, x, reference=1000, evaluation=5000, num_classes=10, target=1e-9)
    assert isinstance(b, Budget) and b.forward_s > 0 and b.relevance_s > 0 and b.fixed_s >= 0
    assert b.too_slow and b.seconds == pytest.approx(b.fixed_s + 1000 * b.relevance_s + 2 * 5000 * b.forward_s)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_budget_proposes_counts_within_the_target():
    # 50 ms forward, 200 ms LRP per image, 2 s once: 1000 reference and 500 evaluation images take 252 s
    b = budget_from_timings(0.05, 0.2, 2.0, 1000, 500, num_classes=10, target=30)
    assert b.seconds == pytest.approx(2 + 200 + 50) and b.too_slow
    # half of the 28 s left goes to LRP (70 images), half to the two evaluations (140 images)
    assert (b.proposed_reference, b.proposed_evaluation) == (70, 140)
    assert b.proposed_seconds == pytest.approx(2 + 14 + 14)
    line = b.describe()
    assert "--reference-samples 70 --eval-samples 140" in line and "252 s" in line
    # within the target: nothing to propose
    fast = budget_from_timings(0.001, 0.004, 0.1, 1000, 500, num_classes=10, target=30)
    assert not fast.too_slow and (fast.proposed_reference, fast.proposed_evaluation) == (1000, 500)
    assert "--reference-samples" not in fast.describe()
    # never fewer than one image per class, class-balanced multiples
    slow = budget_from_timings(1.0, 5.0, 20.0, 1000, 500, num_classes=10, target=30)
    assert (slow.proposed_reference, slow.proposed_evaluation) == (10, 10)
    odd = budget_from_timings(0.05, 0.2, 2.0, 1000, 500, num_classes=7, target=30)
    assert odd.proposed_reference % 7 == 0 and odd.proposed_evaluation % 7 == 0


# ----------------------------------------------------------------------------------------------------------------
# a torchvision ResNet-18 through ONNX
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchvision_resnet18_through_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(2)
    for m in src.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(src, (torch.zeros(1, 3, 64, 64),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)
    path = tmp_path / "resnet18.onnx"
    path.write_bytes(buf.getvalue())
    model = load_model(str(path))
    x = torch.rand(6, 3, 64, 64)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    from zennit.layer import Sum

    assert sum(isinstance(m, Sum) for m in model.modules()) == 8  # one per residual block
    from xaicomp_core import compute_relevance

    res = compute_relevance(model.double(), x.double()[:2], torch.tensor([1, 2]), "epsilon", epsilon=1e-12,
                            stabilizer=1e-12, keep_input=True, batch_size=2)
    for name, flow in res.flows.items():
        assert flow.weight == pytest.approx(flow.input, rel=1e-7, abs=1e-9), name
    total = float(res.input.sum()) + sum(f.bias for f in res.flows.values())
    assert total == pytest.approx(2.0, rel=1e-5)
    # export -> verify on a few images (the graph is stored without its weights)
    model = load_model(str(path))
    imgs = (np.random.default_rng(0).random((20, 64, 64, 3)) * 255).astype(np.uint8)
    from xaicomp_core.io.data import ImageDataset

    ds = ImageDataset(imgs, np.arange(20) % 10, [str(i) for i in range(10)], "random")
    session = CompressionSession(model, ds.subset(range(10)), ds.subset(range(10, 20)))
    res = export_packed(session, CompressionPlan(prune_ratio=0.5, bit_levels=[8]))
    assert len(res.header["architecture"]["graph"]) < 200_000 < res.payload_bytes
    v = verify_packed(res.data, session.x_eval, session.y_eval)
    assert v.ok and v.logits_match


def test_sources_for_an_onnx_upload_render_a_placeholder():
    src = Sources(ModelSource("onnx", weights=b"\x00", weights_name="net.onnx"), DataSource())
    assert "YOUR_MODEL.onnx" in str(src.command("compress"))
