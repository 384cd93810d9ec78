"""Status conditions: the types, the reasons, and the one helper that sets them.

Mirrors apimachinery's `meta.SetStatusCondition`: `lastTransitionTime` moves only when the
condition's status flips, so GitOps tools (kstatus, Argo CD) see stable conditions.

`Reconciling` and `Stalled` are the two types kstatus reads (sigs.k8s.io/cli-utils
pkg/kstatus/status/generic.go): Reconciling True is InProgress, Stalled True is Failed, and with
`status.observedGeneration` equal to `metadata.generation` and neither True the run is Current.
Flux's health checks and `kubectl wait --for=condition=Ready` read them; Argo CD reads health.lua.
"""
from __future__ import annotations

from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
RECONCILING = "Reconciling"  # kstatus: a stage is pending, queued, waiting or running
STALLED = "Stalled"  # kstatus: failed; only a spec change (retry, a fix) moves it on
CONDITION_TYPES = (READY, PROGRESSING, SUCCEEDED, FAILED, SUSPENDED, RECONCILING, STALLED)

# Reasons (CamelCase, as Kubernetes expects).
STARTING = "Starting"
STAGE_RUNNING = "StageRunning"
JOB_REFUSED = "JobCreateRefused"  # the API refused the stage's Job; tried again until created
STAGE_FAILED = "StageFailed"
RUN_SUCCEEDED = "RunSucceeded"
CONVERGED = "Converged"  # evaluate.stopWhenWorse: a round raised the held-out loss; no round after it runs
INVALID_SPEC = "InvalidSpec"
STATUS_REJECTED = "StatusRejected"  # the API refused the status a pass computed; failed until the spec changes
SUSPENDED_BY_USER = "SuspendedByUser"
NOT_SUSPENDED = "NotSuspended"
# Why the current stage waits: the Progressing reason and `status.waiting`. QUEUED: its Job is
# suspended until Kueue admits it; the scheduler's and kubelet's own reasons otherwise
# (observe.WAITING_REASONS, Unschedulable, and ContainerCreating past planner.MOUNT_WAIT).
QUEUED = "Queued"
UNSCHEDULABLE = "Unschedulable"
CONTAINER_CREATING = "ContainerCreating"


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> bool:
    """Insert or update one condition in place; return whether anything changed."""
    wanted = {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }
    for existing in conditions:
        if existing["type"] != type_:
            continue
        if all(existing.get(k) == v for k, v in wanted.items()):
            return False
        if existing["status"] != wanted["status"]:
            existing["lastTransitionTime"] = now
        existing.update(wanted)
        return True
    conditions.append({**wanted, "lastTransitionTime": now})
    return True
