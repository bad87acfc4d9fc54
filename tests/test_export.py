"""Exports people run elsewhere (dense safetensors, ONNX with onnxruntime) and the export / verify commands."""

from __future__ import annotations

import json
import pathlib
import zlib

import numpy as np
import pytest
import torch

from xaicomp_core import CompressionPlan, FormatError, load_model
from xaicomp_core.cli.main import main
from xaicomp_core.format.packing import MAGIC, PREAMBLE, read_header, unpack
from xaicomp_core.io.export import (
    dense_bytes,
    exact_logits,
    export_dense,
    export_packed,
    onnx_bytes,
    onnx_logits,
    packed_to_dense,
    verify_packed,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLAN = CompressionPlan(criterion="lrp", prune_ratio=0.5, bit_levels=[8, 4, 2], bit_split=[0.2, 0.5])
SMALL = ["--model", "fashion-lenet", "--reference-samples", "100", "--eval-samples", "300", "--threads", "2"]
PLAN_ARGS = ["--criterion", "lrp", "--prune", "0.5", "--bits", "8,4,2", "--split", "0.2,0.5"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------------
# dense safetensors and ONNX
# ----------------------------------------------------------------------------------------------------------------
def test_dense_safetensors_reload_gives_identical_logits(lenet_session, tmp_path):
    path = tmp_path / "dense.safetensors"
    n = export_dense(lenet_session, PLAN, path)
    assert n == path.stat().st_size and n > lenet_session.fp32_bytes()  # dense: no smaller than fp32
    model = load_model("fashion-lenet", weights=path)
    assert torch.equal(exact_logits(model, lenet_session.x_eval), lenet_session.compressed_logits(PLAN))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert CompressionPlan.from_json(meta["xaicomp_plan"]) == PLAN
    assert json.loads(meta["xaicomp_model"])["arch"] == "fashion-lenet"


def test_packed_to_dense_equals_direct_dense(lenet_session):
    pm = unpack(export_packed(lenet_session, PLAN, evaluate=False).data)
    from safetensors.torch import load

    a, b = load(packed_to_dense(pm)), load(dense_bytes(lenet_session, PLAN))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["fashion-lenet", "fashion-vgg", "fashion-resnet"])
def test_onnx_runtime_gives_the_same_predictions(name, fashion_ref, fashion_eval, lenet_session):
    from xaicomp_core import CompressionSession, load_builtin_model

    if name == "fashion-lenet":
        session = lenet_session
    else:
        session = CompressionSession(load_builtin_model(name), fashion_ref, fashion_eval.balanced_subset(200),
                                     reference_samples=50)
    plan = PLAN.replace(criterion="magnitude")  # no relevance needed: this is about the exported graph
    data = onnx_bytes(session.compressed_model(plan), session.info.preprocessing)
    import onnx

    onnx.checker.check_model(onnx.load_from_string(data))
    ort = onnx_logits(data, session.x_eval, batch_size=128)
    ref = session.compressed_logits(plan).numpy()
    assert np.array_equal(ort.argmax(1), ref.argmax(1))
    assert np.allclose(ort, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# verify_packed (API)
# ----------------------------------------------------------------------------------------------------------------
def test_verify_packed_api(lenet_session):
    res = export_packed(lenet_session, PLAN, codec="zlib")
    v = verify_packed(res.data, lenet_session.x_eval, lenet_session.y_eval)
    assert v.ok, v.problems
    assert v.payload_bytes == v.estimated_bytes == v.estimated_bytes_at_export == res.payload_bytes
    assert v.file_bytes == res.file_bytes and v.stored_payload_bytes < v.payload_bytes
    assert v.correct == v.expected_correct and v.accuracy == v.expected_accuracy
    assert v.data_matches and v.logits_match
    # other data: accuracy is measured, but not compared with the recorded one
    x, y = lenet_session.x_eval[:100], lenet_session.y_eval[:100]
    v2 = verify_packed(res.data, x, y)
    assert v2.ok and v2.data_matches is False and v2.images == 100


def test_verify_reports_a_wrong_recorded_accuracy(lenet_session):
    res = export_packed(lenet_session, PLAN)
    header, end = read_header(res.data)
    header["evaluation"]["correct"] += 1
    hb = json.dumps(header).encode()
    forged = PREAMBLE.pack(MAGIC, header["format_version"], len(hb), zlib.crc32(hb)) + hb + res.data[end:]
    v = verify_packed(forged, lenet_session.x_eval, lenet_session.y_eval)
    assert not v.ok and "correct" in v.problems[0]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_export_and_verify(tmp_path, capsys):
    out = tmp_path / "model.xcz"
    dense, onnx_path = tmp_path / "model.safetensors", tmp_path / "model.onnx"
    code, stdout, _ = run_cli(capsys, "export", *SMALL, *PLAN_ARGS, "-o", str(out), "--dense", str(dense),
                              "--onnx", str(onnx_path), "--json")
    assert code == 0
    e = json.loads(stdout)
    assert e["file_bytes"] == out.stat().st_size == e["payload_bytes"] + e["header_bytes"]
    assert e["payload_bytes"] == e["estimated_bytes"]
    assert e["dense_bytes"] == dense.stat().st_size and e["onnx_bytes"] == onnx_path.stat().st_size
    assert e["images"] == 300

    code, stdout, _ = run_cli(capsys, "verify", str(out), "--json")
    assert code == 0
    v = json.loads(stdout)
    for key in ("file_bytes", "estimated_bytes", "payload_bytes", "accuracy", "expected_accuracy", "header_bytes"):
        assert key in v
    assert v["ok"] and v["problems"] == []
    assert v["accuracy"] == v["expected_accuracy"] == e["accuracy"]
    assert v["correct"] == e["correct"] and v["images"] == 300
    assert v["payload_bytes"] == v["estimated_bytes"] == e["estimated_bytes"]
    assert v["file_bytes"] == e["file_bytes"] and v["logits_match"] and v["data_matches"]

    code, stdout, _ = run_cli(capsys, "verify", str(out))
    assert code == 0 and "OK" in stdout
    code, stdout, _ = run_cli(capsys, "verify", str(out), "--no-eval", "--json")
    assert code == 0 and json.loads(stdout)["accuracy"] is None


def test_cli_export_from_plan_file_with_codec(tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    plan = CompressionPlan(criterion="magnitude", prune_ratio=0.8, bit_levels=[4, 1], bit_split=[0.5],
                           granularity="channel", protect="first-last")
    plan_file.write_text(plan.to_json())
    out = tmp_path / "m.xcz"
    code, stdout, _ = run_cli(capsys, "export", *SMALL, "--plan", str(plan_file), "--codec", "lzma", "-o", str(out),
                              "--json")
    assert code == 0
    e = json.loads(stdout)
    assert e["codec"] == "lzma" and e["stored_payload_bytes"] < e["payload_bytes"] == e["estimated_bytes"]
    assert e["file_bytes"] == e["header_bytes"] + e["stored_payload_bytes"]
    assert CompressionPlan.from_dict(e["plan"]) == plan
    code, stdout, _ = run_cli(capsys, "verify", str(out), "--json")
    v = json.loads(stdout)
    assert code == 0 and v["ok"] and v["accuracy"] == v["expected_accuracy"]
    assert CompressionPlan.from_dict(v["plan"]) == plan


def test_cli_verify_rejects_damaged_files_in_one_line(tmp_path, capsys, lenet_session):
    good = export_packed(lenet_session, PLAN).data
    cases = {"truncated.xcz": good[:-10], "altered.xcz": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
             "notpacked.xcz": b"hello world, this is not a packed model"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        code, stdout, err = run_cli(capsys, "verify", str(path), "--json")
        assert code == 2, name
        assert err.startswith("xaicomp: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and stdout == ""
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "missing.xcz"))
    assert code == 2 and "does not exist" in err
    with pytest.raises(FormatError, match="checksum"):
        unpack(cases["altered.xcz"])


# ----------------------------------------------------------------------------------------------------------------
# the Export page of the app
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.session_state["sb_builtin"] = "fashion-lenet"
    at.session_state["sb_ref_samples"] = 100
    at.session_state["sb_eval_samples"] = 300
    at.run()
    at.switch_page("pages/export.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    metrics = {m.label: m.value for m in at.metric}
    assert set(metrics) >= {"Estimated", "Packed payload", "File on disk", "Original fp32"}
    assert metrics["Estimated"] == metrics["Packed payload"]
    labels = [d.proto.label for d in at.get("download_button")]
    assert labels[:3] == ["Packed model (.xcz)", "Dense weights (.safetensors)", "Plan (.json)"]

    at.button(key="ex_verify").click().run()
    assert not at.exception
    assert at.success and "the same as the session to the last image" in at.success[0].value

    at.radio(key="ex_codec").set_value("zlib").run()
    assert any("With zlib the payload is stored in" in c.value for c in at.caption)
    at.button(key="ex_build_report").click().run()
    assert not at.exception and not at.error
    labels = [d.proto.label for d in at.get("download_button")]
    assert "HTML report" in labels
    assert any("xaicomp verify" in c.value for c in at.code)
