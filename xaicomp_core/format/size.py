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
* **raw** — every other tensor (biases, normalisation parameters and statistics, protected layers) as float32.

The reference is fp32 dense: 4 bytes per floating-point element of the state dict. The estimate equals the packed
payload byte for byte; the file adds only its JSON header.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from xaicomp_core.compress.layout import LayerLayout
from xaicomp_core.plan import FP32


def _bytes(bits: int) -> int:
    return (int(bits) + 7) // 8


def index_bits(n: int) -> int:
    """Bits per index into a tensor of ``n`` elements."""
    return max(1, math.ceil(math.log2(max(n, 2))))


def class_bits(n_levels: int) -> int:
    """Bits per class id for ``n_levels`` levels (0 for a single level)."""
    return 0 if n_levels <= 1 else math.ceil(math.log2(n_levels))


def rice_cost(positions: torch.Tensor) -> tuple[int, int]:
    """Cheapest Rice parameter for coding sorted ``positions``: (k, bytes).

    Each position is coded as its gap ``g`` to the previous one (``g = p - previous - 1``, previous = -1 at first):
    the quotient ``g >> k`` in unary (that many 1 bits, then a 0) in one stream, the ``k`` low bits of ``g`` in a
    second, fixed-width stream. Bytes = ceil(unary bits / 8) + ceil(m k / 8).
    """
    m = len(positions)
    if m == 0:
        return 0, 0
    p = positions.long()
    gaps = torch.diff(p, prepend=p.new_tensor([-1])) - 1
    mean = float(gaps.double().mean())
    k0 = max(0, int(math.log2(mean + 1))) if mean > 0 else 0
    best: tuple[int, int] | None = None
    for k in range(max(0, k0 - 2), k0 + 3):
        unary = int((gaps >> k).sum()) + m
        cost = _bytes(unary) + _bytes(m * k)
        if best is None or cost < best[1]:
            best = (k, cost)
    assert best is not None
    return best


def rice_codes_kept(n: int, kept: int) -> bool:
    """Whether the Rice options code the kept positions (``rice``: at most half kept) or the pruned ones."""
    return 2 * kept <= n


def keep_encoding(n: int, kept: int, channels: int, structured: bool,
                  rice: tuple[int, int] | None = None) -> tuple[str, int]:
    """Cheapest encoding of which of ``n`` weights are kept: (name, bytes).

    ``rice`` is :func:`rice_cost` of the sparser of the kept and the pruned positions (``rice`` codes the kept
    positions when at most half are kept, ``rice-pruned`` the pruned ones otherwise).
    """
    if kept == n:
        return "dense", 0
    options = [("bitmask", _bytes(n)), ("indices", _bytes(kept * index_bits(n))),
               ("pruned-indices", _bytes((n - kept) * index_bits(n)))]
    if structured:
        options.append(("channels", _bytes(channels)))
    if rice is not None:
        options.append(("rice" if rice_codes_kept(n, kept) else "rice-pruned", rice[1]))
    return min(options, key=lambda o: o[1])


def rice_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions :func:`keep_encoding`'s Rice options code for a layer's keep-mask (the sparser set)."""
    target = mask if rice_codes_kept(mask.numel(), int(mask.sum())) else ~mask
    return torch.nonzero(target).squeeze(1)


@dataclass
class TensorSize:
    """Bytes one tensor takes in the packed payload."""

    name: str
    kind: str  # "compressed" or "raw"
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


def compute_size(layout: LayerLayout, keep: torch.Tensor, klass: torch.Tensor, group_count: torch.Tensor,
                 levels: list[int], granularity: str, state: dict[str, torch.Tensor]) -> SizeBreakdown:
    """Size of every state-dict tensor in the packed payload.

    Parameters
    ----------
    layout : LayerLayout
    keep, klass : Tensor
        Flat keep-mask and class index (-1 = none) per compressible weight. Only ``keep`` is read (for the Rice
        coding of the kept positions); the counts per class come from ``group_count``.
    group_count : Tensor
        Kept weights per (global channel, class), shape (total_channels, len(levels)): everything the size
        depends on besides the layout.
    levels : list of int
        Bit widths (32 = fp32).
    granularity : str
        ``"weight"``, ``"channel"`` or ``"layer"``.
    state : dict
        The model's state dict (names, shapes and dtypes are used).
    """
    index = {n: i for i, n in enumerate(layout.names)}
    lv = torch.tensor(levels, dtype=torch.long)
    cb = class_bits(len(levels))
    gc = group_count.long()
    kept_ch = gc.sum(1)  # kept (non-protected) weights per output channel
    ch_size = torch.tensor([layout.sizes[i] // layout.channels[i] for i in range(len(layout.names))],
                           dtype=torch.long)[layout.layer_of_channel]
    full_or_empty = (kept_ch == 0) | (kept_ch == ch_size)
    per_layer = torch.zeros(len(layout.names), len(levels), dtype=torch.long).index_add_(0, layout.layer_of_channel, gc)
    quant_cols = torch.tensor([b != FP32 for b in levels])
    scales_per_layer = torch.zeros(len(layout.names), dtype=torch.long).index_add_(
        0, layout.layer_of_channel, ((gc > 0) & quant_cols).sum(1))
    ragged = torch.zeros(len(layout.names), dtype=torch.long).index_add_(
        0, layout.layer_of_channel, (~full_or_empty).long())
    structured_layer = ragged == 0
    rows = []
    for name, value in state.items():
        if not is_float_entry(value):
            continue
        numel = value.numel()
        shape = tuple(value.shape)
        i = index.get(name)
        if i is None or layout.protected[i]:
            rows.append(TensorSize(name, "raw", shape, numel, numel, 4 * numel, "raw", raw_bytes=4 * numel))
            continue
        counts = per_layer[i]
        kept = int(counts.sum())
        c = layout.channels[i]
        structured = kept < numel and bool(structured_layer[i])
        rice = rice_cost(rice_positions(keep[layout.layer_slice(i)])) if kept < numel else None
        enc, kb = keep_encoding(numel, kept, c, structured, rice)
        k_param = rice[0] if enc.startswith("rice") and rice is not None else 0
        value_bits = int((counts * lv).sum())
        if granularity == "weight":
            class_b = _bytes(kept * cb)
        elif granularity == "channel":
            class_b = _bytes(c * cb)
        else:
            class_b = 0
        n_scales = int(scales_per_layer[i])
        rows.append(TensorSize(name, "compressed", shape, numel, kept, 4 * numel, enc, k_param, kb, class_b,
                               4 * n_scales, _bytes(value_bits), 0, value_bits / kept if kept else 0.0))
    return SizeBreakdown(rows)
