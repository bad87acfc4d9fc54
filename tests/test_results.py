"""The results pipeline runs, and the committed headline plans re-check with ``xaicomp compress --plan``."""

from __future__ import annotations

import json
import pathlib

import pytest

from xaicomp_core.cli.main import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "results" / "summary.json"


def _compress(capsys, plan: dict, tmp_path: pathlib.Path, model: str, *extra: str) -> dict:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    assert main(["compress", "--model", model, "--plan", str(p), "--json", "--threads", "2", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_quick_pipeline_writes_everything_and_plans_recheck(tmp_path, capsys):
    from xaicomp_core.results import main as results_main

    assert results_main(["--models", "fashion-lenet", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    m = summary["models"]["fashion-lenet"]
    for key in ("pruning_curves", "paper_rule", "mixed_precision", "best_by_criterion", "best_ratio_at_1pt",
                "yeom_equal_size"):
        assert key in m
    for name in ("fashion-lenet-pruning.png", "fashion-lenet-pareto.png", "fashion-lenet-paper-rule.png"):
        assert (tmp_path / "docs" / "results" / name).stat().st_size > 5000
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Headline" in text and "fashion-lenet" in text
    best = m["best_ratio_at_1pt"]["no_finetune"]
    d = _compress(capsys, best["plan"], tmp_path, "fashion-lenet", "--reference-samples", "200",
                  "--eval-samples", "400")
    assert d["accuracy"] == best["accuracy"]
    assert d["size"]["estimated_bytes"] == best["estimated_bytes"]


@pytest.mark.parametrize("model", ["fashion-vgg", "fashion-lenet", "fashion-resnet"])
def test_committed_headline_rechecks(model, tmp_path, capsys):
    summary = json.loads(SUMMARY.read_text())
    assert not summary["meta"].get("quick"), "the committed results/summary.json is from a quick run: make results"
    best = summary["models"][model]["best_ratio_at_1pt"]["no_finetune"]
    d = _compress(capsys, best["plan"], tmp_path, model)
    assert d["size"]["estimated_bytes"] == best["estimated_bytes"]
    assert d["accuracy"] == pytest.approx(best["accuracy"], abs=0.0006)  # at most one image of 2,000
    assert d["accuracy"] >= d["baseline_accuracy"] - 0.01 - 1e-9
