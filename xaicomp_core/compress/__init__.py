"""Compress: criteria, masks, bit allocation, quantizers and the pure :func:`compress` step, plus fine-tuning."""
