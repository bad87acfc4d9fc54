"""Hostile and unusual data and weights: decompression bombs refused from image headers, high bit depths scaled (not
clipped), the class of an image is the folder right under the root in zips and directories alike, odd folder names
and non-regular files get one readable DataError, int/bool weights are refused. Every file is crafted here."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import numpy as np
import pytest
import torch

from xaicomp_core.errors import DataError, WeightsError
from xaicomp_core.io.data import (
    FASHION_MNIST_CLASSES,
    MAX_IMAGE_PIXELS,
    Preprocessing,
    load_image_folder,
    load_image_zip,
    load_torchvision_folder,
    read_idx,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def big_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grayscale PNG of ``width`` x ``height`` pixels, built without holding the pixels."""
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(height)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _imgs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_png(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# decompression bombs
# ----------------------------------------------------------------------------------------------------------------
def test_zip_of_huge_pngs_is_refused_from_the_headers():
    png = big_png(10000, 10000)
    assert len(png) < 200_000
    data = _zip({f"{c}/{i}.png": png for i, c in enumerate(["Bag", "Coat"] * 4)})
    with pytest.raises(DataError, match=r"10000x10000 pixels, over the limit of 25,000,000 pixels per image "
                                        r"\(refused before decoding\)"):
        load_image_zip(data, "bomb.zip", (28, 28), 1, FASHION_MNIST_CLASSES)


def test_pixel_limit_is_checked_before_any_pixel_is_decoded():
    # the header says 6000x6000, the pixel data is garbage: decoding would fail with "cannot read image"
    ihdr = struct.pack(">IIBBBBB", 6000, 6000, 8, 0, 0, 0, 0)
    fake = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"garbage") + _chunk(b"IEND", b"")
    data = _zip({"Bag/a.png": fake, "Coat/b.png": fake})
    with pytest.raises(DataError, match="refused before decoding"):
        load_image_zip(data, "u.zip", (28, 28), 1, FASHION_MNIST_CLASSES)
    assert MAX_IMAGE_PIXELS < 6000 * 6000


def test_refusing_a_bomb_allocates_nothing_large(tmp_path):
    png = big_png(10000, 10000)
    (tmp_path / "bomb.zip").write_bytes(_zip({f"{c}/{i}.png": png for i, c in enumerate(["Bag", "Coat"] * 4)}))
    code = textwrap.dedent(f"""
        from xaicomp_core.device import peak_rss_mb  # the process's own peak (not the forking test run's)
        from xaicomp_core.errors import DataError
        from xaicomp_core.io.data import load_image_folder
        before = peak_rss_mb()
        try:
            load_image_folder({str(tmp_path / "bomb.zip")!r}, (28, 28), 1)
        except DataError:
            pass
        print(int((peak_rss_mb() - before) * 2**20))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.strip().splitlines()[-1])
    assert grown < 60 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB (one decoded image is 95 MiB)"


def test_huge_zip_directory_is_refused_before_parsing():
    # an end-of-central-directory record claiming a 1 GiB directory of 20 million entries
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 2**30, 0, 0)
    with pytest.raises(DataError, match="directory of files is 1 GiB"):
        load_image_zip(b"\0" * 100 + eocd, "many.zip")


# ----------------------------------------------------------------------------------------------------------------
# high bit depths are scaled, never clipped or zeroed
# ----------------------------------------------------------------------------------------------------------------
def _one_class_pair(img: bytes, other: bytes | None = None) -> bytes:
    return _zip({"Bag/a.png": img, "Coat/b.png": other if other is not None else _imgs(1)[0]})


def test_16_bit_png_gradient_is_scaled():
    grad = np.linspace(0, 65535, 256 * 16).astype(np.uint16).reshape(64, 64)
    png16 = _png(grad)
    from PIL import Image

    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    ds = load_image_zip(_one_class_pair(png16), "g.zip", (64, 64), 1, FASHION_MNIST_CLASSES)
    img = ds.images[ds.labels == FASHION_MNIST_CLASSES.index("Bag")][0]
    expected = np.rint(grad.astype(np.float64) / 257).astype(np.uint8)
    assert np.array_equal(img, expected)
    assert len(np.unique(img)) == 256  # clipping gave five values


def test_16_bit_png_as_rgb_input():
    grad = np.linspace(0, 65535, 28 * 28).astype(np.uint16).reshape(28, 28)
    ds = load_image_zip(_one_class_pair(_png(grad)), "g.zip", (28, 28), 3, FASHION_MNIST_CLASSES)
    img = ds.images[ds.labels == FASHION_MNIST_CLASSES.index("Bag")][0]
    assert img.shape == (28, 28, 3) and int(img.max()) == 255 and len(np.unique(img)) > 200


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="TIFF")
    return buf.getvalue()


def test_float_tiffs_are_scaled_from_their_range_or_refused():
    unit = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    for arr in (unit, unit * 255):
        ds = load_image_zip(_zip({"Bag/a.tif": _tiff(arr, "F"), "Coat/b.png": _imgs(1)[0]}), "f.zip", (28, 28), 1,
                            FASHION_MNIST_CLASSES)
        img = ds.images[ds.labels == FASHION_MNIST_CLASSES.index("Bag")][0]
        assert np.array_equal(img, np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    for arr, needle in ((unit * 1000 - 5, "range from -5 to 995"), (np.full((28, 28), np.nan, np.float32), "NaN")):
        with pytest.raises(DataError, match=needle):
            load_image_zip(_zip({"Bag/a.tif": _tiff(arr, "F"), "Coat/b.png": _imgs(1)[0]}), "f.zip", (28, 28), 1,
                           FASHION_MNIST_CLASSES)


def test_32_bit_integer_images_out_of_16_bit_range_are_refused():
    arr = np.full((28, 28), 100_000, dtype=np.int32)
    with pytest.raises(DataError, match="integer pixels range from 100000 to 100000"):
        load_image_zip(_zip({"Bag/a.tif": _tiff(arr, "I"), "Coat/b.png": _imgs(1)[0]}), "i.zip", (28, 28), 1,
                       FASHION_MNIST_CLASSES)


def test_other_formats_by_content_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"
    with pytest.raises(DataError, match="cannot read image Bag/a.png"):
        load_image_zip(_one_class_pair(eps), "e.zip", (28, 28), 1, FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# class folders
# ----------------------------------------------------------------------------------------------------------------
LAYOUT = {"Bag/a.png": 0, "Bag/inner/b.png": 1, "Bag/inner/deeper/c.png": 2, "Coat/d.png": 3, "Coat/x/e.png": 4}


def _write_tree(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.mark.parametrize("wrapper", ["", "my-set/"])
def test_class_is_the_top_folder_in_zip_and_directory(tmp_path, wrapper):
    imgs = _imgs(len(LAYOUT))
    files = {wrapper + k: imgs[v] for k, v in LAYOUT.items()}
    zds = load_image_zip(_zip(files), "s.zip", (28, 28), 1, FASHION_MNIST_CLASSES)
    _write_tree(tmp_path / "tree", files)
    dds = load_image_folder(tmp_path / "tree" / wrapper.rstrip("/") if wrapper else tmp_path / "tree", (28, 28), 1,
                            FASHION_MNIST_CLASSES)
    for ds in (zds, dds):
        assert sorted(ds.meta["folders"]) == ["Bag", "Coat"]
        assert sorted(ds.labels.tolist()) == [4, 4, 8, 8, 8]

    def by_image(ds):
        return sorted((img.tobytes(), int(lab)) for img, lab in zip(ds.images, ds.labels))

    assert by_image(zds) == by_image(dds)


@pytest.mark.parametrize("folders,needle", [
    (["²", "3"], "not plain numbers"),
    (["٣", "1"], "not plain numbers"),
    (["1", "01"], "both name class 1"),
    (["bag", "Bag"], "both name class 8"),
    (["7", "123456789012345678901234567890"], "out of range"),
])
def test_odd_class_folder_names_give_one_readable_error(folders, needle):
    imgs = _imgs(len(folders))
    data = _zip({f"{f}/{i}.png": imgs[i] for i, f in enumerate(folders)})
    with pytest.raises(DataError, match=needle) as e:
        load_image_zip(data, "odd.zip", (28, 28), 1, FASHION_MNIST_CLASSES)
    assert "\n" not in str(e.value)


def test_fifos_and_devices_among_images_are_refused_not_read(tmp_path):
    _write_tree(tmp_path / "d", {"Bag/a.png": _imgs(1)[0], "Coat/b.png": _imgs(1, 1)[0]})
    os.mkfifo(tmp_path / "d" / "Coat" / "pipe.png")
    with pytest.raises(DataError, match="pipe.png is a FIFO"):
        load_image_folder(tmp_path / "d", (28, 28), 1, FASHION_MNIST_CLASSES)
    os.unlink(tmp_path / "d" / "Coat" / "pipe.png")
    (tmp_path / "d" / "Coat" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="zero.png is a character device"):
        load_image_folder(tmp_path / "d", (28, 28), 1, FASHION_MNIST_CLASSES)
    os.unlink(tmp_path / "d" / "Coat" / "zero.png")
    (tmp_path / "d" / "Coat" / "loop").symlink_to(tmp_path / "d")  # never followed
    assert len(load_image_folder(tmp_path / "d", (28, 28), 1, FASHION_MNIST_CLASSES)) == 2
    (tmp_path / "z.zip").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="character device"):
        load_image_folder(tmp_path / "z.zip", (28, 28), 1)
    os.mkfifo(tmp_path / "p.zip")
    with pytest.raises(DataError, match="FIFO"):
        load_image_folder(tmp_path / "p.zip", (28, 28), 1)


def test_raw_data_files_are_bounded(tmp_path, monkeypatch):
    import gzip

    import xaicomp_core.io.data as data_mod

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    # a header asking for 100000^3 bytes in a 20-byte file
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + np.array([100000] * 3, ">u4").tobytes())
    with pytest.raises(DataError, match="expected 1000000000000016"):
        read_idx(raw / "t10k-images-idx3-ubyte")
    monkeypatch.setattr(data_mod, "MAX_RAW_FILE_BYTES", 2**20)
    (raw / "bomb.gz").write_bytes(gzip.compress(b"\0" * (3 * 2**20)))
    with pytest.raises(DataError, match="unpacks to more than 1 MiB"):
        read_idx(raw / "bomb.gz")
    os.mkfifo(tmp_path / "test_batch")
    with pytest.raises(DataError, match="FIFO"):
        load_torchvision_folder(tmp_path, "cifar10")


def test_preprocessing_from_untrusted_dicts_is_strict():
    good = Preprocessing().to_dict()
    assert Preprocessing.from_dict(good) == Preprocessing()
    for change, needle in [({"input_size": [100000, 100000]}, "out of range"),
                           ({"input_size": ["28", 28]}, "two integers"),
                           ({"input_size": [True, 28]}, "two integers"),
                           ({"channels": 2}, "1 or 3"), ({"channels": True}, "1 or 3"),
                           ({"mean": [float("nan")]}, "finite"), ({"std": [0.0]}, "positive"),
                           ({"mean": [0.1, 0.2]}, "1 finite"), ({"extra": 1}, "unknown")]:
        with pytest.raises(DataError, match=needle):
            Preprocessing.from_dict({**good, **change})
    with pytest.raises(DataError, match="over the 4 GiB limit"):
        Preprocessing((1024, 1024), 3, (0.5,) * 3, (0.5,) * 3).apply(np.zeros((400, 2, 2), np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenet_state():
    from xaicomp_core import load_builtin_model

    return {k: v.clone() for k, v in load_builtin_model("fashion-lenet").state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_int_and_bool_weights_are_refused_not_cast(tmp_path, lenet_state, dtype):
    from safetensors.torch import save_file

    from xaicomp_core.io.models import load_model

    sd = dict(lenet_state)
    key = "features.0.weight"
    sd[key] = (sd[key] > 0).to(dtype) if dtype == torch.bool else sd[key].mul(100).to(dtype)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=f"features.0.weight \\({str(dtype)[6:]} for a float32 entry\\)"):
        load_model("fashion-lenet", weights=tmp_path / "w.safetensors")


def test_half_precision_weights_still_load(tmp_path, lenet_state):
    from safetensors.torch import save_file

    from xaicomp_core.io.models import load_model

    save_file({k: v.half() if v.is_floating_point() else v for k, v in lenet_state.items()},
              str(tmp_path / "h.safetensors"))
    m = load_model("fashion-lenet", weights=tmp_path / "h.safetensors")
    assert m.state_dict()["features.0.weight"].dtype == torch.float32


def test_weights_from_fifos_devices_legacy_and_compressed_files_are_refused(tmp_path, lenet_state):
    from xaicomp_core.io.models import load_weights_file

    os.mkfifo(tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="is a FIFO"):
        load_weights_file(tmp_path / "w.pt")
    (tmp_path / "z.safetensors").symlink_to("/dev/zero")
    with pytest.raises(WeightsError, match="is a character device"):
        load_weights_file(tmp_path / "z.safetensors")
    torch.save(lenet_state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="legacy file"):
        load_weights_file(tmp_path / "legacy.pt")
    torch.save(lenet_state, tmp_path / "new.pt")
    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "new.pt") as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    (tmp_path / "deflated.pt").write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="compressed records"):
        load_weights_file(tmp_path / "deflated.pt")
    assert set(load_weights_file(tmp_path / "new.pt")) == set(lenet_state)
