"""Pretrained torchvision weights from the local torch hub cache, never downloaded.

torchvision's weights API names the file of each architecture's default weights (``weights.url``); torch keeps
downloaded files in ``<torch hub dir>/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``). :func:`pretrained_state_dict` reads the file from there with the safe loader
(tensors only, no pickled code) and, when it is not there, raises :class:`PretrainedMissing` saying exactly which
file to place where. Nothing here opens a network connection.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from xaicomp_core.errors import WeightsError


class PretrainedMissing(WeightsError):
    """The pretrained weights file is not in the local torch hub cache."""


def weights_entry(arch: str) -> Any:
    """torchvision's default weights enum entry for ``arch`` (raises :class:`WeightsError` for none)."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise WeightsError(f"torchvision has no pretrained weights for {arch!r}") from None


def checkpoint_dir() -> pathlib.Path:
    """Where torch keeps downloaded weights: ``torch.hub.get_dir()/checkpoints`` (follows ``TORCH_HOME``)."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def weights_file(arch: str) -> tuple[pathlib.Path, str]:
    """The cache path of ``arch``'s default pretrained weights and the address torchvision names for them."""
    entry = weights_entry(arch)
    url = str(entry.url)
    return checkpoint_dir() / os.path.basename(url.split("?")[0]), url


def is_cached(arch: str) -> bool:
    """Whether the pretrained weights of ``arch`` are in the local cache."""
    try:
        return weights_file(arch)[0].is_file()
    except WeightsError:
        return False


def cached_weights(arch: str) -> tuple[pathlib.Path, list[str]]:
    """The local file of ``arch``'s default pretrained weights and their class names (read it with
    :func:`~xaicomp_core.io.models.load_weights_file`: tensors only).

    Raises
    ------
    PretrainedMissing
        If the file is not in the cache (the message names the file and the folder to put it in).
    """
    path, url = weights_file(arch)
    if not path.is_file():
        raise PretrainedMissing(f"the pretrained weights of {arch} are not on this machine: place {path.name} "
                                f"(torchvision's file, {url}) in {path.parent}/ (set TORCH_HOME to use another "
                                "cache folder); xaicomp never downloads")
    return path, list(weights_entry(arch).meta.get("categories") or [])


__all__ = ["PretrainedMissing", "checkpoint_dir", "is_cached", "cached_weights", "weights_entry",
           "weights_file"]
