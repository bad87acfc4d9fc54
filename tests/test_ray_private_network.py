"""The Ray tests (tests/test_ray_sweep.py) in a network namespace of their own with only the loopback interface:
Ray's servers listen on every interface and have no setting for 127.0.0.1. ``tests/conftest.py`` runs them here
instead of in this process where the machine can make such a namespace, and directly where it cannot."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import PRIVATE_NET_ENV, RAY_TESTS, private_network_command

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_ray_tests_pass_in_a_private_network():
    prefix = private_network_command()
    assert prefix is not None, "conftest.py runs the Ray tests directly where no namespace can be made"
    inner = f'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider tests/{RAY_TESTS}'
    run = subprocess.run([*prefix, "sh", "-c", inner, sys.executable], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, **{PRIVATE_NET_ENV: "1"}), timeout=1800)
    out = run.stdout + run.stderr
    print(out[-6000:])
    assert run.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|error|skipped", summary), summary
