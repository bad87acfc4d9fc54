"""Plan JSON is typed strictly: nothing is coerced silently, every mistake is one readable PlanError."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xaicomp_core import CompressionPlan, PlanError

BAD = [
    ({"bit_levels": "842"}, "'bit_levels' must be a list of integers"),
    ({"bit_levels": [8.9]}, "'bit_levels' must be a list of integers"),
    ({"bit_levels": [8.0]}, "'bit_levels' must be a list of integers"),
    ({"bit_levels": [True]}, "'bit_levels' must be a list of integers"),
    ({"bit_split": "0.2"}, "'bit_split' must be a list of numbers"),
    ({"bit_levels": [8, 4], "bit_split": [None]}, "'bit_split' must be a list of numbers"),
    ({"version": True}, "invalid plan version True"),
    ({"version": "1"}, "invalid plan version '1'"),
    ({"seed": True}, "'seed' must be an integer"),
    ({"seed": 1.5}, "'seed' must be an integer"),
    ({"seed": -1}, "seed must be an integer in 0.."),
    ({"seed": 2**70}, "seed must be an integer in 0.."),
    ({"finetune_epochs": 1.0}, "'finetune_epochs' must be an integer"),
    ({"criterion": ["lrp"]}, "'criterion' must be a string"),
    ({"criterion": {"a": 1}}, "'criterion' must be a string"),
    ({"composite": 3}, "'composite' must be a string"),
    ({"prune_ratio": "0.5"}, "'prune_ratio' must be a number"),
    ({"prune_ratio": False}, "'prune_ratio' must be a number"),
    ({"prune_ratio": float("nan")}, "prune ratio must be in"),
    ({"finetune_lr": [0.1]}, "'finetune_lr' must be a number"),
    ({"fold_norm": 1}, "'fold_norm' must be true or false"),
    ({"fold_norm": "yes"}, "'fold_norm' must be true or false"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[json.dumps(f) for f, _ in BAD])
def test_mistyped_fields_are_refused_with_one_line(fields, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        CompressionPlan.from_dict({"criterion": "lrp", **fields})
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_deep_or_odd_json_is_one_line():
    with pytest.raises(PlanError, match="must be a JSON object"):
        CompressionPlan.from_json("[1, 2]")
    with pytest.raises(PlanError):
        CompressionPlan.from_json("[" * 100_000 + "]" * 100_000)


def test_python_plans_are_checked_too_and_numpy_numbers_are_fine():
    with pytest.raises(PlanError, match="'criterion' must be a string"):
        CompressionPlan(criterion=["lrp"]).validate()
    with pytest.raises(PlanError, match="'bit_levels' must be a list of integers"):
        CompressionPlan(bit_levels="842").validate()
    p = CompressionPlan(prune_ratio=np.float32(0.5), bit_levels=[np.int64(8), 4], bit_split=[np.float64(0.5)],
                        seed=np.int32(3)).validate()
    assert p.to_dict()["bit_levels"] == [8, 4] and type(p.seed) is int and type(p.prune_ratio) is float
    assert CompressionPlan.from_json(p.to_json()) == p


def test_fold_norm_is_version_3_and_only_written_when_on(tmp_path):
    """A plan is written with the lowest version that holds it: ``fold_norm`` needs 3, and a plan without it keeps
    its version-1/2 JSON (readable by earlier xaicomp) byte for byte."""
    from xaicomp_core.cli.common import plan_from_args
    from xaicomp_core.cli.main import build_parser

    plain = CompressionPlan(criterion="magnitude", prune_ratio=0.5, layer_prune={"fc1": 0.9})
    assert "fold_norm" not in plain.to_dict() and plain.to_dict()["version"] == 2
    folded = plain.replace(fold_norm=True)
    d = folded.to_dict()
    assert d["fold_norm"] is True and d["version"] == 3 and folded.key() != plain.key()
    assert CompressionPlan.from_json(folded.to_json()) == folded
    assert "BatchNorm stored as scale and shift" in folded.describe()
    assert folded.cli_words()[-1] == "--fold-norm"
    args = build_parser().parse_args(["compress", "--model", "fashion-lenet", *folded.cli_words()])
    assert plan_from_args(args) == folded
    # --no-fold-norm turns a plan file's fold off
    f = tmp_path / "plan.json"
    f.write_text(folded.to_json())
    args = build_parser().parse_args(["compress", "--model", "fashion-lenet", "--plan", str(f), "--no-fold-norm"])
    assert plan_from_args(args) == plain
    with pytest.raises(PlanError, match="plan version 5 is newer"):
        CompressionPlan.from_dict({**d, "version": 5})


def test_finetune_batch_is_version_4_and_only_written_when_not_128(tmp_path):
    """``finetune_batch`` (default 128, the batch of every earlier plan) is left out of the JSON at 128, so earlier
    plans keep their JSON and key byte for byte; another batch makes the plan version 4, is typed, bounded, described
    and written by ``cli_words``, and ``xaicomp compress --finetune-batch`` sets it."""
    from xaicomp_core.cli.common import plan_from_args
    from xaicomp_core.cli.main import build_parser

    old = CompressionPlan(criterion="magnitude", prune_ratio=0.5, finetune_epochs=2, fold_norm=True)
    assert "finetune_batch" not in old.to_dict() and old.to_dict()["version"] == 3
    assert CompressionPlan.from_dict(old.to_dict()).finetune_batch == 128
    small = old.replace(finetune_batch=32, finetune_lr=0.005)
    d = small.to_dict()
    assert d["finetune_batch"] == 32 and d["version"] == 4 and small.key() != old.key()
    assert CompressionPlan.from_json(small.to_json()) == small
    assert "(batch 32, learning rate 0.005)" in small.describe()
    assert "batch" not in old.describe()
    args = build_parser().parse_args(["compress", "--model", "fashion-lenet", *small.cli_words()])
    assert plan_from_args(args) == small
    f = tmp_path / "plan.json"
    f.write_text(small.to_json())
    args = build_parser().parse_args(["compress", "--model", "fashion-lenet", "--plan", str(f),
                                      "--finetune-batch", "128"])
    back = plan_from_args(args)
    assert back == small.replace(finetune_batch=128) and "finetune_batch" not in back.to_dict()
    assert back.to_dict()["version"] == 3
    for bad, msg in ((0, "batch size must be an integer in 1..4096"), (5000, "1..4096"),
                     (32.0, "'finetune_batch' must be an integer"), (True, "'finetune_batch' must be an integer")):
        with pytest.raises(PlanError, match=msg):
            CompressionPlan.from_dict({**d, "finetune_batch": bad})
