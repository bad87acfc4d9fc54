"""CompressionSession: the cached, fast engine the app, the CLI and notebooks drive.

Relevance is computed once per composite and cached; scores are sorted once per (criterion, composite, protection);
``evaluate(plan)`` slices the sorted order into a mask, allocates bits, quantizes the flat weight vector, copies the
result into one reusable working model and runs a single forward pass over the evaluation set under
``torch.inference_mode``. The model passed in is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xaicomp_core.compress.compress import CompressedWeights, Compressor, following_batchnorms  # noqa: F401
from xaicomp_core.compress.layout import LayerLayout
from xaicomp_core.compress.quantize import quantize
from xaicomp_core.device import measure_memory_cost, memory_budget_bytes, resolve_device
from xaicomp_core.errors import PlanError, XaicompError
from xaicomp_core.evaluate.fast import TRIAL_IMAGES, FastForward
from xaicomp_core.evaluate.forward import EVAL_BATCH_SIZE, accuracy_counts, forward_logits  # noqa: F401
from xaicomp_core.evaluate.progressive import (
    BACKGROUND_CHUNK,
    QUICK_IMAGES,
    Anticipator,
    estimate_accuracy,
    paired_drop,
    quick_indices,
)
from xaicomp_core.format.size import SizeBreakdown
from xaicomp_core.io.data import DataLike, as_tensors
from xaicomp_core.io.models import model_info, state_dict_hash
from xaicomp_core.plan import FP32, CompressionPlan
from xaicomp_core.relevance.lrp import DEFAULT_COMPOSITE, RelevanceResult, compute_relevance
from xaicomp_core.threads import full_pool, one_thread

ProgressFn = Callable[[int, int], None]
#: Plans whose partial predictions (and prepared fast forward) a session keeps until their exact result is in.
PARTIAL_PLANS = 4
#: Background work starts this many seconds after the last foreground call ended, not at once: the page that call
#: served is still being sent and drawn (and a user moving a slider again is served without it).
FOREGROUND_GRACE = 0.5


@dataclass
class _Partial:
    """A plan's predictions while they are computed in parts (:meth:`CompressionSession._predictions`)."""

    cw: CompressedWeights
    pred: torch.Tensor  # per evaluation image; -1 where not computed yet
    prepared: Any = None  # the fast forward's FastForward.prepare of cw, made once


@dataclass
class LayerStats:
    """Per-layer outcome of a plan."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    kept: int
    sparsity: float
    mean_bits: float
    bits_histogram: dict[str, int]
    protected: bool
    keep_encoding: str
    bytes: int
    fp32_bytes: int
    value_encoding: str = "fixed"
    zeros_pruned: int = 0  # kept weights quantized to exactly 0 that the file stores as pruned (cheaper there)

    @property
    def encoding(self) -> str:
        """``"keep / values"`` encodings, with the zero codes stored as pruned if any (for tables)."""
        if self.protected:
            return "(protected)"
        zeros = f", {self.zeros_pruned:,} zero codes as pruned" if self.zeros_pruned else ""
        return f"{self.keep_encoding} / {self.value_encoding}{zeros}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        return d


@dataclass
class EvaluationResult:
    """Accuracy, sparsity, bits and size of one plan.

    Attributes
    ----------
    accuracy, baseline_accuracy : float
        Top-1 on the evaluation set, compressed and original.
    per_class_accuracy, baseline_per_class_accuracy : list of float
    sparsity : float
        Pruned fraction of the prunable (compressible) weights.
    sparsity_all : float
        Pruned fraction of all conv/linear weights.
    mean_bits : float
        Average bit width of the kept compressible weights.
    layers : list of LayerStats
    size : SizeBreakdown
    estimate : bool
        True for first numbers from a class-balanced subset of ``images`` of the ``eval_images`` evaluation images
        (:meth:`CompressionSession.estimate`): ``accuracy`` is then the paired estimate of the full-set accuracy
        and ``accuracy_stderr`` its standard error; the size numbers are always exact.
    """

    plan: CompressionPlan
    accuracy: float
    baseline_accuracy: float
    correct: int
    baseline_correct: int
    images: int
    per_class_accuracy: list[float]
    baseline_per_class_accuracy: list[float]
    class_names: list[str]
    sparsity: float
    sparsity_all: float
    mean_bits: float
    layers: list[LayerStats]
    size: SizeBreakdown
    predictions: torch.Tensor = field(repr=False)
    seconds: float = 0.0
    estimate: bool = False
    accuracy_stderr: float = 0.0
    eval_images: int = 0

    def __post_init__(self) -> None:
        if not self.eval_images:
            self.eval_images = self.images

    @property
    def accuracy_half_width(self) -> float:
        """Half-width of the 95 % interval of an estimated accuracy (0 for exact numbers)."""
        return 1.96 * self.accuracy_stderr

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes / estimated packed bytes."""
        return self.size.compression_ratio

    @property
    def reduction(self) -> float:
        """Fraction of the fp32 size saved."""
        return self.size.reduction

    @property
    def accuracy_change(self) -> float:
        """accuracy - baseline accuracy."""
        return self.accuracy - self.baseline_accuracy

    def to_dict(self, tensors: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (``tensors=True`` adds per-tensor size rows)."""
        size = self.size.to_dict()
        if not tensors:
            size.pop("tensors")
        return {
            "plan": self.plan.to_dict(),
            "description": self.plan.describe(),
            "accuracy": self.accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy_change": self.accuracy_change,
            "correct": self.correct,
            "baseline_correct": self.baseline_correct,
            "images": self.images,
            "sparsity": self.sparsity,
            "sparsity_all": self.sparsity_all,
            "mean_bits": self.mean_bits,
            "compression_ratio": self.compression_ratio,
            "reduction": self.reduction,
            "size": size,
            "per_class_accuracy": dict(zip(self.class_names, self.per_class_accuracy)),
            "baseline_per_class_accuracy": dict(zip(self.class_names, self.baseline_per_class_accuracy)),
            "layers": [layer.to_dict() for layer in self.layers],
            "seconds": self.seconds,
            "estimate": self.estimate,
            "accuracy_stderr": self.accuracy_stderr,
            "eval_images": self.eval_images,
        }


class CompressionSession:
    """Compute relevance once, then evaluate any number of plans fast.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model; never modified.
    reference_data : ImageDataset, (inputs, labels) or Dataset
        Samples whose LRP relevance scores the weights.
    eval_data : ImageDataset, (inputs, labels) or Dataset
        Samples for top-1 accuracy.
    composite : str
        Default LRP composite (a plan may name another; each is computed once).
    epsilon : float
        Stabiliser of the epsilon rule.
    target : {"true", "predicted"}
        Start relevance from the true or the predicted class.
    reference_samples : int, optional
        Use only the first ``n`` reference samples.
    relevance_batch_size, eval_batch_size : int
        Batch sizes of the relevance and evaluation passes.
    progress : callable, optional
        ``progress(done, total)`` while relevance is computed.
    train_data : ImageDataset, (inputs, labels) or Dataset, optional
        Samples for plans with recovery fine-tuning (``plan.finetune_epochs > 0``).
    device : {"auto", "cpu", "cuda"} or torch.device
        Where relevance, evaluation and fine-tuning run (``"auto"``: CUDA if available, else the CPU). The session
        works on its own copies of the model there; the data stays on the CPU and moves batch by batch; results,
        relevance and state dicts are CPU tensors. On CUDA the fast forward uses its torch backend.
    memory_budget_mb : float, optional
        Memory one relevance or evaluation batch may take (default
        :data:`~xaicomp_core.device.DEFAULT_MEMORY_BUDGET_MB`; on CUDA a share of the free device memory): the
        per-image cost is measured on one image and ``relevance_batch_size`` / ``eval_batch_size`` are lowered to
        what fits (never raised).
    prepare_progress : callable, optional
        ``progress(done, total)`` while the original model is measured on the evaluation images (in this
        constructor): ``done`` images of ``total``.
    """

    def __init__(self, model: nn.Module, reference_data: DataLike, eval_data: DataLike, *,
                 composite: str = DEFAULT_COMPOSITE, epsilon: float = 1e-6, target: str = "true",
                 reference_samples: int | None = None, relevance_batch_size: int = 250,
                 eval_batch_size: int = EVAL_BATCH_SIZE, progress: ProgressFn | None = None, cache_size: int = 64,
                 train_data: DataLike | None = None, quick_images: int = QUICK_IMAGES,
                 device: str | torch.device = "auto", memory_budget_mb: float | None = None,
                 prepare_progress: ProgressFn | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.eval()
        self.info = model_info(model)
        pre, n_cls = self.info.preprocessing, self.info.num_classes
        self.x_ref, self.y_ref = as_tensors(reference_data, pre, n_cls, "reference data")
        if reference_samples is not None:
            if reference_samples < 1:
                raise XaicompError("need at least one reference sample")
            self.x_ref, self.y_ref = self.x_ref[:reference_samples], self.y_ref[:reference_samples]
        self.x_eval, self.y_eval = as_tensors(eval_data, pre, n_cls, "evaluation data")
        self._train_data = train_data
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._finetuned: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.finetune_progress: ProgressFn | None = None
        self.composite = composite
        self.epsilon = epsilon
        self.target = target
        self.relevance_batch_size = relevance_batch_size
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.compressor = Compressor(model)
        self.layout = self.compressor.layout
        self._weights = self.compressor.weights
        self._weights_flat = self.compressor.weights_flat
        self._state = self.compressor.state
        self._work = copy.deepcopy(model).eval().to(self.device)
        for p in self._work.parameters():
            p.requires_grad_(False)
        # batches within the memory budget: the per-image cost measured on one image (the working copy is private)
        self.memory_budget_mb = memory_budget_mb
        self.memory_cost = measure_memory_cost(self._work, self.x_eval[:1].to(self.device), private=True)
        budget = memory_budget_bytes(self.device, memory_budget_mb)
        self.relevance_batch_size = self.memory_cost.relevance_batch(budget, relevance_batch_size)
        self.eval_batch_size = self.memory_cost.evaluation_batch(budget, eval_batch_size)
        self._work_params = dict(self._work.named_parameters())
        self._work_state = self._work.state_dict(keep_vars=True)
        self._overridden: list[str] = []
        self._lock = threading.RLock()
        self._relevance: dict[str, RelevanceResult] = {}
        self._results: OrderedDict[str, EvaluationResult] = OrderedDict()
        self._cache_size = cache_size
        self._compressed: OrderedDict[str, CompressedWeights] = OrderedDict()
        self._estimates: OrderedDict[str, EvaluationResult] = OrderedDict()
        # per plan not yet evaluated exactly: the predictions so far (see _predictions)
        self._partial: OrderedDict[str, _Partial] = OrderedDict()
        self._fg_waiting = 0
        self._fg_last = float("-inf")  # time.monotonic() when the last foreground call ended
        self._fg_cond = threading.Condition()
        self.anticipator = Anticipator(self._evaluate_background, self.is_cached)
        self.model_hash = state_dict_hash(model)
        # the fast exact forward (BatchNorm folded per plan; None for a model it cannot handle: eager then)
        self._fast = FastForward.build(self._work, self.x_eval[:TRIAL_IMAGES],
                                       lambda x: forward_logits(self._work, x, self.eval_batch_size),
                                       device=self.device, max_batch=self.eval_batch_size)
        self.forward_backend = self._fast.backend if self._fast is not None else "eager"
        with self._lock:
            self.baseline_logits = self._baseline_logits(prepare_progress)
        self.baseline_pred = self.baseline_logits.argmax(1)
        self.baseline_correct, self.baseline_per_class = accuracy_counts(self.baseline_pred, self.y_eval, n_cls)
        self.baseline_accuracy = self.baseline_correct / len(self.y_eval)
        self.quick_idx = quick_indices(self.y_eval, quick_images, n_cls)
        self._baseline_quick_correct = self.baseline_pred[self.quick_idx] == self.y_eval[self.quick_idx]

    def _baseline_logits(self, progress: ProgressFn | None) -> torch.Tensor:
        """The original model's logits on the evaluation set, in parts that ``progress`` follows (multiples of the fast
        forward's images per call, or the eager batch, so the logits are the same as in one call)."""
        n = len(self.x_eval)
        if progress is not None:
            progress(0, n)
        if self._fast is None:
            chunk = self.eval_batch_size
        else:
            per = self._fast.images_per_call
            chunk = per * max(1, BACKGROUND_CHUNK // per)
        prepared = self._fast.prepare(self._state) if self._fast is not None else None
        parts = []
        for i in range(0, n, chunk):
            parts.append(self._forward(self.x_eval[i:i + chunk], None, prepared))
            if progress is not None:
                progress(min(i + chunk, n), n)
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """The model's class names."""
        return self.info.class_names

    def fp32_bytes(self) -> int:
        """fp32 dense size of the model's state dict."""
        return sum(4 * v.numel() for v in self._state.values() if v.is_floating_point())

    def relevance(self, composite: str | None = None, progress: ProgressFn | None = None) -> RelevanceResult:
        """Per-weight relevance over the reference set for ``composite`` (computed once, then cached)."""
        composite = composite or self.composite
        with self._lock:
            if composite not in self._relevance:
                self._relevance[composite] = compute_relevance(
                    self.model, self.x_ref, self.y_ref, composite, epsilon=self.epsilon, target=self.target,
                    batch_size=self.relevance_batch_size, progress=progress or self.progress, by_class=True,
                    device=self.device)
            return self._relevance[composite]

    def relevance_of(self, weights: dict[str, torch.Tensor], composite: str | None = None) -> RelevanceResult:
        """Per-weight relevance of the model with ``weights`` (name -> tensor) replaced, e.g. pruned, over the same
        reference images and with the same settings as :meth:`relevance` (not cached here: the criteria that call
        it, through :attr:`ScoreInputs.relevance_of`, have their scores cached)."""
        composite = composite or self.composite
        model = copy.deepcopy(self.model).eval()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if name not in params or params[name].shape != value.shape:
                    raise XaicompError(f"relevance_of: the model has no parameter {name!r} of shape "
                                       f"{tuple(value.shape)}")
                params[name].copy_(value)
        return compute_relevance(model, self.x_ref, self.y_ref, composite, epsilon=self.epsilon, target=self.target,
                                 batch_size=self.relevance_batch_size, by_class=True, device=self.device)

    def has_relevance(self, composite: str | None = None) -> bool:
        """Whether relevance for ``composite`` is already cached."""
        return (composite or self.composite) in self._relevance

    def set_relevance(self, relevance: RelevanceResult, composite: str | None = None) -> None:
        """Seed the relevance cache with ``relevance`` computed elsewhere (e.g. by the driver of a Ray sweep from
        the same model, reference images and settings), so :meth:`relevance` never recomputes it.

        Parameters
        ----------
        relevance : RelevanceResult
            Per-weight relevance of this session's model; every compressible weight must be present with its shape.
        composite : str, optional
            The composite it was computed with (default: ``relevance.composite``).

        Raises
        ------
        XaicompError
            If a compressible weight is missing or has another shape.
        """
        for name in self.layout.names:
            value = relevance.weights.get(name)
            if value is None or tuple(value.shape) != tuple(self._weights[name].shape):
                raise XaicompError(f"set_relevance: no relevance of shape {tuple(self._weights[name].shape)} for "
                                   f"{name!r}; it was computed for another model")
        with self._lock:
            self._relevance[composite or relevance.composite] = relevance

    def add_result(self, result: EvaluationResult) -> EvaluationResult:
        """Seed the result cache with the exact ``result`` of ``result.plan`` computed elsewhere (e.g. by a Ray
        worker holding the same model, data and relevance); :meth:`evaluate` then returns it at once.

        Raises
        ------
        XaicompError
            If ``result`` is an estimate or counts another number of evaluation images.
        """
        if result.estimate or result.images != len(self.y_eval):
            raise XaicompError("add_result takes exact results over this session's evaluation images only")
        return self._store(result.plan.key(), result)

    def layout_for(self, protect: str) -> LayerLayout:
        """Layer layout for a protection setting."""
        return self.compressor.layout_for(protect)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def can_finetune(self) -> bool:
        """Whether training data for fine-tuning was given."""
        return self._train_data is not None

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready fine-tuning data."""
        if self._train is None:
            if self._train_data is None:
                raise PlanError("fine-tuning needs training data; this session has none")
            self._train = as_tensors(self._train_data, self.info.preprocessing, self.info.num_classes,
                                     "training data")
        return self._train

    def compress(self, plan: CompressionPlan, progress: ProgressFn | None = None) -> CompressedWeights:
        """Apply a plan to the weights: masks, bit classes, quantized values and the size breakdown.

        With ``plan.finetune_epochs > 0`` the weights are fine-tuned first (once per plan, then cached) with the
        masks and bit classes of the plan without fine-tuning fixed; ``progress(step, total)`` reports the steps.
        """
        plan.validate()
        if plan.finetune_epochs == 0:
            key = plan.key()
            with self._lock:
                if key in self._compressed:
                    self._compressed.move_to_end(key)
                    return self._compressed[key]
                cw = self._compress(plan)
                self._compressed[key] = cw
                if len(self._compressed) > 16:
                    self._compressed.popitem(last=False)
                return cw
        from xaicomp_core.compress.finetune import finetune_weights

        with self._lock:
            base = self._compress(plan.replace(finetune_epochs=0))
            key = plan.key()
            if key not in self._finetuned:
                x, y = self.train_tensors()
                self._finetuned[key] = finetune_weights(
                    self.compressed_model(base), base.layout, self._weights_flat, base.keep, base.quant.klass,
                    plan.bit_levels, plan.quantizer, x, y, epochs=plan.finetune_epochs, lr=plan.finetune_lr,
                    seed=plan.seed, batch_size=plan.finetune_batch, progress=progress or self.finetune_progress,
                    device=self.device)
                if len(self._finetuned) > 8:
                    self._finetuned.popitem(last=False)
            flat = self._finetuned[key]
            quant = quantize(base.layout, flat, base.keep, base.quant.klass, plan.bit_levels, plan.quantizer)
            # same masks, bit classes and scale groups as the base plan; the codes (and so the size of the
            # Huffman-coded values) are the fine-tuned weights'
            size = self.compressor.size_of(base.layout, base.keep, quant, plan.granularity, base.overrides)
            return dataclasses.replace(base, plan=plan, quant=quant, size=size)

    def needs_finetuning(self, plan: CompressionPlan) -> bool:
        """Whether :meth:`compress` would fine-tune first (the plan asks for it and its weights are not cached)."""
        return bool(plan.finetune_epochs) and plan.key() not in self._finetuned

    def _compress(self, plan: CompressionPlan) -> CompressedWeights:
        rel = self.relevance(plan.composite) if self.compressor.needs_relevance(plan) else None  # full thread pool

        def relevance_of(weights: dict[str, torch.Tensor], composite: str | None = None) -> RelevanceResult:
            with full_pool():  # a relevance pass on a pruned model (iterative criteria) is a big kernel
                return self.relevance_of(weights, composite)

        with one_thread():  # small-tensor bookkeeping: scores, masks, bit classes, quantization, sizes
            return self.compressor.compress(plan, rel if rel is not None else self.relevance, relevance_of)

    def _forward(self, x: torch.Tensor | None = None, cw: CompressedWeights | None = None, prepared: Any = None
                 ) -> torch.Tensor:
        """Logits on ``x`` (default: the evaluation set) of the original model, or of ``cw``: the fast exact
        forward where the model is supported (same top-1 as the eager one on every image; ``prepared``: its
        :meth:`~xaicomp_core.evaluate.fast.FastForward.prepare` of ``cw``, made before), else the eager forward of
        the working model. Call with the lock held."""
        x = self.x_eval if x is None else x

        def eager(xs: torch.Tensor) -> torch.Tensor:
            self._load(cw)
            try:
                return forward_logits(self._work, xs, self.eval_batch_size)
            finally:
                self._load(None)

        if self._fast is None:
            return eager(x)
        return self._fast.logits(self._state if cw is None else cw.state_dict(self._state), x, eager, prepared)

    def _predictions(self, key: str, cw: CompressedWeights, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Top-1 predictions of ``cw`` (the plan ``key``) on the evaluation images ``idx`` (default: all).

        Each image is run once per plan: the first numbers' subset, the background's chunks and the exact
        evaluation fill one table of predictions, and one prepared fast forward (for onnxruntime: one session
        holding the plan's weights) serves them all. Every prediction is the exact path's, so a table filled in
        parts equals one computed at once. Call with the lock held."""
        part = self._partial.get(key)
        if part is None or part.cw is not cw:
            part = _Partial(cw, torch.full((len(self.y_eval),), -1, dtype=torch.long))
            self._partial[key] = part
            while len(self._partial) > PARTIAL_PLANS:
                self._partial.popitem(last=False)
        self._partial.move_to_end(key)
        pred = part.pred
        todo = (pred < 0).nonzero().flatten() if idx is None else idx[pred[idx] < 0]
        if len(todo):
            if self._fast is not None and part.prepared is None:
                part.prepared = self._fast.prepare(cw.state_dict(self._state))
            x = self.x_eval if len(todo) == len(pred) else self.x_eval[todo]
            pred[todo] = self._forward(x, cw, part.prepared).argmax(1)
        return pred.clone() if idx is None else pred[idx]

    def _load(self, cw: CompressedWeights | None) -> None:
        """Copy a compressed model's weights (or, with None, the original ones) into the working model."""
        src = self.layout.split(cw.quant.values) if cw is not None else self._weights
        with torch.no_grad():
            for name in self.layout.names:
                self._work_params[name].copy_(src[name])
            if cw is not None:
                for name, value in cw.overrides.items():
                    self._work_state[name].copy_(value)
                self._overridden = list(cw.overrides)
            else:
                for name in self._overridden:
                    self._work_state[name].copy_(self._state[name])
                self._overridden = []

    def compressed_logits(self, plan: CompressionPlan | CompressedWeights, x: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """Logits of the compressed model (a plan, or one already applied) on ``x`` (default: the evaluation set)."""
        cw = plan if isinstance(plan, CompressedWeights) else self.compress(plan)
        with self._lock:
            return self._forward(x, cw)

    def compressed_state_dict(self, plan: CompressionPlan | CompressedWeights) -> dict[str, torch.Tensor]:
        """The model's state dict with the compressed weights and the plan's overrides (tensors are shared with
        the cached model where unchanged: do not modify them)."""
        cw = plan if isinstance(plan, CompressedWeights) else self.compress(plan)
        return cw.state_dict(self._state)

    def compressed_model(self, plan: CompressionPlan | CompressedWeights) -> nn.Module:
        """A new model (deep copy) holding the compressed weights."""
        model = copy.deepcopy(self.model).eval()
        state = model.state_dict()
        with torch.no_grad():
            for name, value in self.compressed_state_dict(plan).items():
                state[name].copy_(value)
        return model

    def evaluate(self, plan: CompressionPlan, progress: ProgressFn | None = None) -> EvaluationResult:
        """Apply ``plan`` and measure accuracy, sparsity, bits and size on the whole evaluation set (exact numbers,
        cached per plan). Has priority over background work (:meth:`anticipate`).

        ``progress(step, total)`` reports fine-tuning steps for plans with ``finetune_epochs > 0``.
        """
        with self.foreground():
            return self._evaluate(plan, progress)

    def _evaluate(self, plan: CompressionPlan, progress: ProgressFn | None = None) -> EvaluationResult:
        key = plan.key()
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
            t0 = time.perf_counter()
            cw = self.compress(plan, progress)
            result = self._result(cw, self._predictions(key, cw), time.perf_counter() - t0)
            return self._store(key, result)

    def _store(self, key: str, result: EvaluationResult) -> EvaluationResult:
        with self._lock:
            self._results[key] = result
            self._partial.pop(key, None)  # the exact result is in: its partial predictions are done with
            if len(self._results) > self._cache_size:
                self._results.popitem(last=False)
            return result

    def _result(self, cw: CompressedWeights, pred: torch.Tensor, seconds: float,
                subset: torch.Tensor | None = None) -> EvaluationResult:
        """The result of ``cw`` from its predictions on the evaluation set, or (an estimate) on ``subset``."""
        with one_thread():  # small-tensor bookkeeping
            return self._assemble(cw, pred, seconds, subset)

    def _assemble(self, cw: CompressedWeights, pred: torch.Tensor, seconds: float,
                  subset: torch.Tensor | None) -> EvaluationResult:
        layout, keep, klass = cw.layout, cw.keep, cw.quant.klass
        n_cls = self.info.num_classes
        y = self.y_eval if subset is None else self.y_eval[subset]
        correct, per_class = accuracy_counts(pred, y, n_cls)
        levels = cw.plan.bit_levels
        lv = torch.tensor(levels, dtype=torch.float64)
        sizes = {t.name: t for t in cw.size.tensors}
        modules = dict(self.model.named_modules())
        layers = []
        comp_mask = ~layout.protected_flat
        for i, name in enumerate(layout.names):
            sl = layout.layer_slice(i)
            kept = int(keep[sl].sum())
            kc = klass[sl]
            counts = torch.bincount(kc[kc >= 0].long(), minlength=len(levels))
            if layout.protected[i]:
                mean_bits, hist = 32.0, {"fp32": kept}
            else:
                mean_bits = float((counts.double() * lv).sum() / max(kept, 1)) if kept else 0.0
                hist = {("fp32" if b == FP32 else f"{b}"): int(c) for b, c in zip(levels, counts)}
            mod = modules.get(name.rsplit(".", 1)[0])
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
            t = sizes[name]
            layers.append(LayerStats(name.removesuffix(".weight"), kind, layout.shapes[i], layout.sizes[i], kept,
                                     1 - kept / layout.sizes[i], mean_bits, hist, layout.protected[i],
                                     t.keep_encoding, t.total + self._bias_bytes(cw.size, name), t.fp32_bytes
                                     + self._bias_bytes(cw.size, name, fp32=True), t.value_encoding,
                                     t.zeros_pruned))
        n_comp = int(comp_mask.sum())
        pruned_comp = int((~keep & comp_mask).sum())
        active = klass >= 0
        mean_bits = float(lv[klass[active].long()].mean()) if bool(active.any()) else 0.0
        common = (list(self.class_names), pruned_comp / max(n_comp, 1), int((~keep).sum()) / layout.total,
                  mean_bits, layers, cw.size, pred, seconds)
        if subset is None:
            return EvaluationResult(cw.plan, correct / len(self.y_eval), self.baseline_accuracy, correct,
                                    self.baseline_correct, len(self.y_eval), per_class,
                                    list(self.baseline_per_class), *common)
        est = estimate_accuracy(pred == y, self._baseline_quick_correct, self.baseline_accuracy, len(self.y_eval))
        base_sub, base_per = accuracy_counts(self.baseline_pred[subset], y, n_cls)
        # per class: the original model's exact per-class accuracy plus the subset's paired change
        per_est = [min(1.0, max(0.0, b + (c - s))) for b, c, s in zip(self.baseline_per_class, per_class, base_per)]
        return EvaluationResult(cw.plan, est.accuracy, self.baseline_accuracy, correct, base_sub, len(y), per_est,
                                list(self.baseline_per_class), *common, estimate=True,
                                accuracy_stderr=est.stderr, eval_images=len(self.y_eval))

    @staticmethod
    def _bias_bytes(size: SizeBreakdown, weight_name: str, fp32: bool = False) -> int:
        bname = weight_name.removesuffix("weight") + "bias"
        for t in size.tensors:
            if t.name == bname:
                return t.fp32_bytes if fp32 else t.total
        return 0

    # ------------------------------------------------------------------------------------------------------------
    def drop_interval(self, result: EvaluationResult) -> tuple[float, float]:
        """The accuracy drop of an exact result on the evaluation images, in points, and the half-width of its 95 %
        interval (:func:`paired_drop` against the original model's predictions on the same images)."""
        if result.estimate or len(result.predictions) != len(self.y_eval):
            raise XaicompError("an interval of the drop needs an exact evaluation on all evaluation images")
        return paired_drop(self.baseline_pred, result.predictions, self.y_eval)

    def input_relevance(self, indices: list[int], plan: CompressionPlan | None = None, composite: str | None = None,
                        target: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel relevance (N, H, W) and logits for evaluation samples, for the original model or a compressed one.

        Relevance starts from the true class (or the session's ``target`` setting).
        """
        if not indices:
            raise XaicompError("choose at least one sample")
        if max(indices) >= len(self.x_eval) or min(indices) < 0:
            raise XaicompError(f"sample index out of range 0..{len(self.x_eval) - 1}")
        model = self.model if plan is None else self.compressed_model(plan)
        idx = torch.as_tensor(indices)
        res = compute_relevance(model, self.x_eval[idx], self.y_eval[idx], composite or self.composite,
                                epsilon=self.epsilon, target=target or self.target, keep_input=True, check=False,
                                batch_size=self.relevance_batch_size, device=self.device)
        assert res.input is not None
        return res.input.sum(1), res.logits

    # ------------------------------------------------------------------------------------------------------------
    # progressive and anticipated evaluation
    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """Mark a caller the user waits for: background work (:meth:`anticipate`) pauses between chunks while any
        foreground call is running or waiting."""
        with self._fg_cond:
            self._fg_waiting += 1
        try:
            yield
        finally:
            with self._fg_cond:
                self._fg_waiting -= 1
                self._fg_last = time.monotonic()
                self._fg_cond.notify_all()

    def _wait_for_foreground(self) -> None:
        """Wait until no foreground call runs or waits, and the last one ended :data:`FOREGROUND_GRACE` seconds
        ago (what the user waited for is then sent and drawn without background work on the same cores)."""
        with self._fg_cond:
            while True:
                self._fg_cond.wait_for(lambda: self._fg_waiting == 0)
                left = self._fg_last + FOREGROUND_GRACE - time.monotonic()
                if left <= 0:
                    return
                self._fg_cond.wait(left)

    def is_cached(self, plan: CompressionPlan) -> bool:
        """Whether the exact result of ``plan`` is cached (then :meth:`evaluate` returns at once)."""
        return plan.key() in self._results

    def cached(self, plan: CompressionPlan) -> EvaluationResult | None:
        """The exact result of ``plan`` if cached, else None (never computes)."""
        with self._lock:
            return self._results.get(plan.key())

    def estimate(self, plan: CompressionPlan) -> EvaluationResult:
        """First numbers of ``plan``: the exact result if cached, else an estimate from the class-balanced subset
        :attr:`quick_idx` (``result.estimate`` is True; accuracy is the paired estimate of the full-set accuracy
        with ``accuracy_stderr``; sizes, sparsity and bits are exact). Costs the compression plus a forward over
        the subset; the compressed weights are kept, so a following :meth:`evaluate` does not compress again.
        """
        with self.foreground():
            key = plan.key()
            with self._lock:
                if key in self._results:
                    return self._results[key]
                if key in self._estimates:
                    return self._estimates[key]
                if plan.finetune_epochs and self.needs_finetuning(plan):
                    raise PlanError("fine-tuned plans have no quick estimate: evaluate them (fine-tuning first)")
                t0 = time.perf_counter()
                if len(self.quick_idx) >= len(self.y_eval):
                    return self._evaluate(plan)
                cw = self.compress(plan)
                idx = self.quick_idx
                res = self._result(cw, self._predictions(key, cw, idx), time.perf_counter() - t0, idx)
                self._estimates[key] = res
                if len(self._estimates) > self._cache_size:
                    self._estimates.popitem(last=False)
                return res

    def anticipate(self, plans: list[CompressionPlan], owner: str = "default") -> None:
        """Evaluate ``plans`` in the background (nearest first), replacing what ``owner`` asked for before.

        Bounded (at most :data:`~xaicomp_core.evaluate.progressive.MAX_ANTICIPATED` per owner), cancellable
        (:meth:`cancel_anticipation`) and never in the way: the worker pauses between chunks of images while a
        foreground call (:meth:`evaluate`, :meth:`estimate`) runs or waits.
        """
        self.anticipator.submit([p for p in plans if not p.finetune_epochs], owner)

    def cancel_anticipation(self, owner: str | None = None) -> None:
        """Drop the plans ``owner`` (or everyone, with None) asked to anticipate."""
        self.anticipator.cancel(owner)

    def _evaluate_background(self, plan: CompressionPlan) -> EvaluationResult:
        """:meth:`evaluate` in chunks of images, stepping aside for the foreground before each chunk."""
        key = plan.key()
        self._wait_for_foreground()
        with self._lock:
            if key in self._results:
                return self._results[key]
            t0 = time.perf_counter()
            cw = self.compress(plan)
        chunk = max(1, min(self.eval_batch_size, BACKGROUND_CHUNK))
        n = len(self.x_eval)
        for i in range(0, n, chunk):
            self._wait_for_foreground()
            if self.anticipator.stopping:
                raise XaicompError("background evaluation stopped")
            with self._lock:
                if key in self._results:  # the foreground finished it meanwhile (from the chunks done here)
                    return self._results[key]
                self._predictions(key, cw, torch.arange(i, min(i + chunk, n)))
        with self._lock:
            if key in self._results:
                return self._results[key]
            return self._store(key, self._result(cw, self._predictions(key, cw), time.perf_counter() - t0))

    def check_unchanged(self) -> bool:
        """Whether the session's model still has the state dict it was given."""
        return state_dict_hash(self.model) == self.model_hash

