"""The planner's run control (issue 14): retry, whole-Job restarts of a multi-node train, why a
stage waits, and queued time kept apart from running time. Pure table tests."""
from __future__ import annotations

from datetime import timedelta

import pytest

from selfalign.operator import conditions as c
from selfalign.operator.naming import MAX_NAME, job_name
from selfalign.operator.planner import MOUNT_WAIT, JobObservation, attempt_job
from tests.test_planner import NAME, T0, cond, done, make_spec, stamp, step

MULTI = {"train": {"nodes": 2}, "resources": {"train": {"gpus": 1}}}


def to_stage(spec, stage: str):
    """Plan until `stage` of round 0 is the current one (every earlier stage succeeded)."""
    result, observed = step(spec, None), {}
    while result.jobs[0].stage != stage:
        observed[result.jobs[0].name] = done(result.jobs[0])
        result = step(spec, result.status, observed)
    return result, observed


def failed(job, *, codes=(1,), reason="BackoffLimitExceeded", message="rank 1: NCCL timeout") -> JobObservation:
    return JobObservation(job.name, job.round, job.stage, "Failed", failures=1, message=message, reason=reason,
                          exit_codes=codes, start_time=stamp(0), completion_time=stamp(30))


def test_raising_retry_reruns_the_failed_stage_as_a_new_job_and_keeps_finished_work():
    at_assess, observed = to_stage(make_spec(), "assess")
    first = at_assess.jobs[0]
    observed[first.name] = failed(first, codes=(2,), reason="PodFailurePolicy", message="seeds.jsonl:4: bad")
    broken = step(make_spec(), at_assess.status, observed)
    assert broken.status["phase"] == "Failed" and broken.jobs == ()
    assert step(make_spec(), broken.status, observed).status == broken.status  # nothing happens by itself

    retried = step(make_spec(retry=1), broken.status, observed, generation=2)
    assert [(j.stage, j.name) for j in retried.jobs] == [("assess", job_name(NAME, 0, "assess") + "-a2")]
    assert retried.status["phase"] == "Running" and cond(retried.status, c.FAILED)["status"] == "False"
    assert retried.status["message"] == "round 1/2 stage assess: running (attempt 2)"
    record = retried.status["rounds"][0]["stages"]["assess"]
    assert (record["phase"], record["attempt"], record["retry"], record["attempts"]) == ("Running", 2, 1, 1)
    assert record["history"] == [{"attempt": 1, "job": first.name, "reason": "PodFailurePolicy",
                                  "message": "seeds.jsonl:4: bad", "startTime": stamp(0),
                                  "completionTime": stamp(30)}]
    assert retried.status["rounds"][0]["stages"]["synthesize"] == broken.status["rounds"][0]["stages"]["synthesize"]
    assert [e.reason for e in retried.events] == ["StageStarted", "RunRunning"]

    observed[retried.jobs[0].name] = done(retried.jobs[0])
    onwards = step(make_spec(retry=1), retried.status, observed, generation=2)
    assert [j.stage for j in onwards.jobs] == ["train"]
    assert onwards.status["rounds"][0]["stages"]["train"]["retry"] == 1  # a later failure needs retry 2


def test_retry_does_nothing_to_a_stage_that_failed_under_the_same_value_or_while_suspended():
    at_train, observed = to_stage(make_spec(retry=3), "train")
    observed[at_train.jobs[0].name] = failed(at_train.jobs[0])
    broken = step(make_spec(retry=3), at_train.status, observed)
    assert broken.status["phase"] == "Failed"  # it ran under retry 3 already
    held = step(make_spec(retry=4, suspend=True), broken.status, observed, generation=2)
    assert held.jobs == () and held.status["phase"] == "Suspended"
    assert held.status["message"].endswith("it runs again (spec.retry) once resumed")
    resumed = step(make_spec(retry=4), held.status, observed, generation=3)
    assert resumed.jobs[0].name == job_name(NAME, 0, "train") + "-a2"


def test_a_multi_node_train_that_failed_is_restarted_whole_up_to_backoff_limit():
    spec = make_spec(backoffLimit=2, **MULTI)
    at_train, observed = to_stage(spec, "train")
    names = [at_train.jobs[0].name]
    result = at_train
    for attempt in (2, 3):
        observed[result.jobs[0].name] = failed(result.jobs[0], codes=(1, 143))  # one rank lost, its peers killed
        result = step(spec, result.status, observed)
        assert result.status["phase"] == "Running"
        assert result.jobs[0].name == job_name(NAME, 0, "train") + f"-a{attempt}"
        names.append(result.jobs[0].name)
        reasons = [e.reason for e in result.events]
        assert reasons == ["StageFailed", "StageStarted"]
    record = result.status["rounds"][0]["stages"]["train"]
    assert (record["attempt"], record["restarts"]) == (3, 2)
    assert [h["job"] for h in record["history"]] == names[:2]
    observed[result.jobs[0].name] = failed(result.jobs[0])
    final = step(spec, result.status, observed)  # backoffLimit 2 restarts spent
    assert final.status["phase"] == "Failed" and final.jobs == ()
    assert final.status["message"].startswith("round 1/2 stage train failed")


@pytest.mark.parametrize("spec, codes", [
    (make_spec(**MULTI), (2, 143)),  # bad input: no restart can help
    (make_spec(), (1,)),  # one node: the Job retried its pod itself (backoffLimit)
], ids=["exit-code-2", "single-node"])
def test_no_restart_for_bad_input_or_a_single_node_train(spec, codes):
    at_train, observed = to_stage(spec, "train")
    observed[at_train.jobs[0].name] = failed(at_train.jobs[0], codes=codes)
    result = step(spec, at_train.status, observed)
    assert result.status["phase"] == "Failed" and result.jobs == ()


def test_attempt_jobs_are_distinct_dns_labels_within_the_name_limit():
    long = "r" * 60
    names = [attempt_job(long, 0, "train", n) for n in (1, 2, 10)]
    assert names[0] == job_name(long, 0, "train") and len(set(names)) == 3
    assert all(len(n) <= MAX_NAME and n.endswith(s) for n, s in zip(names[1:], ("-a2", "-a10")))
    assert attempt_job(long, 0, "train", 2) != attempt_job(long, 0, "merge", 2)


@pytest.mark.parametrize("waiting, reason", [
    (("Unschedulable", "pod p: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."), "Unschedulable"),
    (("ImagePullBackOff", 'pod p: Back-off pulling image "x:1"'), "ImagePullBackOff"),
    (("ErrImagePull", "pod p: not found"), "ErrImagePull"),
    (("CreateContainerConfigError", 'pod p: secret "hf" not found'), "CreateContainerConfigError"),
])
def test_why_a_stage_waits_is_in_its_record_the_message_a_condition_and_the_column(waiting, reason):
    first = step(make_spec(), None)
    job = first.jobs[0]
    seen = {job.name: JobObservation(job.name, 0, "synthesize", "Active", waiting=waiting)}
    result = step(make_spec(), first.status, seen)
    assert result.status["rounds"][0]["stages"]["synthesize"]["waiting"] == {"reason": reason, "message": waiting[1]}
    assert result.status["waiting"] == reason
    assert result.status["message"] == f"round 1/2 stage synthesize: waiting: {reason}: {waiting[1]}"
    assert (cond(result.status, c.PROGRESSING)["status"], cond(result.status, c.PROGRESSING)["reason"]) == \
        ("True", reason)
    assert [e.reason for e in result.events if e.type == "Warning"] == ["StageWaiting"]
    running = {job.name: JobObservation(job.name, 0, "synthesize", "Active")}
    cleared = step(make_spec(), result.status, running)
    assert "waiting" not in cleared.status and "waiting" not in cleared.status["rounds"][0]["stages"]["synthesize"]
    assert cond(cleared.status, c.PROGRESSING)["reason"] == c.STAGE_RUNNING


def test_containers_still_creating_count_as_a_mount_wait_only_after_mount_wait():
    first = step(make_spec(), None)
    job = first.jobs[0]
    creating = {job.name: JobObservation(job.name, 0, "synthesize", "Active", waiting=("ContainerCreating", "pod p"),
                                         waiting_since=stamp(0))}
    early = step(make_spec(), first.status, creating, T0 + timedelta(seconds=23))
    assert "waiting" not in early.status and early.recheck == MOUNT_WAIT - 23  # a pass is due then
    late = step(make_spec(), early.status, creating, T0 + timedelta(seconds=200))
    assert late.status["waiting"] == "ContainerCreating" and late.recheck is None
    assert late.status["rounds"][0]["stages"]["synthesize"]["waiting"]["message"] == "pod p; scheduled 200 s ago"


def test_a_queued_job_keeps_its_queue_time_apart_from_its_running_time():
    kueue = make_spec(queueName="team-a")  # Kueue holds the Jobs that name a LocalQueue
    first = step(kueue, None)
    job = first.jobs[0]
    queued = {job.name: JobObservation(job.name, 0, "synthesize", "Queued", suspended_at=stamp(0),
                                       message=f"Job {job.name} is suspended until admitted (Kueue)")}
    waiting = step(kueue, first.status, queued, T0 + timedelta(seconds=5))
    record = waiting.status["rounds"][0]["stages"]["synthesize"]
    assert (record["phase"], record["waiting"]["reason"], waiting.status["waiting"]) == ("Queued", "Queued", "Queued")
    assert waiting.status["phase"] == "Running" and cond(waiting.status, c.PROGRESSING)["reason"] == c.QUEUED
    assert waiting.jobs[0].suspend is None  # Kueue's to admit: the operator leaves the Job alone
    assert [e.reason for e in waiting.events] == ["StageQueued"]

    admitted = {job.name: JobObservation(job.name, 0, "synthesize", "Active", start_time=stamp(600))}
    running = step(kueue, waiting.status, admitted, T0 + timedelta(seconds=601))
    preempted = {job.name: JobObservation(job.name, 0, "synthesize", "Queued", start_time=stamp(600),
                                          suspended_at=stamp(700))}
    requeued = step(kueue, running.status, preempted, T0 + timedelta(seconds=701))
    readmitted = {job.name: JobObservation(job.name, 0, "synthesize", "Active", start_time=stamp(1000))}
    again = step(kueue, requeued.status, readmitted, T0 + timedelta(seconds=1001))
    finished = {job.name: JobObservation(job.name, 0, "synthesize", "Succeeded", result={}, start_time=stamp(1000),
                                         completion_time=stamp(1050))}
    record = step(kueue, again.status, finished, T0 + timedelta(seconds=1051)).status["rounds"][0]["stages"][
        "synthesize"]
    assert (record["queuedSeconds"], record["runningSeconds"]) == (600 + 300, 100 + 50)
    assert "since" not in record and "waiting" not in record and record["startTime"] == stamp(600)


def test_status_counts_rounds_from_one_for_people_and_keeps_the_index():
    result = step(make_spec(rounds=3), None)
    assert (result.status["round"], result.status["roundOf"]) == (0, "1/3")
    assert result.status["message"] == "round 1/3 stage synthesize: running"


def test_retry_may_only_grow_as_the_api_server_checks_it():
    from selfalign.operator import validate
    from tests.invalid_specs import valid_base, variant

    assert validate.check_transition(variant({"retry": 1}), variant({"retry": 2})) == []
    assert validate.check_transition(valid_base(), variant({"retry": 1})) == []
    errors = validate.check_transition(variant({"retry": 2}), variant({"retry": 1}))
    assert [e.split(": ", 1)[0] for e in errors] == ["spec.retry"]


def test_every_status_of_these_scenarios_fits_the_crds_status_schema_and_rules():
    """Attempts, history, waiting and the time sums are in the CRD's status schema (a field it
    lacked would be pruned by the API server, a bound it breaks refused)."""
    from selfalign.operator import validate
    from tests.test_crd import STATUS_VALIDATOR

    spec = make_spec(backoffLimit=1, **MULTI)
    at_train, observed = to_stage(spec, "train")
    job = at_train.jobs[0]
    statuses = [at_train.status]
    for seen in (JobObservation(job.name, 0, "train", "Queued", suspended_at=stamp(0), message="queued"),
                 JobObservation(job.name, 0, "train", "Active", start_time=stamp(60),
                                waiting=("Unschedulable", "pod p: 0/2 nodes")),
                 failed(job)):
        statuses.append(step(spec, statuses[-1], {**observed, job.name: seen}).status)
    second = statuses[-1]["rounds"][0]["stages"]["train"]["job"]
    lost = JobObservation(second, 0, "train", "Failed", message="rank 0: node lost", exit_codes=(137,))
    statuses.append(step(spec, statuses[-1], {**observed, second: lost}).status)  # restarts spent: Failed
    statuses.append(step(make_spec(backoffLimit=1, retry=1, **MULTI), statuses[-1], observed, generation=2).status)
    assert statuses[-1]["rounds"][0]["stages"]["train"]["attempt"] == 3
    for status in statuses:
        assert list(STATUS_VALIDATOR.iter_errors(status)) == []
    for old, new in zip(statuses, statuses[1:]):
        assert validate.check_status_transition(old, new) == []
