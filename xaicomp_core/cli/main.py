"""The ``xaicomp`` command line (also ``python -m xaicomp_core``). Every command has ``--json``.

The parser registers every command module explicitly: :mod:`.commands` (``info``, ``compress``, ``sweep``,
``bench``) and :mod:`.export_cmds` (``export``, ``verify``, ``report``); both build on :mod:`.common`.

Errors caused by input (files, plans, names) print one line on stderr and exit with status 2; set
``XAICOMP_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from xaicomp_core.cli import commands, export_cmds
from xaicomp_core.errors import XaicompError

CLI_COMMANDS = ("info", "compress", "sweep", "bench", "export", "verify", "report")
#: The modules whose ``register(subparsers)`` adds their subcommands, in the order of :data:`CLI_COMMANDS`.
COMMAND_MODULES = (commands, export_cmds)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    ap = argparse.ArgumentParser(prog="xaicomp", description="Compress image classifiers with LRP relevance.")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaicomp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except XaicompError as e:
        sys.stderr.write(f"xaicomp: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("xaicomp: interrupted\n")
        return 130
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        if os.environ.get("XAICOMP_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(f"xaicomp: error: {e.__class__.__name__}: {msg[:300]}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
