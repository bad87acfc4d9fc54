"""The xaicomp command line: JSON outputs, plans from files, one-line errors."""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import subprocess
import sys

import pytest

from xaicomp_core import CompressionPlan
from xaicomp_core.cli import main

FAST = ["--model", "fashion-lenet", "--reference-samples", "200", "--eval-samples", "500", "--threads", "2"]


def run_json(capsys, *args: str) -> dict:
    rc = main(list(args))
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_info_lists_models_with_accuracy(capsys):
    d = run_json(capsys, "info", "--json")
    names = [m["name"] for m in d["models"]]
    assert names == ["fashion-vgg", "fashion-lenet", "fashion-resnet"]
    for m in d["models"]:
        assert m["test_accuracy"] >= m["target_accuracy"]
        assert 0 < m["eval_accuracy"] <= 1 and m["parameters"] > 0
    assert d["datasets"][0]["name"] == "fashion-mnist"
    assert set(d["datasets"][0]["splits"]) == {"eval", "reference", "train"}


def test_compress_without_compression_is_the_baseline(capsys):
    d = run_json(capsys, "compress", *FAST, "--prune", "0", "--bits", "32", "--json")
    assert d["accuracy"] == d["baseline_accuracy"]
    assert d["sparsity"] == 0 and d["compression_ratio"] == 1.0
    assert d["size"]["fp32_bytes"] == d["size"]["estimated_bytes"]


def test_compress_half_and_mixed_precision(capsys):
    d = run_json(capsys, "compress", *FAST, "--criterion", "lrp", "--prune", "0.5", "--bits", "8,4,2",
                 "--split", "0.2,0.5", "--json")
    assert d["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert d["compression_ratio"] > 5
    assert d["size"]["estimated_bytes"] < d["size"]["fp32_bytes"]
    for key in ("accuracy", "baseline_accuracy", "sparsity", "compression_ratio"):
        assert isinstance(d[key], float)


def test_plan_file_round_trip(capsys, tmp_path):
    plan_path = tmp_path / "plan.json"
    d1 = run_json(capsys, "compress", *FAST, "--criterion", "magnitude", "--prune", "0.3", "--bits", "4",
                  "--granularity", "channel", "--save-plan", str(plan_path), "--json")
    assert CompressionPlan.from_json(plan_path.read_text()).criterion == "magnitude"
    d2 = run_json(capsys, "compress", *FAST, "--plan", str(plan_path), "--json")
    assert d1["accuracy"] == d2["accuracy"] and d1["size"] == d2["size"]


@pytest.mark.parametrize("args,needle", [
    (["--prune", "1.5"], "prune ratio must be in [0, 1)"),
    (["--bits", "9"], "bit widths must be 1-8"),
    (["--bits", "2,4", "--split", "0.5"], "descending"),
    (["--criterion", "astrology"], "unknown criterion"),
    (["--plan", "/nonexistent/plan.json"], "does not exist"),
])
def test_bad_plans_exit_2_with_one_line(capsys, args, needle):
    rc = main(["compress", *FAST, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_future_plan_version(capsys, tmp_path):
    p = tmp_path / "future.json"
    d = CompressionPlan().to_dict()
    d["version"] = 7
    p.write_text(json.dumps(d))
    assert main(["compress", *FAST, "--plan", str(p)]) == 2
    assert "newer" in capsys.readouterr().err


def test_sweep_writes_csv_with_pareto(capsys, tmp_path):
    out = tmp_path / "sweep.csv"
    rc = main(["sweep", *FAST, "--criteria", "lrp,magnitude,paper", "--ratios", "0,0.5,0.8",
               "--bit-settings", "fp32", "4", "-o", str(out)])
    assert rc == 0
    lines = out.read_text().strip().splitlines()
    assert lines[0].startswith("criterion,prune_ratio,bits")
    assert len(lines) == 1 + 2 * 3 * 2 + 2  # paper has no ratio
    assert "True" in out.read_text()


def test_subprocess_error_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "xaicomp_core", "compress", "--model", "no-such-model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "xaicomp: error: unknown architecture 'no-such-model'; choose one of fashion-vgg, fashion-lenet, "
        "fashion-resnet, alexnet, vgg11_bn, vgg16, resnet18, resnet50, mobilenet_v2 or another torchvision model"]


CLI_DIR = pathlib.Path(__file__).resolve().parent.parent / "xaicomp_core" / "cli"


def _cli_imports(name: str) -> set[str]:
    """The sibling modules of the cli package that ``cli/<name>.py`` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse((CLI_DIR / f"{name}.py").read_text())):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            if isinstance(node, ast.ImportFrom) and node.module else [])
        for m in mods:
            parts = m.split(".")
            if parts[:2] == ["xaicomp_core", "cli"] and len(parts) > 2 and parts[2] != name:
                out.add(parts[2])
    return out


def test_cli_is_a_package_without_cycles_that_registers_every_command():
    from xaicomp_core.cli import main as package_main
    from xaicomp_core.cli.main import CLI_COMMANDS, build_parser
    from xaicomp_core.cli.main import main as module_main

    assert package_main is module_main  # the console script xaicomp_core.cli:main
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == CLI_COMMANDS
    assert _cli_imports("common") == set()
    assert _cli_imports("commands") == _cli_imports("export_cmds") == _cli_imports("auto_cmd") == {"common"}
    assert _cli_imports("main") == {"commands", "export_cmds", "auto_cmd"}
    handlers = [n for n in ast.walk(ast.parse((CLI_DIR / "main.py").read_text())) if isinstance(n, ast.ExceptHandler)]
    assert not any("ImportError" in ast.unparse(h.type) for h in handlers if h.type is not None)


def test_every_command_prints_its_help(capsys):
    """``xaicomp CMD --help`` works for every command (argparse formats help strings with %: a literal percent sign
    in one, e.g. "60% of", made every command's help crash)."""
    from xaicomp_core.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"compress", "sweep", "auto", "export", "verify"} <= set(commands)
    for name in commands:
        assert main([name, "--help"]) == 0, name
        assert "usage: xaicomp " + name in capsys.readouterr().out
