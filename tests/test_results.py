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

    # --only holdout checks the auto plans and the fine-tuning recipes on the test images outside the evaluation set
    bad = fake_test_set(tmp_path / "bad-raw", corrupt=True)
    assert results_main(["--models", "fashion-lenet", "--quick", "--out", str(tmp_path), "--only", "holdout",
                         "--holdout-root", str(bad)]) == 2  # not the test set: one line, nothing written
    assert json.loads((tmp_path / "results" / "summary.json").read_text()) == again
    root = fake_test_set(tmp_path / "raw")
    assert results_main(["--models", "fashion-lenet", "--quick", "--out", str(tmp_path), "--only", "holdout",
                         "--holdout-root", str(root)]) == 0
    h = json.loads((tmp_path / "results" / "summary.json").read_text())["models"]["fashion-lenet"]["holdout"]
    assert h["images"] == 1000  # quick: a class-balanced 1,000 of the 8,000
    assert [(r["section"], r["signal"]) for r in h["plans"]] == [
        *(("auto", sig) for sig in m1["auto"]["signals"]), *(("auto_finetuned", sig) for sig in aft["signals"])]
    for r in h["plans"]:  # the evaluation drops are the summary's own
        src = m1[r["section"]]["signals"][r["signal"]]
        assert r["estimated_bytes"] == src["estimated_bytes"]
        assert r["evaluation_drop_points"] == pytest.approx(src["evaluation"]["drop_points"], abs=1e-9)
        assert r["holdout_half_width"] > 0
    assert [(r["signal"], r["finetune_batch"], r["finetune_lr"]) for r in h["recipes"]] == [
        (sig, b, lr) for sig in aft["signals"] for b, lr in ((128, 0.01), (32, 0.005))]
    assert all(len(r["runs"]) == 1 for r in h["recipes"])
    so = h["search_on_holdout"]  # the search on one half of the held-out images, checked on the other
    assert so["search_images"] == so["check_images"] == 500 and so["budget"] == 6
    assert [r["signal"] for r in so["signals"]] == ["relevance", "hybrid", "magnitude"]
    for r in so["signals"]:
        assert r["evaluations"] <= 6 and r["check_half_width"] >= 0 and r["plan"]["layer_prune"]
        if r["feasible"]:
            assert r["search_drop_points"] <= 1.0 + 1e-9
    assert "of these images instead of the reference images" in (tmp_path / "RESULTS.md").read_text()
    assert "### Held-out check" in (tmp_path / "RESULTS.md").read_text()


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


def _write_idx(path: pathlib.Path, arr) -> None:
    import numpy as np

    arr = np.asarray(arr, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes())


def fake_test_set(folder: pathlib.Path, n: int = 10_000, seed: int = 0, corrupt: bool = False) -> pathlib.Path:
    """Raw idx files of a test set holding the shipped evaluation images at their source indices and random images
    elsewhere (``corrupt``: one evaluation image changed)."""
    import numpy as np

    from xaicomp_core.io.data import BUILTIN_DATASETS, DATA_DIR

    with np.load(DATA_DIR / BUILTIN_DATASETS["fashion-mnist"]["eval"][0]) as z:
        idx, images, labels = z["source_indices"], z["images"], z["labels"]
    rng = np.random.default_rng(seed)
    all_images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    all_labels = (np.arange(n) % 10).astype(np.uint8)
    all_images[idx], all_labels[idx] = images, labels
    if corrupt:
        all_images[idx[7], 3, 3] ^= 1
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "t10k-images-idx3-ubyte", all_images)
    _write_idx(folder / "t10k-labels-idx1-ubyte", all_labels)
    return folder


def test_holdout_is_the_test_set_without_the_evaluation_images(tmp_path):
    import numpy as np

    from xaicomp_core.errors import DataError
    from xaicomp_core.io.data import BUILTIN_DATASETS, DATA_DIR, load_fashion_mnist_holdout

    root = fake_test_set(tmp_path / "raw")
    hold = load_fashion_mnist_holdout(root)
    with np.load(DATA_DIR / BUILTIN_DATASETS["fashion-mnist"]["eval"][0]) as z:
        idx = z["source_indices"]
    assert len(hold) == 10_000 - len(idx) == 8_000
    raw_images = np.random.default_rng(0).integers(0, 256, (10_000, 28, 28), dtype=np.uint8)
    rest = np.setdiff1d(np.arange(10_000), idx)
    assert np.array_equal(hold.images, raw_images[rest]) and np.array_equal(hold.labels, rest % 10)
    with pytest.raises(DataError, match="not images of the test set"):
        load_fashion_mnist_holdout(fake_test_set(tmp_path / "bad", corrupt=True))
    small = tmp_path / "small"  # a test set too short to hold the source indices
    small.mkdir()
    _write_idx(small / "t10k-images-idx3-ubyte", raw_images[:int(idx.max())])
    _write_idx(small / "t10k-labels-idx1-ubyte", np.arange(int(idx.max())) % 10)
    with pytest.raises(DataError, match="not images of the test set"):
        load_fashion_mnist_holdout(small)


def test_paired_drop_by_hand():
    import torch

    from xaicomp_core.evaluate.progressive import paired_drop

    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    base = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])  # 8 right
    pred = torch.tensor([0, 1, 2, 3, 4, 0, 0, 7, 8, 0])  # lost 5 and 6, won 8: 7 right
    drop, half = paired_drop(base, pred, y)
    # lost 2, won 1: drop (2 - 1) / 10; variance (2 + 1 - 1 / 10) / 100
    assert drop == pytest.approx(10.0)
    assert half == pytest.approx(100 * 1.96 * (2.9 / 100) ** 0.5)
    assert paired_drop(base, base, y) == (0.0, 0.0)
