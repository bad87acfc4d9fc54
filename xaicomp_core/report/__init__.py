"""Report: a self-contained HTML report of one plan."""
