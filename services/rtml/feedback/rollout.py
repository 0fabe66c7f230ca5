"""Rollout decisions as pure functions: given the policy, the stage and both versions' online quality on
the same labelled examples, what to do next. The controller (``rtml.feedback.learning``) gathers the
numbers from Redis and carries the verdict out through the registry.

Stages (``models.<name>.rollout`` in rtml.yaml, docs/learning-loop.md):
- ``shadow``: the candidate scores every request, live answers. After ``shadow_labels`` labels the candidate
  goes to ``canary`` (when ``canary_share`` > 0) or is promoted, if its metric beats live's by more than
  ``min_gain``; otherwise it is rejected.
- ``canary``: a sticky share of users is answered by the candidate; after ``canary_labels`` more labels the
  same comparison promotes or rejects it.
- ``guard``: after a promotion the previous version keeps scoring in shadow; after ``guard_labels`` labels,
  if the new live version is worse than it by more than ``max_loss``, the promotion is rolled back.
Both versions are compared on exactly the same examples (each example carries every version's score), so
neither gets easier traffic. ``auto_promote: false`` stops at "ready" and leaves promotion to a person.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from rtml.core.config import RolloutPolicy

Action = Literal["wait", "canary", "promote", "ready", "reject", "rollback", "keep"]
Stage = Literal["shadow", "canary", "guard"]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def gain(metric: str, challenger: float, incumbent: float) -> float:
    """How much better ``challenger`` is than ``incumbent`` (positive = better), whatever the metric's sense."""
    return challenger - incumbent if metric == "auc" else incumbent - challenger


def needed(policy: RolloutPolicy, stage: Stage) -> int:
    return {"shadow": policy.shadow_labels, "canary": policy.canary_labels, "guard": policy.guard_labels}[stage]


def judge(
    policy: RolloutPolicy,
    stage: Stage,
    labels: int,
    live: Mapping[str, Any],
    other: Mapping[str, Any],
) -> Verdict:
    """The next step of a rollout in ``stage``; ``labels`` examples labelled in this stage, scored by both.

    ``live`` and ``other`` are quality summaries (``auc``, ``log_loss``, ...) of the live version and of the
    rollout's other version (the candidate; in ``guard``, the previous live version) on those examples.
    """
    metric = policy.metric
    want = needed(policy, stage)
    numbers: dict[str, Any] = {"stage": stage, "labels": labels, "needed": want, "metric": metric,
                               "live": live.get(metric), "other": other.get(metric)}  # fmt: skip
    if labels < want:
        return Verdict("wait", f"{labels} of {want} labels", numbers)
    a, b = other.get(metric), live.get(metric)
    if a is None or b is None:  # e.g. AUC with one class only so far: keep collecting
        return Verdict("wait", f"{metric} is not defined yet on {labels} labels", numbers)
    if stage == "guard":
        loss = gain(metric, float(a), float(b))  # how much better the old version is than the new live one
        numbers["loss"] = loss
        if loss > policy.max_loss:
            return Verdict("rollback", f"the new live version is worse by {loss:.4f} {metric} "
                           f"(> max_loss {policy.max_loss})", numbers)  # fmt: skip
        return Verdict("keep", f"the new live version holds ({metric} loss {loss:.4f} <= {policy.max_loss})", numbers)
    g = gain(metric, float(a), float(b))
    numbers["gain"] = g
    if g <= policy.min_gain:
        return Verdict("reject", f"the candidate's {metric} gain {g:.4f} is not above min_gain {policy.min_gain}",
                       numbers)  # fmt: skip
    if stage == "shadow" and policy.canary_share > 0:
        return Verdict("canary", f"{metric} gain {g:.4f} in shadow: serving {policy.canary_share:.0%} of users",
                       numbers)  # fmt: skip
    if not policy.auto_promote:
        return Verdict("ready", f"{metric} gain {g:.4f}: ready, auto_promote is off", numbers)
    return Verdict("promote", f"{metric} gain {g:.4f} > min_gain {policy.min_gain}", numbers)
