"""Models: the built-in trained networks, torchvision architectures and safe loading of user weights.

Every model returned here is in ``eval()`` mode and carries a :class:`ModelInfo` (class names, preprocessing,
model card) as ``model.xaicomp_info``; :func:`model_info` reads it back.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``: a file that would need to run code
to load is refused, never executed.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xaicomp_core.errors import WeightsError
from xaicomp_core.io.archs import FashionResNet, FashionVGG, LeNet5
from xaicomp_core.io.data import ASSETS_DIR, FASHION_MNIST_CLASSES, Preprocessing

MODELS_DIR = ASSETS_DIR / "models"
FASHION_PREPROCESSING = Preprocessing((28, 28), 1, (0.2860,), (0.3530,))
IMAGENET_PREPROCESSING = Preprocessing((224, 224), 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_WEIGHTS_BYTES = 1024 * 1024 * 1024
#: Records (tensors) in one PyTorch zip weights file.
MAX_WEIGHTS_RECORDS = 100_000


@dataclass
class ModelInfo:
    """What a model is and how to feed it.

    Parameters
    ----------
    name : str
        Display name (``"fashion-vgg"``, ``"resnet18 (my.pt)"``).
    arch : str
        Architecture id accepted by :func:`build_arch`.
    class_names : list of str
        One name per output.
    preprocessing : Preprocessing
        Input size, channels and normalisation.
    source : str
        ``"builtin"``, ``"pretrained"``, ``"weights file"`` or ``"random"``.
    card : dict
        Model card of a built-in model (accuracy, training command, ...); empty otherwise.
    """

    name: str
    arch: str
    class_names: list[str]
    preprocessing: Preprocessing
    source: str = "builtin"
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of outputs."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"name": self.name, "arch": self.arch, "class_names": list(self.class_names),
                "preprocessing": self.preprocessing.to_dict(), "source": self.source}


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in architecture trained by :mod:`xaicomp_core.train`."""

    factory: Callable[[], nn.Module]
    description: str
    epochs: int
    lr: float
    target_accuracy: float


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "fashion-vgg": BuiltinSpec(FashionVGG, "VGG-style conv net with BatchNorm (paper-like setting; default)",
                               epochs=15, lr=0.05, target_accuracy=0.92),
    "fashion-lenet": BuiltinSpec(LeNet5, "classic LeNet-5 (ReLU, max pooling), for teaching",
                                 epochs=25, lr=0.05, target_accuracy=0.89),
    "fashion-resnet": BuiltinSpec(lambda: FashionResNet(width=16),
                                  "small ResNet with BatchNorm and skip connections (exercises canonizers)",
                                  epochs=20, lr=0.05, target_accuracy=0.91),
}
DEFAULT_MODEL = "fashion-vgg"

#: torchvision architectures offered by name (any other name from ``torchvision.models.list_models`` works too).
TORCHVISION_ARCHS = ["alexnet", "vgg11_bn", "vgg16", "resnet18", "resnet50", "mobilenet_v2"]


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` attached to ``model`` (a generic one if none is attached)."""
    info = getattr(model, "xaicomp_info", None)
    if isinstance(info, ModelInfo):
        return info
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    n = last[-1].out_features if last else 10
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    ch = first.in_channels if first is not None else 1
    pre = FASHION_PREPROCESSING if ch == 1 else Preprocessing((32, 32), 3, (0.5,) * 3, (0.5,) * 3)
    names = FASHION_MNIST_CLASSES if n == 10 else [str(i) for i in range(n)]
    return ModelInfo(type(model).__name__, type(model).__name__, list(names), pre, source="python")


def attach_info(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Attach ``info`` to ``model`` and put it in eval mode; returns ``model``."""
    model.xaicomp_info = info  # type: ignore[assignment]
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------------------
def build_arch(arch: str, num_classes: int | None = None) -> nn.Module:
    """Build an untrained architecture by id: a built-in name or a torchvision model name."""
    key = arch.removeprefix("torchvision:")
    if key in BUILTIN_MODELS:
        model = BUILTIN_MODELS[key].factory()
        if num_classes not in (None, 10):
            raise WeightsError(f"{key} has 10 outputs, not {num_classes}")
        return model
    import torchvision

    names = set(torchvision.models.list_models(module=torchvision.models))
    if key not in names:
        raise WeightsError(f"unknown architecture {arch!r}; choose one of "
                           f"{', '.join(list(BUILTIN_MODELS) + TORCHVISION_ARCHS)} or another torchvision model")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return torchvision.models.get_model(key, weights=None, **kwargs)


def builtin_card(name: str) -> dict[str, Any]:
    """The model card of a built-in model (``assets/models/<name>.json``)."""
    path = MODELS_DIR / f"{name}.json"
    if not path.exists():
        raise WeightsError(f"missing model card {path}; train with `python -m xaicomp_core.train {name}`")
    return json.loads(path.read_text())


def load_builtin_model(name: str = DEFAULT_MODEL) -> nn.Module:
    """Load a built-in trained model from ``assets/models`` (offline).

    Parameters
    ----------
    name : str
        ``"fashion-vgg"`` (default), ``"fashion-lenet"`` or ``"fashion-resnet"``.

    Returns
    -------
    torch.nn.Module
        In eval mode, with ``xaicomp_info`` attached.
    """
    if name not in BUILTIN_MODELS:
        raise WeightsError(f"unknown built-in model {name!r}; available: {', '.join(BUILTIN_MODELS)}")
    card = builtin_card(name)
    model = build_arch(name)
    state = load_weights_file(MODELS_DIR / f"{name}.safetensors")
    load_state_dict_checked(model, state, name)
    pre = Preprocessing.from_dict(card["preprocessing"])
    return attach_info(model, ModelInfo(name, name, list(card["class_names"]), pre, "builtin", card))


def load_torchvision_model(arch: str, pretrained: bool = True, allow_random: bool = False,
                           num_classes: int | None = None) -> nn.Module:
    """A torchvision architecture with its pretrained (ImageNet) weights.

    Pretrained weights come from the local torch hub cache only (:mod:`xaicomp_core.io.pretrained`; nothing is
    downloaded); when the file is not there, a :class:`WeightsError` names the file and the folder to put it in,
    unless ``allow_random`` is set, in which case the model keeps random weights (and says so).
    """
    from xaicomp_core.io.pretrained import PretrainedMissing, cached_weights

    model = build_arch(arch, None if pretrained else num_classes)
    pre, classes, source = IMAGENET_PREPROCESSING, None, "random"
    if pretrained:
        try:
            path, classes = cached_weights(arch)
            load_state_dict_checked(model, load_weights_file(path), f"{arch} pretrained weights ({path.name})")
            source = "pretrained"
        except PretrainedMissing:
            if not allow_random:
                raise
    out = _num_outputs(model)
    if not classes or len(classes) != out:
        classes = FASHION_MNIST_CLASSES if out == 10 else [str(i) for i in range(out)]
    name = f"{arch} ({'ImageNet weights' if source == 'pretrained' else 'random weights'})"
    return attach_info(model, ModelInfo(name, arch, list(classes), pre, source))


def _num_outputs(model: nn.Module) -> int:
    lin = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    last = lin[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


# ----------------------------------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------------------------------
def load_weights_file(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pt``/``.pth`` file without executing pickled code.

    Raises
    ------
    WeightsError
        For missing, oversized, corrupt or unsafe files, and for NaN/inf values.
    """
    from xaicomp_core.io.safe import read_regular

    path = pathlib.Path(path)
    # only a regular file (never a FIFO, device or directory, also behind a symlink), at most MAX_WEIGHTS_BYTES
    return load_weights_bytes(read_regular(path, MAX_WEIGHTS_BYTES, "weights file", WeightsError), path.name)


def _line(e: BaseException, n: int) -> str:
    """The first non-empty line of an exception's message, at most ``n`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:n] if lines else e.__class__.__name__


def _too_big(name: str, size: int) -> None:
    raise WeightsError(f"{name} is {size / 2**20:.0f} MiB, over the {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB limit")


def load_weights_bytes(data: bytes, name: str = "weights") -> dict[str, torch.Tensor]:
    """Like :func:`load_weights_file` for bytes already in memory (an upload)."""
    if len(data) > MAX_WEIGHTS_BYTES:
        _too_big(name, len(data))
    if len(data) == 0:
        raise WeightsError(f"{name} is empty")
    is_safetensors = name.lower().endswith(".safetensors") or (
        len(data) > 8 and data[8:9] == b"{" and not data.startswith(b"PK"))
    if is_safetensors:
        from safetensors.torch import load as st_load

        try:
            state = st_load(data)
        except Exception as e:
            raise WeightsError(f"{name} is not a valid safetensors file ({_line(e, 100)})") from None
    else:
        _check_torch_zip(data, name)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = _line(e, 160) if "Unsupported" not in str(e) else "it contains Python objects"
            raise WeightsError(f"refusing to load {name}: it is not a plain tensor file ({msg[:160]}); only "
                               "state dicts of tensors are accepted, code in pickles is never run") from None
        except Exception as e:  # torch.load raises many types on garbage (IndexError, KeyError, RuntimeError, ...)
            raise WeightsError(f"{name} is corrupt or not a PyTorch weights file ({e.__class__.__name__}: "
                               f"{_line(e, 100)})") from None
        state = _extract_state_dict(obj, name)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{name}: tensor(s) {', '.join(bad[:5])} contain NaN or infinite values")
    return state


def _check_torch_zip(data: bytes, name: str) -> None:
    """Refuse a ``.pt``/``.pth`` file that is not torch's zip format with uncompressed records of at most
    :data:`MAX_WEIGHTS_BYTES` in all.

    torch.save has written that format since PyTorch 1.6; what it stores is then bounded by the file's own size. The
    legacy format (and a plain pickle) allocates storages from sizes the file declares before reading them, and a
    compressed record could unpack far beyond the file, so neither is read.
    """
    import zipfile

    if not data.startswith(b"PK"):
        raise WeightsError(f"refusing to load {name}: it is neither safetensors nor a PyTorch zip file (torch.save "
                           "since PyTorch 1.6), so it is corrupt, a legacy file or a plain pickle; code in pickles is "
                           "never run -- re-save the state dict with a current torch.save or as safetensors")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error):
        raise WeightsError(f"{name} is corrupt or not a PyTorch weights file (a broken zip)") from None
    if len(infos) > MAX_WEIGHTS_RECORDS:
        raise WeightsError(f"{name} holds {len(infos):,} records, more than the limit of {MAX_WEIGHTS_RECORDS:,}")
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise WeightsError(f"{name} has compressed records; torch.save never writes those (refused: they could "
                           "unpack far beyond the file)")
    if sum(i.file_size for i in infos) > MAX_WEIGHTS_BYTES:
        _too_big(name, sum(i.file_size for i in infos))


def _extract_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{name} does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], name: str = "weights") -> None:
    """Load ``state`` into ``model`` or raise a :class:`WeightsError` naming missing, unexpected and mis-shaped keys.

    The model is left unchanged if anything does not match.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (file vs model): {_short(shapes)}")
        raise WeightsError(f"{name} do not fit {type(model).__name__}: " + "; ".join(parts))
    kinds = [f"{k} ({str(state[k].dtype).removeprefix('torch.')} for a "
             f"{str(own[k].dtype).removeprefix('torch.')} entry)"
             for k in state if not _dtype_fits(state[k], own[k])]
    if kinds:
        raise WeightsError(f"{name}: tensor(s) of the wrong kind, refused rather than converted: {_short(kinds)}; "
                           "weights must be floating-point tensors")
    full = dict(own)
    full.update({k: v.to(own[k].dtype) for k, v in state.items()})
    model.load_state_dict(full, strict=True)


def _dtype_fits(value: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether ``value`` may be converted to ``own``'s dtype without changing what it means: any float to a float
    parameter (fp16/bf16/fp64 -> fp32), an integer to an integer buffer (``num_batches_tracked``), or a float holding
    whole numbers to an integer buffer. Integer, boolean or complex tensors for float parameters are refused."""
    if own.is_floating_point():
        return value.is_floating_point()
    if own.dtype == torch.bool:
        return value.dtype == torch.bool
    if value.is_complex() or value.dtype == torch.bool:
        return False
    if value.is_floating_point():
        return bool(torch.isfinite(value).all()) and bool((value == value.round()).all())
    return True


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Number of outputs of the last 2-D weight in a state dict (the classifier), if any."""
    mats = [v for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    return int(mats[-1].shape[0]) if mats else None


#: Loaders of model kinds defined in their own modules, consulted first by :func:`load_model`: each is
#: ``(accepts(arch, weights, weights_name), load(arch, weights, weights_name, declared))``.
#: :mod:`xaicomp_core.io.onnx_import` (``.onnx`` files) and :mod:`xaicomp_core.io.user_code` (``file.py:factory``)
#: register theirs when imported (``import xaicomp_core`` imports both).
MODEL_LOADERS: list[tuple[Callable[..., bool], Callable[..., nn.Module]]] = []


def load_model(arch: str = DEFAULT_MODEL, weights: str | pathlib.Path | bytes | None = None,
               weights_name: str | None = None, pretrained: bool = True, allow_random: bool = False,
               class_names: list[str] | None = None, preprocessing: Preprocessing | None = None,
               declared: Any = None) -> nn.Module:
    """The front door: a built-in model, a torchvision architecture, an architecture with user weights, an ONNX
    file or a Python factory.

    Parameters
    ----------
    arch : str
        Built-in name (``fashion-vgg``...), torchvision name (``resnet18``...), the path of an ``.onnx`` file (or
        ``"onnx"`` with its bytes as ``weights``), or ``path/to/file.py:factory`` (runs that file: an explicit
        opt-in).
    declared : InputSpec, optional
        For ONNX files and Python factories: declared input size, mean/std, pixel range and class names
        (:class:`~xaicomp_core.io.onnx_import.InputSpec`).
    weights : path or bytes, optional
        A ``.safetensors`` / ``.pt`` / ``.pth`` state dict to load into ``arch``.
    weights_name : str, optional
        File name for error messages (and type detection) when ``weights`` is bytes.
    pretrained, allow_random : bool
        For torchvision architectures without a weights file (see :func:`load_torchvision_model`).
    class_names, preprocessing : optional
        Override what is inferred.
    """
    loader = next((load for accepts, load in MODEL_LOADERS if accepts(arch, weights, weights_name)), None)
    if loader is not None:
        model = loader(arch, weights, weights_name, declared)
    elif weights is None:
        if arch in BUILTIN_MODELS:
            model = load_builtin_model(arch)
        else:
            model = load_torchvision_model(arch, pretrained=pretrained, allow_random=allow_random)
    else:
        if isinstance(weights, bytes):
            label = weights_name or "uploaded weights"
            state = load_weights_bytes(weights, label)
        else:
            label = pathlib.Path(weights).name
            state = load_weights_file(weights)
        n = infer_num_classes(state)
        model = build_arch(arch, None if arch in BUILTIN_MODELS else n)
        load_state_dict_checked(model, state, label)
        if arch in BUILTIN_MODELS:
            pre, names = FASHION_PREPROCESSING, list(FASHION_MNIST_CLASSES)
        else:
            out = _num_outputs(model)
            pre = IMAGENET_PREPROCESSING
            names = list(FASHION_MNIST_CLASSES) if out == 10 else [str(i) for i in range(out)]
        attach_info(model, ModelInfo(f"{arch} ({label})", arch, names, pre, "weights file"))
    info = model_info(model)
    if class_names is not None:
        if len(class_names) != info.num_classes:
            raise WeightsError(f"{len(class_names)} class names for a model with {info.num_classes} outputs")
        info.class_names = list(class_names)
    if preprocessing is not None:
        info.preprocessing = preprocessing
    return model


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over names, shapes and bytes of the state dict (detects any mutation)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
