"""What every benchmark shares: run ids, service URLs, auth headers, the machine block, metrics scrapes."""

from __future__ import annotations

import asyncio
import os
import platform
import uuid
from typing import Any

import httpx

from rtml.bench.stats import Buckets, parse_histograms
from rtml.core.auth import ApiKeys
from rtml.core.errors import RtmlError
from rtml.core.settings import ServiceName, Settings

JSON_HEADERS = {"content-type": "application/json"}


class BenchError(RtmlError):
    """A benchmark could not produce a valid result (lost events, a service answering errors)."""

    code = "bench"


def run_id() -> str:
    """A short id that keeps one run's entities apart from every other run's."""
    return uuid.uuid4().hex[:8]


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: which event loop drives this benchmark (it changes client CPU a lot)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "loop": loop_name(),
    }


def service_url(settings: Settings, service: ServiceName) -> str:
    return f"http://{settings.host}:{settings.port_of(service)}"


def auth_headers(settings: Settings, scope: str) -> dict[str, str]:
    """``Authorization`` for the first configured API key holding ``scope`` (or admin); none when keys are off."""
    keys = ApiKeys.parse(settings.api_keys.get_secret_value() if settings.api_keys else None)
    for key, scopes in keys.keys:
        if scope in scopes or "admin" in scopes:
            return {"authorization": f"Bearer {key.decode()}"}
    if keys.enabled:
        raise BenchError(f"RTML_API_KEYS holds no key with the {scope!r} scope")
    return {}


def target(value: float | None, limit: float, *, at_most: bool = True) -> dict[str, Any]:
    """One target line: the limit, the measured value and whether it meets it (None when not measured)."""
    meets = None if value is None else (value <= limit if at_most else value >= limit)
    return {"target": f"{'<=' if at_most else '>='} {limit:g}", "measured": value, "meets": meets}


async def scrape_histograms(client: httpx.AsyncClient, url: str, names: list[str]) -> dict[str, Buckets]:
    """Cumulative buckets of the named histograms from a service's ``/metrics``."""
    r = await client.get(f"{url}/metrics")
    if r.status_code != 200:
        raise BenchError(f"GET {url}/metrics answered {r.status_code}")
    return parse_histograms(r.text, names)
