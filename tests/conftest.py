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


@pytest.fixture(autouse=True, scope="module")
def _no_background_work_left():
    """Each test module leaves no anticipated plans waiting: the app's Compress page asks for up to 32 per browser
    session, which would otherwise run under the next modules' tests."""
    yield
    from xaicomp_core.evaluate.progressive import cancel_all

    cancel_all()


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


# ---------------------------------------------------------------------------------------------------------------
# Ray's servers listen on every interface (Ray has no setting to bind them to 127.0.0.1): the Ray tests run in a
# network namespace of their own that holds only the loopback interface (tests/test_ray_private_network.py), where
# the machine allows one (root, or unprivileged user namespaces); elsewhere they run here as they are.
# ---------------------------------------------------------------------------------------------------------------
RAY_TESTS = "test_ray_sweep.py"
RAY_WRAPPER = "test_ray_private_network.py"
#: set in the private network namespace (the Ray tests run there, the wrapper does not)
PRIVATE_NET_ENV = "XAICOMP_PRIVATE_NET"


def private_network_command() -> list[str] | None:
    """The command prefix that runs a shell command in a new network namespace with only loopback up (``sh -c``
    follows), or None where this machine cannot make one."""
    import os
    import shutil
    import subprocess

    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    prefix = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    try:
        ok = subprocess.run([*prefix, "sh", "-c", "ip link set lo up"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if ok.returncode == 0 else None


def pytest_collection_modifyitems(config, items):
    import os

    def named(name):
        return [i for i in items if i.path.name == name]

    if os.environ.get(PRIVATE_NET_ENV) == "1" or not named(RAY_WRAPPER):
        return  # inside the namespace (the wrapper is never collected there), or the wrapper was not asked for
    drop = named(RAY_TESTS) if private_network_command() is not None else named(RAY_WRAPPER)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if i not in drop]
