"""The sections of a compressed tensor, one class each: its cost in bytes, its writer and its reader.

A compressed conv/linear weight is stored as four sections (``docs/FORMAT.md``): **keep** (which weights are kept),
**classes** (the bit class of each kept weight or channel), **scales** and **values**. Each is coded here by one
object that owns

* ``cost(...)`` -- the section's bytes, used by the size accounting (:func:`xaicomp_core.format.size.compute_size`);
* ``encode(...)`` -- the section's bytes, used by the writer (:func:`xaicomp_core.format.packing.pack`);
* ``decode(...)`` -- the reader: it validates untrusted input and raises :class:`~xaicomp_core.errors.FormatError`
  with a readable message.

The size accounting and the writer both go through these objects, so the estimate equals the packed payload by
construction (the writer still compares every section with the estimate, as a tripwire).

Keep codecs are registered by name in the :class:`~xaicomp_core.registry.Registry` :data:`KEEP_CODECS`, in the order
of the format's table (ties in cost go to the earlier one): a new keep encoding is one class decorated with
``@register_keep_codec``. The class-id layouts are registered in :data:`CLASS_LAYOUTS` by granularity;
:data:`SCALES` and :data:`VALUES` code the other two sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from xaicomp_core.compress.quantize import dequantize_codes
from xaicomp_core.errors import FormatError
from xaicomp_core.format import huffman
from xaicomp_core.format.bitstream import (
    class_bits,
    index_bits,
    nbytes,
    pack_bits,
    pack_mask,
    rice_cost,
    rice_decode,
    rice_encode,
    unpack_bits,
    unpack_mask,
)
from xaicomp_core.plan import FP32
from xaicomp_core.registry import Registry, decorator

#: largest Rice parameter a reader accepts
MAX_RICE_K = 40


# ----------------------------------------------------------------------------------------------------------------
# header fields of untrusted files
# ----------------------------------------------------------------------------------------------------------------
def require(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """Field ``key`` of the header dict ``d``, of type ``typ``; :class:`FormatError` if missing or mistyped."""
    if not isinstance(d, dict) or key not in d:
        raise FormatError(f"the header lacks {where}{key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError(f"the header field {where}{key!r} has the wrong type")
    return v


def nonnegative(v: int, what: str) -> int:
    """``v``, or :class:`FormatError` if it is negative."""
    if v < 0:
        raise FormatError(f"negative {what} in the header")
    return v


def expect_length(section: bytes, nbits: int, what: str, name: str) -> None:
    """:class:`FormatError` unless ``section`` is exactly ``ceil(nbits / 8)`` bytes."""
    if len(section) != nbytes(nbits):
        raise FormatError(f"{name}: the {what} section has {len(section)} bytes, {nbytes(nbits)} expected")


# ----------------------------------------------------------------------------------------------------------------
# keep section
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class KeepStats:
    """What the cost of a layer's keep section depends on.

    Attributes
    ----------
    n, kept, channels : int
        Weights, kept weights and output channels of the layer.
    structured : bool
        Whether the mask keeps or drops whole output channels.
    mask : numpy.ndarray, optional
        The layer's flat boolean keep-mask; the Rice codecs read it (once) when ``rice`` is not given.
    rice : tuple of int, optional
        ``(k, bytes)`` of the Rice code of the sparser of the kept and the pruned positions; filled in from ``mask``.
    """

    n: int
    kept: int
    channels: int
    structured: bool
    mask: np.ndarray | None = None
    rice: tuple[int, int] | None = None


S = TypeVar("S")


class SectionCodec(Generic[S]):
    """One encoding of a section, chosen per tensor by its cost: ``name``, :meth:`applies` and :meth:`cost` of the
    section's statistics ``S``."""

    name: ClassVar[str] = ""

    def applies(self, s: S) -> bool:
        """Whether this encoding can code the section described by ``s``."""
        raise NotImplementedError

    def cost(self, s: S) -> int:
        """Bytes of the section (only called where :meth:`applies`)."""
        raise NotImplementedError


def cheapest(registry: Registry, s: Any) -> tuple[Any, int]:
    """The registered codec of least :meth:`~SectionCodec.cost` among those that apply to ``s``, and that cost
    (ties go to the earlier registered one)."""
    best: tuple[Any, int] | None = None
    for _, codec in registry.items():
        if codec.applies(s):
            cost = codec.cost(s)
            if best is None or cost < best[1]:
                best = (codec, cost)
    if best is None:
        raise RuntimeError(f"no {registry.kind} applies to {s}")
    return best


class KeepCodec(SectionCodec[KeepStats]):
    """One keep encoding: which weights of a layer are kept.

    Subclasses set ``name`` and implement :meth:`applies`, :meth:`cost`, :meth:`encode` and :meth:`decode`.
    """

    def param(self, s: KeepStats) -> int:
        """The encoding's parameter (``keep_param``; the Rice ``k``), 0 if it has none."""
        return 0

    def encode(self, mask: np.ndarray, channels: int, param: int) -> tuple[bytes, dict[str, Any]]:
        """The keep section of the flat boolean ``mask`` and the header fields it needs beyond ``keep``/``kept``.

        Raises
        ------
        RuntimeError
            If this encoding cannot code ``mask`` (a writer bug).
        """
        raise NotImplementedError

    def decode(self, data: bytes, entry: dict[str, Any], n: int, channels: int, kept: int, name: str) -> np.ndarray:
        """The flat boolean keep-mask of ``n`` weights from an untrusted section and its header ``entry``.

        Raises
        ------
        FormatError
            If the section or the entry's fields are malformed.
        """
        raise NotImplementedError


#: keep codecs by name, in the order of the format's table (ties in cost go to the earlier one)
KEEP_CODECS: Registry[KeepCodec] = Registry("keep encoding", FormatError)

#: class decorator: register one instance of a keep codec under its ``name``
register_keep_codec = decorator(KEEP_CODECS)


def keep_codec(name: str) -> KeepCodec:
    """The registered keep codec ``name`` (:class:`FormatError` if unknown: the name may come from a file)."""
    return KEEP_CODECS.get(name)


def choose_keep(s: KeepStats) -> tuple[str, int, int]:
    """The cheapest keep encoding for ``s``: (name, bytes, parameter). Ties go to the earlier registered codec."""
    codec, cost = cheapest(KEEP_CODECS, s)
    return codec.name, cost, codec.param(s)


def _positions_mask(positions: np.ndarray, n: int, of_kept: bool) -> np.ndarray:
    keep = np.zeros(n, dtype=bool) if of_kept else np.ones(n, dtype=bool)
    keep[positions] = of_kept
    return keep


@register_keep_codec
class DenseKeep(KeepCodec):
    """``dense``: every weight kept, nothing stored."""

    name = "dense"

    def applies(self, s: KeepStats) -> bool:  # noqa: D102
        return s.kept == s.n

    def cost(self, s: KeepStats) -> int:  # noqa: D102
        return 0

    def encode(self, mask: np.ndarray, channels: int, param: int) -> tuple[bytes, dict[str, Any]]:  # noqa: D102
        if not bool(mask.all()):
            raise RuntimeError("dense keep-encoding for a mask that prunes weights")
        return b"", {}

    def decode(self, data: bytes, entry: dict[str, Any], n: int, channels: int, kept: int,  # noqa: D102
               name: str) -> np.ndarray:
        if kept != n:
            raise FormatError(f"{name}: dense keep-encoding with {kept} of {n} kept")
        expect_length(data, 0, "keep", name)
        return np.ones(n, dtype=bool)


@register_keep_codec
class BitmaskKeep(KeepCodec):
    """``bitmask``: one bit per weight."""

    name = "bitmask"

    def applies(self, s: KeepStats) -> bool:  # noqa: D102
        return s.kept < s.n

    def cost(self, s: KeepStats) -> int:  # noqa: D102
        return nbytes(s.n)

    def encode(self, mask: np.ndarray, channels: int, param: int) -> tuple[bytes, dict[str, Any]]:  # noqa: D102
        return pack_mask(mask), {}

    def decode(self, data: bytes, entry: dict[str, Any], n: int, channels: int, kept: int,  # noqa: D102
               name: str) -> np.ndarray:
        expect_length(data, n, "keep", name)
        return unpack_mask(data, n)


class _IndexKeep(KeepCodec):
    """Sorted flat positions at ``index_bits(n)`` bits each: of the kept weights or of the pruned ones."""

    of_kept: ClassVar[bool] = True

    def applies(self, s: KeepStats) -> bool:  # noqa: D102
        return s.kept < s.n

    def cost(self, s: KeepStats) -> int:  # noqa: D102
        m = s.kept if self.of_kept else s.n - s.kept
        return nbytes(m * index_bits(s.n))

    def encode(self, mask: np.ndarray, channels: int, param: int) -> tuple[bytes, dict[str, Any]]:  # noqa: D102
        return pack_bits(np.flatnonzero(mask if self.of_kept else ~mask), index_bits(len(mask))), {}

    def decode(self, data: bytes, entry: dict[str, Any], n: int, channels: int, kept: int,  # noqa: D102
               name: str) -> np.ndarray:
        m = kept if self.of_kept else n - kept
        ib = index_bits(n)
        expect_length(data, m * ib, "keep", name)
        pos = unpack_bits(data, ib, m).astype(np.int64)
        if m and (int(pos.max()) >= n or bool((np.diff(pos) <= 0).any())):
            raise FormatError(f"{name}: weight indices out of range or not strictly ascending")
        return _positions_mask(pos, n, self.of_kept)


@register_keep_codec
class IndicesKeep(_IndexKeep):
    """``indices``: the kept weights' positions."""

    name = "indices"
    of_kept = True


@register_keep_codec
class PrunedIndicesKeep(_IndexKeep):
    """``pruned-indices``: the pruned weights' positions."""

    name = "pruned-indices"
    of_kept = False


@register_keep_codec
class ChannelsKeep(KeepCodec):
    """``channels``: one bit per output channel, for masks that keep or drop whole channels."""

    name = "channels"

    def applies(self, s: KeepStats) -> bool:  # noqa: D102
        return s.kept < s.n and s.structured

    def cost(self, s: KeepStats) -> int:  # noqa: D102
        return nbytes(s.channels)

    def encode(self, mask: np.ndarray, channels: int, param: int) -> tuple[bytes, dict[str, Any]]:  # noqa: D102
        m = mask.reshape(channels, -1)
        if not bool((m.all(1) | ~m.any(1)).all()):
            raise RuntimeError("channel keep-encoding for a mask that is not channel-structured")
        return pack_mask(m.any(1)), {}

    def decode(self, data: bytes, entry: dict[str, Any], n: int, channels: int, kept: int,  # noqa: D102
               name: str) -> np.ndarray:
        expect_length(data, channels, "keep", name)
        return np.repeat(unpack_mask(data, channels), n // channels)


def rice_codes_kept(n: int, kept: int) -> bool:
    """Whether the Rice options code the kept positions (``rice``: at most half kept) or the pruned ones."""
    return 2 * kept <= n


def rice_target(mask: np.ndarray) -> np.ndarray:
    """The positions the Rice options code for a flat keep-mask: the sparser of the kept and the pruned ones."""
    m = np.asarray(mask, dtype=bool)
    return np.flatnonzero(m if rice_codes_kept(m.size, int(np.count_nonzero(m))) else ~m)


class _RiceKeep(KeepCodec):
    """The sparser of the kept and pruned positions, Rice-coded (:func:`~xaicomp_core.format.bitstream.rice_encode`)."""

    of_kept: ClassVar[bool] = True

    def applies(self, s: KeepStats) -> bool:  # noqa: D102
        if s.kept == s.n or rice_codes_kept(s.n, s.kept) != self.of_kept:
            return False
        return s.rice is not None or s.mask is not None

    def _rice(self, s: KeepStats) -> tuple[int, int]:
        if s.rice is None:
            assert s.mask is not None
            s.rice = rice_cost(np.flatnonzero(s.mask if self.of_kept else ~s.mask))
        return s.rice

    def cost(self, s: KeepStats) -> int:  # noqa: D102
        return self._rice(s)[1]

    def param(self, s: KeepStats) -> int:  # noqa: D102
        return self._rice(s)[0]

    def encode(self, mask: np.ndarray, channels: int, param: int) -> tuple[bytes, dict[str, Any]]:  # noqa: D102
        return rice_encode(np.flatnonzero(mask if self.of_kept else ~mask), param), {"rice_k": int(param)}

    def decode(self, data: bytes, entry: dict[str, Any], n: int, channels: int, kept: int,  # noqa: D102
               name: str) -> np.ndarray:
        rk = nonnegative(require(entry, "rice_k", int, f"{name}: "), "Rice parameter")
        if rk > MAX_RICE_K:
            raise FormatError(f"{name}: Rice parameter {rk} out of range")
        m = kept if self.of_kept else n - kept
        return _positions_mask(rice_decode(data, m, rk, n, name), n, self.of_kept)


@register_keep_codec
class RiceKeep(_RiceKeep):
    """``rice``: the kept positions (at most half the weights kept)."""

    name = "rice"
    of_kept = True


@register_keep_codec
class RicePrunedKeep(_RiceKeep):
    """``rice-pruned``: the pruned positions (more than half kept)."""

    name = "rice-pruned"
    of_kept = False


# ----------------------------------------------------------------------------------------------------------------
# classes section
# ----------------------------------------------------------------------------------------------------------------
class ClassLayout:
    """Where the bit class of the kept weights is stored, for one granularity."""

    name: ClassVar[str] = ""  # the granularity

    def cost(self, kept: int, channels: int, n_levels: int) -> int:
        """Bytes of the classes section."""
        raise NotImplementedError

    def encode(self, kc: np.ndarray, ch: np.ndarray, channels: int, n_levels: int,
               name: str) -> tuple[bytes, dict[str, Any]]:
        """The classes section of kept weights with classes ``kc`` in channels ``ch`` (both in kept order), and the
        header fields it needs.

        Raises
        ------
        RuntimeError
            If the classes do not follow the granularity (a writer bug).
        """
        raise NotImplementedError

    def decode(self, data: bytes, entry: dict[str, Any], kept: int, channels: int, ch: np.ndarray, n_levels: int,
               name: str) -> np.ndarray:
        """The class id of every kept weight (int64, kept order) from an untrusted section.

        Raises
        ------
        FormatError
            If the section or the entry's fields are malformed.
        """
        raise NotImplementedError


#: class-id layouts by granularity
CLASS_LAYOUTS: Registry[ClassLayout] = Registry("granularity", FormatError)

#: class decorator: register one instance of a class-id layout under its ``name`` (the granularity)
register_class_layout = decorator(CLASS_LAYOUTS)


@register_class_layout
class PerWeightClasses(ClassLayout):
    """``weight``: one class id per kept weight."""

    name = "weight"

    def cost(self, kept: int, channels: int, n_levels: int) -> int:  # noqa: D102
        return nbytes(kept * class_bits(n_levels))

    def encode(self, kc: np.ndarray, ch: np.ndarray, channels: int, n_levels: int,  # noqa: D102
               name: str) -> tuple[bytes, dict[str, Any]]:
        cb = class_bits(n_levels)
        return (pack_bits(kc, cb) if cb else b""), {}

    def decode(self, data: bytes, entry: dict[str, Any], kept: int, channels: int, ch: np.ndarray,  # noqa: D102
               n_levels: int, name: str) -> np.ndarray:
        cb = class_bits(n_levels)
        expect_length(data, kept * cb, "classes", name)
        return unpack_bits(data, cb, kept).astype(np.int64) if cb else np.zeros(kept, dtype=np.int64)


@register_class_layout
class PerChannelClasses(ClassLayout):
    """``channel``: one class id per output channel (channels without kept weights store the last class)."""

    name = "channel"

    def cost(self, kept: int, channels: int, n_levels: int) -> int:  # noqa: D102
        return nbytes(channels * class_bits(n_levels))

    def encode(self, kc: np.ndarray, ch: np.ndarray, channels: int, n_levels: int,  # noqa: D102
               name: str) -> tuple[bytes, dict[str, Any]]:
        cb = class_bits(n_levels)
        ch_class = np.full(channels, n_levels - 1, dtype=np.int64)
        ch_class[ch] = kc
        if not np.array_equal(ch_class[ch], kc):
            raise RuntimeError(f"{name}: per-channel granularity with mixed classes in a channel")
        return (pack_bits(ch_class, cb) if cb else b""), {}

    def decode(self, data: bytes, entry: dict[str, Any], kept: int, channels: int, ch: np.ndarray,  # noqa: D102
               n_levels: int, name: str) -> np.ndarray:
        cb = class_bits(n_levels)
        expect_length(data, channels * cb, "classes", name)
        ch_class = unpack_bits(data, cb, channels).astype(np.int64) if cb else np.zeros(channels, dtype=np.int64)
        if channels and int(ch_class.max()) >= n_levels:
            raise FormatError(f"{name}: a channel class id is out of range")
        return ch_class[ch]


@register_class_layout
class PerLayerClasses(ClassLayout):
    """``layer``: nothing stored; the layer's class is the header field ``layer_class``."""

    name = "layer"

    def cost(self, kept: int, channels: int, n_levels: int) -> int:  # noqa: D102
        return 0

    def encode(self, kc: np.ndarray, ch: np.ndarray, channels: int, n_levels: int,  # noqa: D102
               name: str) -> tuple[bytes, dict[str, Any]]:
        present = np.unique(kc)
        if len(present) > 1:
            raise RuntimeError(f"{name}: per-layer granularity with mixed classes in the layer")
        return b"", {"layer_class": int(present[0]) if len(present) else n_levels - 1}

    def decode(self, data: bytes, entry: dict[str, Any], kept: int, channels: int, ch: np.ndarray,  # noqa: D102
               n_levels: int, name: str) -> np.ndarray:
        expect_length(data, 0, "classes", name)
        lc = require(entry, "layer_class", int, f"{name}: ")
        if not 0 <= lc < n_levels:
            raise FormatError(f"{name}: layer class {lc} out of range")
        return np.full(kept, lc, dtype=np.int64)


def class_layout(granularity: str) -> ClassLayout:
    """The class-id layout of ``granularity`` (:class:`FormatError` if unknown: the name may come from a file)."""
    return CLASS_LAYOUTS.get(granularity)


# ----------------------------------------------------------------------------------------------------------------
# scales and values sections
# ----------------------------------------------------------------------------------------------------------------
def scale_groups(counts: np.ndarray, levels: list[int]) -> np.ndarray:
    """Which (channel, class) groups of a layer store a scale: those holding kept weights at a quantized level.

    ``counts`` is the layer's kept weights per (channel, class), shape (channels, len(levels)).
    """
    return (np.asarray(counts) > 0) & np.array([b != FP32 for b in levels])


class ScaleSection:
    """One float32 per (output channel, quantized class) group that holds kept weights, channel-major."""

    def cost(self, n_groups: int) -> int:
        """Bytes for ``n_groups`` scale groups."""
        return 4 * int(n_groups)

    def encode(self, scales: np.ndarray, groups: np.ndarray) -> bytes:
        """The section of a layer's ``scales`` (channels, len(levels)) at the ``groups`` of :func:`scale_groups`."""
        return np.asarray(scales)[groups].astype("<f4").tobytes()

    def decode(self, data: bytes, groups: np.ndarray, name: str) -> np.ndarray:
        """The scale of every (channel, class), float32 (0 where no scale is stored), from an untrusted section."""
        n_scales = int(groups.sum())
        if len(data) != self.cost(n_scales):
            raise FormatError(f"{name}: {len(data)} scale bytes for {n_scales} scale groups")
        grid = np.zeros(groups.shape, dtype=np.float32)
        grid[groups] = np.frombuffer(data, dtype="<f4")
        return grid


def alphabet(bits: int) -> int:
    """Symbols a stored code of a ``bits``-bit class can take: 2 at 1 bit, ``2 qmax + 1 = 2^bits - 1`` above."""
    return 2 if bits == 1 else (1 << bits) - 1


@dataclass
class ValueStats:
    """What the cost of a layer's values section depends on.

    Attributes
    ----------
    levels : list of int
        The bit widths of the classes (32 = fp32).
    counts : numpy.ndarray
        Kept weights per class, shape (len(levels),).
    hist : dict of int to numpy.ndarray
        Per quantized class holding kept weights: the histogram of its stored codes over :func:`alphabet`.
    """

    levels: list[int]
    counts: np.ndarray
    hist: dict[int, np.ndarray]

    @property
    def value_bits(self) -> int:
        """Sum of the bit widths of the kept weights (the fixed-width coding)."""
        return int(np.dot(np.asarray(self.counts, dtype=np.int64), np.asarray(self.levels, dtype=np.int64)))


class ValueCodec(SectionCodec[ValueStats]):
    """One encoding of the values section: every kept weight's stored code (or fp32 bit pattern).

    Subclasses set ``name`` and implement :meth:`cost`, :meth:`encode` and :meth:`decode_codes` (and
    :meth:`applies`, where not every section can be coded).
    """

    def applies(self, s: ValueStats) -> bool:  # noqa: D102
        return True

    def lower_bound(self, s: ValueStats) -> int:
        """A number of bytes :meth:`cost` is never below, cheaper to compute (default: the cost itself)."""
        return self.cost(s)

    def encode(self, codes: np.ndarray, values: np.ndarray, kc: np.ndarray, levels: list[int]) -> bytes:
        """The section of kept weights with stored ``codes``, float ``values`` and class ids ``kc`` (kept order)."""
        raise NotImplementedError

    def decode_codes(self, data: bytes, kc: np.ndarray, levels: list[int], name: str) -> np.ndarray:
        """The stored unsigned integer of every kept weight (uint64; the fp32 bit pattern at 32 bits) from an
        untrusted section of exactly this encoding's length.

        Raises
        ------
        FormatError
            If the section is malformed.
        """
        raise NotImplementedError

    def decode(self, data: bytes, kc: np.ndarray, levels: list[int], scales: np.ndarray,
               name: str) -> tuple[np.ndarray, np.ndarray]:
        """Dequantized float32 values and stored int32 codes (0 for fp32 weights) of the kept weights from an
        untrusted section; ``kc`` (class ids) and ``scales`` are per kept weight.

        The values are :func:`~xaicomp_core.compress.quantize.dequantize_codes` of the codes, exactly as the engine
        computes them.
        """
        bits = np.asarray(levels, dtype=np.int64)[kc]
        u = self.decode_codes(data, kc, levels, name)
        kept = len(bits)
        vals = np.zeros(kept, dtype=np.float32)
        codes = np.zeros(kept, dtype=np.int32)
        fp = bits == FP32
        multi = ~fp & (bits != 1)
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
                                       torch.from_numpy(scales[q])).numpy()
        return vals, codes


#: value encodings by name, in the order of the format's table (ties in cost go to the earlier one)
VALUE_CODECS: Registry[ValueCodec] = Registry("value encoding", FormatError)

#: class decorator: register one instance of a value codec under its ``name``
register_value_codec = decorator(VALUE_CODECS)


def value_codec(name: str) -> ValueCodec:
    """The registered value codec ``name`` (:class:`FormatError` if unknown: the name may come from a file)."""
    return VALUE_CODECS.get(name)


def choose_values(s: ValueStats) -> tuple[str, int]:
    """The cheapest value encoding for ``s``: (name, bytes). Ties go to the earlier registered codec."""
    codec, cost = cheapest(VALUE_CODECS, s)
    return codec.name, cost


def values_lower_bound(s: ValueStats) -> int:
    """Bytes the cheapest value encoding of ``s`` (:func:`choose_values`) never goes below: the least
    :meth:`ValueCodec.lower_bound` of the encodings that apply."""
    return min(codec.lower_bound(s) for _, codec in VALUE_CODECS.items() if codec.applies(s))


def _stored_ints(codes: np.ndarray, values: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The unsigned integer stored per kept weight: its code, or its float32 bit pattern at 32 bits."""
    u = np.asarray(codes).astype(np.uint64)
    fp = bits == FP32
    if fp.any():
        u[fp] = np.asarray(values)[fp].astype("<f4").view("<u4").astype(np.uint64)
    return u


@register_value_codec
class FixedValues(ValueCodec):
    """``fixed`` (format version 1's only one): every kept weight at its bit width, one continuous stream."""

    name = "fixed"

    def cost(self, s: ValueStats) -> int:  # noqa: D102
        return nbytes(s.value_bits)

    def encode(self, codes: np.ndarray, values: np.ndarray, kc: np.ndarray, levels: list[int]) -> bytes:  # noqa: D102
        if not len(kc):
            return b""
        bits = np.asarray(levels, dtype=np.int64)[kc]
        return pack_bits(_stored_ints(codes, values, bits), bits)

    def decode_codes(self, data: bytes, kc: np.ndarray, levels: list[int], name: str) -> np.ndarray:  # noqa: D102
        bits = np.asarray(levels, dtype=np.int64)[kc]
        expect_length(data, int(bits.sum()), "values", name)
        return unpack_bits(data, bits, len(bits)) if len(bits) else np.zeros(0, dtype=np.uint64)


@register_value_codec
class HuffmanValues(ValueCodec):
    """``huffman``: per bit class, in class order, a canonical Huffman code of its stored codes (4-bit code lengths,
    then the codewords of the class's weights in kept order), or the fp32 bit patterns of a 32-bit class; each
    class's part padded to a byte (:mod:`xaicomp_core.format.huffman`)."""

    name = "huffman"

    def applies(self, s: ValueStats) -> bool:  # noqa: D102
        return bool(s.hist)

    def cost(self, s: ValueStats) -> int:  # noqa: D102
        total = 0
        for c, b in enumerate(s.levels):
            if s.counts[c] == 0:
                continue
            total += nbytes(FP32 * int(s.counts[c])) if b == FP32 else huffman.section_bytes(s.hist[c])
        return total

    def lower_bound(self, s: ValueStats) -> int:  # noqa: D102
        return sum(nbytes(FP32 * int(s.counts[c])) if b == FP32 else huffman.section_bytes_lower_bound(s.hist[c])
                   for c, b in enumerate(s.levels) if s.counts[c])

    def encode(self, codes: np.ndarray, values: np.ndarray, kc: np.ndarray, levels: list[int]) -> bytes:  # noqa: D102
        bits = np.asarray(levels, dtype=np.int64)[kc]
        u = _stored_ints(codes, values, bits)
        parts = []
        for c, b in enumerate(levels):
            sel = kc == c
            if not sel.any():
                continue
            if b == FP32:
                parts.append(pack_bits(u[sel], FP32))
            else:
                sym = u[sel].astype(np.int64)
                parts.append(huffman.encode_section(sym, np.bincount(sym, minlength=alphabet(b))))
        return b"".join(parts)

    def decode_codes(self, data: bytes, kc: np.ndarray, levels: list[int], name: str) -> np.ndarray:  # noqa: D102
        u = np.zeros(len(kc), dtype=np.uint64)
        view = memoryview(data)  # the parts are read in place, not copied
        pos = 0
        for c, b in enumerate(levels):
            sel = kc == c
            m = int(np.count_nonzero(sel))
            if not m:
                continue
            if b == FP32:
                part = data[pos:pos + nbytes(FP32 * m)]
                expect_length(part, FP32 * m, "values", name)
                u[sel] = unpack_bits(part, FP32, m)
                pos += len(part)
            else:
                sym, used = huffman.decode_section(view[pos:], alphabet(b), m, f"{name} ({b}-bit class)")
                u[sel] = sym.astype(np.uint64)
                pos += used
        if pos != len(data):
            raise FormatError(f"{name}: the values section has {len(data)} bytes, {pos} decoded")
        return u


def value_stats(codes: np.ndarray, kc: np.ndarray, levels: list[int]) -> ValueStats:
    """The :class:`ValueStats` of kept weights with stored ``codes`` and class ids ``kc`` (kept order)."""
    counts = np.bincount(kc, minlength=len(levels)) if len(kc) else np.zeros(len(levels), dtype=np.int64)
    hist = {c: np.bincount(codes[kc == c].astype(np.int64), minlength=alphabet(b))
            for c, b in enumerate(levels) if b != FP32 and counts[c]}
    return ValueStats(list(levels), counts, hist)


SCALES = ScaleSection()
