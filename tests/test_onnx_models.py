"""ONNX models: converted predictions equal onnxruntime's, LRP conservation and the hand epsilon rule on converted
graphs, export -> verify round trips, the CLI on an ImageFolder zip, declared preprocessing, unsupported operators.

Every ONNX file is built here, by ``torch.onnx.export`` (TorchScript exporter) or ``onnx.helper``.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2torch")

from zennit.layer import Sum  # noqa: E402

from xaicomp_core import CompressionPlan, CompressionSession, compute_relevance, load_model  # noqa: E402
from xaicomp_core.cli import main  # noqa: E402
from xaicomp_core.errors import DataError, WeightsError  # noqa: E402
from xaicomp_core.io.export import export_packed, verify_packed  # noqa: E402
from xaicomp_core.io.onnx_import import (  # noqa: E402
    InputSpec,
    architecture_record,
    convert_onnx,
    input_statement,
    load_onnx_model,
)
from xaicomp_core.io.sources import DataSource, ModelSource, Sources  # noqa: E402

SIZE = 16
CLASSES = ("circle", "cross", "stripes")


# ----------------------------------------------------------------------------------------------------------------
# models and data built here
# ----------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNetLike(nn.Module):
    """A small conv net with BatchNorm and a residual connection."""

    def __init__(self, classes: int = len(CLASSES), width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = Block(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = self.block(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


def export(model: nn.Module, shape=(1, 3, SIZE, SIZE), keep_bn: bool = True, dynamic: bool = True) -> bytes:
    """ONNX bytes; ``keep_bn`` keeps BatchNormalization nodes (no constant folding into the convs)."""
    buf = io.BytesIO()
    kw = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dynamic else {}
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(shape),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, training=mode, do_constant_folding=not keep_bn, **kw)
    return buf.getvalue()


def ort_logits(data: bytes, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy().astype(np.float32)})[0]


def shapes_images(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 16x16 RGB pictures (a disc, a cross, stripes) with random colours, positions and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    imgs, labels = [], []
    for c in range(len(CLASSES)):
        for _ in range(n_per_class):
            cy, cx = rng.integers(5, 11, 2)
            if c == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(9, 20)
            elif c == 1:
                mask = (abs(yy - cy) <= 1) | (abs(xx - cx) <= 1)
            else:
                mask = ((yy + rng.integers(0, 4)) // 2) % 2 == 0
            fg, bg = rng.integers(120, 256, 3), rng.integers(0, 100, 3)
            img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (SIZE, SIZE, 3))
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(imgs), np.asarray(labels)


def zip_of(images: np.ndarray, labels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (img, lab) in enumerate(zip(images, labels)):
            b = io.BytesIO()
            Image.fromarray(img).save(b, "PNG")
            z.writestr(f"shapes/{CLASSES[lab]}/{i:04d}.png", b.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """ResNetLike trained for a few seconds on the shapes (well above chance), BatchNorm statistics included."""
    torch.manual_seed(0)
    x, y = shapes_images(60, seed=1)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)
    model = ResNetLike()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        model.train()
        perm = torch.randperm(len(xt))[:64]
        opt.zero_grad()
        F.cross_entropy(model(xt[perm]), yt[perm]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained) -> dict:
    d = tmp_path_factory.mktemp("onnx")
    model_path = d / "shapes.onnx"
    model_path.write_bytes(export(trained))
    x, y = shapes_images(40, seed=2)
    zip_path = d / "images.zip"
    zip_path.write_bytes(zip_of(x, y))
    return {"dir": d, "model": model_path, "zip": zip_path, "x": x, "y": y}


# ----------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_bn", [True, False])
def test_converted_predictions_equal_onnxruntime(keep_bn):
    torch.manual_seed(3)
    src = random_bn(ResNetLike())
    data = export(src, keep_bn=keep_bn)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert ("BatchNormalization" in ops) == keep_bn and "Add" in ops
    model = load_onnx_model(data, "net.onnx")
    kinds = {type(m) for m in model.modules()}
    assert Sum in kinds and nn.Linear in kinds and nn.Conv2d in kinds and nn.AdaptiveAvgPool2d in kinds
    assert (nn.BatchNorm2d in kinds) == keep_bn
    # every parameter lives in a standard layer (no converter-specific module holds weights)
    owners = {type(m).__module__.split(".")[0] for m in model.modules() if any(True for _ in m.parameters(False))}
    assert owners == {"torch"}
    x = torch.rand(12, 3, SIZE, SIZE)
    with torch.no_grad():
        got = model(x).numpy()
    want = ort_logits(data, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()
    info = model.xaicomp_info
    assert info.num_classes == len(CLASSES) and info.preprocessing.input_size == (SIZE, SIZE)
    assert info.preprocessing.channels == 3
    # the default: pixels in [0, 1], no mean/std -- never Fashion-MNIST's
    assert info.preprocessing.mean == (0.0, 0.0, 0.0) and info.preprocessing.std == (1.0, 1.0, 1.0)
    assert "no mean/std" in input_statement(info)


def test_batchnorm_is_registered_right_after_its_conv():
    """zennit's SequentialMergeBatchNorm pairs a BatchNorm with the leaf registered before it."""
    model = load_onnx_model(export(random_bn(ResNetLike())), "net.onnx")
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    for prev, leaf in zip(leaves, leaves[1:]):
        if isinstance(leaf, nn.BatchNorm2d):
            assert isinstance(prev, nn.Conv2d) and prev.out_channels == leaf.num_features


def test_final_softmax_left_out_and_fixed_batch_freed():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Softmax(dim=1))

    class ViewNet(nn.Module):  # x.view(1, -1) style: a Reshape with the batch of 1 fixed in the graph
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return self.net[4](self.net[3](h.reshape(1, -1)))

    data = export(ViewNet(), shape=(1, 1, 8, 8), dynamic=False)
    assert "Softmax" in [n.op_type for n in onnx.load_from_string(data).graph.node]
    model = load_onnx_model(data, "fixed.onnx")
    assert not any(isinstance(m, nn.Softmax) or "Softmax" in type(m).__name__ for m in model.modules())
    assert "Softmax is left out" in input_statement(model.xaicomp_info)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        got = model(x)
    want = np.concatenate([ort_logits(data, x[i:i + 1]) for i in range(len(x))])
    assert (got.argmax(1).numpy() == want.argmax(1)).all()
    torch.testing.assert_close(got.softmax(1), torch.from_numpy(want), rtol=1e-4, atol=1e-6)


def test_silu_becomes_an_activation():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = export(net, shape=(1, 3, 8, 8))
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert "Sigmoid" in ops and "Mul" in ops
    model = load_onnx_model(data, "silu.onnx")
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    assert not any(type(m).__name__.startswith("Onnx") for m in model.modules() if m is not model)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), ort_logits(data, x), rtol=1e-4, atol=1e-5)


def test_zoo_style_graph_written_by_hand():
    """The layout of ONNX-zoo exports such as mnist-8, written with onnx.helper: a fixed batch of 1, convolutions with
    auto_pad=SAME_UPPER and their biases as separate Adds, the classifier weight reshaped inside the graph, MatMul +
    Add. Converted: biases folded into the convs, a Linear for the MatMul, relevance conserved, onnxruntime's
    predictions."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, arr):
        return numpy_helper.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, name)

    inits = [init("W1", rng.normal(0, .3, (8, 1, 5, 5))), init("B1", rng.normal(0, .1, (8, 1, 1))),
             init("W2", rng.normal(0, .3, (16, 8, 5, 5))), init("B2", rng.normal(0, .1, (16, 1, 1))),
             init("Wfc", rng.normal(0, .1, (16, 4, 4, 10))), init("shape_w", np.array([256, 10], dtype=np.int64)),
             init("shape_x", np.array([1, 256], dtype=np.int64)), init("Bfc", rng.normal(0, .1, (1, 10)))]
    same = {"kernel_shape": [5, 5], "strides": [1, 1], "auto_pad": "SAME_UPPER"}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], **same), helper.make_node("Add", ["c1", "B1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "W2"], ["c2"], **same), helper.make_node("Add", ["c2", "B2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[3, 3], strides=[3, 3]),
             helper.make_node("Reshape", ["Wfc", "shape_w"], ["wr"]),
             helper.make_node("Reshape", ["p2", "shape_x"], ["flat"]),
             helper.make_node("MatMul", ["flat", "wr"], ["mm"]), helper.make_node("Add", ["mm", "Bfc"], ["y"])]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 4
    data = proto.SerializeToString()
    model = load_onnx_model(data, "zoo.onnx")
    assert sorted(model.state_dict()) == ["conv.bias", "conv.weight", "conv_1.bias", "conv_1.weight",
                                          "mat_mul.bias", "mat_mul.weight"]
    x = torch.rand(5, 1, 28, 28)
    want = np.concatenate([ort_logits(data, x[i:i + 1]) for i in range(len(x))])
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    res = compute_relevance(model.double(), x.double(), torch.arange(5), "epsilon", epsilon=1e-12, stabilizer=1e-12,
                            keep_input=True)
    assert float(res.input.sum()) + sum(f.bias for f in res.flows.values()) == pytest.approx(5.0, rel=1e-6)


def test_channels_last_input():
    """A TensorFlow-style graph taking (N, H, W, C) gets a transpose in front and takes (N, C, H, W) images."""
    torch.manual_seed(9)
    net = random_bn(ResNetLike())

    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    data = export(NHWC(), shape=(1, SIZE, SIZE, 3), keep_bn=False)
    model = load_onnx_model(data, "nhwc.onnx")
    info = model.xaicomp_info
    assert info.preprocessing.channels == 3 and info.preprocessing.input_size == (SIZE, SIZE)
    assert "channels-last" in input_statement(info)
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), ort_logits(data, x.permute(0, 2, 3, 1).contiguous()),
                                   rtol=1e-4, atol=1e-5)


def test_unsupported_operators_named_in_one_line(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    nodes = [helper.make_node("FancyOp", ["x"], ["a"], domain="com.example"),
             helper.make_node("MaxRoiPool", ["a", "a"], ["b"], pooled_shape=[1, 1]),
             helper.make_node("Flatten", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "odd.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(WeightsError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "FancyOp" in msg and "MaxRoiPool" in msg and "odd.onnx" in msg


def test_not_onnx_and_not_an_image_classifier(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(WeightsError, match="not a valid ONNX|not an ONNX model"):
        load_model(str(bad))
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 320])
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "g", [x], [y])
    (tmp_path / "five.onnx").write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                                         .SerializeToString())
    with pytest.raises(WeightsError, match="5 channels"):
        load_model(str(tmp_path / "five.onnx"))


def test_declared_preprocessing_from_sidecar_and_options(tmp_path):
    data = export(random_bn(ResNetLike()))
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    (tmp_path / "m.onnx.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                                      "class_names": list(CLASSES)}))
    info = load_model(str(path)).xaicomp_info
    assert info.preprocessing.mean == (0.5,) * 3 and info.preprocessing.std == (0.25,) * 3
    assert info.class_names == list(CLASSES)
    assert "declared in m.onnx.json" in input_statement(info)
    # options win over the sidecar; 0-255 pixels are mean/std in pixel units
    info = load_model(str(path), declared=InputSpec(mean=(127.5,), std=(127.5,), pixel_range=255.0)).xaicomp_info
    assert info.preprocessing.mean == (0.5,) * 3 and info.preprocessing.std == (0.5,) * 3
    assert info.class_names == list(CLASSES)  # still from the sidecar
    (tmp_path / "m.onnx.json").write_text(json.dumps({"mean": [0.5], "scale": 2}))
    with pytest.raises(WeightsError, match="unknown field"):
        load_model(str(path))
    (tmp_path / "m.onnx.json").unlink()
    with pytest.raises(WeightsError, match="4 class names"):
        load_model(str(path), declared=InputSpec(class_names=("a", "b", "c", "d")))


def test_model_source_renders_and_parses_back(tmp_path):
    from xaicomp_core.cli.common import sources_from_args
    from xaicomp_core.cli.main import build_parser

    path = tmp_path / "m.onnx"
    path.write_bytes(export(random_bn(ResNetLike())))
    src = ModelSource(str(path), declared=InputSpec(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))
    assert src.kind == "onnx"
    cmd = Sources(src, DataSource.parse("images.zip")).command("compress")
    args = build_parser().parse_args(cmd.argv)
    again = sources_from_args(args)
    assert again.model == src
    upload = ModelSource("onnx", weights=path.read_bytes(), weights_name="m.onnx")
    assert upload.kind == "onnx" and upload.cli_words()[:2] == ["--model", "YOUR_MODEL.onnx"]
    assert upload.load().xaicomp_info.num_classes == len(CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# relevance
# ----------------------------------------------------------------------------------------------------------------
def test_conservation_on_converted_model():
    """Per layer, weight relevance = input relevance; overall, pixels + biases hold the one unit per image (the
    residual Sum splits instead of copying). The plain conversion (residual Add left as it is) does not conserve."""
    torch.manual_seed(5)
    data = export(random_bn(ResNetLike()))
    model = load_onnx_model(data, "net.onnx").double()
    x = torch.rand(5, 3, SIZE, SIZE, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    res = compute_relevance(model, x, y, "epsilon", epsilon=1e-12, stabilizer=1e-12, keep_input=True, batch_size=5)
    assert set(res.flows) == {"stem_conv", "block_c1_conv", "block_c2_conv", "fc_gemm"}
    for name, flow in res.flows.items():
        assert flow.weight == pytest.approx(flow.input, rel=1e-9, abs=1e-9), name
        assert flow.output == pytest.approx(flow.weight + flow.bias, rel=1e-6, abs=1e-9), name
    total = float(res.input.sum()) + sum(f.bias for f in res.flows.values())
    assert total == pytest.approx(len(x), rel=1e-6)
    # the same check fails without the canonization (relevance doubles at the residual Add)
    plain = convert_onnx(data, "net.onnx", canonize=False).model.double()
    res = compute_relevance(plain, x, y, "epsilon", epsilon=1e-12, stabilizer=1e-12, keep_input=True,
                           batch_size=5)
    total = float(res.input.sum()) + sum(f.bias for f in res.flows.values())
    assert abs(total - len(x)) > 1e-3


class MatMulMLP(nn.Module):
    """Flatten -> MatMul + Add -> ReLU -> Linear (Gemm) -> ReLU -> MatMul + Add."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w1 = nn.Parameter(torch.randn(3 * 6, 6, generator=g) * 0.5)
        self.b1 = nn.Parameter(torch.randn(6, generator=g) * 0.1)
        self.lin = nn.Linear(6, 5)
        self.w3 = nn.Parameter(torch.randn(5, 3, generator=g) * 0.5)
        self.b3 = nn.Parameter(torch.randn(3, generator=g) * 0.1)

    def forward(self, x):
        h = F.relu(torch.flatten(x, 1) @ self.w1 + self.b1)
        h = F.relu(self.lin(h))
        return h @ self.w3 + self.b3


def test_hand_epsilon_on_converted_mlp():
    """LRP-epsilon written out by hand for the three linear layers of a converted MLP (float64)."""
    torch.manual_seed(6)
    data = export(MatMulMLP(), shape=(1, 1, 3, 6))
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert "MatMul" in ops and "Gemm" in ops
    model = load_onnx_model(data, "mlp.onnx").double()
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [m.weight.shape for _, m in lins] == [(6, 18), (5, 6), (3, 5)]
    assert all(m.bias is not None for _, m in lins)
    x = torch.rand(7, 1, 3, 6, dtype=torch.float64) - 0.3
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    eps = 1e-6
    res = compute_relevance(model, x, y, "epsilon", epsilon=eps, keep_input=True, batch_size=4)

    def stab(z):
        return z + eps * ((z == 0).to(z) + z.sign())

    with torch.no_grad():
        acts, a = [], torch.flatten(x, 1)
        for i, (_, m) in enumerate(lins):
            z = m(a)
            acts.append((a, z))
            a = F.relu(z) if i < len(lins) - 1 else z
        R = F.one_hot(y, 3).double()
        for (name, m), (a_in, z) in zip(reversed(lins), reversed(acts)):
            s = R / stab(z)
            torch.testing.assert_close(res.weights[f"{name}.weight"], m.weight * (s.T @ a_in), rtol=0, atol=1e-9)
            torch.testing.assert_close(res.weights[f"{name}.bias"], m.bias * s.sum(0), rtol=0, atol=1e-9)
            R = a_in * (s @ m.weight)
        torch.testing.assert_close(res.input.reshape(len(x), -1), R, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# session, export, verify, CLI
# ----------------------------------------------------------------------------------------------------------------
def test_export_verify_round_trip(files):
    model = load_model(str(files["model"]))
    splits = Sources(ModelSource(str(files["model"])), DataSource.parse(str(files["zip"]))).load_data(
        model.xaicomp_info)
    session = CompressionSession(model, splits.reference, splits.evaluation)
    plan = CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4], bit_split=[0.5])
    res = export_packed(session, plan)
    arch = res.header["architecture"]
    assert arch["stripped"] and all(np.prod(s["dims"]) >= 16 for s in arch["stripped"])
    assert len(arch["graph"]) < len(files["model"].read_bytes())  # the weights are in the payload, not twice
    x, y = session.x_eval, session.y_eval
    v = verify_packed(res.data, x, y)
    assert v.ok and v.logits_match and v.data_matches and v.accuracy == res.header["evaluation"]["accuracy"]
    # with the original file instead of the stored graph
    v = verify_packed(res.data, x, y, model_file=files["model"])
    assert v.ok and v.logits_match
    # a packed file whose graph was altered is refused (header CRC), and a wrong ONNX file does not fit
    other = files["dir"] / "other.onnx"
    other.write_bytes(export(random_bn(ResNetLike(width=4))))
    with pytest.raises(WeightsError, match="do not fit|shape"):
        verify_packed(res.data, x, y, model_file=other)


def _with_header(data: bytes, change) -> bytes:
    """The packed file ``data`` with its JSON header changed by ``change(header)`` (checksum recomputed: what a
    hostile writer can do)."""
    import zlib

    from xaicomp_core.format.packing import MAGIC, PREAMBLE, read_header

    header, start = read_header(data)
    change(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    return PREAMBLE.pack(MAGIC, header["format_version"], len(h), zlib.crc32(h)) + h + data[start:]


def test_hostile_architecture_records_are_refused(files):
    from xaicomp_core.errors import FormatError, XaicompError

    model = load_model(str(files["model"]))
    splits = Sources(ModelSource(str(files["model"])), DataSource.parse(str(files["zip"]))).load_data(
        model.xaicomp_info)
    res = export_packed(CompressionSession(model, splits.reference, splits.evaluation), CompressionPlan())

    def huge(h):
        h["architecture"]["stripped"][0]["dims"] = [2**15, 2**15]  # 4 GiB of placeholder weights

    def garbage(h):
        h["architecture"]["graph"] = "not base64!"

    def other_graph(h):  # a valid record of another model: its tensors do not fit
        other = load_onnx_model(export(random_bn(ResNetLike(width=4))), "other.onnx")
        h["architecture"] = architecture_record(other)

    for change, kind, text in ((huge, FormatError, "more weights"), (garbage, FormatError, "not valid"),
                               (other_graph, XaicompError, "do not fit|shape")):
        with pytest.raises(kind, match=text):
            verify_packed(_with_header(res.data, change))
    del_arch = _with_header(res.data, lambda h: h.pop("architecture"))
    with pytest.raises(FormatError, match="architecture record is missing"):
        verify_packed(del_arch)


def test_session_accuracy_equals_onnxruntime(files):
    model = load_model(str(files["model"]))
    info = model.xaicomp_info
    sources = Sources(ModelSource(str(files["model"])), DataSource.parse(str(files["zip"])))
    splits = sources.load_data(info)
    session = CompressionSession(model, splits.reference, splits.evaluation)
    x_eval, y_eval = session.x_eval, session.y_eval
    want = ort_logits(files["model"].read_bytes(), x_eval).argmax(1)
    ort_acc = float((torch.from_numpy(want) == y_eval).float().mean())
    assert session.baseline_accuracy == pytest.approx(ort_acc, abs=1e-9)
    assert session.baseline_accuracy > 0.6  # the model learned the shapes: a meaningful check, not chance


def test_cli_compress_export_verify_on_zip(files, capsys, tmp_path):
    common = ["--model", str(files["model"]), "--data", str(files["zip"]), "--threads", "2"]
    rc = main(["compress", *common, "--prune", "0.5", "--bits", "8,4", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    d = json.loads(captured.out)
    assert "pixels scaled to [0, 1], no mean/std" in captured.err  # the preprocessing is stated
    # the baseline is onnxruntime's accuracy on the same evaluation images
    info = load_model(str(files["model"])).xaicomp_info
    ev = Sources(ModelSource(str(files["model"])), DataSource.parse(str(files["zip"]))).evaluation_data(info)
    x, y = ev.tensors(info.preprocessing)
    ort_acc = float((torch.from_numpy(ort_logits(files["model"].read_bytes(), x).argmax(1)) == y).float().mean())
    assert d["baseline_accuracy"] == pytest.approx(ort_acc, abs=1e-9)
    # and on all images of the zip, decoded here with PIL alone (what a user's own onnxruntime script does)
    from PIL import Image

    with zipfile.ZipFile(files["zip"]) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names])
        labels = np.asarray([CLASSES.index(n.split("/")[1]) for n in names])
    x_all = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    all_acc = float((ort_logits(files["model"].read_bytes(), x_all).argmax(1) == labels).mean())
    line = next(ln for ln in captured.err.splitlines() if "original accuracy" in ln)
    assert f"{all_acc:.2%} on all {len(names)} images of images.zip" in line, line
    out = tmp_path / "m.xcz"
    rc = main(["export", *common, "--prune", "0.5", "--bits", "8,4", "-o", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    e = json.loads(capsys.readouterr().out)
    assert e["baseline_accuracy"] == pytest.approx(ort_acc, abs=1e-9)
    # the architecture from the graph stored in the file, or from the original .onnx
    for extra in ([], ["--model", str(files["model"])]):
        rc = main(["verify", str(out), *extra, "--data", str(files["zip"]), "--json"])
        v = json.loads(capsys.readouterr().out)
        assert rc == 0 and v["ok"] and v["logits_match"] and v["accuracy"] == e["accuracy"]


def test_class_count_mismatch_is_refused(files, capsys):
    """A 3-output model on the shipped 10-class Fashion-MNIST is refused, never evaluated."""
    model = load_model(str(files["model"]))
    with pytest.raises(DataError, match="3 outputs but .* 10 classes"):
        Sources(ModelSource(str(files["model"])), DataSource()).load_data(model.xaicomp_info)
    rc = main(["compress", "--model", str(files["model"]), "--input-size", "16,16"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 outputs" in err and "10 classes" in err
    # an ImageFolder maps its folders onto the model's classes by name: two of the three classes are fine
    x, y = files["x"], files["y"]
    keep = y < 2
    named = ModelSource(str(files["model"]), declared=InputSpec(class_names=CLASSES))
    splits = Sources(named, DataSource("images", "two.zip", data=zip_of(x[keep], y[keep]))).load_data(
        named.load().xaicomp_info)
    assert sorted(set(splits.evaluation.labels.tolist())) == [0, 1]
