"""Recovery fine-tuning with the masks and bit classes fixed and quantization in the loop.

Each step quantizes the current weights exactly as the exporter does (same keep-mask, same bit class per weight,
scales recomputed per (output channel, class) group) and runs the forward pass with those values; the gradient
passes straight through the rounding to the float "shadow" weights (straight-through estimator). Only the conv and
linear weights are trained; biases, BatchNorm parameters and statistics stay as they are (BatchNorm in eval mode),
so the packed file keeps every section of the plan without fine-tuning but the values, whose Huffman code (where it
is used) follows the fine-tuned codes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from xaicomp_core.compress.layout import LayerLayout
from xaicomp_core.compress.quantize import quantize
from xaicomp_core.device import resolve_device
from xaicomp_core.train import augment

ProgressFn = Callable[[int, int], None]


def finetune_weights(model: nn.Module, layout: LayerLayout, weights: torch.Tensor, keep: torch.Tensor,
                     klass: torch.Tensor, levels: list[int], method: str, x_train: torch.Tensor,
                     y_train: torch.Tensor, epochs: int = 2, lr: float = 0.01, seed: int = 0, batch_size: int = 128,
                     progress: ProgressFn | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """Fine-tune the flat compressible weights; returns the new (unquantized) flat weights.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose other parameters (biases, BatchNorm) the compressed model uses, e.g.
        :meth:`CompressionSession.compressed_model` of the plan (not modified; a copy is trained).
    layout : LayerLayout
        Layout of the compressible weights.
    weights : Tensor
        Flat starting weights (the original ones).
    keep, klass : Tensor
        Fixed keep-mask and bit class per weight.
    levels : list of int
        Bit widths of the classes.
    method : str
        Quantizer scale method (``"mse"`` or ``"absmax"``).
    x_train, y_train : Tensor
        Training inputs (model-ready) and labels.
    epochs, lr, seed, batch_size :
        SGD (momentum 0.9) with a cosine learning-rate decay; seeded data order and augmentation.
    progress : callable, optional
        ``progress(step, total_steps)``.
    device : {"auto", "cpu", "cuda"} or torch.device, optional
        Where the training steps run (default: the CPU). The quantization (small-tensor bookkeeping) and the data
        order and augmentation stay on the CPU, so the seeded steps are the same; the result is a CPU tensor.
    """
    dev = torch.device("cpu") if device is None else resolve_device(device)
    work = copy.deepcopy(model).eval().to(dev)
    for p in work.parameters():
        p.requires_grad_(False)
    params = dict(work.named_parameters())
    shadow = {n: w.detach().clone().float().to(dev).requires_grad_(True)
              for n, w in layout.split(weights.clone()).items()}
    opt = torch.optim.SGD(list(shadow.values()), lr=lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), batch_size):
            idx = perm[i:i + batch_size]
            xb = augment(x_train[idx], gen) if x_train.shape[1] == 1 else x_train[idx]
            with torch.no_grad():
                flat = layout.flat({n: s.cpu() for n, s in shadow.items()})
                q = {n: t.to(dev) for n, t in layout.split(quantize(layout, flat, keep, klass, levels, method).values
                                                           ).items()}
            ste = {n: shadow[n] + (q[n] - shadow[n]).detach() for n in layout.names}  # straight-through
            out = torch.func.functional_call(work, {**params, **ste}, (xb.to(dev),))
            loss = nn.functional.cross_entropy(out, y_train[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress(step, total)
    return layout.flat({n: s.detach().cpu() for n, s in shadow.items()})
