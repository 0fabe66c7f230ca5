"""Time helpers: epoch milliseconds everywhere, durations written as ``30s``, ``5m``, ``1h``, ``7d``."""

from __future__ import annotations

import re
import time
from typing import Annotated

from pydantic import BeforeValidator

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_duration_ms(value: object) -> int:
    """``"5m"`` -> 300000. A bare number means seconds (``RTML_DEDUP_HORIZON=86400``)."""
    if isinstance(value, bool):
        raise ValueError("a duration must be like 30s, 5m, 1h or 7d")
    if isinstance(value, int | float):
        ms = int(value * 1000)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            ms = int(text) * 1000
        else:
            m = _DURATION.match(text)
            if m is None:
                raise ValueError(f"invalid duration {value!r}: use a whole number with ms, s, m, h or d")
            ms = int(m.group(1)) * _UNITS_MS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}")
    if ms <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return ms


def format_duration_ms(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


# A duration field: accepts "5m", "24h", seconds as a number, and holds milliseconds.
Duration = Annotated[int, BeforeValidator(parse_duration_ms)]
