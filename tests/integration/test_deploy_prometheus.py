"""deploy/prometheus checked with Prometheus's own tool: ``promtool check config``, ``check rules`` and the
rule unit tests (``promtool test rules deploy/prometheus/tests/*.yml``), plus the house rules of alerts.yml:
every alert waits (``for``), has a severity and says what to do, and has a unit test that fires it and one
that keeps it quiet.

The promtool checks skip, saying why, when promtool is absent (Debian package ``prometheus``; .ci/run
installs it). The house rules need only the YAML.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import rtml.core.metrics  # noqa: F401 -- registers every rtml metric in REGISTRY

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
SERVICES = ("ingest", "features", "serving", "feedback")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run installs it)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_promtool_check_config() -> None:
    done = promtool("check", "config", CONFIG.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr  # alerts.yml is really loaded


@needs_promtool
def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests"
    done = promtool("test", "rules", *(str(p.relative_to(PROMETHEUS_DIR)) for p in RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_config_scrapes_the_four_services_as_job_rtml_and_loads_alerts_yml() -> None:
    config = load(CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    rtml = jobs["rtml"]
    assert rtml.get("honor_labels") is True  # the HTTP metrics' own `service` label stays `service`
    labelled = {target: group["labels"]["service"] for group in rtml["static_configs"] for target in group["targets"]}
    assert sorted(labelled.values()) == sorted(SERVICES)
    for target, service in labelled.items():
        assert target.split(":")[0] == service  # Docker Compose service names


def test_every_alert_waits_has_a_severity_and_says_what_to_do() -> None:
    found = alerts()
    assert len(found) >= 7
    for rule in found:
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and len(annotations["description"]) > 80, name


def test_the_rules_read_only_metrics_rtml_exposes_and_series_they_record() -> None:
    """promtool cannot know rtml's metric names: a renamed metric would leave an alert that never fires."""
    exposed = set(REGISTRY._names_to_collectors)  # noqa: SLF001 -- every sample name, incl. _total/_bucket
    rule_list = [rule for group in load(RULES)["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rule_list if "record" in rule}
    for rule in rule_list:
        expr = rule["expr"]
        for name in re.findall(r"\b[a-z_]+:[a-z0-9_:]+", expr):
            assert name in recorded, f"{rule.get('record') or rule['alert']} reads {name}, which no rule records"
        bare = re.sub(r"\b[a-z_]+:[a-z0-9_:]+", " ", expr)
        for name in re.findall(r"(?<![\w:])rtml_[a-z0-9_]+", bare):
            assert name in exposed, f"{rule.get('record') or rule['alert']} reads {name}, which rtml does not expose"


def _checks(test_file: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per alert name: how many checks expect it to fire, and how many expect it quiet."""
    fires: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in load(test_file)["tests"]:
        for check in case.get("alert_rule_test", []):
            into = fires if check.get("exp_alerts") else quiet
            into[check["alertname"]] = into.get(check["alertname"], 0) + 1
        for check in case.get("promql_expr_test", []):
            expr = check["expr"].replace(" ", "")
            if not expr.startswith('ALERTS{alertname="'):
                continue
            name = expr.split('"')[1]
            into = fires if check.get("exp_samples") else quiet
            into[name] = into.get(name, 0) + 1
    return fires, quiet


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_keeps_it_quiet() -> None:
    fires: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for path in RULE_TESTS:
        f, q = _checks(path)
        for name, n in f.items():
            fires[name] = fires.get(name, 0) + n
        for name, n in q.items():
            quiet[name] = quiet.get(name, 0) + n
    names = {rule["alert"] for rule in alerts()}
    assert not names - fires.keys(), f"alerts no unit test fires: {sorted(names - fires.keys())}"
    assert not names - quiet.keys(), f"alerts no unit test keeps quiet: {sorted(names - quiet.keys())}"
    assert not (fires.keys() | quiet.keys()) - names, "unit tests name alerts that alerts.yml does not have"
