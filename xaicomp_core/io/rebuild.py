"""Rebuild the model of a packed file whose architecture is not a built-in or torchvision name.

* an ONNX model (``arch == "onnx"``): from the graph stored in the file (``header["architecture"]``, see
  :func:`~xaicomp_core.io.onnx_import.architecture_record`), or from the original ``.onnx`` file the user names;
* a Python factory (``arch == "python:FILE.py:FACTORY"``): only from the code the user names again
  (``--model-py``): a packed file never makes xaicomp run code.

The file's tensors must fit the rebuilt modules exactly (names and shapes), or a :class:`WeightsError` says which do
not.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from xaicomp_core.errors import WeightsError
from xaicomp_core.io.models import ModelInfo, load_state_dict_checked
from xaicomp_core.io.onnx_import import (
    ONNX_ARCH,
    InputSpec,
    is_onnx_name,
    model_from_onnx_file,
    model_from_record,
)
from xaicomp_core.io.user_code import is_python_spec, load_python_model


def needs_rebuild(info: ModelInfo) -> bool:
    """Whether ``info.arch`` is rebuilt here rather than by name."""
    return info.arch == ONNX_ARCH or info.arch.startswith("python:")


def rebuild_model(info: ModelInfo, state: dict[str, torch.Tensor], record: Any = None,
                  model_file: str | os.PathLike | bytes | None = None) -> nn.Module:
    """The packed file's model rebuilt from ``model_file`` (an ``.onnx`` path or bytes, or ``FILE.py:FACTORY``) or
    else from the stored architecture ``record``, with ``state`` loaded.

    Raises
    ------
    WeightsError
        Nothing to rebuild from (a Python model without ``model_file``), or tensors that do not fit.
    FormatError
        A malformed stored record.
    """
    if model_file is not None and not isinstance(model_file, bytes) and is_python_spec(model_file):
        spec = InputSpec(input_size=tuple(info.preprocessing.input_size), class_names=tuple(info.class_names),
                         source="the packed file")
        model = load_python_model(str(model_file), declared=spec)
        load_state_dict_checked(model, state, "packed file")
        return model
    if model_file is not None:
        if not isinstance(model_file, bytes) and not is_onnx_name(model_file):
            raise WeightsError(f"{model_file}: give the model's .onnx file or FILE.py:FACTORY")
        return model_from_onnx_file(model_file, info, state)
    if info.arch == ONNX_ARCH:
        return model_from_record(record, info, state)
    raise WeightsError(f"this file holds a model defined in Python ({info.arch.removeprefix('python:')}); xaicomp "
                       "does not run code from a file it reads: pass the same FILE.py:FACTORY again (--model-py)")


__all__ = ["needs_rebuild", "rebuild_model"]
