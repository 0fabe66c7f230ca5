"""mkdocs hooks: the API and configuration reference pages, generated at build time from the code itself.

``on_files`` adds two pages that exist only in the build (never committed, so never stale):

- ``reference/api.md``: each service's FastAPI app is built (``create_app``, without starting it: its lifespan
  opens Kafka and Redis, the constructor does not) and ``app.openapi()`` is rendered as Markdown tables;
  the scope each ``/v1`` route requires is read from its ``require(...)`` dependency; the error shape and codes
  from ``rtml.core.errors``.
- ``reference/configuration.md``: every field of ``rtml.core.settings.Settings`` with the environment variable
  pydantic-settings reads it from, and the ``rtml.yaml`` schema from the models of ``rtml.core.config``.
  Descriptions come from ``Field(description=...)``, else from the comment above or beside the field in the
  source, else from ``FALLBACK`` below (fields whose meaning the code does not say).

No network, broker or Redis is needed. The tests (tests/unit/test_docs_site.py) call the same functions.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

SERVICES = ("ingest", "features", "serving", "feedback")
API_PAGE = "reference/api.md"
CONFIG_PAGE = "reference/configuration.md"

# Descriptions of fields that carry none in the code (no Field description, no comment). Keyed by the
# settings' env name or by "Model.key" for rtml.yaml. Only used when the code says nothing.
FALLBACK: dict[str, str] = {
    "RTML_KAFKA_BOOTSTRAP": "Kafka bootstrap servers (`host:port,...`). Unset under `rtml up`: the embedded broker "
    "is started.",
    "RTML_KAFKA_CLIENT_ID": "client id the Kafka clients announce to the broker",
    "RTML_KAFKA_SECURITY_PROTOCOL": "how the clients talk to the broker (TLS and/or SASL)",
    "RTML_KAFKA_SASL_MECHANISM": "SASL mechanism: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`",
    "RTML_KAFKA_SASL_USERNAME": "SASL user name",
    "RTML_KAFKA_SASL_PASSWORD": "SASL password",
    "RTML_KAFKA_SSL_CAFILE": "CA bundle (PEM) that verifies the broker",
    "RTML_KAFKA_SSL_CERTFILE": "client certificate (PEM), for mutual TLS",
    "RTML_KAFKA_SSL_KEYFILE": "client private key (PEM), for mutual TLS",
    "RTML_KAFKA_LINGER_MS": "producer linger: how long a batch waits for more records",
    "RTML_KAFKA_REQUEST_TIMEOUT_MS": "timeout of one request to the broker",
    "RTML_KAFKA_SESSION_TIMEOUT_MS": "consumer-group session timeout (a member silent this long is removed)",
    "RTML_KAFKA_HEARTBEAT_INTERVAL_MS": "consumer-group heartbeat interval",
    "RTML_KAFKA_MAX_POLL_RECORDS": "records per consumer fetch (one micro-batch at most)",
    "RTML_KAFKA_PARTITIONS": "partitions of each topic rtml creates (existing topics keep theirs)",
    "RTML_KAFKA_REPLICATION_FACTOR": "replication factor of each topic rtml creates",
    "RTML_REDIS_URL": "Redis URL (`redis://` or `rediss://`; Redis >= 6.2). Unset under `rtml up`: an embedded "
    "redis-server is started.",
    "RTML_REDIS_MAX_CONNECTIONS": "connections per Redis pool and process",
    "RTML_REDIS_SOCKET_TIMEOUT_S": "Redis socket timeout; an answer slower than this is a 503 / consumer retry",
    "RTML_CONFIG": "path of the platform config; unset: `./rtml.yaml`, else the bundled demo config",
    "RTML_TOPIC_PREFIX": "prefix of every Kafka topic name",
    "RTML_API_KEYS": "`key:scope1+scope2,...` with scopes `ingest`, `predict`, `admin`, `read`; unset: `/v1` is open",
    "RTML_LOG_LEVEL": "log level (`DEBUG`, `INFO`, `WARNING`, ...)",
    "RTML_HOST": "bind address of the services (`0.0.0.0` in containers)",
    "RTML_INGEST_PORT": "port of ingest",
    "RTML_FEATURES_PORT": "port of features",
    "RTML_SERVING_PORT": "port of serving",
    "RTML_FEEDBACK_PORT": "port of feedback",
    "RTML_MAX_BATCH_EVENTS": "most events in one `POST /v1/events`",
    "RTML_MAX_BODY_BYTES": "largest request body (413 above it); model uploads have their own, larger cap",
    "RTML_PREDICTION_LOG_BUFFER": "bounded prediction-log buffer per serving process; when full, new records are "
    "dropped and counted (`rtml_prediction_log_dropped_total`), never waited on",
    "EntityDef.key": "the event field that identifies the entity (`user_id`)",
    "EntityDef.keys": "several event fields (two or more); the entity id is their values joined by `|`",
    "FeatureDef.entity": "the entity the feature belongs to (a key of `entities`)",
    "FeatureDef.agg": "the aggregation",
    "FeatureDef.events": "event types that count; absent: every type (`ratio` uses numerator/denominator)",
    "FeatureDef.field": "what `sum`/`mean`/`min`/`max`/`last`/`distinct_count` read: `properties.NAME`, "
    "`item_id`, `user_id`, `type`",
    "FeatureDef.window": "window width (`90s`, `5m`, `24h`, `7d`); absent: lifetime",
    "FeatureDef.tile": "tile width G; default W/60 rounded down to whole seconds, at least 1 s",
    "FeatureDef.numerator": "`ratio` only: the events counted above the line",
    "FeatureDef.denominator": "`ratio` only: the events counted below the line",
    "FeatureDef.approx": "`distinct_count` only: HyperLogLog (about 0.8 % standard error) instead of exact",
    "EventFilter.events": "event types that count; absent: every type",
    "ModelDef.features": "the model's inputs, in the ONNX model's input order",
    "ModelDef.defaults": "feature -> value used when the feature is missing",
    "ModelDef.label": "derive labels from the event stream (absent: only `POST /v1/outcomes`)",
    "ModelDef.quality": "online quality window",
    "ModelDef.retrain": "retrain by itself (absent: never)",
    "ModelDef.rollout": "how a candidate version earns its place",
    "LabelRule.events": "event types that make the label positive",
    "LabelRule.match": "prediction entity key -> the event field that must equal it",
    "LabelRule.within": "the window after the prediction",
    "LabelRule.positive": "the label when a matching event came within the window",
    "LabelRule.negative": "the label when none did; `null`: no label at all",
    "QualityDef.window": "online quality window (tiles of window/60, at least 1 s)",
    "RetrainPolicy.every_labels": "retrain after this many new labels",
    "RetrainPolicy.min_auc": "... or when the live version's windowed AUC falls below this",
    "RetrainPolicy.max_log_loss": "... or when its windowed log loss rises above this",
    "RetrainPolicy.min_labels": "labels the window must hold before the quality triggers act",
    "RetrainPolicy.min_examples": "never train on fewer stored examples",
    "RetrainPolicy.cooldown": "at least this between two trainings",
    "RolloutPolicy.shadow_labels": "labels a shadow candidate needs before a decision",
    "RolloutPolicy.canary_share": "> 0: after shadow, serve this share of users (sticky) before promoting",
    "RolloutPolicy.canary_labels": "labels the canary needs before a decision",
    "RolloutPolicy.metric": "the metric that decides",
    "RolloutPolicy.min_gain": "the candidate must beat live by more than this",
    "RolloutPolicy.guard_labels": "after a promotion, the old version keeps scoring in shadow for this many labels",
    "RolloutPolicy.max_loss": "... and the promotion is rolled back when the new one is worse by more than this",
    "RolloutPolicy.auto_promote": "`false`: stop at `ready` and let a person promote",
}


def on_files(files: Any, config: Any) -> Any:
    """mkdocs event: add the generated pages to the build (they are then checked like any other page)."""
    from mkdocs.structure.files import File

    for path, content in generate_pages().items():
        files.append(File.generated(config, path, content=content))
    return files


def generate_pages() -> dict[str, str]:
    return {API_PAGE: api_reference(), CONFIG_PAGE: configuration_reference()}


# ----------------------------------------------------------------------------------------------- helpers


def cell(text: object) -> str:
    """One Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: object) -> str:
    return f"`{text}`"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) if c != "" else "" for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    """The anchor mkdocs' default toc extension gives a heading made of ``text``."""
    from markdown.extensions.toc import slugify  # type: ignore[import-untyped]

    return str(slugify(text, "-"))


# ------------------------------------------------------------------------------------------ API reference


def service_openapi(service: str) -> dict[str, Any]:
    """``app.openapi()`` of one service, its app built with default settings (nothing is opened)."""
    from rtml.core.settings import Settings

    module = importlib.import_module(f"rtml.{service}.app")
    app = module.create_app(Settings.model_construct())  # defaults only: no environment, no .env
    schema: dict[str, Any] = app.openapi()
    return schema


def route_scopes(service: str) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> the API-key scope its ``require(scope)`` dependency checks, for every /v1 route."""
    from fastapi.routing import APIRoute

    router = importlib.import_module(f"rtml.{service}.routes").router
    scopes: dict[tuple[str, str], str] = {}
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        for dep in route.dependencies:
            fn = dep.dependency
            if fn is None or not fn.__qualname__.startswith("require."):
                continue
            cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))
            for method in route.methods or ():
                scopes[(method.upper(), route.path)] = str(cells.get("scope", ""))
    return scopes


def schema_type(schema: dict[str, Any]) -> str:
    """A JSON schema as a short type: ``string``, ``integer | null``, ``list[RankedItem]``, ``map[string]``."""
    if not schema:
        return "any"
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{slug(name)})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(dict.fromkeys(schema_type(s) for s in schema[key]))
    if "enum" in schema:
        return " | ".join(code(json.dumps(v)) for v in schema["enum"])
    if "const" in schema:
        return code(json.dumps(schema["const"]))
    kind = schema.get("type")
    if kind == "array":
        return f"list[{schema_type(schema.get('items', {}))}]"
    if kind == "object" and "properties" not in schema:
        extra = schema.get("additionalProperties")
        return f"map[{schema_type(extra)}]" if isinstance(extra, dict) else "object"
    if kind == "object":
        return "object (" + ", ".join(schema["properties"]) + ")"
    if isinstance(kind, list):
        return " | ".join(kind)
    return str(kind or "any")


SCHEMA_CONSTRAINTS = {
    "minLength": "length ≥ {}",
    "maxLength": "length ≤ {}",
    "minItems": "≥ {} items",
    "maxItems": "≤ {} items",
    "maxProperties": "≤ {} keys",
    "minimum": "≥ {}",
    "exclusiveMinimum": "> {}",
    "maximum": "≤ {}",
    "exclusiveMaximum": "< {}",
    "pattern": "matches `{}`",
}


def schema_constraints(schema: dict[str, Any]) -> str:
    found: list[str] = []
    for part in [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]:
        for key, fmt in SCHEMA_CONSTRAINTS.items():
            if key in part:
                found.append(fmt.format(part[key]))
        if part.get("type") == "array" and isinstance(part.get("items"), dict):
            inner = schema_constraints(part["items"])
            if inner:
                found.append(f"each: {inner}")
    return ", ".join(dict.fromkeys(found))


def schema_fields_table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        default = code(json.dumps(prop["default"])) if "default" in prop else ""
        rows.append([
            code(name),
            schema_type(prop),
            "yes" if name in required else "no",
            default,
            schema_constraints(prop),
            prop.get("description", ""),
        ])  # fmt: skip
    extra = "no other fields" if schema.get("additionalProperties") is False else ""
    out = table(["field", "type", "required", "default", "constraints", "description"], rows) if rows else ""
    return out + (f"\n{extra.capitalize()}.\n" if extra else "")


FASTAPI_ERROR_SCHEMAS = {"HTTPValidationError", "ValidationError"}


def response_body(response: dict[str, Any], status: str) -> str:
    content = response.get("content", {})
    for media, body in content.items():
        schema = body.get("schema", {})
        ref = schema.get("$ref", "").rsplit("/", 1)[-1]
        if ref in FASTAPI_ERROR_SCHEMAS:
            # FastAPI declares its own 422 shape; rtml answers every error with its own (see Errors).
            return "[error](#errors), code `invalid`, `details` names each bad field"
        if set(schema) <= {"title"}:
            return f"{media}, JSON (not described by a model)"
        return f"{media}: {schema_type(schema)}"
    if status.startswith(("4", "5")):
        return "[error](#errors)"
    return ""


def render_operation(service: str, method: str, path: str, op: dict[str, Any], scope: str | None) -> str:
    out = [f"### `{method.upper()} {path}`\n"]
    out.append(f"Scope: `{scope}`.\n" if scope else "Scope: none (open).\n")
    if op.get("description"):
        out.append(textwrap.dedent(op["description"]).strip().replace("::\n", ":\n") + "\n")
    params = op.get("parameters", [])
    if params:
        rows = [
            [code(p["name"]), p["in"], schema_type(p.get("schema", {})), "yes" if p.get("required") else "no",
             code(json.dumps(p["schema"]["default"])) if "default" in p.get("schema", {}) else "",
             p.get("description", "")]
            for p in params
        ]  # fmt: skip
        out.append("**Parameters**\n\n" + table(["name", "in", "type", "required", "default", "description"], rows))
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            alternatives = schema.get("oneOf")
            if alternatives:
                out.append(f"**Request body** (`{media}`), one of:\n")
                for alt in alternatives:
                    title = alt.get("title") or schema_type(alt)
                    out.append(f"*{title}*\n\n" + schema_fields_table(alt))
            else:
                out.append(f"**Request body** (`{media}`): {schema_type(schema)}\n")
    responses = op.get("responses", {})
    rows = [[code(status), cell(r.get("description", "")), response_body(r, status)] for status, r in responses.items()]
    out.append("**Responses**\n\n" + table(["status", "meaning", "body"], rows))
    return "\n".join(out)


def error_codes() -> list[tuple[str, int, str, str]]:
    """(class, status, code, doc) of every rtml.core.errors.RtmlError subclass an HTTP caller can meet."""
    from rtml.core import errors

    found = []
    for name, cls in vars(errors).items():
        if isinstance(cls, type) and issubclass(cls, errors.RtmlError) and cls.__module__ == errors.__name__:
            doc = (inspect.getdoc(cls) if cls.__doc__ else "") or ERROR_FALLBACK.get(cls.code, "")
            found.append((name, cls.status, cls.code, doc.split("\n\n")[0]))
    return sorted(found, key=lambda row: (row[1], row[2]))


ERROR_FALLBACK = {
    "bad_request": "the request cannot be handled as sent (e.g. a body that is not JSON)",
    "unauthorized": "`RTML_API_KEYS` is set and the request has no valid `Authorization: Bearer KEY`",
    "forbidden": "the key is valid but lacks the route's scope",
    "not_found": "no such model, version or rollout (or path)",
    "payload_too_large": "the body is over `RTML_MAX_BODY_BYTES` (model uploads: over their own cap)",
    "internal": "a bug: logged with its traceback",
}


def api_reference() -> str:
    out = [
        "# API reference\n",
        "Generated at build time from each service's own OpenAPI schema (`app.openapi()`, what "
        "`GET /openapi.json` serves), so it lists exactly the routes the code declares. A running service also "
        "documents itself interactively at `/docs`.\n",
        "Every service also answers `GET /healthz` (200 while the process lives), `GET /readyz` (200 when its "
        "broker and Redis answer, else 503 naming the failed check) and `GET /metrics` (Prometheus text); these "
        "are open and not part of the OpenAPI schema. When `RTML_API_KEYS` is set, every `/v1` route needs "
        "`Authorization: Bearer KEY` with the scope named below (401 without a key, 403 with the wrong scope).\n",
    ]
    for service in SERVICES:
        from rtml.core.settings import Settings

        port = Settings.model_construct().port_of(service)  # type: ignore[arg-type]
        out.append(f"- [{service}](#{slug(service)}) (port {port})")
    out.append("- [Errors](#errors)\n")
    for service in SERVICES:
        spec = service_openapi(service)
        scopes = route_scopes(service)
        out.append(f"## {service}\n")
        summary = []
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                summary.append([code(f"{method.upper()} {path}"), code(scopes.get((method.upper(), path), "open")),
                                op.get("summary", "")])  # fmt: skip
        out.append(table(["route", "scope", "summary"], summary))
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                out.append(render_operation(service, method, path, op, scopes.get((method.upper(), path))))
        schemas = {
            n: s for n, s in spec.get("components", {}).get("schemas", {}).items() if n not in FASTAPI_ERROR_SCHEMAS
        }
        if schemas:
            out.append(f"### Schemas of {service}\n")
            for name, schema in schemas.items():
                out.append(f"#### {name}\n")
                if schema.get("description"):
                    out.append(cell(schema["description"]) + "\n")
                out.append(schema_fields_table(schema))
    out.append(ERRORS_HEAD)
    rows = [[code(c), str(status), code(name), doc] for name, status, c, doc in error_codes()]
    out.append(table(["code", "status", "raised as", "meaning"], rows))
    out.append(ERRORS_TAIL)
    return "\n".join(out)


ERRORS_HEAD = """## Errors

Every error, from every service, has one shape (whatever the OpenAPI schema says FastAPI would answer):

```json
{"error": {"code": "invalid", "message": "request does not validate",
           "details": [{"field": "events.3.type", "message": "Field required"}]}}
```

`details` is present when there is more to say: for `invalid`, one entry per bad field (a dotted path into
the body; a batch names the index); for `unavailable`, `{"dependency": "kafka"|"redis"}`. 4xx are the caller's
mistakes; bad input is never a 500. 503 always carries `Retry-After`.

Codes (from `rtml.core.errors`; `internal` and `config` are 500s, never caused by a request's content):
"""

ERRORS_TAIL = """
Routing errors use the same shape: `not_found` (404, unknown path) and `method_not_allowed` (405).
"""


# ------------------------------------------------------------------------------- configuration reference


@dataclass(frozen=True)
class SettingDoc:
    env: str
    path: str  # attribute path on Settings: "kafka.bootstrap"
    type: str
    default: str
    constraints: str
    description: str


def settings_env_name(field: str, sub: str | None = None) -> str:
    """The variable pydantic-settings reads a field from, derived from Settings' own model_config:
    ``env_prefix`` + field name, and for a field of a nested model + ``env_nested_delimiter`` + its name."""
    from rtml.core.settings import Settings

    cfg = Settings.model_config
    prefix = cfg.get("env_prefix", "")
    name = prefix + field if sub is None else prefix + field + (cfg.get("env_nested_delimiter") or "") + sub
    return name if cfg.get("case_sensitive") else name.upper()


def _source_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment above it (a block of ``#`` lines; a one- or two-word line is a section
    header, not a description) and beside it, from the class's source."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    found: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        if len(above) == 1 and len(above[0].split()) <= 2:
            above = []
        parts = [" ".join(above)] if above else []
        last = lines[(node.end_lineno or node.lineno) - 1]
        if "  # " in last and "fmt:" not in last:
            parts.append(last.split("  # ", 1)[1].strip())
        if parts:
            found[node.target.id] = " ".join(parts)
    return found


def _is_duration(info: FieldInfo) -> bool:
    from rtml.core.timeutil import parse_duration_ms

    return any(getattr(m, "func", None) is parse_duration_ms for m in info.metadata)


def type_name(tp: Any, *, link_models: bool = True) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return type_name(args[0], link_models=link_models)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a, link_models=link_models) for a in args)
    if origin is Literal:
        return " | ".join(code(a) for a in args)
    if origin is tuple or origin is list:
        return f"list[{type_name(args[0], link_models=link_models)}]" if args else "list"
    if origin is dict:
        return f"map[{type_name(args[0], link_models=link_models)}, {type_name(args[1], link_models=link_models)}]"
    if tp is type(None):
        return "null"
    if tp is SecretStr:
        return "secret string"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{slug(tp.__name__)})" if link_models else tp.__name__
    return SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def field_type(info: FieldInfo, *, link_models: bool = True, duration: bool = False) -> str:
    if _is_duration(info) or duration:
        return "duration" + (" | null" if type(None) in get_args(info.annotation) else "")
    return type_name(info.annotation, link_models=link_models)


def field_default(info: FieldInfo) -> str:
    from rtml.core.timeutil import format_duration_ms

    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    if _is_duration(info) and isinstance(value, int):
        return code(format_duration_ms(value))
    if isinstance(value, bool):
        return code(str(value).lower())
    if isinstance(value, dict | tuple | list):
        return code(json.dumps(value)) if value else code("{}" if isinstance(value, dict) else "[]")
    return code(value)


CONSTRAINT_FORMATS = {"ge": "≥ {}", "gt": "> {}", "le": "≤ {}", "lt": "< {}", "min_length": "at least {} entries"}
CONSTRAINT_WORDS = {"at least 1 entries": "not empty"}


def field_constraints(info: FieldInfo, *, duration: bool = False) -> str:
    found = []
    for meta in info.metadata:
        for attr, fmt in CONSTRAINT_FORMATS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                text = fmt.format(value)
                found.append(CONSTRAINT_WORDS.get(text, text))
    if _is_duration(info) or duration:
        found.append("`30s`, `5m`, `24h`, `7d` or seconds")
    return ", ".join(found)


def _description(key: str, info: FieldInfo, comments: dict[str, str], name: str) -> str:
    parts = [p for p in (comments.get(name, ""), info.description or "") if p]
    return " ".join(parts) if parts else FALLBACK.get(key, "")


def settings_docs() -> list[SettingDoc]:
    """One entry per leaf setting, nested groups flattened (``kafka.bootstrap`` -> ``RTML_KAFKA_BOOTSTRAP``)."""
    from rtml.core.settings import Settings

    docs: list[SettingDoc] = []
    top_comments = _source_comments(Settings)
    for name, info in Settings.model_fields.items():
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            sub_comments = _source_comments(tp)
            for sub, sub_info in tp.model_fields.items():
                env = settings_env_name(name, sub)
                description = _description(env, sub_info, sub_comments, sub)
                docs.append(SettingDoc(env, f"{name}.{sub}", field_type(sub_info), field_default(sub_info),
                                       field_constraints(sub_info), description))  # fmt: skip
            continue
        env = settings_env_name(name)
        docs.append(SettingDoc(env, name, field_type(info), field_default(info), field_constraints(info),
                               _description(env, info, top_comments, name)))  # fmt: skip
    return docs


def config_models() -> list[type[BaseModel]]:
    """PlatformConfig and every model reachable from it, in first-seen order."""
    from rtml.core.config import PlatformConfig

    seen: list[type[BaseModel]] = []

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for info in tp.model_fields.values():
                walk(info.annotation)
        for arg in get_args(tp):
            walk(arg)

    walk(PlatformConfig)
    return seen


def derived_fields(model: type[BaseModel]) -> set[str]:
    """``window_ms``, ``tile_ms`` etc.: filled in by validation from the duration keys a user writes."""
    return {n for n in model.model_fields if n.endswith("_ms")}


def duration_keys(model: type[BaseModel]) -> set[str]:
    """Keys written as durations (``5m``): those whose milliseconds validation fills into ``<key>_ms``."""
    names = set(model.model_fields)
    return {n for n in names if f"{n}_ms" in names}


def config_keys(model: type[BaseModel]) -> list[str]:
    return [n for n in model.model_fields if n not in derived_fields(model)]


def _validator_rules(model: type[BaseModel]) -> list[str]:
    """The messages of the ValueErrors its validators raise (f-string parts shown as …)."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return []
    rules: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
            continue
        if getattr(node.exc.func, "id", None) != "ValueError" or not node.exc.args:
            continue
        arg = node.exc.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            rules.append(arg.value)
        elif isinstance(arg, ast.JoinedStr):
            rules.append("".join(str(v.value) if isinstance(v, ast.Constant) else "…" for v in arg.values))
    return rules


def configuration_reference() -> str:
    from rtml.core.settings import Settings

    cfg = Settings.model_config
    out = [
        "# Configuration reference\n",
        "Generated at build time from the pydantic models: `rtml.core.settings.Settings` (environment) and "
        "`rtml.core.config` (`rtml.yaml`).\n",
        "## Environment (`RTML_*`)\n",
        f"Every setting is an environment variable with the prefix `{cfg.get('env_prefix')}` (case-insensitive), "
        f"also read from a `{cfg.get('env_file')}` file in the working directory; the environment wins over the "
        f"file. A nested group's fields add the group name and `{cfg.get('env_nested_delimiter')}` "
        f"(split once only, so `RTML_KAFKA_SASL_USERNAME` sets `kafka.sasl_username`); a whole group can also be "
        'given as one JSON object (`RTML_KAFKA=\'{"bootstrap": "k1:9092"}\'`). A value that does not validate '
        "stops the process with the variable's name. Durations accept `30s`, `5m`, `24h`, `7d` or a number "
        "of seconds and are held in milliseconds.\n",
    ]
    rows = [[code(d.env), code(d.path), d.type, d.default, d.constraints, d.description] for d in settings_docs()]
    out.append(table(["variable", "setting", "type", "default", "constraints", "description"], rows))
    out.append(PLATFORM_HEAD)
    from rtml.core.config import PlatformConfig

    for model in config_models():
        title = "rtml.yaml (top level)" if model is PlatformConfig else model.__name__
        out.append(f"### {model.__name__}\n" if model is not PlatformConfig else f"### {title}\n")
        doc = inspect.getdoc(model) if model.__doc__ else None
        if doc and not doc.startswith(model.__name__ + "("):
            out.append(doc + "\n")
        comments = _source_comments(model)
        durations = duration_keys(model)
        rows = []
        for name in config_keys(model):
            info = model.model_fields[name]
            is_duration = name in durations
            rows.append([code(name), field_type(info, duration=is_duration), field_default(info),
                         field_constraints(info, duration=is_duration),
                         _description(f"{model.__name__}.{name}", info, comments, name)])  # fmt: skip
        out.append(table(["key", "type", "default", "constraints", "description"], rows))
        extra = model.model_config.get("extra")
        notes = []
        if extra == "forbid":
            notes.append("Any other key is an error naming it.")
        if derived_fields(model):
            derived = ", ".join(code(n) for n in sorted(derived_fields(model)))
            notes.append(f"Derived by validation from the duration keys, never set by hand: {derived}.")
        rules = _validator_rules(model)
        if rules:
            notes.append("Also checked: " + "; ".join(f"“{r}”" for r in rules) + ".")
        if notes:
            out.append(" ".join(notes) + "\n")
    return "\n".join(out)


PLATFORM_HEAD = """
## Platform config (`rtml.yaml`)

Which file: `RTML_CONFIG`, else `./rtml.yaml`, else the bundled demo config (`services/rtml/demo/rtml.yaml`).
A file that does not validate fails with the file, line and key: `rtml.yaml:7: features.bad.agg: Input
should be ...`. What the feature keys mean exactly (windows, tiles, values): [Features and window
semantics](../features.md); the model keys of the learning loop: [The learning loop](../learning-loop.md).

`map[string, X]` is a YAML mapping from names you choose to X. `list[X]` is a YAML sequence.
"""


def all_routes() -> Iterator[tuple[str, str, str]]:
    """(service, METHOD, path) of every operation in every service's OpenAPI schema."""
    for service in SERVICES:
        for path, ops in service_openapi(service)["paths"].items():
            for method in ops:
                yield service, method.upper(), path
