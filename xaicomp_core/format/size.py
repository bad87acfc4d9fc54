"""Honest size accounting.

Counts what a packed file (see ``docs/FORMAT.md`` and :mod:`xaicomp_core.format.packing`) really holds, section by
section, each padded to whole bytes:

* **keep** — which weights are kept: nothing if all are; else the cheapest of a bitmask (1 bit per weight), the
  sorted indices of the kept weights, or of the pruned weights (``ceil(log2 n)`` bits each), a Rice code of the
  gaps between the kept (or the pruned) positions (about ``log2(1/density) + 1.5`` bits per coded position, far
  below 1 bit per weight at high sparsity), or, for masks that keep or drop whole output channels, a bitmask over
  channels;
* **classes** — the bit class of each kept weight (``ceil(log2 L)`` bits each for L levels, per-weight
  granularity), of each output channel (per-channel), or nothing (per-layer: the class is in the header);
* **scales** — one float32 per (output channel, bit class) group that holds kept quantized weights;
* **values** — each kept weight at its bit width (fp32 classes at 32 bits);
* **zeros as pruned** — a kept weight whose code decodes to exactly 0 (the middle code of a 2..8-bit class) holds
  the same value as a pruned one; per tensor, when it is cheaper, such weights are stored as pruned (left out of the
  keep section, the classes, the scale groups and the values). The decoded weights are the same either way, and a
  reader needs nothing new: it reads a sparser mask (``TensorSize.zeros_pruned`` counts them);
* **raw** — every other tensor (biases, normalisation parameters and statistics, protected layers) as float32;
* **constant** — a tensor other than a conv/linear weight whose elements are all equal (e.g. the zero mean and the
  constant variance of a BatchNorm stored as scale and shift, ``CompressionPlan.fold_norm``), as one float32.

The reference is fp32 dense: 4 bytes per floating-point element of the state dict. The estimate equals the packed
payload byte for byte; the file adds only its JSON header: each section's bytes here are the ``cost`` of the codec
in :mod:`xaicomp_core.format.codecs` that the writer then uses to write it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from xaicomp_core.compress.layout import LayerLayout
from xaicomp_core.format.bitstream import class_bits, index_bits, rice_cost  # noqa: F401  (public)
from xaicomp_core.format.codecs import (
    SCALES,
    ClassLayout,
    KeepStats,
    ValueStats,
    alphabet,
    choose_keep,
    choose_values,
    class_layout,
    rice_codes_kept,  # noqa: F401  (public)
    rice_target,
    values_lower_bound,
)
from xaicomp_core.plan import FP32


def keep_encoding(n: int, kept: int, channels: int, structured: bool,
                  rice: tuple[int, int] | None = None) -> tuple[str, int]:
    """Cheapest encoding of which of ``n`` weights are kept: (name, bytes).

    ``rice`` is :func:`rice_cost` of the sparser of the kept and the pruned positions (``rice`` codes the kept
    positions when at most half are kept, ``rice-pruned`` the pruned ones otherwise); without it the Rice options
    are not considered. The registered keep codecs (:data:`xaicomp_core.format.codecs.KEEP_CODECS`) decide.
    """
    name, cost, _ = choose_keep(KeepStats(n, kept, channels, structured, rice=rice))
    return name, cost


def rice_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions :func:`keep_encoding`'s Rice options code for a layer's keep-mask (the sparser set)."""
    return torch.from_numpy(rice_target(mask.detach().cpu().numpy()))


@dataclass
class TensorSize:
    """Bytes one tensor takes in the packed payload."""

    name: str
    kind: str  # "compressed", "raw" or "constant" (every element equal: one float32)
    shape: tuple[int, ...]
    numel: int
    kept: int
    fp32_bytes: int
    keep_encoding: str = "dense"
    keep_param: int = 0
    keep_bytes: int = 0
    class_bytes: int = 0
    scale_bytes: int = 0
    value_bytes: int = 0
    raw_bytes: int = 0
    mean_bits: float = 32.0
    value_encoding: str = "fixed"
    zeros_pruned: int = 0

    @property
    def total(self) -> int:
        """All sections."""
        return self.keep_bytes + self.class_bytes + self.scale_bytes + self.value_bytes + self.raw_bytes

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["total_bytes"] = self.total
        return d


@dataclass
class SizeBreakdown:
    """Per-tensor sizes, totals by section and against fp32 dense."""

    tensors: list[TensorSize]

    @property
    def fp32_bytes(self) -> int:
        """fp32 dense reference."""
        return sum(t.fp32_bytes for t in self.tensors)

    @property
    def estimated_bytes(self) -> int:
        """Bytes of the packed payload."""
        return sum(t.total for t in self.tensors)

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes / estimated bytes."""
        return self.fp32_bytes / max(self.estimated_bytes, 1)

    @property
    def reduction(self) -> float:
        """Fraction of fp32 bytes saved."""
        return 1.0 - self.estimated_bytes / max(self.fp32_bytes, 1)

    def section_totals(self) -> dict[str, int]:
        """Bytes by section over all tensors."""
        keys = ("value_bytes", "keep_bytes", "class_bytes", "scale_bytes", "raw_bytes")
        return {k.removesuffix("_bytes"): sum(getattr(t, k) for t in self.tensors) for k in keys}

    def to_dict(self) -> dict:
        """JSON-serialisable summary with per-tensor rows."""
        return {"fp32_bytes": self.fp32_bytes, "estimated_bytes": self.estimated_bytes,
                "compression_ratio": self.compression_ratio, "reduction": self.reduction,
                "sections": self.section_totals(), "tensors": [t.to_dict() for t in self.tensors]}


def is_float_entry(value: torch.Tensor) -> bool:
    """Whether a state-dict entry counts (floating point; integer counters such as num_batches_tracked do not)."""
    return value.is_floating_point()


def is_constant(value: torch.Tensor) -> bool:
    """Whether a floating-point entry of two or more elements holds one float32 bit pattern in every element (the
    packed format then stores it as one number, kind ``constant``; ``-0.0`` and ``0.0`` differ, as do NaNs)."""
    if value.numel() < 2:
        return False
    bits = value.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    return bool((bits == bits[0]).all())


def code_histograms(layout: LayerLayout, klass: torch.Tensor, codes: torch.Tensor, levels: list[int]) -> np.ndarray:
    """Kept weights per (layer, class, stored code): int64 array of shape (layers, len(levels), 256); fp32 classes
    and protected layers count nothing."""
    n_lv = len(levels)
    quant = torch.tensor([b != FP32 for b in levels] + [False])  # index -1 (no class) -> False
    kl = klass.long()
    sel = quant[kl] & (kl >= 0)
    key = (layout.layer_of[sel] * n_lv + kl[sel]) * 256 + codes[sel].long().clamp(0, 255)
    out = torch.bincount(key, minlength=len(layout.names) * n_lv * 256)
    return out.numpy().reshape(len(layout.names), n_lv, 256)


def _zero_code(bits: int) -> int:
    """The stored code of a ``bits``-bit class that decodes to exactly 0 (``qmax = 2^(bits-1) - 1`` for 2..8 bits),
    -1 for a class without one (1 bit, fp32)."""
    return (1 << (int(bits) - 1)) - 1 if 2 <= int(bits) <= 8 else -1


def zero_codes(klass: torch.Tensor, codes: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """Flat bool mask of the weights whose stored code decodes to exactly 0: a class of 2..8 bits and the code
    ``qmax = 2^(bits-1) - 1`` (value ``(qmax - qmax) * scale``). 1-bit classes have no zero; fp32 classes store the
    float itself."""
    # the zero code per class (-1: none), the last entry for index -1 (no class)
    zero_code = torch.tensor([_zero_code(b) for b in levels] + [-1],
                             dtype=codes.dtype)
    return codes == zero_code[klass.long()]


def _group_counts(layout: LayerLayout, mask: torch.Tensor, kl: torch.Tensor, n_lv: int) -> torch.Tensor:
    """Weights of ``mask`` per (global channel, class), shape (total_channels, n_lv); ``kl`` the long class index."""
    return torch.bincount(layout.channel_of[mask] * n_lv + kl[mask],
                          minlength=layout.total_channels * n_lv).view(layout.total_channels, n_lv)


def stored_masks(layout: LayerLayout, keep: torch.Tensor, klass: torch.Tensor, codes: torch.Tensor,
                 levels: list[int], size: SizeBreakdown,
                 group_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keep-mask, classes and kept weights per (channel, class) a packed file stores: those of the plan
    (``group_count``), except that in every tensor whose row of ``size`` has ``zeros_pruned`` the weights of
    :func:`zero_codes` are stored as pruned (class -1)."""
    rows = {t.name: t for t in size.tensors}
    zero = zero_codes(klass, codes, levels)
    use = torch.zeros_like(zero)
    for i, name in enumerate(layout.names):
        row = rows.get(name)
        if row is not None and row.zeros_pruned:
            use[layout.layer_slice(i)] = True
    drop = zero & use
    gc = group_count.long() - _group_counts(layout, drop, klass.long(), len(levels))
    return keep & ~drop, torch.where(drop, torch.full_like(klass, -1), klass), gc


class _LayerTotals:
    """Per-layer counts of one way of storing the kept weights (given their counts per channel and class), and the
    row of a compressed tensor stored that way."""

    def __init__(self, layout: LayerLayout, gc: torch.Tensor, levels: list[int]) -> None:
        self.layout, self.levels = layout, levels
        n_layers = len(layout.names)
        kept_ch = gc.sum(1)  # kept (non-protected) weights per output channel
        ch_size = torch.tensor([layout.sizes[i] // layout.channels[i] for i in range(n_layers)],
                               dtype=torch.long)[layout.layer_of_channel]
        full_or_empty = (kept_ch == 0) | (kept_ch == ch_size)
        self.per_layer = torch.zeros(n_layers, len(levels), dtype=torch.long).index_add_(0, layout.layer_of_channel,
                                                                                          gc)
        quant_cols = torch.tensor([b != FP32 for b in levels])
        self.scales = torch.zeros(n_layers, dtype=torch.long).index_add_(
            0, layout.layer_of_channel, ((gc > 0) & quant_cols).sum(1)).tolist()
        ragged = torch.zeros(n_layers, dtype=torch.long).index_add_(0, layout.layer_of_channel,
                                                                    (~full_or_empty).long())
        self.structured = (ragged == 0).tolist()

    def row(self, i: int, name: str, shape: tuple[int, ...], mask: np.ndarray, hist: np.ndarray, classes: ClassLayout,
            zeros_pruned: int = 0, above: int | None = None) -> TensorSize | None:
        """The row of layer ``i``; with ``above``, None instead when a lower bound of its total (the values by
        :func:`~xaicomp_core.format.codecs.values_lower_bound`, no Huffman code built) already exceeds ``above``."""
        levels = self.levels
        counts = self.per_layer[i]
        kept = int(counts.sum())
        numel = self.layout.sizes[i]
        c = self.layout.channels[i]
        stats = KeepStats(numel, kept, c, kept < numel and self.structured[i], mask=mask)
        enc, kb, k_param = choose_keep(stats)
        vstats = ValueStats(list(levels), counts.numpy(),
                            {k: hist[k, :alphabet(b)] for k, b in enumerate(levels) if b != FP32 and counts[k]})
        cb, sb = classes.cost(kept, c, len(levels)), SCALES.cost(self.scales[i])
        if above is not None and kb + cb + sb + values_lower_bound(vstats) > above:
            return None
        venc, vb = choose_values(vstats)
        return TensorSize(name, "compressed", shape, numel, kept, 4 * numel, enc, k_param, kb, cb, sb, vb, 0,
                          vstats.value_bits / kept if kept else 0.0, value_encoding=venc, zeros_pruned=zeros_pruned)


def compute_size(layout: LayerLayout, keep: torch.Tensor, klass: torch.Tensor, group_count: torch.Tensor,
                 levels: list[int], granularity: str, state: dict[str, torch.Tensor], *,
                 codes: torch.Tensor, zeros_as_pruned: bool = True) -> SizeBreakdown:
    """Size of every state-dict tensor in the packed payload.

    Parameters
    ----------
    layout : LayerLayout
    keep, klass : Tensor
        Flat keep-mask and class index (-1 = none) per compressible weight: ``keep`` for the Rice coding of the
        kept positions, ``klass`` (with ``codes``) for the code histograms and the zero codes; the counts per class
        come from ``group_count``.
    group_count : Tensor
        Kept weights per (global channel, class), shape (total_channels, len(levels)): everything the size
        depends on besides the layout.
    levels : list of int
        Bit widths (32 = fp32).
    granularity : str
        ``"weight"``, ``"channel"`` or ``"layer"``.
    state : dict
        The model's state dict (names, shapes and dtypes are used).
    codes : Tensor
        Flat stored code per weight (:attr:`~xaicomp_core.compress.quantize.Quantized.codes`): the ``huffman`` value
        encoding's size depends on their histogram per layer and class.
    zeros_as_pruned : bool
        Whether a tensor may store its kept weights of :func:`zero_codes` as pruned where that is cheaper (what the
        writer does; its row then has ``zeros_pruned``). ``False`` gives the size with the plan's masks as they are.
    """
    index = {n: i for i, n in enumerate(layout.names)}
    n_lv = len(levels)
    keep_np = keep.detach().cpu().numpy().astype(bool, copy=False)
    kl = klass.long()  # once: both below index with it
    hist = code_histograms(layout, kl, codes, levels)
    plain = _LayerTotals(layout, group_count.long(), levels)
    merged: _LayerTotals | None = None
    zero_count = sum(int(hist[:, k, _zero_code(b)].sum()) for k, b in enumerate(levels) if _zero_code(b) >= 0)
    if zeros_as_pruned and zero_count:  # the same with the zero codes stored as pruned
        zero = zero_codes(kl, codes, levels)
        merged = _LayerTotals(layout, group_count.long() - _group_counts(layout, zero, kl, n_lv), levels)
        keep_z = keep_np & ~zero.numpy()
        zeros_per_layer = torch.bincount(layout.layer_of[zero], minlength=len(layout.names)).tolist()
    classes = class_layout(granularity)
    rows = []
    for name, value in state.items():
        if not is_float_entry(value):
            continue
        numel = value.numel()
        shape = tuple(value.shape)
        i = index.get(name)
        if i is None and is_constant(value):
            rows.append(TensorSize(name, "constant", shape, numel, numel, 4 * numel, "constant", raw_bytes=4))
            continue
        if i is None or layout.protected[i]:
            rows.append(TensorSize(name, "raw", shape, numel, numel, 4 * numel, "raw", raw_bytes=4 * numel))
            continue
        sl = layout.layer_slice(i)
        if merged is not None and zeros_per_layer[i]:
            h = hist[i].copy()
            for k, b in enumerate(levels):
                if _zero_code(b) >= 0:
                    h[k, _zero_code(b)] = 0
            alt = merged.row(i, name, shape, keep_z[sl], h, classes, zeros_per_layer[i])
            # the plan's masks are kept unless ``alt`` is strictly cheaper (ties go to them), so they are priced
            # exactly unless even a lower bound of their total is above ``alt``'s
            assert alt is not None
            row = plain.row(i, name, shape, keep_np[sl], hist[i], classes, above=alt.total)
            if row is None or alt.total < row.total:
                row = alt
        else:
            row = plain.row(i, name, shape, keep_np[sl], hist[i], classes)
        rows.append(row)
    return SizeBreakdown(rows)
