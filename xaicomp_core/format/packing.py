"""The packed file format (``.xcz``): write and read a compressed model whose payload is exactly the size the
engine estimates (:mod:`xaicomp_core.format.size`).

A file is a 20-byte preamble, a UTF-8 JSON header and the payload::

    magic (8 bytes, b"\\x89XCZ\\r\\n\\x1a\\n") | format version (uint32 LE) | header length (uint32 LE)
    | CRC-32 of the header (uint32 LE) | header (JSON) | payload (optionally zlib- or lzma-compressed)

The payload holds every floating-point state-dict entry in state-dict order. A conv/linear weight that the plan
compresses is stored as four sections, each padded to whole bytes: which weights are kept (``keep``), the bit class
of each kept weight or channel (``classes``), one float32 scale per (output channel, quantized class) group holding
kept weights (``scales``), and the kept weights' codes at their bit widths (``values``). Every other tensor is raw
float32, or one float32 when all its elements are equal (kind ``constant``, format version 3). Bit streams are
LSB-first: bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``, and a ``w``-bit
integer occupies stream bits ``o .. o + w - 1`` with its least significant bit first. ``docs/FORMAT.md`` is the full
specification.

This module holds the file layout, the header and the payload; each section is written and read by its codec in
:mod:`xaicomp_core.format.codecs` (the same objects the size accounting asks for the section's cost), the bit streams
and the Rice code are in :mod:`xaicomp_core.format.bitstream` (re-exported here).

The reader rebuilds the dequantized weights exactly as :func:`xaicomp_core.compress.quantize.dequantize_codes` computes
them, so the reloaded weights equal the session's compressed weights bit for bit (a quantized zero may come back as
+0.0 where the quantizer produced -0.0) and the reloaded model's logits are identical.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import pathlib
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaicomp_core.compress.layout import LayerLayout
from xaicomp_core.errors import FormatError, PlanError, XaicompError
from xaicomp_core.format.bitstream import (  # noqa: F401  (public: the bit streams and the Rice code)
    pack_bits,
    pack_mask,
    rice_decode,
    rice_encode,
    unpack_bits,
    unpack_mask,
)
from xaicomp_core.format.codecs import (
    CLASS_LAYOUTS,
    KEEP_CODECS,
    SCALES,
    VALUE_CODECS,
    class_layout,
    keep_codec,
    scale_groups,
    value_codec,
)
from xaicomp_core.format.codecs import nonnegative as _nonneg
from xaicomp_core.format.codecs import require as _req
from xaicomp_core.format.size import SizeBreakdown, compute_size, is_float_entry, stored_masks
from xaicomp_core.plan import FP32, CompressionPlan
from xaicomp_core.registry import RegistryView

if TYPE_CHECKING:
    from xaicomp_core.evaluate.session import CompressedWeights
    from xaicomp_core.io.models import ModelInfo

MAGIC = b"\x89XCZ\r\n\x1a\n"
#: the newest version this writer writes and this reader reads (1: fixed-width values only; 2: adds the ``huffman``
#: value encoding, the tensor field ``values``; 3: adds the tensor kind ``constant``). A file is written with the
#: lowest version that holds it: 3 only when it has a constant tensor.
FORMAT_VERSION = 3
FORMAT_NAME = "xaicomp-packed"
PREAMBLE = struct.Struct("<8sIII")
PREAMBLE_BYTES = PREAMBLE.size  # 20
CODECS = ("none", "zlib", "lzma")
#: the keep encodings by name, live ("dense", "bitmask", ..., "rice-pruned", then any a plugin registers)
KEEP_ENCODINGS = RegistryView(KEEP_CODECS, lambda codec: codec)
# Limits of the reader (a file is untrusted: every allocation is bounded by these and by the file's own size; README
# "Limits and safety" lists them).
#: A packed file read from disk.
MAX_FILE_BYTES = 2**30
#: The JSON header (a real one is a few kB to a few hundred kB).
MAX_HEADER_BYTES = 16 * 2**20
#: The decoded payload, and how far a zlib/lzma payload may expand: at most ``MAX_PAYLOAD_RATIO`` times its stored
#: size (or ``MIN_PAYLOAD_ALLOWANCE``), checked before decompressing.
MAX_PAYLOAD_BYTES = 2**30
MAX_PAYLOAD_RATIO = 64
MIN_PAYLOAD_ALLOWANCE = 2**20
#: One tensor, all tensors together, tensor entries, dimensions of one shape, elements of the omitted integer entries.
MAX_ELEMENTS = 2**28
MAX_TOTAL_ELEMENTS = 2**28
MAX_TENSORS = 10_000
MAX_DIMS = 8
MAX_OMITTED_ELEMENTS = 2**16
#: Elements of the constant entries (each one float32 in the payload, however many elements it declares).
MAX_CONSTANT_ELEMENTS = 2**24
#: For an architecture this installation cannot build (whose shapes cannot be checked): elements per byte of file.
MAX_ELEMENTS_PER_FILE_BYTE = 1024
#: Classes, and characters of a name (tensor, class, model, architecture).
MAX_CLASSES = 100_000
MAX_NAME_CHARS = 256
SECTION_KEYS = ("keep_bytes", "class_bytes", "scale_bytes", "value_bytes")
SUFFIX = ".xcz"


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PackResult:
    """A packed file in memory.

    Attributes
    ----------
    data : bytes
        The whole file.
    header : dict
        The JSON header.
    header_bytes : int
        Preamble (20 bytes) plus JSON header: what the file adds to the payload.
    payload_bytes : int
        The payload before entropy coding (equals the engine's ``estimated_bytes``).
    stored_payload_bytes : int
        The payload as stored (``payload_bytes`` unless a codec is used).
    codec : str
        ``"none"``, ``"zlib"`` or ``"lzma"``.
    seconds : float
        Time spent packing.
    """

    data: bytes
    header: dict[str, Any]
    header_bytes: int
    payload_bytes: int
    stored_payload_bytes: int
    codec: str
    seconds: float = 0.0

    @property
    def file_bytes(self) -> int:
        """Size of the file on disk."""
        return len(self.data)

    @property
    def estimated_bytes(self) -> int:
        """The engine's estimate recorded at packing time."""
        return int(self.header["estimated_bytes"])

    def write(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the file atomically (:func:`xaicomp_core.io.atomic.atomic_write`: an existing file is replaced
        whole or left as it was); returns the path."""
        from xaicomp_core.io.atomic import atomic_write

        path = pathlib.Path(path)
        atomic_write(path, self.data, "packed file")
        return path

    def summary(self) -> dict[str, Any]:
        """Sizes as a JSON-serialisable dict."""
        return {"file_bytes": self.file_bytes, "header_bytes": self.header_bytes,
                "payload_bytes": self.payload_bytes, "stored_payload_bytes": self.stored_payload_bytes,
                "estimated_bytes": self.estimated_bytes, "fp32_bytes": int(self.header["fp32_bytes"]),
                "codec": self.codec, "pack_seconds": self.seconds}


@dataclass
class PackedModel:
    """A packed file read back: the header, the decoded tensors and the decoded compression structure.

    Attributes
    ----------
    header : dict
        The JSON header.
    state : dict of str to Tensor
        Every state-dict entry: float32 tensors (dequantized weights, raw tensors) and the integer entries, set to 0.
    layout : LayerLayout
        The conv/linear weights (protected ones marked).
    keep, klass, codes : Tensor
        Flat keep-mask, class index (-1 = none) and stored code per conv/linear weight, as in the engine.
    values : Tensor
        Flat float32 weights (dequantized; raw for protected layers).
    group_count : Tensor
        Kept weights per (global channel, class).
    file_bytes, header_bytes, payload_bytes, stored_payload_bytes : int
        Sizes, see :class:`PackResult`.
    """

    header: dict[str, Any]
    state: dict[str, torch.Tensor]
    layout: LayerLayout
    keep: torch.Tensor
    klass: torch.Tensor
    codes: torch.Tensor
    values: torch.Tensor
    group_count: torch.Tensor
    file_bytes: int
    header_bytes: int
    payload_bytes: int
    stored_payload_bytes: int
    seconds: float = 0.0
    _plan: CompressionPlan | None = field(default=None, repr=False)

    @property
    def codec(self) -> str:
        """Entropy codec of the payload."""
        return str(self.header["payload"]["codec"])

    @property
    def levels(self) -> list[int]:
        """Bit widths of the classes (32 = fp32)."""
        return [int(b) for b in self.header["levels"]]

    @property
    def plan(self) -> CompressionPlan:
        """The plan the file was made with."""
        if self._plan is None:
            try:
                self._plan = CompressionPlan.from_dict(dict(self.header["plan"]))
            except PlanError as e:
                raise FormatError(f"the file's plan is unreadable: {e}") from None
        return self._plan

    @property
    def info(self) -> ModelInfo:
        """The model's :class:`~xaicomp_core.io.models.ModelInfo` (name, arch, classes, preprocessing)."""
        from xaicomp_core.io.data import Preprocessing
        from xaicomp_core.io.models import ModelInfo

        m = check_model_entry(self.header)
        pre = Preprocessing.from_dict(m["preprocessing"])
        return ModelInfo(m["name"], m["arch"], list(m["class_names"]), pre, "packed file")

    def size(self) -> SizeBreakdown:
        """The engine's size accounting of the decoded contents as they are stored (recomputed, not read from the
        header; the masks are the stored ones, so no zero codes are moved into them again)."""
        plan_gran = str(self.header["granularity"])
        return compute_size(self.layout, self.keep, self.klass, self.group_count, self.levels, plan_gran, self.state,
                            codes=self.codes, zeros_as_pruned=False)

    def weights(self) -> dict[str, torch.Tensor]:
        """Dequantized conv/linear weights by name."""
        return self.layout.split(self.values)

    def build_model(self, model_file: str | pathlib.Path | bytes | None = None) -> nn.Module:
        """Rebuild the architecture named in the header and load the decoded state dict (no pickle involved).

        An ONNX model is rebuilt from the graph stored in the header (or from ``model_file``, its ``.onnx`` file); a
        model defined in Python only from ``model_file`` = ``FILE.py:FACTORY`` (see :mod:`xaicomp_core.io.rebuild`).

        Raises
        ------
        WeightsError
            If the architecture is unknown to this installation or the tensors do not fit it.
        """
        from xaicomp_core.io.models import attach_info, build_arch, load_state_dict_checked
        from xaicomp_core.io.rebuild import needs_rebuild, rebuild_model

        info = self.info
        if model_file is not None or needs_rebuild(info):
            model = rebuild_model(info, self.state, self.header.get("architecture"), model_file)
        else:
            model = build_arch(info.arch, info.num_classes)
            load_state_dict_checked(model, self.state, "packed file")
        for p in model.parameters():
            p.requires_grad_(False)
        return attach_info(model, info)


# ----------------------------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_payload(payload: bytes, codec: str) -> bytes:
    """Entropy-code a payload with ``codec`` (zlib level 9, or xz/lzma preset 9; ``"none"`` returns it as is)."""
    if codec == "none":
        return payload
    if codec == "zlib":
        return zlib.compress(payload, 9)
    if codec == "lzma":
        return lzma.compress(payload, format=lzma.FORMAT_XZ, preset=9)
    raise XaicompError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def decode_payload(stored: bytes, codec: str, size: int) -> bytes:
    """Inverse of :func:`encode_payload`, reading at most ``size + 1`` bytes (a corrupt stream raises FormatError)."""
    try:
        if codec == "none":
            return stored
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(stored, size + 1)
            if not d.eof or d.unused_data:
                raise FormatError("the zlib payload is truncated or has trailing data")
            return out
        if codec == "lzma":
            dl = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = dl.decompress(stored, max_length=size + 1)
            if not dl.eof or dl.unused_data:
                raise FormatError("the lzma payload is truncated or has trailing data")
            return out
    except (zlib.error, lzma.LZMAError) as e:
        raise FormatError(f"the {codec} payload is corrupt ({e})") from None
    raise FormatError(f"unknown payload codec {codec!r}")


def _f32_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def _compressed_sections(i: int, layout: LayerLayout, keep: np.ndarray, klass: np.ndarray, codes: np.ndarray,
                         values: np.ndarray, scales: np.ndarray, group_count: np.ndarray, levels: list[int],
                         granularity: str, encoding: str, keep_param: int = 0,
                         value_encoding: str = "fixed") -> tuple[list[bytes], dict[str, Any]]:
    """The four sections of compressed layer ``i`` and its header fields, each written by its codec
    (:mod:`xaicomp_core.format.codecs`)."""
    name = layout.names[i]
    sl = layout.layer_slice(i)
    n, c = layout.sizes[i], layout.channels[i]
    per = n // c
    k = keep[sl]
    idx = np.flatnonzero(k)
    kept = len(idx)
    n_lv = len(levels)
    if encoding not in KEEP_CODECS:
        raise RuntimeError(f"unknown keep encoding {encoding!r}")
    try:
        keep_sec, extra = keep_codec(encoding).encode(k, c, keep_param)
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e}") from None

    kc = klass[sl][idx].astype(np.int64)
    if kept and (int(kc.min()) < 0 or int(kc.max()) >= n_lv):
        raise RuntimeError(f"{name}: kept weight without a bit class")
    class_sec, more = class_layout(granularity).encode(kc, idx // per, c, n_lv, name)

    rows = slice(layout.channel_offsets[i], layout.channel_offsets[i + 1])
    scale_sec = SCALES.encode(scales[rows], scale_groups(group_count[rows], levels))
    value_sec = value_codec(value_encoding).encode(codes[sl][idx], values[sl][idx], kc, levels)
    # header field order as in format version 1: kept, then layer_class, then rice_k; then (version 2) values
    fields: dict[str, Any] = {"kept": kept, **more, **extra}
    if value_encoding != "fixed":
        fields["values"] = value_encoding
    return [keep_sec, class_sec, scale_sec, value_sec], fields


def pack(compressed: CompressedWeights, state: dict[str, torch.Tensor], info: ModelInfo, *, codec: str = "none",
         extra: dict[str, Any] | None = None) -> PackResult:
    """Pack a plan's result into the ``.xcz`` format (in memory).

    Parameters
    ----------
    compressed : CompressedWeights
        ``session.compress(plan)``: layout, keep-mask, quantized codes and scales, size breakdown.
    state : dict of str to Tensor
        The original model's state dict (raw tensors and protected layers are taken from it; the plan's
        ``overrides`` replace entries, e.g. the zeroed biases of removed filters).
    info : ModelInfo
        Name, architecture id, class names and preprocessing, stored in the header.
    codec : {"none", "zlib", "lzma"}
        Optional lossless entropy coding of the payload.
    extra : dict, optional
        More JSON-serialisable header fields (e.g. ``{"evaluation": {...}}``).

    Returns
    -------
    PackResult
        ``payload_bytes`` equals ``compressed.size.estimated_bytes`` byte for byte.

    Raises
    ------
    RuntimeError
        If the engine's size accounting and the sections written disagree (a bug, never a user error).
    """
    t0 = time.perf_counter()
    if codec not in CODECS:
        raise XaicompError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    cw = compressed
    state = {**state, **getattr(cw, "overrides", {})}  # zeroed bias / BatchNorm of removed filters
    layout: LayerLayout = cw.layout
    plan: CompressionPlan = cw.plan
    q = cw.quant
    levels = [int(b) for b in q.levels]
    # the masks as stored: zero codes of the tensors whose size row says so are stored as pruned
    keep_t, klass_t, gc_t = stored_masks(layout, cw.keep, q.klass, q.codes, levels, cw.size, q.group_count)
    keep = keep_t.numpy().astype(bool)
    klass = klass_t.numpy()
    codes = q.codes.numpy()
    values = q.values.numpy()
    scales = q.scales.numpy()
    group_count = gc_t.numpy()
    index = {name: i for i, name in enumerate(layout.names)}
    rows = {t.name: t for t in cw.size.tensors}

    chunks: list[bytes] = []
    entries: list[dict[str, Any]] = []
    for name, value in state.items():
        if not is_float_entry(value):
            # integer counters (BatchNorm's num_batches_tracked) are not stored; readers set them to 0
            entries.append({"name": name, "shape": list(value.shape), "kind": "omitted",
                            "dtype": str(value.dtype).removeprefix("torch.")})
            continue
        row = rows.get(name)
        if row is None:
            raise RuntimeError(f"the size breakdown has no row for {name}")
        entry: dict[str, Any] = {"name": name, "shape": list(value.shape), "kind": row.kind}
        i = index.get(name)
        if row.kind == "constant":
            data = _f32_bytes(value.reshape(-1)[:1])
            if len(data) != row.raw_bytes:
                raise RuntimeError(f"{name}: {len(data)} constant bytes written, {row.raw_bytes} estimated")
            chunks.append(data)
        elif row.kind == "raw":
            # a protected layer's weights come from the plan's values (equal to the original unless fine-tuned)
            data = _f32_bytes(value if i is None else q.values[layout.layer_slice(i)])
            if len(data) != row.raw_bytes:
                raise RuntimeError(f"{name}: {len(data)} raw bytes written, {row.raw_bytes} estimated")
            if i is not None:
                entry["protected"] = True
            chunks.append(data)
        else:
            if i is None:
                raise RuntimeError(f"{name} is compressed but not a conv/linear weight")
            secs, more = _compressed_sections(i, layout, keep, klass, codes, values, scales, group_count, levels,
                                              plan.granularity, row.keep_encoding, row.keep_param,
                                              row.value_encoding)
            expected = [getattr(row, k) for k in SECTION_KEYS]
            got = [len(s) for s in secs]
            if got != expected:
                raise RuntimeError(f"{name}: sections of {got} bytes written, {expected} estimated")
            entry.update({"keep": row.keep_encoding, "kept": more.pop("kept"), **dict(zip(SECTION_KEYS, got)),
                          **more})
            chunks.extend(secs)
        entries.append(entry)
    payload = b"".join(chunks)
    if len(payload) != cw.size.estimated_bytes:
        raise RuntimeError(f"payload of {len(payload)} bytes, {cw.size.estimated_bytes} estimated")
    stored = encode_payload(payload, codec)
    from xaicomp_core.version import __version__

    version = 3 if any(e["kind"] == "constant" for e in entries) else 2
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": version,
        "writer": f"xaicomp {__version__}",
        "bit_order": "lsb-first",
        "byte_order": "little",
        "model": info.to_dict() | {"num_classes": info.num_classes},
        "plan": plan.to_dict(),
        "levels": levels,
        "granularity": plan.granularity,
        "payload": {"codec": codec, "bytes": len(payload), "sha256": _sha256(payload),
                    "stored_bytes": len(stored), "stored_sha256": _sha256(stored)},
        "estimated_bytes": cw.size.estimated_bytes,
        "fp32_bytes": cw.size.fp32_bytes,
        "tensors": entries,
    }
    if extra:
        clash = set(extra) & set(header)
        if clash:
            raise ValueError(f"extra header fields clash with format fields: {sorted(clash)}")
        header.update(extra)
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    pre = PREAMBLE.pack(MAGIC, version, len(hbytes), zlib.crc32(hbytes))
    data = pre + hbytes + stored
    return PackResult(data, header, len(pre) + len(hbytes), len(payload), len(stored), codec,
                      time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------------------------
def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Check the preamble and header CRC of a packed file; return the header and the header size in bytes.

    Raises
    ------
    FormatError
        Not a packed file, a newer format version, a truncated file or an altered header.
    """
    if not data:
        raise FormatError("the file is empty")
    if len(data) < PREAMBLE_BYTES:
        if data[:len(MAGIC)] != MAGIC[:len(data)]:
            raise FormatError("not an xaicomp packed file (wrong magic bytes)")
        raise FormatError(f"the file is truncated: {len(data)} bytes, shorter than the {PREAMBLE_BYTES}-byte preamble")
    magic, version, hlen, crc = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not an xaicomp packed file (wrong magic bytes)")
    if version > FORMAT_VERSION:
        raise FormatError(f"packed format version {version} is newer than this xaicomp reads ({FORMAT_VERSION}); "
                          "upgrade xaicomp")
    if version < 1:
        raise FormatError(f"invalid packed format version {version}")
    if hlen > MAX_HEADER_BYTES:
        raise FormatError(f"the header claims {hlen} bytes, more than the {MAX_HEADER_BYTES} allowed (corrupt file)")
    end = PREAMBLE_BYTES + hlen
    if len(data) < end:
        raise FormatError(f"the file is truncated inside its header ({len(data)} of at least {end} bytes)")
    hbytes = data[PREAMBLE_BYTES:end]
    if zlib.crc32(hbytes) != crc:
        raise FormatError("the header checksum does not match: the file was altered or damaged")
    try:
        header = json.loads(hbytes.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, NaN/Infinity, integers of >4300 digits
        raise FormatError(f"the header is not valid JSON ({_first_line(e)})") from None
    except RecursionError:
        raise FormatError("the header is nested too deeply") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FormatError("the header does not describe an xaicomp packed file")
    if header.get("format_version") != version:
        raise FormatError("the header's format version disagrees with the preamble")
    return header, end


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else e.__class__.__name__


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a packed file may hold")


def _name(v: Any, what: str) -> str:
    """A short printable string field of the header."""
    if not isinstance(v, str) or not v or len(v) > MAX_NAME_CHARS or not v.isprintable():
        shown = ascii(v)[:60] if isinstance(v, str) else type(v).__name__
        raise FormatError(f"invalid {what} {shown} in the header (1..{MAX_NAME_CHARS} printable characters)")
    return v


def check_model_entry(header: dict[str, Any]) -> dict[str, Any]:
    """The header's ``model`` object, strictly typed: name and architecture, 1..:data:`MAX_CLASSES` class names,
    the number of classes, and a valid preprocessing (bounded input size)."""
    from xaicomp_core.errors import DataError
    from xaicomp_core.io.data import Preprocessing

    m = _req(header, "model", dict, "")
    _name(_req(m, "name", str, "model."), "model name")
    _name(_req(m, "arch", str, "model."), "architecture")
    names = _req(m, "class_names", list, "model.")
    if not 1 <= len(names) <= MAX_CLASSES:
        raise FormatError(f"the header names {len(names)} classes; 1..{MAX_CLASSES} are allowed")
    for c in names:
        if not isinstance(c, str) or len(c) > MAX_NAME_CHARS:
            raise FormatError(f"invalid class name in the header (strings of at most {MAX_NAME_CHARS} characters)")
    if "num_classes" in m and _req(m, "num_classes", int, "model.") != len(names):
        raise FormatError("the header's number of classes disagrees with its class names")
    try:
        Preprocessing.from_dict(m.get("preprocessing"))  # type: ignore[arg-type]
    except DataError as e:
        raise FormatError(f"the file's preprocessing is unreadable ({e})") from None
    return m


def _arch_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the state dict of ``arch`` with ``num_classes`` outputs, built on PyTorch's meta device
    (nothing allocated); None if this installation cannot build ``arch``."""
    from xaicomp_core.io.models import build_arch

    try:
        with torch.device("meta"):
            model = build_arch(arch, num_classes)
    except XaicompError:
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_tensor_entries(tensors: list[Any], model: dict[str, Any], file_bytes: int) -> None:
    """Bound the tensors a header declares before anything is allocated: their count, names and shapes, elements in
    all, and -- for an architecture this installation builds -- exactly the architecture's names and shapes."""
    if len(tensors) > MAX_TENSORS:
        raise FormatError(f"the header lists {len(tensors)} tensors, more than the {MAX_TENSORS} allowed")
    total = omitted = constant = 0
    declared: dict[str, tuple[int, ...]] = {}
    for e in tensors:
        if not isinstance(e, dict):
            raise FormatError("a tensor entry of the header is not an object")
        name = _name(_req(e, "name", str, "tensor "), "tensor name")
        shape = _req(e, "shape", list, f"{name}: ")
        if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                             for d in shape):
            raise FormatError(f"{name}: invalid shape in the header")
        n = math.prod(shape)
        if n > MAX_ELEMENTS:
            raise FormatError(f"{name}: {n} elements is more than a packed tensor may hold ({MAX_ELEMENTS})")
        total += n
        if e.get("kind") == "omitted":
            omitted += n
        elif e.get("kind") == "constant":
            constant += n
        declared[name] = tuple(shape)
    if total > MAX_TOTAL_ELEMENTS:
        raise FormatError(f"the header declares {total} elements, more than the {MAX_TOTAL_ELEMENTS} allowed")
    if omitted > MAX_OMITTED_ELEMENTS:
        raise FormatError(f"the header declares {omitted} omitted integer elements, more than the "
                          f"{MAX_OMITTED_ELEMENTS} allowed")
    if constant > MAX_CONSTANT_ELEMENTS:
        raise FormatError(f"the header declares {constant} elements of constant tensors, more than the "
                          f"{MAX_CONSTANT_ELEMENTS} allowed")
    expected = _arch_shapes(str(model["arch"]), len(model["class_names"]))
    if expected is None:
        if total > MAX_ELEMENTS_PER_FILE_BYTE * file_bytes:
            raise FormatError(f"the header declares {total} elements for a {file_bytes}-byte file of an architecture "
                              f"this installation does not know (at most {MAX_ELEMENTS_PER_FILE_BYTE} per byte)")
        return
    if declared != expected:
        missing = [k for k in expected if k not in declared]
        extra = [k for k in declared if k not in expected]
        wrong = [k for k in declared if k in expected and declared[k] != expected[k]]
        parts = [f"{label}: {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}" for label, ks in
                 (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if ks]
        raise FormatError(f"the file's tensors do not fit the architecture {model['arch']} with "
                          f"{len(model['class_names'])} classes ({'; '.join(parts)})")


def _decode_compressed(e: dict[str, Any], buf: bytes, n: int, c: int, levels: list[int], granularity: str,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """keep, klass, codes and values of one compressed tensor (flat), and its kept weights per (channel, class).

    Each section is read and validated by its codec (:mod:`xaicomp_core.format.codecs`).
    """
    name = e["name"]
    n_lv = len(levels)
    per = n // c
    kept = _nonneg(_req(e, "kept", int, f"{name}: "), "kept count")
    if kept > n:
        raise FormatError(f"{name}: {kept} kept weights of {n}")
    enc = _req(e, "keep", str, f"{name}: ")
    sizes = [_nonneg(_req(e, k, int, f"{name}: "), k) for k in SECTION_KEYS]  # ``buf`` holds exactly their sum
    cuts = np.cumsum([0, *sizes])
    keep_sec, class_sec, scale_sec, value_sec = (buf[cuts[j]:cuts[j + 1]] for j in range(4))

    if enc not in KEEP_CODECS:
        raise FormatError(f"{name}: unknown keep encoding {enc!r}")
    keep = keep_codec(enc).decode(keep_sec, e, n, c, kept, name)
    idx = np.flatnonzero(keep)
    if len(idx) != kept:
        raise FormatError(f"{name}: the keep section marks {len(idx)} weights, the header says {kept}")

    ch = idx // per
    kc = class_layout(granularity).decode(class_sec, e, kept, c, ch, n_lv, name)
    if kept and int(kc.max()) >= n_lv:
        raise FormatError(f"{name}: a class id is out of range")

    counts = np.bincount(ch * n_lv + kc, minlength=c * n_lv).reshape(c, n_lv)
    scale_grid = SCALES.decode(scale_sec, scale_groups(counts, levels), name)
    venc = e.get("values", "fixed")
    if not isinstance(venc, str) or venc not in VALUE_CODECS:
        raise FormatError(f"{name}: unknown value encoding {ascii(venc)[:40]}")
    vals, codes = value_codec(venc).decode(value_sec, kc, levels, scale_grid[ch, kc], name)
    full_vals = np.zeros(n, dtype=np.float32)
    full_vals[idx] = vals
    full_codes = np.zeros(n, dtype=np.int32)
    full_codes[idx] = codes
    full_class = np.full(n, -1, dtype=np.int8)
    full_class[idx] = kc
    return keep, full_class, full_codes, full_vals, counts


def unpack(data: bytes) -> PackedModel:
    """Read a packed file from bytes: verify checksums and structure, decode every tensor.

    Raises
    ------
    FormatError
        For anything truncated, altered, inconsistent or of an unknown format version; never a silently wrong model.
    """
    t0 = time.perf_counter()
    data = bytes(data)
    header, start = read_header(data)
    try:
        return _unpack(data, header, start, t0)
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
        raise FormatError(f"the file's structure is inconsistent ({e.__class__.__name__}: {e})") from None


def _unpack(data: bytes, header: dict[str, Any], start: int, t0: float) -> PackedModel:
    model = check_model_entry(header)
    for key in ("estimated_bytes", "fp32_bytes"):
        _nonneg(_req(header, key, int, ""), key)
    p = _req(header, "payload", dict, "")
    codec = _req(p, "codec", str, "payload.")
    if codec not in CODECS:
        raise FormatError(f"unknown payload codec {ascii(codec)[:40]}")
    size = _nonneg(_req(p, "bytes", int, "payload."), "payload size")
    stored_size = _nonneg(_req(p, "stored_bytes", int, "payload."), "payload size")
    stored = data[start:]
    if len(stored) < stored_size:
        raise FormatError(f"the file is truncated: the payload has {len(stored)} of {stored_size} bytes")
    if len(stored) > stored_size:
        raise FormatError(f"the file has {len(stored) - stored_size} unexpected bytes after the payload")
    allowed = stored_size if codec == "none" else max(MAX_PAYLOAD_RATIO * stored_size, MIN_PAYLOAD_ALLOWANCE)
    if size > min(allowed, MAX_PAYLOAD_BYTES):
        raise FormatError(f"the header claims a {size}-byte payload from {stored_size} stored bytes ({codec}); more "
                          f"than this reader allows (refused before decompressing)")
    if _sha256(stored) != _req(p, "stored_sha256", str, "payload."):
        raise FormatError("the payload checksum does not match: the file was altered or damaged")
    payload = decode_payload(stored, codec, size)
    if len(payload) != size:
        raise FormatError(f"the payload decodes to {len(payload)} bytes, the header says {size}")
    if _sha256(payload) != _req(p, "sha256", str, "payload."):
        raise FormatError("the decoded payload checksum does not match: the file was altered or damaged")

    levels = _req(header, "levels", list, "")
    if not 1 <= len(levels) <= 8 or not all(isinstance(b, int) and not isinstance(b, bool) and
                                             (1 <= b <= 8 or b == FP32) for b in levels):
        raise FormatError(f"invalid bit levels {ascii(levels)[:80]} in the header")
    granularity = _req(header, "granularity", str, "")
    if granularity not in CLASS_LAYOUTS:
        raise FormatError(f"unknown granularity {ascii(granularity)[:40]} in the header")
    tensors = _req(header, "tensors", list, "")
    _check_tensor_entries(tensors, model, len(data))

    state: dict[str, torch.Tensor] = {}
    layer_names, layer_shapes, layer_protected = [], [], []
    parts: dict[str, tuple] = {}
    offset = 0
    for e in tensors:
        name = _req(e, "name", str, "tensor ")
        shape = _req(e, "shape", list, f"{name}: ")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"{name}: invalid shape {shape}")
        if name in state:
            raise FormatError(f"{name} appears twice in the header")
        n = math.prod(shape)
        if n > MAX_ELEMENTS:
            raise FormatError(f"{name}: {n} elements is more than a packed tensor may hold")
        kind = _req(e, "kind", str, f"{name}: ")
        if kind == "raw":
            nbytes = 4 * n
        elif kind == "constant":
            if header["format_version"] < 3:
                raise FormatError(f"{name}: a constant tensor in a version-{header['format_version']} file")
            if n < 2:
                raise FormatError(f"{name}: a constant tensor needs at least 2 elements, got {n}")
            nbytes = 4
        elif kind == "compressed":
            nbytes = sum(_nonneg(_req(e, k, int, f"{name}: "), k) for k in SECTION_KEYS)
        else:
            nbytes = 0
        if offset + nbytes > len(payload):
            raise FormatError(f"{name} runs past the end of the payload")
        buf = payload[offset:offset + nbytes]
        offset += nbytes
        if kind == "constant":
            state[name] = torch.from_numpy(np.frombuffer(buf, dtype="<f4").astype(np.float32)).repeat(n).reshape(shape)
        elif kind == "raw":
            state[name] = torch.from_numpy(np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(shape))
            if e.get("protected"):
                layer_names.append(name)
                layer_shapes.append(tuple(shape))
                layer_protected.append(True)
        elif kind == "compressed":
            if "values" in e and header["format_version"] < 2:
                raise FormatError(f"{name}: a value encoding in a version-1 file")
            if len(shape) < 2 or n == 0:
                raise FormatError(f"{name}: a compressed tensor needs an output-channel dimension, got {shape}")
            keep, klass, codes, vals, counts = _decode_compressed(e, buf, n, shape[0], levels, granularity)
            state[name] = torch.from_numpy(vals.reshape(shape))
            parts[name] = (keep, klass, codes, counts)
            layer_names.append(name)
            layer_shapes.append(tuple(shape))
            layer_protected.append(False)
        elif kind == "omitted":
            dtype = getattr(torch, str(e.get("dtype", "int64")), None)
            if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype == torch.bool:
                raise FormatError(f"{name}: an omitted entry must be an integer tensor")
            state[name] = torch.zeros(shape, dtype=dtype)
        else:
            raise FormatError(f"{name}: unknown tensor kind {kind!r}")
    if offset != len(payload):
        raise FormatError(f"the tensors cover {offset} bytes of a {len(payload)}-byte payload")
    if not layer_names:
        raise FormatError("the file holds no conv/linear weights")

    layout = LayerLayout(layer_names, layer_shapes, layer_protected)
    n_lv = len(levels)
    keep = torch.ones(layout.total, dtype=torch.bool)
    klass = torch.full((layout.total,), -1, dtype=torch.int8)
    codes = torch.zeros(layout.total, dtype=torch.int32)
    gc = torch.zeros(layout.total_channels, n_lv, dtype=torch.long)
    for i, name in enumerate(layout.names):
        sl = layout.layer_slice(i)
        if name in parts:
            k, kc, cd, counts = parts[name]
            keep[sl] = torch.from_numpy(k)
            klass[sl] = torch.from_numpy(kc)
            codes[sl] = torch.from_numpy(cd)
            gc[layout.channel_offsets[i]:layout.channel_offsets[i + 1]] = torch.from_numpy(counts)
    values = layout.flat(state).float()
    pm = PackedModel(header, state, layout, keep, klass, codes, values, gc, len(data), start, len(payload),
                     len(stored), time.perf_counter() - t0)
    _req(header, "model", dict, "")
    _ = pm.plan, pm.info  # parse now: a file whose plan or model description is unreadable fails here
    return pm


def read_packed(path: str | pathlib.Path) -> PackedModel:
    """Read a packed file from disk (see :func:`unpack`): only a regular file of at most :data:`MAX_FILE_BYTES`."""
    from xaicomp_core.io.safe import read_regular

    return unpack(read_regular(path, MAX_FILE_BYTES, "packed file", FormatError))


def load_packed_model(path: str | pathlib.Path | bytes) -> nn.Module:
    """The model stored in a packed file, rebuilt and ready to run (eval mode, ``xaicomp_info`` attached)."""
    pm = unpack(path) if isinstance(path, (bytes, bytearray)) else read_packed(path)
    return pm.build_model()
