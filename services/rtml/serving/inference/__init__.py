"""ONNX Runtime sessions: loading, validating and running models (no scikit-learn here)."""
