"""Data sets: the shipped Fashion-MNIST subsets, torchvision folders on disk, ImageFolder directories or zips,
and plain tensors.

All image data is held as :class:`ImageDataset` (uint8 pixels, integer labels, class names) and turned into
model-ready tensors by a model's :class:`Preprocessing` (resize, grayscale/RGB, normalisation).

Rebuild the shipped subsets with::

    python -m xaicomp_core.io.data build-assets --source /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import pickle
import re
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import Any

import numpy as np
import torch

from xaicomp_core.errors import DataError
from xaicomp_core.io.safe import fmt_limit, read_regular, regular_size, show_path

ASSETS_DIR = pathlib.Path(__file__).resolve().parents[2] / "assets"
DATA_DIR = ASSETS_DIR / "data"

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

#: Built-in data sets: name -> split -> (file in assets/data, description).
BUILTIN_DATASETS: dict[str, dict[str, tuple[str, str]]] = {
    "fashion-mnist": {
        "eval": ("fashion-mnist-eval.npz", "2,000 test images, 200 per class (evaluation)"),
        "reference": ("fashion-mnist-reference.npz", "1,000 training images, 100 per class (LRP reference)"),
        "train": ("fashion-mnist-train.npz", "5,000 training images, 500 per class (fine-tuning)"),
    }
}

#: Debian's dataset-fashion-mnist package installs here.
DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")

# Limits for user data (zip / ImageFolder directories / raw data set files); README "Limits and safety" lists them.
MAX_IMAGES = 50_000
#: Bytes of image files read from one directory, and unpacked bytes of one zip (declared sizes, which zipfile enforces).
MAX_UNCOMPRESSED_BYTES = 512 * 1024 * 1024
#: A zip file itself, and its central directory (which bounds the number of entries parsed).
MAX_ZIP_BYTES = MAX_UNCOMPRESSED_BYTES
MAX_ZIP_DIRECTORY_BYTES = 16 * 2**20
MAX_COMPRESSION_RATIO = 200
#: Pixels of one image, checked from its header before it is decoded (PIL's own warning limit is ~89 megapixels).
MAX_IMAGE_PIXELS = 25_000_000
#: Pixels decoded for one data set in all (bounds the time a set of many large but small-on-disk images takes).
MAX_TOTAL_PIXELS = 4_000_000_000
#: Bytes of the decoded data set at the model's input size (N x H x W x C uint8).
MAX_DATASET_BYTES = 2 * 2**30
#: Raw data set files (IDX, CIFAR-10 batches), before and after gzip.
MAX_RAW_FILE_BYTES = 512 * 2**20
#: Files and folders visited in one ImageFolder directory (images or not).
MAX_DIRECTORY_ENTRIES = 4 * MAX_IMAGES
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
#: The only image formats PIL may use (by content, whatever the suffix): no EPS (Ghostscript), no plugins.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------
#: Largest model input side and input size accepted from a model card or a packed file.
MAX_INPUT_SIDE = 4096
MAX_INPUT_PIXELS = 1024 * 1024
#: Largest batch of model inputs :meth:`Preprocessing.apply` builds (float32 N x C x H x W).
MAX_INPUT_TENSOR_BYTES = 4 * 2**30


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 images become model inputs.

    Parameters
    ----------
    input_size : tuple of int
        (height, width) the model expects.
    channels : int
        1 (grayscale) or 3 (RGB).
    mean, std : tuple of float
        Per-channel normalisation applied after scaling pixels to [0, 1].
    """

    input_size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {"input_size": list(self.input_size), "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`, strictly typed (no coercion) and within :data:`MAX_INPUT_SIDE` /
        :data:`MAX_INPUT_PIXELS` (the dict may come from an untrusted file).

        Raises
        ------
        DataError
            For a missing field, a wrong type (``true`` is not a number, ``"28"`` is not an integer), a size out of
            range, a channel count other than 1 or 3, or a mean / std that is not one finite number per channel
            (std > 0).
        """
        if not isinstance(d, dict):
            raise DataError("preprocessing must be an object")
        unknown = set(d) - {"input_size", "channels", "mean", "std"}
        if unknown:
            raise DataError(f"unknown preprocessing field(s) {', '.join(sorted(map(repr, unknown))[:5])}")
        size, ch, mean, std = (d.get(k) for k in ("input_size", "channels", "mean", "std"))
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise DataError("preprocessing input_size must be two integers [height, width]")
        if not all(1 <= v <= MAX_INPUT_SIDE for v in size) or size[0] * size[1] > MAX_INPUT_PIXELS:
            raise DataError(f"preprocessing input_size {size[0]}x{size[1]} is out of range (each side 1.."
                            f"{MAX_INPUT_SIDE}, at most {MAX_INPUT_PIXELS:,} pixels)")
        if not _is_int(ch) or ch not in (1, 3):
            raise DataError("preprocessing channels must be 1 or 3")
        for label, vals in (("mean", mean), ("std", std)):
            if not (isinstance(vals, list) and len(vals) == ch and all(_is_number(v) for v in vals)):
                raise DataError(f"preprocessing {label} must be {ch} finite number(s)")
        if not all(v > 0 for v in std):  # type: ignore[union-attr]
            raise DataError("preprocessing std must be positive")
        return cls((size[0], size[1]), ch, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest possible normalised pixel value per channel, shaped (1, C, 1, 1)."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def apply(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Turn uint8 images of shape (N, H, W) or (N, H, W, C) into float32 inputs (N, C, H', W')."""
        x = torch.as_tensor(np.asarray(images))
        if x.dtype != torch.uint8:
            raise DataError(f"raw images must be uint8 pixels, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4:
            raise DataError(f"images must have shape (N, H, W) or (N, H, W, C), got {tuple(x.shape)}")
        n, c_in = int(x.shape[0]), int(x.shape[3])
        need = 4 * n * max(c_in, self.channels) * max(int(x.shape[1]) * int(x.shape[2]), math.prod(self.input_size))
        if need > MAX_INPUT_TENSOR_BYTES:
            raise DataError(f"{n} images at {self.input_size[0]}x{self.input_size[1]} pixels would take "
                            f"{fmt_limit(need)} as model inputs, over the {fmt_limit(MAX_INPUT_TENSOR_BYTES)} limit; "
                            "use fewer images")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        c = x.shape[1]
        if c == 4:
            x, c = x[:, :3], 3
        if c != self.channels:
            if c == 3 and self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            elif c == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise DataError(f"cannot convert {c}-channel images to {self.channels} channels")
        if tuple(x.shape[2:]) != tuple(self.input_size):
            x = torch.nn.functional.interpolate(x, size=tuple(self.input_size), mode="bilinear",
                                                align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ImageDataset:
    """Images as uint8 pixels with integer labels.

    Parameters
    ----------
    images : numpy.ndarray
        uint8, shape (N, H, W) for grayscale or (N, H, W, C).
    labels : numpy.ndarray
        int64, shape (N,), values in ``range(len(class_names))``.
    class_names : list of str
        Name of each label.
    name : str
        Short description shown to users.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str = "images"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images)
        self.labels = np.asarray(self.labels).astype(np.int64)
        if self.images.dtype != np.uint8:
            raise DataError(f"{self.name}: images must be uint8, got {self.images.dtype}")
        if self.images.ndim not in (3, 4):
            raise DataError(f"{self.name}: images must be (N, H, W) or (N, H, W, C), got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) == 0:
            raise DataError(f"{self.name}: the data set is empty")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DataError(f"{self.name}: labels must lie in 0..{len(self.class_names) - 1}, "
                            f"found {int(self.labels.min())}..{int(self.labels.max())}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """Number of images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageDataset:
        """A new data set holding the given images."""
        idx = np.asarray(indices)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.class_names),
                            name or self.name, self.source, dict(self.meta))

    def balanced_subset(self, n: int, seed: int = 0) -> ImageDataset:
        """A class-balanced subset of (at most) ``n`` images, chosen with a fixed seed, in class-interleaved order."""
        if n >= len(self):
            return self
        return self.subset(balanced_indices(self.labels, n, self.num_classes, seed), f"{self.name} ({n})")

    def tensors(self, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready ``(inputs, labels)``."""
        return preprocessing.apply(self.images), torch.from_numpy(self.labels)


def balanced_indices(labels: np.ndarray, n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced random subset of size ``n`` (as balanced as the data allows).

    The result is ordered round-robin over classes, so any prefix is balanced too.
    """
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    out: list[int] = []
    depth = 0
    while len(out) < n:
        added = False
        for idx in per_class:
            if depth < len(idx) and len(out) < n:
                out.append(int(idx[depth]))
                added = True
        if not added:
            break
        depth += 1
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------
# Built-in data
# --------------------------------------------------------------------------------------------------------------
def split_reference_eval(ds: ImageDataset, eval_samples: int) -> tuple[ImageDataset, ImageDataset]:
    """Split one data set into disjoint reference and evaluation halves (class-balanced, seeded).

    The evaluation half is cut to ``eval_samples`` images. Used for a single uploaded image set.
    """
    if len(ds) < 4:
        raise DataError(f"{ds.name}: only {len(ds)} images; at least 4 are needed (half for relevance, half for "
                        "evaluation)")
    order = balanced_indices(ds.labels, len(ds), ds.num_classes, seed=0)
    # alternate within each class (not over the interleaved order: with an even number of classes that would give
    # the reference only the even classes and the evaluation only the odd ones); both halves stay interleaved
    labels = ds.labels[order]
    rank = np.zeros(len(order), dtype=np.int64)
    for c in range(ds.num_classes):
        rank[labels == c] = np.arange(int((labels == c).sum()))
    ref, ev = order[rank % 2 == 0], order[rank % 2 == 1]
    return ds.subset(ref, f"{ds.name} (reference)"), ds.subset(ev[:eval_samples], f"{ds.name} (evaluation)")


def split_reference_train(train: ImageDataset, reference_images: int, train_images: int
                          ) -> tuple[ImageDataset, ImageDataset]:
    """Disjoint class-balanced reference and fine-tuning subsets of a training set (at most half for reference)."""
    idx = balanced_indices(train.labels, reference_images + train_images, train.num_classes)
    n_ref = min(reference_images, len(idx) // 2)
    ref = train.subset(idx[:n_ref], f"{train.name} (reference)")
    return ref, train.subset(idx[n_ref:], f"{train.name} (fine-tuning)")


def load_builtin_dataset(name: str = "fashion-mnist", split: str = "eval") -> ImageDataset:
    """Load a data set shipped in ``assets/data``.

    Parameters
    ----------
    name : str
        ``"fashion-mnist"``.
    split : str
        ``"eval"`` (2,000 test images), ``"reference"`` (1,000 training images for relevance) or ``"train"``
        (5,000 training images for fine-tuning).
    """
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in data set {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    splits = BUILTIN_DATASETS[name]
    if split not in splits:
        raise DataError(f"unknown split {split!r} of {name}; available: {', '.join(splits)}")
    path = DATA_DIR / splits[split][0]
    if not path.exists():
        raise DataError(f"missing asset {path}; rebuild with `python -m xaicomp_core.io.data build-assets`")
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
        class_names = [str(s) for s in z["class_names"]]
    return ImageDataset(images, labels, class_names, f"{name}/{split}", source=str(path))


# --------------------------------------------------------------------------------------------------------------
# Raw formats on disk
# --------------------------------------------------------------------------------------------------------------
def _gunzip(raw: bytes, label: str) -> bytes:
    """gzip-decompress at most :data:`MAX_RAW_FILE_BYTES` (a larger or broken stream raises DataError)."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(raw, MAX_RAW_FILE_BYTES + 1)
    except zlib.error:
        raise DataError(f"{label}: broken gzip data") from None
    if len(out) > MAX_RAW_FILE_BYTES:
        raise DataError(f"{label}: unpacks to more than {fmt_limit(MAX_RAW_FILE_BYTES)}")
    if not d.eof:
        raise DataError(f"{label}: the gzip data is truncated")
    return out


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or not (at most :data:`MAX_RAW_FILE_BYTES` either way)."""
    path = pathlib.Path(path)
    raw = read_regular(path, MAX_RAW_FILE_BYTES, "IDX file", DataError)
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, path.name)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path.name}: not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path.name}: IDX header is truncated")
    dims = [int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)]
    expected = 4 + 4 * ndim + math.prod(dims)  # exact integers: a crafted header cannot overflow it
    if len(raw) != expected:
        raise DataError(f"{path.name}: IDX file has {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims)).copy()


def _find_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for suffix in ("", ".gz"):
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def load_mnist_like(folder: str | pathlib.Path, train: bool, class_names: list[str], name: str) -> ImageDataset:
    """Read MNIST-format idx files (``train-images-idx3-ubyte[.gz]`` etc.) from a folder."""
    folder = pathlib.Path(folder)
    prefix = "train" if train else "t10k"
    img = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    lab = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise DataError(f"no {prefix}-images/labels idx files in {folder}")
    return ImageDataset(read_idx(img), read_idx(lab), class_names, name, source=str(folder))


def find_fashion_mnist_raw(root: str | pathlib.Path | None = None) -> pathlib.Path:
    """Locate the raw Fashion-MNIST idx files: Debian's package, or a torchvision download under ``root``."""
    candidates = []
    if root is not None:
        r = pathlib.Path(root)
        candidates += [r, r / "FashionMNIST" / "raw", r / "raw"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for c in candidates:
        if _find_file(c, "t10k-images-idx3-ubyte") is not None:
            return c
    raise DataError("Fashion-MNIST idx files not found; install Debian's dataset-fashion-mnist package or pass "
                    "the folder of a torchvision FashionMNIST download")


def load_fashion_mnist_holdout(root: str | pathlib.Path | None = None) -> ImageDataset:
    """The Fashion-MNIST test images that the shipped evaluation set does not hold (8,000 of the 10,000).

    A second, larger set the compressed models never met, for checking how well a drop measured on the 2,000
    evaluation images carries over (``python -m xaicomp_core.results --only holdout``). Read from the raw idx files
    (:func:`find_fashion_mnist_raw`: Debian's ``dataset-fashion-mnist`` or a torchvision download under ``root``);
    the shipped evaluation asset names its source indices, and its images must equal the raw test images there.

    Raises
    ------
    DataError
        If the raw files are not found, or the shipped evaluation images are not those of this test set.
    """
    test = load_mnist_like(find_fashion_mnist_raw(root), False, FASHION_MNIST_CLASSES, "fashion-mnist/test")
    path = DATA_DIR / BUILTIN_DATASETS["fashion-mnist"]["eval"][0]
    with np.load(path, allow_pickle=False) as z:
        idx, images, labels = z["source_indices"].astype(np.int64), z["images"], z["labels"]
    n = len(test.labels)
    if (idx.min(initial=0) < 0 or idx.max(initial=0) >= n or len(np.unique(idx)) != len(idx)
            or not np.array_equal(test.images[idx], images) or not np.array_equal(test.labels[idx], labels)):
        raise DataError(f"the shipped evaluation images are not images of the test set in {test.source}; "
                        "no held-out set can be formed from it")
    rest = np.setdiff1d(np.arange(n), idx)
    return test.subset(rest, f"fashion-mnist/test without the evaluation images ({len(rest):,})")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 python batches that only rebuilds plain containers and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a pickled data file")


def _exists(p: pathlib.Path) -> bool:
    return os.path.lexists(p)


def load_cifar10(folder: str | pathlib.Path, train: bool = False) -> ImageDataset:
    """Read CIFAR-10 from ``cifar-10-batches-bin`` (binary) or ``cifar-10-batches-py`` (restricted unpickling)."""
    folder = pathlib.Path(folder)
    split = "train" if train else "test"
    for sub in (folder, folder / "cifar-10-batches-bin", folder / "cifar-10-batches-py"):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        if all(_exists(sub / f"{n}.bin") for n in names):
            chunks = []
            for n in names:
                raw = read_regular(sub / f"{n}.bin", MAX_RAW_FILE_BYTES, "CIFAR-10 batch", DataError)
                if len(raw) % 3073:
                    raise DataError(f"{n}.bin: {len(raw)} bytes is not a whole number of 3,073-byte CIFAR-10 records")
                chunks.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073))
            arr = np.concatenate(chunks)
            images = arr[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return ImageDataset(images, arr[:, 0], CIFAR10_CLASSES, f"cifar10/{split}", source=str(sub))
        if all(_exists(sub / n) for n in names):
            imgs, labs = [], []
            for n in names:
                raw = read_regular(sub / n, MAX_RAW_FILE_BYTES, "CIFAR-10 batch", DataError)
                try:
                    d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
                    imgs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    labs.append(np.asarray(d[b"labels"], dtype=np.int64).reshape(-1))
                except DataError:
                    raise
                except Exception as e:  # a broken pickle raises many types
                    raise DataError(f"{n}: not a CIFAR-10 python batch ({e.__class__.__name__})") from None
            return ImageDataset(np.concatenate(imgs), np.concatenate(labs), CIFAR10_CLASSES, f"cifar10/{split}",
                                source=str(sub))
    raise DataError(f"no CIFAR-10 batches found under {folder}")


def load_torchvision_folder(root: str | pathlib.Path, name: str, train: bool = False) -> ImageDataset:
    """Read a torchvision data set folder already on disk (never downloads).

    Parameters
    ----------
    root : path
        The ``root`` passed to torchvision (holding e.g. ``FashionMNIST/raw``).
    name : str
        ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
    train : bool
        Training split instead of the test split.
    """
    root = pathlib.Path(root)
    key = name.lower().replace("_", "-")
    split = "train" if train else "test"
    if key in ("mnist",):
        for folder in (root / "MNIST" / "raw", root / "raw", root):
            if _find_file(folder, "t10k-images-idx3-ubyte"):
                return load_mnist_like(folder, train, MNIST_CLASSES, f"mnist/{split}")
        raise DataError(f"no MNIST idx files under {root}")
    if key in ("fashion-mnist", "fashionmnist"):
        for folder in (root / "FashionMNIST" / "raw", root / "raw", root):
            if _find_file(folder, "t10k-images-idx3-ubyte"):
                return load_mnist_like(folder, train, FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")
        raise DataError(f"no FashionMNIST idx files under {root}")
    if key in ("cifar10", "cifar-10"):
        return load_cifar10(root, train)
    raise DataError(f"unknown torchvision data set {name!r}; supported: mnist, fashion-mnist, cifar10")


# --------------------------------------------------------------------------------------------------------------
# ImageFolder directories and zips
# --------------------------------------------------------------------------------------------------------------
def _to_uint8(im: Any, label: str) -> Any:
    """An image in an 8-bit mode PIL can convert: high bit depths are scaled (not clipped) to 0..255.

    16-bit integer images (``I;16*``, and ``I`` holding 0..65535) are divided by 257, so 65535 becomes 255; float
    images (``F``) holding 0..1 are multiplied by 255, holding 0..255 are rounded; anything else (negative or larger
    integers, floats outside those ranges, NaN) is refused rather than silently damaged.
    """
    from PIL import Image

    mode = im.mode
    if not (mode.startswith("I") or mode == "F"):
        return im
    a = np.asarray(im)
    if a.size == 0:
        raise DataError(f"image {label} has no pixels")
    if mode == "F":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise DataError(f"image {label}: a floating-point image with NaN or infinite pixels")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1:
            a = a * 255.0
        elif not (lo >= 0 and hi <= 255):
            raise DataError(f"image {label}: floating-point pixels range from {lo:g} to {hi:g}; expected 0..1 or "
                            "0..255")
        out = np.rint(a).astype(np.uint8)
    else:
        a = a.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"image {label}: integer pixels range from {lo} to {hi}; only 8-bit and 16-bit images "
                            "(0..65535) are supported")
        out = ((a * 255 + 32767) // 65535).astype(np.uint8)  # = round(a / 257)
    return Image.fromarray(out, mode="L")


class _Decoder:
    """Decodes images with the pixel limits: one image at most :data:`MAX_IMAGE_PIXELS`, the set at most
    :data:`MAX_TOTAL_PIXELS`, both checked from the image header before any pixel is decoded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pixels = 0

    def __call__(self, data: bytes, label: str, size: tuple[int, int] | None, channels: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():  # PIL warns from ~89 megapixels; our limit is far lower
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise DataError(f"image {label} is over the limit of {MAX_IMAGE_PIXELS:,} pixels per image (refused "
                            "before decoding)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                KeyError, struct_error, MemoryError) as e:
            raise DataError(f"cannot read image {label}: {e.__class__.__name__}") from None
        try:
            with opened as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise DataError(f"image {label} is empty ({w}x{h} pixels)")
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(f"image {label} is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
                                    "pixels per image (refused before decoding)")
                self.pixels += w * h
                if self.pixels > MAX_TOTAL_PIXELS:
                    raise DataError(f"{self.name}: the images hold more than {MAX_TOTAL_PIXELS:,} pixels in all; use "
                                    "fewer or smaller images")
                im.load()
                im = _to_uint8(im, label)
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None and (im.height, im.width) != tuple(size):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                KeyError, struct_error, Image.DecompressionBombError, MemoryError) as e:
            raise DataError(f"cannot read image {label}: {e.__class__.__name__}") from None
        return arr


def _decode_image(data: bytes, label: str, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """One image as uint8 pixels (H, W) or (H, W, 3), with the pixel limit of :class:`_Decoder`."""
    return _Decoder(label)(data, label, size, channels)


def _assemble(entries: list[tuple[str, str, bytes]], name: str, source: str,
              size: tuple[int, int] | None, channels: int, class_names: Sequence[str] | None) -> ImageDataset:
    """Decode (class folder, file label, bytes) entries into an ImageDataset."""
    if not entries:
        raise DataError(f"{name}: no images found (expected one sub-folder per class holding image files)")
    folders = sorted({c for c, _, _ in entries})
    if len(folders) < 2:
        raise DataError(f"{name}: only one class folder ({_show_name(folders[0])}); an image classification set "
                        "needs at least two")
    mapping = _map_classes(folders, class_names, name)
    decode = _Decoder(name)
    first = decode(entries[0][2], entries[0][1], size, channels)
    size = (first.shape[0], first.shape[1])
    shape = (len(entries), *first.shape)
    nbytes = math.prod(shape)
    if nbytes > MAX_DATASET_BYTES:
        raise DataError(f"{name}: {len(entries)} images of {size[0]}x{size[1]} pixels take {fmt_limit(nbytes)}, over "
                        f"the {fmt_limit(MAX_DATASET_BYTES)} limit; use fewer images")
    images = np.empty(shape, dtype=np.uint8)
    images[0] = first
    for j, (_, label, data) in enumerate(entries[1:], start=1):
        images[j] = decode(data, label, size, channels)
    labels = np.asarray([mapping[c] for c, _, _ in entries], dtype=np.int64)
    names = list(class_names) if class_names is not None else folders
    return ImageDataset(images, labels, names, name, source=source, meta={"folders": folders})


_NUMBER = re.compile(r"[0-9]+")


def _show_name(folder: str, n: int = 60) -> str:
    """A folder name for a message: quoted, control characters escaped, long names cut."""
    s = folder if len(folder) <= n else folder[:n] + "..."
    return repr(s) if s.isprintable() else ascii(s)


def _map_classes(folders: list[str], class_names: Sequence[str] | None, name: str) -> dict[str, int]:
    """Map class folder names to label indices of a model with ``class_names``.

    Folders match the model's classes by name (case-insensitive, ``/`` written as ``-``), else by number (ASCII
    digits only: ``3``, ``03``), else by sorted order when the counts agree. Two folders for one class are refused.
    """
    if class_names is None:
        return {f: i for i, f in enumerate(folders)}
    lowered = {c.lower().replace("/", "-"): i for i, c in enumerate(class_names)}
    by_name = {f: lowered.get(f.lower().replace("/", "-")) for f in folders}
    out: dict[str, int] | None = None
    if all(v is not None for v in by_name.values()):
        out = {f: int(v) for f, v in by_name.items()}  # type: ignore[arg-type]
    elif all(_NUMBER.fullmatch(f) for f in folders):
        out = {f: int(f) for f in folders}
        bad = [f for f, v in out.items() if v >= len(class_names)]
        if bad:
            raise DataError(f"{name}: class folder(s) {', '.join(_show_name(f) for f in bad[:5])} out of range for "
                            f"a model with {len(class_names)} classes")
    elif any(f.isdigit() or f.isnumeric() for f in folders) and all(f.isnumeric() for f in folders):
        odd = [f for f in folders if not _NUMBER.fullmatch(f)]
        raise DataError(f"{name}: class folder(s) {', '.join(_show_name(f) for f in odd[:5])} are not plain numbers "
                        "(use the ASCII digits 0-9, or the class names)")
    if out is not None:
        seen: dict[int, str] = {}
        for f, v in out.items():
            if v in seen:
                raise DataError(f"{name}: class folders {_show_name(seen[v])} and {_show_name(f)} both name class "
                                f"{v} ({_show_name(class_names[v])}); merge them")
            seen[v] = f
        return out
    if len(folders) > len(class_names):
        raise DataError(f"{name}: {len(folders)} class folders but the model has only {len(class_names)} classes")
    if len(folders) != len(class_names):
        raise DataError(f"{name}: {len(folders)} class folders do not match the model's {len(class_names)} "
                        "classes; name the folders after the classes or 0..N-1")
    return {f: i for i, f in enumerate(folders)}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not pathlib.PurePosixPath(name).name.startswith(".")


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _directory_entries(path: pathlib.Path, max_images: int) -> list[tuple[str, str, bytes]]:
    """(class, label, bytes) of the images under ``path``: the class is the folder right under ``path``, images in
    deeper sub-folders belong to it; hidden files and folders are skipped, symlinked folders are not followed, and
    only regular files are read (at most :data:`MAX_UNCOMPRESSED_BYTES` in all)."""
    entries: list[tuple[str, str, bytes]] = []
    visited = 0
    budget = MAX_UNCOMPRESSED_BYTES
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=True) and not _hidden([e.name]))
    for cls in classes:
        for root, dirs, files in os.walk(path / cls, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not _hidden([d]))
            visited += len(dirs) + len(files)
            if visited > MAX_DIRECTORY_ENTRIES:
                raise DataError(f"{path.name or path}: more than {MAX_DIRECTORY_ENTRIES:,} files and folders; point "
                                "at a smaller folder")
            rel = pathlib.Path(root).relative_to(path)
            for fname in sorted(files):
                if not _is_image_name(fname):
                    continue
                f = pathlib.Path(root) / fname
                label = (rel / fname).as_posix()
                if regular_size(f, "image", DataError) > budget:
                    raise DataError(f"{path.name}: the image files hold more than {fmt_limit(MAX_UNCOMPRESSED_BYTES)}")
                blob = read_regular(f, budget, "image", DataError)
                budget -= len(blob)
                entries.append((cls, label, blob))
                if len(entries) > max_images:
                    raise DataError(f"{path.name}: more than {max_images} images")
    return entries


def load_image_folder(path: str | pathlib.Path, image_size: tuple[int, int] | None = None, channels: int = 1,
                      class_names: Sequence[str] | None = None, max_images: int = MAX_IMAGES) -> ImageDataset:
    """Read an ImageFolder directory (``root/<class>/<image>``) or a ``.zip`` with the same layout.

    The class of an image is the folder right under the root, in a directory and in a zip alike (images in deeper
    sub-folders belong to that class; a zip whose images all lie in one top folder has that folder as its root).
    Images are decoded in memory (nothing is extracted), converted to ``channels`` and resized to ``image_size``
    (default: the first image's size). Zips are checked for path traversal, zip bombs and size limits first; every
    image's pixel count is checked before it is decoded (:data:`MAX_IMAGE_PIXELS`); only regular files are read.

    Parameters
    ----------
    path : path
        Directory or zip file.
    image_size : tuple of int, optional
        (height, width) for all images.
    channels : int
        1 or 3.
    class_names : list of str, optional
        The model's classes; folders are matched by name, by number (``0``..``9``) or else by sorted order.
    max_images : int
        Refuse sets larger than this.
    """
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        raise DataError(f"{show_path(path)} does not exist")
    if path.is_dir():
        entries = _directory_entries(path, max_images)
        return _assemble(entries, path.name or str(path), str(path), image_size, channels, class_names)
    data = read_regular(path, MAX_ZIP_BYTES, "data file", DataError)
    return load_image_zip(data, path.name, image_size, channels, class_names, max_images)


def _zip_directory_bytes(data: bytes) -> int | None:
    """Size of a zip's central directory as its end record states it (what :mod:`zipfile` parses), or None."""
    end_rec = getattr(zipfile, "_EndRecData", None)
    if end_rec is None:
        return None
    try:
        rec = end_rec(io.BytesIO(data))
    except (OSError, ValueError, struct_error):
        return None
    return None if not rec else int(rec[zipfile._ECD_SIZE])  # type: ignore[attr-defined]


def _zip_class(parts: tuple[str, ...], wrapper: bool) -> str | None:
    """The class folder of a zip member (the folder right under the root), None for a file at the root."""
    parts = parts[1:] if wrapper else parts
    return parts[0] if len(parts) >= 2 else None


def load_image_zip(data: bytes, name: str = "upload.zip", image_size: tuple[int, int] | None = None,
                   channels: int = 1, class_names: Sequence[str] | None = None,
                   max_images: int = MAX_IMAGES) -> ImageDataset:
    """Read an ImageFolder laid out inside a zip given as bytes (see :func:`load_image_folder`)."""
    if len(data) > MAX_ZIP_BYTES:
        raise DataError(f"{name} is {fmt_limit(len(data))}, over the {fmt_limit(MAX_ZIP_BYTES)} limit")
    cd = _zip_directory_bytes(data)
    if cd is not None and cd > MAX_ZIP_DIRECTORY_BYTES:
        raise DataError(f"{name}: its directory of files is {fmt_limit(cd)}, over the "
                        f"{fmt_limit(MAX_ZIP_DIRECTORY_BYTES)} limit (too many files)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, struct_error, EOFError, NotImplementedError):
        raise DataError(f"{name} is not a valid zip file") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_DIRECTORY_ENTRIES:
            raise DataError(f"{name}: {len(infos):,} files, more than the limit of {MAX_DIRECTORY_ENTRIES:,}")
        for info in infos:
            p = pathlib.PurePosixPath(info.filename.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
                raise DataError(f"{name}: refusing unsafe path {_show_name(info.filename)} in zip")
        total = sum(i.file_size for i in infos)
        packed = sum(i.compress_size for i in infos)
        if total > MAX_UNCOMPRESSED_BYTES:
            raise DataError(f"{name}: unpacks to {total / 2**20:.0f} MiB, more than the "
                            f"{MAX_UNCOMPRESSED_BYTES / 2**20:.0f} MiB limit")
        if packed and total / max(packed, 1) > MAX_COMPRESSION_RATIO and total > 10 * 2**20:
            raise DataError(f"{name}: compression ratio {total / packed:.0f}:1 looks like a zip bomb")
        images = []
        for info in infos:
            parts = pathlib.PurePosixPath(info.filename.replace("\\", "/")).parts
            if _is_image_name(info.filename) and not _hidden(parts):
                images.append((parts, info))
        if len(images) > max_images:
            raise DataError(f"{name}: {len(images)} images, more than the limit of {max_images}")
        # one top folder holding everything (a zipped ImageFolder directory) is the root, not a class
        tops = {parts[0] for parts, _ in images}
        wrapper = len(tops) == 1 and all(len(parts) >= 3 for parts, _ in images)
        entries = []
        for parts, info in images:
            cls = _zip_class(parts, wrapper)
            if cls is None:
                continue
            try:
                blob = zf.read(info)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, ValueError, EOFError,
                    zlib.error, struct_error) as e:
                raise DataError(f"{name}: cannot read {_show_name(info.filename)} from zip "
                                f"({e.__class__.__name__})") from None
            if len(blob) != info.file_size:
                raise DataError(f"{name}: {_show_name(info.filename)} is not the size the zip declares")
            entries.append((cls, info.filename, blob))
    return _assemble(entries, name, name, image_size, channels, class_names)


# --------------------------------------------------------------------------------------------------------------
# Any data -> tensors
# --------------------------------------------------------------------------------------------------------------
DataLike = Any  # ImageDataset | (inputs, labels) | torch.utils.data.Dataset


def as_tensors(data: DataLike, preprocessing: Preprocessing, num_classes: int | None = None,
               name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Model-ready ``(inputs, labels)`` from any supported data.

    Parameters
    ----------
    data : ImageDataset, tuple of (inputs, labels), or torch.utils.data.Dataset
        uint8 images are preprocessed; float tensors are taken as already preprocessed and must match the model's
        input shape.
    preprocessing : Preprocessing
        The model's preprocessing.
    num_classes : int, optional
        If given, labels are checked to lie in ``range(num_classes)``.
    """
    if isinstance(data, ImageDataset):
        x, y = data.tensors(preprocessing)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        if x.dtype == torch.uint8:
            if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
                x = x.permute(0, 2, 3, 1)
            x = preprocessing.apply(x)
    elif isinstance(data, torch.utils.data.Dataset):
        xs, ys = [], []
        for i in range(len(data)):  # type: ignore[arg-type]
            item = data[i]
            xi, yi = item[0], item[1]
            if not isinstance(xi, torch.Tensor):
                arr = np.asarray(xi)
                if arr.dtype != np.uint8:
                    raise DataError(f"{name}: item {i} is neither a tensor nor a uint8 image")
                xi = preprocessing.apply(arr[None])[0]
            xs.append(xi)
            ys.append(int(yi))
        if not xs:
            raise DataError(f"{name}: the data set is empty")
        x, y = torch.stack(xs), torch.as_tensor(ys)
    else:
        raise DataError(f"{name}: expected an ImageDataset, an (inputs, labels) pair or a torch Dataset, "
                        f"got {type(data).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x.float()
    y = y.long().reshape(-1)
    if len(x) == 0:
        raise DataError(f"{name}: the data set is empty")
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} inputs but {len(y)} labels")
    expected = (preprocessing.channels, *preprocessing.input_size)
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"{name}: inputs have shape {tuple(x.shape[1:])}, the model expects {expected}")
    if not torch.isfinite(x).all():
        raise DataError(f"{name}: inputs contain NaN or infinite values")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{name}: labels must lie in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    return x.contiguous(), y


# --------------------------------------------------------------------------------------------------------------
# Building the shipped assets
# --------------------------------------------------------------------------------------------------------------
def build_assets(source: str | pathlib.Path | None = None, out_dir: str | pathlib.Path = DATA_DIR,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """Write the class-balanced Fashion-MNIST subsets shipped in ``assets/data``.

    eval: 200 test images per class; reference: 100 training images per class; train: 500 training images per
    class, disjoint from reference. Returns a summary (counts and sha256 of each file).
    """
    import hashlib

    raw = find_fashion_mnist_raw(source)
    train = load_mnist_like(raw, True, FASHION_MNIST_CLASSES, "fashion-mnist/train")
    test = load_mnist_like(raw, False, FASHION_MNIST_CLASSES, "fashion-mnist/test")
    from xaicomp_core.io.atomic import OutputGroup

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_idx = balanced_indices(test.labels, 2000, 10, seed)
    train_idx = balanced_indices(train.labels, 6000, 10, seed + 1)
    ref_idx, ft_idx = train_idx[:1000], train_idx[1000:6000]
    summary = {}
    group = OutputGroup()  # the three files land together (atomically), or none of them
    for split, ds, idx in (("eval", test, eval_idx), ("reference", train, ref_idx), ("train", train, ft_idx)):
        fname = BUILTIN_DATASETS["fashion-mnist"][split][0]
        buf = io.BytesIO()
        np.savez_compressed(buf, images=ds.images[idx], labels=ds.labels[idx].astype(np.uint8),
                            class_names=np.asarray(FASHION_MNIST_CLASSES), source_indices=idx.astype(np.int32))
        data = buf.getvalue()
        group.add(out_dir / fname, data, f"asset {fname}")
        summary[split] = {"file": fname, "images": len(idx), "per_class": np.bincount(ds.labels[idx]).tolist(),
                          "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    group.commit()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xaicomp_core.io.data build-assets [--source DIR] [--seed N]``."""
    ap = argparse.ArgumentParser(prog="python -m xaicomp_core.io.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-assets", help="write the shipped Fashion-MNIST subsets")
    b.add_argument("--source", default=None, help="folder with the Fashion-MNIST idx files")
    b.add_argument("--out", default=str(DATA_DIR))
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(build_assets(args.source, args.out, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
