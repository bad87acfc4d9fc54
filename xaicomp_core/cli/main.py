"""The ``xaicomp`` command line (also ``python -m xaicomp_core``). Every command has ``--json``.

The parser registers every command module explicitly: :mod:`.commands` (``info``, ``compress``, ``sweep``,
``bench``), :mod:`.export_cmds` (``export``, ``verify``, ``report``) and :mod:`.auto_cmd` (``auto``); all build
on :mod:`.common`.

Errors caused by input (files, plans, names, options) or by the machine (a full disk, a read-only folder) print one
line on stderr and exit with status 2, leaving inputs and previous outputs intact; set ``XAICOMP_DEBUG=1`` for a
traceback. Anything else is a bug: its traceback is printed with a request to report it, and the status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from xaicomp_core.cli import auto_cmd, commands, export_cmds
from xaicomp_core.errors import XaicompError

CLI_COMMANDS = ("info", "compress", "sweep", "bench", "export", "verify", "report", "auto")
#: The modules whose ``register(subparsers)`` adds their subcommands, in the order of :data:`CLI_COMMANDS`.
COMMAND_MODULES = (commands, export_cmds, auto_cmd)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``xaicomp: error: <what> (see xaicomp <command> --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        self.exit(2, f"xaicomp: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    ap = ArgumentParser(prog="xaicomp", description="Compress image classifiers with LRP relevance.")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return ap


#: OS errors that are about the machine or the user's files, not a bug: full disk, quota, read-only, permissions, I/O.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                      errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE}
BUG_HINT = ("xaicomp: internal error: this is a bug in xaicomp, not a problem with your input; please report it with "
            "the command line and the traceback above")


def _one_line(message: object) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaicomp`` console script.

    Returns 0 on success; 2 with one ``xaicomp: error:`` line on stderr for anything caused by the input or the
    machine (files, plans, names, a full disk, out of memory); 1 with the traceback and a bug-report hint for a bug;
    130 when interrupted. ``XAICOMP_DEBUG=1`` shows the traceback of user errors too.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad option (its one line is already printed)
        return e.code if isinstance(e.code, int) else 2
    debug = bool(os.environ.get("XAICOMP_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except XaicompError as e:
        if debug:
            raise
        sys.stderr.write(f"xaicomp: error: {_one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("xaicomp: interrupted\n")
        return 130
    except BrokenPipeError:  # `xaicomp ... | head`: the reader left; nothing more to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (keeps Python's exit flush quiet)
        return 1
    except MemoryError:
        sys.stderr.write("xaicomp: error: out of memory (use fewer images with --eval-samples / "
                         "--reference-samples, or a machine with more memory)\n")
        return 2
    except OSError as e:
        if e.errno in ENVIRONMENT_ERRNOS and not debug:
            where = f" {e.filename}" if e.filename else ""
            sys.stderr.write(f"xaicomp: error: cannot access{where}: {e.strerror or e.__class__.__name__}\n")
            return 2
        traceback.print_exc()
        sys.stderr.write(BUG_HINT + "\n")
        return 1
    except Exception:
        traceback.print_exc()
        sys.stderr.write(BUG_HINT + "\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
