"""The deployment files checked against rtml itself: docker-compose.yml, Dockerfile, deploy/k8s, and the
Prometheus and Grafana files as Compose mounts them.

Tool checks (``docker-compose config -q``, ``kubectl kustomize | kubernetes-validate``) skip, saying why, when
the tool is absent. The other checks read the files and compare them with what rtml really accepts, derived
from the code every time (``rtml.core.settings.Settings``, the ``rtml`` CLI, ``rtml.core.kafka.TOPICS``), never
from a list kept here: a setting renamed or a command changed makes them fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from rtml.cli.main import app as cli_app
from rtml.cli.serve import Service
from rtml.core.config import parse_config
from rtml.core.kafka import TOPICS
from rtml.core.settings import SERVICES, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
KUSTOMIZATIONS = [K8S / "base", *sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))]
KUSTOMIZE_IDS = [str(p.relative_to(K8S)) for p in KUSTOMIZATIONS]


# -- what rtml accepts ------------------------------------------------------------------------------------------
def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class of a nested settings group (``KafkaSettings``, also inside ``X | None``)."""
    candidates = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        candidates = list(typing.get_args(annotation))
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


@cache
def setting_env_names() -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every environment variable Settings reads -> (attribute path, annotation), from the model itself:
    ``env_prefix`` + field name, and for nested groups prefix + group + ``env_nested_delimiter`` + subfield
    (``env_nested_max_split`` = 1 keeps the subfield's own underscores: RTML_KAFKA_SASL_USERNAME)."""
    config = Settings.model_config
    prefix = config.get("env_prefix", "")
    delimiter = config.get("env_nested_delimiter")
    assert not config.get("case_sensitive"), "names below are compared upper-case"
    assert config.get("env_nested_max_split") == 1, "the nested names below assume one split after the group"
    names: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name, field in Settings.model_fields.items():
        assert field.alias is None and field.validation_alias is None, f"{name}: aliases are not derived here"
        names[f"{prefix}{name}".upper()] = ((name,), field.annotation)
        group = _model_in(field.annotation)
        if group is not None and delimiter:
            for sub, subfield in group.model_fields.items():
                names[f"{prefix}{name}{delimiter}{sub}".upper()] = ((name, sub), subfield.annotation)
    return names


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def settings_from(env: Mapping[str, str]) -> Settings:
    """Settings exactly as a container with this environment builds them (no .env, no variable from here),
    after checking each RTML_* name is one Settings reads and its value arrives where it should: pydantic-settings
    ignores unknown names (``extra="ignore"``), so a misspelt variable would otherwise vanish without a word."""
    names = setting_env_names()
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.upper().startswith("RTML_"):
                mp.delenv(key)
        for key, raw in env.items():
            if key.upper().startswith("RTML_"):
                mp.setenv(key, raw)
        try:
            settings = Settings(_env_file=None)  # type: ignore[call-arg]
        except ValidationError as exc:
            pytest.fail(f"rtml would not start with this environment: {exc}")
    for key, raw in env.items():
        if not key.upper().startswith("RTML_"):
            continue
        assert key.upper() in names, f"{key} is not a setting of rtml.core.settings.Settings"
        path, annotation = names[key.upper()]
        got: Any = settings
        for part in path:
            got = getattr(got, part)
        expected = TypeAdapter(annotation).validate_python(raw)
        assert _plain(got) == _plain(expected), f"{key}={raw!r} did not reach settings.{'.'.join(path)}"
    return settings


@cache
def cli() -> Any:
    """The ``rtml`` click command tree (Typer may vendor its own click: duck-typed below)."""
    return typer.main.get_command(cli_app)


def check_rtml_argv(argv: Sequence[str]) -> None:
    """``rtml ARGV`` parses: the command exists and takes these arguments and options (nothing is run)."""
    command = cli()
    args = list(argv)
    path = ["rtml"]
    while hasattr(command, "commands"):  # a group
        assert args, f"rtml {' '.join(argv)}: names no command"
        name = args.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"rtml {' '.join(argv)}: no command {name!r} (has {sorted(command.commands)})"
        command, path = sub, [*path, name]
    try:
        command.make_context(" ".join(path), args)
    except Exception as exc:  # click's UsageError/BadParameter, from whichever click Typer uses
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"rtml {' '.join(argv)}: {message}")


def served_service(argv: Sequence[str]) -> str | None:
    """The service of ``rtml serve NAME``, else None."""
    return argv[1] if len(argv) >= 2 and argv[0] == "serve" else None


def test_the_serve_command_and_settings_agree_on_the_services() -> None:
    assert {s.value for s in Service} == set(SERVICES)


# -- docker-compose.yml -----------------------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose's ``${VAR:-default}`` with nothing set in the shell: the default (``${VAR}``: empty)."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", text).replace("$$", "$")


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(v) for k, v in env.items()}


def dockerfile_instructions(keyword: str) -> list[str]:
    """The arguments of every ``KEYWORD`` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.upper().startswith(f"{keyword} ")]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile_instructions("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = value
    return env


def rtml_compose_services() -> dict[str, dict[str, Any]]:
    """Compose services that run the rtml image built from ./Dockerfile."""
    return {n: s for n, s in compose_services().items() if "build" in s}


def container_env(service: Mapping[str, Any]) -> dict[str, str]:
    """What the process sees: the image's ENV, then the service's environment over it."""
    return {**dockerfile_env(), **compose_env(service)}


def container_ports(service: Mapping[str, Any]) -> set[int]:
    ports: set[int] = set()
    for spec in service.get("ports") or []:
        target = spec["target"] if isinstance(spec, dict) else str(spec).split("/")[0].rsplit(":", 1)[-1]
        ports.add(int(target))
    ports.update(int(p) for p in service.get("expose") or [])
    return ports


def healthcheck_urls(service: Mapping[str, Any]) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test") or []
    return re.findall(r"https?://[^\s'\"]+", " ".join(test) if isinstance(test, list) else str(test))


def test_compose_config_is_valid() -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    done = subprocess.run(  # noqa: S603
        [docker_compose, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "RTML_API_KEYS": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "name" not in compose(), "docker-compose 1.29 rejects a top-level name:"


def test_compose_runs_every_service_once_with_the_right_command_port_and_healthcheck() -> None:
    served: dict[str, str] = {}
    for name, service in rtml_compose_services().items():
        argv = [interpolate(a) for a in service["command"]]
        check_rtml_argv(argv)
        settings = settings_from(container_env(service))
        svc = served_service(argv)
        if svc is None:
            continue
        assert svc not in served.values(), f"{name}: {svc} already runs as {served}"
        served[name] = svc
        port = settings.port_of(svc)  # type: ignore[arg-type]
        assert settings.host == "0.0.0.0", f"{name}: RTML_HOST must be 0.0.0.0 to be reachable from other containers"
        assert container_ports(service) == {port}, f"{name}: publishes {container_ports(service)}, listens on {port}"
        urls = healthcheck_urls(service)
        assert urls, f"{name}: no healthcheck URL"
        for url in urls:
            assert re.fullmatch(rf"http://(127\.0\.0\.1|localhost):{port}/(readyz|healthz)", url), f"{name}: {url}"
        assert settings.kafka.bootstrap and settings.redis.url, f"{name}: needs RTML_KAFKA_BOOTSTRAP and RTML_REDIS_URL"
    assert sorted(served.values()) == sorted(SERVICES)


def test_compose_dependencies_wait_for_health_or_completion() -> None:
    services = compose_services()
    for name, service in services.items():
        one_shot = str(service.get("restart", "no")) == "no"
        health = service.get("healthcheck") or {}
        if not one_shot and "build" not in service:  # infrastructure: Kafka, Redis, Prometheus, Grafana
            assert health.get("test") and not health.get("disable"), (
                f"{name}: a long-running service needs a healthcheck"
            )
        if not one_shot and served_service([interpolate(a) for a in service.get("command") or []]):
            assert health.get("test") and not health.get("disable"), f"{name}: an rtml service needs a healthcheck"
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions (the long form)"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            target = services[dep]
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert (target.get("healthcheck") or {}).get("test"), (
                    f"{name} waits for {dep}, which has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert str(target.get("restart", "no")) == "no", f"{name} waits for {dep} to finish, but it restarts"
            else:
                pytest.fail(
                    f"{name} -> {dep}: condition {condition!r}; use service_healthy or ..._completed_successfully"
                )

    def waits_for(name: str) -> set[str]:
        direct = set(services[name].get("depends_on") or {})
        return direct.union(*(waits_for(d) for d in direct))

    for name in rtml_compose_services():
        assert {"kafka-init", "redis"} <= waits_for(name), f"{name} may start before the topics and Redis exist"


def test_kafka_init_creates_the_topics_the_services_use() -> None:
    services = compose_services()
    init = services["kafka-init"]
    env = compose_env(init)
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    for var in ("TOPICS", "TOPIC_PREFIX", "PARTITIONS", "REPLICATION_FACTOR"):
        assert f"$${var}" in script or f"$${{{var}}}" in script, f"the init script does not use ${var}"
    assert "--create" in script and "--if-not-exists" in script
    assert env["TOPICS"].split() == list(TOPICS)
    for name, service in rtml_compose_services().items():
        s = settings_from(container_env(service))
        assert s.topic_prefix == env["TOPIC_PREFIX"], name
        assert s.kafka.partitions == int(env["PARTITIONS"]), f"{name}: RTML_KAFKA_PARTITIONS differs from kafka-init"
        assert s.kafka.replication_factor == int(env["REPLICATION_FACTOR"]), name
    kafka_env = compose_env(services["kafka"])
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics must come from kafka-init alone"
    bootstraps = {settings_from(container_env(s)).kafka.bootstrap for s in rtml_compose_services().values()}
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert all(f"//{b}" in advertised for b in bootstraps), f"{bootstraps} not advertised in {advertised}"


def test_redis_is_append_only_and_persisted() -> None:
    redis = compose_services()["redis"]
    command = [str(c) for c in redis["command"]]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_dockerfile_runs_rtml_as_a_non_root_user_with_a_healthcheck() -> None:
    (entrypoint,) = dockerfile_instructions("ENTRYPOINT")
    (cmd,) = dockerfile_instructions("CMD")
    assert json.loads(entrypoint) == ["rtml"]
    check_rtml_argv(json.loads(cmd))
    settings_from(dockerfile_env())  # every RTML_* ENV is a real setting
    users = dockerfile_instructions("USER")
    assert users and users[-1].split(":")[0] not in ("0", "root")
    exposed = {int(p) for args in dockerfile_instructions("EXPOSE") for p in args.split()}
    defaults = settings_from({})
    assert exposed == {defaults.port_of(s) for s in SERVICES}
    (health,) = dockerfile_instructions("HEALTHCHECK")
    argv = json.loads(health.split(" CMD ", 1)[1])
    compile(argv[-1], "HEALTHCHECK", "exec")  # the inline script is valid Python
    assert "/healthz" in argv[-1]


def test_prometheus_scrapes_every_compose_service_where_it_listens() -> None:
    prometheus = compose_services()["prometheus"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prometheus["volumes"]}
    assert (COMPOSE_FILE.parent / mounts["/etc/prometheus"]).resolve() == PROMETHEUS_DIR.resolve()
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for pattern in config.get("rule_files") or []:
        local = str(pattern).removeprefix("/etc/prometheus/")
        assert list(PROMETHEUS_DIR.glob(local)), f"rule_files {pattern} is not in deploy/prometheus"
    services = compose_services()
    scraped: set[str] = set()
    for job in config["scrape_configs"]:
        targets: list[tuple[str, int, dict[str, str]]] = []
        for static in job.get("static_configs") or []:
            for t in static["targets"]:
                host, port = t.rsplit(":", 1)
                targets.append((host, int(port), static.get("labels") or {}))
        for dns in job.get("dns_sd_configs") or []:
            targets += [(n, int(dns["port"]), {}) for n in dns["names"]]
        for host, port, labels in targets:
            assert host in services, f"job {job['job_name']}: {host} is not a compose service"
            service = services[host]
            svc = served_service([interpolate(a) for a in service.get("command") or []])
            if svc is None:
                assert port in container_ports(service), f"{host}:{port}: {host} does not listen on {port}"
                continue
            assert port == settings_from(container_env(service)).port_of(svc), f"{host}:{port}"  # type: ignore[arg-type]
            assert labels.get("service", svc) == svc, f"{host}:{port} labelled service={labels['service']}"
            scraped.add(svc)
    assert scraped == set(SERVICES)


def test_grafana_provisioning_points_at_compose_prometheus_and_mounted_dashboards() -> None:
    datasources = sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.y*ml"))
    providers = sorted((GRAFANA_DIR / "provisioning" / "dashboards").glob("*.y*ml"))
    if not datasources or not providers:
        pytest.skip("deploy/grafana/provisioning has no datasource or dashboard provider yet")
    services = compose_services()
    grafana = services["grafana"]
    mounts = {str(v).split(":")[1]: (COMPOSE_FILE.parent / str(v).split(":")[0]).resolve() for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA_DIR / "provisioning").resolve()
    for path in datasources:
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            m = re.fullmatch(r"https?://([\w.-]+):(\d+)/?", ds["url"])
            assert m, ds["url"]
            assert m.group(1) in services and int(m.group(2)) in container_ports(services[m.group(1)]), ds["url"]
    for path in providers:
        for provider in yaml.safe_load(path.read_text())["providers"]:
            where = provider["options"]["path"]
            assert mounts.get(where) == (GRAFANA_DIR / "dashboards").resolve(), (
                f"{path.name}: {where} is not the dashboards mount"
            )
    home = compose_env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (GRAFANA_DIR / "dashboards" / Path(home).relative_to("/var/lib/grafana/dashboards")).is_file(), home


# -- deploy/k8s ---------------------------------------------------------------------------------------------------
KUSTOMIZE_MIN = (5, 0)  # deploy/k8s uses `labels:` and `patches:` with label-selected targets


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:2])


@cache
def kustomize_command() -> list[str]:
    """``kustomize build`` when installed, else ``kubectl kustomize`` (its built-in kustomize, when recent)."""
    standalone = shutil.which("kustomize")
    if standalone is not None:
        return [standalone, "build"]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("neither kustomize nor kubectl is installed (either renders deploy/k8s)")
    done = subprocess.run(  # noqa: S603
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30
    )
    embedded = json.loads(done.stdout or "{}").get("kustomizeVersion", "") if done.returncode == 0 else ""
    if not embedded or _version(embedded) < KUSTOMIZE_MIN:
        pytest.skip(
            f"{kubectl} embeds kustomize {embedded or '< v4'}; deploy/k8s needs kustomize >= v5 "
            "(install a kubectl from 1.27 on, or kustomize)"
        )
    return [kubectl, "kustomize"]


@cache
def kustomize(directory: Path) -> str:
    done = subprocess.run(  # noqa: S603
        [*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def rendered(directory: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(kustomize(directory)) if d]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZE_IDS)
def test_kustomize_output_is_valid_kubernetes(directory: Path) -> None:
    text = kustomize(directory)
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e .[dev])")
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-"],
        input=text, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Secret" not in {d["kind"] for d in rendered(directory)}, "secrets are referenced, never shipped"


def _pod_containers(doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers") or []
    yield from spec["containers"]


def _container_env(container: Mapping[str, Any], config_maps: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The container's plain environment: ConfigMaps of envFrom, then literal env values. Secret references
    are checked by name only (the values are not here)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        assert "configMapRef" in source, "only ConfigMaps in envFrom; secrets are referenced key by key"
        env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["name"] in setting_env_names(), f"{item['name']} is not a setting"
            ref = item["valueFrom"].get("secretKeyRef")
            assert ref is not None, f"{item['name']}: only secret references besides plain values"
    return env


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZE_IDS)
def test_kubernetes_workloads_match_rtml(directory: Path) -> None:
    docs = rendered(directory)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    config_maps = {d["metadata"]["name"]: d.get("data") or {} for d in by_kind.get("ConfigMap", [])}
    services = by_kind.get("Service", [])
    served: dict[str, dict[str, Any]] = {}
    for workload in by_kind.get("Deployment", []) + by_kind.get("Job", []):
        pod = workload["spec"]["template"]
        mounts_by_volume = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for container in _pod_containers(workload):
            argv = container.get("args") or []
            check_rtml_argv(argv)
            settings = settings_from(_container_env(container, config_maps))
            context = f"{workload['metadata']['name']}/{container['name']}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, context
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, context
            assert container["resources"]["requests"], context
            if settings.config is not None:  # RTML_CONFIG must be a file a ConfigMap mounts, holding a valid config
                mount = next(m for m in container["volumeMounts"] if settings.config.parent == Path(m["mountPath"]))
                volume = mounts_by_volume[mount["name"]]
                data = config_maps[volume["configMap"]["name"]][settings.config.name]
                parse_config(yaml.safe_load(data), f"ConfigMap {volume['configMap']['name']}")
            svc = served_service(argv)
            if svc is None:
                continue
            assert workload["kind"] == "Deployment" and svc not in served, context
            served[svc] = workload
            port = settings.port_of(svc)  # type: ignore[arg-type]
            assert settings.host == "0.0.0.0", context
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"http": port}, f"{context}: ports {ports}, rtml listens on {port}"
            for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                get = container[probe]["httpGet"]
                assert get["path"] == path and get["port"] in ("http", port), f"{context}: {probe} {get}"
            annotations = pod["metadata"].get("annotations") or {}
            assert annotations.get("prometheus.io/scrape") == "true", context
            assert int(annotations["prometheus.io/port"]) == port, context
            assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", context
            labels = pod["metadata"]["labels"]
            exposing = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
            assert len(exposing) == 1, f"{context}: {len(exposing)} Services select it"
            (svc_port,) = exposing[0]["spec"]["ports"]
            assert svc_port["targetPort"] in ("http", port), context
    assert sorted(served) == sorted(SERVICES)

    def selected(selector: Mapping[str, str]) -> list[str]:
        return [s for s, d in served.items() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    pdbs = [selected(p["spec"]["selector"]["matchLabels"]) for p in by_kind.get("PodDisruptionBudget", [])]
    assert sorted(s for sel in pdbs for s in sel) == sorted(SERVICES), f"one PDB per service: {pdbs}"
    names = {d["metadata"]["name"]: s for s, d in served.items()}
    scaled = {names[h["spec"]["scaleTargetRef"]["name"]] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    assert scaled == {"ingest", "serving"}
    for svc in scaled:  # the HPA owns the replica count: a fixed one would be reset on every apply
        assert "replicas" not in served[svc]["spec"], f"{svc}: replicas set although an HPA scales it"
