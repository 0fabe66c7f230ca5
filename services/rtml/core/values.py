"""Conversions of feature values shared by serving and training."""

from __future__ import annotations

import math
from typing import Any


def as_float(value: Any) -> float | None:
    """A feature value as a finite float; None for missing, non-numeric (strings) or non-finite values."""
    if value is None or isinstance(value, str):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None
