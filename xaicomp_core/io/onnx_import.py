"""ONNX models as standard torch layers: convert, canonize for LRP, declare the preprocessing, store the graph.

An ONNX file is data: reading one never runs code. It is converted with ``onnx2torch`` into a ``torch.fx``
graph module and then *canonized* so that zennit's rules apply layer by layer:

* every sub-graph that depends only on constants is folded into a constant (``Identity`` chains, shape arithmetic);
* ``MatMul`` with a constant 2-D weight (plus a following ``Add`` of a constant bias) and ``Gemm`` with constant
  weights become ``nn.Linear``;
* ``BatchNormalization`` with constant statistics becomes ``nn.BatchNorm1d/2d/3d``, placed right after the conv or
  linear layer that feeds it alone (zennit's ``SequentialMergeBatchNorm`` pairs layers by registration order);
  any other BatchNorm gets an ``nn.Identity`` before it, so it is never merged into an unrelated layer;
* an ``Add`` of two computed tensors (a residual connection) becomes ``torch.stack`` + zennit's ``Sum`` layer, which
  the composites route through the ``Norm`` rule (relevance split in proportion to the two inputs);
* ``GlobalAveragePool`` becomes ``nn.AdaptiveAvgPool2d(1)`` (zennit's ``AvgPool`` type, ``Norm`` rule) and
  ``x * Sigmoid(x)`` becomes ``nn.SiLU`` (an activation: relevance passes through, as in torchvision's models);
* a final ``Softmax`` / ``LogSoftmax`` is left out: relevance starts at the logits (the top-1 prediction is the same).

Modules are named after their graph nodes (``block_c1_conv``), so state-dict keys are plain identifiers. The
canonized model's outputs are checked against the plain conversion on sample inputs.

Input channels, input size and the number of classes come from the graph. How pixels are scaled is *declared* by
the user (:class:`InputSpec`: CLI options, the app's sidebar, or a JSON sidecar ``model.onnx.json`` /
``model.json`` next to the file); the default for an ONNX model is pixels scaled to [0, 1] with no mean/std.

A packed file of a compressed ONNX model stores the graph without its large weight tensors
(:func:`architecture_record`): the weights are in the payload, and :func:`model_from_record` rebuilds the same
modules from the graph, fills the weights from the file and checks they fit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import operator
import os
import pathlib
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from xaicomp_core.errors import WeightsError
from xaicomp_core.io.data import Preprocessing
from xaicomp_core.io.models import (
    MAX_WEIGHTS_BYTES,
    MODEL_LOADERS,
    ModelInfo,
    attach_info,
    load_state_dict_checked,
)

ONNX_ARCH = "onnx"
ONNX_SUFFIX = ".onnx"
#: Architecture records in packed files: the graph, zlib-compressed, at most this large once decompressed.
MAX_RECORD_GRAPH_BYTES = 256 * 2**20
#: Float initializers with at least this many elements are left out of a stored graph (the payload holds them).
STRIP_MIN_ELEMENTS = 16
#: At most this many elements in all stripped initializers of a stored graph (they are filled before conversion).
MAX_STRIPPED_ELEMENTS = 2**31
#: A canonized model must give the plain conversion's outputs to this (times max(1, largest |output|)).
CANON_TOLERANCE = 1e-4
RECORD_FORMAT = "onnx-graph/1"
PIXEL_RANGES = (1.0, 255.0)


# ----------------------------------------------------------------------------------------------------------------
# declared preprocessing
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """What the user declares about a model's input (anything left None comes from the model).

    Parameters
    ----------
    input_size : (int, int), optional
        (height, width) images are resized to; default: the graph's input size.
    mean, std : tuple of float, optional
        Per-channel normalisation, in the units of ``pixel_range``; default none (mean 0, std 1).
    pixel_range : {1.0, 255.0}
        Pixels are first scaled to [0, 1] (default) or kept in [0, 255].
    class_names : tuple of str, optional
        One name per output; default ``0 .. K-1``.
    source : str
        Where the declaration came from (``"options"``, the sidecar's file name), for messages.
    """

    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_range: float = 1.0
    class_names: tuple[str, ...] | None = None
    source: str = field(default="options", compare=False)

    def __post_init__(self) -> None:
        if self.pixel_range not in PIXEL_RANGES:
            raise WeightsError(f"pixel range must be 0-1 or 0-255, not 0-{self.pixel_range:g}")
        if self.std is not None and not all(math.isfinite(s) and s > 0 for s in self.std):
            raise WeightsError("std values must be positive numbers")
        if self.mean is not None and not all(math.isfinite(m) for m in self.mean):
            raise WeightsError("mean values must be finite numbers")
        if self.input_size is not None and not all(isinstance(v, int) and 1 <= v <= 4096 for v in self.input_size):
            raise WeightsError(f"input size {self.input_size} is out of range (1..4096 per side)")

    @property
    def empty(self) -> bool:
        """Nothing declared."""
        return self == InputSpec()

    def merged(self, other: InputSpec | None) -> InputSpec:
        """``other``'s fields where this one declares nothing (this one wins)."""
        if other is None:
            return self
        return InputSpec(self.input_size or other.input_size, self.mean or other.mean, self.std or other.std,
                         self.pixel_range if self.pixel_range != 1.0 else other.pixel_range,
                         self.class_names or other.class_names,
                         self.source if not self.empty else other.source)

    def preprocessing(self, channels: int, input_size: tuple[int, int] | None) -> Preprocessing:
        """The :class:`Preprocessing` for a model with ``channels`` inputs of ``input_size`` (the graph's)."""
        size = self.input_size or input_size
        if size is None:
            raise WeightsError("the model does not state its input size; declare it (--input-size H,W, or "
                               "\"input_size\": [H, W] in the JSON sidecar)")
        mean = self.mean if self.mean is not None else (0.0,) * channels
        std = self.std if self.std is not None else (1.0,) * channels
        mean, std = (tuple(v) * channels if len(v) == 1 else tuple(v) for v in (mean, std))
        if len(mean) != channels or len(std) != channels:
            raise WeightsError(f"mean and std need one value (or {channels}) per input channel")
        r = self.pixel_range
        return Preprocessing((int(size[0]), int(size[1])), channels, tuple(float(m) / r for m in mean),
                             tuple(float(s) / r for s in std))

    def cli_words(self) -> list[str]:
        """The ``xaicomp`` options declaring this."""
        words: list[str] = []
        if self.input_size is not None:
            words += ["--input-size", f"{self.input_size[0]},{self.input_size[1]}"]
        if self.pixel_range != 1.0:
            words += ["--pixel-range", "0-255"]
        if self.mean is not None:
            words += ["--mean", ",".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in self.mean)]
        if self.std is not None:
            words += ["--std", ",".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in self.std)]
        if self.class_names is not None:
            words += ["--class-names", ",".join(self.class_names)]
        return words

    def to_dict(self) -> dict[str, Any]:
        """The sidecar form (only declared fields)."""
        d: dict[str, Any] = {}
        if self.input_size is not None:
            d["input_size"] = list(self.input_size)
        if self.pixel_range != 1.0:
            d["pixel_range"] = [0, 255]
        if self.mean is not None:
            d["mean"] = list(self.mean)
        if self.std is not None:
            d["std"] = list(self.std)
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "sidecar") -> InputSpec:
        """Read a sidecar's JSON object, strictly (unknown keys and wrong types are refused)."""
        if not isinstance(d, dict):
            raise WeightsError(f"{source}: expected a JSON object")
        known = {"input_size", "mean", "std", "pixel_range", "class_names", "channels"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WeightsError(f"{source}: unknown field(s) {', '.join(unknown[:5])}; known: "
                               f"{', '.join(sorted(known))}")

        def numbers(key: str, n: int | None = None) -> tuple[float, ...] | None:
            v = d.get(key)
            if v is None:
                return None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v]
            if not (isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in v)) or (n is not None and len(v) != n):
                raise WeightsError(f"{source}: {key} must be {n or 'one or more'} number(s)")
            return tuple(float(x) for x in v)

        size = numbers("input_size", 2)
        if size is not None and not all(float(s).is_integer() for s in size):
            raise WeightsError(f"{source}: input_size must be two integers [height, width]")
        pr = d.get("pixel_range", [0, 1])
        if pr not in ([0, 1], [0, 255], "0-1", "0-255"):
            raise WeightsError(f"{source}: pixel_range must be [0, 1] or [0, 255]")
        names = d.get("class_names")
        if names is not None and not (isinstance(names, list) and names and all(isinstance(s, str) for s in names)):
            raise WeightsError(f"{source}: class_names must be a list of strings")
        return cls(None if size is None else (int(size[0]), int(size[1])), numbers("mean"), numbers("std"),
                   255.0 if pr in ([0, 255], "0-255") else 1.0, None if names is None else tuple(names), source)

    def describe(self, pre: Preprocessing) -> str:
        """One line: how images become this model's inputs."""
        h, w = pre.input_size
        rng = "[0, 255]" if self.pixel_range == 255.0 else "[0, 1]"
        if self.mean is None and self.std is None:
            norm = "no mean/std"
        else:
            fmt = lambda vs: ",".join(f"{v:g}" for v in vs)  # noqa: E731
            norm = f"mean {fmt(self.mean or (0.0,))}, std {fmt(self.std or (1.0,))}"
        where = "declared in " + self.source if not self.empty else "the default for ONNX; declare other values " \
            "with --input-size/--pixel-range/--mean/--std or a JSON sidecar"
        return (f"images resized to {h}x{w} (bilinear, aspect ratio not kept), {'RGB' if pre.channels == 3 else 'grey'}"
                f", pixels scaled to {rng}, {norm} ({where})")


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> floats (for ``--mean`` / ``--std``)."""
    try:
        vals = tuple(float(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise WeightsError(f"cannot parse {flag} {text!r}; use e.g. 0.5,0.5,0.5") from None
    if not vals:
        raise WeightsError(f"{flag} needs at least one number")
    return vals


def parse_size(text: str) -> tuple[int, int]:
    """``"224,224"``, ``"224x224"`` or ``"224"`` -> (height, width)."""
    parts = [p for p in str(text).lower().replace("x", ",").replace(" ", "").split(",") if p]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise WeightsError(f"cannot parse --input-size {text!r}; use H,W e.g. 224,224") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2:
        raise WeightsError(f"cannot parse --input-size {text!r}; use H,W e.g. 224,224")
    return vals[0], vals[1]


def parse_class_names(text: str) -> tuple[str, ...]:
    """``--class-names``: comma-separated names, or a ``.txt`` (one per line) / ``.json`` (a list) file."""
    p = pathlib.Path(text)
    if text.lower().endswith((".txt", ".json")) and p.is_file():
        if p.stat().st_size > 16 * 2**20:
            raise WeightsError(f"{p.name} is too large for a list of class names")
        raw = p.read_text(encoding="utf-8", errors="replace")
        if text.lower().endswith(".json"):
            try:
                names = json.loads(raw)
            except json.JSONDecodeError as e:
                raise WeightsError(f"{p.name} is not valid JSON ({e})") from None
            if not (isinstance(names, list) and all(isinstance(s, str) for s in names)):
                raise WeightsError(f"{p.name} must hold a JSON list of strings")
        else:
            names = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    else:
        names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise WeightsError("--class-names names no class")
    return tuple(names)


def sidecar_path(path: str | os.PathLike) -> pathlib.Path | None:
    """The JSON sidecar of a model file: ``model.onnx.json``, else ``model.json`` (None if neither exists)."""
    p = pathlib.Path(path)
    for cand in (p.with_name(p.name + ".json"), p.with_suffix(".json")):
        if cand.is_file():
            return cand
    return None


def read_sidecar(path: str | os.PathLike) -> InputSpec | None:
    """The :class:`InputSpec` in the sidecar of ``path`` (None if there is none)."""
    side = sidecar_path(path)
    if side is None:
        return None
    if side.stat().st_size > 16 * 2**20:
        raise WeightsError(f"{side.name} is too large for a preprocessing sidecar")
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{side.name} is not valid JSON ({e})") from None
    return InputSpec.from_dict(d, side.name)


# ----------------------------------------------------------------------------------------------------------------
# reading and converting
# ----------------------------------------------------------------------------------------------------------------
def _require_onnx():
    try:
        import onnx
        import onnx2torch  # noqa: F401
    except ImportError:
        raise WeightsError("reading ONNX models needs the onnx and onnx2torch packages "
                           "(pip install 'xaicomp[onnx]')") from None
    return onnx


def is_onnx_name(name: str | os.PathLike | None) -> bool:
    """Whether a file name looks like an ONNX model."""
    return name is not None and str(name).lower().endswith(ONNX_SUFFIX)


def _parse(data: bytes, name: str):
    onnx = _require_onnx()
    from google.protobuf.message import DecodeError

    if not data:
        raise WeightsError(f"{name} is empty")
    if len(data) > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{name} is {len(data) / 2**20:.0f} MiB, over the {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB "
                           "limit")
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError) as e:
        raise WeightsError(f"{name} is not a valid ONNX file ({e.__class__.__name__})") from None
    if not proto.graph.node:
        raise WeightsError(f"{name} is not an ONNX model (its graph has no operations)")
    ext = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if ext:
        raise WeightsError(f"{name} keeps its weights in separate files (ONNX external data); save it as one file "
                           "(onnx.save_model(model, path, save_as_external_data=False))")
    return proto


def unsupported_operators(proto) -> list[str]:
    """``"Op (domain, opset N)"`` for every operator of the graph the converter has no rule for."""
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    missing: dict[str, None] = {}
    for node in proto.graph.node:
        domain = node.domain or ""
        version = opsets.get(domain, opsets.get("ai.onnx", 1))
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            label = node.op_type + (f" ({domain})" if domain not in ("", "ai.onnx") else "") + f" (opset {version})"
            missing[label] = None
    return list(missing)


def _dims(value_info) -> list[int | None]:
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def _graph_io(proto, name: str) -> tuple[list[int | None], list[int | None]]:
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise WeightsError(f"{name} has {len(inputs)} inputs; an image classifier has one (N, C, H, W)")
    if len(proto.graph.output) != 1:
        raise WeightsError(f"{name} has {len(proto.graph.output)} outputs; an image classifier has one (N, classes)")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise WeightsError(f"{name}: its input has {len(dims)} dimensions; an image classifier takes (N, C, H, W)")
    if dims[1] not in (1, 3) and dims[3] in (1, 3):
        return dims, _dims(proto.graph.output[0])  # channels last: see _channels_first
    if dims[1] not in (1, 3):
        raise WeightsError(f"{name}: its input has {dims[1] if dims[1] else 'an unstated number of'} channels; "
                           "xaicomp reads grey (1) or RGB (3) images")
    return dims, _dims(proto.graph.output[0])


def _channels_first(proto, dims: list[int | None]) -> list[int | None]:
    """A channels-last input (N, H, W, C; TensorFlow/Keras exports) gets a Transpose in front, so the graph takes
    (N, C, H, W) like every other model here. Returns the new input dims."""
    from onnx import helper

    inits = {t.name for t in proto.graph.initializer}
    inp = [i for i in proto.graph.input if i.name not in inits][0]
    old = inp.name
    new = old + "_nchw"
    node = helper.make_node("Transpose", [new], [old], perm=[0, 2, 3, 1], name="xaicomp_channels_last")
    proto.graph.node.insert(0, node)
    shape = inp.type.tensor_type.shape.dim
    order = [0, 3, 1, 2]
    copies = [type(shape[0])() for _ in order]
    for c, j in zip(copies, order):
        c.CopyFrom(shape[j])
    del shape[:]
    shape.extend(copies)
    inp.name = new
    return [dims[j] for j in order]


def _free_batch(proto) -> None:
    """Make the input's batch dimension symbolic and let constant Reshape targets copy it (``0``), so that a graph
    exported with a fixed batch of 1 runs on any batch."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    inp = [i for i in proto.graph.input if i.name not in inits][0]
    d0 = inp.type.tensor_type.shape.dim[0]
    if not (d0.HasField("dim_value") and d0.dim_value == 1):
        return
    d0.Clear()
    d0.dim_param = "batch"
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    constants = {n.output[0]: a.t for n in proto.graph.node if n.op_type == "Constant" and len(n.output) == 1
                 for a in n.attribute if a.name == "value"}
    for node in proto.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        t = inits.get(node.input[1]) or constants.get(node.input[1])
        if t is None:
            continue
        arr = numpy_helper.to_array(t).copy()
        if arr.ndim == 1 and len(arr) >= 2 and arr[0] == 1:
            arr[0] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    del proto.graph.value_info[:]  # stale shapes; inferred again by the converter


def _constants_as_initializers(proto) -> None:
    """``Constant`` nodes holding a tensor, and ``Identity`` nodes of an initializer, become initializers: the
    converter reads conv, Gemm and BatchNorm weights only from initializers (exporters alias shared values through
    Identity nodes when they do not fold constants)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    graph_outputs = {o.name for o in proto.graph.output}
    keep = []
    for node in proto.graph.node:
        out = node.output[0] if len(node.output) == 1 else None
        src = None
        if out is not None and out not in graph_outputs and out not in inits:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                src = node.attribute[0].t
            elif node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
                src = inits[node.input[0]]
        if src is None:
            keep.append(node)
            continue
        t = numpy_helper.from_array(numpy_helper.to_array(src), out)
        proto.graph.initializer.append(t)
        inits[out] = proto.graph.initializer[-1]
    if len(keep) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(keep)


def _explicit_auto_pad(proto) -> None:
    """``auto_pad = SAME_UPPER / SAME_LOWER / VALID`` on Conv and pooling nodes as explicit ``pads`` (the converter
    reads only those), from the inferred input shapes."""
    import onnx

    nodes = [n for n in proto.graph.node if n.op_type in ("Conv", "MaxPool", "AveragePool")
             and any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in n.attribute)]
    if not nodes:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        return
    shapes = {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.input]}
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode()
        dims = shapes.get(node.input[0])
        if not dims or any(d is None for d in dims[2:]):
            continue
        spatial = dims[2:]
        if "kernel_shape" in attrs:
            kernel = list(attrs["kernel_shape"].ints)
        elif node.op_type == "Conv" and node.input[1] in inits:
            kernel = inits[node.input[1]][2:]
        else:
            continue
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(spatial)
        dil = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(spatial)
        begin, end = [], []
        for size, k, st, d in zip(spatial, kernel, strides, dil):
            if mode == "VALID":
                b = e = 0
            else:
                out = -(-size // st)
                total = max((out - 1) * st + (k - 1) * d + 1 - size, 0)
                b = total // 2 if mode == "SAME_UPPER" else total - total // 2
                e = total - b
            begin.append(b)
            end.append(e)
        node.attribute.remove(attrs["auto_pad"])
        if "pads" in attrs:
            node.attribute.remove(attrs["pads"])
        node.attribute.append(onnx.helper.make_attribute("pads", begin + end))


def _drop_final_softmax(proto) -> bool:
    """Remove a Softmax / LogSoftmax that produces the graph's output (returns whether one was removed)."""
    out = proto.graph.output[0].name
    last = [n for n in proto.graph.node if out in n.output]
    if len(last) != 1 or last[0].op_type not in ("Softmax", "LogSoftmax"):
        return False
    node = last[0]
    src = node.input[0]
    if any(src in n.input for n in proto.graph.node if n is not node):
        return False
    for n in proto.graph.node:
        for i, o in enumerate(n.output):
            if o == src:
                n.output[i] = out
    proto.graph.node.remove(node)
    return True


def _sample(shape: Sequence[int], n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *shape), generator=g)


@dataclass
class Converted:
    """A converted ONNX graph: the canonized module and what was done."""

    model: nn.Module
    channels: int
    input_size: tuple[int, int] | None
    num_classes: int
    notes: list[str]
    softmax_removed: bool


def convert_onnx(data: bytes, name: str = "model.onnx", input_size: tuple[int, int] | None = None,
                 canonize: bool = True, check: bool = True) -> Converted:
    """Convert ONNX bytes to a canonized torch module (see the module docstring).

    Parameters
    ----------
    data : bytes
        The ONNX file.
    name : str
        File name for messages.
    input_size : (int, int), optional
        Used when the graph does not state its input size.
    canonize : bool
        Apply the canonization (off: the plain onnx2torch module, for comparisons).
    check : bool
        Check outputs: one image alone equals it in a batch, the canonized model equals the plain conversion (off
        for a graph whose weights are placeholders, filled from a packed file afterwards).

    Raises
    ------
    WeightsError
        Not ONNX, not an image classifier, unsupported operators (all named in one line), or a conversion
        failure.
    """
    proto = _parse(data, name)
    dims, _ = _graph_io(proto, name)
    missing = unsupported_operators(proto)
    if missing:
        raise WeightsError(f"{name} uses operator(s) xaicomp cannot convert to torch layers: {', '.join(missing)}")
    notes: list[str] = []
    if dims[1] not in (1, 3):
        dims = _channels_first(proto, dims)
        notes.append("its input is channels-last (N, H, W, C): images are given to it transposed")
    _constants_as_initializers(proto)
    _free_batch(proto)
    _explicit_auto_pad(proto)
    removed = _drop_final_softmax(proto)
    size = (dims[2], dims[3]) if dims[2] and dims[3] else input_size
    if size is None:
        raise WeightsError(f"{name} does not state its input size; declare it (--input-size H,W, or \"input_size\": "
                           "[H, W] in the JSON sidecar)")
    from onnx2torch import convert

    try:  # shapes through Shape/Gather/Concat chains too (the converter needs the rank of BatchNorm inputs)
        import onnx

        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference is a help, not a requirement
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = convert(proto).eval()
    except Exception as e:  # the converter raises many types on graphs it cannot handle
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(f"{name} cannot be converted to torch layers ({e.__class__.__name__}: {msg})") from None
    x = _sample((int(dims[1]), *size))
    try:
        with torch.no_grad():
            ref = gm(x)
            one = gm(x[:1])
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(f"{name}: the converted model does not run on (N, {dims[1]}, {size[0]}, {size[1]}) "
                           f"inputs ({e.__class__.__name__}: {msg})") from None
    if not isinstance(ref, torch.Tensor) or ref.ndim < 2 or ref.shape[0] != 2 or \
            math.prod(ref.shape[2:]) != 1:
        shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise WeightsError(f"{name}: the model's output is {shape}, not one score per class (N, classes)")
    if check and not torch.allclose(ref[:1], one, rtol=1e-4, atol=1e-5 * max(1.0, float(one.abs().max()))):
        raise WeightsError(f"{name} gives different results for an image alone and in a batch (its graph fixes "
                           "the batch size); export it with a dynamic batch axis")
    if removed:
        notes.append("its final Softmax is left out: relevance starts at the logits (predictions are the same)")
    model: nn.Module = gm
    if canonize:
        model = canonize_graph(gm, x, ref if check else None, name)
    return Converted(model, int(dims[1]), (int(size[0]), int(size[1])), int(ref.shape[1]), notes, removed)


# ----------------------------------------------------------------------------------------------------------------
# canonization
# ----------------------------------------------------------------------------------------------------------------
class OnnxGraphModule(fx.GraphModule):
    """A canonized ONNX model: a ``torch.fx`` graph module that keeps xaicomp's attributes when deep-copied."""

    _xaicomp_attrs = ("xaicomp_info", "xaicomp_onnx")

    def __deepcopy__(self, memo):  # noqa: D105
        import copy

        res = super().__deepcopy__(memo)
        for k in self._xaicomp_attrs:
            if k in self.__dict__:
                res.__dict__[k] = copy.deepcopy(self.__dict__[k], memo)
        return res


def _attr(mod: nn.Module, target: str) -> Any:
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def _type_name(m: Any) -> str:
    return type(m).__name__


def _is_add(m: nn.Module) -> bool:
    return _type_name(m) == "OnnxBinaryMathOperation" and getattr(m, "math_op_function", None) is torch.add and \
        getattr(m, "broadcast", None) != 1


def canonize_graph(gm: fx.GraphModule, sample: torch.Tensor, expected: torch.Tensor | None = None,
                   name: str = "model") -> nn.Module:
    """The canonized copy of an onnx2torch graph module (see the module docstring); ``gm`` is consumed.

    Raises
    ------
    WeightsError
        If the canonized model does not give the plain conversion's outputs on ``sample``.
    """
    from torch.fx.passes.shape_prop import ShapeProp
    from zennit.layer import Sum

    gm.eval()
    graph = gm.graph
    modules = dict(gm.named_modules())
    root = nn.Module()
    consts: dict[fx.Node, torch.Tensor] = {}
    const_names: dict[fx.Node, str] = {}

    # 1. fold every node whose inputs are all constants
    with torch.no_grad():
        for node in list(graph.nodes):
            if node.op == "get_attr":
                v = _attr(gm, node.target)
                if isinstance(v, torch.Tensor):
                    consts[node] = v
            elif node.op in ("call_module", "call_function", "call_method"):
                ins = node.all_input_nodes
                if not all(i in consts for i in ins):
                    continue
                if node.op == "call_module" and not ins and _type_name(modules[node.target]) not in (
                        "OnnxConstant", "OnnxConstantOfShape", "OnnxRange", "OnnxEyeLike"):
                    continue
                args = fx.node.map_arg(node.args, lambda n: consts[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: consts[n])
                try:
                    if node.op == "call_module":
                        v = modules[node.target](*args, **kwargs)
                    elif node.op == "call_function":
                        v = node.target(*args, **kwargs)
                    else:
                        v = getattr(args[0], node.target)(*args[1:], **kwargs)
                except Exception:
                    continue
                if isinstance(v, torch.Tensor):
                    consts[node] = v

    ShapeProp(gm).propagate(sample)
    shapes = {n: tuple(n.meta["tensor_meta"].shape) for n in graph.nodes
              if isinstance(n.meta.get("tensor_meta"), fx.passes.shape_prop.TensorMetadata)}

    def const_node(node: fx.Node) -> fx.Node:
        """A get_attr node for the constant value of ``node`` (persistent when it is a weight-like float)."""
        if node.op == "get_attr" and node.target in const_names.values():
            return node
        key = const_names.get(node)
        if key is None:
            key = f"const_{len(const_names)}"
            v = consts[node].detach().clone().contiguous()
            persistent = v.is_floating_point() and v.numel() >= STRIP_MIN_ELEMENTS
            root.register_buffer(key, v, persistent=persistent)
            gm.register_buffer(key, v, persistent=persistent)
            const_names[node] = key
        with graph.inserting_before(node):
            new = graph.get_attr(key)
        return new

    def const_of(n: Any) -> torch.Tensor | None:
        return consts.get(n) if isinstance(n, fx.Node) else None

    erased: set[fx.Node] = set()

    def add(key: str, module: nn.Module) -> None:
        root.add_module(key, module)
        gm.add_module(key, module)

    def erase(node: fx.Node) -> None:
        graph.erase_node(node)
        erased.add(node)

    def replace(node: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
        key = node.name
        add(key, module)
        with graph.inserting_before(node):
            new = graph.call_module(key, args)
        node.replace_all_uses_with(new)
        erase(node)
        new.name = key
        shapes[new] = shapes.get(node, ())
        return new

    # 2. constants in the data path: computed values become get_attr nodes
    for node in list(graph.nodes):
        if node in consts and node.op != "output" and any(u not in consts for u in node.users):
            live = [u for u in node.users if u not in consts]
            new = const_node(node)
            for u in live:
                u.replace_input_with(node, new)
            consts[new] = consts[node]
    # 3. pattern rewrites
    def rewrite(node: fx.Node, m: nn.Module, t: str, args: tuple) -> bool:
        """Replace ``node`` by standard layers; False if no pattern applies."""
        if t == "OnnxBatchNorm" and len(args) == 5 and all(const_of(a) is not None for a in args[1:]):
            w, b, mean, var = (const_of(a) for a in args[1:])
            rank = len(shapes.get(args[0], ())) - 2
            cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(rank)
            if cls is None:
                return False
            bn = cls(w.numel(), eps=float(m.epsilon))
            with torch.no_grad():
                bn.weight.copy_(w.reshape(-1))
                bn.bias.copy_(b.reshape(-1))
                bn.running_mean.copy_(mean.reshape(-1))
                bn.running_var.copy_(var.reshape(-1))
            replace(node, bn.eval(), (args[0],))
            return True
        if t == "OnnxMatMul" and len(args) == 2 and const_of(args[1]) is not None and const_of(args[0]) is None \
                and const_of(args[1]).ndim == 2 and const_of(args[1]).is_floating_point():
            wt = const_of(args[1])
            lin = nn.Linear(wt.shape[0], wt.shape[1], bias=False)
            with torch.no_grad():
                lin.weight = nn.Parameter(wt.T.contiguous().clone())
            users = list(node.users)
            bias = None
            if len(users) == 1 and users[0].op == "call_module" and _is_add(modules.get(users[0].target, nn.Module())):
                add_node = users[0]
                other = add_node.args[1] if add_node.args[0] is node else add_node.args[0]
                b = const_of(other)
                if b is not None and b.is_floating_point() and b.numel() == wt.shape[1] and \
                        shapes.get(add_node) == shapes.get(node):
                    bias = b.reshape(-1)
            if bias is not None:
                lin.bias = nn.Parameter(bias.contiguous().clone())
                new = replace(node, lin, (args[0],))
                add_node = next(iter(new.users))
                add_node.replace_all_uses_with(new)
                erase(add_node)
            else:
                replace(node, lin, (args[0],))
            return True
        if t == "OnnxGemm" and not m.trans_a and len(args) >= 2 and const_of(args[1]) is not None and \
                const_of(args[0]) is None and (len(args) < 3 or args[2] is None or const_of(args[2]) is not None):
            bmat = const_of(args[1])
            wt = (bmat if m.trans_b else bmat.T) * m.alpha
            c = const_of(args[2]) if len(args) >= 3 and args[2] is not None else None
            if wt.ndim != 2 or (c is not None and c.numel() != wt.shape[0]):
                return False
            lin = nn.Linear(wt.shape[1], wt.shape[0], bias=c is not None)
            with torch.no_grad():
                lin.weight = nn.Parameter(wt.contiguous().clone())
                if c is not None:
                    lin.bias = nn.Parameter((c.reshape(-1) * m.beta).contiguous().clone())
            replace(node, lin, (args[0],))
            return True
        if _is_add(m) and len(args) == 2 and sum(const_of(a) is not None for a in args) == 1:
            src, c = (args[0], const_of(args[1])) if const_of(args[1]) is not None else (args[1], const_of(args[0]))
            layer = getattr(root, str(src.target), None) if isinstance(src, fx.Node) and src.op == "call_module" \
                else None
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and len(src.users) == 1 and \
                    c.is_floating_point() and shapes.get(node) == shapes.get(src):
                n_out = layer.out_channels if not isinstance(layer, nn.Linear) else layer.out_features
                rank = len(shapes.get(src, ()))
                squeezed = [d for d in c.shape if d != 1]
                channel_dim = len(c.shape) - (rank - 1) if not isinstance(layer, nn.Linear) else len(c.shape) - 1
                if c.numel() == n_out and squeezed in ([n_out], []) and \
                        (n_out == 1 or (0 <= channel_dim < len(c.shape) and c.shape[channel_dim] == n_out)):
                    bias = c.reshape(-1).to(layer.weight.dtype)
                    with torch.no_grad():
                        layer.bias = nn.Parameter(bias.clone() if layer.bias is None else layer.bias + bias)
                    node.replace_all_uses_with(src)
                    erase(node)
                    return True
            return False
        if _is_add(m) and len(args) == 2 and all(isinstance(a, fx.Node) and const_of(a) is None for a in args):
            a, b = args
            sa, sb = shapes.get(a), shapes.get(b)
            if sa is None or sb is None:
                return False
            key = node.name
            add(key, Sum(dim=-1))
            with graph.inserting_before(node):
                if sa != sb:  # broadcasting: the same values, expanded, as the two summands
                    pair = graph.call_function(torch.broadcast_tensors, (a, b))
                    a = graph.call_function(operator.getitem, (pair, 0))
                    b = graph.call_function(operator.getitem, (pair, 1))
                stacked = graph.call_function(torch.stack, ([a, b],), {"dim": -1})
                new = graph.call_module(key, (stacked,))
            node.replace_all_uses_with(new)
            erase(node)
            new.name = key
            shapes[new] = shapes.get(node, ())
            return True
        if t.startswith("OnnxGlobalAveragePool") and len(shapes.get(args[0], ())) == 4:
            replace(node, nn.AdaptiveAvgPool2d(1), (args[0],))
            return True
        if t == "OnnxBinaryMathOperation" and getattr(m, "math_op_function", None) is torch.mul and len(args) == 2:
            for x_node, s_node in (args, args[::-1]):  # x * sigmoid(x) is SiLU (an activation: relevance passes)
                if isinstance(s_node, fx.Node) and s_node.op == "call_module" and len(s_node.users) == 1 and \
                        isinstance(getattr(root, str(s_node.target), None), nn.Sigmoid) and s_node.args == (x_node,):
                    replace(node, nn.SiLU(), (x_node,))
                    erase(s_node)
                    return True
            return False
        if t == "OnnxCopyIdentity" and len(args) == 1:
            node.replace_all_uses_with(args[0])
            erase(node)
            return True
        return False

    for node in list(graph.nodes):
        if node.op != "call_module" or node in consts or node in erased:
            continue
        m = modules[node.target]
        if not rewrite(node, m, _type_name(m), node.args):
            key = node.name
            add(key, m)
            node.target = key
    # 4. BatchNorm placement: right after the conv/linear feeding it alone, else behind an Identity
    linear_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    for node in list(graph.nodes):
        if node.op != "call_module" or \
                not isinstance(getattr(root, node.target, None), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        feeds_alone = isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 and \
            isinstance(getattr(root, src.target, None), linear_types)
        if feeds_alone:
            src.append(node)
        else:
            key = f"{node.name}_input"
            add(key, nn.Identity())
            with graph.inserting_before(node):
                sep = graph.call_module(key, (src,))
            node.args = (sep, *node.args[1:])
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.op == "get_attr" and not hasattr(root, node.target):
            v = _attr(gm, node.target)
            key = f"const_{len(const_names)}"
            for owner in (root, gm):
                owner.register_buffer(key, v.detach().clone().contiguous(),
                                      persistent=v.is_floating_point() and v.numel() >= STRIP_MIN_ELEMENTS)
            const_names[node] = key
            node.target = key
    graph.lint()
    out = OnnxGraphModule(root, graph, class_name="OnnxModel").eval()
    for p in out.parameters():
        p.data = p.data.contiguous()
    if expected is not None:
        with torch.no_grad():
            got = out(sample)
        tol = CANON_TOLERANCE * max(1.0, float(expected.abs().max()))
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=tol):
            raise WeightsError(f"{name}: the canonized model's outputs differ from the converted graph's "
                               "(an xaicomp bug; please report it with the model)")
    return out


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def default_class_names(n: int) -> list[str]:
    """``["0", "1", ...]``: an ONNX graph does not name its classes."""
    return [str(i) for i in range(n)]


def read_onnx_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an ONNX file (size-limited, regular files only)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise WeightsError(f"ONNX file {p} does not exist")
    if not p.is_file():
        raise WeightsError(f"{p} is not a file")
    size = p.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{p.name} is {size / 2**20:.0f} MiB, over the {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB limit")
    return p.read_bytes()


def load_onnx_model(source: str | os.PathLike | bytes, name: str | None = None, spec: InputSpec | None = None,
                    sidecar: bool = True) -> nn.Module:
    """An ONNX model as a canonized torch module in eval mode, with its :class:`ModelInfo` attached.

    Parameters
    ----------
    source : path or bytes
        The ``.onnx`` file (or its bytes, e.g. an upload).
    name : str, optional
        File name for messages and the model's display name (default: the path's name).
    spec : InputSpec, optional
        Declared preprocessing and class names (fields left None: the sidecar's, then the defaults: the graph's
        input size and channels, pixels scaled to [0, 1], no mean/std, classes ``0 .. K-1``).
    sidecar : bool
        Read ``model.onnx.json`` / ``model.json`` next to a path.
    """
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), name or "model.onnx"
        side = None
    else:
        data, label = read_onnx_bytes(source), name or pathlib.Path(source).name
        side = read_sidecar(source) if sidecar else None
    declared = (spec or InputSpec()).merged(side)
    conv = convert_onnx(data, label, declared.input_size)
    pre = declared.preprocessing(conv.channels, conv.input_size)
    if declared.input_size is not None and conv.input_size != declared.input_size:
        raise WeightsError(f"{label} takes {conv.input_size[0]}x{conv.input_size[1]} inputs, not the declared "
                           f"{declared.input_size[0]}x{declared.input_size[1]}")
    names = list(declared.class_names) if declared.class_names else default_class_names(conv.num_classes)
    if len(names) != conv.num_classes:
        raise WeightsError(f"{len(names)} class names ({declared.source}) for a model with {conv.num_classes} outputs")
    card = {"onnx": {"file": label, "sha256": hashlib.sha256(data).hexdigest(), "notes": conv.notes,
                     "declared": declared.to_dict(), "declared_in": declared.source if not declared.empty else None,
                     "input": declared.describe(pre)}}
    if not isinstance(source, (bytes, bytearray)):
        card["onnx"]["path"] = os.fspath(source)
    model = conv.model
    model.xaicomp_onnx = data  # type: ignore[assignment]  (the graph, for packed files)
    stem = label[:-len(ONNX_SUFFIX)] if label.lower().endswith(ONNX_SUFFIX) else label
    return attach_info(model, ModelInfo(f"{stem} (ONNX)", ONNX_ARCH, names, pre, "onnx", card))


def input_statement(info: ModelInfo) -> str | None:
    """The line stating how images become the model's inputs: for an ONNX or Python model the declared (or default)
    policy, for a torchvision or weights-file model its preprocessing; None for a built-in model (its card says)."""
    card = info.card if isinstance(info.card, dict) else {}
    own = card.get("onnx") or card.get("python")
    if own:
        notes = "; ".join(own.get("notes") or [])
        return f"{info.name}: {info.num_classes} classes; {own['input']}" + (f"; {notes}" if notes else "")
    if info.source in ("builtin", "packed file"):
        return None
    pre = info.preprocessing
    fmt = lambda vs: ",".join(f"{v:g}" for v in vs)  # noqa: E731
    return (f"{info.name}: {info.num_classes} classes; images resized to {pre.input_size[0]}x{pre.input_size[1]} "
            f"(bilinear, aspect ratio not kept, no crop), {'RGB' if pre.channels == 3 else 'grey'}, pixels scaled "
            f"to [0, 1], mean {fmt(pre.mean)}, std {fmt(pre.std)}")


# ----------------------------------------------------------------------------------------------------------------
# the graph in packed files
# ----------------------------------------------------------------------------------------------------------------
def _strip(data: bytes, min_elements: int | None) -> tuple[bytes, list[dict[str, Any]]]:
    onnx = _require_onnx()
    proto = onnx.load_from_string(data)
    stripped: list[dict[str, Any]] = []
    if min_elements is not None:
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
        for t in proto.graph.initializer:
            n = math.prod(t.dims)
            if t.data_type in floats and n >= min_elements:
                stripped.append({"name": t.name, "dims": [int(d) for d in t.dims], "data_type": int(t.data_type)})
                t.ClearField("raw_data")
                for fld in ("float_data", "double_data", "int32_data"):
                    t.ClearField(fld)
    return proto.SerializeToString(), stripped


def _fill(graph: bytes, stripped: list[dict[str, Any]], value: float) -> bytes:
    onnx = _require_onnx()
    import numpy as np
    from onnx import numpy_helper

    proto = onnx.load_from_string(graph)
    by_name = {t.name: t for t in proto.graph.initializer}
    dtypes = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
              onnx.TensorProto.FLOAT16: np.float16}
    for s in stripped:
        t = by_name.get(s["name"])
        if t is None or s["data_type"] not in dtypes:
            raise WeightsError(f"the stored graph has no float initializer {s['name']!r}")
        arr = np.full(tuple(s["dims"]), value, dtype=dtypes[s["data_type"]])
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return proto.SerializeToString()


def _rebuild(graph: bytes, info: ModelInfo, state: dict[str, torch.Tensor], label: str) -> nn.Module:
    size = info.preprocessing.input_size
    model = convert_onnx(graph, label, (int(size[0]), int(size[1])), check=False).model
    load_state_dict_checked(model, state, label)
    return model


def architecture_record(model: nn.Module) -> dict[str, Any] | None:
    """What a packed file stores to rebuild an ONNX model (None for other models): its graph, zlib-compressed and
    base64-encoded, without the float initializers of :data:`STRIP_MIN_ELEMENTS` or more elements (their values come
    back from the payload). Checked here: the graph rebuilt with those initializers filled with NaN and the model's
    state dict loaded gives the model's outputs; otherwise fewer (or no) initializers are left out."""
    data = getattr(model, "xaicomp_onnx", None)
    info = getattr(model, "xaicomp_info", None)
    if not isinstance(data, bytes) or not isinstance(info, ModelInfo):
        return None
    pre = info.preprocessing
    x = _sample((pre.channels, *pre.input_size))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model.eval()(x)
    for min_el in (STRIP_MIN_ELEMENTS, 4096, None):
        graph, stripped = _strip(data, min_el)
        try:
            rebuilt = _rebuild(_fill(graph, stripped, float("nan")), info, state, "stored graph")
            with torch.no_grad():
                got = rebuilt(x)
        except WeightsError:
            continue
        if got.shape == want.shape and torch.equal(got, want):
            packed = zlib.compress(graph, 9)
            return {"format": RECORD_FORMAT, "graph": base64.b64encode(packed).decode("ascii"),
                    "graph_bytes": len(graph), "graph_sha256": hashlib.sha256(graph).hexdigest(),
                    "stripped": stripped, "source_sha256": hashlib.sha256(data).hexdigest()}
    raise WeightsError("the ONNX graph cannot be stored so that it rebuilds this model exactly")


def _check_record(rec: Any, most_elements: int = MAX_STRIPPED_ELEMENTS) -> tuple[bytes, list[dict[str, Any]]]:
    """The graph bytes and stripped list of an untrusted architecture record, validated; the stripped weights may
    hold at most ``most_elements`` values in all (they stand for the weights the payload holds)."""
    from xaicomp_core.errors import FormatError

    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        raise FormatError("the file's architecture record is missing or of an unknown format")
    blob, n, digest, stripped = (rec.get(k) for k in ("graph", "graph_bytes", "graph_sha256", "stripped"))
    if not (isinstance(blob, str) and isinstance(n, int) and not isinstance(n, bool) and isinstance(digest, str)
            and isinstance(stripped, list)):
        raise FormatError("the file's architecture record is malformed")
    if not 0 < n <= MAX_RECORD_GRAPH_BYTES:
        raise FormatError(f"the file's stored graph claims {n} bytes (at most {MAX_RECORD_GRAPH_BYTES} allowed)")
    try:
        packed = base64.b64decode(blob.encode("ascii"), validate=True)
        d = zlib.decompressobj()
        graph = d.decompress(packed, n + 1)
    except (ValueError, zlib.error, UnicodeEncodeError):
        raise FormatError("the file's stored graph is not valid (base64/zlib)") from None
    if len(graph) != n or hashlib.sha256(graph).hexdigest() != digest:
        raise FormatError("the file's stored graph does not match its checksum")
    total = 0
    for s in stripped:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("dims"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**31 for d in s["dims"])
                and isinstance(s.get("data_type"), int) and not isinstance(s.get("data_type"), bool)):
            raise FormatError("the file's stored graph lists a malformed weight")
        total += math.prod(s["dims"])
        if total > min(most_elements, MAX_STRIPPED_ELEMENTS):
            raise FormatError("the file's stored graph lists more weights than a packed file may hold")
    return graph, stripped


def model_from_record(rec: Any, info: ModelInfo, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild an ONNX model from a packed file's (untrusted) architecture record and its decoded tensors.

    Raises
    ------
    FormatError
        For a malformed record.
    WeightsError
        If the graph cannot be converted or the tensors do not fit it.
    """
    # the left-out weights stand for the payload's tensors: never more values than those (plus a little slack)
    floats = sum(v.numel() for v in state.values() if v.is_floating_point())
    graph, stripped = _check_record(rec, floats + 2**20)
    model = _rebuild(_fill(graph, stripped, 0.0), info, state, "packed file")
    model.xaicomp_onnx = None  # type: ignore[assignment]
    return model


def model_from_onnx_file(source: str | os.PathLike | bytes, info: ModelInfo,
                         state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a packed file's model from the original ONNX file given by the user (instead of the stored graph)."""
    data = source if isinstance(source, bytes) else read_onnx_bytes(source)
    return _rebuild(data, info, state, "packed file")


__all__ = [
    "ONNX_ARCH", "Converted", "InputSpec", "OnnxGraphModule", "architecture_record", "canonize_graph",
    "convert_onnx", "default_class_names", "input_statement", "is_onnx_name", "load_onnx_model",
    "model_from_onnx_file", "model_from_record", "parse_class_names", "parse_floats", "parse_size", "read_sidecar",
    "sidecar_path", "unsupported_operators",
]



def _accepts(arch: Any, weights: Any, weights_name: Any) -> bool:
    if isinstance(weights, (bytes, bytearray)):
        return is_onnx_name(weights_name) or str(arch) == ONNX_ARCH
    if weights is None:
        return is_onnx_name(arch)
    return str(arch) == ONNX_ARCH


def _load(arch: Any, weights: Any, weights_name: Any, declared: Any) -> nn.Module:
    if isinstance(weights, (bytes, bytearray)):
        return load_onnx_model(bytes(weights), weights_name or "model.onnx", declared)
    return load_onnx_model(arch if weights is None else weights, None, declared)


MODEL_LOADERS.append((_accepts, _load))
