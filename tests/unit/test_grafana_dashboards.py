"""The Grafana provisioning and dashboards in deploy/grafana: structure, variables, and every PromQL expression.

The expressions are parsed by ``promql-parser`` (Prometheus' grammar, with an AST) so that metric names, label
matchers, grouping labels and range windows are read from the syntax tree rather than guessed with regular
expressions; ``promtool check rules`` (Debian ``prometheus``, when installed) parses them once more with
Prometheus' own parser. Whether each expression returns data from a running platform is the live-Prometheus
test's job; this one catches what can be caught without a server: a metric that rtml does not declare, a
misspelled label, a zero fallback that would lie, a variable Grafana or that test cannot substitute.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from rtml.core import metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
RULE_FILES = sorted((ROOT / "deploy" / "prometheus").glob("*.y*ml"))
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
# Mounted so by docker-compose.yml; deploy/grafana/provisioning/dashboards/rtml.yml points there.
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
PROVISIONING_MOUNT = "/etc/grafana/provisioning"

EXPECTED = {"rtml-overview", "rtml-streaming", "rtml-serving", "rtml-model-quality"}
# The only variables an expression may use: Grafana's own, and the three query variables, each as =~"$var"
# (the live test substitutes `1m` and `.*`).
TEMPLATE_VARS = {"service", "model", "version"}
RATE_INTERVAL = "$__rate_interval"
# Labels Prometheus adds to every series of the rtml job (deploy/prometheus/prometheus.yml puts `service` on
# each target).
TARGET_LABELS = {"service", "job", "instance"}
# Series Prometheus itself writes for each target.
SYNTHETIC = {"up": TARGET_LABELS, "scrape_duration_seconds": TARGET_LABELS}
# Functions whose range must follow the dashboard's resolution (Grafana's $__rate_interval); increase() may
# also take a literal window ("in the last hour").
RATE_FUNCTIONS = {"rate", "irate"}
SENTINEL_S = 7777  # what $__rate_interval becomes for parsing, so that literal windows can be told apart
GRAFANA_UNITS = {
    "s", "ms", "µs", "ns", "percentunit", "percent", "reqps", "cps", "ops", "rps", "wps", "Bps", "bytes", "short",
    "none",
}  # fmt: skip


# -- what rtml declares ---------------------------------------------------------------------------------------
def declared_series() -> dict[str, set[str]]:
    """Every series name the metrics in ``rtml.core.metrics`` expose, with the labels each may carry.

    Read from the module's metric objects, so a metric renamed or removed there fails this test. ``_created``
    is left out on purpose: it vanishes in multiprocess mode and means nothing on a dashboard.
    """
    series: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames) | TARGET_LABELS  # noqa: SLF001 -- the declared label names
        name, kind = obj._name, obj._type  # noqa: SLF001
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        elif kind == "summary":
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
            series[name] = labels | {"quantile"}
        else:  # gauge, info, enum
            series[name] = labels
    return series


def recorded_series() -> set[str]:
    """Names recorded by the rules in deploy/prometheus (``level:metric:operations``)."""
    names: set[str] = set()
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []) if isinstance(doc, dict) else []:
            names.update(rule["record"] for rule in group.get("rules", []) if "record" in rule)
    return names


SERIES = declared_series()
RECORDED = recorded_series()


def test_declared_series_follow_the_suffix_rules() -> None:
    # guards the derivation above against a prometheus_client change (Counter names lose their _total)
    assert "rtml_http_requests_total" in SERIES
    assert "rtml_http_requests_total_total" not in SERIES
    assert {"rtml_http_request_duration_seconds_bucket", "rtml_http_request_duration_seconds_count"} <= SERIES.keys()
    assert "rtml_http_request_duration_seconds" not in SERIES
    assert "le" in SERIES["rtml_http_request_duration_seconds_bucket"]
    assert SERIES["rtml_model_quality"] >= {"model", "version", "metric", "service"}


# -- the dashboards -------------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    board = json.loads(path.read_text())
    assert isinstance(board, dict), path
    return board


DASHBOARDS = {path.name: load(path) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows; rows themselves are not yielded."""
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) of every panel query and every variable query of a dashboard."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"{board['uid']} / {panel.get('title')} / {target.get('refId')}", target.get("expr", "")
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        match = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", query)
        assert match, f"{board['uid']}: variable {var.get('name')}: not label_values(selector, label): {query!r}"
        yield f"{board['uid']} / variable {var['name']}", match[1]


ALL_EXPRS = [(where, expr) for board in DASHBOARDS.values() for where, expr in exprs(board)]


def substitute(expr: str, interval: str = "1m") -> str:
    """What Grafana (and the live test) sends: $__rate_interval as a duration, each variable as `.*`."""
    expr = expr.replace(RATE_INTERVAL, interval)
    for name in TEMPLATE_VARS:
        expr = expr.replace(f'=~"${name}"', '=~".*"')
    return expr


def test_the_four_dashboards_are_there_with_unique_uids() -> None:
    uids = [board.get("uid") for board in DASHBOARDS.values()]
    assert len(uids) == len(set(uids)), uids
    assert set(uids) >= EXPECTED
    titles = [board.get("title") for board in DASHBOARDS.values()]
    assert len(titles) == len(set(titles)), titles  # Grafana refuses two dashboards of one title in a folder


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_structure(name: str) -> None:
    board = DASHBOARDS[name]
    assert board.get("schemaVersion", 0) >= 36, "plain JSON of a current Grafana"
    assert board.get("id") is None, "provisioned dashboards carry no database id"
    ids = [panel.get("id") for panel in board["panels"]] + [
        panel.get("id") for row in board["panels"] if row.get("type") == "row" for panel in row.get("panels", [])
    ]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}: {ids}"
    seen = list(panels(board))
    assert seen, name
    for panel in seen:
        title = panel.get("title")
        assert title, f"{name}: a panel without a title"
        assert panel.get("type") in {"timeseries", "stat", "gauge", "bargauge", "table"}, (title, panel.get("type"))
        assert panel.get("description"), f"{name} / {title}: say what the panel means"
        assert panel.get("datasource") == DATASOURCE, (title, panel.get("datasource"))
        targets = panel.get("targets") or []
        assert targets, f"{name} / {title}: no query"
        refs = [t.get("refId") for t in targets]
        assert len(refs) == len(set(refs)), (title, refs)
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, (title, target)
            assert target.get("expr", "").strip(), (title, target)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit in GRAFANA_UNITS, f"{name} / {title}: unit {unit!r}"
        pos = panel.get("gridPos", {})
        assert pos.get("w", 0) > 0 and pos.get("h", 0) > 0 and pos.get("x", 0) + pos["w"] <= 24, (title, pos)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_variables_are_the_allowed_ones_used_only_as_regex_matchers(name: str) -> None:
    board = DASHBOARDS[name]
    defined = {var["name"]: var for var in board.get("templating", {}).get("list", [])}
    assert set(defined) <= TEMPLATE_VARS, set(defined) - TEMPLATE_VARS
    for var in defined.values():
        assert var.get("type") == "query", var["name"]
        assert var.get("datasource") == DATASOURCE, var["name"]
        # "All" must be `.*`, like the live test; Grafana's default (a|b|c of the values known at load time)
        # hides a version that appears later.
        assert var.get("allValue") == ".*", var["name"]
    used: set[str] = set()
    for where, expr in exprs(board):
        for var_name in re.findall(r"\$\{?(\w+)", expr):
            assert var_name == "__rate_interval" or var_name in TEMPLATE_VARS, f"{where}: ${var_name}"
            if var_name in TEMPLATE_VARS:
                assert var_name in defined, f"{where}: ${var_name} is not defined in {name}"
                used.add(var_name)
        assert "${" not in expr, f"{where}: use $var, not ${{var}} or formats"
        for var_name in TEMPLATE_VARS:
            plain = expr.count(f"${var_name}") - len(re.findall(rf"\${var_name}\w", expr))
            assert plain == expr.count(f'=~"${var_name}"'), f'{where}: ${var_name} only as label=~"${var_name}"'
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert expr.count(RATE_INTERVAL) == sum(r == RATE_INTERVAL for r in ranges), (
            f"{where}: {RATE_INTERVAL} only as a range"
        )
    assert used == set(defined), f"{name}: variables defined but never used: {set(defined) - used}"


def test_brackets_balance() -> None:
    # the cheapest check, independent of the parser: a quote-aware count of (), {}, []
    pairs = {")": "(", "}": "{", "]": "["}
    for where, expr in ALL_EXPRS:
        stack: list[str] = []
        for token in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
            if token in "({[":
                stack.append(token)
            elif token in pairs:
                assert stack and stack.pop() == pairs[token], f"{where}: unbalanced {token!r} in {expr}"
        assert not stack, f"{where}: unclosed {stack} in {expr}"


# -- PromQL, through a parser ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def promql() -> Any:
    return pytest.importorskip("promql_parser", reason="promql-parser (dev dependency) is not installed")


def nodes(promql: Any, tree: Any) -> list[Any]:
    seen: list[Any] = []
    promql.walk(tree, lambda node, *_: seen.append(node))
    return seen


def selector_name(node: Any) -> str:
    if node.name:
        return str(node.name)
    by_name = [m.value for m in node.matchers.matchers if m.name == "__name__" and str(m.op) == "MatchOp.Equal"]
    assert by_name, f"selector without a metric name: {node}"
    return str(by_name[0])


def test_every_expression_parses(promql: Any) -> None:
    failures = []
    for where, expr in ALL_EXPRS:
        try:
            promql.parse(substitute(expr))
        except ValueError as exc:
            failures.append(f"{where}: {exc}: {expr}")
    assert not failures, "\n".join(failures)


def test_the_parser_catches_what_these_tests_rely_on(promql: Any) -> None:
    for broken in ("sum(rate(x[1m])", 'x{a=~"("}', "rate(x)", "sum by (a) (x) (y)"):
        with pytest.raises(ValueError):
            promql.parse(broken)


def test_metric_and_label_names_exist(promql: Any) -> None:
    """Each metric is declared in rtml.core.metrics (or recorded by deploy/prometheus rules, or written by
    Prometheus itself); each matcher and grouping label is one that metric can carry."""
    failures = []
    for where, expr in ALL_EXPRS:
        tree = promql.parse(substitute(expr))
        labels_here: set[str] = set()
        for node in nodes(promql, tree):
            if type(node).__name__ != "VectorSelector":
                continue
            name = selector_name(node)
            if name in RECORDED:
                labels_here |= {"__any__"}
                continue
            known = SERIES.get(name, SYNTHETIC.get(name))
            if known is None:
                failures.append(f"{where}: {name} is not declared in rtml.core.metrics")
                continue
            labels_here |= known
            for matcher in node.matchers.matchers:
                if matcher.name != "__name__" and matcher.name not in known:
                    failures.append(f"{where}: {name} has no label {matcher.name!r}")
        if "__any__" in labels_here:
            continue
        for node in nodes(promql, tree):
            kind = type(node).__name__
            grouping: list[str] = []
            if kind == "AggregateExpr" and node.modifier is not None:
                grouping = list(node.modifier.labels)
            elif kind == "BinaryExpr" and node.modifier is not None and node.modifier.matching is not None:
                grouping = list(node.modifier.matching.labels)
            failures += [f"{where}: no metric here has a label {lb!r}" for lb in grouping if lb not in labels_here]
    assert not failures, "\n".join(failures)


def test_rates_follow_the_rate_interval(promql: Any) -> None:
    failures = []
    for where, expr in ALL_EXPRS:
        tree = promql.parse(substitute(expr, f"{SENTINEL_S}s"))
        for node in nodes(promql, tree):
            if type(node).__name__ == "Call" and node.func.name in RATE_FUNCTIONS:
                (arg,) = node.args
                if type(arg).__name__ != "MatrixSelector" or arg.range.total_seconds() != SENTINEL_S:
                    failures.append(f"{where}: {node.func.name}() over a window other than {RATE_INTERVAL}")
            if type(node).__name__ == "MatrixSelector":
                name = selector_name(node.vector_selector)
                if name in SERIES and not name.endswith(("_total", "_bucket", "_sum", "_count")):
                    failures.append(f"{where}: a range over the gauge {name}")
    assert not failures, "\n".join(failures)


def test_zero_fallbacks_only_for_counters(promql: Any) -> None:
    """``... or on() vector(0)`` shows 0 for "nothing happened", which is true of a counter that has not moved
    yet (dead letters, retrains) and false of anything else: an AUC of 0 is not "no AUC". Without ``on()`` the
    fallback would add a stray unlabelled 0 series next to the real ones."""
    failures = []
    for where, expr in ALL_EXPRS:
        if "vector(" not in expr:
            continue
        if not re.search(r"\bor on\(\) vector\(0\)\s*$", expr):
            failures.append(f"{where}: a constant vector only as a trailing `or on() vector(0)`")
        tree = promql.parse(substitute(expr))
        names = [selector_name(n) for n in nodes(promql, tree) if type(n).__name__ == "VectorSelector"]
        failures += [f"{where}: zero fallback over {n}, not a counter" for n in names if not n.endswith("_total")]
    assert not failures, "\n".join(failures)


def test_latency_panels_are_in_seconds(promql: Any) -> None:
    """A quantile of a ``*_seconds`` histogram is a duration: Grafana must show it as one (unit ``s``)."""
    for board in DASHBOARDS.values():
        for panel in panels(board):
            unit = panel["fieldConfig"]["defaults"]["unit"]
            for target in panel["targets"]:
                tree = promql.parse(substitute(target["expr"]))
                found = nodes(promql, tree)
                quantile = any(type(n).__name__ == "Call" and n.func.name == "histogram_quantile" for n in found)
                names = {selector_name(n) for n in found if type(n).__name__ == "VectorSelector"}
                if quantile and all(n.endswith("_seconds_bucket") for n in names):
                    assert unit == "s", f"{board['uid']} / {panel['title']}: unit {unit!r}, want 's'"
                if names == {"rtml_http_requests_total"} and "rate(" in target["expr"]:
                    assert unit in {"reqps", "percentunit"}, f"{board['uid']} / {panel['title']}: unit {unit!r}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    """Prometheus' own parser, through the one promtool command that parses expressions offline: each
    expression as a recording rule of a throwaway rule file."""
    rules = [{"record": f"grafana_check_{i}", "expr": substitute(expr)} for i, (_, expr) in enumerate(ALL_EXPRS)]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)  # noqa: S603,S607
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


# -- provisioning ---------------------------------------------------------------------------------------------
def test_datasource_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert doc["apiVersion"] == 1
    (source,) = doc["datasources"]
    assert source["uid"] == DATASOURCE["uid"] and source["type"] == DATASOURCE["type"]
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"], (
        "$__rate_interval is derived from the datasource's scrape interval"
    )


def test_dashboard_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "rtml.yml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT


def test_compose_mounts_what_provisioning_expects() -> None:
    compose_file = ROOT / "docker-compose.yml"
    if not compose_file.is_file():
        pytest.skip("no docker-compose.yml")
    services = (yaml.safe_load(compose_file.read_text()) or {}).get("services", {})
    grafana = [s for s in services.values() if str(s.get("image", "")).startswith("grafana/")]
    if not grafana:
        pytest.skip("docker-compose.yml has no Grafana service yet")
    (service,) = grafana
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        mounts[target] = str(Path(source).as_posix()).removeprefix("./")
    assert mounts.get(DASHBOARDS_MOUNT) == "deploy/grafana/dashboards", mounts
    assert mounts.get(PROVISIONING_MOUNT) == "deploy/grafana/provisioning", mounts
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    home = environment.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert home.startswith(DASHBOARDS_MOUNT + "/"), home
        assert home.removeprefix(DASHBOARDS_MOUNT + "/") in DASHBOARDS, f"{home}: no such dashboard file"
