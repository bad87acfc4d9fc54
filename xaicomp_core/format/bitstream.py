"""Bit streams of the packed format: LSB-first fixed-width integers, bitmasks and the Rice code of sorted positions.

Bit ``k`` of a stream is bit ``k % 8`` of byte ``k // 8``; a ``w``-bit integer occupies stream bits ``o .. o + w - 1``
with its least significant bit first; a stream is padded with zero bits to whole bytes (``docs/FORMAT.md``).

The Rice code lives here once: :func:`rice_gaps` (positions to gaps), :func:`rice_bytes` (the length of the code for
a parameter) and :func:`rice_parameter` (the cheapest parameter) serve the size accounting, and
:func:`rice_encode` / :func:`rice_decode` write and read the same two streams, checked against :func:`rice_bytes`.
"""

from __future__ import annotations

import math

import numpy as np

from xaicomp_core.errors import FormatError


def nbytes(bits: int) -> int:
    """Bytes of a section of ``bits`` bits (padded to whole bytes)."""
    return (int(bits) + 7) // 8


def index_bits(n: int) -> int:
    """Bits per index into a tensor of ``n`` elements."""
    return max(1, math.ceil(math.log2(max(n, 2))))


def class_bits(n_levels: int) -> int:
    """Bits per class id for ``n_levels`` levels (0 for a single level)."""
    return 0 if n_levels <= 1 else math.ceil(math.log2(n_levels))


# ----------------------------------------------------------------------------------------------------------------
# fixed-width integers
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
    size = (total + 7) // 8
    first = starts >> 3
    shifted = v << (starts & 7).astype(np.uint64)  # at most 39 significant bits
    span = (int(w.max()) + 7 + 7) // 8
    out = np.zeros(size + span, dtype=np.float64)
    for j in range(span):
        part = (shifted >> np.uint64(8 * j)) & np.uint64(0xFF)
        nz = part != 0
        if nz.any():
            # contributions to one byte occupy disjoint bits, so their sum is their OR (exact in float64)
            out += np.bincount(first[nz] + j, weights=part[nz].astype(np.float64), minlength=len(out))
    return out[:size].astype(np.uint8).tobytes()


def unpack_bits(data: bytes | np.ndarray, widths: np.ndarray | int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers (uint64) from an LSB-first bit stream.

    Raises
    ------
    FormatError
        If ``data`` is shorter than the widths need.
    """
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


def pack_mask(mask: np.ndarray) -> bytes:
    """A boolean array as an LSB-first bitmask (``ceil(len / 8)`` bytes)."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little").tobytes()


def unpack_mask(data: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`: ``n`` booleans."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n, bitorder="little").astype(bool)


# ----------------------------------------------------------------------------------------------------------------
# Rice code of strictly ascending positions
# ----------------------------------------------------------------------------------------------------------------
def rice_gaps(positions: np.ndarray) -> np.ndarray:
    """Gaps ``g_i = p_i - p_{i-1} - 1`` (``p_{-1} = -1``) of strictly ascending ``positions`` (int64)."""
    p = np.asarray(positions, dtype=np.int64)
    return np.diff(p, prepend=-1) - 1


def rice_bytes(gaps: np.ndarray, k: int) -> int:
    """Bytes of the Rice code of ``gaps`` with parameter ``k``: ``ceil((m + sum(g >> k)) / 8) + ceil(m k / 8)``."""
    m = len(gaps)
    if m == 0:
        return 0
    unary = int(np.sum(gaps >> k, dtype=np.int64)) + m
    return nbytes(unary) + nbytes(m * k)


def rice_parameter(gaps: np.ndarray) -> tuple[int, int]:
    """Cheapest Rice parameter for ``gaps``: (k, bytes), searched around ``log2`` of the mean gap.

    Ties go to the smaller ``k``. ``(0, 0)`` for no gaps.
    """
    m = len(gaps)
    if m == 0:
        return 0, 0
    # the gaps sum to p_last + 1 - m: one exact integer division gives their mean
    mean = float(np.sum(gaps, dtype=np.int64)) / m
    k0 = max(0, int(math.log2(mean + 1))) if mean > 0 else 0
    best: tuple[int, int] | None = None
    for k in range(max(0, k0 - 2), k0 + 3):
        cost = rice_bytes(gaps, k)
        if best is None or cost < best[1]:
            best = (k, cost)
    assert best is not None
    return best


def rice_cost(positions: np.ndarray) -> tuple[int, int]:
    """Cheapest Rice parameter for coding sorted ``positions``: (k, bytes).

    Each position is coded as its gap ``g`` to the previous one (:func:`rice_gaps`): the quotient ``g >> k`` in
    unary (that many 1 bits, then a 0) in one stream, the ``k`` low bits of ``g`` in a second, fixed-width stream.
    Bytes = ceil(unary bits / 8) + ceil(m k / 8) (:func:`rice_bytes`). ``positions`` may be a torch tensor.
    """
    return rice_parameter(rice_gaps(np.asarray(positions)))


def rice_encode(positions: np.ndarray, k: int) -> bytes:
    """Rice code of strictly ascending ``positions``: the unary quotients of the gaps, then their ``k`` low bits.

    Gap ``g_i = p_i - p_{i-1} - 1`` (``p_{-1} = -1``). Stream 1: for each gap, ``g >> k`` one-bits and a zero-bit,
    LSB-first, padded to a byte. Stream 2: ``g & (2^k - 1)`` as ``k``-bit integers (:func:`pack_bits`). The result
    is :func:`rice_bytes` long.
    """
    g = rice_gaps(positions)
    m = len(g)
    if m == 0:
        return b""
    q = g >> k
    starts = np.concatenate([[0], np.cumsum(q + 1)[:-1]])
    total = int(q.sum()) + m
    edges = np.zeros(total + 1, dtype=np.int32)
    edges[starts] += 1
    edges[starts + q] -= 1
    ones = np.cumsum(edges[:total]) > 0
    unary = pack_mask(ones)
    rem = pack_bits(g & ((1 << k) - 1), k) if k else b""
    out = unary + rem
    if len(out) != rice_bytes(g, k):
        raise RuntimeError(f"Rice code of {len(out)} bytes, {rice_bytes(g, k)} counted")
    return out


def rice_decode(data: bytes, m: int, k: int, n: int, name: str = "tensor") -> np.ndarray:
    """Inverse of :func:`rice_encode` for ``m`` positions below ``n``; raises :class:`FormatError` if malformed."""
    if m == 0:
        if data:
            raise FormatError(f"{name}: a Rice section for no positions must be empty")
        return np.zeros(0, dtype=np.int64)
    rem_bytes = nbytes(m * k)
    if len(data) < rem_bytes:
        raise FormatError(f"{name}: Rice section too short")
    unary = np.unpackbits(np.frombuffer(data[:len(data) - rem_bytes], dtype=np.uint8), bitorder="little")
    zeros = np.flatnonzero(unary == 0)
    if len(zeros) < m or nbytes(int(zeros[m - 1]) + 1) != len(data) - rem_bytes:
        raise FormatError(f"{name}: malformed Rice-coded positions")
    ends = zeros[:m]
    q = np.diff(ends, prepend=-1) - 1
    r = unpack_bits(data[len(data) - rem_bytes:], k, m).astype(np.int64) if k else np.zeros(m, dtype=np.int64)
    g = (q << k) | r
    pos = np.cumsum(g + 1) - 1
    if int(pos[-1]) >= n:
        raise FormatError(f"{name}: Rice-coded position out of range")
    return pos
