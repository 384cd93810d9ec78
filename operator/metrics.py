"""Prometheus metrics of the operator, served on :<port>/metrics.

The handlers call the small `record_*`/`observe_*`/`set_*` functions; each one only updates a
collector, so they are safe anywhere in a handler (no I/O, no clock: times come in as arguments).
`record_status_change` and `observe_job_created` derive the numbers from the run's status
(the planner's stage records carry `startTime`/`completionTime` from the Jobs), so a handler
needs one call after its status write and one after creating a Job.
The job gap (a Job finishing -> the next Job existing) is the number the event-driven design is
judged by (DESIGN.md: "a measured number, not seconds").
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from .planner import FAILED, PENDING, RUNNING, SUCCEEDED, SUSPENDED
from .spec import STAGES

PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED)

# Stages last from seconds (tiny CPU runs) to a day (training a large model).
STAGE_BUCKETS = (1, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
# The gap is reaction time: sub-second when watch events flow, seconds when something lags.
GAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

RUNS = Gauge("selfalign_runs", "SelfAlignRuns by status.phase", ["phase"])
TRANSITIONS = Counter(
    "selfalign_run_transitions", "Run phase transitions", ["from_phase", "to_phase"]
)
STAGE_DURATION = Histogram(
    "selfalign_stage_duration_seconds",
    "Running time of a finished stage Job: admitted and not suspended (its queue time is apart)",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
STAGE_QUEUED = Histogram(
    "selfalign_stage_queued_seconds",
    "Time a finished stage Job waited for admission (Kueue), every spell summed",
    ["stage"],
    buckets=(0, *STAGE_BUCKETS),
)
RECONCILE_ERRORS = Counter(
    "selfalign_reconcile_errors", "Reconcile passes that raised (each is tried again, with backoff)"
)
JOB_GAP = Histogram(
    "selfalign_job_gap_seconds",
    "Time from a stage Job finishing to the next stage Job of the run being created",
    buckets=GAP_BUCKETS,
)


def record_transition(from_phase: str | None, to_phase: str) -> None:
    """Count one run moving between phases; a new run comes from phase "None"."""
    if to_phase not in PHASES:
        raise ValueError(f"unknown phase {to_phase!r}; expected one of {PHASES}")
    TRANSITIONS.labels(from_phase=from_phase or "None", to_phase=to_phase).inc()


def observe_stage_duration(stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_DURATION.labels(stage=stage).observe(_non_negative(seconds))


def observe_stage_queued(stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_QUEUED.labels(stage=stage).observe(_non_negative(seconds))


def record_reconcile_error() -> None:
    RECONCILE_ERRORS.inc()


def observe_job_gap(seconds: float) -> None:
    JOB_GAP.observe(_non_negative(seconds))


def set_runs_by_phase(counts: Mapping[str, int]) -> None:
    """Set the gauge for every phase; a phase missing from `counts` has no runs (0)."""
    unknown = set(counts) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; expected some of {PHASES}")
    for phase in PHASES:
        RUNS.labels(phase=phase).set(counts.get(phase, 0))


def record_status_change(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """After a status write: count a phase transition, and time each stage that finished."""
    old = old or {}
    if old.get("phase") != new.get("phase") and new.get("phase"):
        record_transition(old.get("phase"), new["phase"])
    before = _stage_records(old)
    for key, record in _stage_records(new).items():
        newly_finished = record.get("phase") in (SUCCEEDED, FAILED) and \
            before.get(key, {}).get("phase") != record["phase"]
        if not newly_finished:
            continue
        if "runningSeconds" in record:  # the planner's sum of the spells the Job ran
            observe_stage_duration(key[1], record["runningSeconds"])
        elif "startTime" in record and "completionTime" in record:
            seconds = _parse(record["completionTime"]) - _parse(record["startTime"])
            observe_stage_duration(key[1], seconds.total_seconds())
        observe_stage_queued(key[1], record.get("queuedSeconds", 0))


def observe_job_created(status: Mapping[str, Any], created_at: datetime) -> None:
    """After creating a stage Job: the gap since the run's previous stage Job finished."""
    finishes = [_parse(r["completionTime"]) for r in _stage_records(status).values()
                if r.get("phase") == SUCCEEDED and "completionTime" in r]
    if finishes:
        observe_job_gap((created_at - max(finishes)).total_seconds())


def serve_metrics(port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics from a daemon thread; returns the server so callers can shut it down."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server


def _stage_records(status: Mapping[str, Any]) -> dict[tuple[int, str], Mapping[str, Any]]:
    return {(entry["round"], stage): record
            for entry in status.get("rounds") or () for stage, record in entry["stages"].items()}


def _parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _non_negative(seconds: float) -> float:
    # Kubernetes timestamps have one-second resolution and come from different clocks (kubelet,
    # API server), so a real gap of a few milliseconds can compute as slightly negative.
    return max(0.0, float(seconds))
