"""A real Prometheus scraping ``rtml up --demo``: every dashboard query, recording rule and alert returns data.

The platform runs as real processes (the demo's clickstream and outcome simulators included) on the session's
broker and redis-server, with the demo config's label rules shortened to seconds (AUC needs negative labels,
which the demo's ctr rule gives after 30 minutes) and an ordinary operator's day added (``operator_day``: a
caller's bad request, a candidate version in shadow). ``prometheus`` (Debian package) scrapes the four
services every second with the job, labels and relabelling of deploy/prometheus/prometheus.yml (only the
targets and intervals differ) and evaluates deploy/prometheus/alerts.yml every second. Then, via the HTTP API:

- every ``targets[].expr`` of every panel of deploy/grafana/dashboards/*.json (whatever files exist when the
  test runs), with ``$__rate_interval`` -> ``1m`` and ``$service``/``$model``/``$version`` -> ``.*``;
- every recording rule's recorded series;
- every alert's expression.

"Returns data" means at least one series whose value is not NaN (a quantile of nothing is NaN).

What is checked is each expression's MEASURED part, so that neither a quiet alert nor a panel's fallback can
pass without the metrics behind it having data (``measured()``; pure, tested below):

- thresholds go: every comparison (``> < >= <= == !=`` without ``bool``) is replaced by the side that is not a
  number (for two vectors: the left one, the measured quantity). ``up{job="rtml"} == 0`` is checked as
  ``up{job="rtml"}``, ``A > 0.01 and on (service) B > 0.1`` as ``A and on (service) B``;
- constant fallbacks go: ``X or vector(0)`` / ``X or on() vector(0)`` (a panel that shows 0 rather than "no
  data") is checked as ``X``;
- both only at the top of the expression, reached through parentheses and the set operators ``and``/``or``/
  ``unless``, which stay with their ``on(...)`` matching. Comparisons inside functions or aggregations stay:
  they are part of what is measured (``count(x > 0)``).

Recording rules are checked by their expression under the same rule (so one that filters, ``... >= 500``,
is checked without the filter); every rule must also be evaluated by Prometheus without error.

Every query is retried until the deadline; the failure lists every query that never returned data, each with
the metrics it reads: a metric the demo does not move fails the test rather than being skipped.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from tests.e2e.conftest import DEMO_CONFIG, Platform, running_platform
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROMETHEUS = shutil.which("prometheus")
COMPARISONS = {">", "<", ">=", "<=", "==", "!="}
SET_OPERATORS = {"and", "or", "unless"}
# After the platform is up; the last usually comes at ~60 s (500 labels for the quality-drop alert). Generous:
# a passing run stops waiting when the last query has data, and the GC pause panel needs a garbage collection in
# the minute before (with gc.freeze() and a gen-0 threshold of 10,000, a lightly loaded demo can go a while
# without one: CI once saw none in 90 s on a box slowed by another test run).
DATA_DEADLINE_S = 180.0


# -- what to check ---------------------------------------------------------------------------------------
def grafana_expr(expr: str) -> str:
    """A dashboard query as Prometheus would get it from Grafana with every variable set to "all"."""
    expr = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    return re.sub(r"\$\{?(service|model|version)\}?", ".*", expr)


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard_queries() -> dict[str, str]:
    """``dashboard / panel title [refId]`` -> PromQL, for every dashboard file present now."""
    found: dict[str, str] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr", "").strip():
                    name = f"{path.name} / {panel.get('title', '?')} [{target.get('refId', '?')}]"
                    found[name] = grafana_expr(target["expr"])
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]  # fmt: skip


def is_constant(node: Any) -> bool:
    """A number, or ``vector(<number>)``."""
    if isinstance(node, promql_parser.NumberLiteral):
        return True
    if isinstance(node, promql_parser.ParenExpr):
        return is_constant(node.expr)
    return (
        isinstance(node, promql_parser.Call)
        and node.func.name == "vector"
        and all(isinstance(a, promql_parser.NumberLiteral) for a in node.args)
    )


def measured(expr: str) -> str:
    """The expression without its top-level thresholds and constant fallbacks (see the module docstring)."""

    def strip(node: Any) -> str:
        if isinstance(node, promql_parser.ParenExpr):
            return f"({strip(node.expr)})"
        if isinstance(node, promql_parser.BinaryExpr):
            op = str(node.op)
            modifier = node.modifier
            if op in COMPARISONS and not (modifier is not None and modifier.return_bool):
                return strip(node.rhs if is_constant(node.lhs) else node.lhs)
            if op == "or" and is_constant(node.rhs):
                return strip(node.lhs)
            if op == "or" and is_constant(node.lhs):
                return strip(node.rhs)
            if op in SET_OPERATORS:
                matching = f" {modifier}" if modifier is not None and str(modifier) else ""
                return f"({strip(node.lhs)}) {op}{matching} ({strip(node.rhs)})"
        return str(node)

    return strip(promql_parser.parse(expr))


def metrics_read(expr: str) -> list[str]:
    """The metric names an expression reads (for the failure message)."""
    return sorted(set(re.findall(r"\b(?:rtml_[a-z0-9_]+|up|[a-z_]+:[a-z0-9_:]+)\b(?=\s*[{\[)\s]|$)", expr)))


# -- Prometheus ------------------------------------------------------------------------------------------
def prometheus_config(platform: Platform, rules_file: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with this platform's URLs as targets, 1 s intervals and the rules."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules_file)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "rtml"]
    for group in job["static_configs"]:
        service = group["labels"]["service"]
        group["targets"] = [platform.urls[service].removeprefix("http://")]
    return config


def short_label_config(path: Path) -> Path:
    """The demo config with label rules that decide within seconds: the demo's ctr rule waits 30 minutes for
    a click before it says 0, and AUC needs both classes."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    for model in config["models"].values():
        if "label" in model:
            model["label"]["within"] = "5s"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def operator_day(platform: Platform, run_dir: Path) -> None:
    """What an operator and the platform's callers do on an ordinary day that the demo simulators do not:
    a caller's bad request (a 422), and a candidate ctr version trained and rolled out in shadow."""
    r = httpx.post(f"{platform.urls['ingest']}/v1/events", json={"type": "view", "ts": "not a time"}, timeout=10)
    assert r.status_code == 422, r.text
    for args in (["train", "--model", "ctr", "--no-promote"], ["models", "shadow", "ctr", "2"]):
        done = subprocess.run([sys.executable, "-m", "rtml.cli.main", *args], env=platform.env, cwd=run_dir,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)


@pytest.fixture
def demo(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    run_dir = tmp_path / "platform"
    run_dir.mkdir()
    env = {
        "RTML_CONFIG": str(short_label_config(tmp_path / "rtml.yaml")),
        "RTML_LABEL_GRACE": "1s",
        "RTML_LEARNING_INTERVAL_S": "1",  # quality gauges
    }
    with running_platform(kafka_bootstrap, redis_url, run_dir, "--demo", env=env) as platform:
        try:
            operator_day(platform, run_dir)
            yield platform
        finally:
            if platform.proc.poll() is None:
                platform.proc.send_signal(signal.SIGTERM)
                try:
                    platform.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass  # running_platform kills it


@pytest.fixture
def prometheus(demo: Platform, tmp_path: Path) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(prometheus_config(demo, PROMETHEUS_DIR / "alerts.yml")))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603 - the Debian binary, our arguments
        [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus is not ready after 30 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(client: httpx.Client, expr: str) -> list[dict[str, Any]]:
    r = client.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error', r.text)}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


# -- the test --------------------------------------------------------------------------------------------
def test_every_dashboard_query_recording_rule_and_alert_returns_data(prometheus: str, demo: Platform) -> None:
    checks: dict[str, str] = {}  # what -> the measured query
    for name, expr in dashboard_queries().items():
        checks[f"dashboard {name}"] = measured(expr)
    for rule in rules():
        kind, name = ("record", rule["record"]) if "record" in rule else ("alert", rule["alert"])
        checks[f"{kind} {name}"] = measured(rule["expr"])
    assert any(n.startswith("alert ") for n in checks) and any(n.startswith("record ") for n in checks)

    pending = dict(checks)
    deadline = time.monotonic() + DATA_DEADLINE_S
    with httpx.Client(base_url=prometheus, timeout=10) as client:
        while len(targets := client.get("/api/v1/targets").json()["data"]["activeTargets"]) < 4:
            assert time.monotonic() < deadline, f"prometheus has not found its targets: {targets}"
            time.sleep(0.2)
        assert sorted(t["labels"]["service"] for t in targets) == ["features", "feedback", "ingest", "serving"]
        # every query must at least parse and evaluate, before waiting for data
        for expr in checks.values():
            query(client, expr)
        while pending and time.monotonic() < deadline:
            for name, expr in list(pending.items()):
                if has_data(query(client, expr)):
                    del pending[name]
            if pending:
                time.sleep(2)
        down = [t["labels"]["service"] for t in client.get("/api/v1/targets").json()["data"]["activeTargets"]
                if t["health"] != "up"]  # fmt: skip
        groups = client.get("/api/v1/rules").json()["data"]["groups"]
    assert demo.proc.poll() is None, "rtml up exited during the test"
    assert not down, f"targets not up: {down}"
    evaluated = [r for g in groups for r in g["rules"]]
    assert len(evaluated) == len(rules())
    broken = {r["name"]: r.get("lastError") for r in evaluated if r["health"] != "ok"}
    assert not broken, f"rules Prometheus failed to evaluate: {broken}"
    report = "\n".join(f"- {name}: {expr}\n    reads {', '.join(metrics_read(expr))}" for name, expr in pending.items())
    assert not pending, f"{len(pending)} of {len(checks)} queries returned no data within " \
                        f"{DATA_DEADLINE_S:.0f} s of rtml up --demo:\n{report}"  # fmt: skip


def squash(expr: str) -> str:
    return re.sub(r"\s+|\{\}", "", expr)


def test_measured_drops_top_level_thresholds_and_constant_fallbacks_only() -> None:
    """The rule above, on the shapes alerts.yml and the dashboards use (pure logic; no processes)."""
    assert measured('up{job="rtml"} == 0') == 'up{job="rtml"}'
    assert squash(measured("a > 0.01 and on (service) b > 0.1")) == "(a)andon(service)(b)"
    stripped = measured('(x{r="p"} > 0.01 or x{r="q"} > 0.025) and on (s, r) y > 1')
    assert squash(stripped) == '(((x{r="p"})or(x{r="q"})))andon(s,r)(y)'
    assert squash(measured("count by (m) (x > 0) > 1")) == "countby(m)(x>0)"
    assert squash(measured("0.5 < x")) == "x"
    assert squash(measured("x > bool 1")) == "x>bool1"
    assert squash(measured("a < on (m) max_over_time(a[6h]) - 0.05")) == "a"
    assert squash(measured("sum by (t) (rate(d[1m])) or on () vector(0)")) == "sumby(t)(rate(d[1m]))"
    assert squash(measured("a or b")) == "(a)or(b)"
    assert squash(measured("(a or b * 0) / b")) == "(aorb*0)/b"  # not at the top: kept
