"""``xaicomp bench`` runs every measurement it reports (no timed assertion: the figures are ratios to read)."""

from __future__ import annotations

import math


def test_bench_reports_every_ratio():
    from xaicomp_core.bench import run_bench

    res = run_bench("fashion-lenet", repeats=1, threads=1, batch=32, backends=False, device="cpu")
    for key in ("update_ratio", "first_number_ratio", "release_ratio", "fast_forward_ratio", "relevance_ratio"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["release_seconds"] > 0 and res["first_number_images"] == 250
