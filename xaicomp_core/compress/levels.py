"""Bit levels: a kept weight is stored at 1-8 bits or as float32 (level :data:`FP32`)."""

#: The bit level that means "keep this weight in float32".
FP32 = 32
#: Quantized widths a plan may use besides :data:`FP32`.
MIN_BITS, MAX_BITS = 1, 8
