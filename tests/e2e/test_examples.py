"""The integration examples under ``examples/``, run with their own toolchains.

- Laravel (PHP): ``php -l`` on every file, and the parts that need no framework (the fallback ranking, which
  errors count as transient) run under plain PHP. Skipped, saying so, without ``php``.
- Node: ``examples/node/demo.mjs`` against one live ``rtml up`` (API keys on), which checks every answer
  itself and exits non-zero on the first unexpected one; its fallbacks against a closed port and against a
  server that never answers; ``sendEvents`` retrying a 503 with the same ``event_id``s (a stub server: that
  is the client's own logic). Skipped without ``node`` >= 18.
- curl: ``examples/curl/walkthrough.sh`` against the same live stack. Skipped without ``curl``/``bash``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Platform, running_platform
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LARAVEL = EXAMPLES / "laravel"
NODE_DEMO = EXAMPLES / "node" / "demo.mjs"
NODE_MODULE = EXAMPLES / "node" / "rtml.mjs"
CURL_SCRIPT = EXAMPLES / "curl" / "walkthrough.sh"
API_KEY = "examples-key"
PHP_FILES = sorted(LARAVEL.rglob("*.php"))


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node example cannot run here")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"node {version} is older than 18 (no global fetch / AbortSignal.timeout)")
    return node


def php_or_skip() -> str:
    php = shutil.which("php")
    if php is None:
        pytest.skip("php is not installed (.ci/run installs php-cli): the Laravel example cannot be linted")
    return php


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def by_step(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["step"]: line for line in lines}


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One ``rtml up`` with API keys on, shared by the Node and curl tests (one start saves ~15 s each)."""
    keys = f"{API_KEY}:ingest+predict+read,readonly-key:read"
    with running_platform(
        kafka_bootstrap, redis_url, tmp_path_factory.mktemp("examples"), env={"RTML_API_KEYS": keys}
    ) as platform:
        yield platform


def client_env(platform: Platform, **overrides: str) -> dict[str, str]:
    return {
        **os.environ,
        "RTML_INGEST_URL": platform.urls["ingest"],
        "RTML_FEATURES_URL": platform.urls["features"],
        "RTML_SERVING_URL": platform.urls["serving"],
        "RTML_FEEDBACK_URL": platform.urls["feedback"],
        "RTML_API_KEY": API_KEY,
        **overrides,
    }


# --- Laravel ---------------------------------------------------------------------------------------------


def test_laravel_files_lint_clean_with_strict_types() -> None:
    php = php_or_skip()
    assert len(PHP_FILES) >= 8, PHP_FILES  # client, answers, exception, job, provider, controller, config, routes
    for path in PHP_FILES:
        result = subprocess.run([php, "-l", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
        assert "declare(strict_types=1);" in path.read_text(), f"{path} lacks declare(strict_types=1)"


def test_laravel_client_pure_logic_runs_under_plain_php() -> None:
    """The fallback ranking and the error classification, without Laravel (the classes load; only the
    methods that touch the framework would need it)."""
    php = php_or_skip()
    script = r"""
    require $argv[1] . '/app/Services/Rtml/RtmlException.php';
    require $argv[1] . '/app/Services/Rtml/RtmlClient.php';
    use App\Services\Rtml\RtmlClient;
    use App\Services\Rtml\RtmlException;
    $out = [
        'ranking' => RtmlClient::fallbackRanking(['a', 'b', 'c', 'd'], 3, ['x', 'c', 'a', 'c']),
        'ranking_k1' => RtmlClient::fallbackRanking(['a', 'b'], 1),
    ];
    foreach ([[null, 'timeout'], [null, 'unavailable'], [429, null], [503, 'overloaded'], [401, 'unauthorized'],
              [404, 'not_found'], [422, 'invalid'], [200, 'bad_response']] as [$status, $code]) {
        $e = new RtmlException('m', $status, $code);
        $out['errors'][] = [$status, $e->transient(), $e->reason()];
    }
    $pending = (new RtmlException('m', 503))->withPending([['event_id' => 'e2']], 5);
    $out['pending'] = [$pending->pending, $pending->accepted, $pending->status];
    echo json_encode($out);
    """
    result = subprocess.run([php, "-r", script, str(LARAVEL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert [i["item_id"] for i in out["ranking"]] == ["c", "a", "b"]  # popular candidates first, then order
    assert all(i["score"] is None for i in out["ranking"])
    assert [i["item_id"] for i in out["ranking_k1"]] == ["a"]
    assert out["errors"] == [
        [None, True, "timeout"],
        [None, True, "unavailable"],
        [429, True, "http_429"],
        [503, True, "http_503"],
        [401, False, "http_401"],
        [404, False, "http_404"],
        [422, False, "http_422"],
        [200, True, "bad_response"],
    ]
    assert out["pending"] == [[{"event_id": "e2"}], 5, 503]


# --- Node ------------------------------------------------------------------------------------------------


def test_node_demo_against_live_stack(live: Platform) -> None:
    node = node_or_skip()
    result = subprocess.run([node, str(NODE_DEMO)], env=client_env(live), capture_output=True, text=True, timeout=60)
    lines = json_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = by_step(lines)
    assert all(line["ok"] for line in lines)
    assert list(steps) == ["events", "features", "predict", "recommend", "outcome", "models", "errors", "done"]

    events = steps["events"]
    assert events["accepted"] == 3 and events["resent"] == 3 and len(set(events["event_ids"])) == 3
    # The resent batch (same event_ids) counted once in every feature.
    features = steps["features"]["features"]
    assert features["user_views_total"] == 3 and features["user_clicks_5m"] == 1

    predict = steps["predict"]
    assert predict["fallback"] is False and predict["degraded"] is False
    assert predict["model"] == "ctr" and predict["version"] and predict["prediction_id"]
    assert 0.0 <= predict["score"] <= 1.0

    recommend = steps["recommend"]
    ids = [item["item_id"] for item in recommend["items"]]
    assert len(ids) == 2 and set(ids) <= set(recommend["candidates"])
    assert recommend["fallback"] is False

    assert steps["outcome"]["accepted"] == 1
    assert {"name": "ctr", "live_version": predict["version"]} in steps["models"]["models"]
    assert steps["errors"]["unknown_model"] == 404 and steps["errors"]["invalid_event"] == 422


def test_node_demo_exits_nonzero_when_rtml_refuses(live: Platform) -> None:
    """A key without the ingest scope: the first step fails with rtml's 403, and the exit code says so."""
    node = node_or_skip()
    result = subprocess.run(
        [node, str(NODE_DEMO)], env=client_env(live, RTML_API_KEY="readonly-key"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = json_lines(result.stdout)
    assert line["step"] == "events" and line["ok"] is False
    assert line["status"] == 403 and line["code"] == "forbidden"


def run_fallback(node: str, serving_url: str, reason: str) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "RTML_SERVING_URL": serving_url, "RTML_TIMEOUT_MS": "200"}
    result = subprocess.run(
        [node, str(NODE_DEMO), f"--expect-fallback={reason}"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = by_step(json_lines(result.stdout))
    assert set(steps) == {"predict_fallback", "recommend_fallback", "done"}
    assert f"rtml fallback ({reason})" in result.stderr  # the onFallback hook saw each one
    for step in ("predict_fallback", "recommend_fallback"):
        assert steps[step]["fallback"] is True and steps[step]["degraded"] is True
        assert steps[step]["reason"] == reason
    assert steps["predict_fallback"]["score"] == 0.05
    assert [i["item_id"] for i in steps["recommend_fallback"]["items"]] == ["i3", "i1"]
    return steps


def test_node_fallback_when_serving_is_down() -> None:
    node = node_or_skip()
    run_fallback(node, f"http://127.0.0.1:{free_port()}", "unavailable")  # nothing listens there


def test_node_fallback_when_serving_never_answers() -> None:
    """A listener that accepts connections and never answers: the client's own timeout must end the call."""
    node = node_or_skip()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        steps = run_fallback(node, f"http://127.0.0.1:{silent.getsockname()[1]}", "timeout")
    # It waited for its timeout (200 ms) rather than failing at once; the call ended, so the timeout fired.
    assert steps["predict_fallback"]["elapsed_ms"] >= 190


class _FlakyIngest(BaseHTTPRequestHandler):
    """POST /v1/events: the first answer is 503 + Retry-After: 0, then 202; a batch with an event of type
    "bad" is a 422. Records every body it got."""

    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.bodies.append({"body": body, "auth": self.headers.get("authorization")})
        events = body["events"]
        if any(e["type"] == "bad" for e in events):
            error = {"code": "invalid", "message": "bad", "details": [{"index": 0, "field": "type", "message": "bad"}]}
            status, answer, headers = 422, {"error": error}, {}
        elif len(self.bodies) == 1:
            status, answer, headers = 503, {"error": {"code": "unavailable", "message": "broker"}}, {"Retry-After": "0"}
        else:
            status, answer, headers = 202, {"accepted": len(events)}, {}
        data = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in {**headers, "content-type": "application/json", "content-length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_node_send_events_retries_503_with_the_same_event_ids() -> None:
    node = node_or_skip()
    _FlakyIngest.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyIngest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = f"""
    import {{ RtmlClient, RtmlError }} from {json.dumps(NODE_MODULE.as_uri())};
    const c = new RtmlClient({{ ingestUrl: process.env.INGEST, apiKey: "k1", retries: 2 }});
    const ok = await c.sendEvents([
      {{ type: "view", user_id: "u1" }}, {{ type: "click", user_id: "u1", event_id: "mine" }},
    ]);
    let bad = null;
    try {{ await c.sendEvents([{{ type: "bad" }}]); }} catch (e) {{ bad = e; }}
    console.log(JSON.stringify({{ ok, bad: {{ isRtml: bad instanceof RtmlError, status: bad.status,
      details: bad.details, pending: bad.pending.length, accepted: bad.accepted }} }}));
    """
    try:
        result = subprocess.run(
            [node, "--input-type=module", "-e", script],
            env={**os.environ, "INGEST": f"http://127.0.0.1:{server.server_address[1]}"},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    bodies = _FlakyIngest.bodies
    assert len(bodies) == 3  # 503, the retry (202), the invalid batch once: a 422 is not retried
    first, retry = bodies[0]["body"]["events"], bodies[1]["body"]["events"]
    assert first == retry  # the same events, ids included: rtml counts them once
    assert first[1]["event_id"] == "mine" and first[0]["event_id"] and first[0]["event_id"] != "mine"
    assert all(b["auth"] == "Bearer k1" for b in bodies)
    assert out["ok"] == {"accepted": 2, "event_ids": [first[0]["event_id"], "mine"]}
    assert out["bad"] == {"isRtml": True, "status": 422, "details": [{"index": 0, "field": "type", "message": "bad"}],
                          "pending": 1, "accepted": 0}  # fmt: skip


# --- curl ------------------------------------------------------------------------------------------------


def curl_or_skip() -> None:
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("curl or bash is not installed: the curl example cannot run here")


def test_curl_walkthrough_against_live_stack(live: Platform) -> None:
    curl_or_skip()
    result = subprocess.run(
        ["bash", str(CURL_SCRIPT)], env=client_env(live, RTML_USER_ID="curl-user", RTML_ITEM_ID="curl-item"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sections: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for line in result.stdout.splitlines():
        if line.startswith("## "):
            current = line[3:]
            sections[current] = []
        elif line.strip():
            sections[current].append(json.loads(line))
    assert list(sections) == [
        "1. send events", "2. read features", "3. predict", "4. recommend", "5. post an outcome", "6. models",
    ]  # fmt: skip
    assert sections["1. send events"] == [{"accepted": 3}]
    user, item, pair = sections["2. read features"]
    assert (user["entity"], user["id"]) == ("user", "curl-user") and "user_clicks_5m" in user["features"]
    assert (item["entity"], item["id"]) == ("item", "curl-item")
    assert (pair["entity"], pair["id"]) == ("user_item", "curl-user|curl-item")
    (prediction,) = sections["3. predict"]
    assert prediction["model"] == "ctr" and prediction["version"] and prediction["prediction_id"]
    (ranked,) = sections["4. recommend"]
    ids = [i["item_id"] for i in ranked["items"]]
    assert len(ids) == 2 and set(ids) <= {"curl-item", "t4", "t7"}
    assert sections["5. post an outcome"] == [{"accepted": 1}]
    models, quality = sections["6. models"]
    assert "ctr" in {m["name"] for m in models["models"]} and quality["model"] == "ctr"


def test_curl_walkthrough_stops_at_the_first_refusal(live: Platform) -> None:
    curl_or_skip()
    result = subprocess.run(
        ["bash", str(CURL_SCRIPT)], env=client_env(live, RTML_API_KEY="wrong-key"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "## 2." not in result.stdout  # stopped after step 1
    body = json_lines(result.stdout)
    assert body == [{"error": {"code": "unauthorized", "message": body[0]["error"]["message"]}}]
    assert "/v1/events failed" in result.stderr
