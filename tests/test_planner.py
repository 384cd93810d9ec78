"""The pure planner: table tests of each rule, and property tests over random histories."""
from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfalign.operator import conditions as c
from selfalign.operator.naming import job_name
from selfalign.operator.planner import MAX_METRICS, EnsureJob, JobObservation, plan, status_rejected
from selfalign.operator.spec import STAGES, SpecError, parse_spec

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
NS, NAME = "team-a", "camp"


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_spec(**overrides):
    raw = {
        "recipe": "isheep", "rounds": 2,
        "model": {"base": "s3://models/base"}, "seeds": "s3://data/seeds.jsonl",
        "storage": {"uri": "s3://bucket/runs"}, "coverage": {"reference": "s3://data/ref.jsonl"},
    }
    for key, value in overrides.items():
        raw[key] = value
    return parse_spec(raw)


def step(spec, status, observed=None, now=T0, generation=1):
    return plan(spec, status, observed or {}, now, namespace=NS, name=NAME, generation=generation)


def done(job: EnsureJob, result=None) -> JobObservation:
    return JobObservation(job.name, job.round, job.stage, "Succeeded", result=result or {})


def cond(status, type_):
    return next(x for x in status["conditions"] if x["type"] == type_)


def run_to_end(spec, status=None, results=None, limit=1000):
    """Drive a run where every Job succeeds at once; return the final plan and the Jobs in order."""
    observed, created = {}, []
    result = step(spec, status)
    for i in range(limit):
        for job in result.jobs:
            if job.name not in observed:
                created.append(job)
                observed[job.name] = done(job, (results or {}).get(job.stage))
        if not result.jobs:
            return result, created
        result = step(spec, result.status, observed, T0 + timedelta(seconds=i + 1))
    raise AssertionError("run did not finish")


# ---- table tests: one rule each -------------------------------------------------------------

def test_start_creates_first_stage_and_records_it_before_the_job_exists():
    result = step(make_spec(), None)
    assert result.jobs == (EnsureJob(0, "synthesize", job_name(NAME, 0, "synthesize"),
                                     "s3://bucket/runs/team-a/camp", "s3://models/base"),)
    record = result.status["rounds"][0]["stages"]["synthesize"]
    # Recorded as the Job's first event will show it: that event then changes nothing (one write).
    assert (record["phase"], record["attempts"], record["startTime"], record["since"]) == ("Running", 1, stamp(0),
                                                                                           stamp(0))
    assert record["job"] == job_name(NAME, 0, "synthesize")
    assert result.status["phase"] == "Running"
    assert [e.reason for e in result.events] == ["StageStarted", "RunRunning"]
    job = result.jobs[0]
    for start_time in (None, stamp(1)):  # the Job as created, then once the Job controller synced it
        seen = step(make_spec(), result.status, {job.name: JobObservation(job.name, 0, "synthesize", "Active",
                                                                          start_time=start_time)}, T0 + timedelta(seconds=2))
        assert seen.status == result.status and seen.events == ()
    finished = JobObservation(job.name, 0, "synthesize", "Succeeded", result={}, start_time=stamp(1),
                              completion_time=stamp(31))
    record = step(make_spec(), result.status, {job.name: finished}, T0 + timedelta(seconds=32)).status["rounds"][0][
        "stages"]["synthesize"]
    assert record["runningSeconds"] == 30  # from the Job's own startTime, not the request


def test_a_kueue_run_starts_its_stage_pending_until_the_job_is_seen():
    result = step(make_spec(queueName="team-a"), None)
    record = result.status["rounds"][0]["stages"]["synthesize"]
    assert (record["phase"], record["attempts"]) == ("Pending", 0) and "startTime" not in record
    assert result.status["message"] == "round 1/2 stage synthesize: pending"


def test_two_rounds_run_every_stage_once_in_order_and_succeed():
    final, created = run_to_end(make_spec(), results={"assess": {"kept": 17}, "coverage": {"coverage": 0.4219}})
    assert [(j.round, j.stage) for j in created] == [(k, s) for k in range(2) for s in STAGES]
    status = final.status
    assert status["phase"] == "Succeeded" and (status["round"], status["stage"]) == (1, "coverage")
    assert status["kept"] == 17 and status["coverage"] == 42.2
    assert status["model"] == "s3://bucket/runs/team-a/camp/models/round-2"
    assert cond(status, c.READY)["status"] == "True" and cond(status, c.PROGRESSING)["status"] == "False"
    assert "completionTime" in status


@pytest.mark.parametrize(("train_from", "judge", "expected"), [
    ("base", "base", {"synthesize": "R/models/round-1", "assess": "B", "train": "B", "merge": "B"}),
    ("previous", "current", {"synthesize": "R/models/round-1", "assess": "R/models/round-1",
                             "train": "R/models/round-1", "merge": "R/models/round-1"}),
])
def test_model_lineage_of_round_one(train_from, judge, expected):
    spec = make_spec(train={"from": train_from}, assess={"judge": judge})
    _, created = run_to_end(spec)
    base, run = "s3://models/base", "s3://bucket/runs/team-a/camp"
    round1 = {j.stage: j.model for j in created if j.round == 1}
    want = {k: v.replace("R", run).replace("B", base) if v != "B" else base for k, v in expected.items()}
    assert {k: round1[k] for k in want} == want
    assert round1["coverage"] is None
    assert {j.stage: j.model for j in created if j.round == 0}["synthesize"] == base


def test_stage_failure_fails_the_run_naming_round_stage_and_message():
    first = step(make_spec(), None)
    job = first.jobs[0]
    failed = JobObservation(job.name, 0, "synthesize", "Failed", failures=3,
                            message="seeds.jsonl:4: field 'instruction': missing")
    result = step(make_spec(), first.status, {job.name: failed})
    assert result.jobs == () and result.status["phase"] == "Failed"
    message = result.status["message"]
    assert "round 1/2 stage synthesize" in message and "synthesize" in message and "seeds.jsonl:4" in message
    assert "3 attempt" in message
    assert cond(result.status, c.FAILED)["reason"] == c.STAGE_FAILED
    assert {e.reason for e in result.events} == {"StageFailed", "RunFailed"}
    # a failed run stays failed: nothing restarts it
    again = step(make_spec(), result.status, {})
    assert again.jobs == () and again.status == result.status


def test_invalid_spec_fails_without_jobs_and_a_corrected_spec_resumes():
    error = SpecError(["spec.train.loraRank: Input should be greater than or equal to 1"])
    bad = step(error, None)
    assert bad.jobs == () and bad.status["phase"] == "Failed"
    assert cond(bad.status, c.READY)["reason"] == c.INVALID_SPEC
    assert "spec.train.loraRank" in bad.status["message"]
    fixed = step(make_spec(), bad.status, generation=2)
    assert fixed.status["phase"] == "Running" and fixed.jobs[0].stage == "synthesize"
    assert fixed.status["observedGeneration"] == 2


def test_a_refused_job_keeps_its_stage_pending_and_the_run_says_why_until_the_job_exists():
    first = step(make_spec(), None)
    job = first.jobs[0]
    refused = {job.name: JobObservation(job.name, 0, "synthesize", "Refused",
                                        message=f"creating Job {job.name} was refused: 403 Forbidden: exceeded quota")}
    waiting = step(make_spec(), first.status, refused)
    record = waiting.status["rounds"][0]["stages"]["synthesize"]
    assert (record["phase"], record["message"]) == ("Pending", refused[job.name].message)
    assert record["attempts"] == 0 and "startTime" not in record and "since" not in record  # not started
    assert waiting.jobs == (job,)  # still wanted: the create is tried again
    assert waiting.status["phase"] == "Running" and "exceeded quota" in waiting.status["message"]
    assert cond(waiting.status, c.PROGRESSING)["reason"] == c.JOB_REFUSED
    running = step(make_spec(), waiting.status, {job.name: JobObservation(job.name, 0, "synthesize", "Active")})
    record = running.status["rounds"][0]["stages"]["synthesize"]
    assert "message" not in record and (record["phase"], record["attempts"]) == ("Running", 1)
    assert "startTime" in record
    assert cond(running.status, c.PROGRESSING)["reason"] == c.STAGE_RUNNING
    assert "quota" not in running.status["message"]


def test_suspend_suspends_the_running_job_and_resume_continues_the_same_one():
    first = step(make_spec(), None)
    job = first.jobs[0]
    running = {job.name: JobObservation(job.name, 0, "synthesize", "Active", start_time="2026-11-21T12:00:00Z")}
    started = step(make_spec(), first.status, running)
    suspending = step(make_spec(suspend=True), started.status, running, T0 + timedelta(seconds=60))
    assert suspending.status["phase"] == "Suspended" and "being suspended" in suspending.status["message"]
    assert suspending.jobs == (EnsureJob(0, "synthesize", job.name, job.run_uri, job.model, suspend=True),)

    held = {job.name: JobObservation(job.name, 0, "synthesize", "Suspended", suspended_at="2026-11-21T12:01:00Z")}
    suspended = step(make_spec(suspend=True), suspending.status, held, T0 + timedelta(seconds=90))
    record = suspended.status["rounds"][0]["stages"]["synthesize"]
    assert record["phase"] == "Suspended" and record["runningSeconds"] == 60
    assert suspended.status["message"] == (f"suspended: round 1/2 stage synthesize: its Job {job.name} is "
                                           "suspended, its pods released; resuming continues it")
    assert [e.reason for e in suspended.events] == ["StageSuspended"]

    resumed = step(make_spec(), suspended.status, held, T0 + timedelta(seconds=300))
    assert resumed.jobs[0].name == job.name and resumed.jobs[0].suspend is False  # the same Job, unsuspended
    assert resumed.status["phase"] == "Running" and cond(resumed.status, c.SUSPENDED)["status"] == "False"
    again = {job.name: JobObservation(job.name, 0, "synthesize", "Active", start_time="2026-11-21T12:05:00Z")}
    running_again = step(make_spec(), resumed.status, again, T0 + timedelta(seconds=301))
    assert running_again.jobs[0].suspend is None
    finished = {job.name: JobObservation(job.name, 0, "synthesize", "Succeeded", result={},
                                         start_time="2026-11-21T12:05:00Z", completion_time="2026-11-21T12:06:40Z")}
    done_ = step(make_spec(), running_again.status, finished, T0 + timedelta(seconds=400))
    record = done_.status["rounds"][0]["stages"]["synthesize"]
    assert record["runningSeconds"] == 60 + 100 and "queuedSeconds" not in record  # the suspended 4 min are neither


def test_suspend_starts_nothing_new_after_the_running_stage():
    first = step(make_spec(), None)
    job = first.jobs[0]
    finished = {job.name: done(job)}  # it finished before the suspension reached it
    waiting = step(make_spec(suspend=True), first.status, finished)
    assert waiting.jobs == () and waiting.status["phase"] == "Suspended"
    assert waiting.status["stage"] == "assess" and waiting.status["message"] == "suspended before round 1/2 stage assess"
    resumed = step(make_spec(), waiting.status, finished)
    assert [j.stage for j in resumed.jobs] == ["assess"] and resumed.status["phase"] == "Running"
    assert cond(resumed.status, c.SUSPENDED)["status"] == "False"


def test_raising_rounds_after_success_continues_the_run():
    final, _ = run_to_end(make_spec(rounds=1))
    assert final.status["phase"] == "Succeeded"
    more = step(make_spec(rounds=2), final.status, {})
    assert [(j.round, j.stage) for j in more.jobs] == [(1, "synthesize")]
    assert more.status["phase"] == "Running" and "completionTime" not in more.status


def test_finished_job_that_disappeared_is_never_rerun():
    first = step(make_spec(), None)
    job = first.jobs[0]
    second = step(make_spec(), first.status, {job.name: done(job)})
    # the synthesize Job is gone (TTL): status remembers it succeeded
    third = step(make_spec(), second.status, {})
    assert [j.stage for j in third.jobs] == ["assess"]
    assert third.status["rounds"][0]["stages"]["synthesize"]["phase"] == "Succeeded"


def test_job_that_vanished_before_finishing_is_ensured_again():
    first = step(make_spec(), None)
    job = first.jobs[0]
    running = step(make_spec(), first.status, {job.name: JobObservation(job.name, 0, "synthesize", "Active")})
    vanished = step(make_spec(), running.status, {})
    assert vanished.jobs == (job,)


def test_condition_transition_time_moves_only_when_status_flips():
    first = step(make_spec(), None, now=T0)
    job = first.jobs[0]
    later = T0 + timedelta(minutes=5)
    second = step(make_spec(), first.status, {job.name: JobObservation(job.name, 0, "synthesize", "Active")}, later)
    assert cond(second.status, c.PROGRESSING)["lastTransitionTime"] == "2026-11-21T12:00:00Z"
    finished = step(make_spec(), second.status, {job.name: done(job)}, later)
    assert cond(finished.status, c.PROGRESSING)["lastTransitionTime"] == "2026-11-21T12:00:00Z"


def test_retries_inside_the_job_are_counted_as_attempts():
    first = step(make_spec(), None)
    job = first.jobs[0]
    retrying = JobObservation(job.name, 0, "synthesize", "Active", failures=2)
    result = step(make_spec(), first.status, {job.name: retrying})
    assert result.status["rounds"][0]["stages"]["synthesize"]["attempts"] == 3


def run_with_losses(spec, losses, status=None):
    """Drive a run where every Job succeeds at once and round k's merge reports the held-out loss
    pair losses[k] = (before, after), or no evaluation for None; return the final plan and the
    (round, stage) of each Job created."""
    observed, created = {}, []
    result = step(spec, status)
    for i in range(1000):
        if not result.jobs:
            return result, created
        for job in result.jobs:
            if job.name not in observed:
                created.append((job.round, job.stage))
                loss = losses[job.round] if job.stage == "merge" else None
                observed[job.name] = done(job, loss and {"evalLossBefore": loss[0], "evalLossAfter": loss[1],
                                                         "evalItems": 25})
        result = step(spec, result.status, observed, T0 + timedelta(seconds=i + 1))
    raise AssertionError("run did not finish")


def evaluated(stop_when_worse: bool, rounds: int = 3):
    return make_spec(rounds=rounds, evaluate={"data": "s3://data/heldout.jsonl", "stopWhenWorse": stop_when_worse})


@pytest.mark.parametrize(("stop", "losses", "rounds_run", "reason"), [
    (True, [(2.0, 1.8), (1.8, 1.7), (1.7, 1.6)], 3, c.RUN_SUCCEEDED),  # better every round
    (True, [(2.0, 1.8), (1.8, 1.9), (1.9, 1.5)], 2, c.CONVERGED),  # round 1 is worse: it is the last
    (True, [(2.0, 2.1), (2.1, 1.5), (1.5, 1.4)], 1, c.CONVERGED),  # the first round already worse
    (True, [(2.0, 1.8), (1.8, 1.7), (1.7, 1.75)], 3, c.CONVERGED),  # the last round worse
    (True, [(2.0, 2.0), (2.0, 2.0), (2.0, 2.0)], 3, c.RUN_SUCCEEDED),  # equal is not worse
    (True, [None, None, None], 3, c.RUN_SUCCEEDED),  # nothing measured
    (False, [(2.0, 2.1), (2.1, 2.2), (2.2, 2.3)], 3, c.RUN_SUCCEEDED),  # worse, but the flag is off
])
def test_stop_when_worse_ends_the_run_converged_after_the_first_worse_round(stop, losses, rounds_run, reason):
    final, created = run_with_losses(evaluated(stop), losses)
    assert created == [(k, s) for k in range(rounds_run) for s in STAGES]  # that round finishes, no later one
    status = final.status
    assert status["phase"] == "Succeeded" and (status["round"], status["stage"]) == (rounds_run - 1, "coverage")
    assert cond(status, c.SUCCEEDED)["reason"] == reason and cond(status, c.READY)["status"] == "True"
    if reason == c.CONVERGED:
        before, after = losses[rounds_run - 1]
        best = ["s3://models/base", *(f"s3://bucket/runs/team-a/camp/models/round-{k}" for k in (1, 2))][rounds_run - 1]
        assert status["message"] == (f"converged: round {rounds_run} raised the held-out loss from {before:.4g} "
                                     f"to {after:.4g}; the best model is {best}")


def test_a_converged_run_continues_only_when_stop_when_worse_is_switched_off():
    losses = [(2.0, 1.8), (1.8, 1.9), (1.9, 1.5), (1.5, 1.4)]
    converged, _ = run_with_losses(evaluated(True), losses)
    more_rounds, created = run_with_losses(evaluated(True, rounds=4), losses, converged.status)
    assert created == [] and cond(more_rounds.status, c.SUCCEEDED)["reason"] == c.CONVERGED
    switched_off, created = run_with_losses(evaluated(False, rounds=4), losses, converged.status)
    assert created == [(k, s) for k in (2, 3) for s in STAGES]
    assert cond(switched_off.status, c.SUCCEEDED)["reason"] == c.RUN_SUCCEEDED


# ---- property tests: random interleavings of Job outcomes and operator restarts --------------

class World:
    """The cluster as the planner's caller sees it: Jobs, their pod failures, and lost writes."""

    def __init__(self, backoff_limit: int):
        self.jobs: dict[str, JobObservation] = {}
        self.creates: list[str] = []
        self.backoff_limit = backoff_limit

    def ensure(self, job: EnsureJob):
        if job.name not in self.jobs:
            self.creates.append(job.name)
            self.jobs[job.name] = JobObservation(job.name, job.round, job.stage, "Active")

    def active(self):
        return [j for j in self.jobs.values() if j.phase == "Active"]


def _position(status) -> int:
    if "round" not in status:
        return -1
    return status["round"] * len(STAGES) + STAGES.index(status["stage"])


def _finished_records(status):
    return {(e["round"], s): copy.deepcopy(r) for e in status.get("rounds", [])
            for s, r in e["stages"].items() if r["phase"] in ("Succeeded", "Failed")}


EVENTS = st.lists(st.sampled_from(["reconcile", "reconcile", "succeed", "pod-fails", "ttl",
                                   "crash-before-status", "crash-before-create", "stale"]),
                  min_size=5, max_size=120)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS, rounds=st.integers(1, 3), backoff=st.integers(0, 2), fail_weight=st.integers(0, 3))
def test_random_histories_keep_every_invariant(events, rounds, backoff, fail_weight):
    spec = make_spec(rounds=rounds, backoffLimit=backoff)
    world = World(backoff)
    status: dict = {}
    stale_view: dict = {}
    now = T0
    pod_failures_left = fail_weight

    def reconcile(view, write_status=True, create=True):
        nonlocal status
        before = status
        result = step(spec, status, view, now)
        # Invariants of one pass.
        assert _position(result.status) >= _position(before), "round/stage moved backwards"
        for key, record in _finished_records(before).items():
            assert _finished_records(result.status)[key] == record, f"finished record {key} changed"
        for job in result.jobs:
            record = result.status["rounds"][job.round]["stages"][job.stage]
            assert record["phase"] not in ("Succeeded", "Failed")
        # Idempotence: the same observation again gives the same status, no new Job, no Event.
        again = step(spec, result.status, view, now)
        assert again.status == result.status and set(again.jobs) <= set(result.jobs) and again.events == ()
        if write_status:
            status = result.status
            if create:
                for job in result.jobs:
                    world.ensure(job)
        assert len(world.active()) <= 1, "two active Jobs for one run"

    for event in events:
        now += timedelta(seconds=7)
        if event == "reconcile":
            reconcile(dict(world.jobs))
        elif event == "stale":
            reconcile(stale_view)
        elif event == "crash-before-status":
            reconcile(dict(world.jobs), write_status=False)
        elif event == "crash-before-create":
            reconcile(dict(world.jobs), create=False)
        elif event == "ttl":
            # TTL removes finished Jobs days later, long after the operator recorded their outcome.
            # (A Job finished and deleted while never observed is re-created, and the stage's
            # manifest makes that rerun a no-op: the stage contract, tested with the stages.)
            recorded = {r["job"] for r in _finished_records(status).values()}
            for name, job in list(world.jobs.items()):
                if job.phase != "Active" and name in recorded:
                    del world.jobs[name]
        elif world.active():
            job = world.active()[0]
            if event == "pod-fails" and pod_failures_left > 0:
                pod_failures_left -= 1
                failures = job.failures + 1
                phase = "Failed" if failures > world.backoff_limit else "Active"
                world.jobs[job.name] = JobObservation(job.name, job.round, job.stage, phase, failures=failures,
                                                      message="boom" if phase == "Failed" else None)
            elif event == "succeed":
                world.jobs[job.name] = JobObservation(job.name, job.round, job.stage, "Succeeded",
                                                      failures=job.failures, result={"kept": 1})
        stale_view = dict(world.jobs)

    # Drive the rest of the run with every Job succeeding: it must end, cleanly.
    for _ in range(rounds * len(STAGES) * 3 + 5):
        now += timedelta(seconds=7)
        for job in world.active():
            world.jobs[job.name] = JobObservation(job.name, job.round, job.stage, "Succeeded", result={})
        reconcile(dict(world.jobs))
    assert status["phase"] in ("Succeeded", "Failed")
    order = [job_name(NAME, k, s) for k in range(rounds) for s in STAGES]
    assert world.creates == order[: len(world.creates)], "a stage was skipped or started out of order"
    records = _finished_records(status)
    if status["phase"] == "Succeeded":
        assert len(world.creates) == rounds * len(STAGES)
        assert all(r["phase"] == "Succeeded" for r in records.values()) and len(records) == rounds * len(STAGES)
    else:
        assert [r["phase"] for r in records.values()].count("Failed") == 1
        assert "boom" in status["message"]


def test_long_messages_are_bounded_and_kept_is_an_integer():
    error = SpecError([f"spec.field{i}: bad value " + "x" * 100 for i in range(200)])
    bad = step(error, None)
    assert len(bad.status["message"]) <= 4096 and bad.status["message"].endswith("...")
    final, _ = run_to_end(make_spec(rounds=1), results={"assess": {"kept": 12.0}})
    assert final.status["kept"] == 12 and isinstance(final.status["kept"], int)


# ---- under a real API server: uid-bound storage, bounded status, a rejected status -------------

def test_a_run_with_a_uid_keeps_its_outputs_under_that_uid():
    """A run deleted and created again under the same name must not find the earlier run's
    manifests and 'complete' each stage with its outputs (issue 13)."""
    spec = make_spec()
    first = plan(spec, None, {}, T0, namespace=NS, name=NAME, generation=1, uid="uid-1").jobs[0]
    again = plan(spec, None, {}, T0, namespace=NS, name=NAME, generation=1, uid="uid-2").jobs[0]
    assert first.run_uri == f"s3://bucket/runs/{NS}/{NAME}/uid-1" and again.run_uri.endswith("/uid-2")
    assert step(spec, None).jobs[0].run_uri == f"s3://bucket/runs/{NS}/{NAME}"  # the local backend: no uid


def test_stage_metrics_in_status_are_bounded_scalars():
    """100 rounds x 5 stages of 4 KB summaries would outgrow etcd's 1.5 MiB object limit."""
    big = {"kept": 7, "model": "s3://m", "per_domain": {"a": 1}, "curve": [1, 2], "blob": "x" * 4000,
           **{f"k{i}": "y" * 100 for i in range(40)}}
    spec = make_spec(rounds=100)
    final, _ = run_to_end(spec, results={stage: big for stage in STAGES}, limit=2000)
    record = final.status["rounds"][0]["stages"]["assess"]["metrics"]
    assert record["kept"] == 7 and record["model"] == "s3://m"
    assert "per_domain" not in record and "curve" not in record and "blob" not in record
    assert len(json.dumps(record)) <= MAX_METRICS
    assert len(json.dumps(final.status)) < 768 * 1024  # half of etcd's limit
    assert final.status["kept"] == 7


def test_a_status_the_api_rejects_fails_the_run_until_the_spec_changes():
    spec = make_spec()
    running = step(spec, None).status
    rejected = status_rejected(running, "status.coverage: Invalid value: 120: must be <= 100", T0, generation=1)
    assert rejected.status["phase"] == "Failed" and "must be <= 100" in rejected.status["message"]
    assert cond(rejected.status, c.FAILED)["reason"] == c.STATUS_REJECTED
    assert [e.reason for e in rejected.events] == ["RunFailed"] and not rejected.jobs
    again = step(spec, rejected.status, generation=1)
    assert again.status == rejected.status and not again.jobs and not again.events
    assert step(spec, rejected.status, generation=2).status["phase"] == "Running"  # a corrected spec resumes
