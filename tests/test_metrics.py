"""The operator's Prometheus metrics, scraped over HTTP from the real exposition server.

The collectors are process-global (as in the operator), so each test compares a scrape taken
after its calls with one taken before.
"""
from __future__ import annotations

import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from selfalign.operator import metrics
from selfalign.operator.planner import JobObservation, plan
from selfalign.operator.settings import OperatorSettings
from selfalign.operator.spec import parse_spec

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def metrics_url():
    server = metrics.serve_metrics(0, addr="127.0.0.1")
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before, after, name, **labels) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_transitions_are_counted_per_phase_pair(metrics_url):
    before = scrape(metrics_url)
    metrics.record_transition("team-a", None, "Pending")
    metrics.record_transition("team-a", "Pending", "Running")
    metrics.record_transition("team-a", "Pending", "Running")
    metrics.record_transition("team-b", "Pending", "Running")
    after = scrape(metrics_url)
    name = "selfalign_run_transitions_total"
    assert delta(before, after, name, namespace="team-a", from_phase="None", to_phase="Pending") == 1
    assert delta(before, after, name, namespace="team-a", from_phase="Pending", to_phase="Running") == 2
    assert delta(before, after, name, namespace="team-b", from_phase="Pending", to_phase="Running") == 1


def test_stage_duration_lands_in_its_bucket(metrics_url):
    before = scrape(metrics_url)
    metrics.observe_stage_duration("ns", "train", 125.0)
    after = scrape(metrics_url)
    name = "selfalign_stage_duration_seconds"
    assert delta(before, after, f"{name}_count", namespace="ns", stage="train") == 1
    assert delta(before, after, f"{name}_sum", namespace="ns", stage="train") == 125.0
    assert delta(before, after, f"{name}_bucket", namespace="ns", stage="train", le="120.0") == 0
    assert delta(before, after, f"{name}_bucket", namespace="ns", stage="train", le="300.0") == 1


def test_job_gap_counts_and_clamps_clock_skew_to_zero(metrics_url):
    before = scrape(metrics_url)
    metrics.observe_job_gap("ns", 0.3)
    metrics.observe_job_gap("ns", -0.2)
    after = scrape(metrics_url)
    name = "selfalign_job_gap_seconds"
    assert delta(before, after, f"{name}_count", namespace="ns") == 2
    assert delta(before, after, f"{name}_sum", namespace="ns") == pytest.approx(0.3)
    assert delta(before, after, f"{name}_bucket", namespace="ns", le="0.05") == 1
    assert delta(before, after, f"{name}_bucket", namespace="ns", le="0.5") == 2


def test_reconcile_errors_count(metrics_url):
    before = scrape(metrics_url)
    metrics.record_reconcile_error("ns")
    after = scrape(metrics_url)
    assert delta(before, after, "selfalign_reconcile_errors_total", namespace="ns") == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.record_transition("ns", "Pending", "Exploded"),
        lambda: metrics.observe_stage_duration("ns", "distill", 1.0),
    ],
    ids=["phase", "stage"],
)
def test_unknown_labels_are_rejected(call):
    with pytest.raises(ValueError, match="unknown"):
        call()


def test_status_changes_from_the_planner_become_transitions_durations_and_gaps(metrics_url):
    """The handler's two calls, fed with statuses the planner really writes."""
    spec = parse_spec({"recipe": "isheep", "rounds": 1, "model": {"base": "s3://m/base"},
                       "seeds": "s3://d/seeds.jsonl", "storage": {"uri": "s3://b/runs"},
                       "coverage": {"reference": "s3://d/ref.jsonl"}})
    before = scrape(metrics_url)
    first = plan(spec, None, {}, T0, namespace="ns", name="camp", generation=1)
    metrics.record_status_change(None, first.status, namespace="ns")
    (job,) = first.jobs
    finished = JobObservation(job.name, 0, "synthesize", "Succeeded", result={},
                              start_time="2026-11-21T12:00:05Z", completion_time="2026-11-21T12:01:35Z")
    second = plan(spec, first.status, {job.name: finished}, T0 + timedelta(minutes=2),
                  namespace="ns", name="camp", generation=1)
    metrics.record_status_change(first.status, second.status, namespace="ns")
    metrics.record_status_change(second.status, second.status, namespace="ns")  # a repeated pass adds nothing
    created_at = datetime(2026, 11, 21, 12, 1, 36, tzinfo=timezone.utc)
    metrics.observe_job_created(second.status, created_at, namespace="ns")
    after = scrape(metrics_url)

    phase = first.status["phase"]
    assert delta(before, after, "selfalign_run_transitions_total", namespace="ns", from_phase="None",
                 to_phase=phase) == 1
    duration = "selfalign_stage_duration_seconds"
    assert delta(before, after, f"{duration}_count", namespace="ns", stage="synthesize") == 1
    assert delta(before, after, f"{duration}_sum", namespace="ns", stage="synthesize") == 90.0
    assert delta(before, after, "selfalign_job_gap_seconds_count", namespace="ns") == 1
    assert delta(before, after, "selfalign_job_gap_seconds_sum", namespace="ns") == pytest.approx(1.0)


def test_no_gap_before_the_first_stage_finished(metrics_url):
    before = scrape(metrics_url)
    running = {"rounds": [{"round": 0, "stages": {"synthesize": {"phase": "Running"}}}]}
    metrics.observe_job_created(running, T0, namespace="ns")
    after = scrape(metrics_url)
    assert delta(before, after, "selfalign_job_gap_seconds_count", namespace="ns") == 0


def test_a_stages_queue_time_is_observed_apart_from_its_running_time(metrics_url):
    """A stage that waited 10 min for Kueue and ran 90 s: the duration histogram gets the 90 s."""
    spec = parse_spec({"recipe": "isheep", "rounds": 1, "model": {"base": "s3://m/base"},
                       "seeds": "s3://d/seeds.jsonl", "storage": {"uri": "s3://b/runs"},
                       "coverage": {"reference": "s3://d/ref.jsonl"}})
    before = scrape(metrics_url)
    first = plan(spec, None, {}, T0, namespace="ns", name="kq", generation=1)
    (job,) = first.jobs
    steps = [JobObservation(job.name, 0, "synthesize", "Queued", suspended_at="2026-11-21T12:00:00Z"),
             JobObservation(job.name, 0, "synthesize", "Active", start_time="2026-11-21T12:10:00Z"),
             JobObservation(job.name, 0, "synthesize", "Succeeded", result={}, start_time="2026-11-21T12:10:00Z",
                            completion_time="2026-11-21T12:11:30Z")]
    status = first.status
    for minute, seen in enumerate(steps, start=1):
        new = plan(spec, status, {job.name: seen}, T0 + timedelta(minutes=10 * minute), namespace="ns", name="kq",
                   generation=1).status
        metrics.record_status_change(status, new, namespace="kueue")
        status = new
    after = scrape(metrics_url)
    assert delta(before, after, "selfalign_stage_duration_seconds_sum", namespace="kueue", stage="synthesize") == 90.0
    assert delta(before, after, "selfalign_stage_queued_seconds_count", namespace="kueue", stage="synthesize") == 1
    assert delta(before, after, "selfalign_stage_queued_seconds_sum", namespace="kueue", stage="synthesize") == 600.0


RAW_SPEC = {"recipe": "isheep", "rounds": 2, "model": {"base": "s3://m/base"}, "seeds": "s3://d/seeds.jsonl",
            "storage": {"uri": "s3://b/runs"}, "coverage": {"reference": "s3://d/ref.jsonl"}}


def run_body(namespace, name, status, spec=RAW_SPEC):
    return {"metadata": {"namespace": namespace, "name": name, "generation": 1}, "spec": spec, "status": status}


@pytest.fixture
def tracked(metrics_url):
    """The collector over a list the test changes (kopf's index, in the operator)."""
    runs: list[dict] = []
    settings = OperatorSettings(stage_resources={"synthesize": {"activeDeadlineSeconds": 7200}})
    metrics.track_runs(lambda: runs, settings)
    yield runs
    metrics.track_runs(tuple, OperatorSettings())


def series(scraped, name):
    return {labels: value for (metric, labels), value in scraped.items() if metric == name}


def test_runs_by_phase_are_counted_from_the_index_at_each_scrape_and_emptied_phases_read_0(metrics_url, tracked):
    tracked += [run_body("a", f"r{i}", {"phase": "Running"}) for i in range(3)]
    tracked += [run_body("b", "s", {"phase": "Succeeded"}), run_body("b", "new", {})]
    first = series(scrape(metrics_url), "selfalign_runs")
    assert first == {frozenset({("phase", "Running")}): 3, frozenset({("phase", "Succeeded")}): 1,
                     frozenset({("phase", "Pending")}): 1, frozenset({("phase", "Failed")}): 0,
                     frozenset({("phase", "Suspended")}): 0}
    tracked[:] = [run_body("b", "s", {"phase": "Succeeded"}), run_body("b", "t", {"phase": "Succeeded"})]
    second = series(scrape(metrics_url), "selfalign_runs")
    assert second[frozenset({("phase", "Running")})] == 0 and second[frozenset({("phase", "Succeeded")})] == 2


def test_a_running_run_has_its_phase_round_stage_start_and_deadline_labelled_by_namespace_and_run(
        metrics_url, tracked):
    spec = parse_spec(RAW_SPEC)
    first = plan(spec, None, {}, T0, namespace="team-a", name="camp", generation=1)
    (job,) = first.jobs
    running = plan(spec, first.status, {job.name: JobObservation(job.name, 0, "synthesize", "Active",
                                                                  start_time="2026-11-21T12:00:05Z")},
                   T0 + timedelta(seconds=10), namespace="team-a", name="camp", generation=1).status
    tracked.append(run_body("team-a", "camp", running))
    scraped = scrape(metrics_url)
    where = {("namespace", "team-a"), ("run", "camp")}
    assert series(scraped, "selfalign_run_phase") == {frozenset(where | {("phase", "Running")}): 1}
    assert series(scraped, "selfalign_run_round") == {frozenset(where): 1}
    started = T0.timestamp()  # the pass that created its Job recorded it Running (the planner's rule 3)
    assert series(scraped, "selfalign_stage_since_timestamp_seconds") == {
        frozenset(where | {("stage", "synthesize"), ("state", "Running")}): started}
    # The chart's default (OperatorSettings), as the Job gets it.
    assert series(scraped, "selfalign_stage_deadline_seconds") == {
        frozenset(where | {("stage", "synthesize")}): 7200}


def test_a_queued_stage_says_since_when_and_why_it_waits(metrics_url, tracked):
    spec = parse_spec(RAW_SPEC)
    first = plan(spec, None, {}, T0, namespace="team-b", name="kq", generation=1)
    (job,) = first.jobs
    queued = plan(spec, first.status, {job.name: JobObservation(job.name, 0, "synthesize", "Queued",
                                                                 suspended_at="2026-11-21T12:00:01Z")},
                  T0 + timedelta(seconds=5), namespace="team-b", name="kq", generation=1).status
    own_deadline = {**RAW_SPEC, "resources": {"synthesize": {"activeDeadlineSeconds": 600}}}
    tracked.append(run_body("team-b", "kq", queued, own_deadline))
    scraped = scrape(metrics_url)
    where = {("namespace", "team-b"), ("run", "kq")}
    assert series(scraped, "selfalign_run_waiting") == {frozenset(where | {("reason", "Queued")}): 1}
    since = series(scraped, "selfalign_stage_since_timestamp_seconds")
    assert since == {frozenset(where | {("stage", "synthesize"), ("state", "Queued")}):
                     datetime(2026, 11, 21, 12, 0, 1, tzinfo=timezone.utc).timestamp()}
    assert series(scraped, "selfalign_stage_deadline_seconds") == {
        frozenset(where | {("stage", "synthesize")}): 600}  # the run's own wins


def test_a_finished_run_keeps_only_its_phase_and_a_deleted_run_leaves_no_series(metrics_url, tracked):
    spec = parse_spec({**RAW_SPEC, "rounds": 1})
    status = plan(spec, None, {}, T0, namespace="ns", name="gone", generation=1).status
    (job,) = plan(spec, None, {}, T0, namespace="ns", name="gone", generation=1).jobs
    failed = plan(spec, status, {job.name: JobObservation(job.name, 0, "synthesize", "Failed", message="exit 2")},
                  T0, namespace="ns", name="gone", generation=1).status
    tracked.append(run_body("ns", "gone", failed))
    scraped = scrape(metrics_url)
    assert series(scraped, "selfalign_run_phase") == {
        frozenset({("namespace", "ns"), ("run", "gone"), ("phase", "Failed")}): 1}
    assert series(scraped, "selfalign_stage_since_timestamp_seconds") == {}
    assert series(scraped, "selfalign_stage_deadline_seconds") == {}
    tracked.clear()
    assert not any(labels and ("run", "gone") in labels for (_, labels) in scrape(metrics_url))


def test_counters_and_histograms_never_carry_the_run():
    for collector in (metrics.TRANSITIONS, metrics.STAGE_DURATION, metrics.STAGE_QUEUED, metrics.JOB_GAP,
                      metrics.RECONCILE_ERRORS):
        assert "run" not in collector._labelnames and "namespace" in collector._labelnames
