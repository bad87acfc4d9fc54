"""Shared fixtures: seeded, small, fast. Torch threads are set explicitly."""

from __future__ import annotations

import pathlib

import pytest
import torch

torch.set_num_threads(2)

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def fashion_ref():
    from xaicomp_core import load_builtin_dataset

    return load_builtin_dataset("fashion-mnist", "reference")


@pytest.fixture(scope="session")
def fashion_eval():
    from xaicomp_core import load_builtin_dataset

    return load_builtin_dataset("fashion-mnist", "eval")


@pytest.fixture(scope="session")
def lenet_session(fashion_ref, fashion_eval):
    """A session on the built-in LeNet (fast), relevance computed on 300 reference images."""
    from xaicomp_core import CompressionSession, load_builtin_model

    s = CompressionSession(load_builtin_model("fashion-lenet"), fashion_ref, fashion_eval.balanced_subset(600),
                           reference_samples=300)
    s.relevance()
    return s


@pytest.fixture(scope="session")
def artifacts() -> pathlib.Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
