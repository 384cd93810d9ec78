"""What a stage Job shows, as the planner's `JobObservation`: pure, so table tests pin it down.

The Job's conditions decide its phase (Complete/SuccessCriteriaMet, Failed/FailureTarget; a
suspended Job is Queued, or Suspended when the run suspended it), its `status.failed` the attempts,
its unfinished Pods why it waits (unschedulable, image pull, a mount), its failed Pods' exit codes
whether a multi-node train may be restarted whole. The stage's result is the termination message of its Pod: the
JSON summary on success, `{"error": ...}` on failure, or, with `FallbackToLogsOnError`, the tail
of the log, whose last line is the cause. A finished Job whose deciding Pod is visible but not yet
terminated reads as Active: the Pod's own watch event follows and brings the message, and a result
read too early would be lost for good (finished stage records never change).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from .naming import LABEL_ROUND, LABEL_STAGE
from .planner import JobObservation
from .spec import STAGES

SUCCESS_CONDITIONS = ("Complete", "SuccessCriteriaMet")
FAILURE_CONDITIONS = ("Failed", "FailureTarget")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The annotation the operator puts on a Job it suspends for `spec.suspend` (kube.suspend_job): a
# suspended Job without it waits for admission (Kueue suspends the Jobs of its queues until then),
# and only a Job with it is resumed by the operator.
SUSPENDED_BY, SUSPENDED_BY_RUN = "selfalign.dev/suspended-by", "run"
# Container waiting reasons that mean the stage cannot start until someone acts (the kubelet's).
WAITING_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                   "CreateContainerError")
_UNSETTLED = object()  # a finished Job whose Pods have not all reported their end yet
_RUNNING_PHASES = ("Pending", "Running", None)


def observe_jobs(jobs: Iterable[Mapping[str, Any]],
                 pods: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, JobObservation]:
    """Every stage Job of one run (with its Pods by Job name), keyed by Job name."""
    observed = {}
    for job in jobs:
        name = job["metadata"]["name"]
        seen = observe_job(job, list(pods.get(name, ())))
        if seen is not None:
            observed[name] = seen
    return observed


def stage_labels(job: Mapping[str, Any]) -> tuple[int, str] | None:
    """(round, stage) from a stage Job's labels; None when they are missing or invalid."""
    labels = job.get("metadata", {}).get("labels") or {}
    try:
        round_, stage = int(labels[LABEL_ROUND]), labels[LABEL_STAGE]
    except (KeyError, ValueError):
        return None
    return (round_, stage) if stage in STAGES else None


def observe_job(job: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> JobObservation | None:
    """None for a Job that does not carry a valid round and stage label (not one of ours)."""
    meta = job.get("metadata", {})
    if (labelled := stage_labels(job)) is None:
        return None
    round_, stage = labelled
    status = job.get("status") or {}
    true = {c["type"]: c for c in status.get("conditions") or () if c.get("status") == "True"}
    common = dict(name=meta["name"], round=round_, stage=stage,
                  failures=int(status.get("failed") or 0), start_time=status.get("startTime"),
                  exit_codes=exit_codes(pods))

    if any(t in true for t in SUCCESS_CONDITIONS):
        pod = _deciding_pod(pods, "Succeeded")
        if pod is _UNSETTLED:
            return JobObservation(phase="Active", **common)
        message = _termination_message(pod)
        finished = status.get("completionTime") or _condition_time(true, SUCCESS_CONDITIONS)
        return JobObservation(phase="Succeeded", result=_summary(message), completion_time=finished, **common)

    if any(t in true for t in FAILURE_CONDITIONS):
        pod = _deciding_pod(pods, "Failed")
        if pod is _UNSETTLED:
            return JobObservation(phase="Active", **common)
        condition = next(true[t] for t in FAILURE_CONDITIONS if t in true)
        message = _termination_message(pod)
        cause = _cause(message) or _condition_cause(condition)
        result = _summary(message)
        return JobObservation(phase="Failed", message=cause, result=result if result else None,
                              reason=condition.get("reason"),
                              completion_time=_condition_time(true, FAILURE_CONDITIONS), **common)

    if (job.get("spec") or {}).get("suspend"):  # its condition follows once the Job controller has acted
        suspended_at = (true.get("Suspended") or {}).get("lastTransitionTime")
        if (meta.get("annotations") or {}).get(SUSPENDED_BY) == SUSPENDED_BY_RUN:
            return JobObservation(phase="Suspended", suspended_at=suspended_at, **common)
        return JobObservation(phase="Queued", suspended_at=suspended_at,
                              message=f"Job {meta['name']} is suspended until admitted (Kueue)", **common)
    waiting = pod_waiting(pods)
    return JobObservation(phase="Active", waiting=waiting[:2] if waiting else None,
                          waiting_since=waiting[2] if waiting else None, **common)


def pod_waiting(pods: Iterable[Mapping[str, Any]]) -> tuple[str, str, str | None] | None:
    """(reason, message, since) of the first Pod that cannot run yet, from what the scheduler and
    the kubelet write into its status: PodScheduled False (Unschedulable, with the scheduler's
    message), a container waiting to pull its image or for its config, or still being created
    (volumes mounting; `since` is when it was scheduled, so the planner can tell a slow mount)."""
    for pod in pods:
        if pod_phase(pod) not in _RUNNING_PHASES:
            continue
        name, status = pod["metadata"].get("name"), pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or ()}
        scheduled = conditions.get("PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            return "Unschedulable", f"pod {name}: {scheduled.get('message') or 'no node fits it'}", None
        for container in status.get("containerStatuses") or ():
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in WAITING_REASONS:
                return reason, f"pod {name}: {waiting.get('message') or reason}", None
            if reason == "ContainerCreating":
                return (reason, f"pod {name}: its containers are still being created (a volume not mounted yet? "
                                f"kubectl describe pod {name} shows FailedMount events)",
                        scheduled.get("lastTransitionTime"))
    return None


def exit_codes(pods: Iterable[Mapping[str, Any]]) -> tuple[int, ...]:
    """The distinct non-zero exit codes of the Pods' terminated containers."""
    codes = set()
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or ():
            code = ((container.get("state") or {}).get("terminated") or {}).get("exitCode")
            if isinstance(code, int) and code != 0:
                codes.add(code)
    return tuple(sorted(codes))


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its ownerReference with controller: true)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return ref.get("uid")
    return None


def observe_foreign(job: Mapping[str, Any]) -> JobObservation | None:
    """A Job with a stage Job's name that this run does not control: an earlier run of the same
    name, deleted but not yet collected. Its stage waits (nothing of it is read) until it is gone."""
    meta = job.get("metadata", {})
    if (labelled := stage_labels(job)) is None:
        return None
    round_, stage = labelled
    message = (f"Job {meta['name']} exists but belongs to another run (owner uid {controller_uid(job) or 'none'}), "
               "e.g. a deleted run of this name: it is created once the garbage collector has deleted that one")
    return JobObservation(meta["name"], round_, stage, "Refused", message=message)


def _deciding_pod(pods: list[Mapping[str, Any]], phase: str) -> Mapping[str, Any] | None | object:
    """The newest Pod that ended in `phase` (rank 0's for an Indexed Job), None when there is none
    (the Pods are gone, or none ended that way), _UNSETTLED while any Pod has not terminated."""
    if any(pod_phase(p) in _RUNNING_PHASES for p in pods):
        return _UNSETTLED
    ended = [p for p in pods if pod_phase(p) == phase]
    rank0 = [p for p in ended if _completion_index(p) in (None, "0")]
    return max(rank0 or ended, key=_created, default=None)


def _created(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata", {})
    return f"{meta.get('creationTimestamp') or ''}/{meta.get('name') or ''}"


def _completion_index(pod: Mapping[str, Any]) -> str | None:
    meta = pod.get("metadata", {})
    return (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)


def pod_phase(pod: Mapping[str, Any]) -> str | None:
    """Succeeded or Failed once the Pod or its containers ended, else the Pod's own phase."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return status["phase"]
    terminated = [s["state"]["terminated"] for s in status.get("containerStatuses") or ()
                  if (s.get("state") or {}).get("terminated")]
    if terminated:
        return "Succeeded" if all(t.get("exitCode") == 0 for t in terminated) else "Failed"
    return status.get("phase")


def _termination_message(pod: Mapping[str, Any] | None) -> str | None:
    """The first container's termination message that is not empty."""
    if pod is None:
        return None
    for state in (pod.get("status") or {}).get("containerStatuses") or ():
        message = ((state.get("state") or {}).get("terminated") or {}).get("message")
        if message and message.strip():
            return message.strip()
    return None


def _summary(message: str | None) -> dict[str, Any] | None:
    """The JSON object a stage wrote; None for plain log text or nothing at all."""
    if not message:
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _cause(message: str | None) -> str | None:
    """A failed stage's one-line cause: `error` of its JSON result, else the log's last line."""
    if not message:
        return None
    summary = _summary(message)
    if summary is not None:
        return str(summary["error"]) if summary.get("error") else message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _condition_cause(condition: Mapping[str, Any]) -> str:
    reason, message = condition.get("reason"), condition.get("message")
    return ": ".join(part for part in (reason, message) if part) or "the Job failed"


def _condition_time(true: Mapping[str, Mapping[str, Any]], types: tuple[str, ...]) -> str | None:
    for type_ in types:
        if type_ in true and true[type_].get("lastTransitionTime"):
            return true[type_]["lastTransitionTime"]
    return None
