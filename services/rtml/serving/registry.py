"""The model registry, in Redis. ONNX bytes only (never pickle); each version checked by onnxruntime.

Keys (all of one model under ``Keys.model(name)`` = ``<prefix>{model:<name>}`` so they share a hash slot):
- ``...:seq``           INCR counter: versions are "1", "2", ... assigned atomically;
- ``...:v:<version>``   hash ``onnx`` (bytes), ``sha256``, ``size``, ``metadata`` (JSON), ``created_at``;
- ``...:versions``      sorted set version -> version number;
- ``...:live``          the live version (the pointer every serving replica polls);
- ``<prefix>{models}``  set of model names (the index; its own slot).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from rtml.core.config import PlatformConfig, load_config
from rtml.core.errors import DependencyUnavailable, InvalidInput, NotFound, PayloadTooLarge
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

_PROMOTE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def check_name(name: str) -> str:
    if not MODEL_NAME.match(name):
        raise InvalidInput(f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    return name


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class ModelRegistry:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._promote = redis.register_script(_PROMOTE)

    # -- key names ----------------------------------------------------------------------------------
    def _k(self, name: str, suffix: str) -> str:
        return f"{self.keys.model(name)}:{suffix}"

    @property
    def index_key(self) -> str:
        return self.keys.models_index()

    # -- writes -------------------------------------------------------------------------------------
    async def register(
        self, name: str, onnx_bytes: bytes, metadata: dict[str, Any], config: PlatformConfig | None = None
    ) -> str:
        """Store a new version after onnxruntime loaded it and its input matched the metadata. Returns it.

        Metadata without ``features``/``defaults`` takes them from the platform config's model, if any.
        """
        check_name(name)
        if len(onnx_bytes) > MAX_MODEL_BYTES:
            raise PayloadTooLarge(f"model is {len(onnx_bytes)} bytes, the limit is {MAX_MODEL_BYTES}")
        if not onnx_bytes:
            raise InvalidInput("empty model: send the ONNX bytes as the request body")
        metadata = dict(metadata)
        if config is not None and name in config.models:
            metadata.setdefault("features", list(config.models[name].features))
            metadata.setdefault("defaults", dict(config.models[name].defaults))
        # Refuse anything onnxruntime cannot load or whose input does not fit the features (422).
        await asyncio.to_thread(build_model, name, "0", onnx_bytes, metadata)
        meta_json = orjson.dumps(metadata)
        version = str(await guarded(self.redis.incr(self._k(name, "seq")), "model version INCR"))
        created = now_ms()

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

    async def promote(self, name: str, version: str, producer: Producer | None = None) -> None:
        """Point the live pointer at ``version`` (404 when unknown); announce it on ``models`` if asked."""
        check_name(name)
        keys = [self._k(name, f"v:{version}"), self._k(name, "live")]
        ok = await guarded(self._promote(keys=keys, args=[version]), "model promote")
        if not int(ok):
            raise NotFound(f"model {name!r} has no version {version!r}")
        log.info("promoted model %s version %s", name, version)
        if producer is not None:
            record = {"model": name, "version": version, "event": "promoted", "ts": now_ms()}
            try:
                await producer.send("models", record, key=name.encode())
            except DependencyUnavailable as exc:  # the pointer is what replicas follow; the topic is a log
                log.warning("promotion of %s %s not announced on models: %s", name, version, exc.message)

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
            raise InvalidInput(f"model {name!r} version {version!r} fails its sha256 check")
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

        raw = await run_pipeline(self.redis, heads, "model list")
        versions = {n: [_text(v) or "" for v in raw[2 * i]] for i, n in enumerate(names)}
        live = {n: _text(raw[2 * i + 1]) for i, n in enumerate(names)}
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
                "live": v == live[n], "features": md.get("features"), "metrics": md.get("metrics", {}),
                "created_by": md.get("created_by"),
            })  # fmt: skip
        return [{"name": n, "live_version": live[n], "versions": info[n]} for n in names]


# -- entry points for the CLI (`rtml train`, `rtml up`) ---------------------------------------------------
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


async def ensure_demo_model(settings: Settings, producer: Producer | None = None) -> str | None:
    """Train, register and promote ``ctr`` only when the config has it and it has no live version.

    Returns the new version, or None when nothing was done. A short Redis lock keeps two concurrent callers
    from training twice.
    """
    config = load_config(settings.platform_config_path())
    if DEMO_MODEL not in config.models:
        return None
    keys = Keys(settings.redis.key_prefix)
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, keys)
        if await registry.live_version(DEMO_MODEL) is not None:
            return None
        lock = f"{keys.model(DEMO_MODEL)}:training"
        if not await guarded(redis.set(lock, "1", nx=True, ex=120), "training lock"):
            return None
        try:
            if await registry.live_version(DEMO_MODEL) is not None:
                return None
            return await train_and_register(settings, DEMO_MODEL, None, True, producer)
        finally:
            await guarded(redis.delete(lock), "training lock")
    finally:
        await redis.aclose()
