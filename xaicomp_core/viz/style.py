"""One style for every figure and number: colours by criterion (from the criterion registry), relevance colours,
and the number formatters used by the app, the CLI, the report and ``results``."""

from __future__ import annotations

#: Plotly's diverging scale with red for positive values (``RdBu`` reversed).
RELEVANCE_SCALE = "RdBu_r"
POSITIVE_COLOUR = "#b2182b"
NEGATIVE_COLOUR = "#2166ac"
ZERO_COLOUR = "#9e9e9e"
BASELINE_COLOUR = "#212121"
UNKNOWN_COLOUR = "#616161"


def criterion_colour(name: str) -> str:
    """The colour of a criterion in every figure (its registered ``colour``)."""
    from xaicomp_core.compress.criteria import CRITERION_REGISTRY

    return CRITERION_REGISTRY.get(name).colour if name in CRITERION_REGISTRY else UNKNOWN_COLOUR


def criterion_option(name: str) -> str:
    """``"name — what it prunes first"`` for option lists."""
    from xaicomp_core.compress.criteria import CRITERION_REGISTRY

    if name not in CRITERION_REGISTRY:
        return name
    c = CRITERION_REGISTRY.get(name)
    return f"{name} — {c.label}" if c.label else name


def fmt_bytes(n: float) -> str:
    """Human-readable byte count with decimal (SI) units: ``"512 B"``, ``"12.3 kB"``, ``"1.75 MB"``, ``"1.20 GB"``."""
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    if abs(n) < 1e6:
        return f"{n / 1e3:.1f} kB"
    if abs(n) < 1e9:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e9:.2f} GB"


def fmt_pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage, e.g. ``fmt_pct(0.9125) == "91.25%"``."""
    return f"{100 * x:.{digits}f}%"


def fmt_pp(dx: float, digits: int = 2) -> str:
    """A change of a fraction in percentage points with its sign, e.g. ``"-1.25 pp"``; ``"+0.00 pp"`` for changes
    that round to zero (never ``"-0.00"``)."""
    v = 100 * dx
    if round(v, digits) == 0:
        v = 0.0
    return f"{v:+.{digits}f} pp"
