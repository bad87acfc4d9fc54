"""Evaluate: :class:`~xaicomp_core.evaluate.session.CompressionSession` (the caching facade) and sweeps."""
