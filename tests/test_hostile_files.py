"""Outputs are written atomically and never alias inputs; inputs are read only from regular files, bounded.

Every file these tests use is crafted here, in tmp folders. Failing writes are real: a full tmpfs (in a private mount
namespace via ``unshare``), a file-size limit (RLIMIT_FSIZE), SIGKILL of a writing process, concurrent writers.
"""

from __future__ import annotations

import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from xaicomp_core.errors import XaicompError
from xaicomp_core.io.atomic import OutputError, OutputGroup, atomic_write, check_output, check_outputs
from xaicomp_core.io.safe import read_regular

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".xaicomp-tmp"))


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                        "mount -t tmpfs -o size=64k tmpfs \"$TMPDIR\""], capture_output=True, timeout=30,
                       env={**os.environ, "TMPDIR": "/tmp"})
    return r.returncode == 0


NAMESPACES = _can_unshare()


def _in_namespace(mount_opts: str, folder: pathlib.Path, code: str) -> subprocess.CompletedProcess:
    """Run python ``code`` with a fresh tmpfs (``mount_opts``) mounted on ``folder`` in a private mount namespace."""
    script = f"mount -t tmpfs -o {mount_opts} tmpfs {folder} && exec {PY} -c \"$CODE\""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CODE": textwrap.dedent(code), "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_file_and_keeps_mode(tmp_path):
    target = tmp_path / "out.bin"
    assert atomic_write(target, b"first") == 5
    os.chmod(target, 0o640)
    atomic_write(target, [b"sec", b"ond"])
    assert target.read_bytes() == b"second"
    assert (target.stat().st_mode & 0o777) == 0o640
    atomic_write(tmp_path / "t.txt", "größe")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "größe"
    assert _leftovers(tmp_path) == []


def test_failing_producer_leaves_existing_file_untouched(tmp_path):
    target = tmp_path / "good.xcz"
    target.write_bytes(b"GOOD" * 1000)

    def chunks():
        yield b"partial" * 1000
        raise RuntimeError("the exporter failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        atomic_write(target, chunks())
    assert target.read_bytes() == b"GOOD" * 1000
    assert _leftovers(tmp_path) == []


def test_sigkill_mid_write_leaves_existing_file_intact(tmp_path):
    target = tmp_path / "model.xcz"
    target.write_bytes(b"ORIGINAL" * 4096)
    code = textwrap.dedent(f"""
        import sys, time
        from xaicomp_core.io.atomic import atomic_write
        def chunks():
            yield b"X" * 1_000_000
            print("writing", flush=True)
            time.sleep(60)
            yield b"never"
        atomic_write({str(target)!r}, chunks())
    """)
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "writing"
        # the temporary file is being written right now
        assert any(p.name.startswith(".model.xcz.") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"ORIGINAL" * 4096


def test_write_failing_at_a_file_size_limit_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.xcz"
    target.write_bytes(b"old contents")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from xaicomp_core.io.atomic import OutputError, atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            atomic_write({str(target)!r}, b"N" * 1_000_000, "-o")
        except OutputError as e:
            print(e)
            sys.exit(3)
    """)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2))
    assert r.returncode == 3, r.stderr
    assert "cannot write -o" in r.stdout and "unchanged" in r.stdout
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not NAMESPACES, reason="needs unshare with mount namespaces to make a real full disk")
def test_full_disk_keeps_the_old_file(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    r = _in_namespace("size=256k", folder, f"""
        import os, sys
        from xaicomp_core.io.atomic import OutputError, atomic_write
        target = {str(folder / "m.xcz")!r}
        atomic_write(target, b"G" * 100_000)
        try:
            atomic_write(target, b"N" * 400_000)
        except OutputError as e:
            print(e)
        else:
            sys.exit("no error on a full disk")
        assert open(target, "rb").read() == b"G" * 100_000, "damaged"
        assert [n for n in os.listdir({str(folder)!r}) if n != "m.xcz"] == [], os.listdir({str(folder)!r})
        print("intact")
    """)
    assert r.returncode == 0, r.stderr
    assert "No space left on device" in r.stdout and "intact" in r.stdout


@pytest.mark.skipif(not NAMESPACES, reason="needs unshare with mount namespaces to make a read-only folder")
def test_read_only_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    r = _in_namespace("ro,size=64k", folder, f"""
        from xaicomp_core.io.atomic import OutputError, check_output
        try:
            check_output({str(folder / "m.xcz")!r}, "-o")
        except OutputError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert "is not writable" in r.stdout and "Read-only file system" in r.stdout


def test_concurrent_writers_never_interleave(tmp_path):
    target = tmp_path / "shared.xcz"
    size = 1_000_000
    code = textwrap.dedent(f"""
        import sys
        from xaicomp_core.io.atomic import atomic_write
        b = sys.argv[1].encode()
        for _ in range(8):
            atomic_write({str(target)!r}, [b * ({size} // 2), b * ({size} // 2)])
    """)
    seen: set[bytes] = set()
    bad: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                continue
            if len(data) != size or len(set(data)) != 1:
                bad.append(f"{len(data)} bytes, {len(set(data))} distinct")
            seen.add(data[:1])

    t = threading.Thread(target=watch)
    t.start()
    procs = [subprocess.Popen([PY, "-c", code, ch], cwd=ROOT) for ch in "ABC"]
    try:
        assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:3]
    final = target.read_bytes()
    assert len(final) == size and len(set(final)) == 1
    assert _leftovers(tmp_path) == []


def test_group_lands_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "m.xcz", tmp_path / "m.onnx"
    a.write_bytes(b"old packed")

    def failing_onnx():
        yield b"onnx..."
        raise XaicompError("this architecture cannot be exported to ONNX")

    g = OutputGroup()
    g.add(a, b"new packed", "-o")
    g.add(b, failing_onnx(), "--onnx")
    with pytest.raises(XaicompError, match="ONNX"):
        g.commit()
    assert a.read_bytes() == b"old packed" and not b.exists()
    assert _leftovers(tmp_path) == []
    g = OutputGroup()
    g.add(a, b"new packed", "-o")
    g.add(b, b"onnx", "--onnx")
    assert g.commit() == {"-o": 10, "--onnx": 4}
    assert a.read_bytes() == b"new packed" and b.read_bytes() == b"onnx"


def test_group_restores_replaced_targets_when_a_rename_fails(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"old a")
    sub = tmp_path / "sub"
    sub.mkdir()
    b = sub / "b.bin"
    g = OutputGroup()
    g.add(a, b"new a", "first")
    g.add(b, b"new b", "second")
    # the second folder disappears after validation and before the rename: a real failing rename
    staged_write = OutputGroup._rename_all

    def rename_after_removing(staged):
        for _, _, target, tmp in staged:
            if target.parent == sub.resolve():
                os.unlink(tmp)
        return staged_write(staged)

    g._rename_all = rename_after_removing  # type: ignore[method-assign]
    with pytest.raises(OutputError, match="cannot write second"):
        g.commit()
    assert a.read_bytes() == b"old a" and not b.exists()
    assert _leftovers(tmp_path) == [] and _leftovers(sub) == []


def test_output_paths_are_validated(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output(tmp_path / "adir", "-o")
    with pytest.raises(OutputError, match="folder .* does not exist"):
        check_output(tmp_path / "missing" / "m.xcz", "-o")
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(tmp_path / "afile" / "m.xcz", "-o")
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/full", "-o")
    with pytest.raises(OutputError, match="not a file name"):
        check_output("", "-o")
    with pytest.raises(OutputError, match="not a file name"):
        check_output(f"{tmp_path}/", "-o")
    assert check_output(tmp_path / "new.xcz") == (tmp_path / "new.xcz").resolve()
    assert _leftovers(tmp_path) == []


def test_outputs_never_alias_inputs(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(w)
    os.link(w, tmp_path / "hard.safetensors")
    inputs = {"--weights": str(w), "--plan": None}
    for alias in (w, tmp_path / "sub" / ".." / "w.safetensors", tmp_path / "link.safetensors",
                  tmp_path / "hard.safetensors"):
        with pytest.raises(OutputError, match="is the input --weights"):
            check_outputs({"-o": alias}, inputs)
    with pytest.raises(OutputError, match="--dense and -o name the same file"):
        check_outputs({"-o": tmp_path / "m.xcz", "--dense": tmp_path / "sub" / ".." / "m.xcz"})
    assert w.read_bytes() == b"weights"
    ok = check_outputs({"-o": tmp_path / "m.xcz", "--dense": None}, inputs)
    assert list(ok) == ["-o"]


def test_writing_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    atomic_write(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


# ----------------------------------------------------------------------------------------------------------------
# reading only regular files
# ----------------------------------------------------------------------------------------------------------------
def test_read_regular_refuses_fifos_devices_and_directories(tmp_path):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    cases = [(fifo, "FIFO"), ("/dev/zero", "character device"), (tmp_path / "zero.pt", "character device"),
             (tmp_path, "a directory"), (tmp_path / "nope", "does not exist")]
    for path, needle in cases:
        with pytest.raises(XaicompError, match=needle) as e:
            read_regular(path, 1000, "weights file")
        assert "\n" not in str(e.value)
    (tmp_path / "big").write_bytes(b"x" * 2000)
    with pytest.raises(XaicompError, match="over the 1000 bytes limit"):
        read_regular(tmp_path / "big", 1000)
    assert read_regular(tmp_path / "big", 2000) == b"x" * 2000


def test_fifo_never_blocks_even_with_a_writer_waiting(tmp_path):
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    result: list[BaseException | bytes] = []
    t = threading.Thread(target=lambda: result.append(_catch(lambda: read_regular(fifo, 100, "plan file"))))
    t.start()
    t.join(timeout=30)
    alive = t.is_alive()
    if alive:  # unblock it before failing
        with open(fifo, "wb") as f:
            f.write(b"{}")
        t.join()
    assert not alive and isinstance(result[0], XaicompError) and "FIFO" in str(result[0])


def _catch(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001
        return e
