"""A fast *exact* evaluation forward: BatchNorm folded per plan, fused kernels, the same top-1 as eager PyTorch.

:class:`FastForward` is built once per model (a :class:`~xaicomp_core.evaluate.session.CompressionSession` builds
one in its constructor): the model is traced with ``torch.fx`` into a short list of :class:`Op` (conv, linear,
per-channel affine, ReLU, add, pooling, flatten). Every BatchNorm that directly follows a conv or linear layer whose
output feeds nothing else is folded into that layer, and every ReLU into the operation before it. Per plan,
:meth:`FastForward.logits` takes the plan's full state dict (compressed weights and the plan's overrides of biases
and BatchNorm scales/shifts), folds the BatchNorms (a per-channel scale, computed in float64 with NumPy, off the
thread pool, and rounded once to float32) and runs one of the backends:

``"onnxruntime"`` (used when importable)
    A new onnxruntime session per plan whose folded weights are constant initializers, so that onnxruntime
    pre-packs them and runs its blocked (NCHWc) fused conv + bias + ReLU (+ add) kernels. The build costs a few
    milliseconds; all sessions share one process-wide memory arena, so a new session's first run does not pay for
    fresh memory. Measured faster than weights fed as graph inputs (which cannot be pre-packed) and than the torch
    backend (see :func:`xaicomp_core.bench.compare_backends`).
``"torch"``
    PyTorch's oneDNN fused convolution + bias + ReLU (+ residual add) kernels, plain torch ops elsewhere. The only
    backend on a GPU (``device="cuda"``: plain torch ops there, in float32 with TF32 off).

"Exact" means float32 throughout (never bf16 or int8), logits within about ``1e-5`` of the eager forward on the
built-in models, and the same top-1 prediction on every image. The last is guaranteed rather than hoped for: every
image whose top-2 margin in the fast logits is at most ``MARGIN_BOUND + MARGIN_RELATIVE * max|logit|`` (about 100
times the float32 deviation observed), or whose logits are not all finite, is run again by the reference (eager)
forward and takes its logits.

A model the fast path cannot handle (an unknown layer or function, a module with parameters called twice, shape
tricks such as ``view(x.size(0), -1)``, anything ``torch.fx`` cannot trace, or a trial run on sample inputs that
does not match the eager forward) gets no :class:`FastForward` (:meth:`FastForward.build` returns None) and is
evaluated by the reference forward.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: absolute part of the top-2 margin at or below which an image is re-run with the reference forward
MARGIN_BOUND = 1e-3
#: relative part of that margin (times the largest absolute logit of the image)
MARGIN_RELATIVE = 1e-5
#: the trial run on sample inputs must match the eager forward to this times max(1, largest |logit|)
TRIAL_TOLERANCE = 1e-4
#: sample images for the trial run of :meth:`FastForward.build`
TRIAL_IMAGES = 256

BACKENDS = ("onnxruntime", "torch")

Reference = Callable[[torch.Tensor], torch.Tensor]
Params = list[tuple[np.ndarray | None, np.ndarray | None]]


class Unsupported(Exception):
    """The model uses something the fast path does not handle."""


@dataclass
class Op:
    """One operation of the traced model.

    Attributes
    ----------
    kind : str
        conv, linear, affine (a BatchNorm not folded), relu, add, maxpool, avgpool, gap (global average pool) or
        flatten.
    inputs, out : value slots (slot 0 is the model input)
    relu : bool
        A ReLU follows (fused).
    weight, bias : str or None
        State-dict names of the conv/linear parameters.
    bn : str or None
        Module name of the BatchNorm folded into the op (for affine: the BatchNorm itself).
    """

    kind: str
    inputs: tuple[int, ...]
    out: int
    relu: bool = False
    weight: str | None = None
    bias: str | None = None
    bn: str | None = None
    bn_eps: float = 0.0
    bn_affine: bool = True
    channels: int = 0
    attrs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------------------------
def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _pool_attrs(mod: nn.Module) -> dict[str, Any]:
    return {"kernel": _pair(mod.kernel_size), "padding": _pair(mod.padding), "ceil_mode": bool(mod.ceil_mode),
            "stride": _pair(mod.stride if mod.stride is not None else mod.kernel_size)}


def _module_op(name: str, mod: nn.Module, inputs: tuple[int, ...], out: int) -> Op:
    if type(mod) is nn.Conv2d:
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise Unsupported(f"{name}: padding {mod.padding!r} ({mod.padding_mode})")
        return Op("conv", inputs, out, weight=f"{name}.weight", bias=f"{name}.bias" if mod.bias is not None else None,
                  channels=mod.out_channels,
                  attrs={"stride": _pair(mod.stride), "padding": _pair(mod.padding), "dilation": _pair(mod.dilation),
                         "groups": int(mod.groups), "kernel": _pair(mod.kernel_size)})
    if type(mod) is nn.Linear:
        return Op("linear", inputs, out, weight=f"{name}.weight",
                  bias=f"{name}.bias" if mod.bias is not None else None, channels=mod.out_features)
    if type(mod) in (nn.BatchNorm2d, nn.BatchNorm1d):
        if mod.training or not mod.track_running_stats or mod.running_mean is None:
            raise Unsupported(f"{name}: BatchNorm without running statistics or in training mode")
        return Op("affine", inputs, out, bn=name, bn_eps=float(mod.eps), bn_affine=bool(mod.affine),
                  channels=mod.num_features, attrs={"dims": 4 if type(mod) is nn.BatchNorm2d else 2})
    if type(mod) is nn.ReLU:
        return Op("relu", inputs, out)
    if type(mod) is nn.MaxPool2d:
        if mod.return_indices:
            raise Unsupported(f"{name}: MaxPool2d with indices")
        return Op("maxpool", inputs, out, attrs={**_pool_attrs(mod), "dilation": _pair(mod.dilation)})
    if type(mod) is nn.AvgPool2d:
        if mod.divisor_override is not None:
            raise Unsupported(f"{name}: AvgPool2d with divisor_override")
        return Op("avgpool", inputs, out, attrs={**_pool_attrs(mod), "count_include_pad": bool(mod.count_include_pad)})
    if type(mod) is nn.AdaptiveAvgPool2d:
        if _pair(mod.output_size) != [1, 1]:
            raise Unsupported(f"{name}: AdaptiveAvgPool2d to {mod.output_size}")
        return Op("gap", inputs, out)
    if type(mod) is nn.Flatten:
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise Unsupported(f"{name}: Flatten({mod.start_dim}, {mod.end_dim})")
        return Op("flatten", inputs, out)
    if type(mod) in (nn.Dropout, nn.Identity):
        return Op("identity", inputs, out)
    raise Unsupported(f"{name}: {type(mod).__name__}")


def trace_ops(model: nn.Module) -> tuple[list[Op], int]:
    """The model as a list of :class:`Op` (BatchNorms and ReLUs fused) and the value slot of its output.

    Raises
    ------
    Unsupported
        For anything outside the supported set.
    """
    import torch.fx as fx

    if any(m.training for m in model.modules()):
        raise Unsupported("the model is in training mode")
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        raise Unsupported("the model has forward hooks")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # any tracing failure means: not supported
        raise Unsupported(f"torch.fx cannot trace the model: {e}") from None
    modules = dict(model.named_modules())
    slot: dict[fx.Node, int] = {}
    ops: list[Op] = []
    called: set[str] = set()

    def arg(a: Any) -> int:
        if not isinstance(a, fx.Node) or a not in slot:
            raise Unsupported(f"argument {a!r}")
        return slot[a]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if slot:
                raise Unsupported("more than one input")
            slot[node] = 0
            continue
        if node.op == "output":
            if not ops:
                raise Unsupported("no operations")
            return _fuse(ops, arg(node.args[0]))
        out = len(slot)
        args, kw = node.args, node.kwargs
        if node.op == "call_module":
            mod = modules[node.target]
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                if node.target in called:
                    raise Unsupported(f"{node.target} is called twice")
                called.add(node.target)
            if len(args) != 1 or kw:
                raise Unsupported(f"{node.target}: call arguments")
            ops.append(_module_op(node.target, mod, (arg(args[0]),), out))
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(args) == 2 and not kw:
            ops.append(Op("add", (arg(args[0]), arg(args[1])), out))
        elif node.target in (torch.relu, F.relu, "relu") and node.op in ("call_function", "call_method") and len(
                args) == 1 and set(kw) <= {"inplace"} and not kw.get("inplace"):  # F.relu traces inplace=False
            ops.append(Op("relu", (arg(args[0]),), out))
        elif node.target in (torch.flatten, "flatten") and node.op in ("call_function", "call_method") and tuple(
                args[1:]) == (1,) and not kw:
            ops.append(Op("flatten", (arg(args[0]),), out))
        else:
            raise Unsupported(f"{node.op} {node.target}")
        slot[node] = out
    raise Unsupported("no output")


def _fuse(ops: list[Op], output: int) -> tuple[list[Op], int]:
    """Drop identities; fold each BatchNorm into the conv/linear before it and each ReLU into the op before it,
    where that op's output feeds nothing else."""
    alias: dict[int, int] = {}

    def res(s: int) -> int:
        while s in alias:
            s = alias[s]
        return s

    for fusing in ("identity", "affine", "relu"):
        uses: dict[int, int] = {output: 1}
        for op in ops:
            for s in op.inputs:
                uses[s] = uses.get(s, 0) + 1
        by_out = {op.out: op for op in ops}
        kept: list[Op] = []
        for op in ops:
            op.inputs = tuple(res(s) for s in op.inputs)
            src = by_out.get(op.inputs[0]) if op.kind == fusing else None
            if fusing == "identity" and op.kind == "identity":
                alias[op.out] = op.inputs[0]
                continue
            ok = src is not None and uses[src.out] == 1 and not src.relu
            if ok and fusing == "affine":
                ok = src.kind in ("conv", "linear") and src.bn is None and src.channels == op.channels and (
                    (src.kind == "conv") == (op.attrs["dims"] == 4))
            elif ok:
                ok = src.kind in ("conv", "linear", "affine", "add")
            if not ok:
                kept.append(op)
                continue
            if fusing == "affine":
                src.bn, src.bn_eps, src.bn_affine = op.bn, op.bn_eps, op.bn_affine
            else:
                src.relu = True
            alias[op.out] = src.out
        ops = kept
        output = res(output)
    for op in ops:
        op.inputs = tuple(res(s) for s in op.inputs)
    return ops, output


# ----------------------------------------------------------------------------------------------------------------
# per-plan parameters
# ----------------------------------------------------------------------------------------------------------------
def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def fold(op: Op, state: Mapping[str, torch.Tensor]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Weight and bias of a conv/linear ``op`` with its BatchNorm folded in, or an affine op's per-channel scale
    and shift (None, None for ops without parameters). Float64 NumPy arithmetic, float32 results."""
    if op.kind not in ("conv", "linear", "affine"):
        return None, None
    w = _np64(state[op.weight]) if op.weight else None
    b = _np64(state[op.bias]) if op.bias else None
    if op.bn is not None:
        scale = 1.0 / np.sqrt(_np64(state[f"{op.bn}.running_var"]) + op.bn_eps)
        shift = -_np64(state[f"{op.bn}.running_mean"]) * scale
        if op.bn_affine:
            gamma = _np64(state[f"{op.bn}.weight"])
            scale, shift = scale * gamma, shift * gamma + _np64(state[f"{op.bn}.bias"])
        if w is None:
            return scale.astype(np.float32), shift.astype(np.float32)
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        b = shift if b is None else b * scale + shift
    if b is None:
        b = np.zeros(op.channels)
    return np.ascontiguousarray(w, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------------------
class TorchBackend:
    """PyTorch's oneDNN fused conv + bias + ReLU (+ residual add) kernels, plain torch ops elsewhere."""

    name = "torch"
    #: images per call (smaller chunks measured slower: more thread-pool synchronisations per image)
    chunk = 1000

    def __init__(self, ops: list[Op], output: int, in_shape: tuple[int, ...], device: torch.device | None = None
                 ) -> None:
        self.ops, self.output = ops, output
        self.device = torch.device("cpu") if device is None else device
        self.fused = self.device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise")
        uses: dict[int, int] = {output: 1}
        for op in ops:
            for s in op.inputs:
                uses[s] = uses.get(s, 0) + 1
        by_out = {op.out: i for i, op in enumerate(ops)}
        #: add op -> the conv computed inside it (a conv without ReLU whose output only feeds that add)
        self.add_into: dict[int, int] = {}
        for i, op in enumerate(ops):
            if op.kind != "add" or not self.fused or op.inputs[0] == op.inputs[1]:
                continue
            for s in op.inputs:
                j = by_out.get(s)
                if j is not None and ops[j].kind == "conv" and not ops[j].relu and uses[s] == 1:
                    self.add_into[i] = j
                    break
        self.inside_add = set(self.add_into.values())
        last: dict[int, int] = {}
        for i, op in enumerate(ops):
            for s in op.inputs:
                last[s] = i
        for i, j in self.add_into.items():
            last[ops[j].inputs[0]] = max(last[ops[j].inputs[0]], i)
        #: value slots to free after each op (a chunk's activations are large)
        self.free_after: list[list[int]] = [[] for _ in ops]
        for s, i in last.items():
            if s not in (0, output):
                self.free_after[i].append(s)

    def prepare(self, params: Params) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Tensors of the folded parameters."""
        dev = self.device
        return [(None, None) if w is None else (torch.from_numpy(w).to(dev), torch.from_numpy(b).to(dev))
                for w, b in params]

    def run(self, prepared: list[tuple[torch.Tensor | None, torch.Tensor | None]], x: torch.Tensor) -> torch.Tensor:
        """Logits of one chunk."""
        vals: dict[int, torch.Tensor] = {0: x}
        for i, op in enumerate(self.ops):
            w, b = prepared[i]
            a = op.attrs
            src = vals.get(op.inputs[0])
            if op.kind == "conv":
                if i in self.inside_add:
                    continue
                if self.fused:
                    y = torch.ops.mkldnn._convolution_pointwise(src, w, b, a["padding"], a["stride"], a["dilation"],
                                                                a["groups"], "relu" if op.relu else "none", [], "")
                else:
                    y = F.conv2d(src, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
                    if op.relu:
                        y.relu_()
            elif op.kind == "add" and i in self.add_into:
                c = self.ops[self.add_into[i]]
                cw, cb = prepared[self.add_into[i]]
                other = op.inputs[1] if op.inputs[0] == c.out else op.inputs[0]
                y = torch.ops.mkldnn._convolution_pointwise(
                    vals[c.inputs[0]], vals[other], cw, cb, c.attrs["padding"], c.attrs["stride"],
                    c.attrs["dilation"], c.attrs["groups"], "add", 1.0, "relu" if op.relu else None, [], "")
            elif op.kind == "add":
                y = vals[op.inputs[0]] + vals[op.inputs[1]]
            elif op.kind == "linear":
                y = F.linear(src, w, b)
            elif op.kind == "affine":
                shape = (-1, 1, 1) if a["dims"] == 4 else (-1,)
                y = torch.addcmul(b.view(shape), src, w.view(shape))
            elif op.kind == "relu":
                y = torch.relu(src)
            elif op.kind == "maxpool":
                y = F.max_pool2d(src, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
            elif op.kind == "avgpool":
                y = F.avg_pool2d(src, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
            elif op.kind == "gap":
                y = src.mean((2, 3), keepdim=True)
            elif op.kind == "flatten":
                y = src.flatten(1)
            else:  # pragma: no cover - trace_ops produces no other kinds
                raise Unsupported(op.kind)
            if op.relu and op.kind in ("add", "linear", "affine") and i not in self.add_into:
                y.relu_()
            vals[op.out] = y
            for s in self.free_after[i]:
                vals.pop(s, None)
        return vals[self.output]


def onnx_graph(ops: list[Op], output: int, params: Params, in_shape: tuple[int, ...], opset: int = 17) -> bytes:
    """A serialized ONNX model of ``ops`` with the folded ``params`` as initializers (input ``"input"`` of shape
    ``(N, *in_shape)``)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def v(s: int) -> str:
        return "input" if s == 0 else f"v{s}"

    for i, op in enumerate(ops):
        a = op.attrs
        ins = [v(s) for s in op.inputs]
        out = f"p{op.out}" if op.relu else v(op.out)
        w, b = params[i]
        if w is not None and b is not None:
            if op.kind == "affine" and a["dims"] == 4:
                w, b = w.reshape(-1, 1, 1), b.reshape(-1, 1, 1)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        pads = [*a["padding"], *a["padding"]] if "padding" in a else None
        if op.kind == "conv":
            nodes.append(helper.make_node("Conv", [ins[0], f"w{i}", f"b{i}"], [out], strides=a["stride"], pads=pads,
                                          dilations=a["dilation"], group=a["groups"], kernel_shape=a["kernel"]))
        elif op.kind == "linear":
            nodes.append(helper.make_node("Gemm", [ins[0], f"w{i}", f"b{i}"], [out], transB=1))
        elif op.kind == "affine":
            nodes.append(helper.make_node("Mul", [ins[0], f"w{i}"], [f"m{op.out}"]))
            nodes.append(helper.make_node("Add", [f"m{op.out}", f"b{i}"], [out]))
        elif op.kind == "add":
            nodes.append(helper.make_node("Add", ins, [out]))
        elif op.kind == "relu":
            nodes.append(helper.make_node("Relu", ins, [out]))
        elif op.kind == "maxpool":
            nodes.append(helper.make_node("MaxPool", ins, [out], kernel_shape=a["kernel"], strides=a["stride"],
                                          pads=pads, dilations=a["dilation"], ceil_mode=int(a["ceil_mode"])))
        elif op.kind == "avgpool":
            nodes.append(helper.make_node("AveragePool", ins, [out], kernel_shape=a["kernel"], strides=a["stride"],
                                          pads=pads, ceil_mode=int(a["ceil_mode"]),
                                          count_include_pad=int(a["count_include_pad"])))
        elif op.kind == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", ins, [out]))
        elif op.kind == "flatten":
            nodes.append(helper.make_node("Flatten", ins, [out], axis=1))
        else:  # pragma: no cover
            raise Unsupported(op.kind)
        if op.relu:
            nodes.append(helper.make_node("Relu", [out], [v(op.out)]))
    graph = helper.make_graph(
        nodes, "xaicomp-fast", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(v(output), TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="xaicomp")
    model.ir_version = min(model.ir_version, 8)
    return model.SerializeToString()


_ARENA_LOCK = threading.Lock()
_ARENA_TRIED = False


def _register_shared_arena() -> None:
    """Register one process-wide onnxruntime CPU arena (once) that the sessions opt into, so that a new session's
    first run reuses memory the previous ones already touched (without it, a rebuilt session's first run costs
    about as much as two steady runs)."""
    global _ARENA_TRIED
    import onnxruntime as ort

    with _ARENA_LOCK:
        if _ARENA_TRIED:
            return
        _ARENA_TRIED = True
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # arena_extend_strategy 1 = kSameAsRequested: grow by what is needed, not by powers of two; if this fails
        # (another registration in this process), the sessions use whichever env allocator there is, or their own
        with contextlib.suppress(Exception):
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))


class OrtBackend:
    """A new onnxruntime session per plan, the folded weights as constant initializers (pre-packed)."""

    name = "onnxruntime"
    #: images per call: the activations stay small in the shared arena (measured faster than 1000)
    chunk = 250

    def __init__(self, ops: list[Op], output: int, in_shape: tuple[int, ...]) -> None:
        import onnxruntime as ort

        self.ops, self.output, self.in_shape = ops, output, in_shape
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = max(1, torch.get_num_threads())
        self.options.inter_op_num_threads = 1
        self.options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.log_severity_level = 3
        # no busy-waiting between ops: this machine is shared, and it measured no slower
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        _register_shared_arena()
        self.options.add_session_config_entry("session.use_env_allocators", "1")

    def prepare(self, params: Params) -> Any:
        """An inference session holding the plan's folded weights."""
        import onnxruntime as ort

        data = onnx_graph(self.ops, self.output, params, self.in_shape)
        return ort.InferenceSession(data, self.options, providers=["CPUExecutionProvider"])

    def run(self, prepared: Any, x: torch.Tensor) -> torch.Tensor:
        """Logits of one chunk."""
        return torch.from_numpy(prepared.run(None, {"input": x.numpy()})[0])


def ort_available() -> bool:
    """Whether onnx and onnxruntime can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str, ops: list[Op], output: int, in_shape: tuple[int, ...],
                 device: torch.device | None = None) -> TorchBackend | OrtBackend:
    """A backend by name (one of :data:`BACKENDS`); onnxruntime runs on the CPU only."""
    if name == "onnxruntime":
        if device is not None and device.type != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU only")
        return OrtBackend(ops, output, in_shape)
    if name == "torch":
        return TorchBackend(ops, output, in_shape, device)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------------------------------------------
# the fast forward
# ----------------------------------------------------------------------------------------------------------------
class FastForward:
    """The fast exact forward of one model architecture; see the module docstring.

    Build it with :meth:`build`. It holds no weights: :meth:`logits` takes a full state dict each call (the
    original one, or a plan's), so one instance serves every plan. Calls do not share mutable state.
    """

    def __init__(self, ops: list[Op], output: int, backend: TorchBackend | OrtBackend,
                 max_batch: int | None = None) -> None:
        self.ops, self.output, self._backend = ops, output, backend
        #: images per backend call at most (a memory bound; None: the backend's own chunk)
        self.max_batch = max_batch
        self.device = getattr(backend, "device", torch.device("cpu"))

    @property
    def backend(self) -> str:
        """Name of the backend in use."""
        return self._backend.name

    @classmethod
    def build(cls, model: nn.Module, sample: torch.Tensor, reference: Reference, backend: str = "auto",
              device: torch.device | None = None, max_batch: int | None = None) -> FastForward | None:
        """Trace ``model`` and build its fast forward, or None if the model is not supported.

        Parameters
        ----------
        model : nn.Module
            In eval mode; not modified.
        sample : Tensor
            A few model-ready inputs: the trial run compares the fast logits on them with ``reference(sample)``.
        reference : callable
            The eager forward of ``model`` (``x -> logits``).
        backend : {"auto", "onnxruntime", "torch"}
            ``"auto"``: onnxruntime if importable, else torch; on a GPU always torch.
        device : torch.device, optional
            Where the forward runs (default: the CPU). Inputs move there chunk by chunk; logits come back to the
            CPU.
        max_batch : int, optional
            Images per backend call at most (a memory bound).
        """
        if device is not None and device.type != "cpu":
            backend = "torch" if backend == "auto" else backend
        elif backend == "auto":
            backend = "onnxruntime" if ort_available() else "torch"
        if sample.dtype != torch.float32 or len(sample) == 0:
            return None
        try:
            ops, output = trace_ops(model)
            ff = cls(ops, output, make_backend(backend, ops, output, tuple(sample.shape[1:]), device), max_batch)
            fast = ff.raw_logits(model.state_dict(), sample)
        except Exception:  # whatever fails here (an unsupported model), the reference forward is used instead
            return None
        ref = reference(sample)
        if fast.shape != ref.shape or fast.dtype != ref.dtype or not bool(torch.isfinite(fast).all()):
            return None
        if float((fast - ref).abs().max()) > TRIAL_TOLERANCE * max(1.0, float(ref.abs().max())):
            return None
        return ff

    def params(self, state: Mapping[str, torch.Tensor]) -> Params:
        """Folded float32 weight and bias (or scale and shift) of every op from a full state dict."""
        return [fold(op, state) for op in self.ops]

    @property
    def images_per_call(self) -> int:
        """Images per backend call: more images run in calls of this many (the logits of an image can depend on
        the calls it shares, so parts of a set that are multiples of it give the same logits as the whole)."""
        return self._backend.chunk if self.max_batch is None else max(1, min(self._backend.chunk, self.max_batch))

    def prepare(self, state: Mapping[str, torch.Tensor]) -> Any:
        """The backend's ready form of ``state`` (an onnxruntime session holding its folded weights, or folded
        tensors): pass it to :meth:`logits` to run more images of the same weights without preparing again."""
        return self._backend.prepare(self.params(state))

    def raw_logits(self, state: Mapping[str, torch.Tensor], x: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """Fast logits without the near-tie safeguard of :meth:`logits`."""
        prepared = self.prepare(state) if prepared is None else prepared
        x = x.detach().float().contiguous()
        dev = self.device
        with torch.inference_mode():
            n = self.images_per_call
            return torch.cat([self._backend.run(prepared, x[i:i + n].to(dev)).cpu() for i in range(0, len(x), n)])

    def logits(self, state: Mapping[str, torch.Tensor], x: torch.Tensor, reference: Reference, prepared: Any = None
               ) -> torch.Tensor:
        """Logits of the model holding ``state`` on ``x``, with the same top-1 as ``reference``.

        Parameters
        ----------
        state : mapping
            Full state dict (every parameter and buffer of the model).
        x : Tensor
            Model-ready inputs.
        reference : callable
            ``x_subset -> logits``, the eager forward of the model holding ``state``: images at a near-tie (see
            :func:`needs_reference`) take its logits. Called only when there are any.
        prepared : optional
            :meth:`prepare` of ``state``, made earlier (e.g. for another part of the images).
        """
        out = self.raw_logits(state, x, prepared)
        redo = needs_reference(out).nonzero().flatten()
        if len(redo):
            with torch.inference_mode():
                out[redo] = reference(x[redo]).to(out.dtype)
        return out


def needs_reference(logits: torch.Tensor) -> torch.Tensor:
    """Rows whose top-1 is not safe from float32 deviation: a top-2 margin at or below
    ``MARGIN_BOUND + MARGIN_RELATIVE * max|logit|``, or a non-finite logit."""
    finite = torch.isfinite(logits).all(1)
    if logits.shape[1] < 2:
        return ~finite
    top = logits.topk(2, 1).values
    bound = MARGIN_BOUND + MARGIN_RELATIVE * logits.abs().amax(1)
    return ~((top[:, 0] - top[:, 1]) > bound) | ~finite


def exact_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` on ``x`` as a session computes them: the fast exact forward where the model is
    supported (top-1 equal to the eager forward's on every image), else the eager forward in batches of
    ``batch_size`` (also the most images the fast forward runs at once). Runs on the model's device; the logits
    are on the CPU."""
    from xaicomp_core.device import module_device
    from xaicomp_core.evaluate.forward import forward_logits

    def reference(t: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, t, batch_size)

    ff = FastForward.build(model, x[:TRIAL_IMAGES], reference, device=module_device(model), max_batch=batch_size)
    if ff is None:
        return reference(x)
    return ff.logits(model.state_dict(), x, reference)
