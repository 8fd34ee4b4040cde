"""The MLflow model registry as the source of truth: registration with lineage, promotion,
inference from registered ONNX models."""
