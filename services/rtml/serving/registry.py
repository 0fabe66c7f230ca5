"""The model registry, in Redis. ONNX bytes only (never pickle); each version checked by onnxruntime.

Keys (all of one model under ``Keys.model(name)`` = ``<prefix>{model:<name>}`` so they share a hash slot):
- ``...:seq``           INCR counter: versions are "1", "2", ... assigned atomically;
- ``...:v:<version>``   hash ``onnx`` (bytes), ``sha256``, ``size``, ``metadata`` (JSON), ``created_at``;
- ``...:versions``      sorted set version -> version number;
- ``...:live``          the live version (the pointer every serving replica polls);
- ``...:history``       list of the versions that were live before, most recent first (bounded): what
                        ``rollback`` goes back to;
- ``...:rollout``       hash: the model's running rollout, if any (see ``Rollout``): a candidate in shadow
                        or canary, or the previous live version kept in shadow as a guard after a promotion;
- ``<prefix>{models}``  set of model names (the index; its own slot).

Rollouts (issue 5, safe rollout). At most one per model. ``start_rollout`` puts a candidate in ``shadow``
(scored on every request, logged in ``PredictionLogged.shadow``, never returned) or ``canary`` (answers the
users whose ``canary_point(rollout id, user)`` is below ``share``; live answers the others and is logged in
``shadow``). ``promote_candidate`` makes the candidate live and, with ``guard``, keeps the version it replaced
scoring in shadow (stage ``guard``) until the controller ends the rollout or reverts (``revert_guard``).
Every change of the live pointer by ``promote``/``rollback`` ends the rollout: a rollout is always relative to
the live version it was started against. Decisions are compare-and-set on the rollout's ``id`` (two
controllers never fight: the loser gets ``StaleRollout``). Every change is announced on ``models``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rtml.core.config import PlatformConfig, load_config
from rtml.core.errors import (
    DependencyUnavailable,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RtmlError,
    UnprocessableRecord,
)
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis, connect, guarded, run_pipeline, text
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

# KEYS: version hash, live pointer, history, rollout. ARGV: version, history bound.
# -> {1, ended rollout id or ''}; {0, ''} when the version is unknown. A change of the live pointer ends the
# rollout (it was relative to the version that was live); promoting the live one again changes nothing.
_PROMOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, ''}
end
local current = redis.call('GET', KEYS[2])
if current == ARGV[1] then
  return {1, ''}
end
if current then
  redis.call('LPUSH', KEYS[3], current)
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
end
redis.call('SET', KEYS[2], ARGV[1])
local ended = redis.call('HGET', KEYS[4], 'id') or ''
redis.call('DEL', KEYS[4])
return {1, ended}
"""

# KEYS: live pointer, history, rollout. Pops the history until a version other than the live one; false when
# none. Versions are never deleted, so every version in the history still exists. Ends the rollout.
# -> {previous, ended rollout id or ''}
_ROLLBACK = """
local current = redis.call('GET', KEYS[1])
while true do
  local previous = redis.call('LPOP', KEYS[2])
  if not previous then
    return false
  end
  if previous ~= current then
    redis.call('SET', KEYS[1], previous)
    local ended = redis.call('HGET', KEYS[3], 'id') or ''
    redis.call('DEL', KEYS[3])
    return {previous, ended}
  end
end
"""

# KEYS: version hash, live pointer, rollout. ARGV: version, stage, share, since, new id, by, replace (0|1).
# -> {'unknown'} | {'live'} | {'nolive'} | {'busy', version, stage, id} | {'stage', id} | {'started', id, replaced id}
# The same candidate again (not a guard): a stage change that keeps the id (canary users stay where they are).
_START_ROLLOUT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unknown'}
end
local live = redis.call('GET', KEYS[2])
if not live then
  return {'nolive'}
end
if live == ARGV[1] then
  return {'live'}
end
local cur = redis.call('HMGET', KEYS[3], 'version', 'stage', 'id')
if cur[3] then
  if cur[1] == ARGV[1] and cur[2] ~= 'guard' then
    redis.call('HSET', KEYS[3], 'stage', ARGV[2], 'share', ARGV[3], 'since', ARGV[4], 'by', ARGV[6])
    return {'stage', cur[3]}
  end
  if ARGV[7] ~= '1' then
    return {'busy', cur[1], cur[2], cur[3]}
  end
  redis.call('DEL', KEYS[3])
end
redis.call('HSET', KEYS[3], 'version', ARGV[1], 'stage', ARGV[2], 'share', ARGV[3], 'since', ARGV[4],
           'id', ARGV[5], 'by', ARGV[6], 'live', live)
return {'started', ARGV[5], cur[3] or ''}
"""

# KEYS: rollout. ARGV: id, stage, share, since, by. -> 1 | 0 (no rollout or another id) | -1 (a guard)
_SET_STAGE = """
local cur = redis.call('HMGET', KEYS[1], 'id', 'stage')
if cur[1] ~= ARGV[1] then
  return 0
end
if cur[2] == 'guard' then
  return -1
end
redis.call('HSET', KEYS[1], 'stage', ARGV[2], 'share', ARGV[3], 'since', ARGV[4], 'by', ARGV[5])
return 1
"""

# KEYS: rollout. ARGV: id or '' (whatever runs). -> {} (none) | {'stale', id} | {'ended', field, value, ...}
_END_ROLLOUT = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  return {}
end
if ARGV[1] ~= '' and ARGV[1] ~= id then
  return {'stale', id}
end
local all = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
local out = {'ended'}
for i = 1, #all do
  out[#out + 1] = all[i]
end
return out
"""

# KEYS: rollout, live pointer, history. ARGV: id, mode (promote|revert), guard (0|1), since, history bound, by.
# promote: the candidate (stage shadow|canary) becomes live; with guard, the rollout becomes stage 'guard' of
#   the version it replaced (same id), else it ends. revert: the guard's version becomes live again (like
#   rollback: it leaves the history) and the rollout ends.
# -> {'stale'} | {'stage', stage} | {'guard'|'promoted'|'reverted', new live, previous live or ''}
_ADOPT = """
local r = redis.call('HMGET', KEYS[1], 'version', 'stage', 'id')
if r[3] ~= ARGV[1] then
  return {'stale'}
end
local version, stage = r[1], r[2]
local live = redis.call('GET', KEYS[2])
if ARGV[2] == 'promote' then
  if stage == 'guard' then
    return {'stage', stage}
  end
  if live and live ~= version then
    redis.call('LPUSH', KEYS[3], live)
    redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
  end
  redis.call('SET', KEYS[2], version)
  if ARGV[3] == '1' and live and live ~= version then
    redis.call('HSET', KEYS[1], 'version', live, 'stage', 'guard', 'share', '0', 'since', ARGV[4],
               'by', ARGV[6], 'live', version)
    return {'guard', version, live}
  end
  redis.call('DEL', KEYS[1])
  return {'promoted', version, live or ''}
end
if stage ~= 'guard' then
  return {'stage', stage}
end
if redis.call('LINDEX', KEYS[3], 0) == version then
  redis.call('LPOP', KEYS[3])
end
redis.call('SET', KEYS[2], version)
redis.call('DEL', KEYS[1])
return {'reverted', version, live or ''}
"""

STAGES = ("shadow", "canary", "guard")
_BLAKE_MAX = float(2**64)


class RolloutConflict(RtmlError):
    """The rollout is not in a state that allows the change (409): another one runs, or it is a guard."""

    status = 409
    code = "rollout_conflict"


class StaleRollout(RolloutConflict):
    """The rollout id given is not the running one (ended, replaced, or none): the caller decided on stale
    state; nothing was changed. Compare-and-set: two controllers never overwrite each other."""

    code = "stale_rollout"


@dataclass(frozen=True, slots=True)
class Rollout:
    """A model's running rollout, as stored in ``...:rollout``.

    ``version`` is the candidate (stage ``shadow``/``canary``) or, in stage ``guard``, the version that was
    live before ``promote_candidate``. ``share`` is the canary share of users (0 otherwise). ``since`` is when
    the record entered its current stage (epoch ms). ``id`` is unique per rollout and kept across its stage
    changes (also into ``guard``); the canary split hashes it, so users stay put across stage changes of one
    rollout and are drawn afresh for the next. ``live`` is the live version the rollout is relative to.
    """

    version: str
    stage: str
    share: float
    since: int
    id: str
    by: str | None
    live: str | None

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any] | None) -> Rollout | None:
        if not raw:
            return None
        h = {_text(k): _text(v) for k, v in raw.items()}
        if not h.get("id") or not h.get("version") or h.get("stage") not in STAGES:
            return None
        return cls(h["version"] or "", h["stage"] or "", float(h.get("share") or 0.0), int(h.get("since") or 0),
                   h["id"] or "", h.get("by") or None, h.get("live") or None)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "stage": self.stage, "share": self.share, "since": self.since,
                "id": self.id, "by": self.by, "live": self.live}  # fmt: skip


def canary_point(rollout_id: str, key: str) -> float:
    """Where ``key`` (a user id) falls in [0, 1) for one rollout: blake2b-64 of ``"<id>\\0<key>"`` / 2**64.

    A user is in the canary when this is below the share: sticky for the user within a rollout (stage and
    share changes keep the id, so raising the share only adds users), drawn afresh for the next rollout, the
    same on every replica and reproducible by anyone (the feedback side) from the logged record.
    """
    digest = hashlib.blake2b(f"{rollout_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _BLAKE_MAX


ANNOUNCEMENTS = frozenset({"promoted", "rolled_back", "rollout_started", "rollout_stage", "rollout_ended"})


def decode_announcement(record: Any) -> dict[str, Any]:
    """A record of the ``models`` topic as ``ModelRegistry._announce`` writes it (a JSON object with ``model``,
    ``version`` and a known ``event``), else ``UnprocessableRecord`` naming what is wrong: the consumer loop
    dead-letters it with that reason (another ``rtml-schema`` version it refuses before, as for every topic).
    ``record`` is an aiokafka ``ConsumerRecord``."""
    if record.value is None:
        raise UnprocessableRecord("empty record value")
    try:
        doc = orjson.loads(record.value)
    except orjson.JSONDecodeError as exc:
        raise UnprocessableRecord(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UnprocessableRecord(f"not a model announcement: a JSON {type(doc).__name__}, not an object")
    name, version, event = doc.get("model"), doc.get("version"), doc.get("event")
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise UnprocessableRecord(f"not a model announcement: model {str(name)[:80]!r} is not a model name")
    if not isinstance(version, str) or not version:
        raise UnprocessableRecord(f"not a model announcement: version {str(version)[:80]!r} is not a version")
    if event not in ANNOUNCEMENTS:
        raise UnprocessableRecord(
            f"not a model announcement: event {str(event)[:80]!r} is not one of {sorted(ANNOUNCEMENTS)}"
        )
    return doc


def _check_stage(stage: str, share: float) -> float:
    """The share to store for a stage a caller may set (shadow, canary); 422 otherwise."""
    if stage == "shadow":
        if share:
            raise InvalidInput("share applies to stage 'canary' only; a shadow candidate answers no one")
        return 0.0
    if stage == "canary":
        if not _finite(share) or not 0.0 < share <= 1.0:
            raise InvalidInput(f"canary share must be a number in (0, 1], not {share!r}")
        return float(share)
    raise InvalidInput(f"stage must be 'shadow' or 'canary', not {stage!r} (a guard follows promote_candidate)")


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
    return None if raw is None else text(raw)


class ModelRegistry:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._promote = redis.register_script(_PROMOTE)
        self._rollback = redis.register_script(_ROLLBACK)
        self._start_rollout = redis.register_script(_START_ROLLOUT)
        self._set_stage = redis.register_script(_SET_STAGE)
        self._end_rollout = redis.register_script(_END_ROLLOUT)
        self._adopt = redis.register_script(_ADOPT)

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

    async def _unknown_model(self, name: str) -> NotFound | None:
        """The 404 for a model with no version at all (say "unknown model", not "no such version"), else None."""
        if not await guarded(self.redis.zcard(self._k(name, "versions")), "model versions"):
            return NotFound(f"unknown model {name!r}: no version of it was ever registered")
        return None

    async def _transaction(self, build: Any) -> list[Any]:
        async with self.redis.pipeline(transaction=True) as pipe:
            build(pipe)
            return list(await pipe.execute())

    async def promote(self, name: str, version: str, producer: Producer | None = None, by: str | None = None) -> None:
        """Point the live pointer at ``version`` (404 when unknown) and remember the one it replaces for
        ``rollback``; announce it on ``models`` (with ``by``, who asked, when known) if a producer is given.

        A change of the live version ends the model's rollout, if any (announced as ``rollout_ended``): also
        when ``version`` is the candidate, which then becomes live without a guard (``promote_candidate``
        keeps one)."""
        check_name(name)
        keys = [self._k(name, f"v:{version}"), self._k(name, "live"), self._k(name, "history"),
                self._k(name, "rollout")]  # fmt: skip
        ok, ended = await guarded(self._promote(keys=keys, args=[version, HISTORY_MAX]), "model promote")
        if not int(ok):
            raise await self._unknown_model(name) or NotFound(f"model {name!r} has no version {version!r}")
        log.info("promoted model %s version %s", name, version)
        await self._announce(name, version, "promoted", producer, by)
        if _text(ended):
            await self._announce(name, version, "rollout_ended", producer, by,
                                 {"rollout_id": _text(ended), "reason": "promoted"})  # fmt: skip

    async def rollback(self, name: str, producer: Producer | None = None, by: str | None = None) -> str:
        """Make the version that was live before the current one live again; returns it. 404 when the model
        has no earlier live version. Announced on ``models`` like a promotion; ends the rollout, if any."""
        check_name(name)
        keys = [self._k(name, "live"), self._k(name, "history"), self._k(name, "rollout")]
        got = await guarded(self._rollback(keys=keys, args=[]), "model rollback")
        if not got:
            earlier = NotFound(f"model {name!r} has no earlier live version to roll back to")
            raise await self._unknown_model(name) or earlier
        previous, ended = _text(got[0]) or "", _text(got[1])
        log.info("rolled model %s back to version %s", name, previous)
        await self._announce(name, previous, "rolled_back", producer, by)
        if ended:
            await self._announce(name, previous, "rollout_ended", producer, by,
                                 {"rollout_id": ended, "reason": "rolled_back"})  # fmt: skip
        return previous

    # -- rollouts -----------------------------------------------------------------------------------
    async def start_rollout(
        self,
        name: str,
        version: str,
        stage: str = "shadow",
        share: float = 0.0,
        by: str | None = None,
        *,
        replace: bool = False,
        producer: Producer | None = None,
    ) -> Rollout:
        """Put candidate ``version`` in ``stage`` (``shadow``, or ``canary`` with ``share`` of users in (0, 1]).

        - 404 when the version is unknown; 422 for a bad stage/share or when ``version`` is the live one;
          409 (``RolloutConflict``) when the model has no live version (nothing to compare against);
        - the same candidate again (stage shadow/canary): a stage change that keeps the rollout's id;
        - another rollout running (another candidate, or a guard): 409 naming it, unless ``replace`` (it is
          then ended in the same atomic step and a new rollout starts). Refusing is the default so a human and
          the controller never silently overwrite each other's rollout.
        Announced as ``rollout_started`` (or ``rollout_stage``) on ``models``.
        """
        check_name(name)
        share = _check_stage(stage, share)
        rid = uuid.uuid4().hex
        keys = [self._k(name, f"v:{version}"), self._k(name, "live"), self._k(name, "rollout")]
        args: list[str | int] = [version, stage, repr(share), now_ms(), rid, by or "", "1" if replace else "0"]
        got = [_text(x) or "" for x in await guarded(self._start_rollout(keys=keys, args=args), "rollout start")]
        outcome = got[0]
        if outcome == "unknown":
            raise await self._unknown_model(name) or NotFound(f"model {name!r} has no version {version!r}")
        if outcome == "live":
            raise InvalidInput(f"version {version!r} of model {name!r} is the live one: a candidate must differ")
        if outcome == "nolive":
            raise RolloutConflict(f"model {name!r} has no live version: promote one before a rollout")
        if outcome == "busy":
            raise RolloutConflict(
                f"model {name!r} already has a rollout: version {got[1]} in {got[2]} (id {got[3]}); end it "
                "first (DELETE /v1/models/{name}/rollout, rtml models end-rollout) or replace it"
            )
        rollout = await self.rollout(name)
        if rollout is None:  # ended between the two calls by someone else
            raise StaleRollout(f"the rollout of model {name!r} was ended while it was being started")
        event = "rollout_stage" if outcome == "stage" else "rollout_started"
        extra: dict[str, Any] = {"rollout": rollout.to_dict()}
        if outcome == "started" and got[2]:
            extra["replaced"] = got[2]
        log.info("model %s: %s %s", name, event, rollout.to_dict())
        await self._announce(name, version, event, producer, by, extra)
        return rollout

    async def set_stage(
        self,
        name: str,
        rollout_id: str,
        stage: str,
        share: float = 0.0,
        by: str | None = None,
        producer: Producer | None = None,
    ) -> Rollout:
        """Move the running rollout to ``stage`` (shadow|canary) with ``share``, only if its id is still
        ``rollout_id`` (``StaleRollout`` otherwise, nothing changed). 409 for a guard (it ends or reverts);
        422 for a bad stage/share. Announced as ``rollout_stage``."""
        check_name(name)
        share = _check_stage(stage, share)
        args: list[str | int] = [rollout_id, stage, repr(share), now_ms(), by or ""]
        ok = int(await guarded(self._set_stage(keys=[self._k(name, "rollout")], args=args), "rollout stage"))
        if ok == 0:
            raise StaleRollout(f"rollout {rollout_id!r} of model {name!r} is not the running one")
        if ok < 0:
            raise RolloutConflict(f"rollout {rollout_id!r} of model {name!r} is a guard: end or revert it")
        rollout = await self.rollout(name)
        if rollout is None or rollout.id != rollout_id:
            raise StaleRollout(f"rollout {rollout_id!r} of model {name!r} ended meanwhile")
        await self._announce(name, rollout.version, "rollout_stage", producer, by, {"rollout": rollout.to_dict()})
        return rollout

    async def end_rollout(
        self, name: str, rollout_id: str | None = None, by: str | None = None, producer: Producer | None = None,
        reason: str = "ended",
    ) -> Rollout | None:  # fmt: skip
        """End the running rollout (any, when ``rollout_id`` is None; else only that one: ``StaleRollout``
        when another runs). Returns the ended record; None when none was running. The live version does not
        change. Announced as ``rollout_ended`` with ``reason`` (e.g. the controller's "rejected")."""
        check_name(name)
        got = await guarded(self._end_rollout(keys=[self._k(name, "rollout")], args=[rollout_id or ""]),
                            "rollout end")  # fmt: skip
        if not got:
            if rollout_id is not None:
                raise StaleRollout(f"rollout {rollout_id!r} of model {name!r} is not running (none is)")
            return None
        if _text(got[0]) == "stale":
            raise StaleRollout(f"rollout {rollout_id!r} of model {name!r} is not the running one ({_text(got[1])} is)")
        ended = Rollout.from_hash(dict(zip(got[1::2], got[2::2], strict=True)))
        if ended is not None:
            log.info("model %s: rollout ended (%s) %s", name, reason, ended.to_dict())
            await self._announce(name, ended.version, "rollout_ended", producer, by,
                                 {"rollout_id": ended.id, "reason": reason, "rollout": ended.to_dict()})  # fmt: skip
        return ended

    async def promote_candidate(
        self, name: str, rollout_id: str, guard: bool = True, by: str | None = None, producer: Producer | None = None
    ) -> Rollout | None:
        """Atomically make the rollout's candidate live and, when ``guard``, turn the rollout (same id) into
        stage ``guard`` of the version it replaced, which keeps scoring in shadow; returns that guard, or None
        when the rollout ended (no guard). ``StaleRollout`` when ``rollout_id`` is not running; 409 when it
        is already a guard. Announced as ``promoted`` plus ``rollout_stage`` (guard) or ``rollout_ended``."""
        check_name(name)
        outcome, live, previous = await self._adopt_call(name, rollout_id, "promote", guard, by)
        extra: dict[str, Any] = {"rollout_id": rollout_id, "previous": previous or None}
        await self._announce(name, live, "promoted", producer, by, extra)
        if outcome == "guard":
            rollout = await self.rollout(name)
            if rollout is not None and rollout.id == rollout_id:
                await self._announce(name, rollout.version, "rollout_stage", producer, by,
                                     {"rollout": rollout.to_dict()})  # fmt: skip
                return rollout
            return None
        await self._announce(
            name, live, "rollout_ended", producer, by, {"rollout_id": rollout_id, "reason": "promoted"}
        )
        return None

    async def revert_guard(
        self, name: str, rollout_id: str, by: str | None = None, producer: Producer | None = None
    ) -> str:
        """The guarded promotion was a mistake: atomically make the guard's version live again and end the
        rollout; returns that version. ``StaleRollout`` when ``rollout_id`` is not running; 409 when it is
        not a guard. Announced as ``rolled_back`` plus ``rollout_ended`` (reason ``reverted``)."""
        check_name(name)
        _, live, previous = await self._adopt_call(name, rollout_id, "revert", False, by)
        await self._announce(name, live, "rolled_back", producer, by, {"rollout_id": rollout_id, "previous": previous})
        await self._announce(
            name, live, "rollout_ended", producer, by, {"rollout_id": rollout_id, "reason": "reverted"}
        )
        return live

    async def _adopt_call(self, name: str, rollout_id: str, mode: str, guard: bool, by: str | None
                          ) -> tuple[str, str, str]:  # fmt: skip
        keys = [self._k(name, "rollout"), self._k(name, "live"), self._k(name, "history")]
        args: list[str | int] = [rollout_id, mode, "1" if guard else "0", now_ms(), HISTORY_MAX, by or ""]
        got = [_text(x) or "" for x in await guarded(self._adopt(keys=keys, args=args), f"rollout {mode}")]
        if got[0] == "stale":
            raise StaleRollout(f"rollout {rollout_id!r} of model {name!r} is not the running one")
        if got[0] == "stage":
            need = "a candidate in shadow or canary" if mode == "promote" else "a guard"
            raise RolloutConflict(f"rollout {rollout_id!r} of model {name!r} is in stage {got[1]}, not {need}")
        log.info("model %s: rollout %s %s: version %s live (was %s)", name, rollout_id, got[0], got[1], got[2])
        return got[0], got[1], got[2]

    async def rollout(self, name: str) -> Rollout | None:
        """The model's running rollout, None when there is none."""
        check_name(name)
        return Rollout.from_hash(await guarded(self.redis.hgetall(self._k(name, "rollout")), "rollout read"))

    async def _announce(self, name: str, version: str, event: str, producer: Producer | None, by: str | None,
                        extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        if producer is None:
            return
        record: dict[str, Any] = {"model": name, "version": version, "event": event, "ts": now_ms()}
        if by:
            record["by"] = by
        if extra:
            record.update(extra)
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

    async def serving_state(self, names: Iterable[str]) -> dict[str, tuple[str | None, Rollout | None]]:
        """What replicas poll: each model's live version and running rollout, in one round trip."""
        names = list(names)
        if not names:
            return {}

        def reads(p: Any) -> None:
            for n in names:
                p.get(self._k(n, "live"))
                p.hgetall(self._k(n, "rollout"))

        raw = await run_pipeline(self.redis, reads, "live models")
        return {n: (_text(raw[2 * i]), Rollout.from_hash(raw[2 * i + 1])) for i, n in enumerate(names)}

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
                p.hgetall(self._k(n, "rollout"))

        raw = await run_pipeline(self.redis, heads, "model list")
        versions = {n: [_text(v) or "" for v in raw[4 * i]] for i, n in enumerate(names)}
        live = {n: _text(raw[4 * i + 1]) for i, n in enumerate(names)}
        history = {n: [_text(v) or "" for v in raw[4 * i + 2]] for i, n in enumerate(names)}
        rollouts = {n: Rollout.from_hash(raw[4 * i + 3]) for i, n in enumerate(names)}
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
        return [
            {"name": n, "live_version": live[n], "history": history[n], "versions": info[n],
             "rollout": (r.to_dict() if (r := rollouts[n]) is not None else None)}
            for n in names
        ]  # fmt: skip


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
