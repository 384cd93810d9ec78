"""Prometheus metrics of the operator, served on :<port>/metrics.

The handlers call the small `record_*`/`observe_*`/`set_*` functions; each one only updates a
collector, so they are safe anywhere in a handler (no I/O, no clock: times come in as arguments).
`record_status_change` and `observe_job_created` derive the numbers from the run's status
(the planner's stage records carry `startTime`/`completionTime` from the Jobs), so a handler
needs one call after its status write and one after creating a Job.
The job gap (a Job finishing -> the next Job existing) is the number the event-driven design is
judged by (DESIGN.md: "a measured number, not seconds").

Labels: every counter and histogram carries the run's `namespace` (a team, a bounded set), never
the run's name: a label per run would add a series per run to every bucket, forever. The run's
name is on gauges only, and only on those `RunCollector` computes at scrape time from the runs
that exist (kube-state-metrics' way): a run's series go when the run is deleted, its current
stage's series when it finishes. Times are Unix timestamps (`*_timestamp_seconds`), so an alert
computes the age with `time()` and nothing here reads a clock.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .planner import FAILED, FINAL_STAGE_PHASES, PENDING, RUNNING, SUCCEEDED, SUSPENDED
from .settings import OperatorSettings
from .spec import STAGES, SpecError, parse_spec

PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED)

# Stages last from seconds (tiny CPU runs) to a day (training a large model).
STAGE_BUCKETS = (1, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
# The gap is reaction time: sub-second when watch events flow, seconds when something lags.
GAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

TRANSITIONS = Counter(
    "selfalign_run_transitions", "Run phase transitions", ["namespace", "from_phase", "to_phase"]
)
STAGE_DURATION = Histogram(
    "selfalign_stage_duration_seconds",
    "Running time of a finished stage Job: admitted and not suspended (its queue time is apart)",
    ["namespace", "stage"],
    buckets=STAGE_BUCKETS,
)
STAGE_QUEUED = Histogram(
    "selfalign_stage_queued_seconds",
    "Time a finished stage Job waited for admission (Kueue), every spell summed",
    ["namespace", "stage"],
    buckets=(0, *STAGE_BUCKETS),
)
RECONCILE_ERRORS = Counter(
    "selfalign_reconcile_errors", "Reconcile passes that raised (each is tried again, with backoff)",
    ["namespace"],
)
JOB_GAP = Histogram(
    "selfalign_job_gap_seconds",
    "Time from a stage Job finishing to the next stage Job of the run being created",
    ["namespace"],
    buckets=GAP_BUCKETS,
)
# The gauges RunCollector computes per run, with their labels (the dashboard test reads these).
RUN_GAUGES = {
    "selfalign_runs": ("SelfAlignRuns by status.phase, all namespaces (0 for a phase no run is in)", ("phase",)),
    "selfalign_run_phase": ("1 for the phase the run is in", ("namespace", "run", "phase")),
    "selfalign_run_round": ("The round the run is at, counted from 1", ("namespace", "run")),
    "selfalign_run_waiting": ("1 while the current stage waits, by why (status.waiting)",
                              ("namespace", "run", "reason")),
    "selfalign_stage_since_timestamp_seconds": (
        "When the current stage of an unfinished run entered its state (Pending, Queued, Running, Suspended)",
        ("namespace", "run", "stage", "state")),
    "selfalign_stage_deadline_seconds": (
        "The current stage's activeDeadlineSeconds: its Job fails (DeadlineExceeded) when it runs longer",
        ("namespace", "run", "stage")),
}


def record_transition(namespace: str, from_phase: str | None, to_phase: str) -> None:
    """Count one run moving between phases; a new run comes from phase "None"."""
    if to_phase not in PHASES:
        raise ValueError(f"unknown phase {to_phase!r}; expected one of {PHASES}")
    TRANSITIONS.labels(namespace=namespace, from_phase=from_phase or "None", to_phase=to_phase).inc()


def observe_stage_duration(namespace: str, stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_DURATION.labels(namespace=namespace, stage=stage).observe(_non_negative(seconds))


def observe_stage_queued(namespace: str, stage: str, seconds: float) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_QUEUED.labels(namespace=namespace, stage=stage).observe(_non_negative(seconds))


def record_reconcile_error(namespace: str = "") -> None:
    RECONCILE_ERRORS.labels(namespace=namespace).inc()


def observe_job_gap(namespace: str, seconds: float) -> None:
    JOB_GAP.labels(namespace=namespace).observe(_non_negative(seconds))


def record_status_change(old: Mapping[str, Any] | None, new: Mapping[str, Any], namespace: str = "") -> None:
    """After a status write: count a phase transition, and time each stage that finished."""
    old = old or {}
    if old.get("phase") != new.get("phase") and new.get("phase"):
        record_transition(namespace, old.get("phase"), new["phase"])
    before = _stage_records(old)
    for key, record in _stage_records(new).items():
        newly_finished = record.get("phase") in (SUCCEEDED, FAILED) and \
            before.get(key, {}).get("phase") != record["phase"]
        if not newly_finished:
            continue
        if "runningSeconds" in record:  # the planner's sum of the spells the Job ran
            observe_stage_duration(namespace, key[1], record["runningSeconds"])
        elif "startTime" in record and "completionTime" in record:
            seconds = _parse(record["completionTime"]) - _parse(record["startTime"])
            observe_stage_duration(namespace, key[1], seconds.total_seconds())
        observe_stage_queued(namespace, key[1], record.get("queuedSeconds", 0))


def observe_job_created(status: Mapping[str, Any], created_at: datetime, namespace: str = "") -> None:
    """After creating a stage Job: the gap since the run's previous stage Job finished."""
    finishes = [_parse(r["completionTime"]) for r in _stage_records(status).values()
                if r.get("phase") == SUCCEEDED and "completionTime" in r]
    if finishes:
        observe_job_gap(namespace, (created_at - max(finishes)).total_seconds())


class RunCollector(Collector):
    """The per-run gauges, computed from the runs as they are at each scrape (`runs()`: their
    bodies, e.g. from kopf's index), so a deleted run leaves no series behind."""

    def __init__(self) -> None:
        self._runs: Callable[[], Iterable[Mapping[str, Any]]] = tuple
        self._settings = OperatorSettings()

    def track(self, runs: Callable[[], Iterable[Mapping[str, Any]]], settings: OperatorSettings) -> None:
        self._runs, self._settings = runs, settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {name: GaugeMetricFamily(name, text, labels=labels) for name, (text, labels) in RUN_GAUGES.items()}
        by_phase = dict.fromkeys(PHASES, 0)
        for run in self._read():
            meta, status = run["metadata"], run.get("status") or {}
            where = [meta["namespace"], meta["name"]]
            phase = status.get("phase") or PENDING
            by_phase[phase] = by_phase.get(phase, 0) + 1
            families["selfalign_run_phase"].add_metric([*where, phase], 1)
            if "round" in status:
                families["selfalign_run_round"].add_metric(where, status["round"] + 1)
            if phase in FINAL_STAGE_PHASES:
                continue
            if status.get("waiting"):
                families["selfalign_run_waiting"].add_metric([*where, status["waiting"]], 1)
            stage, record = _current_record(status)
            if record is None:
                continue
            since = record.get("since") or record.get("createTime")
            if since:
                families["selfalign_stage_since_timestamp_seconds"].add_metric(
                    [*where, stage, record["phase"]], _parse(since).timestamp())
            deadline = self._deadline(run.get("spec"), stage)
            if deadline is not None:
                families["selfalign_stage_deadline_seconds"].add_metric([*where, stage], deadline)
        for phase, count in by_phase.items():
            families["selfalign_runs"].add_metric([phase], count)
        yield from families.values()

    def _read(self) -> list[Mapping[str, Any]]:
        # The runs come from another thread's dict (kopf's event loop fills the index); one that
        # changed while it was read is read again.
        for _ in range(9):
            try:
                return list(self._runs())
            except RuntimeError:
                pass
        return list(self._runs())  # a tenth failure fails this scrape; the next one reads again

    def _deadline(self, raw_spec: Mapping[str, Any] | None, stage: str) -> int | None:
        """activeDeadlineSeconds as the operator sets it on the stage's Job: the run's own over
        the chart's defaults (`OperatorSettings.with_defaults`, as jobs.py builds it)."""
        try:
            spec = parse_spec(self._settings.with_defaults(raw_spec))
        except SpecError:
            return None
        return spec.stage_resources(stage).active_deadline_seconds


RUN_COLLECTOR = RunCollector()
REGISTRY.register(RUN_COLLECTOR)


def track_runs(runs: Callable[[], Iterable[Mapping[str, Any]]], settings: OperatorSettings) -> None:
    """Serve the per-run gauges of `runs()` from now on (an operator started again in the same
    process replaces the earlier source); `settings` give the stages' default deadlines."""
    RUN_COLLECTOR.track(runs, settings)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics from a daemon thread; returns the server so callers can shut it down."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server


def _current_record(status: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    """The stage the run is at (status.round, status.stage) and its record, if it has one yet."""
    round_, stage = status.get("round"), status.get("stage")
    rounds = status.get("rounds") or ()
    if round_ is None or stage is None or round_ >= len(rounds):
        return stage, None
    return stage, rounds[round_]["stages"].get(stage)


def _stage_records(status: Mapping[str, Any]) -> dict[tuple[int, str], Mapping[str, Any]]:
    return {(entry["round"], stage): record
            for entry in status.get("rounds") or () for stage, record in entry["stages"].items()}


def _parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _non_negative(seconds: float) -> float:
    # Kubernetes timestamps have one-second resolution and come from different clocks (kubelet,
    # API server), so a real gap of a few milliseconds can compute as slightly negative.
    return max(0.0, float(seconds))
