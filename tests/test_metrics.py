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
    return after[key] - before.get(key, 0.0)


def test_transitions_are_counted_per_phase_pair(metrics_url):
    before = scrape(metrics_url)
    metrics.record_transition(None, "Pending")
    metrics.record_transition("Pending", "Running")
    metrics.record_transition("Pending", "Running")
    after = scrape(metrics_url)
    name = "selfalign_run_transitions_total"
    assert delta(before, after, name, from_phase="None", to_phase="Pending") == 1
    assert delta(before, after, name, from_phase="Pending", to_phase="Running") == 2


def test_stage_duration_lands_in_its_bucket(metrics_url):
    before = scrape(metrics_url)
    metrics.observe_stage_duration("train", 125.0)
    after = scrape(metrics_url)
    name = "selfalign_stage_duration_seconds"
    assert delta(before, after, f"{name}_count", stage="train") == 1
    assert delta(before, after, f"{name}_sum", stage="train") == 125.0
    assert delta(before, after, f"{name}_bucket", stage="train", le="120.0") == 0
    assert delta(before, after, f"{name}_bucket", stage="train", le="300.0") == 1


def test_job_gap_counts_and_clamps_clock_skew_to_zero(metrics_url):
    before = scrape(metrics_url)
    metrics.observe_job_gap(0.3)
    metrics.observe_job_gap(-0.2)
    after = scrape(metrics_url)
    name = "selfalign_job_gap_seconds"
    assert delta(before, after, f"{name}_count") == 2
    assert delta(before, after, f"{name}_sum") == pytest.approx(0.3)
    assert delta(before, after, f"{name}_bucket", le="0.05") == 1
    assert delta(before, after, f"{name}_bucket", le="0.5") == 2


def test_reconcile_errors_count(metrics_url):
    before = scrape(metrics_url)
    metrics.record_reconcile_error()
    after = scrape(metrics_url)
    assert delta(before, after, "selfalign_reconcile_errors_total") == 1


def test_runs_by_phase_resets_phases_that_emptied(metrics_url):
    metrics.set_runs_by_phase({"Running": 3, "Succeeded": 1})
    first = scrape(metrics_url)
    assert first[("selfalign_runs", frozenset({("phase", "Running")}))] == 3
    assert first[("selfalign_runs", frozenset({("phase", "Pending")}))] == 0
    metrics.set_runs_by_phase({"Succeeded": 2})
    second = scrape(metrics_url)
    assert second[("selfalign_runs", frozenset({("phase", "Running")}))] == 0
    assert second[("selfalign_runs", frozenset({("phase", "Succeeded")}))] == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.record_transition("Pending", "Exploded"),
        lambda: metrics.observe_stage_duration("distill", 1.0),
        lambda: metrics.set_runs_by_phase({"Lost": 1}),
    ],
    ids=["phase", "stage", "phase-count"],
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
    metrics.record_status_change(None, first.status)
    (job,) = first.jobs
    finished = JobObservation(job.name, 0, "synthesize", "Succeeded", result={},
                              start_time="2026-11-21T12:00:05Z", completion_time="2026-11-21T12:01:35Z")
    second = plan(spec, first.status, {job.name: finished}, T0 + timedelta(minutes=2),
                  namespace="ns", name="camp", generation=1)
    metrics.record_status_change(first.status, second.status)
    metrics.record_status_change(second.status, second.status)  # a repeated pass adds nothing
    created_at = datetime(2026, 11, 21, 12, 1, 36, tzinfo=timezone.utc)
    metrics.observe_job_created(second.status, created_at)
    after = scrape(metrics_url)

    phase = first.status["phase"]
    assert delta(before, after, "selfalign_run_transitions_total", from_phase="None", to_phase=phase) == 1
    duration = "selfalign_stage_duration_seconds"
    assert delta(before, after, f"{duration}_count", stage="synthesize") == 1
    assert delta(before, after, f"{duration}_sum", stage="synthesize") == 90.0
    assert delta(before, after, "selfalign_job_gap_seconds_count") == 1
    assert delta(before, after, "selfalign_job_gap_seconds_sum") == pytest.approx(1.0)


def test_no_gap_before_the_first_stage_finished(metrics_url):
    before = scrape(metrics_url)
    running = {"rounds": [{"round": 0, "stages": {"synthesize": {"phase": "Running"}}}]}
    metrics.observe_job_created(running, T0)
    after = scrape(metrics_url)
    assert delta(before, after, "selfalign_job_gap_seconds_count") == 0


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
        metrics.record_status_change(status, new)
        status = new
    after = scrape(metrics_url)
    assert delta(before, after, "selfalign_stage_duration_seconds_sum", stage="synthesize") == 90.0
    assert delta(before, after, "selfalign_stage_queued_seconds_count", stage="synthesize") == 1
    assert delta(before, after, "selfalign_stage_queued_seconds_sum", stage="synthesize") == 600.0
