"""The wrk script and summary parsing (no wrk needed): bodies reach Lua intact, figures come back in ms."""

from __future__ import annotations

import pytest

from rtml.bench.common import BenchError
from rtml.bench.wrk import lua_script, parse_output


def test_lua_script_quotes_bodies_and_headers() -> None:
    script = lua_script("POST", [b'{"a": "]]"}', b"{}"], {"content-type": "application/json"})
    assert "wrk.method = [[POST]]" in script
    assert "wrk.headers[ [[content-type]] ] = [[application/json]]" in script
    assert '[=[{"a": "]]"}]=]' in script  # a body holding "]]" gets a longer bracket
    assert "request = function()" in script and "done = function(summary, latency, requests)" in script


def test_parse_output_reads_the_json_line() -> None:
    out = (
        "Running 1s test @ http://127.0.0.1:1/x\n"
        'RTMLJSON {"requests":1000,"duration_us":2000000,"status_errors":10,"socket_errors":2,'
        '"p50_us":450,"p90_us":800,"p99_us":1500,"max_us":9000,"mean_us":500.5}\n'
    )
    s = parse_output(out)
    assert s["requests"] == 1000 and s["errors"] == 12
    assert s["error_kinds"] == {"status_errors": 10, "socket_errors": 2}
    assert s["req_per_s"] == 495.0  # 990 good answers in 2 s
    assert (s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]) == (0.45, 0.8, 1.5, 9.0)


def test_parse_output_without_summary_is_an_error() -> None:
    with pytest.raises(BenchError, match="no summary"):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")
