"""An example xaicomp plugin: one pruning criterion in one file.

``layer-magnitude`` ranks weights by ``|w| / mean |w| of their layer``: plain magnitude pruned globally takes most
weights from layers whose weights are small overall (often the first and the last); normalising by the layer's
mean magnitude spreads the pruning more evenly. Installed with ``pip install examples/plugin``, it appears in
``xaicomp compress --criterion layer-magnitude``, in ``CompressionSession.evaluate`` and in the app's criterion list,
because its package declares the ``xaicomp.plugins`` entry point (see pyproject.toml beside this file).
"""

from __future__ import annotations

import torch

from xaicomp_core import Criterion, ScoreInputs, register_criterion


@register_criterion
class LayerMagnitude(Criterion):
    """|w| divided by the mean |w| of the weight's layer (no relevance needed)."""

    name = "layer-magnitude"
    label = "smallest |weight| relative to its layer first"
    description = "rank weights by |weight| / mean |weight| of their layer (example plugin)"
    needs_relevance = False
    bit_ranking_needs_relevance = False
    colour = "#2e7d32"

    def scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        out = {}
        for k, w in inp.weights.items():
            a = w.detach().abs().double()
            mean = a.mean()
            out[k] = a / mean if mean > 0 else a
        return out

    def bit_scores(self, inp: ScoreInputs) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.scores(inp)
