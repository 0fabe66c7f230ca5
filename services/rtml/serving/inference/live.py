"""The models this replica serves, kept in step with the registry's live pointers and rollouts.

A background task polls every live pointer and rollout (one round trip) each ``model_poll_interval_s``; the
``models`` topic makes it poll at once. A changed pointer or rollout loads the new version in a thread
(session build and warm-up off the event loop), then swaps the model's ``Served`` entry: a single reference
assignment, so a request that already took the old entry finishes on it and no request ever sees a
half-loaded model or a live/candidate pair that never existed together.

A rollout's version (a candidate, or the previous live version kept as a guard) that fails to load is counted
in ``MODEL_LOAD_ERRORS`` and logged; the replica serves the live version alone meanwhile (retried after
``RETRY_FAILED_S``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable, RtmlError
from rtml.serving.inference.session import LoadedModel, build_model
from rtml.serving.registry import ModelRegistry, Rollout

log = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0


@dataclass(frozen=True, slots=True)
class Served:
    """What the request path needs of one model, in one dict lookup.

    ``other`` is None when no rollout runs (or its version could not be loaded): the request path then does
    exactly what it did before rollouts existed. Otherwise it is the candidate (``stage`` shadow or canary)
    or the guard (the version live before the last ``promote_candidate``), ``share`` the canary share and
    ``rollout_id`` what the canary split hashes.
    """

    live: LoadedModel
    other: LoadedModel | None = None
    stage: str | None = None
    share: float = 0.0
    rollout_id: str = ""


class LiveModels:
    def __init__(self, registry: ModelRegistry, config_models: Iterable[str]) -> None:
        self.registry = registry
        self.config_models = tuple(config_models)
        self.served: dict[str, Served] = {}
        self.rollouts: dict[str, Rollout | None] = {}  # as last read from the registry
        self.known: set[str] = set(self.config_models)
        self.registry_reachable = False
        self._failed: dict[tuple[str, str], float] = {}
        self._lock = asyncio.Lock()
        for name in self.config_models:  # counter series at 0 from the start, so rate() sees the first one
            metrics.MODEL_LOAD_ERRORS.labels(model=name)
            metrics.SERVING_DEADLINE_EXCEEDED.labels(model=name)
            metrics.PREDICTIONS_DEGRADED.labels(model=name)

    def get(self, name: str) -> LoadedModel | None:
        """The live version this replica serves."""
        served = self.served.get(name)
        return None if served is None else served.live

    async def refresh(self) -> None:
        """Load every live version and rollout version that differs from the served ones. Raises
        DependencyUnavailable."""
        async with self._lock:
            try:
                names = await self.registry.names(self.config_models)
                state = await self.registry.serving_state(names)
            except DependencyUnavailable:
                self.registry_reachable = False
                raise
            self.registry_reachable = True
            self.known = set(names)
            for name, (version, rollout) in state.items():
                self.rollouts[name] = rollout
                if version is None:
                    continue
                current = self.served.get(name)
                live = _reuse(current, version) or await self._try_load(name, version, current, "live")
                if live is None:  # cannot load the new live version: keep serving what was served
                    continue
                other = None
                if rollout is not None and rollout.version != version:
                    other = _reuse(current, rollout.version) or await self._try_load(
                        name, rollout.version, current, rollout.stage
                    )
                entry = Served(live)
                if other is not None and rollout is not None:
                    entry = Served(live, other, rollout.stage, rollout.share, rollout.id)
                if current is None or not _same(current, entry):
                    self._swap(name, entry, current)

    async def _try_load(self, name: str, version: str, current: Served | None, role: str) -> LoadedModel | None:
        """Load one version off the event loop; None (counted, logged, retried later) when it cannot be."""
        failed_at = self._failed.get((name, version))
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_S:
            return None
        try:
            onnx_bytes, metadata = await self.registry.get(name, version)
            return await asyncio.to_thread(build_model, name, version, onnx_bytes, metadata)
        except RtmlError as exc:
            if isinstance(exc, DependencyUnavailable):
                raise
            self._failed[(name, version)] = time.monotonic()
            metrics.MODEL_LOAD_ERRORS.labels(model=name).inc()
            serving = current.live.version if current else "nothing"
            log.error("cannot load model %s version %s (%s): %s; serving %s%s", name, version, role, exc.message,
                      serving, "" if role == "live" else " alone")  # fmt: skip
            return None

    def _swap(self, name: str, entry: Served, current: Served | None) -> None:
        self.served[name] = entry  # the atomic swap
        was = current.live.version if current else None
        if was != entry.live.version:
            if was is not None:
                metrics.drop(metrics.MODEL_LIVE_VERSION, name, was)
            metrics.MODEL_LIVE_VERSION.labels(name, entry.live.version).set(1)
        other = f"; {entry.stage} {entry.other.version}" if entry.other else ""
        log.info("serving model %s version %s%s%s", name, entry.live.version, other,
                 f" (was {was})" if was and was != entry.live.version else "")  # fmt: skip

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


def _reuse(current: Served | None, version: str) -> LoadedModel | None:
    """The already loaded session of ``version``, if this model serves it (a promoted candidate, a guard)."""
    if current is None:
        return None
    if current.live.version == version:
        return current.live
    if current.other is not None and current.other.version == version:
        return current.other
    return None


def _same(a: Served, b: Served) -> bool:
    return (a.live is b.live and a.other is b.other and a.stage == b.stage and a.share == b.share
            and a.rollout_id == b.rollout_id)  # fmt: skip
