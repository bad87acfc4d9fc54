"""Reading input files safely: only regular files, never more than a stated number of bytes.

:func:`read_regular` is how xaicomp reads every file a user names (weights, data sets, zips, images, plans, packed
files). It refuses directories, FIFOs, sockets and devices (``/dev/zero``, also behind a symlink) with one readable
line, opens with ``O_NONBLOCK`` so that a FIFO can never make it wait, checks the size before reading and reads at
most ``limit`` bytes (a file that grows while it is read is refused too).
"""

from __future__ import annotations

import os
import stat

from xaicomp_core.errors import XaicompError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def show_path(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message (control characters escaped)."""
    s = os.fspath(path)
    return s if s.isprintable() else ascii(s)


def fmt_limit(n: int) -> str:
    """``536870912`` -> ``512 MiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def regular_size(path: str | os.PathLike[str], what: str = "file",
                 error: type[XaicompError] = XaicompError) -> int:
    """The size of ``path`` if it is a regular file (symlinks followed); raise ``error`` with one line otherwise."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} {show_path(p)} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {show_path(p)}: {e.strerror or e.__class__.__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {show_path(p)} is {_kind(st.st_mode)}, not a regular file")
    return st.st_size


def read_regular(path: str | os.PathLike[str], limit: int, what: str = "file",
                 error: type[XaicompError] = XaicompError) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes.

    Parameters
    ----------
    path : path
        The file (a symlink is followed; its target must be a regular file).
    limit : int
        Refuse files larger than this many bytes (checked before reading and while reading).
    what : str
        What the file is, for messages (``"weights file"``, ``"plan file"``...).
    error : type
        The :class:`~xaicomp_core.errors.XaicompError` subclass to raise.

    Raises
    ------
    XaicompError
        (``error``) For a missing or unreadable file, a directory, FIFO, socket or device, or a file over ``limit``.
    """
    p = os.fspath(path)
    size = regular_size(p, what, error)  # before opening: opening a device or FIFO can have effects of its own
    if size > limit:
        raise error(f"{what} {show_path(p)} is {fmt_limit(size)}, over the {fmt_limit(limit)} limit")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as e:
        raise error(f"cannot read {what} {show_path(p)}: {e.strerror or e.__class__.__name__}") from None
    try:
        st = os.fstat(fd)  # what was opened, not what the name pointed to a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {show_path(p)} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise error(f"{what} {show_path(p)} is {fmt_limit(st.st_size)}, over the {fmt_limit(limit)} limit")
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            except OSError as e:
                raise error(f"cannot read {what} {show_path(p)}: {e.strerror or e.__class__.__name__}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{what} {show_path(p)} grew past the {fmt_limit(limit)} limit while it was read")
    finally:
        os.close(fd)
    return b"".join(chunks)
