"""Fused LRP-epsilon: the ``"epsilon"`` composite's relevance in one forward and one backward pass.

The zennit path (:mod:`xaicomp_core.relevance.lrp`) registers hooks that replace each layer's gradient by its rule.
Here a working copy of the model is rebuilt so that its plain backward pass *is* the LRP pass, with the same rules
and the same arithmetic as zennit:

* the canonizers of :func:`canonizers_for`, applied to the copy for good: BatchNorm folded into the preceding
  conv/linear layer by :class:`ExactMergeBatchNorm` (merged BatchNorms become ``nn.Identity``); torchvision ResNet
  blocks get zennit's canonized forward, with the residual addition as one Function carrying zennit's ``Norm``
  rule of the ``Sum`` layer (``R_branch = branch * R / (z + eps sign z)``) instead of a stacked tensor.
* conv/linear layers (Epsilon): forward ``z = layer(a)``; backward ``s = R / (z + eps sign z)`` (sign(0) = +1,
  :class:`SignStabilizer`), input relevance ``a * grad_input(s)``, weight relevance ``W * grad_weight(a, s)`` from
  the layer's own backward kernel and bias relevance ``b * sum(s)``, accumulated into a store in the backward.
* zennit's ``layer_map_base``: activations and unmerged BatchNorm pass the relevance through (``Pass``); ``Sum`` and
  average pooling use ``Norm``: ``a * grad(R / (z + eps sign z))``.
* max pooling, flatten, dropout (eval) and identities keep their gradient, as in zennit, where they carry no rule.

It computes in the memory layout of the inputs, as the model itself does (the built-in data is channels-last
strided, which the CPU convolutions run fastest in). The zennit path computes in the same layout
(:func:`~xaicomp_core.relevance.lrp.compute_relevance` restores it after zennit's hooks), so both give the same
numbers to rounding in either layout. Computed in two different layouts, float32 convolutions would round
differently, which the epsilon rule amplifies where ``z`` is near zero (up to 1e-3 relative on the built-in ResNet,
each as far from float64 as the other), and max pooling may route a tie between equal inputs to another of them.

A model with any other leaf module, a module registered twice, or a conv/linear layer called more than once per
forward pass is refused with :class:`FusedUnsupported`; :func:`~xaicomp_core.relevance.lrp.compute_relevance` then
takes the zennit path.
"""

from __future__ import annotations

import contextlib
import copy
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, MaxPool

from xaicomp_core.device import module_device
from xaicomp_core.errors import XaicompError
from xaicomp_core.relevance.composites import ExactMergeBatchNorm, SignStabilizer, canonizers_for

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPSILON = (*_CONV, nn.Linear)
#: Leaves that carry no rule in the epsilon composite: their plain gradient routes the relevance (as in zennit).
_GRADIENT = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
             nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on the calling thread alone inside the block: for small-tensor work (bookkeeping, the 16-sample
    check, copying and folding the model), where waking the thread pool costs more than it saves -- on a busy
    machine each wake-up can cost milliseconds. The count is saved and restored for the calling thread (under
    OpenMP torch's intra-op thread count is per thread), so concurrent blocks in other threads do not interfere."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class FusedUnsupported(XaicompError):
    """The fused path cannot reproduce the zennit path for this model."""


def _leaf_reason(name: str, module: nn.Module) -> str | None:
    """Why the fused path cannot handle this leaf module (None if it can)."""
    label = f"{name or 'model'} ({type(module).__name__})"
    if isinstance(module, _CONV):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"{label}: only zero padding given as numbers"
        return None
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.MultiheadAttention):
        return f"{label} is not elementwise"
    if isinstance(module, (Activation, BatchNorm, Sum, AvgPool, MaxPool, _GRADIENT)):
        return None
    return f"{label} has no fused rule"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`FusedEpsilon` cannot handle ``model`` (None if it can).

    Every leaf module must be a conv (zero padding) or linear layer, an activation, BatchNorm, zennit's ``Sum``,
    average or max pooling, flatten, dropout or identity, and no module may be registered under two names. A
    conv/linear layer called twice is only seen in the forward pass (:meth:`FusedEpsilon.forward` refuses it).
    """
    if next(model.children(), None) is None:
        return "the model is a single layer"
    seen: set[int] = set()
    for parent in model.modules():
        for child in parent._modules.values():  # children() would skip a repeated module
            if child is None:
                continue
            if id(child) in seen:
                return f"{type(child).__name__} is registered more than once"
            seen.add(id(child))
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            reason = _leaf_reason(name, module)
            if reason:
                return reason
        elif isinstance(module, (*_EPSILON, Activation, BatchNorm, Sum, AvgPool, MaxPool)):
            return f"{name} ({type(module).__name__}) has child modules"
    return None


def is_identity_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm emptied by :class:`ExactMergeBatchNorm` (computes exactly the identity)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine or module.running_var is None:
        return False
    with torch.no_grad():
        return bool((module.weight == 1).all() and (module.bias == 0).all() and (module.running_mean == 0).all()
                    and ((module.running_var + module.eps) == 1).all())


def drop_identity_batchnorms(model: nn.Module) -> None:
    """Replace BatchNorms that merging emptied (exact identities) by ``nn.Identity`` in the working copy."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_identity_batchnorm(child):
                setattr(parent, child_name, nn.Identity())


class _EpsilonFn(torch.autograd.Function):
    """Forward: the layer. Backward: the epsilon rule's input relevance (parameter relevance goes to the store)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, anchor: torch.Tensor, layer: _EpsilonLayer) -> torch.Tensor:  # noqa: D102
        z = layer.layer(a)
        ctx.layer = layer
        ctx.save_for_backward(a, z)  # a later in-place change of either is an error in the backward, not a wrong R
        return z

    @staticmethod
    def backward(ctx, r: torch.Tensor):  # noqa: D102
        a, z = ctx.saved_tensors
        return ctx.layer.relevance(a, z, r, ctx.needs_input_grad[0]), None, None


class _EpsilonLayer(nn.Module):
    """A conv/linear layer (BatchNorm already folded in) whose gradient is LRP-epsilon."""

    def __init__(self, layer: nn.Module, name: str, epsilon: SignStabilizer, net: FusedEpsilon) -> None:
        super().__init__()
        self.layer = layer
        self.name = name
        self.epsilon = epsilon
        self.net = net
        self.calls = 0
        self.weight = layer.weight.detach()
        self.bias = layer.bias.detach() if layer.bias is not None else None

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self.calls += 1
        return _EpsilonFn.apply(a, self.net.anchor, self)

    def _grads(self, a: torch.Tensor, s: torch.Tensor, need_input: bool):
        w, b = self.weight, self.bias
        if isinstance(self.layer, nn.Linear):
            s2 = s.reshape(-1, s.shape[-1])
            a2 = a.reshape(-1, a.shape[-1])
            return (s @ w) if need_input else None, s2.T @ a2, (s2.sum(0) if b is not None else None)
        m = self.layer
        nd = a.ndim - 2
        gi, gw, _ = torch.ops.aten.convolution_backward(
            s, a, w, None, list(m.stride), list(m.padding), list(m.dilation), False, [0] * nd, m.groups,
            [need_input, True, False])
        # the bias gradient as a plain sum: oneDNN's backward with bias costs more than this pass
        gb = s.sum([0, *range(2, s.ndim)]) if b is not None else None
        return gi, gw, gb

    def _accumulate(self, key: str, grad: torch.Tensor, param: torch.Tensor, flow: Any) -> float:
        """``grad * param`` (in place: the gradient is this pass's own) into the store and the flow; its sum."""
        store = self.net.store
        name = f"{self.name}.{key}"
        prior = store.get(name)
        with one_thread():
            grad.mul_(param)
            total = float(grad.sum())
            if prior is None:
                store[name] = grad
            else:
                prior.add_(grad)
        setattr(flow, key, getattr(flow, key) + total)
        return total

    def relevance(self, a: torch.Tensor, z: torch.Tensor, r: torch.Tensor, need_input: bool) -> torch.Tensor | None:
        """Input relevance of the layer for output relevance ``r``; parameter relevance and flows are recorded."""
        flows = self.net.flows
        flow = flows.get(self.name)
        if flow is None:
            flow = flows[self.name] = self.net.new_flow("Epsilon")
        flow.output += self.net.sum_of(r)
        s = self.epsilon(z)  # z + eps sign z, then R / that, in place: the same numbers as zennit's r / stabilizer(z)
        torch.div(r, s, out=s)
        gi, gw, gb = self._grads(a, s, need_input)
        weight = self._accumulate("weight", gw, self.weight, flow)
        if gb is not None:
            self._accumulate("bias", gb, self.bias, flow)
        if not need_input:
            # the first layer's input relevance is not formed; its sum is the weights' (sum_i R_i = sum_ij R_ij)
            flow.input += weight
            return None
        rel = gi.mul_(a)
        flow.input += self.net.remember_sum(rel)
        return rel


class _PassFn(torch.autograd.Function):
    """zennit's ``Pass``: forward the module, backward hands the relevance on unchanged."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return fn(a)

    @staticmethod
    def backward(ctx, r: torch.Tensor):  # noqa: D102
        return r, None


class _PassLayer(nn.Module):
    """An activation (or an unmerged BatchNorm) with zennit's ``Pass`` rule; never in place."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        if type(module) is nn.ReLU:
            self.fn = torch.relu
        elif getattr(module, "inplace", False):
            self.fn = lambda a: module(a.clone())
        else:
            self.fn = module

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _PassFn.apply(a, self.fn)


class _NormFn(torch.autograd.Function):
    """zennit's ``Norm``: ``a * grad(R / (z + eps sign z))`` through the layer's own gradient."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, layer: _NormLayer) -> torch.Tensor:  # noqa: D102
        ctx.layer = layer
        ctx.save_for_backward(a)
        return layer.module(a)

    @staticmethod
    def backward(ctx, r: torch.Tensor):  # noqa: D102
        (a,) = ctx.saved_tensors
        layer = ctx.layer
        with torch.enable_grad():
            inp = a.detach().requires_grad_()
            z = layer.module(inp)
            (g,) = torch.autograd.grad(z, inp, grad_outputs=r / layer.stabilizer(z.detach()))
        return a * g, None


class _NormLayer(nn.Module):
    """zennit's ``Sum`` layer or an average pooling with the ``Norm`` rule."""

    def __init__(self, module: nn.Module, stabilizer: SignStabilizer) -> None:
        super().__init__()
        self.module = module
        self.stabilizer = stabilizer

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _NormFn.apply(a, self)


class _ResidualSumFn(torch.autograd.Function):
    """zennit's ``Norm`` on the residual ``Sum`` of two branches, without stacking them (the layout stays)."""

    @staticmethod
    def forward(ctx, identity: torch.Tensor, out: torch.Tensor, layer: _ResidualSum) -> torch.Tensor:  # noqa: D102
        ctx.layer = layer
        z = identity + out
        ctx.save_for_backward(identity, out, z)
        return z

    @staticmethod
    def backward(ctx, r: torch.Tensor):  # noqa: D102
        identity, out, z = ctx.saved_tensors
        s = ctx.layer.stabilizer(z)  # r / (z + eps sign z), as zennit's Norm on the stacked branches
        torch.div(r, s, out=s)
        return identity * s, out * s, None


class _ResidualSum(nn.Module):
    """The residual addition of a ResNet block with zennit's ``Norm`` rule (what its ``Sum`` canonizer routes)."""

    def __init__(self, stabilizer: SignStabilizer) -> None:
        super().__init__()
        self.stabilizer = stabilizer

    def forward(self, identity: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _ResidualSumFn.apply(identity, out, self)


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """zennit's canonized torchvision ``BasicBlock`` forward, the Sum of the stacked branches as one residual sum."""
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(self.fused_sum(identity, out))


def _bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    """zennit's canonized torchvision ``Bottleneck`` forward, likewise."""
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(self.fused_sum(identity, out))


def _canonize(work: nn.Module, stabilizer: SignStabilizer) -> None:
    """Apply :func:`canonizers_for` to the working copy, for good; zennit's ResNet block canonizers are replaced by
    the same forward with a :class:`_ResidualSum` (no stacked tensor, so no change of memory layout)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    blocks = {ResNetBasicBlockCanonizer: (BasicBlock, _basic_block_forward),
              ResNetBottleneckCanonizer: (Bottleneck, _bottleneck_forward)}
    for canonizer in canonizers_for(work):
        if isinstance(canonizer, ExactMergeBatchNorm):
            canonizer.apply(work)
        elif type(canonizer) in blocks:
            kind, forward = blocks[type(canonizer)]
            for module in work.modules():
                if isinstance(module, kind):
                    module.fused_sum = _ResidualSum(stabilizer)
                    module.forward = types.MethodType(forward, module)
        else:
            raise FusedUnsupported(f"no fused equivalent of the canonizer {type(canonizer).__name__}")
    drop_identity_batchnorms(work)


class FusedEpsilon:
    """A working copy of ``model`` whose plain backward pass is LRP with the ``"epsilon"`` composite.

    Parameters
    ----------
    model : torch.nn.Module
        Left untouched (the copy is canonized and rebuilt).
    epsilon : float
        Stabiliser of the epsilon rule on conv/linear layers.
    stabilizer : float
        Stabiliser of the ``Norm`` rule (sums, average pooling).
    store : dict
        Receives the parameter relevance in the backward pass: ``"<layer>.weight"`` / ``"<layer>.bias"`` -> tensor,
        summed over the passes until the caller clears it.
    flows : dict
        Receives per conv/linear layer a flow record (``new_flow("Epsilon")``, then its ``input``, ``output``,
        ``weight`` and ``bias`` sums are increased), in backward order.
    new_flow : callable
        Makes a flow record from the rule name.
    need_input : bool
        Whether :meth:`backward` must return the input relevance; without it the first layer skips its input
        gradient (its flow's ``input`` is then the sum of its weight relevance, the same sum by the epsilon rule).

    Raises
    ------
    FusedUnsupported
        If the model has a module the fused rules do not cover (:func:`unsupported_reason`).
    """

    def __init__(self, model: nn.Module, epsilon: float, stabilizer: float, store: dict[str, torch.Tensor],
                 flows: dict[str, Any], new_flow: Callable[[str], Any], need_input: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise FusedUnsupported(reason)
        self.store = store
        self.flows = flows
        self.new_flow = new_flow
        self.need_input = need_input
        self._last: tuple[weakref.ref, int, float] | None = None
        #: every conv/linear Function takes it, so outputs need a gradient even where the input does not
        self.anchor = torch.zeros((), requires_grad=True, device=module_device(model))
        with one_thread():
            work = copy.deepcopy(model).eval()
            for p in work.parameters():
                p.requires_grad_(False)
            eps, stab = SignStabilizer(epsilon), SignStabilizer(stabilizer)
            _canonize(work, stab)
        self.layers: list[_EpsilonLayer] = []
        for name, module in list(work.named_modules()):
            if not name or next(module.children(), None) is not None:
                continue
            if isinstance(module, _EPSILON):
                new: nn.Module = _EpsilonLayer(module, name, eps, self)
                self.layers.append(new)
            elif isinstance(module, (Sum, AvgPool)):
                new = _NormLayer(module, stab)
            elif isinstance(module, (Activation, BatchNorm)):
                new = _PassLayer(module)
            else:
                continue
            parent, _, attr = name.rpartition(".")
            setattr(work.get_submodule(parent), attr, new)
        self.work = work

    def remember_sum(self, rel: torch.Tensor) -> float:
        """The sum of a layer's input relevance, kept for the layer below if the tensor reaches it unchanged."""
        total = float(rel.sum())
        self._last = (weakref.ref(rel), rel._version, total)
        return total

    def sum_of(self, r: torch.Tensor) -> float:
        """The sum of a layer's output relevance (no second pass over it where it is the last input relevance, handed
        on by ``Pass`` layers and identities)."""
        if self._last is not None:
            ref, version, total = self._last
            if ref() is r and r._version == version:
                return total
        return float(r.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs for ``x``; their gradient w.r.t. ``x`` is the input relevance.

        Raises
        ------
        FusedUnsupported
            If a conv/linear layer ran more than once (zennit's hooks would not see it as one layer).
        """
        for layer in self.layers:
            layer.calls = 0
        out = self.work(x if self.need_input else x.detach())
        twice = [layer.name for layer in self.layers if layer.calls > 1]
        if twice:
            raise FusedUnsupported(f"layer(s) {', '.join(twice[:4])} run more than once per forward pass")
        return out

    def backward(self, out: torch.Tensor, x: torch.Tensor, start: torch.Tensor) -> torch.Tensor | None:
        """Input relevance for the start relevance ``start`` at the outputs (None without ``need_input``); the
        parameter relevance goes to the store.

        Raises
        ------
        FusedUnsupported
            If the model's forward code changed a saved tensor in place.
        """
        self._last = None
        try:
            (grad,) = torch.autograd.grad(out, x if self.need_input else self.anchor, grad_outputs=start,
                                          allow_unused=not self.need_input)
        except RuntimeError as err:
            if "inplace" in str(err):
                raise FusedUnsupported(f"the model changes a layer's input or output in place ({err})") from err
            raise
        return grad if self.need_input else None
