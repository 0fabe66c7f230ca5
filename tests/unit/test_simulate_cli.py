"""``rtml simulate``'s drift and scoring flags: parsing, one-line errors, and a real run against a local HTTP
stand-in for ingest and serving (the whole platform is the learning-loop e2e's job)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rtml.cli.common import CliError
from rtml.cli.main import app
from rtml.cli.simulate import Drift, drift_plan, option_duration_ms
from rtml.simulate.world import World

runner = CliRunner()


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rtml: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_drift_plan_turns_seconds_after_start_into_epoch_ms() -> None:
    assert drift_plan(None, None, 1_000) == (None, frozenset())
    assert drift_plan(2.5, None, 1_000) == (3_500, frozenset({"taste", "fraud"}))  # default: both
    assert drift_plan(0, Drift.fraud, 1_000) == (1_000, frozenset({"fraud"}))
    assert drift_plan(1, Drift.taste, 0) == (1_000, frozenset({"taste"}))
    with pytest.raises(CliError, match="--drift needs --drift-at"):
        drift_plan(None, Drift.fraud, 0)


def test_durations_name_their_option() -> None:
    assert option_duration_ms("--chargeback-delay", "5s") == 5_000
    assert option_duration_ms("--score-delay", "200ms") == 200
    assert option_duration_ms("--score-delay", "0", allow_zero=True) == 0
    with pytest.raises(CliError, match="--chargeback-delay: invalid duration 'soon'"):
        option_duration_ms("--chargeback-delay", "soon")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--drift", "fraud"], "rtml: --drift needs --drift-at SECONDS (when the ground truth changes)"),
        (
            ["--drift-at", "90", "--duration", "60"],
            "rtml: --drift-at 90 is not within --duration 60: nothing would drift",
        ),
        (["--chargeback-delay", "soon"], "rtml: --chargeback-delay: invalid duration 'soon': use a whole number"),
        (["--score-delay", "-1s"], "rtml: --score-delay: invalid duration '-1s'"),
        (["--drift", "weather", "--drift-at", "1"], "'weather' is not one of"),
        (["--drift-at", "-1"], "--drift-at"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["simulate", *args])
    assert result.exit_code == 2
    assert expected in one_line(result.stderr)


def test_help_lists_the_new_flags() -> None:
    result = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    for flag in ("--drift-at", "--drift", "--score-purchases", "--chargeback-delay", "--score-delay", "--via"):
        assert flag in result.output
    result = runner.invoke(app, ["simulate-outcomes", "--help"], env={"COLUMNS": "200"})
    assert "--post-outcomes" in result.output


@pytest.fixture
def platform() -> Iterator[dict[str, Any]]:
    """A local HTTP server standing in for ingest (``/v1/events``: 202) and serving (``/v1/predict``: 200)."""
    seen: dict[str, Any] = {"events": [], "predict": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/events":
                seen["events"].extend(body["events"])
                status, answer = 202, {"accepted": len(body["events"])}
            else:
                seen["predict"].append(body)
                status, answer = 200, {"prediction_id": "p", "model": "fraud", "version": "1", "score": 0.5}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    seen["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield seen
    server.shutdown()
    server.server_close()


def test_a_drifting_run_scores_every_purchase_and_charges_back_after_the_delay(
    platform: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .rtml/endpoints.env of a running platform
    assert [u for u in range(5) if World(5, 10, 18).fraudster(u)] == [4]
    url = platform["url"]
    result = runner.invoke(app, [
        "simulate", "--rate", "300", "--users", "5", "--items", "10", "--duration", "3", "--seed", "18",
        "--ingest-url", url, "--serving-url", url, "--drift-at", "1", "--drift", "fraud",
        "--score-purchases", "--score-delay", "50ms", "--chargeback-delay", "1s",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    events = platform["events"]
    purchases = {e["event_id"]: e for e in events if e["type"] == "purchase"}
    assert purchases
    assert "drift: fraud changed now" in result.stderr
    assert f"sent {len(events)} events via http; scored {len(purchases)} purchases" in result.stderr
    scored = {b["entities"]["purchase_id"]: b for b in platform["predict"]}
    assert scored.keys() == purchases.keys()
    for pid, body in scored.items():
        assert body == {"model": "fraud", "entities": {"user_id": purchases[pid]["user_id"], "purchase_id": pid}}
    chargebacks = [e for e in events if e["type"] == "chargeback"]
    assert chargebacks  # seed 18: user u4 is a fraudster who clicks (and so buys) a lot
    for cb in chargebacks:
        assert cb["ts"] == purchases[cb["properties"]["purchase_id"]]["ts"] + 1_000
