"""Atomic output files: an existing file is never left damaged, and concurrent writers never interleave.

Every file xaicomp writes goes through :func:`atomic_write` (one file) or :class:`OutputGroup` (all the files of one
command): the bytes go to a new temporary file in the target's own folder (``.<name>.<random>.xaicomp-tmp``), are
flushed and ``fsync``-ed, and only then renamed over the target (``os.replace``, atomic on POSIX), after which the
folder is ``fsync``-ed too. So

* a write that fails (a full disk, a size limit, an exception while producing the bytes, SIGKILL) leaves the target
  exactly as it was -- at most an orphaned temporary file remains, never a truncated target;
* two processes writing the same path at once never mix their bytes: each rename installs one whole file, and
  **the last rename wins** (no lock is taken; both writers succeed);
* an :class:`OutputGroup` writes every temporary file first and renames only when all of them are complete, so a
  failure while producing or writing any output (``--dense``, ``--onnx``) leaves none of the new files behind and
  every previous output intact. If a rename itself fails midway, the targets already replaced are restored from
  hard links taken just before.

:func:`check_outputs` validates output paths *before* any computation: the folder exists and is a writable
directory (tested by creating a temporary file there), the target is not a directory or any other non-regular file,
and no output names the same file as an input or as another output -- compared by resolved path (symlinks and
``..`` followed) and by :func:`os.path.samefile` (hard links).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import stat
from collections.abc import Iterable, Mapping

from xaicomp_core.errors import XaicompError

PathLike = str | os.PathLike
Data = bytes | bytearray | memoryview | str | Iterable[bytes]
TMP_SUFFIX = ".xaicomp-tmp"


class OutputError(XaicompError):
    """An output path is unusable (missing or read-only folder, a directory, an input file) or could not be
    written (full disk, I/O error)."""


def _reason(e: OSError) -> str:
    return e.strerror or e.__class__.__name__


def _show(path: PathLike) -> str:
    """A path for a one-line message (control characters escaped)."""
    s = os.fspath(path)
    return s if s.isprintable() else ascii(s)


def _resolved(path: PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(os.fspath(path)))


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: PathLike, what: str = "output") -> pathlib.Path:
    """Validate one output path before any work is done; return its resolved form (symlinks followed).

    Raises
    ------
    OutputError
        If ``path`` is empty, names a directory, a FIFO, a device or another non-regular file, or lies in a folder
        that does not exist, is not a folder or cannot be written.
    """
    raw = os.fspath(path)
    if not raw or raw.endswith(("/", os.sep)):
        raise OutputError(f"{what} {_show(raw) or '(empty)'} is not a file name")
    target = _resolved(raw)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise OutputError(f"cannot use {what} {_show(raw)}: {_reason(e)}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {_show(raw)} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {_show(raw)} is not a regular file (a device, FIFO or socket); refusing to "
                              "replace it")
    folder = target.parent
    if not folder.exists():
        raise OutputError(f"cannot write {what} {_show(raw)}: the folder {_show(folder)} does not exist")
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {_show(raw)}: {_show(folder)} is not a folder")
    try:  # the real test (permissions, read-only mounts, quotas on inodes): create and remove a temporary file
        fd, tmp = _mkstemp(folder, target.name)
    except OSError as e:
        raise OutputError(f"cannot write {what} {_show(raw)}: the folder {_show(folder)} is not writable "
                          f"({_reason(e)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return target


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None] | None = None
                  ) -> dict[str, pathlib.Path]:
    """Validate the outputs of one command (label -> path; None entries are skipped) before any computation.

    Each output is checked with :func:`check_output`; no two outputs may be the same file, and no output may be an
    input (label -> path, e.g. ``{"--weights": ..., "--plan": ...}``; a missing input cannot clash).

    Returns
    -------
    dict
        Label -> resolved output path.

    Raises
    ------
    OutputError
    """
    checked: dict[str, pathlib.Path] = {}
    for label, path in outputs.items():
        if path is None or os.fspath(path) == "":
            continue
        target = check_output(path, label)
        for other, done in checked.items():
            if _same_file(target, done):
                raise OutputError(f"{label} and {other} name the same file ({_show(path)}); give different files")
        for in_label, in_path in (inputs or {}).items():
            if in_path is None or isinstance(in_path, (bytes, bytearray)) or os.fspath(in_path) == "":
                continue
            if _same_file(target, _resolved(in_path)):
                raise OutputError(f"{label} {_show(path)} is the input {in_label}; refusing to overwrite an input "
                                  "file")
        checked[label] = target
    return checked


def _mkstemp(folder: pathlib.Path, name: str) -> tuple[int, str]:
    """Create ``folder/.<name>.<random>.xaicomp-tmp`` exclusively (mode 0600); return its fd and path."""
    base = name[:120]
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"no free temporary name in {folder}")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chunks(data: Data) -> Iterable[bytes]:
    if isinstance(data, str):
        yield data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data) if isinstance(data, memoryview) else data  # type: ignore[misc]
    else:
        yield from data


def _write_all(fd: int, data: Data) -> int:
    total = 0
    for chunk in _chunks(data):
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            total += n
            view = view[n:]
    os.fsync(fd)
    return total


def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputGroup:
    """The output files of one command, written together: all of them land, or none.

    Add each output with :meth:`add` (bytes, text or an iterable of byte chunks), then :meth:`commit`. Nothing is
    visible at the targets until every temporary file is completely written; a failure removes all temporary files
    and raises :class:`OutputError`, leaving every target as it was.

    Parameters
    ----------
    inputs : mapping, optional
        Input files (label -> path) no output may overwrite (checked again at :meth:`add`).
    """

    def __init__(self, inputs: Mapping[str, PathLike | None] | None = None) -> None:
        self.inputs = dict(inputs or {})
        self._items: list[tuple[str, PathLike, Data]] = []

    def add(self, path: PathLike, data: Data, what: str = "output") -> None:
        """Queue ``data`` for ``path`` (validated now, see :func:`check_outputs`)."""
        target = check_outputs({what: path}, self.inputs)[what]
        for other, p, _ in self._items:
            if _same_file(target, _resolved(p)):
                raise OutputError(f"{what} and {other} name the same file ({_show(path)}); give different files")
        self._items.append((what, path, data))

    def __len__(self) -> int:
        return len(self._items)

    def commit(self) -> dict[str, int]:
        """Write everything; returns label -> bytes written.

        Raises
        ------
        OutputError
            If any output cannot be written; no target is changed then.
        """
        staged: list[tuple[str, PathLike, pathlib.Path, str]] = []  # (label, path, target, tmp)
        sizes: dict[str, int] = {}
        mask = _umask()
        try:
            for what, path, data in self._items:
                target = check_output(path, what)
                fd, tmp = _mkstemp(target.parent, target.name)
                staged.append((what, path, target, tmp))
                try:
                    sizes[what] = _write_all(fd, data)
                    try:
                        mode = stat.S_IMODE(os.stat(target).st_mode)
                    except OSError:
                        mode = 0o666 & ~mask
                    os.fchmod(fd, mode)
                except OSError as e:
                    raise OutputError(f"cannot write {what} {_show(path)}: {_reason(e)}; the previous file (if any) "
                                      "is unchanged") from None
                finally:
                    os.close(fd)
            self._rename_all(staged)
        except BaseException:
            for _, _, _, tmp in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        return sizes

    @staticmethod
    def _rename_all(staged: list[tuple[str, PathLike, pathlib.Path, str]]) -> None:
        backups: list[tuple[pathlib.Path, str | None]] = []  # (target, hard link to its previous contents)
        try:
            for what, path, target, tmp in staged:
                backup = None
                if len(staged) > 1 and target.exists():
                    backup = _mkstemp_name(target.parent, target.name)
                    try:
                        os.link(target, backup)
                    except OSError:
                        backup = None
                backups.append((target, backup))
                try:
                    os.replace(tmp, target)
                except OSError as e:
                    backups.pop()
                    if backup:
                        with contextlib.suppress(OSError):
                            os.unlink(backup)
                    raise OutputError(f"cannot write {what} {_show(path)}: {_reason(e)}") from None
        except BaseException:
            for target, backup in reversed(backups):  # put back what was there
                with contextlib.suppress(OSError):
                    if backup:
                        os.replace(backup, target)
                    else:
                        os.unlink(target)
            raise
        for _target, backup in backups:
            if backup:
                with contextlib.suppress(OSError):
                    os.unlink(backup)
        for folder in {t.parent for t, _ in backups}:
            _fsync_dir(folder)


def _mkstemp_name(folder: pathlib.Path, name: str) -> str:
    return os.path.join(folder, f".{name[:120]}.{secrets.token_hex(6)}.bak{TMP_SUFFIX}")


def atomic_write(path: PathLike, data: Data, what: str = "output",
                 inputs: Mapping[str, PathLike | None] | None = None) -> int:
    """Write ``data`` (bytes, text as UTF-8, or an iterable of byte chunks) to ``path`` atomically; returns the
    number of bytes written.

    Raises
    ------
    OutputError
        If the path is unusable or the write fails; ``path`` then holds exactly what it held before.
    """
    group = OutputGroup(inputs)
    group.add(path, data, what)
    return group.commit()[what]
