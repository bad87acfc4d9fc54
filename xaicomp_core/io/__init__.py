"""I/O: model and data sources, safe loading, data sets, dense/ONNX export."""
