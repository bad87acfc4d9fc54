"""Viz: one style (palette by criterion, number formatters) and the figures of the app, the report and results."""
