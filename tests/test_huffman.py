"""The Huffman-coded values of format version 2 (xaicomp_core.format.huffman and the ``huffman`` value codec):
a hand-worked example byte for byte, optimality and the length limit against a brute-force reference, round trips
that cost what they write, and untrusted sections (over-full tables, codes that are no codewords, streams that end
early or run on) refused with one FormatError line."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
import torch

from xaicomp_core import FormatError
from xaicomp_core.compress.quantize import dequantize_codes
from xaicomp_core.format import huffman
from xaicomp_core.format.codecs import VALUE_CODECS, alphabet, choose_values, value_codec, value_stats


def optimal_bits(counts) -> int:
    """The bits of an optimal prefix code of ``counts`` (the sum of the merged weights, Huffman's theorem)."""
    h = [int(c) for c in counts if c > 0]
    if len(h) == 1:
        return h[0]
    heapq.heapify(h)
    total = 0
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h)
        total += a + b
        heapq.heappush(h, a + b)
    return total


def test_hand_worked_section():
    # a 2-bit class (alphabet 0, 1, 2) with codes 0 2 2 2 0 2: lengths 1 0 1, canonical codewords 0 -> "0", 2 -> "1"
    sym = np.array([0, 2, 2, 2, 0, 2])
    counts = np.bincount(sym, minlength=3)
    assert huffman.code_lengths(counts).tolist() == [1, 0, 1]
    assert huffman.canonical_codes(np.array([1, 0, 1])).tolist() == [0, 0, 1]
    # table 0001 0000 0001 (each 4-bit length least significant bit first), then the bits 0 1 1 1 0 1:
    # stream bits 0..11 give 0x01 and the low nibble 0x1; bits 12..17 are 0 1 1 1 | 0 1
    data = huffman.encode_section(sym, counts)
    assert data == bytes([0x01, 0xE1, 0x02])
    assert huffman.section_bytes(counts) == 3
    back, used = huffman.decode_section(data + b"\xff", 3, 6, "t")
    assert back.tolist() == sym.tolist() and used == 3


def test_canonical_codes_follow_length_then_symbol():
    # lengths 2 1 3 3 (DEFLATE's rule): 1 -> 0, 0 -> 10, 2 -> 110, 3 -> 111
    assert huffman.canonical_codes(np.array([2, 1, 3, 3])).tolist() == [0b10, 0b0, 0b110, 0b111]


@pytest.mark.parametrize("seed", range(6))
def test_lengths_are_optimal_and_form_a_prefix_code(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, rng.integers(2, 12)) * (rng.random(1) < 2)
    counts[rng.integers(len(counts))] += 1
    lengths = huffman.code_lengths(counts)
    assert huffman.coded_bits(counts, lengths) == optimal_bits(counts)
    assert ((lengths > 0) == (counts > 0)).all()
    huffman.check_lengths(lengths, "t")
    codes = huffman.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)]
    assert not any(a != b and b.startswith(a) for a, b in itertools.permutations(words, 2))


def test_deep_codes_are_limited_to_15_bits():
    counts = np.array([2 ** i for i in range(30)])  # the optimal code is 29 bits deep
    lengths = huffman.code_lengths(counts)
    assert int(lengths.max()) == huffman.MAX_CODE_LEN
    huffman.check_lengths(lengths, "t")
    sym = np.repeat(np.arange(30), np.minimum(counts, 50))
    data = huffman.encode_section(sym, np.bincount(sym, minlength=30))
    assert huffman.decode_section(data, 30, len(sym), "t")[0].tolist() == sym.tolist()


def _histograms():
    """Histograms of every shape the size accounting meets: one symbol, two, uniform, skewed, sparse over 256
    symbols, and one deep enough to need the length limit."""
    rng = np.random.default_rng(7)
    out = [np.array([0, 9, 0]), np.array([5, 0, 1]), np.array([1, 1]), np.full(16, 40),
           np.array([2 ** i for i in range(30)]), np.array([10 ** 6, 1, 1, 0])]
    for _ in range(200):
        n = int(rng.choice([3, 4, 8, 16, 128, 256]))
        c = rng.integers(0, rng.choice([2, 20, 5000]), n) * (rng.random(n) < rng.random())
        if rng.random() < 0.5:  # bell-shaped, like quantized weights
            c = np.round(rng.random() * 10 ** rng.integers(2, 6) * np.exp(-((np.arange(n) - n / 2) / (n / 8 + 1)) ** 2))
        c = c.astype(np.int64)
        c[rng.integers(n)] += 1
        out.append(c)
    return out


def test_section_lower_bound_is_below_the_section_and_close_to_it():
    for counts in _histograms():
        exact, bound = huffman.section_bytes(counts), huffman.section_bytes_lower_bound(counts)
        assert bound <= exact, counts
        # Huffman is within one bit per symbol of the entropy (more only where the length limit cut the code)
        assert exact - bound <= (int(counts.sum()) + 7) // 8 + 2 or int(huffman.code_lengths(counts).max()) == 15


def test_values_lower_bound_is_below_the_cheapest_encoding():
    from xaicomp_core.format.codecs import ValueStats, values_lower_bound

    rng = np.random.default_rng(3)
    hists = _histograms()
    for _ in range(100):
        levels = [32, 8, 4, 2][int(rng.integers(0, 2)):]
        hist = {c: np.resize(hists[int(rng.integers(len(hists)))], alphabet(b)) for c, b in enumerate(levels)
                if b != 32}
        counts = np.array([int(rng.integers(0, 50)) if b == 32 else int(hist[c].sum()) for c, b in enumerate(levels)])
        s = ValueStats(levels, counts, {c: h for c, h in hist.items() if counts[c]})
        if not s.hist:
            continue
        assert values_lower_bound(s) <= choose_values(s)[1]


def test_a_long_stream_decodes_across_windows(monkeypatch):
    monkeypatch.setattr(huffman, "DECODE_WINDOW", 37)
    rng = np.random.default_rng(1)
    sym = rng.choice(7, 5000, p=[0.02, 0.1, 0.3, 0.01, 0.3, 0.2, 0.07])
    counts = np.bincount(sym, minlength=7)
    data = huffman.encode_section(sym, counts)
    assert len(data) == huffman.section_bytes(counts)
    back, used = huffman.decode_section(data, 7, len(sym), "t")
    assert back.tolist() == sym.tolist() and used == len(data)


def table(lengths) -> list[int]:
    """Stream bits of a code-length table."""
    return [(int(n) >> j) & 1 for n in lengths for j in range(huffman.LENGTH_BITS)]


def to_bytes(bits: list[int]) -> bytes:
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()


@pytest.mark.parametrize("alpha, bits, count, message", [
    (3, table([1, 1, 1]), 1, "do not form a prefix code"),         # over-full: three 1-bit codewords
    (3, table([0, 0, 0]), 1, "without symbols"),
    (2, table([1, 0]) + [1], 1, "no codeword"),                     # "1" is unassigned in a one-symbol code
    (3, table([1, 0, 1]) + [0, 1], 5, "ends after 4 of 5"),        # 2 bits and 2 of padding: at most 4 symbols
    (3, table([1, 2, 2]) + [0, 0, 0, 1], 4, "ends inside a codeword"),  # "1" starts a 2-bit codeword at the end
    (3, table([1, 0])[:3], 1, "table is truncated"),
])
def test_malformed_sections_are_refused(alpha, bits, count, message):
    with pytest.raises(FormatError, match=message):
        huffman.decode_section(to_bytes(bits), alpha, count, "t")


# ----------------------------------------------------------------------------------------------------------------
# the value codec
# ----------------------------------------------------------------------------------------------------------------
def kept_weights(rng, levels, n):
    kc = rng.integers(0, len(levels), n)
    bits = np.asarray(levels)[kc]
    qmax = (2 ** (bits - 1) - 1).clip(min=0)
    # codes away from the middle (pruning removed the small weights), so Huffman pays off
    codes = np.where(bits == 1, rng.integers(0, 2, n), qmax + rng.choice([-1, 1], n) * rng.integers(1, 3, n))
    codes = np.where(bits >= 32, 0, np.clip(codes, 0, 2 * qmax))
    values = rng.standard_normal(n).astype(np.float32)
    return kc, codes, values


def test_registry_holds_both_value_encodings_in_order():
    assert list(VALUE_CODECS) == ["fixed", "huffman"]


@pytest.mark.parametrize("levels", [[2], [3], [8, 4, 2], [32, 4, 1], [6, 32]])
def test_huffman_values_round_trip_and_cost_what_they_write(levels):
    rng = np.random.default_rng(len(levels))
    kc, codes, values = kept_weights(rng, levels, 3000)
    codec = value_codec("huffman")
    stats = value_stats(codes, kc, levels)
    data = codec.encode(codes, values, kc, levels)
    assert len(data) == codec.cost(stats)
    scales = rng.random(len(kc)).astype(np.float32) + 0.1
    vals, got = codec.decode(data, kc, levels, scales, "t")
    bits = np.asarray(levels)[kc]
    fp = bits == 32
    assert np.array_equal(vals[fp].view("<u4"), values[fp].view("<u4"))
    assert np.array_equal(got[~fp], codes[~fp])
    ref = dequantize_codes(torch.from_numpy(codes[~fp].astype(np.int32)), torch.from_numpy(bits[~fp]),
                           torch.from_numpy(scales[~fp]))
    assert torch.equal(torch.from_numpy(vals[~fp]), ref)
    with pytest.raises(FormatError, match="values section"):
        codec.decode(data + b"\x00", kc, levels, scales, "t")
    with pytest.raises(FormatError):
        codec.decode(data[:-1], kc, levels, scales, "t")


def test_two_bit_signs_cost_one_bit_each():
    # pruned layers keep no zero codes: a 2-bit ternary class stores only signs, one bit each with Huffman
    rng = np.random.default_rng(0)
    n = 8000
    kc = np.zeros(n, dtype=np.int64)
    codes = rng.choice([0, 2], n)
    stats = value_stats(codes, kc, [2])
    assert value_codec("fixed").cost(stats) == 2 * n // 8
    assert value_codec("huffman").cost(stats) == (3 * huffman.LENGTH_BITS + n + 7) // 8
    assert choose_values(stats) == ("huffman", value_codec("huffman").cost(stats))


def test_a_code_outside_the_alphabet_is_refused():
    # a 2-bit class's table covers codes 0..2 only; a 3 cannot be coded, and the writer refuses it
    with pytest.raises(RuntimeError):
        huffman.encode(np.array([3]), np.array([1, 0, 1]))


def test_small_tensors_keep_fixed_width_values():
    # 8-bit codes of 40 weights: the 255-entry table alone costs more than the values
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 255, 40)
    stats = value_stats(codes, np.zeros(40, dtype=np.int64), [8])
    assert choose_values(stats) == ("fixed", 40)
    assert alphabet(8) == 255 and alphabet(1) == 2 and alphabet(2) == 3
