"""Shipped assets, built-in models (recorded accuracy reproduced exactly), safe weight loading, data loading."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch

from xaicomp_core import (
    BUILTIN_MODELS,
    DataError,
    WeightsError,
    load_builtin_dataset,
    load_builtin_model,
    load_model,
    load_weights_file,
    model_info,
)
from xaicomp_core.io.data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    Preprocessing,
    as_tensors,
    load_image_folder,
    load_image_zip,
    load_torchvision_folder,
    read_idx,
)
from xaicomp_core.io.models import MODELS_DIR, builtin_card, load_state_dict_checked, load_torchvision_model

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"


@pytest.mark.parametrize("split,n", [("eval", 2000), ("reference", 1000), ("train", 5000)])
def test_shipped_fashion_mnist_shapes_and_balance(split, n):
    ds = load_builtin_dataset("fashion-mnist", split)
    assert ds.images.shape == (n, 28, 28)
    assert ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,)
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert ds.class_counts().tolist() == [n // 10] * 10
    x, y = ds.tensors(Preprocessing())
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2  # normalised


def test_reference_and_train_subsets_are_disjoint():
    with np.load(ASSETS / "data" / "fashion-mnist-reference.npz") as a, \
            np.load(ASSETS / "data" / "fashion-mnist-train.npz") as b:
        assert not set(a["source_indices"].tolist()) & set(b["source_indices"].tolist())


def test_assets_are_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 12 * 2**20


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_model_reproduces_recorded_accuracy_exactly(name, fashion_eval):
    card = builtin_card(name)
    model = load_builtin_model(name)
    assert not model.training
    info = model_info(model)
    assert info.class_names == FASHION_MNIST_CLASSES and info.preprocessing.input_size == (28, 28)
    x, y = fashion_eval.tensors(info.preprocessing)
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    assert int((pred == y).sum()) == card["eval_correct"]
    assert card["eval_accuracy"] == card["eval_correct"] / len(y)
    assert card["test_accuracy"] >= card["target_accuracy"]
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    for key in ("fp32_bytes", "training", "preprocessing", "test_images"):
        assert key in card
    assert card["training"]["command"].startswith(f"python -m xaicomp_core.train {name}")


class _Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_code_is_refused_and_code_does_not_run(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"features.0.weight": torch.zeros(3), "payload": _Evil(marker)}
    if zip_format:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(WeightsError, match="refusing to load evil.pt"):
        load_weights_file(path)
    with pytest.raises(WeightsError):
        load_model("fashion-lenet", weights=path)
    assert not marker.exists()


def test_safe_formats_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = load_builtin_model("fashion-lenet")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = load_model("fashion-lenet", weights=tmp_path / f)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
        assert model_info(m).source == "weights file"


def test_mismatched_weights_name_the_keys(tmp_path):
    vgg_like = {k: v for k, v in load_builtin_model("fashion-lenet").state_dict().items()}
    vgg_like["classifier.5.weight"] = torch.zeros(7, 84)
    vgg_like["extra.weight"] = torch.zeros(2)
    del vgg_like["features.0.bias"]
    torch.save(vgg_like, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as e:
        load_model("fashion-lenet", weights=tmp_path / "bad.pt")
    msg = str(e.value)
    assert "missing keys: features.0.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "classifier.5.weight (7, 84) vs (10, 84)" in msg


def test_failed_load_leaves_model_unchanged():
    model = load_builtin_model("fashion-lenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(before)
    bad["features.0.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError):
        load_state_dict_checked(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"\x00" * 100, "corrupt|not a"),
    (b"PK\x03\x04garbage", "corrupt|not a"),
])
def test_corrupt_weight_files(tmp_path, data, match):
    p = tmp_path / "w.pt"
    p.write_bytes(data)
    with pytest.raises(WeightsError, match=match):
        load_weights_file(p)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(100)}, str(tmp_path / "w.safetensors"))
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-50])
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_weights_file(tmp_path / "t.safetensors")


def test_nan_weights_are_refused(tmp_path):
    sd = dict(load_builtin_model("fashion-lenet").state_dict())
    sd["features.0.weight"] = sd["features.0.weight"].clone()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(WeightsError, match="NaN"):
        load_model("fashion-lenet", weights=tmp_path / "nan.pt")


def test_torchvision_arch_offline_is_a_clear_message_and_random_only_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch cache: nothing to load, nothing downloaded
    with pytest.raises(WeightsError, match="pretrained weights of resnet18 are not on this machine: place resnet18-"):
        load_torchvision_model("resnet18", pretrained=True)
    m = load_torchvision_model("resnet18", pretrained=False, allow_random=True, num_classes=10)
    assert model_info(m).source == "random" and model_info(m).num_classes == 10
    with pytest.raises(WeightsError, match="unknown architecture"):
        load_model("resnet9000")


def test_torchvision_arch_with_user_weights(tmp_path):
    from torchvision.models import resnet18

    sd = resnet18(num_classes=10).state_dict()
    torch.save(sd, tmp_path / "r18.pt")
    m = load_model("resnet18", weights=tmp_path / "r18.pt")
    info = model_info(m)
    assert info.num_classes == 10 and info.preprocessing.channels == 3


# ---------------------------------------------------------------------------------------------------------------
# data loading
# ---------------------------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_image_zip_maps_classes_and_resizes():
    rng = np.random.default_rng(0)
    files = {f"set/{cls}/{i}.png": _png(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
             for cls in ("Trouser", "Bag") for i in range(3)}
    ds = load_image_zip(_zip(files), "up.zip", image_size=(28, 28), channels=1, class_names=FASHION_MNIST_CLASSES)
    assert ds.images.shape == (6, 28, 28)
    assert sorted(set(ds.labels.tolist())) == [1, 8]
    x, y = as_tensors(ds, Preprocessing(), 10)
    assert x.shape == (6, 1, 28, 28)


def test_image_folder_directory(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("0", "3"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (28, 28), dtype=np.uint8)))
    ds = load_image_folder(tmp_path, (28, 28), 1, FASHION_MNIST_CLASSES)
    assert sorted(ds.labels.tolist()) == [0, 0, 3, 3]


@pytest.mark.parametrize("files,match", [
    ({}, "no images"),
    ({"Bag/1.png": None}, "only one class"),
    ({"Bag/1.png": None, "Coat/2.png": b"not an image"}, "cannot read image"),
    ({"../evil/1.png": None, "Bag/2.png": None}, "unsafe path"),
    ({"x/1.png": None, "y/2.png": None, "z/3.png": None}, "only 2 classes"),
])
def test_bad_image_zips(files, match):
    img = _png(np.zeros((28, 28), dtype=np.uint8))
    data = _zip({k: (img if v is None else v) for k, v in files.items()})
    with pytest.raises(DataError, match=match):
        load_image_zip(data, "u.zip", (28, 28), 1, ["c0", "c1"] if "z/3.png" in files else FASHION_MNIST_CLASSES)


def test_not_a_zip_and_zip_bomb():
    with pytest.raises(DataError, match="not a valid zip"):
        load_image_zip(b"hello world", "u.zip")
    bomb = _zip({"a/big.png": b"\0" * (20 * 2**20), "b/x.png": b"\0"})
    with pytest.raises(DataError, match="zip bomb"):
        load_image_zip(bomb, "bomb.zip")


def test_labels_out_of_range_and_nan_inputs():
    with pytest.raises(DataError, match="labels must lie"):
        ImageDataset(np.zeros((2, 28, 28), np.uint8), np.array([0, 12]), FASHION_MNIST_CLASSES)
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        as_tensors((x, torch.tensor([0, 1])), Preprocessing(), 10)
    with pytest.raises(DataError, match="labels must lie"):
        as_tensors((torch.zeros(2, 1, 28, 28), torch.tensor([0, 10])), Preprocessing(), 10)
    with pytest.raises(DataError, match="empty"):
        as_tensors((torch.zeros(0, 1, 28, 28), torch.zeros(0)), Preprocessing(), 10)
    with pytest.raises(DataError, match="shape"):
        as_tensors((torch.zeros(2, 3, 32, 32), torch.tensor([0, 1])), Preprocessing(), 10)


def test_grayscale_rgb_conversion():
    rgb = np.full((1, 10, 10, 3), 128, np.uint8)
    out = Preprocessing((28, 28), 1, (0.0,), (1.0,)).apply(rgb)
    assert out.shape == (1, 1, 28, 28)
    gray = np.full((1, 28, 28), 255, np.uint8)
    out = Preprocessing((32, 32), 3, (0.5,) * 3, (0.5,) * 3).apply(gray)
    assert out.shape == (1, 3, 32, 32) and torch.allclose(out, torch.ones_like(out))


def test_torch_dataset_and_tensor_pair():
    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.full((28, 28), i * 10, np.uint8), i

    x, y = as_tensors(DS(), Preprocessing(), 10)
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 1, 2, 3]
    x2, _ = as_tensors((torch.full((4, 28, 28), 7, dtype=torch.uint8), torch.arange(4)), Preprocessing(), 10)
    assert x2.shape == (4, 1, 28, 28)


def test_idx_and_torchvision_folder(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + np.array([3, 28, 28], ">u4").tobytes() + imgs.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01" + np.array([3], ">u4").tobytes() + bytes([1, 2, 9]))
    ds = load_torchvision_folder(tmp_path, "fashion-mnist")
    assert np.array_equal(ds.images, imgs) and ds.labels.tolist() == [1, 2, 9]
    (raw / "bad-idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(DataError, match="expected"):
        read_idx(raw / "bad-idx")
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_torchvision_folder(tmp_path, "cifar10")


def test_model_cards_are_valid_json():
    for name in BUILTIN_MODELS:
        card = json.loads((MODELS_DIR / f"{name}.json").read_text())
        assert card["name"] == name
