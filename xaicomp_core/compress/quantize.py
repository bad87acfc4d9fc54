"""Mixed-precision bit allocation and the quantizer.

Bit allocation: the kept weights are ranked by a score (relevance by default: higher relevance, more bits) and cut
into classes by fractions, e.g. top 20 % -> 8 bits, next 50 % -> 4 bits, rest -> 2 bits; per weight (the paper), per
output channel or per layer.

Quantizer: uniform and symmetric, with one fp32 scale per (output channel, bit class) group. For ``b >= 2`` bits the
integer codes are ``-(2^(b-1)-1) .. 2^(b-1)-1`` and the value is ``code * scale``; the scale is chosen per group as
the one of 16 clipping ratios of ``max|w|`` (0.25 .. 1.0) with the least squared error (``quantizer="mse"``, for
widths up to 6 bits; wider groups use the maximum, where clipping no longer pays) or ``max|w| / qmax``
(``"absmax"``). Clipping matters at low bit widths: for ternary 2-bit weights the best threshold is far below the
maximum. For 1 bit the value is ``±scale`` with ``scale = mean|w|``, the least-squares optimum
(XNOR-Net). The dequantized value is computed in float32 exactly as a reader of the packed file computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xaicomp_core.compress.layout import LayerLayout
from xaicomp_core.compress.levels import FP32
from xaicomp_core.errors import PlanError
from xaicomp_core.registry import Registry, RegistryView, decorator

CLIP_RATIOS = torch.linspace(0.25, 1.0, 16)
#: Above this width the clipping search no longer pays and ``max|w| / qmax`` is used.
MSE_MAX_BITS = 6


@dataclass
class Quantized:
    """Result of quantizing the kept weights of all compressible layers (flat, see :class:`LayerLayout`).

    Attributes
    ----------
    values : Tensor
        float32 dequantized weights, zero where pruned, original values in protected layers and fp32 classes.
    klass : Tensor
        int8 class index into ``levels`` per weight; -1 where pruned or protected.
    codes : Tensor
        int32 stored code per weight: ``code + qmax`` (0 .. 2 qmax) for b >= 2, 0/1 for 1 bit, 0 elsewhere.
    scales : Tensor
        float32 scale per (global channel, class): shape (total_channels, len(levels)); 0 where unused.
    group_count : Tensor
        Number of kept weights per (global channel, class).
    levels : list of int
        Bit widths (32 = fp32).
    """

    values: torch.Tensor
    klass: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    group_count: torch.Tensor
    levels: list[int]


def _assign_by_fraction(order_desc: torch.Tensor, weights: torch.Tensor | None, cuts: list[float],
                        n_levels: int) -> torch.Tensor:
    """Class per item of ``order_desc`` (best first): items whose cumulative share (midpoint, weighted by
    ``weights`` if given) falls below ``cuts[0]`` get class 0, below ``cuts[1]`` class 1, ..."""
    n = len(order_desc)
    out = torch.full((n,), n_levels - 1, dtype=torch.int8)
    if n == 0 or n_levels == 1:
        return out
    if weights is None:
        bounds = [int(round(c * n)) for c in cuts]
        prev = 0
        for lvl, b in enumerate(bounds):
            out[prev:b] = lvl
            prev = max(prev, b)
        return out
    w = weights.double()
    total = float(w.sum())
    if total <= 0:
        return out
    mid = (torch.cumsum(w, 0) - w / 2) / total
    klass = torch.searchsorted(torch.tensor(cuts, dtype=torch.float64), mid, right=True)
    return klass.clamp(max=n_levels - 1).to(torch.int8)


def allocate_bits(layout: LayerLayout, keep: torch.Tensor, bit_scores: torch.Tensor,
                  bit_order_desc: torch.Tensor, layer_orders_desc: dict[int, torch.Tensor], levels: list[int],
                  split: list[float], granularity: str, scope: str) -> torch.Tensor:
    """Class index per weight (int8; -1 where pruned or protected).

    Parameters
    ----------
    layout : LayerLayout
    keep : Tensor
        Keep-mask (flat bool).
    bit_scores : Tensor
        Flat scores ranking weights for bits (higher = more bits).
    bit_order_desc, layer_orders_desc : Tensor
        Precomputed descending orders of ``bit_scores`` (global, compressible only; and per layer).
    levels, split : list
        Bit widths (descending) and the fractions of kept weights for all but the last.
    granularity : {"weight", "channel", "layer"}
    scope : {"global", "per-layer"}
        Whether fractions apply over all kept weights or within every layer (for weight/channel granularity).
    """
    n_lv = len(levels)
    klass = torch.full((layout.total,), -1, dtype=torch.int8)
    active = keep & ~layout.protected_flat
    cuts = [float(sum(split[:i + 1])) for i in range(len(split))]
    if n_lv == 1:
        klass[active] = 0
        return klass
    if granularity == "weight":
        if scope == "global":
            kept = bit_order_desc[active[bit_order_desc]]
            klass[kept] = _assign_by_fraction(kept, None, cuts, n_lv)
        else:
            for order in layer_orders_desc.values():
                kept = order[active[order]]
                klass[kept] = _assign_by_fraction(kept, None, cuts, n_lv)
        return klass
    ch = layout.channel_of
    a = active.double()
    counts = torch.zeros(layout.total_channels, dtype=torch.float64).index_add_(0, ch, a)
    sums = torch.zeros(layout.total_channels, dtype=torch.float64).index_add_(0, ch, bit_scores.double() * a)
    if granularity == "channel":
        mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, -float("inf")))
        ch_class = torch.full((layout.total_channels,), n_lv - 1, dtype=torch.int8)
        groups = [layout.compressible] if scope == "global" else [[i] for i in layout.compressible]
        for group in groups:
            idx = torch.cat([torch.arange(layout.channel_offsets[i], layout.channel_offsets[i + 1]) for i in group])
            order = idx[torch.argsort(mean[idx], descending=True, stable=True)]
            ch_class[order] = _assign_by_fraction(order, counts[order], cuts, n_lv)
        klass[active] = ch_class[ch[active]]
        return klass
    # per-layer granularity: layers ranked by mean score of their kept weights, always across layers
    lay = layout.layer_of
    lcounts = torch.zeros(len(layout.names), dtype=torch.float64).index_add_(0, lay, a)
    lsums = torch.zeros(len(layout.names), dtype=torch.float64).index_add_(0, lay, bit_scores.double() * a)
    comp = torch.tensor(layout.compressible, dtype=torch.long)
    lmean = lsums[comp] / lcounts[comp].clamp(min=1)
    order = comp[torch.argsort(lmean, descending=True, stable=True)]
    l_class = torch.full((len(layout.names),), n_lv - 1, dtype=torch.int8)
    l_class[order] = _assign_by_fraction(order, lcounts[order], cuts, n_lv)
    klass[active] = l_class[lay[active]]
    return klass


class Quantizer:
    """How the scale of each (output channel, bit class) group of multi-bit (2-8 bit) weights is chosen.

    Subclass, set ``name`` and ``description``, implement :meth:`group_scales` and decorate with
    :func:`register_quantizer`; plans, the CLI and the app pick it up. Codes are then
    ``clamp(round(w / s), -qmax, qmax)`` and values ``code * s`` (symmetric, as the file format stores them).
    """

    name: str = ""
    description: str = ""

    def group_scales(self, w: torch.Tensor, group: torch.Tensor, bits: torch.Tensor, qmax: torch.Tensor,
                     absmax_scale: torch.Tensor, n_groups: int) -> torch.Tensor:
        """Scale per group (length ``n_groups``; only groups that hold weights are read).

        Parameters
        ----------
        w, group, bits, qmax : Tensor
            The multi-bit kept weights, their group ids, bit widths and ``2**(bits-1) - 1``.
        absmax_scale : Tensor
            Per group ``max|w| / qmax`` (no clipping).
        n_groups : int
        """
        raise NotImplementedError


QUANTIZER_REGISTRY: Registry[Quantizer] = Registry("quantizer", PlanError)
register_quantizer = decorator(QUANTIZER_REGISTRY)
#: name -> description (live view of the registry).
QUANTIZERS = RegistryView(QUANTIZER_REGISTRY, lambda q: q.description)


def get_quantizer(name: str) -> Quantizer:
    """Look up a quantizer by name."""
    return QUANTIZER_REGISTRY.get(name)


@register_quantizer
class MSEQuantizer(Quantizer):
    """Per group, the one of :data:`CLIP_RATIOS` times the absmax scale with the least squared error (for widths up
    to :data:`MSE_MAX_BITS`; wider groups keep the absmax scale, where clipping gains nothing measurable)."""

    name = "mse"
    description = "scale per (channel, bit class) with least squared error over 16 clipping ratios"

    def group_scales(self, w, group, bits, qmax, absmax_scale, n_groups):  # noqa: D102
        base = absmax_scale
        search = bits <= MSE_MAX_BITS
        if not bool(search.any()):
            return base
        # weights in units of the absmax step: |x| <= qmax; the error of a clipping ratio r is then
        # base^2 * sum (x - r q)^2 per group, and base is constant within a group
        gs = group[search]
        inv = torch.where(base > 0, 1.0 / base.clamp(min=1e-30), torch.zeros_like(base))
        x = w[search] * inv[gs]
        qs = qmax[search]
        best_err = torch.full((n_groups,), float("inf"))
        best_ratio = torch.ones(n_groups)
        for r in CLIP_RATIOS.tolist():
            q = torch.clamp(torch.round(x * (1.0 / r)), -qs, qs)
            err = torch.zeros(n_groups).index_add_(0, gs, (x - q * r).square_())
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
        searched = torch.zeros(n_groups, dtype=torch.bool)
        searched[gs] = True
        return torch.where(searched, base * best_ratio, base)


@register_quantizer
class AbsMaxQuantizer(Quantizer):
    """Scale = max|w| / qmax per group (no clipping)."""

    name = "absmax"
    description = "scale per (channel, bit class) = max|w| / qmax (no clipping)"

    def group_scales(self, w, group, bits, qmax, absmax_scale, n_groups):  # noqa: D102
        return absmax_scale


def quantize(layout: LayerLayout, weights: torch.Tensor, keep: torch.Tensor, klass: torch.Tensor,
             levels: list[int], method: str = "mse") -> Quantized:
    """Quantize the kept weights per (output channel, class) group; see the module docstring."""
    w = weights.detach().float()
    n_lv = len(levels)
    values = torch.where(keep | layout.protected_flat, w, torch.zeros_like(w))
    codes = torch.zeros(layout.total, dtype=torch.int32)
    scales = torch.zeros(layout.total_channels, n_lv, dtype=torch.float32)
    idx = torch.nonzero(klass >= 0).squeeze(1)
    kc = klass[idx].long()
    group = layout.channel_of[idx] * n_lv + kc
    n_groups = layout.total_channels * n_lv
    group_count = torch.bincount(group, minlength=n_groups).view(layout.total_channels, n_lv)
    lv = torch.tensor(levels, dtype=torch.long)
    bits = lv[kc]
    wk = w[idx]
    flat_scales = scales.view(-1)

    one = bits == 1
    if bool(one.any()):
        g1 = group[one]
        s = torch.zeros(n_groups).index_add_(0, g1, wk[one].abs())
        cnt = torch.bincount(g1, minlength=n_groups).float()
        s = s / cnt.clamp(min=1)
        flat_scales[cnt > 0] = s[cnt > 0]
        u = (wk[one] >= 0).to(torch.int32)
        codes[idx[one]] = u
        values[idx[one]] = (u.float() * 2 - 1) * flat_scales[g1]

    multi = (bits >= 2) & (bits <= 8)
    if bool(multi.any()):
        gm = group[multi]
        wm = wk[multi]
        qmax = (2 ** (bits[multi] - 1) - 1).float()
        amax = torch.zeros(n_groups).scatter_reduce_(0, gm, wm.abs(), "amax", include_self=True)
        qmax_g = torch.zeros(n_groups).index_put_((gm,), qmax)
        base = amax / qmax_g.clamp(min=1)
        scale_g = get_quantizer(method).group_scales(wm, gm, bits[multi], qmax, base, n_groups)
        used = torch.bincount(gm, minlength=n_groups) > 0
        flat_scales[used] = scale_g[used]
        s = flat_scales[gm]
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(wm / s_safe), -qmax, qmax)
        codes[idx[multi]] = (q + qmax).to(torch.int32)
        values[idx[multi]] = q * s

    fp = bits == FP32
    if bool(fp.any()):
        values[idx[fp]] = wk[fp]
    return Quantized(values, klass, codes, scales, group_count, list(levels))


def dequantize_codes(codes: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Values from stored codes as a reader computes them (float32): ``(u - qmax) * s`` or ``(2u - 1) * s``."""
    qmax = (2 ** (bits.long() - 1) - 1).float()
    u = codes.float()
    return torch.where(bits == 1, (u * 2 - 1) * scales, (u - qmax) * scales)
