"""The learning-loop controller: retrain when the policy says so, and carry rollouts through their stages.

Every feedback replica runs ``Learning.run_forever``; each round, per configured model, it takes a short
Redis lock (so one replica acts per model and round) and then:

1. **Rollout.** With a rollout running (``rtml.serving.registry.Rollout``), it compares the live version and
   the rollout's other version on exactly the examples both scored *since the rollout entered its stage*:
   the cumulative pair sums (``QualityStore.pair``) minus a snapshot taken the first time the stage was
   seen. ``rtml.feedback.rollout.judge`` gives the verdict; the registry's compare-and-set calls carry it
   out (a stale rollout id means someone else acted: nothing happens).
2. **Retraining.** With no rollout running and a ``retrain`` policy: ``every_labels`` new labels since the
   last training, or the live version's windowed AUC below ``min_auc`` / log loss above ``max_log_loss``
   (on at least ``min_labels`` labels), after ``cooldown``: train from the examples store
   (``rtml.feedback.retrain``) and start the candidate in shadow.

Every decision is logged, counted (``rtml_rollout_decisions_total``, ``rtml_retrains_total``) and kept with
the numbers it used in a bounded per-model list, served by ``GET /v1/models/{name}/decisions``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, get_args

import orjson

from rtml.core import metrics
from rtml.core.config import PlatformConfig
from rtml.core.errors import DependencyUnavailable, RtmlError
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis, guarded, text
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback.quality import QualityStore, learn_key
from rtml.feedback.qualitymath import Sums, summarize
from rtml.feedback.retrain import retrain_from_examples
from rtml.feedback.rollout import Action, Verdict, judge
from rtml.serving.registry import ModelRegistry, Rollout, StaleRollout

log = logging.getLogger(__name__)

BY = "rtml feedback (learning loop)"
DECISIONS_KEPT = 200
SNAPSHOT_TTL_S = 30 * 86_400
TRAINING_LOCK_S = 900  # the registry's ``ensure_models`` uses the same lock key: never two trainings at once
RETRY_FAILED_MS = 60_000  # a training that could not run (too few examples) is tried again after this
TRIGGERS = ("every_labels", "min_auc", "max_log_loss")  # why a retraining started (``trigger``)
DECISIONS = tuple(a for a in get_args(Action) if a != "wait")  # rollout decisions the loop logs and counts


def decisions_key(keys: Keys, model: str) -> str:
    return f"{keys.model(model)}:decisions"


class Learning:
    def __init__(
        self, settings: Settings, config: PlatformConfig, redis: Redis, producer: Producer | None,
        quality: QualityStore,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.config = config
        self.redis = redis
        self.producer = producer
        self.quality = quality
        self.keys = Keys(settings.redis.key_prefix)
        self.registry = ModelRegistry(redis, self.keys)
        for name in config.models:  # counter series at 0 from the start, so rate() and increase() see the first
            for trigger in TRIGGERS:
                for result in ("ok", "skipped"):
                    metrics.RETRAINS.labels(name, trigger, result)
            for decision in DECISIONS:
                metrics.ROLLOUT_DECISIONS.labels(name, decision)

    # -- the loop ---------------------------------------------------------------------------------------------
    async def run_forever(self, interval_s: float | None = None) -> None:
        interval = self.settings.learning_interval_s if interval_s is None else interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.step()
            except DependencyUnavailable as exc:
                log.warning("learning loop: %s", exc.message)
            except Exception:
                log.exception("learning loop round failed")

    async def step(self, models: Iterable[str] | None = None, now: int | None = None) -> list[dict[str, Any]]:
        """One round over ``models`` (default: every configured one); returns the decisions taken."""
        taken: list[dict[str, Any]] = []
        lock_ms = int(max(self.settings.learning_interval_s * 2_000, 10_000))
        for name in self.config.models if models is None else models:
            lock = f"{self.keys.model(name)}:learn:lock"
            if not await guarded(self.redis.set(lock, "1", nx=True, px=lock_ms), "learning lock"):
                continue  # another replica has this model this round
            try:
                rollout = await self.registry.rollout(name)
                if rollout is not None:
                    d = await self._rollout_step(name, rollout)
                else:
                    d = await self._retrain_step(name, now_ms() if now is None else now)
                if d is not None:
                    taken.append(d)
            finally:
                await guarded(self.redis.delete(lock), "learning lock")
        return taken

    # -- rollouts ---------------------------------------------------------------------------------------------
    async def stage_sums(self, name: str, rollout: Rollout, live: str) -> tuple[Sums, Sums]:
        """(live, other) over the examples both scored since ``rollout`` entered its current stage."""
        now_live, now_other = await self.quality.pair(name, live, rollout.version)
        key = f"{self.keys.model(name)}:learn:snap:{rollout.id}:{rollout.stage}:{rollout.since}:{live}"
        snap = orjson.dumps({"live": now_live.to_hash(), "other": now_other.to_hash()})
        await guarded(self.redis.set(key, snap, nx=True, ex=SNAPSHOT_TTL_S), "rollout snapshot")
        raw = await guarded(self.redis.get(key), "rollout snapshot")
        base = orjson.loads(raw) if raw else {"live": {}, "other": {}}
        return now_live - Sums.from_hash(base["live"]), now_other - Sums.from_hash(base["other"])

    async def _rollout_step(self, name: str, rollout: Rollout) -> dict[str, Any] | None:
        policy = self.config.models[name].rollout
        live = await self.registry.live_version(name)
        if live is None or live == rollout.version:
            return None
        if rollout.stage not in ("shadow", "canary", "guard"):
            return None
        live_sums, other_sums = await self.stage_sums(name, rollout, live)
        verdict = judge(policy, rollout.stage, int(round(other_sums.n)), summarize(live_sums, None),  # type: ignore[arg-type]
                        summarize(other_sums, None))  # fmt: skip
        if verdict.action == "wait":
            return None
        if verdict.action == "ready":
            flag = f"{self.keys.model(name)}:learn:ready:{rollout.id}"
            if not await guarded(self.redis.set(flag, "1", nx=True, ex=SNAPSHOT_TTL_S), "rollout ready flag"):
                return None  # said once
        try:
            await self._carry_out(name, rollout, verdict)
        except StaleRollout:
            return None  # someone (a person, another replica) changed the rollout meanwhile
        return await self._decided(name, verdict.action, verdict.reason, {
            **verdict.numbers, "rollout_id": rollout.id, "other_version": rollout.version, "live_version": live,
        })  # fmt: skip

    async def _carry_out(self, name: str, rollout: Rollout, verdict: Verdict) -> None:
        r, p, action = self.registry, self.producer, verdict.action
        policy = self.config.models[name].rollout
        if action == "canary":
            await r.set_stage(name, rollout.id, "canary", policy.canary_share, by=BY, producer=p)
        elif action == "promote":
            await r.promote_candidate(name, rollout.id, guard=policy.guard_labels > 0, by=BY, producer=p)
        elif action == "reject":
            await r.end_rollout(name, rollout.id, by=BY, producer=p, reason="rejected")
        elif action == "rollback":
            await r.revert_guard(name, rollout.id, by=BY, producer=p)
        elif action == "keep":
            await r.end_rollout(name, rollout.id, by=BY, producer=p, reason="kept")

    # -- retraining -------------------------------------------------------------------------------------------
    async def trigger(self, name: str, now: int) -> tuple[str | None, dict[str, Any]]:
        """Why the model should be retrained now (None: it should not), with the numbers that say so."""
        policy = self.config.models[name].retrain
        if policy is None:
            return None, {}
        state = {text(k): text(v) for k, v in
                 (await guarded(self.redis.hgetall(learn_key(self.keys, name)), "learning state")).items()}  # fmt: skip
        labels = int(float(state.get("labels", 0)))
        since = labels - int(float(state.get("trained_labels", 0)))
        numbers: dict[str, Any] = {"labels": labels, "labels_since_training": since}
        last = max(int(float(state.get("trained_at", 0))), int(float(state.get("tried_at", 0))))
        if last and now - last < policy.cooldown_ms:
            return None, numbers
        reason = None
        if policy.every_labels is not None and since >= policy.every_labels:
            reason = "every_labels"
        if reason is None and (policy.min_auc is not None or policy.max_log_loss is not None):
            live = await self.registry.live_version(name)
            if live is not None:
                q = summarize((await self.quality.window(name, now)).get(live, Sums()), None)
                # window_*: the live version's online quality; a retraining adds the holdout's auc/logloss next to them
                numbers.update(live_version=live, window_count=q["count"], window_auc=q["auc"],
                               window_log_loss=q["log_loss"])  # fmt: skip
                if q["count"] >= policy.min_labels:
                    if policy.min_auc is not None and q["auc"] is not None and q["auc"] < policy.min_auc:
                        reason = "min_auc"
                    elif policy.max_log_loss is not None and q["log_loss"] is not None \
                            and q["log_loss"] > policy.max_log_loss:  # fmt: skip
                        reason = "max_log_loss"
        return reason, numbers

    async def _retrain_step(self, name: str, now: int) -> dict[str, Any] | None:
        reason, numbers = await self.trigger(name, now)
        if reason is None:
            return None
        policy = self.config.models[name].retrain
        assert policy is not None
        lock = f"{self.keys.model(name)}:training"
        if not await guarded(self.redis.set(lock, "1", nx=True, ex=TRAINING_LOCK_S), "training lock"):
            return None
        state = learn_key(self.keys, name)
        try:
            done = await retrain_from_examples(
                self.settings, self.redis, name, then="shadow", producer=self.producer, by=BY, config=self.config,
                min_examples=policy.min_examples,
            )  # fmt: skip
        except RtmlError as exc:
            if isinstance(exc, DependencyUnavailable):
                raise
            await guarded(self.redis.hset(state, "tried_at", now - policy.cooldown_ms + RETRY_FAILED_MS),
                          "learning state")  # fmt: skip
            metrics.RETRAINS.labels(name, reason, "skipped").inc()
            return await self._decided(name, "retrain_skipped", exc.message, {"trigger": reason, **numbers})
        finally:
            await guarded(self.redis.delete(lock), "training lock")
        await guarded(self.redis.hset(state, mapping={"trained_at": now, "trained_labels": numbers["labels"]}),
                      "learning state")  # fmt: skip
        metrics.RETRAINS.labels(name, reason, "ok").inc()
        m = done.metrics
        return await self._decided(name, "retrained", f"{reason}: version {done.version} registered, "
                                   f"{'live' if done.promoted else 'in shadow'}", {
            "trigger": reason, **numbers, "version": done.version, "compared_with": done.compared_with,
            **{k: m.get(k) for k in ("auc", "logloss", "live_auc", "live_logloss", "n_train", "n_holdout")},
        })  # fmt: skip

    # -- the decision log -------------------------------------------------------------------------------------
    async def _decided(self, name: str, action: str, reason: str, numbers: dict[str, Any]) -> dict[str, Any]:
        d = {"ts": now_ms(), "model": name, "decision": action, "reason": reason, "numbers": numbers}
        if action not in ("retrained", "retrain_skipped"):
            metrics.ROLLOUT_DECISIONS.labels(name, action).inc()
        log.info("learning loop: model %s: %s (%s) %s", name, action, reason, orjson.dumps(numbers).decode())
        key = decisions_key(self.keys, name)

        async def push() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(key, orjson.dumps(d))
                pipe.ltrim(key, 0, DECISIONS_KEPT - 1)
                await pipe.execute()

        await guarded(push(), "decision log")
        return d

    async def decisions(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        raw = await guarded(self.redis.lrange(decisions_key(self.keys, name), 0, max(0, limit - 1)), "decision log")
        return [orjson.loads(r) for r in raw]
