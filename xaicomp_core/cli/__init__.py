"""The ``xaicomp`` command line: :mod:`.common` (shared options, sources and plan from the options, printers),
:mod:`.commands` and :mod:`.export_cmds` (the subcommands), :mod:`.main` (the parser, registering each command
module explicitly). The console script is ``xaicomp_core.cli:main``."""

from xaicomp_core.cli.main import main

__all__ = ["main"]
