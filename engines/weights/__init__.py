"""Shipped model weights (ONNX + torch sidecars) with their model card; data only."""
