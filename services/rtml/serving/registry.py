"""The model registry, in Redis. ONNX bytes only (never pickle); each version checked by onnxruntime.

Keys (all of one model under ``Keys.model(name)`` = ``<prefix>{model:<name>}`` so they share a hash slot):
- ``...:seq``           INCR counter: versions are "1", "2", ... assigned atomically;
- ``...:v:<version>``   hash ``onnx`` (bytes), ``sha256``, ``size``, ``metadata`` (JSON), ``created_at``;
- ``...:versions``      sorted set version -> version number;
- ``...:live``          the live version (the pointer every serving replica polls);
- ``...:history``       list of the versions that were live before, most recent first (bounded): what
                        ``rollback`` goes back to;
- ``<prefix>{models}``  set of model names (the index; its own slot).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from rtml.core.config import PlatformConfig, load_config
from rtml.core.errors import DependencyUnavailable, InvalidInput, NotFound, PayloadTooLarge, RtmlError
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis, connect, guarded, run_pipeline
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.serving.inference.session import build_model
from rtml.serving.train import train_model

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 * 1024 * 1024
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEMO_MODEL = "ctr"

HISTORY_MAX = 50  # promotions remembered per model for rollback
DEFAULT_TASK = "binary_classification"

# KEYS: version hash, live pointer, history. ARGV: version, history bound. 0 when the version is unknown.
_PROMOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local current = redis.call('GET', KEYS[2])
if current and current ~= ARGV[1] then
  redis.call('LPUSH', KEYS[3], current)
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# KEYS: live pointer, history. Pops the history until a version other than the live one; false when none.
# Versions are never deleted, so every version in the history still exists.
_ROLLBACK = """
local current = redis.call('GET', KEYS[1])
while true do
  local previous = redis.call('LPOP', KEYS[2])
  if not previous then
    return false
  end
  if previous ~= current then
    redis.call('SET', KEYS[1], previous)
    return previous
  end
end
"""


class ModelIntegrityError(RtmlError):
    """Stored model bytes fail their checksum: never serve them (a server-side fault, not the caller's)."""

    code = "model_corrupt"


def check_name(name: str) -> str:
    if not MODEL_NAME.match(name):
        raise InvalidInput(f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    return name


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"metadata.{field}: {message}", details=[{"field": f"metadata.{field}", "message": message}])


def validate_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Check what serving relies on; a clear 422 naming the field otherwise. Returns a normalised copy.

    - ``features``: non-empty list of distinct non-empty strings (the ONNX input order);
    - ``defaults``: optional mapping of some of those features to finite numbers;
    - ``task``: optional non-empty string (default ``binary_classification``);
    - ``metrics``: optional mapping of names to finite numbers (or lists of them, e.g. score quantiles).
    Other keys are kept as they are. ``created_at``/``created_by`` are set by ``register``.
    """
    if not isinstance(metadata, Mapping):
        raise InvalidInput("metadata must be a JSON object")
    md = dict(metadata)
    features = md.get("features")
    if not isinstance(features, list) or not features:
        raise _bad("features", "must be a non-empty list of feature names (the ONNX input order)")
    for i, f in enumerate(features):
        if not isinstance(f, str) or not f:
            raise _bad(f"features[{i}]", "must be a non-empty string")
    dupes = sorted({f for f in features if features.count(f) > 1})
    if dupes:
        raise _bad("features", f"names must be distinct; repeated: {', '.join(dupes)}")
    defaults = md.get("defaults")
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, Mapping):
        raise _bad("defaults", "must be an object of feature name -> number")
    for k, v in defaults.items():
        if k not in features:
            raise _bad(f"defaults.{k}", "is not one of the model's features")
        if not _finite(v):
            raise _bad(f"defaults.{k}", f"must be a finite number, not {v!r}")
    md["defaults"] = {str(k): float(v) for k, v in defaults.items()}
    task = md.get("task")
    if task is None:
        task = DEFAULT_TASK
    if not isinstance(task, str) or not task.strip() or len(task) > 64:
        raise _bad("task", 'must be a non-empty string such as "binary_classification"')
    md["task"] = task
    metrics = md.get("metrics")
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, Mapping):
        raise _bad("metrics", "must be an object of metric name -> number")
    for k, v in metrics.items():
        if isinstance(v, list):
            if not all(_finite(x) for x in v):
                raise _bad(f"metrics.{k}", "must be a finite number or a list of finite numbers")
        elif not _finite(v):
            raise _bad(f"metrics.{k}", f"must be a finite number, not {v!r}")
    md["metrics"] = dict(metrics)
    return md


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class ModelRegistry:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._promote = redis.register_script(_PROMOTE)
        self._rollback = redis.register_script(_ROLLBACK)

    # -- key names ----------------------------------------------------------------------------------
    def _k(self, name: str, suffix: str) -> str:
        return f"{self.keys.model(name)}:{suffix}"

    @property
    def index_key(self) -> str:
        return self.keys.models_index()

    # -- writes -------------------------------------------------------------------------------------
    async def register(
        self,
        name: str,
        onnx_bytes: bytes,
        metadata: Mapping[str, Any],
        config: PlatformConfig | None = None,
        created_by: str | None = None,
    ) -> str:
        """Store a new version after onnxruntime loaded it and its input matched the metadata. Returns it.

        Metadata without ``features``/``defaults`` takes them from the platform config's model, if any, and
        is validated (422 naming the field). ``created_at`` is set here; ``created_by`` is the argument, else
        the metadata's own, else "unknown". Over ``MAX_MODEL_BYTES``: 413.
        """
        check_name(name)
        if len(onnx_bytes) > MAX_MODEL_BYTES:
            raise PayloadTooLarge(f"model is {len(onnx_bytes)} bytes, the limit is {MAX_MODEL_BYTES}")
        if not onnx_bytes:
            raise InvalidInput("empty model: send the ONNX bytes as the request body")
        if not isinstance(metadata, Mapping):
            raise InvalidInput("metadata must be a JSON object")
        metadata = dict(metadata)
        if config is not None and name in config.models:
            metadata.setdefault("features", list(config.models[name].features))
            metadata.setdefault("defaults", dict(config.models[name].defaults))
        metadata = validate_metadata(metadata)
        created = now_ms()
        who = created_by or metadata.get("created_by")
        metadata["created_by"] = who if isinstance(who, str) and who.strip() else "unknown"
        metadata["created_at"] = created
        # Refuse anything onnxruntime cannot load or whose input does not fit the features (422).
        await asyncio.to_thread(build_model, name, "0", onnx_bytes, metadata)
        meta_json = orjson.dumps(metadata)
        version = str(await guarded(self.redis.incr(self._k(name, "seq")), "model version INCR"))

        def build(pipe: Any) -> None:
            pipe.hset(self._k(name, f"v:{version}"), mapping={
                "onnx": onnx_bytes, "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
                "size": len(onnx_bytes), "metadata": meta_json, "created_at": created,
            })  # fmt: skip
            pipe.zadd(self._k(name, "versions"), {version: int(version)})

        await guarded(self._transaction(build), "model register")
        await guarded(self.redis.sadd(self.index_key, name), "model index")
        log.info("registered model %s version %s (%d bytes)", name, version, len(onnx_bytes))
        return version

    async def _transaction(self, build: Any) -> list[Any]:
        async with self.redis.pipeline(transaction=True) as pipe:
            build(pipe)
            return list(await pipe.execute())

    async def promote(self, name: str, version: str, producer: Producer | None = None, by: str | None = None) -> None:
        """Point the live pointer at ``version`` (404 when unknown) and remember the one it replaces for
        ``rollback``; announce it on ``models`` (with ``by``, who asked, when known) if a producer is given."""
        check_name(name)
        keys = [self._k(name, f"v:{version}"), self._k(name, "live"), self._k(name, "history")]
        ok = await guarded(self._promote(keys=keys, args=[version, HISTORY_MAX]), "model promote")
        if not int(ok):
            raise NotFound(f"model {name!r} has no version {version!r}")
        log.info("promoted model %s version %s", name, version)
        await self._announce(name, version, "promoted", producer, by)

    async def rollback(self, name: str, producer: Producer | None = None, by: str | None = None) -> str:
        """Make the version that was live before the current one live again; returns it. 404 when the model
        has no earlier live version. Announced on ``models`` like a promotion."""
        check_name(name)
        keys = [self._k(name, "live"), self._k(name, "history")]
        previous = _text(await guarded(self._rollback(keys=keys, args=[]), "model rollback"))
        if previous is None:
            raise NotFound(f"model {name!r} has no earlier live version to roll back to")
        log.info("rolled model %s back to version %s", name, previous)
        await self._announce(name, previous, "rolled_back", producer, by)
        return previous

    async def _announce(self, name: str, version: str, event: str, producer: Producer | None, by: str | None) -> None:
        if producer is None:
            return
        record: dict[str, Any] = {"model": name, "version": version, "event": event, "ts": now_ms()}
        if by:
            record["by"] = by
        try:
            await producer.send("models", record, key=name.encode())
        except DependencyUnavailable as exc:  # the pointer is what replicas follow; the topic is a log
            log.warning("%s of %s %s not announced on models: %s", event, name, version, exc.message)

    async def history(self, name: str) -> list[str]:
        """The versions that were live before the current one, most recent first."""
        raw = await guarded(self.redis.lrange(self._k(name, "history"), 0, -1), "model history")
        return [_text(v) or "" for v in raw]

    # -- reads --------------------------------------------------------------------------------------
    async def live_versions(self, names: Iterable[str]) -> dict[str, str | None]:
        """The live version of each model, in one round trip."""
        names = list(names)
        if not names:
            return {}

        def gets(p: Any) -> None:
            for n in names:
                p.get(self._k(n, "live"))

        raw = await run_pipeline(self.redis, gets, "live models")
        return {n: _text(v) for n, v in zip(names, raw, strict=True)}

    async def live_version(self, name: str) -> str | None:
        return (await self.live_versions([name]))[name]

    async def get(self, name: str, version: str) -> tuple[bytes, dict[str, Any]]:
        """The ONNX bytes and metadata of one version; the checksum is verified."""
        raw = await guarded(self.redis.hmget(self._k(name, f"v:{version}"), ["onnx", "sha256", "metadata"]),
                            "model fetch")  # fmt: skip
        onnx_bytes, sha, meta = raw
        if not isinstance(onnx_bytes, bytes):
            raise NotFound(f"model {name!r} has no version {version!r}")
        if hashlib.sha256(onnx_bytes).hexdigest() != _text(sha):
            raise ModelIntegrityError(
                f"model {name!r} version {version!r} fails its sha256 check: the stored bytes are corrupt"
            )
        metadata: dict[str, Any] = orjson.loads(meta) if meta else {}
        return onnx_bytes, metadata

    async def names(self, extra: Iterable[str] = ()) -> list[str]:
        members = await guarded(self.redis.smembers(self.index_key), "model index")
        return sorted({_text(m) or "" for m in members} | set(extra))

    async def describe(self, extra: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Every model (registered, plus ``extra`` names such as the config's), its versions and live one."""
        names = await self.names(extra)
        if not names:
            return []

        def heads(p: Any) -> None:
            for n in names:
                p.zrange(self._k(n, "versions"), 0, -1)
                p.get(self._k(n, "live"))
                p.lrange(self._k(n, "history"), 0, -1)

        raw = await run_pipeline(self.redis, heads, "model list")
        versions = {n: [_text(v) or "" for v in raw[3 * i]] for i, n in enumerate(names)}
        live = {n: _text(raw[3 * i + 1]) for i, n in enumerate(names)}
        history = {n: [_text(v) or "" for v in raw[3 * i + 2]] for i, n in enumerate(names)}
        pairs = [(n, v) for n in names for v in versions[n]]
        fields = ["sha256", "size", "metadata", "created_at"]

        def hmgets(p: Any) -> None:
            for n, v in pairs:
                p.hmget(self._k(n, f"v:{v}"), fields)

        details = await run_pipeline(self.redis, hmgets, "model versions")
        info: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for (n, v), (sha, size, meta, created) in zip(pairs, details, strict=True):
            md = orjson.loads(meta) if meta else {}
            info[n].append({
                "version": v, "sha256": _text(sha), "size": int(size or 0), "created_at": int(created or 0),
                "live": v == live[n], "features": md.get("features"), "defaults": md.get("defaults", {}),
                "task": md.get("task"), "metrics": md.get("metrics", {}), "created_by": md.get("created_by"),
            })  # fmt: skip
        return [{"name": n, "live_version": live[n], "history": history[n], "versions": info[n]} for n in names]


# -- entry points for the CLI (`rtml train`, `rtml up`, `rtml models`) ------------------------------------------
async def train_and_register(
    settings: Settings,
    model_name: str = DEMO_MODEL,
    examples: Path | None = None,
    promote: bool = True,
    producer: Producer | None = None,
) -> str:
    """Train ``model_name`` (synthetic data, or the JSONL ``examples``), register it, promote it. Returns the
    new version. Training runs in a thread. ``producer`` (optional) announces the promotion on ``models``."""
    config = load_config(settings.platform_config_path())
    check_name(model_name)
    trained = await asyncio.to_thread(train_model, config, model_name, examples)
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        version = await registry.register(model_name, trained.onnx_bytes, trained.metadata, config)
        if promote:
            await registry.promote(model_name, version, producer)
        return version
    finally:
        await redis.aclose()


async def ensure_models(settings: Settings, producer: Producer | None = None) -> dict[str, str]:
    """Train, register and promote every model of the platform config that has no live version.

    Returns ``{model: new version}`` for the models trained (empty when every one was live). A short Redis
    lock per model keeps two concurrent callers (``rtml up``, the compose trainer) from training it twice.
    """
    config = load_config(settings.platform_config_path())
    keys = Keys(settings.redis.key_prefix)
    trained: dict[str, str] = {}
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, keys)
        live = await registry.live_versions(config.models)
        for name in config.models:
            if live[name] is not None:
                continue
            lock = f"{keys.model(name)}:training"
            if not await guarded(redis.set(lock, "1", nx=True, ex=120), "training lock"):
                continue  # someone else is training it right now
            try:
                if await registry.live_version(name) is not None:
                    continue
                trained[name] = await train_and_register(settings, name, None, True, producer)
            finally:
                await guarded(redis.delete(lock), "training lock")
    finally:
        await redis.aclose()
    return trained


async def configured_live_versions(settings: Settings) -> dict[str, str | None]:
    """The live version of every model of the platform config, in config order (None: none is live)."""
    config = load_config(settings.platform_config_path())
    redis = connect(settings)
    try:
        return await ModelRegistry(redis, Keys(settings.redis.key_prefix)).live_versions(config.models)
    finally:
        await redis.aclose()
