"""rtml: real-time machine learning."""

__version__ = "0.1.0"
