"""Encoders (timm ViT), the MAE wrapper, checkpoint import and ONNX export."""
