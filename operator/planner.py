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
   created once, re-created only if it vanished before finishing). While the API refuses to
   create it (quota, admission policy), the stage stays Pending and the run says why.
4. `suspend` starts nothing new; a stage already running finishes.
5. Raising `rounds` after success continues the run.
   With `evaluate.stopWhenWorse`, the first round whose merge raised the held-out loss
   (`evalLossAfter > evalLossBefore` in its result) is the last: it finishes (coverage too) and the
   run succeeds with reason Converged; raising `rounds` does not continue it, switching the flag
   off does.
6. A status the API rejects (a schema bound, etcd's size limit) fails the run with the API's
   message (`status_rejected`), and it stays failed until its spec changes (a new generation).

On a cluster the run's storage prefix carries its uid (`storage_prefix`): a run deleted and
created again under the same name (the only way to change `model.base` or `seeds`) starts afresh
and never reads the earlier run's outputs as its own.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Mapping

from . import conditions as c
from .lineage import model_uri, run_uri, stage_model
from .naming import job_name
from .spec import STAGES, RunSpec, SpecError

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
MAX_MESSAGE = 4096  # status messages stay readable and far below the CRD's 32768-character cap
# A stage record keeps at most this much of its result (JSON): 100 rounds x 5 stages of records
# stay at half of etcd's 1.5 MiB object limit (the rest: managedFields, conditions), and the full
# summary is in the stage's manifest.
MAX_METRICS = 1024
FINAL_STAGE_PHASES = (SUCCEEDED, FAILED)


@dataclass(frozen=True)
class JobObservation:
    """What the cluster (or the local runner) shows of one stage Job."""

    name: str
    round: int
    stage: str
    phase: Literal["Active", "Succeeded", "Failed", "Refused"]  # Refused: the API would not create it
    failures: int = 0
    result: Mapping[str, Any] | None = None  # the stage's JSON summary (termination message)
    message: str | None = None  # why it failed or was refused: the stage's cause, the Job's or API's reason
    start_time: str | None = None
    completion_time: str | None = None


@dataclass(frozen=True)
class EnsureJob:
    """The Job for (round, stage) must exist: create it, and treat 'already exists' as done."""

    round: int
    stage: str
    name: str
    run_uri: str
    model: str | None


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
    _fold_observations(rounds, observed, ts)
    _summarise(new, rounds, spec, run)

    worse = _worse_round(rounds[:spec.rounds]) if spec.evaluate and spec.evaluate.stop_when_worse else None
    last = spec.rounds - 1 if worse is None else worse
    current = _current_stage(rounds, last + 1)
    jobs: list[EnsureJob] = []
    if current is None:
        new["round"], new["stage"] = last, STAGES[-1]
        new.setdefault("completionTime", ts)
        if worse is None:
            _set_phase(new, conds, SUCCEEDED, c.RUN_SUCCEEDED,
                       f"{spec.rounds} rounds finished; model {new.get('model', spec.model.base)}", generation, ts)
        else:
            metrics = rounds[last]["stages"]["merge"]["metrics"]
            message = (f"converged: round {last} raised the held-out loss from {metrics['evalLossBefore']:.4g} "
                       f"to {metrics['evalLossAfter']:.4g}; the best model is {model_uri(spec, run, last)}")
            _set_phase(new, conds, SUCCEEDED, c.CONVERGED, message, generation, ts)
        return Plan(new, (), _events(old, new))

    round_, stage = current
    new["round"], new["stage"] = round_, stage
    new.pop("completionTime", None)
    record = _record(rounds, round_, stage)

    if record is not None and record["phase"] == FAILED:
        message = (f"round {round_} stage {stage} failed after {record.get('attempts', 0)} attempt(s): "
                   f"{record.get('message') or 'no message'}")
        _set_phase(new, conds, FAILED, c.STAGE_FAILED, message, generation, ts)
        return Plan(new, (), _events(old, new))

    if record is None and spec.suspend:
        _set_phase(new, conds, SUSPENDED, c.SUSPENDED_BY_USER,
                   f"suspended before round {round_} stage {stage}", generation, ts)
        return Plan(new, (), _events(old, new))

    if record is None:
        record = _new_record(rounds, round_, stage, job_name(name, round_, stage), ts)
        _round_entry(rounds, round_).setdefault("model", model_uri(spec, run, round_))
    jobs.append(EnsureJob(round_, stage, record["job"], run, stage_model(spec, run, round_, stage)))

    if spec.suspend:
        message = f"suspended; round {round_} stage {stage} is still running and nothing new starts"
        _set_phase(new, conds, SUSPENDED, c.SUSPENDED_BY_USER, message, generation, ts)
    elif record["phase"] == PENDING and record.get("message"):
        message = f"round {round_}/{spec.rounds - 1} stage {stage}: waiting for its Job: {record['message']}"
        _set_phase(new, conds, RUNNING, c.JOB_REFUSED, message, generation, ts)
    else:
        message = f"round {round_}/{spec.rounds - 1} stage {stage}: {record['phase'].lower()}"
        _set_phase(new, conds, RUNNING, c.STAGE_RUNNING, message, generation, ts)
    return Plan(new, tuple(jobs), _events(old, new))


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


def _new_record(rounds, round_: int, stage: str, job: str, ts: str) -> dict[str, Any]:
    record = {"job": job, "phase": PENDING, "attempts": 0, "createTime": ts}
    _round_entry(rounds, round_)["stages"][stage] = record
    return record


def _fold_observations(rounds: list[dict[str, Any]], observed: Mapping[str, JobObservation], ts: str) -> None:
    """Move each unfinished stage record forward to what its Job shows."""
    for entry in rounds:
        for stage, record in entry["stages"].items():
            if record["phase"] in FINAL_STAGE_PHASES:
                continue
            seen = observed.get(record["job"])
            if seen is None or (seen.round, seen.stage) != (entry["round"], stage):
                continue
            if seen.phase == "Refused":
                if record["phase"] == PENDING:
                    record["message"] = (seen.message or "the API refused the Job")[:MAX_MESSAGE]
                continue
            record.pop("message", None)  # a refusal, once the Job exists
            if seen.phase == "Active":
                record.update(phase=RUNNING, attempts=seen.failures + 1)
                record.setdefault("startTime", seen.start_time or ts)
            elif seen.phase == "Succeeded":
                record.update(phase=SUCCEEDED, attempts=seen.failures + 1,
                              completionTime=seen.completion_time or ts, metrics=_bounded(seen.result))
                record.setdefault("startTime", seen.start_time or record["completionTime"])
            else:
                record.update(phase=FAILED, attempts=max(seen.failures, 1),
                              completionTime=seen.completion_time or ts,
                              message=(seen.message or "the Job failed")[:MAX_MESSAGE])
                if seen.result:
                    record["metrics"] = _bounded(seen.result)
                record.setdefault("startTime", seen.start_time or record["completionTime"])


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
            was = before.get(stage, {}).get("phase")
            now_ = record["phase"]
            if was == now_:
                continue
            job = record["job"]
            if now_ == PENDING:
                events.append(Event("Normal", "StageStarted", f"round {k} stage {stage}: Job {job} created"))
            elif now_ == SUCCEEDED:
                events.append(Event("Normal", "StageSucceeded", f"round {k} stage {stage}: Job {job} succeeded"))
            elif now_ == FAILED:
                events.append(Event("Warning", "StageFailed",
                                    f"round {k} stage {stage}: Job {job} failed: {record.get('message')}"))
    if old.get("phase") != new.get("phase"):
        type_ = "Warning" if new["phase"] == FAILED else "Normal"
        events.append(Event(type_, f"Run{new['phase']}", new.get("message", "")))
    return tuple(events)
