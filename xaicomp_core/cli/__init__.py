"""The ``xaicomp`` command line: one module per group of commands, registered explicitly in :mod:`.main`."""

from xaicomp_core.cli.main import main

__all__ = ["main"]
