"""Data sets: the shipped Fashion-MNIST subsets, torchvision folders on disk, ImageFolder directories or zips,
and plain tensors.

All image data is held as :class:`ImageDataset` (uint8 pixels, integer labels, class names) and turned into
model-ready tensors by a model's :class:`Preprocessing` (resize, grayscale/RGB, normalisation).

Rebuild the shipped subsets with::

    python -m xaicomp_core.io.data build-assets --source /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pathlib
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xaicomp_core.errors import DataError

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

# Limits for user uploads (zip / ImageFolder).
MAX_IMAGES = 50_000
MAX_UNCOMPRESSED_BYTES = 512 * 1024 * 1024
MAX_COMPRESSION_RATIO = 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------
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
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(v) for v in d["input_size"]), int(d["channels"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))

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
def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or not."""
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path.name}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = 4 + 4 * ndim + int(np.prod(dims))
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


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 python batches that only rebuilds plain containers and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a pickled data file")


def load_cifar10(folder: str | pathlib.Path, train: bool = False) -> ImageDataset:
    """Read CIFAR-10 from ``cifar-10-batches-bin`` (binary) or ``cifar-10-batches-py`` (restricted unpickling)."""
    folder = pathlib.Path(folder)
    for sub in (folder, folder / "cifar-10-batches-bin", folder / "cifar-10-batches-py"):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        if all((sub / f"{n}.bin").exists() for n in names):
            chunks = [np.fromfile(sub / f"{n}.bin", dtype=np.uint8).reshape(-1, 3073) for n in names]
            arr = np.concatenate(chunks)
            images = arr[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return ImageDataset(images, arr[:, 0], CIFAR10_CLASSES, "cifar10/" + ("train" if train else "test"),
                                source=str(sub))
        if all((sub / n).exists() for n in names):
            imgs, labs = [], []
            for n in names:
                with open(sub / n, "rb") as f:
                    d = _SafeUnpickler(f, encoding="bytes").load()
                imgs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labs.append(np.asarray(d[b"labels"]))
            return ImageDataset(np.concatenate(imgs), np.concatenate(labs), CIFAR10_CLASSES,
                                "cifar10/" + ("train" if train else "test"), source=str(sub))
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
def _decode_image(data: bytes, label: str, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = "L" if channels == 1 else "RGB"
            im = im.convert(mode)
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {label}: {e.__class__.__name__}") from None
    return arr


def _assemble(entries: list[tuple[str, str, bytes]], name: str, source: str,
              size: tuple[int, int] | None, channels: int, class_names: Sequence[str] | None) -> ImageDataset:
    """Decode (class folder, file label, bytes) entries into an ImageDataset."""
    if not entries:
        raise DataError(f"{name}: no images found (expected one sub-folder per class holding image files)")
    folders = sorted({c for c, _, _ in entries})
    if len(folders) < 2:
        raise DataError(f"{name}: only one class folder ({folders[0]!r}); an image classification set needs at "
                        "least two")
    mapping = _map_classes(folders, class_names, name)
    if size is None:
        first = _decode_image(entries[0][2], entries[0][1], None, channels)
        size = (first.shape[0], first.shape[1])
    images = np.stack([_decode_image(data, label, size, channels) for _, label, data in entries])
    labels = np.asarray([mapping[c] for c, _, _ in entries], dtype=np.int64)
    names = list(class_names) if class_names is not None else folders
    return ImageDataset(images, labels, names, name, source=source, meta={"folders": folders})


def _map_classes(folders: list[str], class_names: Sequence[str] | None, name: str) -> dict[str, int]:
    """Map class folder names to label indices of a model with ``class_names``."""
    if class_names is None:
        return {f: i for i, f in enumerate(folders)}
    lowered = {c.lower().replace("/", "-"): i for i, c in enumerate(class_names)}
    by_name = {f: lowered.get(f.lower().replace("/", "-")) for f in folders}
    if all(v is not None for v in by_name.values()):
        return {f: int(v) for f, v in by_name.items()}
    if all(f.isdigit() for f in folders):
        out = {f: int(f) for f in folders}
        bad = [f for f, v in out.items() if v >= len(class_names)]
        if bad:
            raise DataError(f"{name}: class folder(s) {', '.join(bad)} out of range for a model with "
                            f"{len(class_names)} classes")
        return out
    if len(folders) > len(class_names):
        raise DataError(f"{name}: {len(folders)} class folders but the model has only {len(class_names)} classes")
    if len(folders) != len(class_names):
        raise DataError(f"{name}: {len(folders)} class folders do not match the model's {len(class_names)} "
                        "classes; name the folders after the classes or 0..N-1")
    return {f: i for i, f in enumerate(folders)}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not pathlib.PurePosixPath(name).name.startswith(".")


def load_image_folder(path: str | pathlib.Path, image_size: tuple[int, int] | None = None, channels: int = 1,
                      class_names: Sequence[str] | None = None, max_images: int = MAX_IMAGES) -> ImageDataset:
    """Read an ImageFolder directory (``root/<class>/<image>``) or a ``.zip`` with the same layout.

    Images are decoded in memory (nothing is extracted), converted to ``channels`` and resized to ``image_size``
    (default: the first image's size). Zips are checked for path traversal, zip bombs and size limits first.

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
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        entries = []
        for cls_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls_dir.rglob("*")):
                if f.is_file() and _is_image_name(f.name):
                    entries.append((cls_dir.name, f"{cls_dir.name}/{f.name}", f.read_bytes()))
                    if len(entries) > max_images:
                        raise DataError(f"{path.name}: more than {max_images} images")
        return _assemble(entries, path.name, str(path), image_size, channels, class_names)
    return load_image_zip(path.read_bytes(), path.name, image_size, channels, class_names, max_images)


def load_image_zip(data: bytes, name: str = "upload.zip", image_size: tuple[int, int] | None = None,
                   channels: int = 1, class_names: Sequence[str] | None = None,
                   max_images: int = MAX_IMAGES) -> ImageDataset:
    """Read an ImageFolder laid out inside a zip given as bytes (see :func:`load_image_folder`)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise DataError(f"{name} is not a valid zip file") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        for info in infos:
            p = pathlib.PurePosixPath(info.filename.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
                raise DataError(f"{name}: refusing unsafe path {info.filename!r} in zip")
        total = sum(i.file_size for i in infos)
        packed = sum(i.compress_size for i in infos)
        if total > MAX_UNCOMPRESSED_BYTES:
            raise DataError(f"{name}: unpacks to {total / 2**20:.0f} MiB, more than the "
                            f"{MAX_UNCOMPRESSED_BYTES / 2**20:.0f} MiB limit")
        if packed and total / max(packed, 1) > MAX_COMPRESSION_RATIO and total > 10 * 2**20:
            raise DataError(f"{name}: compression ratio {total / packed:.0f}:1 looks like a zip bomb")
        images = [i for i in infos if _is_image_name(i.filename) and "__MACOSX" not in i.filename]
        if len(images) > max_images:
            raise DataError(f"{name}: {len(images)} images, more than the limit of {max_images}")
        entries = []
        for info in images:
            parts = pathlib.PurePosixPath(info.filename.replace("\\", "/")).parts
            if len(parts) < 2:
                continue
            # class = the folder right above the file; a single top-level wrapper folder is allowed.
            cls = parts[-2]
            try:
                blob = zf.read(info)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as e:
                raise DataError(f"{name}: cannot read {info.filename!r} from zip ({e.__class__.__name__})") from None
            if len(blob) != info.file_size:
                raise DataError(f"{name}: {info.filename!r} is not the size the zip declares")
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
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_idx = balanced_indices(test.labels, 2000, 10, seed)
    train_idx = balanced_indices(train.labels, 6000, 10, seed + 1)
    ref_idx, ft_idx = train_idx[:1000], train_idx[1000:6000]
    summary = {}
    for split, ds, idx in (("eval", test, eval_idx), ("reference", train, ref_idx), ("train", train, ft_idx)):
        fname = BUILTIN_DATASETS["fashion-mnist"][split][0]
        path = out_dir / fname
        np.savez_compressed(path, images=ds.images[idx], labels=ds.labels[idx].astype(np.uint8),
                            class_names=np.asarray(FASHION_MNIST_CLASSES), source_indices=idx.astype(np.int32))
        summary[split] = {"file": fname, "images": len(idx), "per_class": np.bincount(ds.labels[idx]).tolist(),
                          "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
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
