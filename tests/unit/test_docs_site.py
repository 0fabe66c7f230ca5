"""The docs site (mkdocs.yml, docs/): builds with --strict, and its generated reference pages match the code.

The API reference must list every operation of every service's OpenAPI schema, and the configuration
reference every Settings field under the variable pydantic-settings really reads (checked by setting it)
and every rtml.yaml key. --strict turns broken links and anchors, and pages left out of the nav, into errors.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from rtml.core.config import PlatformConfig
from rtml.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (dev extra)")


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rtml_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as mkdocs does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    generated: dict[str, str] = hooks.generate_pages()
    return generated


def test_strict_build_has_every_page_and_loads_nothing_from_outside(site: Path) -> None:
    for page in ("index", "quickstart", "features", "serving", "learning-loop", "operations", "scaling",
                 "reference/api", "reference/configuration", "CONVENTIONS"):  # fmt: skip
        assert (site / f"{page}.html").is_file(), page
    # Nothing is fetched at view time: no script, stylesheet, font or image from another host.
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert not re.search(r"<(script|img|link)[^>]*(src|href)=\"(https?:)?//", text), html
    for css in site.rglob("*.css"):
        assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", css.read_text(encoding="utf-8")), css


def test_every_docs_page_is_in_the_nav() -> None:
    """--strict also fails on this (validation.nav.omitted_files: warn); this names the page."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk <= listed, on_disk - listed
    assert set(hooks.generate_pages()) <= listed


def test_api_reference_lists_every_route_of_every_service(site: Path, pages: dict[str, str]) -> None:
    api = pages[hooks.API_PAGE]
    html = (site / "reference" / "api.html").read_text(encoding="utf-8")
    routes = list(hooks.all_routes())
    assert {service for service, _, _ in routes} == set(hooks.SERVICES)
    for service in hooks.SERVICES:
        for path, ops in hooks.service_openapi(service)["paths"].items():
            for method in ops:
                assert f"### `{method.upper()} {path}`" in api, (service, method, path)
                assert f"{method.upper()} {path}" in html
    # each /v1 route names the scope its API key needs
    for service in hooks.SERVICES:
        scopes = hooks.route_scopes(service)
        for path, ops in hooks.service_openapi(service)["paths"].items():
            for method in ops:
                assert scopes.get((method.upper(), path)) in {"ingest", "predict", "admin", "read"}, (method, path)
    assert "## Errors" in api and '{"error": {"code"' in api


def _value_for(default: Any, annotation: Any) -> tuple[str, Any]:
    """An environment value of the field's type that differs from its default, and what it parses to."""
    text = str(annotation)
    if "Literal" in text:
        choice = next(c for c in re.findall(r"'([^']+)'", text) if c != default)
        return choice, choice
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    if "SecretStr" in text:
        return "s3cret", SecretStr("s3cret")
    if "Path" in text:
        return "/tmp/rtml-docs-test", Path("/tmp/rtml-docs-test")
    return "docs-test-value", "docs-test-value"


def test_configuration_reference_names_the_variables_pydantic_settings_reads(
    pages: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = pages[hooks.CONFIG_PAGE]
    docs = hooks.settings_docs()
    expected_paths = set()
    for name, info in Settings.model_fields.items():
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            expected_paths |= {f"{name}.{sub}" for sub in tp.model_fields}
        else:
            expected_paths.add(name)
    assert {d.path for d in docs} == expected_paths
    for d in docs:
        assert f"| `{d.env}` | `{d.path}` |" in conf, d.env
        # the documented name is the one pydantic-settings reads: set it, and the field changes
        group, _, sub = d.path.partition(".")
        info = Settings.model_fields[group] if not sub else Settings.model_fields[group].annotation.model_fields[sub]  # type: ignore[union-attr]
        default = info.get_default(call_default_factory=True)
        raw, parsed = _value_for(default, info.annotation)
        with monkeypatch.context() as m:
            m.setenv(d.env, raw)
            s = Settings(_env_file=None)  # type: ignore[call-arg]
        got = getattr(getattr(s, group), sub) if sub else getattr(s, group)
        if isinstance(parsed, SecretStr):
            assert got is not None and got.get_secret_value() == parsed.get_secret_value(), d.env
        elif d.type.startswith("duration"):
            assert got == int(raw) * 1000, d.env  # a bare number of seconds
        else:
            assert got == parsed, d.env
    # the contract's names are there
    for env in ("RTML_KAFKA_BOOTSTRAP", "RTML_REDIS_URL", "RTML_CONFIG", "RTML_TOPIC_PREFIX", "RTML_API_KEYS",
                "RTML_LOG_LEVEL", "RTML_INGEST_PORT", "RTML_DEDUP_HORIZON", "RTML_KAFKA_SASL_USERNAME"):  # fmt: skip
        assert f"`{env}`" in conf


def test_configuration_reference_lists_every_platform_config_key(pages: dict[str, str]) -> None:
    conf = pages[hooks.CONFIG_PAGE]
    sections = re.split(r"^### ", conf, flags=re.M)
    by_title = {s.split("\n", 1)[0]: s for s in sections[1:]}
    top = by_title["rtml.yaml (top level)"]
    for key in PlatformConfig.model_fields:
        assert f"| `{key}` |" in top, key
    models = hooks.config_models()
    assert {m.__name__ for m in models} >= {"EntityDef", "FeatureDef", "ModelDef", "LabelRule", "RetrainPolicy",
                                            "RolloutPolicy", "QualityDef", "EventFilter"}  # fmt: skip
    for model in models[1:]:
        section = by_title[model.__name__]
        for key in hooks.config_keys(model):
            assert f"| `{key}` |" in section, (model.__name__, key)
    # constraints and defaults come through: RolloutPolicy.canary_share is in [0, 1)
    assert re.search(r"\| `canary_share` \| number \| `0.0` \| ≥ 0.0, < 1.0 \|", by_title["RolloutPolicy"])
    assert "| `window` | duration \\| null | unset |" in by_title["FeatureDef"]  # a cell's pipe is escaped
