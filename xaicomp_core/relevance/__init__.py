"""Relevance: per-weight LRP relevance through zennit's rules (composites, canonizers, the parameter hook) and
input heatmaps."""
