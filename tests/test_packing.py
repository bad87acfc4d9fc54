"""The packed format: bit streams, exact round trips (weights bit-identical, logits torch.equal, payload == estimate)
for many plans and every built-in model, and clear errors for truncated, altered or unknown files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from xaicomp_core import CompressionPlan, FormatError
from xaicomp_core.compress.compress import Compressor
from xaicomp_core.compress.layout import SortedScores
from xaicomp_core.compress.quantize import allocate_bits, dequantize_codes, quantize
from xaicomp_core.evaluate.session import CompressedWeights
from xaicomp_core.format.codecs import (
    KEEP_CODECS,
    VALUE_CODECS,
    KeepCodec,
    expect_length,
    register_keep_codec,
    register_value_codec,
)
from xaicomp_core.format.packing import (
    FORMAT_VERSION,
    KEEP_ENCODINGS,
    MAGIC,
    PREAMBLE,
    PREAMBLE_BYTES,
    pack,
    pack_bits,
    read_header,
    unpack,
    unpack_bits,
)
from xaicomp_core.format.size import compute_size, stored_masks, zero_codes
from xaicomp_core.io.export import exact_logits, forward_logits

BUILTINS = ["fashion-lenet", "fashion-vgg", "fashion-resnet"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def state_of(session) -> dict[str, torch.Tensor]:
    return session.model.state_dict()


def pack_plan(session, plan: CompressionPlan, codec: str = "none"):
    cw = compressed(session, plan)
    return cw, pack(cw, state_of(session), session.info, codec=codec)


def recompress(session, plan: CompressionPlan, keep: torch.Tensor, zeros_as_pruned: bool = True) -> CompressedWeights:
    """The plan's bit allocation and quantization on a hand-made keep-mask, with the engine's own functions."""
    layout = session.layout_for(plan.protect)
    params = dict(session.model.named_parameters())
    w = layout.flat({n: params[n] for n in layout.names}).float()
    keep = keep | layout.protected_flat
    levels = list(plan.bit_levels)
    scores = SortedScores.build(layout, w.abs().double())
    klass = allocate_bits(layout, keep, scores.flat, scores.global_order.flip(0),
                          {i: o.flip(0) for i, o in scores.layer_orders.items()}, levels, plan.bit_split,
                          plan.granularity, plan.scope)
    quant = quantize(layout, w, keep, klass, levels, plan.quantizer)
    size = compute_size(layout, keep, klass, quant.group_count, levels, plan.granularity, state_of(session),
                        codes=quant.codes, zeros_as_pruned=zeros_as_pruned)
    return CompressedWeights(plan, layout, keep, quant, size)


def check_round_trip(session, cw: CompressedWeights, codec: str = "none"):
    """Pack, read back and compare everything with the engine's result; returns (PackResult, PackedModel)."""
    res = pack(cw, state_of(session), session.info, codec=codec)
    assert res.payload_bytes == cw.size.estimated_bytes
    header_json = res.data[PREAMBLE_BYTES:res.header_bytes]
    assert res.header_bytes == PREAMBLE_BYTES + len(header_json)
    assert res.file_bytes == res.header_bytes + res.stored_payload_bytes
    if codec == "none":
        assert res.file_bytes == res.header_bytes + res.payload_bytes
    pm = unpack(res.data)
    assert pm.payload_bytes == res.payload_bytes
    assert torch.equal(pm.values, cw.quant.values)
    # the file stores the plan's masks, except that tensors whose size row says so store their zero codes as pruned
    keep, klass, gc = stored_masks(cw.layout, cw.keep, cw.quant.klass, cw.quant.codes, cw.quant.levels, cw.size,
                                   cw.quant.group_count)
    zero = zero_codes(cw.quant.klass, cw.quant.codes, cw.quant.levels)
    assert torch.equal(keep ^ cw.keep, zero & ~keep) and bool((cw.quant.values[zero] == 0).all())
    rows = {t.name: t for t in cw.size.tensors}
    for i, name in enumerate(cw.layout.names):
        z = int(zero[cw.layout.layer_slice(i)].sum())
        assert rows[name].zeros_pruned in (0, z) and rows[name].kept == int(keep[cw.layout.layer_slice(i)].sum()) \
            or cw.layout.protected[i]
    # ... and only where that is cheaper: each row is the cheaper of the plan's masks and the stored ones
    state = {**state_of(session), **cw.overrides}
    q = cw.quant
    as_planned = compute_size(cw.layout, cw.keep, q.klass, q.group_count, q.levels, cw.plan.granularity, state,
                              codes=q.codes, zeros_as_pruned=False)
    # the stored counts are those of the stored classes
    assert torch.equal(gc, torch.bincount(cw.layout.channel_of[klass >= 0] * len(q.levels) + klass[klass >= 0].long(),
                                          minlength=q.group_count.numel()).view_as(q.group_count))
    as_stored = compute_size(cw.layout, keep, klass, gc, q.levels, cw.plan.granularity, state, codes=q.codes,
                             zeros_as_pruned=False)
    for row, a, b in zip(cw.size.tensors, as_planned.tensors, as_stored.tensors):
        assert row.total == (b.total if row.zeros_pruned else a.total) and row.total <= a.total, row.name
        assert not row.zeros_pruned or b.total < a.total, row.name
    assert torch.equal(pm.keep | pm.layout.protected_flat, keep | cw.layout.protected_flat)
    active = klass >= 0
    assert torch.equal(pm.klass, klass)
    quantized = active & (torch.tensor(cw.quant.levels)[klass.long().clamp(min=0)] != 32)
    assert torch.equal(pm.codes[quantized], cw.quant.codes[quantized])
    assert pm.size().estimated_bytes == res.payload_bytes
    original = {**state_of(session), **cw.overrides}  # removed filters: zeroed bias / BatchNorm
    assert list(pm.state) == list(original)
    for name, t in original.items():
        if name in pm.weights():  # conv/linear weights, protected ones included, were compared above
            continue
        if t.is_floating_point():
            assert torch.equal(pm.state[name], t.float()), name
        else:
            assert not pm.state[name].any() and pm.state[name].shape == t.shape
    return res, pm


def assert_same_logits(session, cw: CompressedWeights, pm) -> None:
    """The reloaded model's logits equal the session's compressed model's, bit for bit."""
    reloaded = forward_logits(pm.build_model(), session.x_eval, session.eval_batch_size)
    assert torch.equal(reloaded, forward_logits(session.compressed_model(cw), session.x_eval, session.eval_batch_size))


_CACHE: dict[tuple[int, str], CompressedWeights] = {}


def compressed(session, plan: CompressionPlan) -> CompressedWeights:
    """``session.compress(plan)``, once per session and plan (compressing is the slow part of these tests)."""
    key = (id(session), plan.key())
    if key not in _CACHE:
        _CACHE[key] = session.compress(plan)
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------------------------
# bit streams
# ----------------------------------------------------------------------------------------------------------------
def naive_pack(values, widths) -> bytes:
    bits = []
    for v, w in zip(values, widths):
        bits.extend((int(v) >> k) & 1 for k in range(w))
    out = bytearray((len(bits) + 7) // 8)
    for k, b in enumerate(bits):
        out[k // 8] |= b << (k % 8)
    return bytes(out)


def test_bit_order_is_lsb_first():
    assert pack_bits(np.array([1, 2, 3]), 2) == bytes([0b111001])
    assert pack_bits(np.array([1, 0x1F, 3]), np.array([1, 5, 2])) == bytes([0xFF])
    assert pack_bits(np.array([0xABC, 1]), np.array([12, 1])) == bytes([0xBC, 0x1A])
    # a float32 value at 32 bits after a 3-bit value: its little-endian bytes shifted by 3 bits
    u = np.array([1.5], dtype="<f4").view("<u4")[0]
    assert pack_bits(np.array([5, u]), np.array([3, 32])) == naive_pack([5, int(u)], [3, 32])
    assert pack_bits(np.array([], dtype=np.uint64), 4) == b""


def test_pack_bits_matches_naive_and_round_trips():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        widths = rng.integers(1, 33, n)
        values = rng.integers(0, 2 ** 32, n, dtype=np.uint64) & ((np.uint64(1) << widths.astype(np.uint64))
                                                                - np.uint64(1))
        data = pack_bits(values, widths)
        assert data == naive_pack(values, widths)
        assert np.array_equal(unpack_bits(data, widths, n), values)
    big = rng.integers(0, 256, 200_000).astype(np.uint64)
    assert np.array_equal(unpack_bits(pack_bits(big, 8), 8, len(big)), big)


def test_pack_bits_rejects_values_too_wide():
    with pytest.raises(ValueError):
        pack_bits(np.array([4]), 2)
    with pytest.raises(FormatError):
        unpack_bits(b"\x00", 4, 3)


# ----------------------------------------------------------------------------------------------------------------
# round trips on LeNet: every plan shape
# ----------------------------------------------------------------------------------------------------------------
P842 = dict(bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])
PLANS = {
    "no-pruning-fp32": CompressionPlan(),
    "lrp-842-weight": CompressionPlan(criterion="lrp", prune_ratio=0.5, **P842),
    "lrp-842-channel": CompressionPlan(criterion="lrp", prune_ratio=0.5, granularity="channel", **P842),
    "lrp-842-layer": CompressionPlan(criterion="lrp", prune_ratio=0.5, granularity="layer", **P842),
    "per-layer-scope": CompressionPlan(criterion="lrp", prune_ratio=0.6, scope="per-layer", **P842),
    "uniform-1bit": CompressionPlan.uniform(1, criterion="magnitude", prune_ratio=0.3),
    "uniform-8bit-protect": CompressionPlan.uniform(8, criterion="lrp", prune_ratio=0.4, protect="first-last"),
    "8-and-1-bit": CompressionPlan(criterion="lrp", prune_ratio=0.3, bit_levels=[8, 1], bit_split=[0.5]),
    "fp32-class-mixed": CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[32, 4, 1], bit_split=[0.1, 0.6]),
    "fp32-class-channel": CompressionPlan(criterion="magnitude", prune_ratio=0.2, bit_levels=[32, 3],
                                          bit_split=[0.25], granularity="channel", protect="first-last"),
    "filter-structured": CompressionPlan(criterion="lrp-filter", prune_ratio=0.3, **P842),
    "paper-rule": CompressionPlan(criterion="paper", bit_levels=[6, 2], bit_split=[0.5]),
    "sparse-indices": CompressionPlan.uniform(4, criterion="magnitude", prune_ratio=0.95),
    "light-pruned-indices": CompressionPlan.uniform(5, criterion="magnitude", prune_ratio=0.01),
    "extreme-sparse": CompressionPlan.uniform(4, criterion="magnitude", prune_ratio=0.998),
    "absmax-7-3": CompressionPlan(criterion="random", prune_ratio=0.5, bit_levels=[7, 3], bit_split=[0.4],
                                  quantizer="absmax", seed=3),
    "magnitude-ranked-bits": CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_ranking="magnitude", **P842),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_round_trip_lenet(lenet_session, name):
    plan = PLANS[name]
    cw = compressed(lenet_session, plan)
    _, pm = check_round_trip(lenet_session, cw)
    assert_same_logits(lenet_session, cw, pm)
    assert pm.plan == plan


@pytest.mark.parametrize("name", ["lrp-842-weight", "lrp-842-channel", "8-and-1-bit", "absmax-7-3"])
def test_the_lower_bound_shortcut_changes_no_size(lenet_session, monkeypatch, name):
    """compute_size prices the plan's masks exactly only where a lower bound of them is not above the masks with
    the zero codes stored as pruned; with the bound disabled (every layer priced both ways in full) every row is
    the same."""
    from xaicomp_core.format import size as size_module

    cw = compressed(lenet_session, PLANS[name])
    args = (cw.layout, cw.keep, cw.quant.klass, cw.quant.group_count, cw.quant.levels, PLANS[name].granularity,
            state_of(lenet_session))
    row, skipped = size_module._LayerTotals.row, []

    def counted(self, *a, **k):
        out = row(self, *a, **k)
        skipped.append(out is None)
        return out

    monkeypatch.setattr(size_module._LayerTotals, "row", counted)
    fast = compute_size(*args, codes=cw.quant.codes)
    if name != "8-and-1-bit":  # (1-bit classes have no zero code)
        assert any(skipped)  # the shortcut was taken somewhere
    monkeypatch.setattr(size_module, "values_lower_bound", lambda s: 0)
    full = compute_size(*args, codes=cw.quant.codes)
    assert [t.to_dict() for t in fast.tensors] == [t.to_dict() for t in full.tensors]


def test_all_keep_encodings_are_exercised(lenet_session):
    seen = set()
    for plan in PLANS.values():
        seen |= {t.keep_encoding for t in compressed(lenet_session, plan).size.tensors if t.kind == "compressed"}
    assert seen == {"dense", "bitmask", "indices", "pruned-indices", "channels", "rice", "rice-pruned"}


def test_rice_code_round_trip_and_size():
    from xaicomp_core.format.packing import rice_decode, rice_encode
    from xaicomp_core.format.size import rice_cost

    rng = np.random.default_rng(0)
    for n, density in [(1, 1.0), (10, 0.5), (5000, 0.3), (100_000, 0.1), (1000, 0.01)]:
        pos = np.flatnonzero(rng.random(n) < density)
        k, cost = rice_cost(torch.from_numpy(pos))
        data = rice_encode(pos, k)
        assert len(data) == cost
        assert np.array_equal(rice_decode(data, len(pos), k, n), pos)
    # gaps 0, 4, 1 with k=1: unary 0 | 110 | 0 = bits 0,1,1,0,0 -> 0b00110; remainders 0,0,1 -> 0b100
    assert rice_encode(np.array([0, 5, 7]), 1) == bytes([0b00110, 0b100])
    pos = np.flatnonzero(rng.random(1000) < 0.1)
    k, _ = rice_cost(torch.from_numpy(pos))
    data = rice_encode(pos, k)
    with pytest.raises(FormatError):
        rice_decode(data[:-1], len(pos), k, 1000)
    with pytest.raises(FormatError):
        rice_decode(data, len(pos), k, int(pos[-1]))  # a position past the end
    with pytest.raises(FormatError):
        rice_decode(data + b"\x00", len(pos), k, 1000)


def test_no_pruning_fp32_payload_is_fp32_size(lenet_session):
    cw = compressed(lenet_session, CompressionPlan())
    res = pack(cw, state_of(lenet_session), lenet_session.info)
    assert res.payload_bytes == cw.size.fp32_bytes == lenet_session.fp32_bytes()


@pytest.mark.parametrize("granularity", ["weight", "channel", "layer"])
def test_layer_pruned_entirely(lenet_session, granularity):
    plan = CompressionPlan(criterion="lrp", prune_ratio=0.3, granularity=granularity, **P842)
    keep = compressed(lenet_session, PLANS["lrp-842-weight"]).keep.clone()
    layout = lenet_session.layout
    keep[layout.layer_slice(1)] = False  # the second conv loses every weight
    cw = recompress(lenet_session, plan, keep)
    row = next(t for t in cw.size.tensors if t.name == layout.names[1])
    assert row.kept == 0 and row.value_bytes == 0 and row.scale_bytes == 0
    _, pm = check_round_trip(lenet_session, cw)
    assert not pm.weights()[layout.names[1]].any()
    model = pm.build_model()
    ref = lenet_session.compressed_model(cw)
    assert torch.equal(forward_logits(model, lenet_session.x_eval), forward_logits(ref, lenet_session.x_eval))


def test_every_channel_pruned_but_one_is_channel_encoded(lenet_session):
    plan = CompressionPlan.uniform(3)
    layout = lenet_session.layout
    keep = torch.ones(layout.total, dtype=torch.bool)
    i = 2
    per = layout.sizes[i] // layout.channels[i]
    keep[layout.offsets[i] + per:layout.offsets[i + 1]] = False
    cw = recompress(lenet_session, plan, keep, zeros_as_pruned=False)  # 3-bit zero codes would make it ragged
    assert cw.size.tensors[4].name == layout.names[i] and cw.size.tensors[4].keep_encoding == "channels"
    check_round_trip(lenet_session, cw)


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_entropy_coded_payload(lenet_session, codec):
    cw = compressed(lenet_session, PLANS["lrp-842-weight"])
    res, pm = check_round_trip(lenet_session, cw, codec)
    plain = pack(cw, state_of(lenet_session), lenet_session.info)
    assert res.codec == pm.codec == codec
    assert res.payload_bytes == plain.payload_bytes == cw.size.estimated_bytes
    assert res.stored_payload_bytes < res.payload_bytes
    assert res.header["payload"]["sha256"] == plain.header["payload"]["sha256"]


def test_header_contents(lenet_session):
    plan = PLANS["lrp-842-channel"]
    cw, res = pack_plan(lenet_session, plan)
    header, end = read_header(res.data)
    assert end == res.header_bytes
    # the lowest version that holds the file: 2 (Huffman-coded values possible, no constant tensor)
    assert header["format_version"] == 2 and header["bit_order"] == "lsb-first"
    assert header["model"]["arch"] == "fashion-lenet"
    assert header["model"]["preprocessing"] == lenet_session.info.preprocessing.to_dict()
    assert header["model"]["class_names"] == lenet_session.class_names
    assert CompressionPlan.from_dict(header["plan"]) == plan
    assert header["estimated_bytes"] == cw.size.estimated_bytes
    assert len(header["payload"]["sha256"]) == 64
    rows = {t.name: t for t in cw.size.tensors}
    for e in header["tensors"]:
        if e["kind"] == "compressed":
            t = rows[e["name"]]
            assert (e["keep"], e["keep_bytes"], e["class_bytes"], e["scale_bytes"], e["value_bytes"]) == (
                t.keep_encoding, t.keep_bytes, t.class_bytes, t.scale_bytes, t.value_bytes)


def test_packing_is_deterministic(lenet_session):
    plan = PLANS["lrp-842-weight"]
    assert pack_plan(lenet_session, plan)[1].data == pack_plan(lenet_session, plan)[1].data


# The packed bytes of these plans, frozen: SHA-256 of the payload followed by the header's tensor entries (compact
# JSON, as in the file), computed with the format code before it moved into per-section codecs (format/codecs.py).
# Magnitude and random criteria only, so no relevance computation (thread-count sensitive) enters the bytes.
FROZEN_PLANS = {
    "fp32-dense": CompressionPlan(criterion="magnitude"),
    "mag-842-weight-absmax": CompressionPlan(criterion="magnitude", prune_ratio=0.5, quantizer="absmax", **P842),
    "mag-842-channel": CompressionPlan(criterion="magnitude", prune_ratio=0.5, granularity="channel", **P842),
    "mag-842-layer-absmax": CompressionPlan(criterion="magnitude", prune_ratio=0.5, granularity="layer",
                                            quantizer="absmax", **P842),
    "per-layer-scope": CompressionPlan(criterion="magnitude", prune_ratio=0.6, scope="per-layer", quantizer="absmax",
                                       **P842),
    "uniform-1bit": CompressionPlan.uniform(1, criterion="magnitude", prune_ratio=0.3),
    "uniform-8bit-protect": CompressionPlan.uniform(8, criterion="magnitude", prune_ratio=0.4, protect="first-last",
                                                    quantizer="absmax"),
    "fp32-class-mixed": CompressionPlan(criterion="random", prune_ratio=0.5, bit_levels=[32, 4, 1],
                                        bit_split=[0.1, 0.6], quantizer="absmax", seed=1),
    "fp32-class-channel": CompressionPlan(criterion="magnitude", prune_ratio=0.2, bit_levels=[32, 3], bit_split=[0.25],
                                          granularity="channel", protect="first-last", quantizer="absmax"),
    "sparse": CompressionPlan.uniform(4, criterion="magnitude", prune_ratio=0.95, quantizer="absmax"),
    "light": CompressionPlan.uniform(5, criterion="magnitude", prune_ratio=0.01, quantizer="absmax"),
    "extreme-sparse": CompressionPlan.uniform(4, criterion="magnitude", prune_ratio=0.998, quantizer="absmax"),
    "random-7-3": CompressionPlan(criterion="random", prune_ratio=0.5, bit_levels=[7, 3], bit_split=[0.4],
                                  quantizer="absmax", seed=3),
}
# Format version 1's bytes: the same plans with the fixed-width values only (the ``huffman`` encoding unregistered).
FROZEN_V1_SHA256 = {
    "fp32-dense": "eceed3a01c00cff568e744bd3e2bbbca92e51c8d7f50f42745ef2b497cf33d2f",
    "mag-842-weight-absmax": "ddefd5b68f58961731e0963458f1519f31f2b786f0a898a14b6685c3789958e3",
    "mag-842-channel": "548662bad446d1f0413c7eceb552f78998e2368659c6dc2d288aace8d0e6bea2",
    "mag-842-layer-absmax": "74e29be32e234c872c8efbd9751a8b18dbc4cbae6930217251fd7df3aebf165c",
    "per-layer-scope": "ddb875cf0080af7faa6792af38b7a6fd993df44f751a9a671bfbad7126773c74",
    "uniform-1bit": "d10a40b7ca1d2d75c2d904f537d102791cde3e5983dccb96af8a27724b05ac1f",
    "uniform-8bit-protect": "4a794570f8c42e0c88f1fa77b76f7f41617c940c8f132fd752b0af1632d5b6c2",
    "fp32-class-mixed": "cd90ca37b7027536f96eefaee77a30b1bdfc16b22d644bdefc059a9342bea91d",
    "fp32-class-channel": "9b67e44d4792e020dd261fb56f86e457f9de15b6f87e3eece9224375d008ff6c",
    "sparse": "f41223d8bc471926dd3755966d6de5a6cc5f6422ec0974df4f13c653b7f3471b",
    "light": "d5f0348737b769e61ad4aeb88398c795f088b1e9415a435018e74c61fbbd0d7c",
    "extreme-sparse": "a85019abf2cb0bdb66b4dcbae3d2d9077e93507217bbec4efc541bf233ebd458",
    "random-7-3": "fb7b26d23e7dcccb48bfe0f9b798d93654b2521be381fa0ae3bf462d286f316a",
    "channels-weight": "fa530e3ebb86904427515cab96a3e75be0654d08dbbba2844531fc708ff9d7c5",
    "channels-channel": "612264d958dec18cbf5ce9f53bcf83767266b61c740bf6b388b52f717cbf9095",
    "channels-layer": "1016f0126007332acb24207687e168ecfe852e52892af7942fa77f9035eeb4e7",
}
# Format version 2 (this writer): the cheaper of the fixed-width and the Huffman-coded values per tensor.
FROZEN_SHA256 = {
    "fp32-dense": "eceed3a01c00cff568e744bd3e2bbbca92e51c8d7f50f42745ef2b497cf33d2f",
    "mag-842-weight-absmax": "661b0bb8d8ff0434b35eb0e8abafbc1f013dd0530be529ed1ae746544609ce6d",
    "mag-842-channel": "7a306dc089e5b3ec8e6efff5496021465aef2abddbb885bd751805922accecb4",
    "mag-842-layer-absmax": "38299f38444f5ff70d7c2a9cd8193023347d134939133338649c6c89898f0524",
    "per-layer-scope": "7a6306f488a487b2e7f07f7f63f605bc2623e229c27390872cea20d7a68a9259",
    "uniform-1bit": "d10a40b7ca1d2d75c2d904f537d102791cde3e5983dccb96af8a27724b05ac1f",
    "uniform-8bit-protect": "2f6aeb613c4065756f977862dda7552481270981a201badd927b53f6e6357f68",
    "fp32-class-mixed": "c2142768f21d3ea5360ceae01c30eedf17e4df7c2aa055d9f1ca06990e39c028",
    "fp32-class-channel": "625c3c297b73603685ec6dcd6c61d3529b208e85f605b12492e31a736abfeedc",
    "sparse": "ddbb11fba7dee535052d090fd266a373b54e3620b16bcef12bf81e80dcaf8b8b",
    "light": "9604186ddf686883438ffc56a3d2a3e22e8c25cc9fc69673b1404b89f538b6d1",
    "extreme-sparse": "f726407ec59286178ed94be03cae590c5c44df66b23544d1cd2b44e66d5ba87c",
    "random-7-3": "cfd2bb071da6934df44d9bb6b8c088aa4e038b4bff785a20f088b52273d1477e",
    "channels-weight": "3be4c346846ce221fe1854bc76f272602e22d41fd2b53510098986aa157a107f",
    "channels-channel": "0cb0bb446bf33ed4f96b010574208660c10ac7e8e5633e772b7a1fb1d4a567a0",
    "channels-layer": "8f9b15f745bfd5081b718b983c4568335952c2721bb2c89edeba17265df8f31c",
}

# This writer: as version 2's, except that a tensor stores its zero codes as pruned where that is cheaper (the reader
# is unchanged; the file is still format version 2).
FROZEN_ZEROS_SHA256 = FROZEN_SHA256 | {
    "mag-842-channel": "7d54872ec61a3333184c636aa9c2ae138eb183344ea241098f72d7a5d3821066",
    "mag-842-layer-absmax": "2d762dd73774d50944cfff7a04f1cf121470e191a804e5dbbf45929b083b7226",
    "fp32-class-mixed": "927a3805ca91d5712caeac51ef502f5b41a0f4a56246c3a49ebe41f683edb6ac",
    "fp32-class-channel": "99d6a69f25c8fc678c54bac422f2907be551824d4ea45cadc4fac079b871f9d9",
    "light": "a5f9bd6203e526deba61dba17c3e57fdaa36d639339299955e80b6934919acee",
    "random-7-3": "bb92143b1b92da858b6fd862c7fda459eae05d35758396e05f35c707a5e71e05",
}


def frozen_digest(res) -> str:
    data = res.data[res.header_bytes:] + json.dumps(res.header["tensors"], separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def frozen_compressed(session, name: str, zeros_as_pruned: bool = True) -> CompressedWeights:
    """The frozen case ``name`` compressed afresh (no cache: the registered value codecs decide its size); with
    ``zeros_as_pruned=False``, sized and so written with the plan's masks as they are (the writers before zero codes
    could be stored as pruned)."""
    cw = _frozen_compressed(session, name)
    if zeros_as_pruned:
        return cw
    q = cw.quant
    return dataclasses.replace(cw, size=compute_size(cw.layout, cw.keep, q.klass, q.group_count, q.levels,
                                                     cw.plan.granularity, state_of(session), codes=q.codes,
                                                     zeros_as_pruned=False))


def _frozen_compressed(session, name: str) -> CompressedWeights:
    if name.startswith("channels-"):
        # a third of every layer's output channels removed: the "channels" keep encoding everywhere
        layout = session.layout
        keep = torch.ones(layout.total, dtype=torch.bool)
        for i in range(len(layout.names)):
            per = layout.sizes[i] // layout.channels[i]
            keep[layout.offsets[i]:layout.offsets[i] + per * (layout.channels[i] // 3)] = False
        plan = CompressionPlan(criterion="magnitude", granularity=name.removeprefix("channels-"), quantizer="absmax",
                               **P842)
        return recompress(session, plan, keep)
    return Compressor(session.model).compress(FROZEN_PLANS[name])


@pytest.mark.parametrize("name", list(FROZEN_SHA256))
def test_packed_bytes_are_unchanged(lenet_session, name):
    cw = frozen_compressed(lenet_session, name, zeros_as_pruned=False)
    res = pack(cw, state_of(lenet_session), lenet_session.info)
    assert res.payload_bytes == cw.size.estimated_bytes
    assert frozen_digest(res) == FROZEN_SHA256[name]


@pytest.mark.parametrize("name", list(FROZEN_ZEROS_SHA256))
def test_packed_bytes_with_zero_codes_as_pruned_are_unchanged(lenet_session, name):
    cw = frozen_compressed(lenet_session, name)
    plain = frozen_compressed(lenet_session, name, zeros_as_pruned=False)
    res = pack(cw, state_of(lenet_session), lenet_session.info)
    assert res.payload_bytes == cw.size.estimated_bytes
    assert frozen_digest(res) == FROZEN_ZEROS_SHA256[name]
    # the same weights, never more bytes; equal bytes exactly where no tensor stores its zero codes as pruned
    pm = unpack(res.data)
    assert torch.equal(pm.values, cw.quant.values) and pm.size().estimated_bytes == res.payload_bytes
    moved = [t.name for t in cw.size.tensors if t.zeros_pruned]
    assert cw.size.estimated_bytes <= plain.size.estimated_bytes
    assert (cw.size.estimated_bytes < plain.size.estimated_bytes) == bool(moved)
    assert (FROZEN_ZEROS_SHA256[name] == FROZEN_SHA256[name]) == (not moved)


def test_some_frozen_plans_store_zero_codes_as_pruned(lenet_session):
    moved = {name for name in FROZEN_ZEROS_SHA256
             if any(t.zeros_pruned for t in frozen_compressed(lenet_session, name).size.tensors)}
    assert moved and moved != set(FROZEN_ZEROS_SHA256)


@pytest.mark.parametrize("name", list(FROZEN_V1_SHA256))
def test_fixed_width_values_are_format_version_1s_bytes_and_version_1_files_read(lenet_session, name):
    huffman = VALUE_CODECS.get("huffman")
    VALUE_CODECS.unregister("huffman")
    try:
        cw = frozen_compressed(lenet_session, name, zeros_as_pruned=False)
        res = pack(cw, state_of(lenet_session), lenet_session.info)
    finally:
        register_value_codec(huffman)
    assert {t.value_encoding for t in cw.size.tensors if t.kind == "compressed"} == {"fixed"}
    assert res.payload_bytes == cw.size.estimated_bytes
    assert frozen_digest(res) == FROZEN_V1_SHA256[name]
    # labelled version 1, as version 1 wrote it, the file reads back to the same weights
    header, end = read_header(res.data)
    header["format_version"] = 1
    hb = json.dumps(header).encode()
    pm = unpack(PREAMBLE.pack(MAGIC, 1, len(hb), zlib.crc32(hb)) + hb + res.data[end:])
    assert torch.equal(pm.values, cw.quant.values) and pm.header["format_version"] == 1


def test_frozen_plans_use_both_value_encodings(lenet_session):
    seen = set()
    for name in FROZEN_PLANS:
        seen |= {t.value_encoding for t in frozen_compressed(lenet_session, name).size.tensors
                 if t.kind == "compressed"}
    assert seen == set(VALUE_CODECS)


def test_frozen_plans_use_every_keep_encoding(lenet_session):
    seen = set()
    for name in FROZEN_PLANS:  # with the plans' masks (the zero codes stored as pruned change some encodings)
        seen |= {t.keep_encoding for t in frozen_compressed(lenet_session, name, zeros_as_pruned=False).size.tensors
                 if t.kind == "compressed"}
    assert seen | {"channels"} == set(KEEP_ENCODINGS)  # "channels": the hand-made masks of the channels-* cases


def test_a_registered_keep_codec_is_used_by_the_size_the_writer_and_the_reader(lenet_session):
    """A new keep encoding is one registered class: the size accounting picks it where it is cheapest, the writer
    writes it, the reader reads it; unregistered, its files are refused with a clear message."""

    class PrefixKeep(KeepCodec):
        """Masks that keep exactly the first ``kept`` weights: nothing stored (``kept`` is in the header)."""

        name = "test-prefix"

        def applies(self, s):
            return s.mask is not None and s.kept < s.n and bool(s.mask[:s.kept].all()) and not s.mask[s.kept:].any()

        def cost(self, s):
            return 0

        def encode(self, mask, channels, param):
            return b"", {}

        def decode(self, data, entry, n, channels, kept, name):
            expect_length(data, 0, "keep", name)
            return np.arange(n) < kept

    layout = lenet_session.layout
    i = 2
    keep = torch.ones(layout.total, dtype=torch.bool)
    keep[layout.offsets[i] + 1001:layout.offsets[i + 1]] = False  # not on a channel boundary
    register_keep_codec(PrefixKeep)
    try:
        assert "test-prefix" in KEEP_ENCODINGS
        cw = recompress(lenet_session, CompressionPlan.uniform(3), keep)
        row = next(t for t in cw.size.tensors if t.name == layout.names[i])
        assert (row.keep_encoding, row.keep_bytes, row.kept) == ("test-prefix", 0, 1001)
        res, pm = check_round_trip(lenet_session, cw)
        assert next(e for e in res.header["tensors"] if e["name"] == layout.names[i])["keep"] == "test-prefix"
    finally:
        KEEP_CODECS.unregister("test-prefix")
    assert "test-prefix" not in KEEP_ENCODINGS
    with pytest.raises(FormatError, match="unknown keep encoding 'test-prefix'"):
        unpack(res.data)


# ----------------------------------------------------------------------------------------------------------------
# corrupt, truncated, altered and unknown files
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(lenet_session):
    return pack_plan(lenet_session, PLANS["lrp-842-weight"])[1]


def rewrite_header(data: bytes, change) -> bytes:
    """Apply ``change(header)`` and write a header with a matching CRC (an alteration the CRC cannot see)."""
    header, end = read_header(data)
    change(header)
    hb = json.dumps(header).encode()
    version = header.get("format_version") if type(header.get("format_version")) is int else FORMAT_VERSION
    return PREAMBLE.pack(MAGIC, version, len(hb), zlib.crc32(hb)) + hb + data[end:]


def test_truncated_files_raise(packed):
    data = packed.data
    cuts = [0, 1, 7, 8, 19, 20, 21, packed.header_bytes // 2, packed.header_bytes - 1, packed.header_bytes,
            packed.header_bytes + 1, len(data) // 2, len(data) - 1]
    for n in cuts:
        with pytest.raises(FormatError):
            unpack(data[:n])
    with pytest.raises(FormatError, match="truncated"):
        unpack(data[:-1])
    with pytest.raises(FormatError, match="truncated"):
        unpack(data[:packed.header_bytes - 3])
    with pytest.raises(FormatError, match="empty"):
        unpack(b"")


def test_altered_bytes_raise_checksum_errors(packed):
    data = packed.data
    rng = np.random.default_rng(0)
    header_positions = rng.integers(PREAMBLE_BYTES, packed.header_bytes, 8)
    payload_positions = rng.integers(packed.header_bytes, len(data), 24)
    for pos in [*header_positions, *payload_positions, len(data) - 1]:
        bad = bytearray(data)
        bad[int(pos)] ^= 0x10
        with pytest.raises(FormatError, match="checksum"):
            unpack(bytes(bad))


def test_trailing_bytes_wrong_magic_and_future_version_raise(packed):
    with pytest.raises(FormatError, match="after the payload"):
        unpack(packed.data + b"\x00")
    with pytest.raises(FormatError, match="magic"):
        unpack(b"PK\x03\x04" + packed.data[4:])
    with pytest.raises(FormatError, match="magic"):
        unpack(b"{\"not\": 1}")
    future = bytearray(packed.data)
    struct.pack_into("<I", future, 8, FORMAT_VERSION + 1)
    with pytest.raises(FormatError, match="newer"):
        unpack(bytes(future))
    huge = bytearray(packed.data)
    struct.pack_into("<I", huge, 12, 2 ** 31)
    with pytest.raises(FormatError):
        unpack(bytes(huge))


def test_header_alterations_with_valid_crc_are_caught(packed):
    def tensor(h, kind="compressed", i=0):
        return [t for t in h["tensors"] if t["kind"] == kind][i]

    alterations = {
        "kept": lambda h: tensor(h).update(kept=tensor(h)["kept"] - 1),
        "shape": lambda h: tensor(h).update(shape=[tensor(h)["shape"][0] * 2, *tensor(h)["shape"][1:]]),
        "levels": lambda h: h.update(levels=[8, 4]),
        "level-width": lambda h: h.update(levels=[8, 4, 3]),
        "granularity": lambda h: h.update(granularity="channel"),
        "encoding": lambda h: tensor(h, i=2).update(keep="indices"),
        "raw-shape": lambda h: tensor(h, "raw").update(shape=[tensor(h, "raw")["shape"][0] + 1]),
        "value-bytes": lambda h: tensor(h).update(value_bytes=tensor(h)["value_bytes"] + 1),
        "dropped-tensor": lambda h: h["tensors"].pop(1),
        "swapped-tensors": lambda h: h["tensors"].insert(0, h["tensors"].pop(1)),
        "payload-size": lambda h: h["payload"].update(bytes=h["payload"]["bytes"] + 1),
        "payload-sha": lambda h: h["payload"].update(sha256="0" * 64),
        "codec": lambda h: h["payload"].update(codec="zlib"),
        "missing-tensors": lambda h: h.pop("tensors"),
        "format-version": lambda h: h.update(format_version=FORMAT_VERSION + 1),
        "future-plan": lambda h: h["plan"].update(version=99),
    }
    for name, change in alterations.items():
        bad = rewrite_header(packed.data, change)
        with pytest.raises(FormatError):
            unpack(bad)
            pytest.fail(f"alteration {name!r} was not detected")


def huffman_file(session):
    res = pack_plan(session, FROZEN_PLANS["mag-842-weight-absmax"])[1]
    assert any(t.get("values") == "huffman" for t in res.header["tensors"])
    return res


def test_value_encoding_alterations_are_caught(lenet_session):
    res = huffman_file(lenet_session)

    def first_huffman(h):
        return next(t for t in h["tensors"] if t.get("values") == "huffman")

    with pytest.raises(FormatError, match="unknown value encoding 'bogus'"):
        unpack(rewrite_header(res.data, lambda h: first_huffman(h).update(values="bogus")))
    with pytest.raises(FormatError, match="unknown value encoding"):
        unpack(rewrite_header(res.data, lambda h: first_huffman(h).update(values=["huffman"])))
    with pytest.raises(FormatError):  # the Huffman section read as fixed-width values
        unpack(rewrite_header(res.data, lambda h: first_huffman(h).pop("values")))
    header, end = read_header(res.data)
    header["format_version"] = 1
    hb = json.dumps(header).encode()
    with pytest.raises(FormatError, match="a value encoding in a version-1 file"):
        unpack(PREAMBLE.pack(MAGIC, 1, len(hb), zlib.crc32(hb)) + hb + res.data[end:])


def test_bit_flips_in_huffman_values_with_fixed_checksums_never_crash(lenet_session):
    """A crafted file (checksums recomputed) with flipped bits in its Huffman-coded values: the reader either
    refuses it with a FormatError or decodes weights of the declared shapes, never another exception."""
    res = huffman_file(lenet_session)
    header, end = read_header(res.data)
    offset, spans = 0, []
    for t in header["tensors"]:
        if t["kind"] == "raw":
            offset += 4 * int(np.prod(t["shape"]))
        elif t["kind"] == "compressed":
            size = sum(t[k] for k in ("keep_bytes", "class_bytes", "scale_bytes", "value_bytes"))
            if t.get("values") == "huffman":
                spans.append((offset + size - t["value_bytes"], offset + size))
            offset += size
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(60):
        lo, hi = spans[rng.integers(len(spans))]
        payload = bytearray(res.data[end:])
        pos = int(rng.integers(lo, hi))
        payload[pos] ^= 1 << int(rng.integers(8))

        def fix(h, p=bytes(payload)):
            h["payload"].update(sha256=hashlib.sha256(p).hexdigest(), stored_sha256=hashlib.sha256(p).hexdigest())

        try:
            pm = unpack(rewrite_header(res.data[:end] + bytes(payload), fix))
        except FormatError:
            refused += 1
            continue
        assert all(pm.state[t["name"]].shape == tuple(t["shape"]) for t in header["tensors"])
    assert refused > 0


def test_corrupt_compressed_stream_raises(lenet_session):
    res = pack_plan(lenet_session, PLANS["lrp-842-weight"], codec="zlib")[1]
    stored = bytearray(res.data[res.header_bytes:])
    stored[len(stored) // 2] ^= 0xFF

    def fix_sha(h):
        import hashlib

        h["payload"]["stored_sha256"] = hashlib.sha256(bytes(stored)).hexdigest()

    bad = rewrite_header(res.data[:res.header_bytes] + bytes(stored), fix_sha)
    with pytest.raises(FormatError):
        unpack(bad)


# ----------------------------------------------------------------------------------------------------------------
# every built-in model
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=BUILTINS)
def builtin_session(request, fashion_ref, fashion_eval):
    from xaicomp_core import CompressionSession, load_builtin_model

    s = CompressionSession(load_builtin_model(request.param), fashion_ref, fashion_eval.balanced_subset(300),
                           reference_samples=100)
    s.relevance()
    return s


BUILTIN_PLANS = {
    "lrp-842-weight": CompressionPlan(criterion="lrp", prune_ratio=0.5, **P842),
    "channel-protected-fp32": CompressionPlan(criterion="lrp", prune_ratio=0.7, bit_levels=[32, 4, 1],
                                              bit_split=[0.1, 0.5], granularity="channel", protect="first-last"),
    "layer-filter": CompressionPlan(criterion="lrp-filter", prune_ratio=0.4, granularity="layer", **P842),
    # BatchNorm stored as scale and shift (constant mean and variance), also on top of removed filters' overrides
    "magnitude-fold-norm": CompressionPlan(criterion="magnitude", prune_ratio=0.5, fold_norm=True, **P842),
    "filter-fold-norm": CompressionPlan(criterion="lrp-filter", prune_ratio=0.4, fold_norm=True, **P842),
}


@pytest.mark.parametrize("plan_name", list(BUILTIN_PLANS))
def test_round_trip_builtin(builtin_session, plan_name):
    plan = BUILTIN_PLANS[plan_name]
    cw = builtin_session.compress(plan)
    res, pm = check_round_trip(builtin_session, cw)
    assert res.seconds < 1.0, f"packing took {res.seconds:.2f} s"
    assert res.seconds + pm.seconds < 3.0, f"packing and reading took {res.seconds + pm.seconds:.2f} s"
    # the session's own compressed forward pass (compressed_logits) against the reloaded file
    reloaded = exact_logits(pm.build_model(), builtin_session.x_eval, builtin_session.eval_batch_size)
    assert torch.equal(reloaded, builtin_session.compressed_logits(plan))
    ints = [k for k, v in builtin_session.model.state_dict().items() if not v.is_floating_point()]
    assert all(not pm.state[k].any() for k in ints)


def test_round_trip_fine_tuned_plan_with_protected_layers(fashion_ref, fashion_eval):
    """Fine-tuning changes the weights (protected layers included): the file holds the fine-tuned values."""
    from xaicomp_core import CompressionSession, load_builtin_dataset, load_builtin_model

    train = load_builtin_dataset("fashion-mnist", "train").balanced_subset(256)
    session = CompressionSession(load_builtin_model("fashion-lenet"), fashion_ref, fashion_eval.balanced_subset(200),
                                 reference_samples=100, train_data=train)
    plan = CompressionPlan(criterion="magnitude", prune_ratio=0.6, protect="first-last", finetune_epochs=1, **P842)
    cw = session.compress(plan)
    first = session.layout.names[0]
    assert not torch.equal(cw.weights()[first], session.model.state_dict()[first])  # protected, yet fine-tuned
    res, pm = check_round_trip(session, cw)
    assert torch.equal(pm.weights()[first], cw.weights()[first])
    reloaded = exact_logits(pm.build_model(), session.x_eval, session.eval_batch_size)
    assert torch.equal(reloaded, session.compressed_logits(plan))
    assert pm.plan.finetune_epochs == 1


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm as scale and shift (plan fold_norm) and constant tensors (format version 3)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_session(fashion_ref, fashion_eval):
    from xaicomp_core import CompressionSession, load_builtin_model

    return CompressionSession(load_builtin_model("fashion-vgg"), fashion_ref, fashion_eval.balanced_subset(300),
                              reference_samples=100)


def test_fold_norm_stores_8_bytes_per_channel_and_is_version_3(vgg_session):
    s = vgg_session
    plan = CompressionPlan(criterion="magnitude", prune_ratio=0.7, **P842)
    plain, folded = s.compress(plan), s.compress(plan.replace(fold_norm=True))
    norms = s.compressor.norms
    channels = sum(s.model.state_dict()[f"{n}.weight"].numel() for n in norms)
    assert len(norms) == 5 and channels == 320
    # per BatchNorm: weight and bias stay raw (now scale and shift), mean and variance become one float32 each
    assert plain.size.estimated_bytes - folded.size.estimated_bytes == 8 * channels - 8 * len(norms)
    rows = {t.name: t for t in folded.size.tensors}
    for n in norms:
        assert rows[f"{n}.running_mean"].kind == rows[f"{n}.running_var"].kind == "constant"
        assert rows[f"{n}.weight"].kind == rows[f"{n}.bias"].kind == "raw"
    # the same weights, masks and codes: only the normalisation is stored differently
    assert torch.equal(plain.quant.values, folded.quant.values) and torch.equal(plain.keep, folded.keep)
    res, pm = check_round_trip(s, folded)
    assert res.header["format_version"] == 3 and read_header(res.data)[0]["format_version"] == 3
    assert pm.plan.fold_norm and pm.state["features.1.running_var"].unique().tolist() == [pytest.approx(1 - 1e-5)]
    assert_same_logits(s, folded, pm)
    # the folded model computes what the original BatchNorm did, up to float32 rounding
    a = forward_logits(s.compressed_model(plain), s.x_eval, s.eval_batch_size)
    b = forward_logits(s.compressed_model(folded), s.x_eval, s.eval_batch_size)
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).double().mean() >= 0.99
    # a plan without it still writes version 2
    assert pack(plain, state_of(s), s.info).header["format_version"] == 2


def test_fold_norm_on_a_model_without_batchnorm_changes_nothing(lenet_session):
    plan = PLANS["lrp-842-weight"]
    assert not lenet_session.compressor.norms
    a, b = compressed(lenet_session, plan), compressed(lenet_session, plan.replace(fold_norm=True))
    assert a.size.estimated_bytes == b.size.estimated_bytes
    ra, rb = pack(a, state_of(lenet_session), lenet_session.info), pack(b, state_of(lenet_session), lenet_session.info)
    assert ra.data[ra.header_bytes:] == rb.data[rb.header_bytes:] and rb.header["format_version"] == 2


def test_constant_tensors_are_checked(vgg_session, monkeypatch):
    from xaicomp_core.format import packing

    s = vgg_session
    folded = s.compress(CompressionPlan(criterion="magnitude", prune_ratio=0.5, fold_norm=True, **P842))
    data = pack(folded, state_of(s), s.info).data
    assert unpack(data).header["format_version"] == 3

    def constant(h):
        return next(t for t in h["tensors"] if t["kind"] == "constant")

    def relabel(version):
        def change(h):
            h["format_version"] = version
        return change

    for name, change, message in [
        ("version-2", relabel(2), "a constant tensor in a version-2 file"),
        ("one-element", lambda h: constant(h).update(shape=[1]), "at least 2 elements|do not fit"),
        # the payload's tensors no longer line up: refused wherever the reader notices (a section, or the end)
        ("raw-as-constant", lambda h: next(t for t in h["tensors"] if t["kind"] == "raw").update(kind="constant"),
         "."),
        ("constant-as-raw", lambda h: constant(h).update(kind="raw"), "."),
    ]:
        with pytest.raises(FormatError, match=message):
            unpack(rewrite_header(data, change))
            pytest.fail(f"{name} was read")
    monkeypatch.setattr(packing, "MAX_CONSTANT_ELEMENTS", 100)
    with pytest.raises(FormatError, match="elements of constant tensors, more than the 100 allowed"):
        unpack(data)


def test_zero_codes_by_hand():
    levels = [8, 4, 2, 1, 32]
    klass = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, -1], dtype=torch.int8)
    codes = torch.tensor([127, 126, 7, 0, 1, 0, 2, 0, 1, 0, 0], dtype=torch.int32)
    # 8 bits: qmax 127; 4 bits: 7; 2 bits: 1; 1 bit has no zero; fp32 stores the float; -1 is not kept
    assert zero_codes(klass, codes, levels).tolist() == [True, False, True, False, True, False, False, False, False,
                                                         False, False]
    assert bool((dequantize_codes(codes[:7], torch.tensor([8, 8, 4, 4, 2, 2, 2]), torch.ones(7))
                 == 0).eq(zero_codes(klass, codes, levels)[:7]).all())
