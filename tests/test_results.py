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
                "yeom_equal_size", "auto", "within_1pt", "where_relevance_helps"):
        assert key in m
    # hybrid criteria have curves; the auto search ran per signal and its plans recheck
    assert {"lrp-x-weight", "lrp-budget-magnitude"} <= set(m["pruning_curves"])
    auto = m["auto"]
    assert set(auto["signals"]) == {"relevance", "hybrid", "magnitude"}
    assert auto["summary"]["smallest"] in (*auto["signals"], None) and auto["verdict"]
    for a in auto["signals"].values():
        assert a["evaluations"] <= auto["budget"] and a["plan"]["layer_prune"] and a["plan"]["layer_bits"]
        assert "finetuned" in a
    rows = m["within_1pt"]["rows"]
    assert all(r["drop_points"] <= 1.0 + 1e-9 for r in rows)
    assert m["within_1pt"]["best_with_relevance"] == max((r for r in rows if r["uses_relevance"]),
                                                         key=lambda r: r["ratio"], default={})
    where = {r["what"]: r for r in m["where_relevance_helps"]}
    assert {"pruning 90%", "bit allocation"} <= set(where)
    p90 = where["pruning 90%"]
    curve = {c: next(p["accuracy"] for p in v["points"] if p["prune_ratio"] == 0.9)
             for c, v in m["pruning_curves"].items()}
    assert p90["magnitude_value"] == curve["magnitude"] and p90["relevance_value"] == curve[p90["relevance"]]
    assert p90["helps"] == (curve[p90["relevance"]] > curve["magnitude"])
    assert "## Where relevance helps and where it does not" in (tmp_path / "RESULTS.md").read_text()
    assert "### Auto search" in (tmp_path / "RESULTS.md").read_text()
    for name in ("fashion-lenet-pruning.png", "fashion-lenet-pareto.png", "fashion-lenet-paper-rule.png"):
        assert (tmp_path / "docs" / "results" / name).stat().st_size > 5000
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Headline" in text and "fashion-lenet" in text
    best = m["best_ratio_at_1pt"]["no_finetune"]
    d = _compress(capsys, best["plan"], tmp_path, "fashion-lenet", "--reference-samples", "200",
                  "--eval-samples", "400")
    assert d["accuracy"] == best["accuracy"]
    assert d["size"]["estimated_bytes"] == best["estimated_bytes"]
    a = auto["signals"]["hybrid"]
    d = _compress(capsys, a["plan"], tmp_path, "fashion-lenet", "--reference-samples", "200", "--eval-samples", "400")
    assert d["accuracy"] == a["evaluation"]["accuracy"]
    assert d["size"]["estimated_bytes"] == a["estimated_bytes"]

    # the auto search with fine-tuning in the loop: its plans are fine-tuned ones, within the budget
    aft = m["auto_finetuned"]
    assert set(aft["signals"]) == {"hybrid", "magnitude"} and aft["finetune_epochs"] == 2
    for a in aft["signals"].values():
        assert a["evaluations"] <= aft["budget"] and a["plan"]["finetune_epochs"] == 2
    assert "fine-tuning in the loop" in text

    # --only reruns that one section into the existing summary and keeps the rest
    before = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert results_main(["--models", "fashion-lenet", "--quick", "--out", str(tmp_path), "--only",
                         "auto-finetuned"]) == 0
    after = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert [r["section"] for r in after["meta"]["partial_runs"]] == ["auto-finetuned"]
    for key in ("pruning_curves", "auto", "within_1pt", "best_ratio_at_1pt"):
        assert after["models"]["fashion-lenet"][key] == before["models"]["fashion-lenet"][key]
    assert "Rerun since with" in (tmp_path / "RESULTS.md").read_text()
    # --only auto reruns the search and the tables that read it; a rerun of a section replaces its earlier record
    for _ in range(2):
        assert results_main(["--models", "fashion-lenet", "--quick", "--out", str(tmp_path), "--only", "auto"]) == 0
    again = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert [r["section"] for r in again["meta"]["partial_runs"]] == ["auto-finetuned", "auto"]
    m0, m1 = after["models"]["fashion-lenet"], again["models"]["fashion-lenet"]
    for key in ("within_1pt", "pruning_curves", "auto_finetuned"):  # deterministic: the same numbers
        assert m1[key] == m0[key]
    for sig, a in m1["auto"]["signals"].items():  # the same search again (its timings differ)
        assert (a["plan"], a["estimated_bytes"], a["evaluation"]) == (
            m0["auto"]["signals"][sig]["plan"], m0["auto"]["signals"][sig]["estimated_bytes"],
            m0["auto"]["signals"][sig]["evaluation"])
    assert results_main(["--models", "fashion-resnet", "--quick", "--out", str(tmp_path), "--only",
                         "auto-finetuned"]) == 2  # not in the summary: one line, nothing written
    assert json.loads((tmp_path / "results" / "summary.json").read_text()) == again


@pytest.mark.parametrize("model", ["fashion-vgg", "fashion-lenet", "fashion-resnet"])
def test_committed_headline_rechecks(model, tmp_path, capsys):
    summary = json.loads(SUMMARY.read_text())
    assert not summary["meta"].get("quick"), "the committed results/summary.json is from a quick run: make results"
    best = summary["models"][model]["best_ratio_at_1pt"]["no_finetune"]
    d = _compress(capsys, best["plan"], tmp_path, model)
    assert d["size"]["estimated_bytes"] == best["estimated_bytes"]
    assert d["accuracy"] == pytest.approx(best["accuracy"], abs=0.0006)  # at most one image of 2,000
    assert d["accuracy"] >= d["baseline_accuracy"] - 0.01 - 1e-9


@pytest.mark.slow
def test_committed_finetuned_auto_plan_rechecks(tmp_path, capsys):
    """The smallest plan of the auto search with fine-tuning in the loop, as committed (whether or not it holds
    within 1 point on the evaluation images too), gives the same size and accuracy with ``xaicomp compress --plan``
    (which fine-tunes it again, seeded)."""
    a = json.loads(SUMMARY.read_text())["models"]["fashion-vgg"]["auto_finetuned"]
    best = a["signals"][a["summary"]["smallest"]]
    assert best["plan"]["finetune_epochs"] == 2
    d = _compress(capsys, best["plan"], tmp_path, "fashion-vgg")
    assert d["size"]["estimated_bytes"] == best["estimated_bytes"]
    assert d["accuracy"] == pytest.approx(best["evaluation"]["accuracy"], abs=0.0006)  # at most one image of 2,000
    assert (d["baseline_accuracy"] - d["accuracy"]) * 100 == pytest.approx(best["evaluation"]["drop_points"],
                                                                           abs=0.06)
