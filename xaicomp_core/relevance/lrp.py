"""Per-weight LRP relevance with zennit.

zennit computes the relevance of *inputs* of each layer. The relevance of a layer's *parameters* is obtained in the
same backward pass: each rule's hook re-runs its layer with the rule's input and parameter modifiers; we take the
gradient of those outputs with respect to the (modified) parameters as well as the inputs, with the rule's gradient
mapper applied to the output relevance, multiply by the modified parameters and reduce exactly like the rule reduces
the input relevance. For the epsilon rule this is ``R_ij = sum_{batch, positions} a_i w_ij R_j / (z_j + eps sign z_j)``,
and per layer ``sum_ij R_ij = sum_i R_i`` exactly.

For the ``"epsilon"`` composite, :func:`compute_relevance` normally takes the fused pass of
:mod:`xaicomp_core.relevance.fused` instead (the same rules in one plain forward and backward, no hooks).

Everything runs on a deep copy of the model: canonizers (BatchNorm merging, residual ``Sum``) and hooks never touch
the caller's model. The relevance of a conv weight followed by BatchNorm is that of the merged weight at the same
index.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from zennit.core import BasicHook, Composite, Hook, ParamMod

from xaicomp_core.device import measure_memory_cost, memory_budget_bytes, module_device, on_device, resolve_device
from xaicomp_core.errors import XaicompError
from xaicomp_core.relevance.composites import (  # noqa: F401  (re-exported: the relevance stage's public names)
    COMPOSITE_REGISTRY,
    COMPOSITES,
    DEFAULT_COMPOSITE,
    ExactMergeBatchNorm,
    SignStabilizer,
    canonizers_for,
    make_composite,
    register_composite,
)
from xaicomp_core.relevance.fused import (
    FusedEpsilon,
    FusedUnsupported,
    drop_identity_batchnorms,
    one_thread,
    unsupported_reason,
)

ProgressFn = Callable[[int, int], None]

class RelevanceError(XaicompError):
    """Relevance cannot be computed faithfully for this model."""


def relevance_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear modules whose parameters get relevance, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


@dataclass
class LayerFlow:
    """Relevance bookkeeping of one layer, summed over the batch."""

    rule: str
    input: float = 0.0
    output: float = 0.0
    weight: float = 0.0
    bias: float = 0.0


@dataclass
class RelevanceResult:
    """Output of :func:`compute_relevance`.

    Attributes
    ----------
    weights : dict of str to Tensor
        Relevance of every weight and bias of every conv/linear layer, same shapes as the parameters, summed over
        the batch.
    extra : dict of str to Tensor
        Relevance of parameters that only exist while canonized (the bias a merged BatchNorm gives a bias-free conv).
    input : Tensor or None
        Pixel relevance, shape of the inputs (if requested).
    logits : Tensor
        Model outputs for the inputs.
    targets : Tensor
        The classes whose relevance was explained.
    flows : dict of str to LayerFlow
        Per layer: total input, output, weight and bias relevance.
    abs_by_class : dict of str to Tensor or None
        With ``by_class=True``: per parameter, the sum over classes of the absolute class-summed relevance.
    """

    weights: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]
    input: torch.Tensor | None
    logits: torch.Tensor
    targets: torch.Tensor
    flows: dict[str, LayerFlow] = field(default_factory=dict)
    composite: str = DEFAULT_COMPOSITE
    samples: int = 0
    abs_by_class: dict[str, torch.Tensor] | None = None


_HOOK_KWARGS = "kwargs" in inspect.signature(Hook.post_forward).parameters


class _ShortCircuit(torch.autograd.Function):
    """Re-attaches a layer's output to its input at no cost: the layer's own backward (its plain gradient) is never
    needed because the LRP hook on the input replaces it, so the backward pass skips it."""

    @staticmethod
    def forward(ctx, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.shape = inp.shape
        return out.clone()  # a fresh tensor: later in-place ops (ReLU(inplace=True)) must not touch the stored one

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad.new_zeros(()).expand(ctx.shape), None


def _plain_epsilon(template: BasicHook) -> bool:
    """Whether a rule is zennit's Epsilon without zeroed parameters (its modified layer is the layer itself)."""
    from zennit.rules import Epsilon as ZEpsilon

    if not isinstance(template, ZEpsilon) or len(template.param_modifiers) != 1:
        return False
    mod = template.param_modifiers[0]
    return not getattr(mod, "zero_params", None) and getattr(mod, "param_keys", None) is None


def _fast_grads(module: nn.Module, inp: torch.Tensor, s: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Gradients of a linear/conv layer's output (at ``s``) w.r.t. input, weight and bias, without re-running it;
    None where the layer is not a plain one this handles."""
    w, b = module.weight, module.bias
    if isinstance(module, nn.Linear):
        s2 = s.reshape(-1, s.shape[-1])
        a2 = inp.reshape(-1, inp.shape[-1])
        return (s @ w), s2.T @ a2, (s2.sum(0) if b is not None else None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros" and not isinstance(
            module.padding, str):
        nd = inp.ndim - 2
        gi, gw, gb = torch.ops.aten.convolution_backward(
            s, inp, w, [w.shape[0]] if b is not None else None, list(module.stride), list(module.padding),
            list(module.dilation), False, [0] * nd, module.groups, [True, True, b is not None])
        return gi, gw, gb
    return None


class _ParamRelevanceHook(BasicHook):
    """Wraps a zennit rule: computes the rule's input relevance *and* its parameter relevance in one pass.

    The generic path re-runs the layer with the rule's input/parameter/output modifiers and takes the gradient of
    the outputs with respect to the modified inputs and parameters, with the rule's gradient mapper applied to the
    output relevance, and reduces both like the rule. For zennit's plain Epsilon rule the modified layer *is* the
    layer, so the stored forward output is used and the gradients come from the layer's backward kernel directly
    (same numbers, no second forward pass).
    """

    def __init__(self, template: BasicHook, module_name: str, store: dict, flows: dict,
                 fast: bool | None = None) -> None:
        BasicHook.__init__(self, template.input_modifiers, template.param_modifiers, template.output_modifiers,
                           template.gradient_mapper, template.reducer)
        self.rule_name = getattr(template, "rule_name", type(template).__name__)
        self.module_name = module_name
        self.store = store
        self.flows = flows
        self.fast = _plain_epsilon(template) if fast is None else fast

    def copy(self) -> _ParamRelevanceHook:  # noqa: D102
        return _ParamRelevanceHook(self, self.module_name, self.store, self.flows, self.fast)

    def _short_circuit(self, inp, output):
        first = inp[0] if isinstance(inp, (tuple, list)) else inp
        if isinstance(output, torch.Tensor) and isinstance(first, torch.Tensor) and first.requires_grad:
            if self.fast:  # only the fast epsilon path reads the output back
                self.stored_tensors["output"] = output.detach()
            return _ShortCircuit.apply(first, output.detach())
        return output

    if _HOOK_KWARGS:  # zennit >= 1.0 calls forward hooks with (module, args, kwargs, output)
        def post_forward(self, module, args, kwargs, output):  # noqa: D102
            return super().post_forward(module, args, kwargs, self._short_circuit(args, output))
    else:
        def post_forward(self, module, input, output):  # noqa: D102
            return super().post_forward(module, input, self._short_circuit(input, output))

    def _accumulate(self, key: str, r: torch.Tensor, flow: LayerFlow) -> None:
        name = f"{self.module_name}.{key}"
        self.store[name] = self.store[name] + r if name in self.store else r.clone()
        setattr(flow, key, getattr(flow, key) + float(r.sum()))

    def backward(self, module, grad_input, grad_output):  # noqa: D102
        stored = self.stored_tensors["input"]
        original_input, *args = stored
        kwargs = self.stored_tensors.get("kwargs") or {}
        out_grad = grad_output[0]
        flow = self.flows.setdefault(self.module_name, LayerFlow(self.rule_name))
        flow.output += float(out_grad.detach().sum())
        if self.fast and not args and not kwargs and "output" in self.stored_tensors and not out_grad.requires_grad:
            z = self.stored_tensors["output"]
            s = self.gradient_mapper(out_grad, [z])
            s = s[0] if isinstance(s, (tuple, list)) else s
            grads = _fast_grads(module, original_input, s)
            if grads is not None:
                gi, gw, gb = grads
                relevance = self.reducer([original_input], [gi])
                flow.input += float(relevance.sum())
                self._accumulate("weight", self.reducer([module.weight.detach()], [gw]), flow)
                if gb is not None:
                    self._accumulate("bias", self.reducer([module.bias.detach()], [gb]), flow)
                return tuple(relevance if original.shape == relevance.shape else None for original in grad_input)
        inputs, outputs, params = [], [], []
        for in_mod, param_mod, out_mod in zip(self.input_modifiers, self.param_modifiers, self.output_modifiers):
            inp = in_mod(original_input).requires_grad_()
            with ParamMod.ensure(param_mod)(module) as modified, torch.autograd.enable_grad():
                ps = {}
                for key in ("weight", "bias"):
                    p = getattr(modified, key, None)
                    if isinstance(p, torch.Tensor) and p.is_floating_point():
                        if p.is_leaf and not p.requires_grad:
                            p.requires_grad_(True)
                        if p.requires_grad:
                            ps[key] = p
                out = out_mod(modified.forward(inp, *args, **kwargs))
            inputs.append(inp)
            outputs.append(out)
            params.append(ps)
        keys = [k for k in ("weight", "bias") if all(k in ps for ps in params)]
        flat = [ps[k] for ps in params for k in keys]
        grad_outputs = self.gradient_mapper(out_grad, outputs)
        grads = torch.autograd.grad(outputs, inputs + flat, grad_outputs=grad_outputs,
                                    create_graph=out_grad.requires_grad, allow_unused=True)
        n = len(inputs)
        gin = [g if g is not None else torch.zeros_like(i) for g, i in zip(grads[:n], inputs)]
        relevance = self.reducer(inputs, gin)
        flow.input += float(relevance.detach().sum())
        gp = grads[n:]
        for j, key in enumerate(keys):
            ps_k = [params[m][key].detach() for m in range(n)]
            gs_k = [gp[m * len(keys) + j] for m in range(n)]
            gs_k = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(gs_k, ps_k)]
            self._accumulate(key, self.reducer(ps_k, gs_k).detach(), flow)
        return tuple(relevance if original.shape == relevance.shape else None for original in grad_input)


def _wrap_module_map(composite: Composite, store: dict, flows: dict) -> None:
    original = composite.module_map

    def module_map(ctx, name, module):
        template = original(ctx, name, module)
        if isinstance(template, BasicHook) and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            template.rule_name = type(template).__name__
            return _ParamRelevanceHook(template, name, store, flows)
        return template

    composite.module_map = module_map


def _check_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Plain forward of the original model, checking every rule-carrying layer is called exactly once."""
    counts: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            handles.append(m.register_forward_hook(
                lambda mod, i, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)))
    try:
        with torch.no_grad():
            plain = model(x)
    finally:
        for h in handles:
            h.remove()
    twice = [k for k, v in counts.items() if v > 1]
    if twice:
        raise RelevanceError(f"layer(s) {', '.join(twice[:4])} run more than once per forward pass; LRP needs each "
                             "conv/linear module to be called once")
    return plain


def _fused_reason(model: nn.Module, composite: str, canonizers: list | None) -> str | None:
    """Why the fused LRP-epsilon pass does not apply (None if it does)."""
    if composite != "epsilon":
        return f"it computes the 'epsilon' composite only, not {composite!r}"
    if canonizers is not None:
        return "it uses the automatic canonizers only"
    return unsupported_reason(model)


def compute_relevance(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                      composite: str = DEFAULT_COMPOSITE, *, epsilon: float = 1e-6, target: str = "true",
                      batch_size: int = 250, keep_input: bool = False, progress: ProgressFn | None = None,
                      check: bool = True, canonizers: list | None = None, stabilizer: float = 1e-6,
                      by_class: bool = False, fused: bool | None = None, device: str | torch.device | None = None,
                      memory_budget_mb: float | None = None) -> RelevanceResult:
    """LRP relevance of every conv/linear weight and bias (and optionally of the input pixels).

    The reference images are streamed in batches: the parameter relevance is summed batch by batch, and no tensor
    the size of the whole input set is formed unless ``keep_input`` asks for the pixel relevance.

    Parameters
    ----------
    model : torch.nn.Module
        Left exactly as it was (the work happens on a deep copy).
    inputs : Tensor
        Model-ready inputs (N, C, H, W).
    targets : Tensor, optional
        True labels; required when ``target="true"``.
    composite : str
        One of :data:`COMPOSITES`.
    epsilon : float
        Stabiliser of the epsilon rule.
    target : {"true", "predicted"}
        Explain the true class or the predicted class. The start relevance is the one-hot of that class (one unit
        of relevance per sample).
    batch_size : int
        Samples per backward pass.
    keep_input : bool
        Also return the input (pixel) relevance.
    progress : callable, optional
        Called as ``progress(done, total)`` after each batch.
    check : bool
        Verify on the first batch that the canonized model computes the same outputs as the original.
    canonizers : list, optional
        zennit canonizers to use instead of the automatic choice (:func:`canonizers_for`).
    stabilizer : float
        Stabiliser of the other rules' divisions (see :func:`make_composite`).
    by_class : bool
        Also accumulate ``sum over classes |sum over the class's samples R|`` (``RelevanceResult.abs_by_class``):
        batches then hold one class each. A weight that is strong evidence for one class and counter-evidence for
        another keeps a large score instead of cancelling out.
    fused : bool, optional
        ``None`` (default): use the fused one-forward-one-backward pass (:mod:`xaicomp_core.relevance.fused`: the
        same rules and arithmetic as zennit's hooks) for the ``"epsilon"`` composite with automatic canonizers on a
        model made of layers it handles, zennit's hooks otherwise. ``True`` forces the fused pass (an error where it
        does not apply), ``False`` the zennit hooks.
    device : {"auto", "cpu", "cuda"} or torch.device, optional
        Where to compute (default: the model's device). The model is copied there (never moved); the batches move
        there one at a time; every tensor of the result is on the CPU.
    memory_budget_mb : float, optional
        Bound the batch by a memory budget (:func:`~xaicomp_core.device.memory_budget_bytes`): at most as many
        images as the per-image cost, measured on one image, lets fit (and never more than ``batch_size``).
    """
    if composite not in COMPOSITES:
        raise XaicompError(f"unknown composite {composite!r}; choose one of {', '.join(COMPOSITES)}")
    if target not in ("true", "predicted"):
        raise XaicompError(f"target must be 'true' or 'predicted', not {target!r}")
    if target == "true" and targets is None:
        raise XaicompError("true-label relevance needs targets")
    if len(inputs) == 0:
        raise XaicompError("no samples to compute relevance on")
    dev = module_device(model) if device is None else resolve_device(device)
    if memory_budget_mb is not None:
        cost = measure_memory_cost(model, inputs[:1].to(module_device(model)))
        batch_size = cost.relevance_batch(memory_budget_bytes(dev, memory_budget_mb), batch_size)
    if dev != module_device(model):
        model = on_device(model, dev)  # a copy on the device: the caller's model stays where it is
    run = dict(inputs=inputs, targets=targets, composite=composite, target=target, batch_size=batch_size,
               keep_input=keep_input, progress=progress, check=check, by_class=by_class, device=dev)
    if fused is not False:
        reason = _fused_reason(model, composite, canonizers)
        if reason is None:
            try:
                return _fused_relevance(model, epsilon=epsilon, stabilizer=stabilizer, **run)
            except FusedUnsupported as err:  # a layer called twice, an in-place change: seen in the first batch
                reason = str(err)
        if fused:
            raise RelevanceError(f"the fused LRP-epsilon pass does not apply: {reason}")
    was_training = model.training
    model.eval()
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    store: dict[str, torch.Tensor] = {}
    flows: dict[str, LayerFlow] = {}
    comp = make_composite(composite, work, epsilon, canonizers=canonizers, stabilizer=stabilizer)
    _wrap_module_map(comp, store, flows)

    batch: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        batch[:] = [x]
        return work(x)

    def backward(out: torch.Tensor, x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(out, x, grad_outputs=start)
        return grad

    try:
        with comp.context(work), _in_model_layout(work, batch):
            drop_identity_batchnorms(work)
            return _run_batches(model, forward, backward, store, flows, **run)
    finally:
        if was_training:
            model.train()


def _channels_last(x: torch.Tensor) -> bool:
    """Whether PyTorch runs a 4-d batch channels-last: its channel stride is 1 and it is dense in that layout (the
    shipped 1-channel data, whose strides fit both layouts, is such a batch)."""
    return x.dim() == 4 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-d) with exactly channels-last strides: a view where only the strides of size-1 dimensions differ
    (the same elements at the same places), a copy otherwise (the same values)."""
    n, c, h, w = t.shape
    want = (h * w * c, 1, w * c, c)
    if t.stride() == want:
        return t
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided(t.shape, want, t.storage_offset())
    return t.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _in_model_layout(work: nn.Module, batch: list[torch.Tensor]) -> Iterator[None]:
    """Make zennit's hooked model compute in the memory layout the plain model computes in, as the fused pass does.

    PyTorch runs a channels-last batch channels-last through every layer. zennit's hooks hand each layer a tensor
    made by an autograd identity, which turns the ambiguous strides of a 1-channel batch into contiguous NCHW, and
    its residual ``Sum`` stacks its inputs into NCHW: from there the float32 convolutions round differently (up to
    1e-3 relative on the built-in ResNet). A forward pre-hook on every leaf module, run after zennit's, gives each
    4-d input the channels-last strides again when the batch (``batch[0]``) is channels-last; values never change.
    """
    def restride(module: nn.Module, args: tuple) -> tuple | None:
        if not batch or not _channels_last(batch[0]):
            return None
        return tuple(_as_channels_last(a) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)

    handles = [m.register_forward_pre_hook(restride) for m in work.modules() if next(m.children(), None) is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fused_relevance(model: nn.Module, *, epsilon: float, stabilizer: float, **run) -> RelevanceResult:
    """:func:`compute_relevance` through :class:`FusedEpsilon` (one forward and one backward per batch)."""
    was_training = model.training
    model.eval()
    store: dict[str, torch.Tensor] = {}
    flows: dict[str, LayerFlow] = {}
    try:
        net = FusedEpsilon(model, epsilon, stabilizer, store, flows, LayerFlow, need_input=run["keep_input"])
        return _run_batches(model, net.forward, net.backward, store, flows, **run)
    finally:
        if was_training:
            model.train()


def _run_batches(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                 backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None],
                 store: dict[str, torch.Tensor], flows: dict[str, LayerFlow], *, inputs: torch.Tensor,
                 targets: torch.Tensor | None, composite: str, target: str, batch_size: int, keep_input: bool,
                 progress: ProgressFn | None, check: bool, by_class: bool, device: torch.device) -> RelevanceResult:
    """The batches of :func:`compute_relevance`: ``forward(x)`` gives outputs whose ``backward(out, x, start)``
    (the input relevance, needed with ``keep_input`` only) fills ``store`` with parameter relevance and ``flows``
    with the layer sums. ``inputs`` stay where they are; each batch moves to ``device``, and the results come back
    to the CPU."""
    total = len(inputs)
    if target == "predicted" and by_class:
        with torch.no_grad():
            pred = torch.cat([model(inputs[i:i + batch_size].to(device)).argmax(1).cpu()
                              for i in range(0, total, batch_size)])
        labels = pred
    else:
        labels = targets.to("cpu", torch.long) if targets is not None else None  # the bookkeeping is on the CPU
    chunks: list[tuple[int, torch.Tensor]] = []  # (group id, sample indices)
    if by_class and labels is not None:
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).squeeze(1)
            chunks += [(int(c), idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
    else:
        chunks = [(0, torch.arange(i, min(i + batch_size, total))) for i in range(0, total, batch_size)]
    signed: dict[str, torch.Tensor] = {}
    by_class_abs: dict[str, torch.Tensor] = {}

    def flush() -> None:
        with one_thread():
            _flush()

    def _flush() -> None:
        for k, v in store.items():
            signed[k] = signed[k] + v if k in signed else v  # the store's tensors are this pass's own
            if by_class:
                by_class_abs[k] = by_class_abs[k] + v.abs() if k in by_class_abs else v.abs()
        store.clear()

    logits_all = torch.empty(0)
    input_rel = torch.empty(0)
    tgt_all = torch.zeros(total, dtype=torch.long)
    done = 0
    for n, (group, idx) in enumerate(chunks):
        if n > 0 and group != chunks[n - 1][0]:
            flush()
        xb = inputs[idx].to(device)
        x = xb.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = forward(x)
        if n == 0:
            logits_all = torch.empty(total, out.shape[1], dtype=out.dtype)
            if keep_input:  # asked for: the pixel relevance of every image
                input_rel = torch.empty_like(inputs, device="cpu")
        if check and n == 0:
            n_check = min(len(xb), 16)
            with one_thread():  # 16 samples: the thread pool would cost more than it saves
                plain = _check_model(model, xb[:n_check])
            diff = float((plain - out.detach()[:n_check]).abs().max())
            scale = float(plain.abs().max()) + 1.0
            tol = 1e-4 if out.dtype == torch.float32 else 1e-9
            if diff > tol * scale:
                raise RelevanceError(f"the canonized model's outputs differ from the model's by {diff:.3g}; "
                                     "BatchNorm merging or residual routing does not fit this architecture")
        tb = labels[idx] if (target == "true" or by_class) and labels is not None else out.detach().argmax(1).cpu()
        onehot = torch.zeros_like(out)
        onehot[torch.arange(len(tb), device=out.device), tb.to(out.device)] = 1.0
        grad = backward(out, x, onehot)
        logits_all[idx] = out.detach().cpu()
        tgt_all[idx] = tb
        if keep_input:
            input_rel[idx] = grad.detach().cpu()  # type: ignore[union-attr]
        done += len(idx)
        if progress is not None:
            progress(done, total)
    flush()
    own = dict(model.named_parameters())
    weights = {k: v.to("cpu", own[k].dtype) for k, v in signed.items() if k in own}
    extra = {k: v.cpu() for k, v in signed.items() if k not in own}
    for name in relevance_layers(model):
        for key in ("weight", "bias"):
            pname = f"{name}.{key}"
            if pname in own and pname not in weights:
                weights[pname] = torch.zeros_like(own[pname].detach(), device="cpu")
    ordered = {k: weights[k] for k, _ in model.named_parameters() if k in weights}
    abs_ordered = None
    if by_class:
        abs_ordered = {k: by_class_abs[k].to("cpu", own[k].dtype) if k in by_class_abs else torch.zeros_like(v)
                       for k, v in ordered.items()}
    return RelevanceResult(ordered, extra, input_rel if keep_input else None, logits_all, tgt_all, flows, composite,
                           total, abs_ordered)


def weight_relevance(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                     composite: str = DEFAULT_COMPOSITE, epsilon: float = 1e-6, *, target: str = "true",
                     batch_size: int = 250, progress: ProgressFn | None = None, device: str | torch.device = "auto",
                     memory_budget_mb: float | None = None) -> dict[str, torch.Tensor]:
    """Relevance of every weight and bias of every conv/linear layer.

    Parameters
    ----------
    model : torch.nn.Module
        Left exactly as it was (same parameter objects, identical state dict).
    inputs : Tensor
        Model-ready inputs (N, C, H, W) or (N, features).
    targets : Tensor, optional
        Labels (needed for ``target="true"``).
    composite : str
        ``"epsilon"`` (default), ``"epsilon-plus"``, ``"alpha2beta1"``, ``"epsilon-gamma"`` or
        ``"epsilon-gamma-box"``.
    epsilon : float
        Stabiliser of the epsilon rule.
    target : {"true", "predicted"}
        Class whose one-hot starts the relevance.
    batch_size : int
        Samples per pass.
    progress : callable, optional
        ``progress(done, total)``.
    device : {"auto", "cpu", "cuda"} or torch.device
        Where to compute (``"auto"``: CUDA if available, else the CPU); the model is copied there, never moved.
    memory_budget_mb : float, optional
        Bound the batch by a memory budget (see :func:`compute_relevance`).

    Returns
    -------
    dict of str to Tensor
        Parameter name -> relevance with the parameter's shape, summed over the samples (CPU tensors).
    """
    return compute_relevance(model, inputs, targets, composite, epsilon=epsilon, target=target,
                             batch_size=batch_size, progress=progress, device=device,
                             memory_budget_mb=memory_budget_mb).weights


def input_heatmaps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                   composite: str = DEFAULT_COMPOSITE, epsilon: float = 1e-6, target: str = "true") -> torch.Tensor:
    """Pixel relevance summed over channels, shape (N, H, W): positive evidence for the target class is > 0."""
    res = compute_relevance(model, inputs, targets, composite, epsilon=epsilon, target=target, keep_input=True,
                            check=False)
    assert res.input is not None
    return res.input.sum(1)
