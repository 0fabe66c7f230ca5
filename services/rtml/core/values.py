"""Conversions of feature values shared by serving and training."""

from __future__ import annotations

from typing import Any

# The largest float32: models take float32 inputs, so a larger value would reach them as an infinity (and
# make the score NaN or meaningless). ``as_float`` treats it like NaN: not a usable value.
FLOAT32_MAX = 3.4028234663852886e38


def as_float(value: Any) -> float | None:
    """A feature value as a float a model can take (finite, also as float32); None for missing, non-numeric
    (strings), non-finite or out-of-float32-range values."""
    if value is None or isinstance(value, str):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if -FLOAT32_MAX <= x <= FLOAT32_MAX else None  # False for NaN too
