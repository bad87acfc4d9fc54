"""The structured baseline ``magnitude-filter`` (L1 norm per output channel, Li et al.) removes whole filters, the
weakest first, like ``lrp-filter`` does by relevance: the like-for-like comparison for filter pruning."""

from __future__ import annotations

import torch
from torch import nn

from xaicomp_core import CompressionPlan, compress
from xaicomp_core.io.data import Preprocessing
from xaicomp_core.io.models import ModelInfo, attach_info


def tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    with torch.no_grad():
        for c, scale in enumerate((0.1, 3.0, 1.0, 0.5)):  # channel L1 norms in a known order
            m[0].weight[c] = scale * torch.sign(m[0].weight[c])
    return attach_info(m, ModelInfo("tiny", "tiny", Preprocessing((6, 6), 1, (0.0,), (1.0,)), ["a", "b", "c"]))


def test_magnitude_filter_removes_the_weakest_filters():
    m = tiny()
    cw = compress(m, CompressionPlan(criterion="magnitude-filter", prune_ratio=0.035))
    conv = cw.keep[: 4 * 9].view(4, 9)
    kept_channels = conv.any(1).tolist()
    assert kept_channels == [False, True, True, True]  # channel 0 has the smallest L1 norm
    assert bool((conv.all(1) | ~conv.any(1)).all())  # whole filters only
    # its bias is zeroed with the filter, as for lrp-filter
    assert float(cw.overrides["0.bias"][0]) == 0.0
    assert cw.layout.names[-1] == "3.weight" and bool(cw.keep[4 * 9:].all())  # the last layer is never filter-pruned
