"""Python-defined architectures: ``file.py:factory`` plus a weights file, for users who trust their own code.

Running a Python file runs whatever it contains, so this is an explicit opt-in: the CLI's ``--model-py`` and the
Python API's ``load_model("file.py:factory", weights=...)`` name the file on purpose, and the app offers it only
when started with ``--allow-code`` (``streamlit run app.py -- --allow-code``) or ``XAICOMP_ALLOW_CODE=1``.
Weights are still read with the safe loader (tensors only), never unpickled.

The factory is called without arguments and must return an ``nn.Module``. How images become its inputs is
declared like for an ONNX model (:class:`~xaicomp_core.io.onnx_import.InputSpec`: options, a JSON sidecar
``file.py.json`` / ``file.json``, or a dict ``XAICOMP_INPUT`` in the file); input channels are read from the first
convolution, the input size must be declared unless the file declares it, and there is no default mean/std.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import sys
from typing import Any

import torch
from torch import nn

from xaicomp_core.errors import WeightsError
from xaicomp_core.io.models import (
    MODEL_LOADERS,
    ModelInfo,
    attach_info,
    load_state_dict_checked,
    load_weights_bytes,
    load_weights_file,
)
from xaicomp_core.io.onnx_import import InputSpec, default_class_names, read_sidecar

PY_ARCH_MARK = ".py:"
ALLOW_CODE_ENV = "XAICOMP_ALLOW_CODE"


def is_python_spec(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names a Python factory (``path/to/file.py:factory``)."""
    return spec is not None and PY_ARCH_MARK in str(spec) and not str(spec).endswith(PY_ARCH_MARK)


def code_allowed(argv: list[str] | None = None) -> bool:
    """Whether the app was started with the explicit opt-in (``-- --allow-code`` or ``XAICOMP_ALLOW_CODE=1``)."""
    argv = sys.argv if argv is None else argv
    return "--allow-code" in argv or os.environ.get(ALLOW_CODE_ENV, "") in ("1", "true", "yes")


def split_spec(spec: str) -> tuple[pathlib.Path, str]:
    """``"nets/my.py:build"`` -> (path, ``"build"``)."""
    path, _, factory = str(spec).rpartition(":")
    if not path.endswith(".py") or not factory.isidentifier():
        raise WeightsError(f"--model-py wants FILE.py:FACTORY (a function name), got {spec!r}")
    return pathlib.Path(path), factory


def _import_file(path: pathlib.Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"Python file {path} does not exist")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"xaicomp_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise WeightsError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise WeightsError(f"{path.name} failed to import ({e.__class__.__name__}: {str(e)[:200]})") from None
    return module


def _channels(model: nn.Module) -> int | None:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        return int(first.in_channels)
    return None


def load_python_model(spec: str, weights: str | os.PathLike | bytes | None = None, weights_name: str | None = None,
                      declared: InputSpec | None = None) -> nn.Module:
    """Build ``file.py:factory`` (running that file), load ``weights`` into it and attach its :class:`ModelInfo`.

    Parameters
    ----------
    spec : str
        ``path/to/file.py:factory``; ``factory()`` returns an ``nn.Module``.
    weights : path or bytes, optional
        ``.safetensors`` / ``.pt`` / ``.pth`` state dict (read safely); without it the factory's own weights are
        used (say, a factory that loads them itself).
    weights_name : str, optional
        File name of ``weights`` bytes.
    declared : InputSpec, optional
        Input size, mean/std, pixel range and class names; fields left None come from a sidecar or an
        ``XAICOMP_INPUT`` dict in the file. The input size must be declared somewhere.
    """
    path, factory = split_spec(spec)
    module = _import_file(path)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise WeightsError(f"{path.name} has no function {factory!r}")
    try:
        model = fn()
    except Exception as e:
        raise WeightsError(f"{path.name}:{factory}() failed ({e.__class__.__name__}: {str(e)[:200]})") from None
    if not isinstance(model, nn.Module):
        raise WeightsError(f"{path.name}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    in_file = getattr(module, "XAICOMP_INPUT", None)
    declared = (declared or InputSpec()).merged(read_sidecar(path)).merged(
        InputSpec.from_dict(in_file, f"XAICOMP_INPUT in {path.name}") if in_file is not None else None)
    label = "its own weights"
    if weights is not None:
        if isinstance(weights, (bytes, bytearray)):
            label = weights_name or "uploaded weights"
            state = load_weights_bytes(bytes(weights), label)
        else:
            label = pathlib.Path(weights).name
            state = load_weights_file(weights)
        load_state_dict_checked(model, state, label)
    model.eval()
    channels = _channels(model)
    side_channels = in_file.get("channels") if isinstance(in_file, dict) else None
    channels = channels or side_channels
    if channels not in (1, 3):
        raise WeightsError(f"{path.name}:{factory}: cannot tell 1 or 3 input channels from the model; its first "
                           "layer should be a Conv2d")
    if declared.input_size is None:
        raise WeightsError(f"{path.name}:{factory}: declare the input size (--input-size H,W, \"input_size\" in "
                           f"{path.name}.json, or XAICOMP_INPUT = {{\"input_size\": [H, W]}} in the file)")
    pre = declared.preprocessing(channels, declared.input_size)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, channels, *pre.input_size))
    except Exception as e:
        raise WeightsError(f"{path.name}:{factory} does not run on (1, {channels}, {pre.input_size[0]}, "
                           f"{pre.input_size[1]}) inputs ({e.__class__.__name__}: {str(e)[:160]})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise WeightsError(f"{path.name}:{factory} must return (N, classes) scores, got "
                           f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    n = int(out.shape[1])
    names = list(declared.class_names) if declared.class_names else default_class_names(n)
    if len(names) != n:
        raise WeightsError(f"{len(names)} class names for a model with {n} outputs")
    card = {"python": {"spec": str(spec), "weights": label, "declared": declared.to_dict(),
                       "input": declared.describe(pre).replace("the default for ONNX", "the default")}}
    return attach_info(model, ModelInfo(f"{factory} ({path.name}, {label})", f"python:{spec}", names, pre,
                                        "python code", card))


__all__ = ["ALLOW_CODE_ENV", "code_allowed", "is_python_spec", "load_python_model", "split_spec"]


def _accepts(arch: Any, weights: Any, weights_name: Any) -> bool:
    return is_python_spec(arch)


def _load(arch: Any, weights: Any, weights_name: Any, declared: Any) -> nn.Module:
    return load_python_model(str(arch), weights, weights_name, declared)


MODEL_LOADERS.append((_accepts, _load))
