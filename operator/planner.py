"""The run planner: every decision about a SelfAlignRun, as one pure function.

`plan(spec, status, observed, now, ...)` takes the typed spec (or the SpecError that parsing
raised), the status the run carries, what is observed of its stage Jobs, and the time. It returns
the new status, the Jobs that must exist, and the Events that the transition deserves. No I/O and
no clock, so the kopf handlers and the local runner share it and tests drive it directly.

Rules, in the order the code applies them:
1. An invalid spec ends the run as Failed/InvalidSpec; a corrected spec (new generation) resumes it.
2. Observed Jobs update the stage records. A record that is Succeeded or Failed never changes
   again: status is the memory, so a finished Job that disappeared (TTL) is never re-run. (A Job
   that finished and vanished without ever being observed is ensured again; its stage finds its
   own manifest and completes as a no-op: the stage contract.)
3. The stages run strictly in order, round by round; the first stage not yet Succeeded is the
   current one. Failed there fails the run; otherwise its Job must exist (an idempotent ensure:
   created once, re-created only if it vanished before finishing). The pass that creates it
   records the stage Running already (one status write per transition; a run with a Kueue
   `queueName` goes Pending, Queued, then Running). While the API refuses to create it (quota,
   admission policy), the stage is Pending and the run says why.
4. `suspend` starts nothing new and suspends the running stage's Job (Job `spec.suspend`: its Pods
   are released); resuming unsuspends the same Job, so the same stage continues. A Job suspended
   by someone else (Kueue, until it admits the Job) makes the stage Queued; the stage record keeps
   its queued seconds apart from its running seconds.
5. Raising `rounds` after success continues the run.
   With `evaluate.stopWhenWorse`, the first round whose merge raised the held-out loss
   (`evalLossAfter > evalLossBefore` in its result) is the last: it finishes (coverage too) and the
   run succeeds with reason Converged; raising `rounds` does not continue it, switching the flag
   off does.
6. Raising `spec.retry` above the value a failed stage's attempt ran under runs that stage again
   with a new Job (`<job>-a<N>`); every finished stage is kept and the failed attempt goes to the
   record's `history`. A multi-node train whose Job failed for any reason but exit code 2 (bad
   input) is re-created whole the same way, up to `backoffLimit` times, with no retry needed.
7. Why a stage waits (its Pods unschedulable, pulling an image, missing config, mounting a volume
   for longer than MOUNT_WAIT, or its Job queued) goes into the stage record, the run's message,
   its Progressing condition's reason and `status.waiting` (a printer column).
8. A status the API rejects (a schema bound, etcd's size limit) fails the run with the API's
   message (`status_rejected`), and it stays failed until its spec changes (a new generation).

On a cluster the run's storage prefix carries its uid (`storage_prefix`): a run deleted and
created again under the same name (the only way to change `model.base` or `seeds`) starts afresh
and never reads the earlier run's outputs as its own.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Mapping

from . import conditions as c
from .lineage import model_uri, run_uri, stage_model
from .naming import MAX_NAME, job_name
from .spec import STAGES, RunSpec, SpecError

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
QUEUED = "Queued"  # a stage whose Job waits for admission (Kueue); never a run phase
MAX_MESSAGE = 4096  # status messages stay readable and far below the CRD's 32768-character cap
# A stage record keeps at most this much of its result (JSON): 100 rounds x 5 stages of records
# stay at half of etcd's 1.5 MiB object limit (the rest: managedFields, conditions), and the full
# summary is in the stage's manifest.
MAX_METRICS = 1024
FINAL_STAGE_PHASES = (SUCCEEDED, FAILED)
MAX_HISTORY = 20  # earlier attempts a stage record keeps (the CRD's bound)
MAX_REASON = 128
# A container still being created this long after its Pod was scheduled waits for a volume: the
# kubelet gives up waiting for attach and mount after 2 min 3 s (podAttachAndMountTimeout) and
# reports FailedMount, then tries again.
MOUNT_WAIT = 123.0
EXIT_BAD_INPUT = 2  # the stage contract: bad input, so no retry or restart can help


@dataclass(frozen=True)
class JobObservation:
    """What the cluster (or the local runner) shows of one stage Job."""

    name: str
    round: int
    stage: str
    # Refused: the API would not create it; Queued: suspended, not by the run (Kueue admits it
    # later); Suspended: suspended by the run (spec.suspend)
    phase: Literal["Active", "Succeeded", "Failed", "Refused", "Queued", "Suspended"]
    failures: int = 0
    result: Mapping[str, Any] | None = None  # the stage's JSON summary (termination message)
    message: str | None = None  # why it failed, was refused or is queued: the stage's cause, the Job's or API's reason
    start_time: str | None = None  # the Job's startTime: reset to the time it was last admitted or resumed
    completion_time: str | None = None
    reason: str | None = None  # the Job's Failed condition reason (BackoffLimitExceeded, DeadlineExceeded, ...)
    exit_codes: tuple[int, ...] = ()  # non-zero exit codes of its Pods' containers
    waiting: tuple[str, str] | None = None  # (reason, message) why an active Job's Pod cannot run yet
    waiting_since: str | None = None  # for ContainerCreating: when the Pod was scheduled
    suspended_at: str | None = None  # when its Suspended condition last became True


@dataclass(frozen=True)
class EnsureJob:
    """The Job for (round, stage) must exist: create it, and treat 'already exists' as done."""

    round: int
    stage: str
    name: str
    run_uri: str
    model: str | None
    suspend: bool | None = None  # True: suspend it (spec.suspend); False: resume it; None: leave it


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    status: dict[str, Any]
    jobs: tuple[EnsureJob, ...] = ()
    events: tuple[Event, ...] = field(default=())
    recheck: float | None = None  # seconds after which a pass is due with no event (a slow mount)


def _timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(
    spec: RunSpec | SpecError,
    status: Mapping[str, Any] | None,
    observed: Mapping[str, JobObservation],
    now: datetime,
    *,
    namespace: str,
    name: str,
    generation: int,
    uid: str | None = None,
) -> Plan:
    old = dict(status or {})  # read only; every change goes to the copy
    if _rejected(old, generation):
        return Plan(copy.deepcopy(old))
    new = copy.deepcopy(old)
    ts = _timestamp(now)
    new["observedGeneration"] = generation
    new.setdefault("startTime", ts)
    conds: list[dict[str, Any]] = new.setdefault("conditions", [])

    if isinstance(spec, SpecError):
        message = f"invalid spec: {spec}"
        _set_phase(new, conds, FAILED, c.INVALID_SPEC, message, generation, ts)
        return Plan(new, (), _events(old, new))

    run = storage_prefix(spec, namespace, name, uid)
    rounds: list[dict[str, Any]] = new.setdefault("rounds", [])
    recheck = _fold_observations(rounds, observed, spec, name, now)
    _summarise(new, rounds, spec, run)

    worse = _worse_round(rounds[:spec.rounds]) if spec.evaluate and spec.evaluate.stop_when_worse else None
    last = spec.rounds - 1 if worse is None else worse
    current = _current_stage(rounds, last + 1)
    new.pop("waiting", None)
    if current is None:
        new["round"], new["stage"], new["roundOf"] = last, STAGES[-1], f"{last + 1}/{spec.rounds}"
        new.setdefault("completionTime", ts)
        if worse is None:
            _set_phase(new, conds, SUCCEEDED, c.RUN_SUCCEEDED,
                       f"{spec.rounds} rounds finished; model {new.get('model', spec.model.base)}", generation, ts)
        else:
            metrics = rounds[last]["stages"]["merge"]["metrics"]
            message = (f"converged: round {last + 1} raised the held-out loss from {metrics['evalLossBefore']:.4g} "
                       f"to {metrics['evalLossAfter']:.4g}; the best model is {model_uri(spec, run, last)}")
            _set_phase(new, conds, SUCCEEDED, c.CONVERGED, message, generation, ts)
        return Plan(new, (), _events(old, new))

    round_, stage = current
    new["round"], new["stage"], new["roundOf"] = round_, stage, f"{round_ + 1}/{spec.rounds}"
    new.pop("completionTime", None)
    where = f"round {round_ + 1}/{spec.rounds} stage {stage}"
    record = _record(rounds, round_, stage)

    if record is not None and record["phase"] == FAILED:
        failed = (f"{where} failed after {record.get('attempts', 0)} attempt(s): "
                  f"{record.get('message') or 'no message'}")
        if spec.retry <= record.get("retry", 0):
            _set_phase(new, conds, FAILED, c.STAGE_FAILED, failed, generation, ts)
            return Plan(new, (), _events(old, new))
        if spec.suspend:
            _set_phase(new, conds, SUSPENDED, c.SUSPENDED_BY_USER,
                       f"suspended; {failed}; it runs again (spec.retry) once resumed", generation, ts)
            return Plan(new, (), _events(old, new))
        record = _next_attempt(record, name, round_, stage, ts, retry=spec.retry, restarts=0)

    if record is None and spec.suspend:
        _set_phase(new, conds, SUSPENDED, c.SUSPENDED_BY_USER, f"suspended before {where}", generation, ts)
        return Plan(new, (), _events(old, new))

    if record is None:
        record = _new_record(rounds, round_, stage, job_name(name, round_, stage), ts, retry=spec.retry)
        _round_entry(rounds, round_).setdefault("model", model_uri(spec, run, round_))
    suspend = True if spec.suspend else (False if record["phase"] == SUSPENDED else None)
    jobs = (EnsureJob(round_, stage, record["job"], run, stage_model(spec, run, round_, stage), suspend),)
    if record["phase"] == PENDING and "message" not in record and not spec.suspend and not spec.queue_name:
        _request(record, ts)

    waiting = record.get("waiting")
    if spec.suspend:
        if record["phase"] == SUSPENDED:
            message = (f"suspended: {where}: its Job {record['job']} is suspended, its pods released; "
                       "resuming continues it")
        else:
            message = f"suspending: {where}: its Job {record['job']} is being suspended; nothing new starts"
        _set_phase(new, conds, SUSPENDED, c.SUSPENDED_BY_USER, message, generation, ts)
    elif record["phase"] == PENDING and record.get("message"):
        new["waiting"] = c.JOB_REFUSED
        _set_phase(new, conds, RUNNING, c.JOB_REFUSED, f"{where}: waiting for its Job: {record['message']}",
                   generation, ts)
    elif waiting:
        new["waiting"] = waiting["reason"]
        message = f"{where}: waiting: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        _set_phase(new, conds, RUNNING, waiting["reason"], message, generation, ts)
    else:
        state = "resuming" if record["phase"] == SUSPENDED else record["phase"].lower()
        attempt = f" (attempt {record['attempt']})" if record.get("attempt", 1) > 1 else ""
        _set_phase(new, conds, RUNNING, c.STAGE_RUNNING, f"{where}: {state}{attempt}", generation, ts)
    return Plan(new, jobs, _events(old, new), recheck)


def status_rejected(status: Mapping[str, Any] | None, message: str, now: datetime, *, generation: int) -> Plan:
    """The API refused the status a pass computed: the run fails, with the API's own message, on
    the status it last stored (which the API took), so that one can be written."""
    old = dict(status or {})
    new = copy.deepcopy(old)
    new["observedGeneration"] = generation
    _set_phase(new, new.setdefault("conditions", []), FAILED, c.STATUS_REJECTED,
               f"the API rejected the run's status: {message}", generation, _timestamp(now))
    return Plan(new, (), _events(old, new))


def storage_prefix(spec: RunSpec, namespace: str, name: str, uid: str | None) -> str:
    """`<storage.uri>/<namespace>/<name>/<uid>` for a run with a uid (on a cluster); the local
    backend's runs have none and keep `<storage.uri>/<namespace>/<name>`."""
    run = run_uri(spec, namespace, name)
    return f"{run}/{uid}" if uid else run


def _rejected(old: Mapping[str, Any], generation: int) -> bool:
    """Failed because the API rejected its status, and the spec is the same as then."""
    failed = next((cond for cond in old.get("conditions") or () if cond.get("type") == c.FAILED), {})
    return failed.get("reason") == c.STATUS_REJECTED and old.get("observedGeneration") == generation


def _bounded(result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The scalar fields of a stage's result, in order, up to MAX_METRICS bytes of JSON."""
    kept: dict[str, Any] = {}
    size = 2
    for key, value in (result or {}).items():
        if not isinstance(value, (bool, int, float, str)):
            continue
        item = len(json.dumps({key: value})) - 1
        if size + item > MAX_METRICS:
            continue
        kept[key], size = value, size + item
    return kept


def _round_entry(rounds: list[dict[str, Any]], round_: int) -> dict[str, Any]:
    while len(rounds) <= round_:
        rounds.append({"round": len(rounds), "stages": {}})
    return rounds[round_]


def _record(rounds: list[dict[str, Any]], round_: int, stage: str) -> dict[str, Any] | None:
    if round_ >= len(rounds):
        return None
    return rounds[round_]["stages"].get(stage)


def _new_record(rounds, round_: int, stage: str, job: str, ts: str, *, retry: int) -> dict[str, Any]:
    record = {"job": job, "phase": PENDING, "attempts": 0, "createTime": ts, "attempt": 1, "retry": retry}
    _round_entry(rounds, round_)["stages"][stage] = record
    return record


def _request(record: dict[str, Any], ts: str) -> None:
    """The record of a Job this pass creates, as the Job's first event would make it (rule 3):
    the Job is created right after the status that records it is stored, so the run is written
    once per transition, not again when that event comes back. A Job's own startTime follows
    within the Job controller's first sync; the running spell counts from it when the Job ends
    (`_move`). Not for a run whose Jobs Kueue admits (`queueName`): those start Pending, then
    Queued, and run from their admission."""
    record.update(phase=RUNNING, attempts=1, since=ts)
    record.setdefault("startTime", ts)


def attempt_job(run: str, round_: int, stage: str, attempt: int) -> str:
    """The stage's Job for its `attempt`-th try: `<job>-a<N>` from the second on, within MAX_NAME
    (a hash of the first attempt's name stands in for its tail when it is too long)."""
    first = job_name(run, round_, stage)
    if attempt == 1:
        return first
    suffix = f"-a{attempt}"
    if len(first) + len(suffix) <= MAX_NAME:
        return first + suffix
    digest = hashlib.sha256(first.encode()).hexdigest()[:8]
    return f"{first[:MAX_NAME - len(suffix) - len(digest) - 1].rstrip('-')}-{digest}{suffix}"


def _next_attempt(record: dict[str, Any], run: str, round_: int, stage: str, ts: str, *, retry: int,
                  restarts: int) -> dict[str, Any]:
    """Move a failed attempt into the record's history and make the record the next attempt, in place."""
    attempt = record.get("attempt", 1)
    earlier = {"attempt": attempt, "job": record["job"], "reason": record.get("reason"),
               "message": (record.get("message") or "")[:MAX_MESSAGE] or None,
               "startTime": record.get("startTime"), "completionTime": record.get("completionTime")}
    history = [*record.get("history", ()), {k: v for k, v in earlier.items() if v is not None}][-MAX_HISTORY:]
    record.clear()
    record.update(job=attempt_job(run, round_, stage, attempt + 1), phase=PENDING, attempts=0, createTime=ts,
                  attempt=attempt + 1, retry=retry, history=history)
    if restarts:
        record["restarts"] = restarts
    return record


def _fold_observations(rounds: list[dict[str, Any]], observed: Mapping[str, JobObservation], spec: RunSpec,
                       run: str, now: datetime) -> float | None:
    """Move each unfinished stage record forward to what its Job shows. Returns the seconds until
    a Pod still creating its containers counts as waiting for a mount (a pass is due then)."""
    ts, recheck = _timestamp(now), None
    for entry in rounds:
        for stage, record in entry["stages"].items():
            if record["phase"] in FINAL_STAGE_PHASES:
                continue
            seen = observed.get(record["job"])
            if seen is None or (seen.round, seen.stage) != (entry["round"], stage):
                continue
            if seen.phase == "Refused":
                # Its Job does not exist: the stage has not started (whatever `_request` said).
                record.update(phase=PENDING, attempts=0,
                              message=(seen.message or "the API refused the Job")[:MAX_MESSAGE])
                record.pop("since", None)
                record.pop("startTime", None)
                continue
            record.pop("message", None)  # a refusal, once the Job exists
            waiting, wait = _waiting(seen, now)
            if wait is not None:
                recheck = wait if recheck is None else min(recheck, wait)
            if waiting:
                record["waiting"] = waiting
            else:
                record.pop("waiting", None)
            if seen.phase in ("Queued", "Suspended"):
                _move(record, QUEUED if seen.phase == "Queued" else SUSPENDED, seen, ts)
            elif seen.phase == "Active":
                _move(record, RUNNING, seen, ts)
                record["attempts"] = seen.failures + 1
                record.setdefault("startTime", seen.start_time or ts)
            elif seen.phase == "Succeeded":
                _move(record, SUCCEEDED, seen, ts)
                record.update(attempts=seen.failures + 1, completionTime=seen.completion_time or ts,
                              metrics=_bounded(seen.result))
                record.setdefault("startTime", seen.start_time or record["completionTime"])
            else:
                _move(record, FAILED, seen, ts)
                record.update(attempts=max(seen.failures, 1), completionTime=seen.completion_time or ts,
                              message=(seen.message or "the Job failed")[:MAX_MESSAGE])
                if seen.reason:
                    record["reason"] = seen.reason[:MAX_REASON]
                if seen.result:
                    record["metrics"] = _bounded(seen.result)
                record.setdefault("startTime", seen.start_time or record["completionTime"])
                if _restartable(spec, stage, record, seen):
                    _next_attempt(record, run, entry["round"], stage, ts, retry=record.get("retry", 0),
                                  restarts=record.get("restarts", 0) + 1)
    return recheck


def _waiting(seen: JobObservation, now: datetime) -> tuple[dict[str, str] | None, float | None]:
    """Why the stage waits ({reason, message}, or None) and, for a Pod still creating its
    containers within MOUNT_WAIT of being scheduled, the seconds until that counts as waiting."""
    if seen.phase == "Queued":
        return {"reason": c.QUEUED, "message": (seen.message or "its Job waits for admission")[:MAX_MESSAGE]}, None
    if seen.phase != "Active" or seen.waiting is None:
        return None, None
    reason, message = seen.waiting
    if reason == c.CONTAINER_CREATING:
        waited = (now - _parse(seen.waiting_since)).total_seconds() if seen.waiting_since else 0.0
        if waited < MOUNT_WAIT:
            return None, MOUNT_WAIT - waited
        message = f"{message}; scheduled {int(waited)} s ago"
    return {"reason": reason[:MAX_REASON], "message": message[:MAX_MESSAGE]}, None


def _restartable(spec: RunSpec, stage: str, record: Mapping[str, Any], seen: JobObservation) -> bool:
    """A multi-node train that failed as a whole for a cause other than bad input (exit code 2)
    starts again as a new Job, up to `backoffLimit` times since the last retry: one lost node
    must not leave the other ranks waiting for peers."""
    return (stage == "train" and spec.train.nodes > 1 and EXIT_BAD_INPUT not in seen.exit_codes
            and record.get("restarts", 0) < spec.backoff_limit)


def _move(record: dict[str, Any], phase: str, seen: JobObservation, ts: str) -> None:
    """Put the record in `phase`, adding the spell it leaves to its queued or running seconds. A
    spell ends when the Job was suspended (its Suspended condition), admitted or resumed (its
    startTime, which the Job controller resets then) or finished; the pass's time stands in for
    a time the Job does not show."""
    before, since = record["phase"], record.pop("since", None)
    if before == phase:
        if since is not None:
            record["since"] = since
        return
    paused, admitted = seen.suspended_at or ts, seen.start_time or ts
    finished = seen.completion_time or ts
    if before == QUEUED:
        _add_spell(record, "queuedSeconds", since, admitted if phase != SUSPENDED else ts)
    elif before == RUNNING:
        # Not before the Job's own startTime: a record `_request` made runs from the request.
        start = max(since, seen.start_time) if since and seen.start_time else since
        _add_spell(record, "runningSeconds", start, paused if phase in (QUEUED, SUSPENDED) else finished)
    if phase == RUNNING:
        # A resumed Job's startTime may not be reset yet when the pass sees it unsuspended.
        record["since"] = max(admitted, since) if since else admitted
    elif phase in (QUEUED, SUSPENDED):
        record["since"] = paused
    elif phase in FINAL_STAGE_PHASES and before != RUNNING and seen.start_time:
        _add_spell(record, "runningSeconds", seen.start_time, finished)  # ran between two passes
    record["phase"] = phase


def _add_spell(record: dict[str, Any], key: str, since: str | None, until: str) -> None:
    if since is not None:
        seconds = max(0.0, (_parse(until) - _parse(since)).total_seconds())
        record[key] = round(record.get(key, 0) + seconds, 3)


def _parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _worse_round(rounds: list[dict[str, Any]]) -> int | None:
    """The first round whose succeeded merge measured a higher held-out loss after than before."""
    for entry in rounds:
        merge = entry["stages"].get("merge") or {}
        metrics = merge.get("metrics") or {}
        before, after = metrics.get("evalLossBefore"), metrics.get("evalLossAfter")
        if merge.get("phase") == SUCCEEDED and before is not None and after is not None and after > before:
            return entry["round"]
    return None


def _current_stage(rounds: list[dict[str, Any]], total_rounds: int) -> tuple[int, str] | None:
    """The first (round, stage) in campaign order that has not succeeded; None when all have."""
    for round_ in range(total_rounds):
        for stage in STAGES:
            record = _record(rounds, round_, stage)
            if record is None or record["phase"] != SUCCEEDED:
                return round_, stage
    return None


def _summarise(new: dict[str, Any], rounds: list[dict[str, Any]], spec: RunSpec, run: str) -> None:
    """Top-level fields for `kubectl get sar`: latest kept count, coverage and merged model."""
    for entry in rounds:
        stages = entry["stages"]
        assess = stages.get("assess")
        if assess and assess["phase"] == SUCCEEDED and "kept" in assess.get("metrics", {}):
            new["kept"] = int(assess["metrics"]["kept"])
        coverage = stages.get("coverage")
        if coverage and coverage["phase"] == SUCCEEDED and "coverage" in coverage.get("metrics", {}):
            new["coverage"] = round(100 * float(coverage["metrics"]["coverage"]), 1)
        merge = stages.get("merge")
        if merge and merge["phase"] == SUCCEEDED:
            new["model"] = model_uri(spec, run, entry["round"] + 1)


def _set_phase(new, conds, phase: str, reason: str, message: str, generation: int, ts: str) -> None:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    new["phase"], new["message"] = phase, message
    c.set_condition(conds, c.READY, phase == SUCCEEDED, reason, message, generation, ts)
    c.set_condition(conds, c.PROGRESSING, phase == RUNNING, reason, message, generation, ts)
    c.set_condition(conds, c.RECONCILING, phase == RUNNING, reason, message, generation, ts)
    c.set_condition(conds, c.STALLED, phase == FAILED, reason, message, generation, ts)
    c.set_condition(conds, c.SUCCEEDED, phase == SUCCEEDED, reason, message, generation, ts)
    c.set_condition(conds, c.FAILED, phase == FAILED, reason, message, generation, ts)
    c.set_condition(conds, c.SUSPENDED, phase == SUSPENDED,
                    c.SUSPENDED_BY_USER if phase == SUSPENDED else c.NOT_SUSPENDED, message, generation, ts)


def _events(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[Event, ...]:
    """One Event per stage transition and per run phase change, derived from the status diff."""
    events: list[Event] = []
    old_rounds = old.get("rounds", [])
    for entry in new.get("rounds", []):
        k = entry["round"]
        before = old_rounds[k]["stages"] if k < len(old_rounds) else {}
        for stage, record in entry["stages"].items():
            prior = before.get(stage, {})
            was, now_ = prior.get("phase"), record["phase"]
            job, where = record["job"], f"round {k + 1} stage {stage}"
            waiting = (record.get("waiting") or {}).get("reason")
            if waiting not in (None, c.QUEUED) and waiting != (prior.get("waiting") or {}).get("reason"):
                events.append(Event("Warning", "StageWaiting", f"{where}: {record['waiting'].get('message', waiting)}"))
            if job != prior.get("job"):  # a new record, or the stage's next attempt
                if prior.get("phase") not in (None, FAILED) and record.get("history"):
                    failed = record["history"][-1]  # restarted whole within one pass: say it failed
                    events.append(Event("Warning", "StageFailed", f"{where}: Job {failed['job']} failed: "
                                        f"{failed.get('message')}; the whole Job starts again"))
                attempt = f" (attempt {record['attempt']})" if record.get("attempt", 1) > 1 else ""
                events.append(Event("Normal", "StageStarted", f"{where}: Job {job} created{attempt}"))
            elif was == now_ or now_ == PENDING:
                continue
            elif now_ == SUCCEEDED:
                events.append(Event("Normal", "StageSucceeded", f"{where}: Job {job} succeeded"))
            elif now_ == FAILED:
                events.append(Event("Warning", "StageFailed", f"{where}: Job {job} failed: {record.get('message')}"))
            elif now_ == QUEUED:
                events.append(Event("Normal", "StageQueued", f"{where}: Job {job} waits for admission"))
            elif now_ == SUSPENDED:
                events.append(Event("Normal", "StageSuspended", f"{where}: Job {job} suspended, its pods released"))
    if old.get("phase") != new.get("phase"):
        type_ = "Warning" if new["phase"] == FAILED else "Normal"
        events.append(Event(type_, f"Run{new['phase']}", new.get("message", "")))
    return tuple(events)
