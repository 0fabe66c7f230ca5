"""Drive one endpoint with ``wrk`` (when it is on PATH): a Lua script cycles the POST bodies and prints JSON.

wrk measures from C with one connection per request in flight, so the client costs far less CPU than any
Python client; its ``done`` hook writes the figures as one JSON line, read back here (no text parsing).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from rtml.bench.common import BenchError

MARK = "RTMLJSON "

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RTMLJSON {\"requests\":%d,\"duration_us\":%d,\"status_errors\":%d,\"socket_errors\":%d,"
    .. "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"mean_us\":%f}\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def lua_script(method: str, bodies: Sequence[bytes], headers: dict[str, str]) -> str:
    """A wrk script sending ``bodies`` in turn (one counter per wrk thread) and reporting JSON when done."""
    lines = [f"wrk.method = {_lua_string(method)}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append("local bodies = {" + ",\n".join(_lua_string(b.decode()) for b in bodies) + "}")
    lines.append(
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\n"
        "end"
    )
    return "\n".join(lines) + _DONE


def parse_output(stdout: str) -> dict[str, Any]:
    """The summary (same keys as the asyncio client's) from the ``RTMLJSON`` line of wrk's output."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise BenchError(f"wrk printed no summary: {stdout[-300:].strip()}")
    raw = orjson.loads(line[len(MARK) :])
    seconds = raw["duration_us"] / 1e6
    errors = raw["status_errors"] + raw["socket_errors"]
    ok = raw["requests"] - raw["status_errors"]
    return {
        "requests": raw["requests"],
        "errors": errors,
        "error_kinds": {k: raw[k] for k in ("status_errors", "socket_errors") if raw[k]},
        "req_per_s": round(ok / seconds, 1) if seconds > 0 else None,
        **{f"p{q}_ms": round(raw[f"p{q}_us"] / 1e3, 3) for q in (50, 90, 99)},
        "max_ms": round(raw["max_us"] / 1e3, 3),
        "mean_ms": round(raw["mean_us"] / 1e3, 3),
    }


async def run_wrk(
    url: str,
    *,
    method: str,
    bodies: Sequence[bytes],
    headers: dict[str, str],
    concurrency: int,
    duration_s: float,
    threads: int = 2,
) -> dict[str, Any]:
    """One wrk run (whole seconds: wrk takes no fractions) against ``url``."""
    exe = wrk_path()
    if exe is None:
        raise BenchError("wrk is not on PATH")
    with tempfile.TemporaryDirectory(prefix="rtml-wrk-") as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(lua_script(method, bodies, headers))
        proc = await asyncio.create_subprocess_exec(
            exe, f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{max(1, math.ceil(duration_s))}s",
            "--latency", "-s", str(script), url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {out.decode(errors='replace')[-300:].strip()}")
    return parse_output(out.decode(errors="replace"))
