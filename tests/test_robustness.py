"""Bad inputs through the CLI: one readable line on stderr, exit status 2, no traceback, nothing executed."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from xaicomp_core.cli.main import main

FAST = ["--reference-samples", "100", "--eval-samples", "200", "--threads", "2"]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _cli_error(capsys, args: list[str]) -> str:
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("xaicomp: error: ") and "Traceback" not in err
    return err


class _Evil:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def lenet_state():
    from xaicomp_core import load_builtin_model

    return {k: v.clone() for k, v in load_builtin_model("fashion-lenet").state_dict().items()}


def test_corrupt_and_truncated_weights(capsys, tmp_path, lenet_state):
    from safetensors.torch import save_file

    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    assert "corrupt" in _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights", str(bad), *FAST])
    save_file(lenet_state, str(tmp_path / "w.safetensors"))
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    err = _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights", str(tmp_path / "cut.safetensors"),
                              *FAST])
    assert "not a valid safetensors" in err
    torch.save(lenet_state, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:3000])
    assert "corrupt" in _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights",
                                            str(tmp_path / "cut.pt"), *FAST])


def test_weights_for_another_architecture(capsys, tmp_path, lenet_state):
    torch.save(lenet_state, tmp_path / "lenet.pt")
    err = _cli_error(capsys, ["compress", "--arch", "fashion-vgg", "--weights", str(tmp_path / "lenet.pt"), *FAST])
    assert "shape mismatches" in err and "features.0.weight (6, 1, 5, 5) vs (32, 1, 3, 3)" in err
    assert "missing keys:" in err and "unexpected keys:" in err


def test_pickle_that_runs_code_is_refused(capsys, tmp_path, lenet_state):
    marker = tmp_path / "code-ran"
    evil = dict(lenet_state)
    evil["payload"] = _Evil(marker)
    torch.save(evil, tmp_path / "evil.pth")
    (tmp_path / "evil_raw.pt").write_bytes(pickle.dumps(evil))
    for f in ("evil.pth", "evil_raw.pt"):
        err = _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights", str(tmp_path / f), *FAST])
        assert "refusing to load" in err and "never run" in err
    assert not marker.exists()


def test_file_over_the_limit(capsys, tmp_path, lenet_state, monkeypatch):
    import xaicomp_core.io.models as models

    torch.save(lenet_state, tmp_path / "big.pt")
    monkeypatch.setattr(models, "MAX_WEIGHTS_BYTES", 1000)
    err = _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights", str(tmp_path / "big.pt"), *FAST])
    assert "over the" in err and "limit" in err


def test_nan_weights(capsys, tmp_path, lenet_state):
    sd = dict(lenet_state)
    sd["classifier.1.weight"] = sd["classifier.1.weight"].clone()
    sd["classifier.1.weight"][3, 3] = float("inf")
    torch.save(sd, tmp_path / "inf.pt")
    assert "NaN or infinite" in _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights",
                                                    str(tmp_path / "inf.pt"), *FAST])


def _imgs(n: int, shape=(28, 28), seed=0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_png(rng.integers(0, 255, shape, dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kind,needle", [
    ("not-a-zip", "not a valid zip"),
    ("bomb", "zip bomb"),
    ("traversal", "unsafe path"),
    ("no-images", "no images found"),
    ("one-class", "only one class"),
    ("unreadable", "cannot read image"),
    ("labels-out-of-range", "out of range"),
])
def test_bad_image_data(capsys, tmp_path, kind, needle):
    path = tmp_path / f"{kind}.zip"
    img = _imgs(2)
    if kind == "not-a-zip":
        path.write_bytes(b"this is not a zip")
    elif kind == "bomb":
        _zip(path, {"Bag/a.png": b"\0" * (30 * 2**20), "Coat/b.png": img[0]})
    elif kind == "traversal":
        _zip(path, {"../../etc/Bag/a.png": img[0], "Coat/b.png": img[1]})
    elif kind == "no-images":
        _zip(path, {"Bag/readme.txt": b"hi", "Coat/notes.md": b"x"})
    elif kind == "one-class":
        _zip(path, {"Bag/a.png": img[0], "Bag/b.png": img[1]})
    elif kind == "unreadable":
        _zip(path, {"Bag/a.png": img[0], "Coat/b.png": b"\x89PNG broken"})
    elif kind == "labels-out-of-range":
        _zip(path, {"3/a.png": img[0], "12/b.png": img[1]})
    err = _cli_error(capsys, ["compress", "--model", "fashion-lenet", "--data", str(path), *FAST])
    assert needle in err


def test_mixed_sizes_and_rgb_images_are_converted(capsys, tmp_path):
    rng = np.random.default_rng(1)
    files = {}
    for cls in ["Trouser", "Bag", "Sneaker"]:
        for j in range(4):
            shape = (20 + 4 * j, 30, 3) if j % 2 else (28, 28)
            files[f"{cls}/{j}.png"] = _png(rng.integers(0, 255, shape, dtype=np.uint8))
    path = _zip(tmp_path / "mixed.zip", files)
    rc = main(["compress", "--model", "fashion-lenet", "--data", str(path), "--json", "--threads", "2"])
    out = json.loads(capsys.readouterr().out)
    # disjoint halves of the 12 images: 6 for relevance, the other 6 evaluated
    assert rc == 0 and out["images"] == 6 and out["reference_samples"] == 6


def test_missing_files_and_contradictory_options(capsys, tmp_path):
    assert "does not exist" in _cli_error(capsys, ["compress", "--arch", "fashion-lenet", "--weights",
                                                   str(tmp_path / "nope.pt")])
    assert "needs --arch" in _cli_error(capsys, ["compress", "--weights", str(tmp_path / "x.pt")])
    assert "does not exist" in _cli_error(capsys, ["compress", "--model", "fashion-lenet", "--data",
                                                   str(tmp_path / "nodir")])


def test_same_inputs_same_results_across_processes():
    cmd = [sys.executable, "-m", "xaicomp_core", "compress", "--model", "fashion-lenet", "--criterion", "random",
           "--prune", "0.6", "--bits", "8,4,2", "--split", "0.2,0.5", "--seed", "3", "--json", *FAST]
    a = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    b = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    for d in (da, db):
        d.pop("seconds")
    assert da == db
