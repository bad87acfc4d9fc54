"""The packed file format (``.xcz``): write and read a compressed model whose payload is exactly the size the
engine estimates (:mod:`xaicomp_core.format.size`).

A file is a 20-byte preamble, a UTF-8 JSON header and the payload::

    magic (8 bytes, b"\\x89XCZ\\r\\n\\x1a\\n") | format version (uint32 LE) | header length (uint32 LE)
    | CRC-32 of the header (uint32 LE) | header (JSON) | payload (optionally zlib- or lzma-compressed)

The payload holds every floating-point state-dict entry in state-dict order. A conv/linear weight that the plan
compresses is stored as four sections, each padded to whole bytes: which weights are kept (``keep``), the bit class
of each kept weight or channel (``classes``), one float32 scale per (output channel, quantized class) group holding
kept weights (``scales``), and the kept weights' codes at their bit widths (``values``). Every other tensor is raw
float32. Bit streams are LSB-first: bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``, and a ``w``-bit
integer occupies stream bits ``o .. o + w - 1`` with its least significant bit first. ``docs/FORMAT.md`` is the full
specification.

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
from xaicomp_core.compress.quantize import dequantize_codes
from xaicomp_core.errors import FormatError, PlanError, XaicompError
from xaicomp_core.format.size import SizeBreakdown, class_bits, compute_size, index_bits, is_float_entry
from xaicomp_core.plan import FP32, CompressionPlan

if TYPE_CHECKING:
    from xaicomp_core.evaluate.session import CompressedWeights
    from xaicomp_core.io.models import ModelInfo

MAGIC = b"\x89XCZ\r\n\x1a\n"
FORMAT_VERSION = 1
FORMAT_NAME = "xaicomp-packed"
PREAMBLE = struct.Struct("<8sIII")
PREAMBLE_BYTES = PREAMBLE.size  # 20
CODECS = ("none", "zlib", "lzma")
KEEP_ENCODINGS = ("dense", "bitmask", "indices", "pruned-indices", "channels", "rice", "rice-pruned")
MAX_HEADER_BYTES = 64 * 2**20
MAX_ELEMENTS = 2**31
SECTION_KEYS = ("keep_bytes", "class_bytes", "scale_bytes", "value_bytes")
SUFFIX = ".xcz"


# ----------------------------------------------------------------------------------------------------------------
# bit streams
# ----------------------------------------------------------------------------------------------------------------
def _widths(widths: np.ndarray | int, n: int) -> np.ndarray:
    if np.isscalar(widths):
        return np.full(n, int(widths), dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    if w.shape != (n,):
        raise ValueError(f"{n} values but {w.shape} widths")
    return w


def pack_bits(values: np.ndarray, widths: np.ndarray | int) -> bytes:
    """Pack unsigned integers into an LSB-first bit stream, padded to whole bytes.

    Parameters
    ----------
    values : numpy.ndarray
        Non-negative integers, ``values[i] < 2 ** widths[i]``.
    widths : int or numpy.ndarray
        Bit width of every value (1-32), or one width for all.

    Returns
    -------
    bytes
        ``ceil(sum(widths) / 8)`` bytes; value ``i`` starts at stream bit ``sum(widths[:i])``.
    """
    v = np.asarray(values).astype(np.uint64).reshape(-1)
    n = len(v)
    w = _widths(widths, n)
    if n == 0:
        return b""
    if int(w.min()) < 1 or int(w.max()) > 32:
        raise ValueError("bit widths must lie in 1..32")
    if bool((v >> w.astype(np.uint64)).any()):
        raise ValueError("a value does not fit its bit width")
    ends = np.cumsum(w)
    total = int(ends[-1])
    starts = ends - w
    nbytes = (total + 7) // 8
    first = starts >> 3
    shifted = v << (starts & 7).astype(np.uint64)  # at most 39 significant bits
    span = (int(w.max()) + 7 + 7) // 8
    out = np.zeros(nbytes + span, dtype=np.float64)
    for j in range(span):
        part = (shifted >> np.uint64(8 * j)) & np.uint64(0xFF)
        nz = part != 0
        if nz.any():
            # contributions to one byte occupy disjoint bits, so their sum is their OR (exact in float64)
            out += np.bincount(first[nz] + j, weights=part[nz].astype(np.float64), minlength=len(out))
    return out[:nbytes].astype(np.uint8).tobytes()


def unpack_bits(data: bytes | np.ndarray, widths: np.ndarray | int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers (uint64) from an LSB-first bit stream."""
    w = _widths(widths, count)
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    buf = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    ends = np.cumsum(w)
    starts = ends - w
    need = (int(ends[-1]) + 7) // 8
    if len(buf) < need:
        raise FormatError(f"bit stream holds {len(buf)} bytes, {need} needed")
    span = (int(w.max()) + 7 + 7) // 8
    padded = np.concatenate([buf[:need], np.zeros(span, dtype=np.uint8)])
    first = starts >> 3
    acc = np.zeros(count, dtype=np.uint64)
    for j in range(span):
        acc |= padded[first + j].astype(np.uint64) << np.uint64(8 * j)
    acc >>= (starts & 7).astype(np.uint64)
    acc &= (np.uint64(1) << w.astype(np.uint64)) - np.uint64(1)
    return acc


def _bitmask(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(np.uint8), bitorder="little").tobytes()


def _unbitmask(data: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n, bitorder="little").astype(bool)


def rice_encode(positions: np.ndarray, k: int) -> bytes:
    """Rice code of strictly ascending ``positions``: the unary quotients of the gaps, then their ``k`` low bits.

    Gap ``g_i = p_i - p_{i-1} - 1`` (``p_{-1} = -1``). Stream 1: for each gap, ``g >> k`` one-bits and a zero-bit,
    LSB-first, padded to a byte. Stream 2: ``g & (2^k - 1)`` as ``k``-bit integers (:func:`pack_bits`).
    """
    p = np.asarray(positions, dtype=np.int64)
    m = len(p)
    if m == 0:
        return b""
    g = np.diff(p, prepend=-1) - 1
    q = g >> k
    starts = np.concatenate([[0], np.cumsum(q + 1)[:-1]])
    total = int(q.sum()) + m
    edges = np.zeros(total + 1, dtype=np.int32)
    edges[starts] += 1
    edges[starts + q] -= 1
    ones = np.cumsum(edges[:total]) > 0
    unary = np.packbits(ones, bitorder="little").tobytes()
    rem = pack_bits(g & ((1 << k) - 1), k) if k else b""
    return unary + rem


def rice_decode(data: bytes, m: int, k: int, n: int, name: str = "tensor") -> np.ndarray:
    """Inverse of :func:`rice_encode` for ``m`` positions below ``n``; raises :class:`FormatError` if malformed."""
    if m == 0:
        if data:
            raise FormatError(f"{name}: a Rice section for no positions must be empty")
        return np.zeros(0, dtype=np.int64)
    rem_bytes = (m * k + 7) // 8
    if len(data) < rem_bytes:
        raise FormatError(f"{name}: Rice section too short")
    unary = np.unpackbits(np.frombuffer(data[:len(data) - rem_bytes], dtype=np.uint8), bitorder="little")
    zeros = np.flatnonzero(unary == 0)
    if len(zeros) < m or (int(zeros[m - 1]) + 1 + 7) // 8 != len(data) - rem_bytes:
        raise FormatError(f"{name}: malformed Rice-coded positions")
    ends = zeros[:m]
    q = np.diff(ends, prepend=-1) - 1
    r = unpack_bits(data[len(data) - rem_bytes:], k, m).astype(np.int64) if k else np.zeros(m, dtype=np.int64)
    g = (q << k) | r
    pos = np.cumsum(g + 1) - 1
    if int(pos[-1]) >= n:
        raise FormatError(f"{name}: Rice-coded position out of range")
    return pos


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
        """Write the file; returns the path."""
        path = pathlib.Path(path)
        path.write_bytes(self.data)
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

        m = self.header["model"]
        try:
            pre = Preprocessing.from_dict(m["preprocessing"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"the file's preprocessing is unreadable ({e})") from None
        return ModelInfo(str(m["name"]), str(m["arch"]), [str(c) for c in m["class_names"]], pre, "packed file")

    def size(self) -> SizeBreakdown:
        """The engine's size accounting of the decoded contents (recomputed, not read from the header)."""
        plan_gran = str(self.header["granularity"])
        return compute_size(self.layout, self.keep, self.klass, self.group_count, self.levels, plan_gran, self.state)

    def weights(self) -> dict[str, torch.Tensor]:
        """Dequantized conv/linear weights by name."""
        return self.layout.split(self.values)

    def build_model(self) -> nn.Module:
        """Rebuild the architecture named in the header and load the decoded state dict (no pickle involved).

        Raises
        ------
        WeightsError
            If the architecture is unknown to this installation or the tensors do not fit it.
        """
        from xaicomp_core.io.models import attach_info, build_arch, load_state_dict_checked

        info = self.info
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
                         granularity: str, encoding: str, keep_param: int = 0) -> tuple[list[bytes], dict[str, Any]]:
    """The four sections of compressed layer ``i`` and its header fields."""
    sl = layout.layer_slice(i)
    n, c = layout.sizes[i], layout.channels[i]
    per = n // c
    k = keep[sl]
    idx = np.flatnonzero(k)
    kept = len(idx)
    n_lv = len(levels)
    cb = class_bits(n_lv)
    extra: dict[str, Any] = {}

    if encoding == "dense":
        keep_sec = b""
    elif encoding == "bitmask":
        keep_sec = _bitmask(k)
    elif encoding == "indices":
        keep_sec = pack_bits(idx, index_bits(n))
    elif encoding == "pruned-indices":
        keep_sec = pack_bits(np.flatnonzero(~k), index_bits(n))
    elif encoding == "channels":
        m = k.reshape(c, per)
        if not bool((m.all(1) | ~m.any(1)).all()):
            raise RuntimeError(f"{layout.names[i]}: channel keep-encoding for a mask that is not channel-structured")
        keep_sec = _bitmask(m.any(1))
    elif encoding in ("rice", "rice-pruned"):
        keep_sec = rice_encode(idx if encoding == "rice" else np.flatnonzero(~k), keep_param)
        extra["rice_k"] = int(keep_param)
    else:
        raise RuntimeError(f"unknown keep encoding {encoding!r}")

    kc = klass[sl][idx].astype(np.int64)
    if kept and (int(kc.min()) < 0 or int(kc.max()) >= n_lv):
        raise RuntimeError(f"{layout.names[i]}: kept weight without a bit class")
    ch = idx // per
    if granularity == "weight":
        class_sec = pack_bits(kc, cb) if cb else b""
    elif granularity == "channel":
        ch_class = np.full(c, n_lv - 1, dtype=np.int64)
        ch_class[ch] = kc
        if not np.array_equal(ch_class[ch], kc):
            raise RuntimeError(f"{layout.names[i]}: per-channel granularity with mixed classes in a channel")
        class_sec = pack_bits(ch_class, cb) if cb else b""
    else:
        present = np.unique(kc)
        if len(present) > 1:
            raise RuntimeError(f"{layout.names[i]}: per-layer granularity with mixed classes in the layer")
        extra["layer_class"] = int(present[0]) if len(present) else n_lv - 1
        class_sec = b""

    rows = slice(layout.channel_offsets[i], layout.channel_offsets[i + 1])
    quant_cols = np.array([b != FP32 for b in levels])
    used = (group_count[rows] > 0) & quant_cols
    scale_sec = scales[rows][used].astype("<f4").tobytes()

    bits = np.asarray(levels, dtype=np.int64)[kc]
    vals = codes[sl][idx].astype(np.uint64)
    fp = bits == FP32
    if fp.any():
        vals[fp] = values[sl][idx[fp]].astype("<f4").view("<u4").astype(np.uint64)
    value_sec = pack_bits(vals, bits) if kept else b""
    extra["kept"] = kept
    return [keep_sec, class_sec, scale_sec, value_sec], extra


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
    keep = cw.keep.numpy().astype(bool)
    klass = q.klass.numpy()
    codes = q.codes.numpy()
    values = q.values.numpy()
    scales = q.scales.numpy()
    group_count = q.group_count.numpy()
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
        if row.kind == "raw":
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
                                              plan.granularity, row.keep_encoding, row.keep_param)
            expected = [getattr(row, k) for k in SECTION_KEYS]
            got = [len(s) for s in secs]
            if got != expected:
                raise RuntimeError(f"{name}: sections of {got} bytes written, {expected} estimated")
            entry.update({"keep": row.keep_encoding, "kept": more["kept"], **dict(zip(SECTION_KEYS, got))})
            if "layer_class" in more:
                entry["layer_class"] = more["layer_class"]
            if "rice_k" in more:
                entry["rice_k"] = more["rice_k"]
            chunks.extend(secs)
        entries.append(entry)
    payload = b"".join(chunks)
    if len(payload) != cw.size.estimated_bytes:
        raise RuntimeError(f"payload of {len(payload)} bytes, {cw.size.estimated_bytes} estimated")
    stored = encode_payload(payload, codec)
    from xaicomp_core import __version__

    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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
    pre = PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(hbytes), zlib.crc32(hbytes))
    data = pre + hbytes + stored
    return PackResult(data, header, len(pre) + len(hbytes), len(payload), len(stored), codec,
                      time.perf_counter() - t0)


def write_packed(path: str | pathlib.Path, compressed: CompressedWeights, state: dict[str, torch.Tensor],
                 info: ModelInfo, *,
                 codec: str = "none", extra: dict[str, Any] | None = None) -> PackResult:
    """:func:`pack` and write the file to ``path``."""
    res = pack(compressed, state, info, codec=codec, extra=extra)
    res.write(path)
    return res


# ----------------------------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------------------------
def _req(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise FormatError(f"the header lacks {where}{key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError(f"the header field {where}{key!r} has the wrong type")
    return v


def _nonneg(v: int, what: str) -> int:
    if v < 0:
        raise FormatError(f"negative {what} in the header")
    return v


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
        header = json.loads(hbytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FormatError("the header does not describe an xaicomp packed file")
    if header.get("format_version") != version:
        raise FormatError("the header's format version disagrees with the preamble")
    return header, end


def _decode_compressed(e: dict[str, Any], buf: bytes, n: int, c: int, levels: list[int], granularity: str,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """keep, klass, codes and values of one compressed tensor (flat), and its kept weights per (channel, class)."""
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

    def expect(sec: bytes, nbits: int, what: str) -> None:
        if len(sec) != (nbits + 7) // 8:
            raise FormatError(f"{name}: the {what} section has {len(sec)} bytes, {(nbits + 7) // 8} expected")

    if enc == "dense":
        if kept != n:
            raise FormatError(f"{name}: dense keep-encoding with {kept} of {n} kept")
        expect(keep_sec, 0, "keep")
        keep = np.ones(n, dtype=bool)
    elif enc == "bitmask":
        expect(keep_sec, n, "keep")
        keep = _unbitmask(keep_sec, n)
    elif enc in ("indices", "pruned-indices"):
        m = kept if enc == "indices" else n - kept
        ib = index_bits(n)
        expect(keep_sec, m * ib, "keep")
        pos = unpack_bits(keep_sec, ib, m).astype(np.int64)
        if m and (int(pos.max()) >= n or bool((np.diff(pos) <= 0).any())):
            raise FormatError(f"{name}: weight indices out of range or not strictly ascending")
        keep = np.zeros(n, dtype=bool) if enc == "indices" else np.ones(n, dtype=bool)
        keep[pos] = enc == "indices"
    elif enc == "channels":
        expect(keep_sec, c, "keep")
        keep = np.repeat(_unbitmask(keep_sec, c), per)
    elif enc in ("rice", "rice-pruned"):
        rk = _nonneg(_req(e, "rice_k", int, f"{name}: "), "Rice parameter")
        if rk > 40:
            raise FormatError(f"{name}: Rice parameter {rk} out of range")
        m = kept if enc == "rice" else n - kept
        pos = rice_decode(keep_sec, m, rk, n, name)
        keep = np.zeros(n, dtype=bool) if enc == "rice" else np.ones(n, dtype=bool)
        keep[pos] = enc == "rice"
    else:
        raise FormatError(f"{name}: unknown keep encoding {enc!r}")
    idx = np.flatnonzero(keep)
    if len(idx) != kept:
        raise FormatError(f"{name}: the keep section marks {len(idx)} weights, the header says {kept}")

    cb = class_bits(n_lv)
    ch = idx // per
    if granularity == "weight":
        expect(class_sec, kept * cb, "classes")
        kc = unpack_bits(class_sec, cb, kept).astype(np.int64) if cb else np.zeros(kept, dtype=np.int64)
    elif granularity == "channel":
        expect(class_sec, c * cb, "classes")
        ch_class = unpack_bits(class_sec, cb, c).astype(np.int64) if cb else np.zeros(c, dtype=np.int64)
        if c and int(ch_class.max()) >= n_lv:
            raise FormatError(f"{name}: a channel class id is out of range")
        kc = ch_class[ch]
    else:
        expect(class_sec, 0, "classes")
        lc = _req(e, "layer_class", int, f"{name}: ")
        if not 0 <= lc < n_lv:
            raise FormatError(f"{name}: layer class {lc} out of range")
        kc = np.full(kept, lc, dtype=np.int64)
    if kept and int(kc.max()) >= n_lv:
        raise FormatError(f"{name}: a class id is out of range")

    counts = np.bincount(ch * n_lv + kc, minlength=c * n_lv).reshape(c, n_lv)
    quant_cols = np.array([b != FP32 for b in levels])
    used = (counts > 0) & quant_cols
    n_scales = int(used.sum())
    if len(scale_sec) != 4 * n_scales:
        raise FormatError(f"{name}: {len(scale_sec)} scale bytes for {n_scales} scale groups")
    scale_grid = np.zeros((c, n_lv), dtype=np.float32)
    scale_grid[used] = np.frombuffer(scale_sec, dtype="<f4")

    bits = np.asarray(levels, dtype=np.int64)[kc]
    expect(value_sec, int(bits.sum()), "values")
    u = unpack_bits(value_sec, bits, kept) if kept else np.zeros(0, dtype=np.uint64)
    vals = np.zeros(kept, dtype=np.float32)
    codes = np.zeros(kept, dtype=np.int32)
    s = scale_grid[ch, kc]
    fp = bits == FP32
    one = bits == 1
    multi = ~fp & ~one
    if fp.any():
        vals[fp] = u[fp].astype("<u4").view("<f4")
    if multi.any():
        qmax = (2 ** (bits[multi] - 1) - 1).astype(np.int64)
        if bool((u[multi].astype(np.int64) > 2 * qmax).any()):
            raise FormatError(f"{name}: a quantized code is out of range")
    q = ~fp
    if q.any():
        codes[q] = u[q].astype(np.int32)
        vals[q] = dequantize_codes(torch.from_numpy(codes[q]), torch.from_numpy(bits[q]),
                                   torch.from_numpy(s[q])).numpy()
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
    p = _req(header, "payload", dict, "")
    codec = _req(p, "codec", str, "payload.")
    size = _nonneg(_req(p, "bytes", int, "payload."), "payload size")
    stored_size = _nonneg(_req(p, "stored_bytes", int, "payload."), "payload size")
    stored = data[start:]
    if len(stored) < stored_size:
        raise FormatError(f"the file is truncated: the payload has {len(stored)} of {stored_size} bytes")
    if len(stored) > stored_size:
        raise FormatError(f"the file has {len(stored) - stored_size} unexpected bytes after the payload")
    if _sha256(stored) != _req(p, "stored_sha256", str, "payload."):
        raise FormatError("the payload checksum does not match: the file was altered or damaged")
    payload = decode_payload(stored, codec, size)
    if len(payload) != size:
        raise FormatError(f"the payload decodes to {len(payload)} bytes, the header says {size}")
    if _sha256(payload) != _req(p, "sha256", str, "payload."):
        raise FormatError("the decoded payload checksum does not match: the file was altered or damaged")

    levels = _req(header, "levels", list, "")
    if not levels or not all(isinstance(b, int) and (1 <= b <= 8 or b == FP32) for b in levels):
        raise FormatError(f"invalid bit levels {levels!r} in the header")
    granularity = _req(header, "granularity", str, "")
    if granularity not in ("weight", "channel", "layer"):
        raise FormatError(f"unknown granularity {granularity!r} in the header")
    tensors = _req(header, "tensors", list, "")

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
        elif kind == "compressed":
            nbytes = sum(_nonneg(_req(e, k, int, f"{name}: "), k) for k in SECTION_KEYS)
        else:
            nbytes = 0
        if offset + nbytes > len(payload):
            raise FormatError(f"{name} runs past the end of the payload")
        buf = payload[offset:offset + nbytes]
        offset += nbytes
        if kind == "raw":
            state[name] = torch.from_numpy(np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(shape))
            if e.get("protected"):
                layer_names.append(name)
                layer_shapes.append(tuple(shape))
                layer_protected.append(True)
        elif kind == "compressed":
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
    """Read a packed file from disk (see :func:`unpack`)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FormatError(f"packed file {path} does not exist")
    if path.is_dir():
        raise FormatError(f"{path} is a directory, not a packed file")
    return unpack(path.read_bytes())


def load_packed_model(path: str | pathlib.Path | bytes) -> nn.Module:
    """The model stored in a packed file, rebuilt and ready to run (eval mode, ``xaicomp_info`` attached)."""
    pm = unpack(path) if isinstance(path, (bytes, bytearray)) else read_packed(path)
    return pm.build_model()
