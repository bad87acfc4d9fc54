"""The section codecs of the packed format (xaicomp_core.format.codecs): every registered keep codec, class-id layout,
the scale and the value section round-trips, its cost equals the length of what it writes, and its reader rejects
malformed sections with FormatError. The Rice code is checked against a bit-by-bit reference coder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xaicomp_core import FormatError
from xaicomp_core.compress.quantize import dequantize_codes
from xaicomp_core.format.bitstream import (
    pack_bits,
    rice_bytes,
    rice_cost,
    rice_decode,
    rice_encode,
    rice_gaps,
    rice_parameter,
)
from xaicomp_core.format.codecs import (
    CLASS_LAYOUTS,
    KEEP_CODECS,
    SCALES,
    KeepStats,
    choose_keep,
    scale_groups,
    value_codec,
    value_stats,
)
from xaicomp_core.format.packing import KEEP_ENCODINGS
from xaicomp_core.format.size import keep_encoding


def structured(mask: np.ndarray, channels: int) -> bool:
    m = mask.reshape(channels, -1)
    return bool((m.all(1) | ~m.any(1)).all())


def masks() -> list[tuple[np.ndarray, int]]:
    """(flat keep-mask, output channels): random densities, extremes, whole-channel masks, tiny tensors."""
    rng = np.random.default_rng(0)
    out: list[tuple[np.ndarray, int]] = []
    for n, c in [(1, 1), (6, 2), (64, 8), (1000, 10), (4096, 16)]:
        for density in [0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0]:
            out.append((rng.random(n) < density, c))
        one = np.zeros(n, dtype=bool)
        one[n // 2] = True
        out.append((one, c))
        out.append((~one, c))
        out.append((np.repeat(rng.random(c) < 0.5, n // c), c))  # whole channels kept or removed
    return out


def stats_of(mask: np.ndarray, c: int) -> KeepStats:
    kept = int(mask.sum())
    return KeepStats(mask.size, kept, c, kept < mask.size and structured(mask, c), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# keep codecs
# ----------------------------------------------------------------------------------------------------------------
def test_registry_holds_the_format_table_in_order():
    assert list(KEEP_ENCODINGS) == KEEP_CODECS.names()
    assert KEEP_CODECS.names()[:7] == ["dense", "bitmask", "indices", "pruned-indices", "channels", "rice",
                                        "rice-pruned"]
    assert CLASS_LAYOUTS.names()[:3] == ["weight", "channel", "layer"]
    with pytest.raises(FormatError, match="unknown keep encoding"):
        KEEP_CODECS.get("no-such-encoding")


def test_every_keep_codec_round_trips_and_costs_what_it_writes():
    used = set()
    for mask, c in masks():
        s = stats_of(mask, c)
        for name, codec in KEEP_CODECS.items():
            if not codec.applies(s):
                continue
            used.add(name)
            data, fields = codec.encode(mask, c, codec.param(s))
            assert len(data) == codec.cost(s), (name, mask.size, s.kept)
            entry = {"name": "t", "keep": name, "kept": s.kept, **fields}
            assert np.array_equal(codec.decode(data, entry, mask.size, c, s.kept, "t"), mask), name
    assert used == set(KEEP_CODECS.names())


def test_keep_decoders_reject_sections_of_the_wrong_length():
    for mask, c in masks():
        s = stats_of(mask, c)
        for _, codec in KEEP_CODECS.items():
            if not codec.applies(s):
                continue
            data, fields = codec.encode(mask, c, codec.param(s))
            entry = {"name": "t", **fields}
            with pytest.raises(FormatError):
                codec.decode(data + b"\x00", entry, mask.size, c, s.kept, "t")
            if data:
                with pytest.raises(FormatError):
                    codec.decode(data[:-1], entry, mask.size, c, s.kept, "t")


def test_keep_decoders_reject_inconsistent_fields():
    n = 1000
    with pytest.raises(FormatError, match="dense keep-encoding"):
        KEEP_CODECS.get("dense").decode(b"", {}, n, 10, n - 1, "t")
    # indices must be strictly ascending and below n
    idx = KEEP_CODECS.get("indices")
    data, _ = idx.encode(np.arange(n) < 3, 10, 0)
    bad = bytearray(data)
    bad[0] ^= 0x01  # the first index becomes 1: equal to the second
    with pytest.raises(FormatError, match="ascending"):
        idx.decode(bytes(bad), {}, n, 10, 3, "t")
    with pytest.raises(FormatError, match="out of range"):
        idx.decode(pack_bits(np.array([5, 6, n]), 10), {}, n, 10, 3, "t")  # position n is past the end
    rice = KEEP_CODECS.get("rice")
    mask = np.random.default_rng(1).random(n) < 0.1
    s = stats_of(mask, 10)
    data, fields = rice.encode(mask, 10, rice.param(s))
    with pytest.raises(FormatError, match="rice_k"):
        rice.decode(data, {}, n, 10, s.kept, "t")
    with pytest.raises(FormatError, match="out of range"):
        rice.decode(data, {"rice_k": 41}, n, 10, s.kept, "t")
    with pytest.raises(FormatError, match="negative"):
        rice.decode(data, {"rice_k": -1}, n, 10, s.kept, "t")


def test_choose_keep_takes_the_cheapest_and_ties_go_to_the_earlier_codec():
    for mask, c in masks():
        s = stats_of(mask, c)
        name, cost, param = choose_keep(s)
        costs = [(codec.cost(s), n) for n, codec in KEEP_CODECS.items() if codec.applies(s)]
        assert cost == min(costs)[0]
        assert name == next(n for k, n in costs if k == cost)
        assert param == KEEP_CODECS.get(name).param(s)
    # the size accounting's public helper is the same choice
    assert keep_encoding(1000, 500, 4, False, (1, 125)) == ("bitmask", 125)


# ----------------------------------------------------------------------------------------------------------------
# class-id layouts, scales, values
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_levels", [1, 2, 3, 5])
def test_class_layouts_round_trip_and_cost_what_they_write(n_levels):
    rng = np.random.default_rng(n_levels)
    c, per = 12, 9
    mask = rng.random(c * per) < 0.6
    mask[:per] = False  # a channel without kept weights
    idx = np.flatnonzero(mask)
    ch = idx // per
    per_weight = rng.integers(0, n_levels, len(idx))
    per_channel = rng.integers(0, n_levels, c)[ch]
    per_layer = np.full(len(idx), n_levels - 1)
    for name, kc in [("weight", per_weight), ("channel", per_channel), ("layer", per_layer)]:
        layout = CLASS_LAYOUTS.get(name)
        data, fields = layout.encode(kc, ch, c, n_levels, "t")
        assert len(data) == layout.cost(len(idx), c, n_levels)
        assert np.array_equal(layout.decode(data, fields, len(idx), c, ch, n_levels, "t"), kc), name
        with pytest.raises(FormatError):
            layout.decode(data + b"\x00", fields, len(idx), c, ch, n_levels, "t")
    with pytest.raises(RuntimeError, match="mixed classes"):
        CLASS_LAYOUTS.get("layer").encode(np.array([0, 1]), np.array([0, 0]), c, 2, "t")
    with pytest.raises(RuntimeError, match="mixed classes"):
        CLASS_LAYOUTS.get("channel").encode(np.array([0, 1]), np.array([0, 0]), c, 2, "t")
    with pytest.raises(FormatError, match="layer class"):
        CLASS_LAYOUTS.get("layer").decode(b"", {"layer_class": n_levels}, 3, c, ch[:3], n_levels, "t")
    with pytest.raises(FormatError, match="layer_class"):
        CLASS_LAYOUTS.get("layer").decode(b"", {}, 3, c, ch[:3], n_levels, "t")


def test_channel_class_out_of_range_is_rejected():
    layout = CLASS_LAYOUTS.get("channel")
    # 3 levels, 2 bits per channel: the id 3 does not exist
    with pytest.raises(FormatError, match="channel class id"):
        layout.decode(bytes([0b11]), {}, 1, 1, np.array([0]), 3, "t")


def test_scales_and_values_round_trip_and_cost_what_they_write():
    rng = np.random.default_rng(5)
    levels = [32, 8, 4, 2, 1]
    c, per = 6, 20
    kc = rng.integers(0, len(levels), c * per)
    ch = np.repeat(np.arange(c), per)
    bits = np.asarray(levels)[kc]
    qmax = np.where(bits == 1, 0, 2 ** (np.minimum(bits, 8) - 1) - 1)
    codes = np.where(bits == 1, rng.integers(0, 2, len(bits)), rng.integers(0, 2 * qmax + 1))
    codes[bits == 32] = 0
    values = rng.standard_normal(len(bits)).astype(np.float32)
    counts = np.bincount(ch * len(levels) + kc, minlength=c * len(levels)).reshape(c, len(levels))
    groups = scale_groups(counts, levels)
    scales = rng.random((c, len(levels))).astype(np.float32) + 0.1

    sdata = SCALES.encode(scales, groups)
    assert len(sdata) == SCALES.cost(int(groups.sum()))
    grid = SCALES.decode(sdata, groups, "t")
    assert np.array_equal(grid[groups], scales[groups]) and not grid[~groups].any()
    with pytest.raises(FormatError, match="scale bytes"):
        SCALES.decode(sdata[:-4], groups, "t")

    fixed = value_codec("fixed")
    vdata = fixed.encode(codes, values, kc, levels)
    assert len(vdata) == fixed.cost(value_stats(codes, kc, levels)) == math.ceil(int(bits.sum()) / 8)
    vals, got = fixed.decode(vdata, kc, levels, grid[ch, kc], "t")
    fp = bits == 32
    assert np.array_equal(vals[fp].view("<u4"), values[fp].view("<u4"))
    assert np.array_equal(got[~fp], codes[~fp]) and not got[fp].any()
    ref = dequantize_codes(torch.from_numpy(codes[~fp].astype(np.int32)), torch.from_numpy(bits[~fp]),
                           torch.from_numpy(grid[ch, kc][~fp]))
    assert torch.equal(torch.from_numpy(vals[~fp]), ref)
    with pytest.raises(FormatError, match="values section"):
        fixed.decode(vdata + b"\x00", kc, levels, grid[ch, kc], "t")
    # a 2-bit code of 3 is above 2 * qmax = 2
    with pytest.raises(FormatError, match="code is out of range"):
        fixed.decode(bytes([0b11]), np.array([0]), [2], np.ones(1, dtype=np.float32), "t")


# ----------------------------------------------------------------------------------------------------------------
# the Rice code
# ----------------------------------------------------------------------------------------------------------------
def naive_rice(positions: list[int], k: int) -> bytes:
    """Bit-by-bit Rice coder following docs/FORMAT.md."""
    def to_bytes(bits: list[int]) -> bytes:
        out = bytearray((len(bits) + 7) // 8)
        for i, b in enumerate(bits):
            out[i // 8] |= b << (i % 8)
        return bytes(out)

    prev, unary, low = -1, [], []
    for p in positions:
        g = p - prev - 1
        prev = p
        unary += [1] * (g >> k) + [0]
        low += [(g >> j) & 1 for j in range(k)]
    return to_bytes(unary) + to_bytes(low)


def test_rice_code_matches_a_bit_by_bit_coder():
    rng = np.random.default_rng(2)
    for n, density in [(1, 1.0), (10, 0.5), (300, 0.05), (2000, 0.3), (5000, 0.01)]:
        pos = np.flatnonzero(rng.random(n) < density)
        for k in range(0, 7):
            data = rice_encode(pos, k)
            assert data == naive_rice(pos.tolist(), k)
            assert len(data) == rice_bytes(rice_gaps(pos), k)
            assert np.array_equal(rice_decode(data, len(pos), k, n), pos)
        k, cost = rice_parameter(rice_gaps(pos))
        assert (k, cost) == rice_cost(pos) == rice_cost(torch.from_numpy(pos))
        # the chosen parameter is the cheapest of its search window around log2 of the mean gap
        assert cost == min(rice_bytes(rice_gaps(pos), j) for j in range(max(0, k - 2), k + 3)) if len(pos) else 0
