"""The reference (eager) forward and accuracy counting, shared by the session, the fast forward and ``verify``."""

from __future__ import annotations

import torch
from torch import nn

from xaicomp_core.device import module_device

#: Images per batch of the evaluation forward.
EVAL_BATCH_SIZE = 1000


def forward_logits(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in batches under ``torch.inference_mode`` (the eager reference forward).

    Each batch moves to the model's device; the logits come back on the CPU."""
    device = module_device(model)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size].to(device)).cpu())
    return torch.cat(outs)


def accuracy_counts(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[int, list[float]]:
    """Number of correct predictions and the accuracy of each class (0 for a class with no samples)."""
    correct = pred == y
    per = torch.bincount(y[correct], minlength=n_classes).double() / torch.bincount(y, minlength=n_classes).clamp(
        min=1).double()
    return int(correct.sum()), per.tolist()
