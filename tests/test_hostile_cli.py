"""Hostile input through the ``xaicomp`` command line: outputs never destroy good files or alias inputs, output
paths are checked before any work, ``verify`` trusts nothing in a file's header, unreadable inputs and unusable
outputs give one ``xaicomp: error:`` line with status 2, and a bug is a traceback with a bug-report hint.

Every file is crafted here; failing writes are real (RLIMIT_FSIZE, a full tmpfs in a private mount namespace,
SIGKILL, concurrent processes)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest

from xaicomp_core.cli.main import main
from xaicomp_core.errors import FormatError
from xaicomp_core.format.packing import PREAMBLE, PREAMBLE_BYTES, unpack
from xaicomp_core.io.export import verify_packed

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAST = ["--model", "fashion-lenet", "--reference-samples", "100", "--eval-samples", "200", "--threads", "2"]
PLAN = ["--criterion", "magnitude", "--prune", "0.5", "--bits", "4"]


def _error_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.err[-2000:])
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("xaicomp: error: ") and "Traceback" not in cap.err
    return lines[0]


def _cli(*args: str, preexec=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xaicomp_core", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, preexec_fn=preexec)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> pathlib.Path:
    """A real packed file, exported by the CLI, with the built-in data it was evaluated on recorded."""
    path = tmp_path_factory.mktemp("packed") / "m.xcz"
    assert main(["export", *FAST, *PLAN, "-o", str(path), "--json"]) == 0
    return path


def rewrite_header(data: bytes, change=None, raw: bytes | None = None) -> bytes:
    """The packed file with its JSON header changed (by ``change(header)``, or replaced by ``raw``), the preamble's
    length and CRC made to match: a crafted file that passes the checksum."""
    _, version, hlen, _ = PREAMBLE.unpack_from(data)
    if raw is None:
        header = json.loads(data[PREAMBLE_BYTES:PREAMBLE_BYTES + hlen])
        change(header)
        raw = json.dumps(header).encode()
    return PREAMBLE.pack(b"\x89XCZ\r\n\x1a\n", version, len(raw), zlib.crc32(raw)) + raw + \
        data[PREAMBLE_BYTES + hlen:]


# ----------------------------------------------------------------------------------------------------------------
# outputs: checked before any work, never aliasing inputs
# ----------------------------------------------------------------------------------------------------------------
def test_output_equal_to_an_input_is_refused_before_work(capsys, tmp_path):
    from safetensors.torch import save_file

    from xaicomp_core import load_builtin_model

    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in load_builtin_model("fashion-lenet").state_dict().items()}, str(w))
    plan = tmp_path / "plan.json"
    assert main(["compress", *FAST, *PLAN, "--save-plan", str(plan), "--json"]) == 0
    capsys.readouterr()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.xcz").symlink_to(w)
    before = {p: p.read_bytes() for p in (w, plan)}
    base = ["export", "--arch", "fashion-lenet", "--weights", str(w), "--reference-samples", "100",
            "--eval-samples", "200", "--plan", str(plan)]
    for opt, target, needle in [
        ("-o", w, "-o .* is the input --weights"),
        ("-o", tmp_path / "sub" / ".." / "w.safetensors", "is the input --weights"),
        ("-o", tmp_path / "link.xcz", "is the input --weights"),
        ("--dense", plan, "--dense .* is the input --plan"),
        ("--onnx", tmp_path / "sub" / ".." / "plan.json", "--onnx .* is the input --plan"),
        ("--save-plan", plan, "--save-plan .* is the input --plan"),
    ]:
        argv = base + (["-o", str(tmp_path / "ok.xcz")] if opt != "-o" else []) + [opt, str(target)]
        err = _error_line(capsys, argv)
        assert re.search(needle, err), err
    err = _error_line(capsys, base + ["-o", str(tmp_path / "a.xcz"), "--dense", str(tmp_path / "a.xcz")])
    assert "name the same file" in err
    assert {p: p.read_bytes() for p in (w, plan)} == before
    assert not (tmp_path / "ok.xcz").exists()


@pytest.mark.parametrize("command", ["export", "report", "sweep", "compress"])
def test_unusable_output_paths_fail_before_any_work(capsys, tmp_path, command):
    (tmp_path / "adir").mkdir()
    opt = "--save-plan" if command == "compress" else "-o"
    for target, needle in [(tmp_path / "adir", "is a directory"),
                           (tmp_path / "missing" / "out", "folder .* does not exist"),
                           ("/dev/full", "not a regular file")]:
        argv = [command, *FAST, opt, str(target)]
        rc = main(argv)
        cap = capsys.readouterr()
        assert rc == 2 and len(cap.err.strip().splitlines()) == 1, cap.err
        assert "relevance" not in cap.err  # refused before the first computation
        assert re.search(needle, cap.err), cap.err


def test_plan_files_that_are_not_plans(capsys, tmp_path):
    cases = {"binary.json": b"\x00\x89PNG\xff\xfe\x00" * 10, "utf16.json": '{"criterion": "lrp"}'.encode("utf-16"),
             "deep.json": b"[" * 100000 + b"]" * 100000, "nan.json": b'{"prune_ratio": NaN}'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    for name, needle in [("binary.json", "not UTF-8"), ("utf16.json", "UTF-16"), ("deep.json", ""),
                         ("nan.json", ""), ("fifo.json", "FIFO"), ("zero.json", "character device"),
                         (".", "a directory")]:
        err = _error_line(capsys, ["compress", *FAST, "--plan", str(tmp_path / name)])
        assert needle in err, err


def test_weights_and_data_that_are_not_regular_files(capsys, tmp_path):
    os.mkfifo(tmp_path / "w.pt")
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    err = _error_line(capsys, ["compress", "--arch", "fashion-lenet", "--weights", str(tmp_path / "w.pt")])
    assert "is a FIFO" in err
    err = _error_line(capsys, ["compress", "--arch", "fashion-lenet", "--weights",
                               str(tmp_path / "zero.safetensors")])
    assert "character device" in err
    (tmp_path / "d.zip").symlink_to("/dev/zero")
    assert "character device" in _error_line(capsys, ["compress", *FAST, "--data", str(tmp_path / "d.zip")])


def test_bad_numbers_in_options_are_one_line(capsys):
    for argv, needle in [(["compress", *FAST, "--threads", "0"], "--threads: must be at least 1"),
                         (["compress", *FAST, "--epsilon", "nan"], "--epsilon: must be a finite number"),
                         (["report", *FAST, "--heatmaps", "-3"], "--heatmaps: must be at least 0"),
                         (["bench", "--repeats", "x"], "--repeats: 'x' is not an integer")]:
        assert needle in _error_line(capsys, argv)


def test_a_bug_is_a_traceback_with_a_report_hint(capsys, monkeypatch):
    from xaicomp_core.cli import commands

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(commands, "cmd_info", broken)
    rc = main(["info"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("xaicomp: internal error: this is a bug in xaicomp")


# ----------------------------------------------------------------------------------------------------------------
# outputs are atomic
# ----------------------------------------------------------------------------------------------------------------
def test_failing_onnx_leaves_no_new_packed_file(tmp_path, packed):
    out, onnx = tmp_path / "m.xcz", tmp_path / "m.onnx"
    out.write_bytes(packed.read_bytes())
    good = out.read_bytes()
    assert len(good) < 150_000

    def limit():  # a real write failure: files may not grow past 150 kB (the ONNX file is ~250 kB)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    r = _cli("export", *FAST, *PLAN[:2], "--prune", "0.3", "--bits", "4", "-o", str(out), "--onnx", str(onnx),
             preexec=limit)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("xaicomp: error: cannot write --onnx")
    assert out.read_bytes() == good and not onnx.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.xcz"]


def test_sigkill_during_export_never_leaves_a_damaged_file(tmp_path, packed):
    out = tmp_path / "m.xcz"
    out.write_bytes(packed.read_bytes())
    good = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "xaicomp_core", "export", *FAST, "--criterion", "lrp",
                             "--prune", "0.7", "-o", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.readline()  # "relevance: 100/100": done; the path check's probe file is long gone
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".m.xcz.") for p in tmp_path.iterdir()):
                proc.send_signal(signal.SIGKILL)  # the temporary file exists: the write is under way
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    data = out.read_bytes()
    assert data == good or unpack(data).plan.prune_ratio == 0.7  # the old file, or the whole new one


def test_concurrent_exports_leave_one_whole_file(tmp_path):
    out = tmp_path / "m.xcz"
    procs = [subprocess.Popen([sys.executable, "-m", "xaicomp_core", "export", *FAST, "--criterion", "magnitude",
                               "--prune", ratio, "-o", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for ratio in ("0.2", "0.6")]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1000:] for _, e in results]
    assert unpack(out.read_bytes()).plan.prune_ratio in (0.2, 0.6)
    assert [p.name for p in tmp_path.iterdir()] == ["m.xcz"]


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare for a real full disk")
def test_export_to_a_full_disk_keeps_the_old_file(tmp_path, packed):
    folder = tmp_path / "tiny"
    folder.mkdir()
    code = (f"import shutil; shutil.copy({str(packed)!r}, {str(folder / 'm.xcz')!r}); "
            "from xaicomp_core.cli.main import main; import sys; "
            f"rc = main(['export', *{FAST!r}, '--prune', '0.1', '--bits', '32', '-o', {str(folder / 'm.xcz')!r}]); "
            f"assert open({str(folder / 'm.xcz')!r}, 'rb').read() == open({str(packed)!r}, 'rb').read(); "
            "sys.exit(rc)")
    size = packed.stat().st_size + 40_000  # room for the old file, not for the fp32 one
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {folder} || exit 77; "
                        f"exec {sys.executable} -c \"$CODE\""], capture_output=True, text=True, timeout=900,
                       cwd=ROOT, env={**os.environ, "CODE": code})
    if r.returncode == 77:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "No space left on device" in r.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------------------
# verify trusts nothing in the header
# ----------------------------------------------------------------------------------------------------------------
def test_verify_never_opens_a_path_named_in_the_header(capsys, tmp_path, packed):
    fifo = tmp_path / "data.zip"
    os.mkfifo(fifo)  # opening it for reading would block; read_regular would refuse it
    for target in (str(fifo), "/dev/zero", f"torchvision:fashion-mnist:{tmp_path}"):
        def point(h, target=target):
            h["evaluation"]["data_spec"] = {"data": target, "eval_samples": 200}

        crafted = tmp_path / "crafted.xcz"
        crafted.write_bytes(rewrite_header(packed.read_bytes(), point))
        rc = main(["verify", str(crafted), "--json"])
        d = json.loads(capsys.readouterr().out)
        assert rc == 0 and d["accuracy"] is None
        assert "never opens" in d["note"]
    # the built-in data named in a file is used, and the user's --data always
    assert main(["verify", str(packed), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] and d["data_matches"] and d["logits_match"]
    assert "character device" in _error_line(capsys, ["verify", str(packed), "--data", "/dev/zero"])


def _crafted_variants(data: bytes) -> list[tuple[str, bytes, str]]:
    """(what, file, expected message) for header-driven allocations and loose typing."""
    import hashlib

    def with_(fn):
        return rewrite_header(data, fn)

    def zlib_bomb(h):
        stored = zlib.compress(b"\0" * 2**21, 9)
        h["payload"].update(codec="zlib", bytes=2**31, stored_bytes=len(stored),
                            stored_sha256=hashlib.sha256(stored).hexdigest())
        return stored

    _, _, hlen, _ = PREAMBLE.unpack_from(data)
    header = json.loads(data[PREAMBLE_BYTES:PREAMBLE_BYTES + hlen])
    stored = zlib_bomb(header)
    hb = json.dumps(header).encode()
    bomb = PREAMBLE.pack(b"\x89XCZ\r\n\x1a\n", header["format_version"], len(hb), zlib.crc32(hb)) + hb + stored
    deep = data[PREAMBLE_BYTES:PREAMBLE_BYTES + hlen - 1] + b',"deep":' + b"[" * 100000 + b"]" * 100000 + b"}"
    return [
        ("zlib bomb", bomb, "refused before decompressing"),
        ("16 GiB entry", with_(lambda h: h["tensors"].append({"name": "big", "shape": [2**31], "kind": "omitted",
                                                               "dtype": "int64"})), "more than a packed tensor"),
        ("omitted elements", with_(lambda h: h["tensors"].append({"name": "big", "shape": [2**20], "kind": "omitted",
                                                                   "dtype": "int64"})), "omitted integer elements"),
        ("wrong shapes", with_(lambda h: h["tensors"][0].update(shape=[4000, 1, 5, 5])), "do not fit the architecture"),
        ("input size", with_(lambda h: h["model"]["preprocessing"].update(input_size=[100000, 100000])),
         "input_size 100000x100000 is out of range"),
        ("class names", with_(lambda h: h["model"].update(class_names=["c"] * 2_000_000, num_classes=2_000_000)),
         "names 2000000 classes"),
        ("long name", with_(lambda h: h["model"].update(name="x" * 100_000)), "invalid model name"),
        ("deep nesting", rewrite_header(data, raw=deep), "nested too deeply"),
        ("NaN", rewrite_header(data, raw=data[PREAMBLE_BYTES:PREAMBLE_BYTES + hlen].replace(
            b'"estimated_bytes":', b'"estimated_bytes":NaN,"x":', 1)), "not a number a packed file may hold"),
        ("true as int", with_(lambda h: h["payload"].update(bytes=True)), "wrong type"),
        ("string as int", with_(lambda h: h.update(estimated_bytes="123")), "wrong type"),
        ("batch size", with_(lambda h: h["evaluation"].update(batch_size=0)), "batch size is out of range"),
        ("list as plan", with_(lambda h: h.update(plan=[1, 2])), ""),
        ("too many tensors", with_(lambda h: h["tensors"].extend([{"name": f"t{i}", "shape": [0], "kind": "raw"}
                                                                  for i in range(20000)])), "tensors, more than"),
    ]


def test_verify_bounds_every_allocation_by_limits_and_file_size(capsys, tmp_path, packed):
    data = packed.read_bytes()
    for what, crafted, needle in _crafted_variants(data):
        with pytest.raises(FormatError, match=needle or ".") as e:
            verify_packed(crafted)
        assert "\n" not in str(e.value), what
    # and through the command line: one line, status 2
    for what, crafted, needle in _crafted_variants(data)[:8]:
        (tmp_path / "c.xcz").write_bytes(crafted)
        assert needle in _error_line(capsys, ["verify", str(tmp_path / "c.xcz")]), what


def test_verify_refuses_non_regular_packed_files(capsys, tmp_path):
    os.mkfifo(tmp_path / "p.xcz")
    assert "FIFO" in _error_line(capsys, ["verify", str(tmp_path / "p.xcz")])
    assert "a directory" in _error_line(capsys, ["verify", str(tmp_path)])
    assert "character device" in _error_line(capsys, ["verify", "/dev/zero"])
