"""Exports of a compressed model: the packed ``.xcz`` file with its evaluation record, dense safetensors with the
dequantized weights, and ONNX; and :func:`verify_packed`, which reloads a packed file and re-measures it.

The packed file is the honest size (see :mod:`xaicomp_core.format.packing`); the dense and ONNX files are what people
run elsewhere (fp32 tensors holding the dequantized values, so they are as large as the original model).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xaicomp_core.errors import FormatError, XaicompError
from xaicomp_core.evaluate.fast import exact_logits
from xaicomp_core.evaluate.forward import EVAL_BATCH_SIZE, accuracy_counts, forward_logits  # noqa: F401
from xaicomp_core.format.packing import PackedModel, PackResult, pack, read_packed, unpack
from xaicomp_core.plan import CompressionPlan

if TYPE_CHECKING:
    from xaicomp_core.evaluate.session import CompressionSession
    from xaicomp_core.io.data import Preprocessing
    from xaicomp_core.io.models import ModelInfo

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the raw bytes of tensors (little-endian, contiguous): identifies logits or data exactly."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# packed export
# ----------------------------------------------------------------------------------------------------------------
def evaluation_record(session: CompressionSession, plan: CompressionPlan, logits: torch.Tensor | None = None,
                      data_spec: dict[str, Any] | None = None, data_label: str | None = None) -> dict[str, Any]:
    """What a packed file records about the evaluation at export time (used by :func:`verify_packed`).

    Parameters
    ----------
    session : CompressionSession
    plan : CompressionPlan
    logits : Tensor, optional
        The compressed model's logits on the session's evaluation set (computed if not given).
    data_spec : dict, optional
        How to load the evaluation data again, e.g. ``{"data": "fashion-mnist", "eval_samples": 600}`` (the
        CLI's ``--data`` and ``--eval-samples``); None if it cannot be reloaded by name.
    data_label : str, optional
        Human description of the data.
    """
    if logits is None:
        logits = session.compressed_logits(plan)
    n_cls = session.info.num_classes
    correct, per_class = accuracy_counts(logits.argmax(1), session.y_eval, n_cls)
    images = len(session.y_eval)
    return {
        "data": data_label or f"evaluation set ({images} images)",
        "data_spec": data_spec,
        "images": images,
        "correct": correct,
        "accuracy": correct / images,
        "baseline_accuracy": float(session.baseline_accuracy),
        "per_class_accuracy": per_class,
        "batch_size": int(session.eval_batch_size),
        "inputs_sha256": tensor_digest(session.x_eval, session.y_eval),
        "logits_sha256": tensor_digest(logits),
    }


def export_packed(session: CompressionSession, plan: CompressionPlan, path: str | pathlib.Path | None = None, *,
                  codec: str = "none", data_spec: dict[str, Any] | None = None, data_label: str | None = None,
                  evaluate: bool = True) -> PackResult:
    """Pack the session's compressed model for ``plan`` (and write it if ``path`` is given).

    Parameters
    ----------
    session : CompressionSession
    plan : CompressionPlan
    path : path, optional
        Where to write the ``.xcz`` file (atomically: an existing file is replaced whole or left as it was; the path
        is validated before any work).
    codec : {"none", "zlib", "lzma"}
        Lossless entropy coding of the payload.
    data_spec, data_label : optional
        See :func:`evaluation_record`.
    evaluate : bool
        Record accuracy and a logits digest of the compressed model on the session's evaluation set (one forward
        pass), so that :func:`verify_packed` can compare.

    Returns
    -------
    PackResult
        ``payload_bytes == session.compress(plan).size.estimated_bytes``.
    """
    if path is not None:
        from xaicomp_core.io.atomic import check_output

        check_output(path, "packed file")
    cw = session.compress(plan)
    extra: dict[str, Any] = {}
    if evaluate:
        extra["evaluation"] = evaluation_record(session, plan, session.compressed_logits(cw), data_spec, data_label)
    from xaicomp_core.io.onnx_import import architecture_record

    arch = architecture_record(session.model)  # an ONNX model's graph (weights left out: they are the payload)
    if arch is not None:
        extra["architecture"] = arch
    res = pack(cw, session.compressed_state_dict(cw), session.info, codec=codec, extra=extra)
    if path is not None:
        res.write(path)
    return res


def codec_sizes(result: PackResult) -> dict[str, int]:
    """Payload bytes under every codec (the raw payload is recovered from ``result`` without re-packing)."""
    from xaicomp_core.format.packing import CODECS, decode_payload, encode_payload

    raw = decode_payload(result.data[result.header_bytes:], result.codec, result.payload_bytes)
    known = {"none": result.payload_bytes, result.codec: result.stored_payload_bytes}
    return {c: known[c] if c in known else len(encode_payload(raw, c)) for c in CODECS}


# ----------------------------------------------------------------------------------------------------------------
# dense safetensors and ONNX
# ----------------------------------------------------------------------------------------------------------------
def dense_state_dict(session: CompressionSession, plan: CompressionPlan) -> dict[str, torch.Tensor]:
    """The model's state dict with the dequantized weights of ``plan`` (zeros where pruned)."""
    return {k: v.clone() for k, v in session.compressed_state_dict(plan).items()}


def _metadata(info: ModelInfo, plan: CompressionPlan) -> dict[str, str]:
    return {"format": "pt", "xaicomp_model": json.dumps(info.to_dict()), "xaicomp_plan": plan.to_json(indent=None)}


def dense_bytes(session: CompressionSession, plan: CompressionPlan) -> bytes:
    """Dense safetensors of the compressed model (dequantized fp32 weights; plan and model info in metadata)."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in dense_state_dict(session, plan).items()}
    return save(state, metadata=_metadata(session.info, plan))


def export_dense(session: CompressionSession, plan: CompressionPlan, path: str | pathlib.Path) -> int:
    """Write :func:`dense_bytes` to ``path``; returns the file size. Load it with
    ``xaicomp_core.load_model(arch, weights=path)``."""
    from xaicomp_core.io.atomic import atomic_write

    data = dense_bytes(session, plan)
    atomic_write(path, data, "dense file")
    return len(data)


def packed_to_dense(packed: PackedModel) -> bytes:
    """Dense safetensors of the model in a packed file."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in packed.state.items()}, metadata=_metadata(packed.info, packed.plan))


def onnx_bytes(model: nn.Module, preprocessing: Preprocessing, opset: int = 17) -> bytes:
    """ONNX of ``model`` (input ``input`` of shape (batch, C, H, W), output ``logits``; dynamic batch).

    Uses the TorchScript exporter (no onnxscript needed). Raises :class:`XaicompError` if the architecture
    cannot be exported.
    """
    shape = (1, preprocessing.channels, *preprocessing.input_size)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (torch.zeros(shape),), buf, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset)
    except Exception as e:  # the exporter raises many types
        raise XaicompError(f"this architecture cannot be exported to ONNX ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return buf.getvalue()


def export_onnx(session: CompressionSession, plan: CompressionPlan, path: str | pathlib.Path) -> int:
    """Write the ONNX of the compressed model for ``plan``; returns the file size."""
    from xaicomp_core.io.atomic import atomic_write

    data = onnx_bytes(session.compressed_model(plan), session.info.preprocessing)
    atomic_write(path, data, "ONNX file")
    return len(data)


def onnx_logits(onnx_data: bytes | str | pathlib.Path, x: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE
                ) -> np.ndarray:
    """Run an ONNX model with onnxruntime (CPU) on ``x``; returns the logits."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise XaicompError("onnxruntime is not installed (pip install 'xaicomp[onnx]')") from None
    src = str(onnx_data) if isinstance(onnx_data, pathlib.Path) else onnx_data
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    xs = x.detach().cpu().float().numpy()
    return np.concatenate([sess.run(None, {"input": xs[i:i + batch_size]})[0] for i in range(0, len(xs), batch_size)])


# ----------------------------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------------------------
#: Fields of a packed file's evaluation record and their types (checked strictly when the file is read back).
EVALUATION_FIELDS: dict[str, tuple[type, ...]] = {
    "data": (str,), "data_spec": (dict, type(None)), "images": (int,), "correct": (int,), "accuracy": (float, int),
    "baseline_accuracy": (float, int), "per_class_accuracy": (list,), "batch_size": (int,),
    "inputs_sha256": (str,), "logits_sha256": (str,),
}
MAX_EVAL_BATCH = 4096


def _header_int(h: dict[str, Any], key: str) -> int:
    v = h.get(key, -1)
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(f"the header field {key!r} has the wrong type")
    return v


def evaluation_from_header(h: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation record of a packed file's header, strictly typed (None if the file has none).

    Its ``data_spec`` says how the data was given at export; callers load it again only when it names built-in data
    (a path in it is text, never opened: the user passes ``--data``).

    Raises
    ------
    FormatError
        For a field of the wrong type or out of range.
    """
    ev = h.get("evaluation")
    if ev is None:
        return None
    if not isinstance(ev, dict):
        raise FormatError("the header's evaluation record is not an object")
    for key, types in EVALUATION_FIELDS.items():
        if key in ev and (not isinstance(ev[key], types) or isinstance(ev[key], bool)):
            raise FormatError(f"the header field evaluation.{key} has the wrong type")
    images, correct = ev.get("images", 0), ev.get("correct", 0)
    if images < 0 or not 0 <= correct <= images:
        raise FormatError("the header's evaluation counts are out of range")
    if "batch_size" in ev and not 1 <= ev["batch_size"] <= MAX_EVAL_BATCH:
        raise FormatError(f"the header's evaluation batch size is out of range (1..{MAX_EVAL_BATCH})")
    for key in ("accuracy", "baseline_accuracy"):
        if key in ev and not 0 <= ev[key] <= 1:
            raise FormatError(f"the header field evaluation.{key} is out of range")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ev.get("per_class_accuracy", [])):
        raise FormatError("the header field evaluation.per_class_accuracy has the wrong type")
    spec = ev.get("data_spec")
    if spec is not None:
        n = spec.get("eval_samples")
        bad_n = n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1)
        ref = spec.get("reference_data")
        if not isinstance(spec.get("data"), str) or bad_n or (ref is not None and not isinstance(ref, str)):
            raise FormatError("the header's evaluation data_spec is malformed")
    return ev


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_packed`. ``ok`` is true when the payload equals the engine's estimate of the
    decoded contents and, if data was given, the accuracy equals the recorded one to the last image."""

    file_bytes: int
    header_bytes: int
    payload_bytes: int
    stored_payload_bytes: int
    codec: str
    estimated_bytes: int
    estimated_bytes_at_export: int
    fp32_bytes: int
    model: str
    arch: str
    plan: dict[str, Any]
    description: str
    accuracy: float | None = None
    expected_accuracy: float | None = None
    correct: int | None = None
    expected_correct: int | None = None
    images: int | None = None
    per_class_accuracy: dict[str, float] | None = None
    data: str | None = None
    data_matches: bool | None = None
    logits_match: bool | None = None
    read_seconds: float = 0.0
    eval_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problems found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (includes ``ok``, ``problems`` and ``estimate_error``)."""
        d = dict(self.__dict__)
        d["ok"] = self.ok
        d["estimate_error"] = (self.payload_bytes - self.estimated_bytes) / max(self.estimated_bytes, 1)
        return d


def verify_packed(source: str | pathlib.Path | bytes | PackedModel, x: torch.Tensor | None = None,
                  y: torch.Tensor | None = None, data_label: str | None = None,
                  model_file: str | pathlib.Path | bytes | None = None, device: str | torch.device = "auto",
                  memory_budget_mb: float | None = None) -> VerifyResult:
    """Reload a packed file, recount its size with the engine and, given data, re-measure its accuracy.

    Parameters
    ----------
    source : path, bytes or PackedModel
    x, y : Tensor, optional
        Preprocessed evaluation inputs and labels. With the data the file was exported with, the accuracy must
        equal the recorded one exactly and the logits digest must match.
    data_label : str, optional
        Description of the data for the result.
    model_file : path or bytes, optional
        Rebuild the architecture from this ``.onnx`` file (or ``FILE.py:FACTORY``) instead of the file's own record
        (see :meth:`~xaicomp_core.format.packing.PackedModel.build_model`).
    device : {"auto", "cpu", "cuda"} or torch.device
        Where the accuracy is re-measured (the rebuilt model moves there; the same exact top-1 rule). Logits
        computed on another device than at export differ in the last bits, so ``logits_match`` may then be False
        while the accuracy must still agree.
    memory_budget_mb : float, optional
        Memory one evaluation batch may take (see :class:`~xaicomp_core.evaluate.session.CompressionSession`): the
        batch recorded at export, lowered to what fits.

    Raises
    ------
    FormatError
        If the file is corrupt, truncated, altered or of an unknown version.
    """
    t0 = time.perf_counter()
    if isinstance(source, PackedModel):
        pm = source
    elif isinstance(source, (bytes, bytearray)):
        pm = unpack(bytes(source))
    else:
        pm = read_packed(source)  # a regular file of bounded size only
    model = pm.build_model(model_file)
    read_s = time.perf_counter() - t0
    h = pm.header
    est = pm.size().estimated_bytes
    ev = evaluation_from_header(h)
    res = VerifyResult(pm.file_bytes, pm.header_bytes, pm.payload_bytes, pm.stored_payload_bytes, pm.codec, est,
                       _header_int(h, "estimated_bytes"), _header_int(h, "fp32_bytes"), pm.info.name, pm.info.arch,
                       pm.plan.to_dict(), pm.plan.describe(), read_seconds=read_s)
    if est != pm.payload_bytes:
        res.problems.append(f"payload is {pm.payload_bytes} bytes, the engine's estimate {est}")
    if res.estimated_bytes_at_export != est:
        res.problems.append(f"the estimate recorded at export ({res.estimated_bytes_at_export}) differs from the "
                            f"estimate of the decoded contents ({est})")
    if ev:
        res.expected_accuracy = ev.get("accuracy")
        res.expected_correct = ev.get("correct")
    if x is None or y is None:
        return res
    t1 = time.perf_counter()
    from xaicomp_core.device import measure_memory_cost, memory_budget_bytes, resolve_device

    dev = resolve_device(device)
    model = model.to(dev)  # the model rebuilt from the file is this function's own
    info = pm.info
    batch = int(ev.get("batch_size", EVAL_BATCH_SIZE)) if ev else EVAL_BATCH_SIZE
    batch = measure_memory_cost(model, x[:1].to(dev), private=True).evaluation_batch(
        memory_budget_bytes(dev, memory_budget_mb), batch)
    # the session's fast exact forward, so that the logits digest can equal the one recorded at export
    logits = exact_logits(model, x, batch)
    correct, per_class = accuracy_counts(logits.argmax(1), y, info.num_classes)
    res.eval_seconds = time.perf_counter() - t1
    res.accuracy = correct / len(y)
    res.correct = correct
    res.images = len(y)
    res.per_class_accuracy = dict(zip(info.class_names, per_class))
    res.data = data_label
    if ev:
        res.data_matches = tensor_digest(x, y) == ev.get("inputs_sha256")
        res.logits_match = tensor_digest(logits) == ev.get("logits_sha256")
        if res.data_matches and correct != res.expected_correct:
            res.problems.append(f"{correct} of {len(y)} correct after reloading, {res.expected_correct} at export")
    return res
