"""The models this replica serves, kept in step with the registry's live pointers.

A background task polls every live pointer (one round trip) each ``model_poll_interval_s``. A changed
pointer loads the new version in a thread (session build and warm-up off the event loop), then swaps the
dict entry: a single reference assignment, so a request that already took the old ``LoadedModel`` finishes
on it and no request ever sees a half-loaded model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable, RtmlError
from rtml.serving.inference.session import LoadedModel, build_model
from rtml.serving.registry import ModelRegistry

log = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0


class LiveModels:
    def __init__(self, registry: ModelRegistry, config_models: Iterable[str]) -> None:
        self.registry = registry
        self.config_models = tuple(config_models)
        self.models: dict[str, LoadedModel] = {}
        self.known: set[str] = set(self.config_models)
        self.registry_reachable = False
        self._failed: dict[tuple[str, str], float] = {}
        self._lock = asyncio.Lock()

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    async def refresh(self) -> None:
        """Load every live version that differs from the served one. Raises DependencyUnavailable."""
        async with self._lock:
            try:
                names = await self.registry.names(self.config_models)
                live = await self.registry.live_versions(names)
            except DependencyUnavailable:
                self.registry_reachable = False
                raise
            self.registry_reachable = True
            self.known = set(names)
            for name, version in live.items():
                current = self.models.get(name)
                if version is None or (current is not None and current.version == version):
                    continue
                failed_at = self._failed.get((name, version))
                if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_S:
                    continue
                try:
                    await self._load(name, version, current)
                except RtmlError as exc:
                    if isinstance(exc, DependencyUnavailable):
                        raise
                    self._failed[(name, version)] = time.monotonic()
                    metrics.MODEL_LOAD_ERRORS.labels(model=name).inc()
                    log.error("cannot load model %s version %s: %s; still serving %s",
                              name, version, exc.message, current.version if current else "nothing")  # fmt: skip

    async def _load(self, name: str, version: str, current: LoadedModel | None) -> None:
        onnx_bytes, metadata = await self.registry.get(name, version)
        model = await asyncio.to_thread(build_model, name, version, onnx_bytes, metadata)
        self.models[name] = model  # the atomic swap
        if current is not None:
            with contextlib.suppress(KeyError):
                metrics.MODEL_LIVE_VERSION.remove(name, current.version)
        metrics.MODEL_LIVE_VERSION.labels(name, version).set(1)
        log.info("serving model %s version %s%s", name, version, f" (was {current.version})" if current else "")

    async def run(self, interval_s: float) -> None:
        """Poll forever (cancel to stop); errors are logged and the previous models keep serving."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except DependencyUnavailable as exc:
                metrics.MODEL_POLL_ERRORS.inc()
                log.warning("model poll: %s", exc.message)
            except Exception:
                metrics.MODEL_POLL_ERRORS.inc()
                log.exception("model poll failed")
