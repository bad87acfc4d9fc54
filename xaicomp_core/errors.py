"""User-facing errors.

Every problem caused by the user's input (a file, a plan, a data set, a name) is raised as a
:class:`XaicompError` (or a subclass) whose message is one readable sentence. The CLI prints it on one
line without a traceback; the app shows it in an error box.
"""

from __future__ import annotations


class XaicompError(Exception):
    """Base class of all errors caused by user input."""


class WeightsError(XaicompError):
    """Weights could not be loaded or do not fit the architecture."""


class DataError(XaicompError):
    """A data set could not be read or is unusable."""


class PlanError(XaicompError, ValueError):
    """A compression plan is invalid or out of range."""


class FormatError(XaicompError):
    """A packed file is corrupt, truncated or of an unknown version."""
