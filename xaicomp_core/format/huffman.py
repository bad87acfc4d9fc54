"""Canonical Huffman code of small alphabets (the stored codes of one bit class), LSB-first streams.

The ``huffman`` value encoding (``docs/FORMAT.md``) codes the quantized codes of each bit class of a tensor with its
own prefix code. The code is described by its **code lengths** alone (0 = symbol absent, 1..:data:`MAX_CODE_LEN`),
from which every reader derives the same codewords (the *canonical* code, as DEFLATE does): symbols sorted by
(length, symbol) get consecutive codewords, the first ``0``, each next one ``(previous + 1) << (its length -
previous length)``. A codeword's most significant bit is its first bit in the stream.

* :func:`code_lengths` -- Huffman lengths of a histogram, limited to :data:`MAX_CODE_LEN` bits (the counts are
  halved until the longest code fits; deterministic: ties between equal counts go to the smaller symbol);
* :func:`coded_bits` -- the bits a histogram takes with given lengths (the size accounting; no stream is built);
  :func:`section_bytes_lower_bound` -- a bound below it from the entropy, without the tree;
* :func:`encode` / :func:`decode` -- symbols to the stream and back; the reader validates untrusted lengths (an
  over-full code is an error) and streams (a bit pattern that is no codeword, a stream that ends early or runs
  on), raising :class:`~xaicomp_core.errors.FormatError`.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from xaicomp_core.errors import FormatError
from xaicomp_core.format.bitstream import nbytes, pack_bits

#: longest codeword (the lengths are stored in 4 bits)
MAX_CODE_LEN = 15
#: bits per stored code length
LENGTH_BITS = 4
#: bit positions the decoder examines at a time (bounds its memory on large tensors)
DECODE_WINDOW = 1 << 18


def _unlimited_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths of the non-zero ``counts`` (int64), ties to the smaller symbol."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    # heap items: (count, smallest symbol below, node id); node ids < len(counts) are leaves
    heap = [(int(counts[s]), int(s), int(s)) for s in used]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    next_id = len(counts)
    while len(heap) > 1:
        c1, s1, a = heapq.heappop(heap)
        c2, s2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (c1 + c2, min(s1, s2), next_id))
        next_id += 1
    root = heap[0][2]
    depth: dict[int, int] = {root: 0}
    for node in range(next_id - 1, -1, -1):  # parents have larger ids than their children
        if node in parent:
            depth[node] = depth[parent[node]] + 1
    lengths[used] = [depth[int(s)] for s in used]
    return lengths


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Huffman code lengths (int64, 0 for absent symbols) of a histogram, no code longer than ``max_len``.

    A single used symbol gets a 1-bit code. If the optimal code is too deep, the non-zero counts are halved (rounding
    up) until it fits.
    """
    c = np.asarray(counts, dtype=np.int64)
    if not bool((c > 0).any()):
        return np.zeros(len(c), dtype=np.int64)
    while True:
        lengths = _unlimited_lengths(c)
        if int(lengths.max()) <= max_len:
            return lengths
        c = np.where(c > 0, (c + 1) // 2, 0)


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits of the codewords of a histogram ``counts`` under ``lengths``."""
    return int(np.dot(np.asarray(counts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))


def table_bits(alphabet: int) -> int:
    """Bits of a stored code-length table for an alphabet of ``alphabet`` symbols."""
    return LENGTH_BITS * alphabet


def section_bytes(counts: np.ndarray) -> int:
    """Bytes of one class's part of a ``huffman`` value section: its length table and codewords, padded."""
    return nbytes(table_bits(len(counts)) + coded_bits(counts, code_lengths(counts)))


def section_bytes_lower_bound(counts: np.ndarray) -> int:
    """A lower bound of :func:`section_bytes` without building the code: no prefix code takes fewer bits than the
    histogram's entropy (``sum c log2(n / c)``; a length-limited code is a prefix code too), rounded down with a
    margin well above float64 rounding. Costs one vectorised pass instead of the Huffman tree."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    n = float(c.sum())
    entropy_bits = float((c * np.log2(n / c)).sum()) if len(c) > 1 else 0.0
    return nbytes(table_bits(len(counts)) + max(0, math.floor(entropy_bits * (1 - 1e-9)) - 1))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical codewords (int64, most significant bit first) of ``lengths``; 0 for absent symbols."""
    ln = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(ln), dtype=np.int64)
    order = sorted((int(ln[s]), s) for s in np.flatnonzero(ln > 0))
    code, prev = -1, 0
    for length, s in order:
        code = (code + 1) << (length - prev) if code >= 0 else 0
        prev = length
        codes[s] = code
    return codes


def _reverse(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each codeword with its ``lengths[i]`` low bits reversed (its first bit becomes the least significant)."""
    out = np.zeros(len(codes), dtype=np.int64)
    for j in range(int(lengths.max()) if len(lengths) else 0):
        bit = (codes >> np.maximum(lengths - 1 - j, 0)) & 1
        out |= np.where(j < lengths, bit << j, 0)
    return out


def check_lengths(lengths: np.ndarray, name: str) -> None:
    """:class:`FormatError` unless ``lengths`` describe a prefix code (Kraft sum at most 1) with a symbol."""
    ln = np.asarray(lengths, dtype=np.int64)
    used = ln[ln > 0]
    if not len(used):
        raise FormatError(f"{name}: a Huffman table without symbols")
    if int(used.max()) > MAX_CODE_LEN:
        raise FormatError(f"{name}: a Huffman code length above {MAX_CODE_LEN}")
    if int(np.sum(1 << (MAX_CODE_LEN - used))) > 1 << MAX_CODE_LEN:
        raise FormatError(f"{name}: the Huffman code lengths do not form a prefix code")


def pack_lengths(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The code-length table as (values, widths) for :func:`~xaicomp_core.format.bitstream.pack_bits`."""
    ln = np.asarray(lengths, dtype=np.int64)
    return ln, np.full(len(ln), LENGTH_BITS, dtype=np.int64)


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codewords of ``symbols`` as (values, widths) for :func:`pack_bits` (first codeword bit first)."""
    ln = np.asarray(lengths, dtype=np.int64)
    sym = np.asarray(symbols, dtype=np.int64)
    if len(sym) and (int(sym.min()) < 0 or int(sym.max()) >= len(ln) or bool((ln[sym] == 0).any())):
        raise RuntimeError("a symbol without a Huffman code")
    rev = _reverse(canonical_codes(ln), ln)
    return rev[sym], ln[sym]


def encode_section(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    """One class's part of a ``huffman`` value section: the lengths of ``counts``' code, then ``symbols`` coded.

    Its length is :func:`section_bytes` of ``counts`` (the histogram of ``symbols`` over the alphabet).
    """
    lengths = code_lengths(counts)
    tv, tw = pack_lengths(lengths)
    sv, sw = encode(symbols, lengths)
    return pack_bits(np.concatenate([tv, sv]), np.concatenate([tw, sw]))


def decode_section(data: bytes | memoryview, alphabet: int, count: int, name: str) -> tuple[np.ndarray, int]:
    """Inverse of :func:`encode_section` for ``count`` symbols of an ``alphabet``-symbol code, from untrusted
    ``data`` that starts with the section (and may go on after it): the symbols (int64) and the section's bytes."""
    buf = np.frombuffer(data, dtype=np.uint8)
    tb = table_bits(alphabet)
    end = 8 * len(buf)  # stream bits available, the table's included

    def bits(lo: int, hi: int) -> np.ndarray:
        """Stream bits ``lo .. hi-1`` (int64), zeros past the end: only these bytes are unpacked."""
        raw = np.unpackbits(buf[lo // 8:min(len(buf), (hi + 7) // 8)], bitorder="little")[lo % 8:lo % 8 + hi - lo]
        return np.concatenate([raw, np.zeros(hi - lo - len(raw), dtype=np.uint8)]).astype(np.int64)

    if end < tb:
        raise FormatError(f"{name}: the Huffman table is truncated")
    weights = 1 << np.arange(LENGTH_BITS, dtype=np.int64)
    lengths = bits(0, tb).reshape(alphabet, LENGTH_BITS) @ weights
    check_lengths(lengths, name)
    max_len = int(lengths.max())
    # lookup table over max_len stream bits (first stream bit least significant): symbol and its length
    lookup_sym = np.full(1 << max_len, -1, dtype=np.int64)
    lookup_len = np.zeros(1 << max_len, dtype=np.int64)
    rev = _reverse(canonical_codes(lengths), lengths)
    for s in np.flatnonzero(lengths > 0):
        step = 1 << int(lengths[s])
        lookup_sym[int(rev[s])::step] = s
        lookup_len[int(rev[s])::step] = lengths[s]
    peek_weights = 1 << np.arange(max_len, dtype=np.int64)
    out: list[int] = []
    pos = tb
    while len(out) < count:
        lo = pos
        hi = min(lo + DECODE_WINDOW, end)
        if lo >= end:
            raise FormatError(f"{name}: the Huffman stream ends after {len(out)} of {count} values")
        chunk = bits(lo, hi + max_len)
        peek = np.lib.stride_tricks.sliding_window_view(chunk, max_len)[:hi - lo] @ peek_weights
        wsym = lookup_sym[peek].tolist()
        wnext = (np.arange(lo, hi) + lookup_len[peek]).tolist()
        while len(out) < count and pos < hi:
            s = wsym[pos - lo]
            if s < 0:
                raise FormatError(f"{name}: a bit pattern in the Huffman stream is no codeword")
            out.append(s)
            pos = wnext[pos - lo]
    if pos > end:
        raise FormatError(f"{name}: the Huffman stream ends inside a codeword")
    return np.asarray(out, dtype=np.int64), nbytes(pos)
