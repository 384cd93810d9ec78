"""A stage that runs past its deadline (issue 14 item 2): the Job built with
`spec.resources.<stage>.activeDeadlineSeconds`, failed by the Job controller with reason
DeadlineExceeded, fails its stage with that reason in status, not only a killed pod's log tail."""
from __future__ import annotations

from datetime import datetime, timezone

from selfalign.operator import jobs
from selfalign.operator.observe import observe_job
from selfalign.operator.planner import plan
from selfalign.operator.settings import OperatorSettings
from selfalign.operator.spec import STAGES, parse_spec
from tests.invalid_specs import variant

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(images={s: f"registry.test/{s}:1" for s in STAGES})


def deadline_exceeded(job: dict) -> tuple[dict, list[dict]]:
    """The Job and its Pod as the Job controller and kubelet leave them when the deadline passes:
    FailureTarget then Failed, reason DeadlineExceeded; the Pod killed by SIGTERM, its termination
    message the log's tail (FallbackToLogsOnError)."""
    condition = {"status": "True", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline",
                 "lastTransitionTime": "2026-12-02T12:00:30Z"}
    job = {**job, "status": {"failed": 1, "startTime": "2026-12-02T12:00:00Z", "conditions": [
        {"type": "FailureTarget", **condition}, {"type": "Failed", **condition}]}}
    pod = {"metadata": {"name": f"{job['metadata']['name']}-x", "labels": job["spec"]["template"]["metadata"]["labels"]},
           "status": {"phase": "Failed", "containerStatuses": [{"name": "stage", "state": {"terminated": {
               "exitCode": 143, "reason": "Error", "message": "synthesize: 812/10000 prompts [12:04<2:36:10]"}}}]}}
    return job, [pod]


def test_a_stage_past_its_deadline_fails_with_reason_deadline_exceeded():
    spec = parse_spec(variant({"resources": {"synthesize": {"activeDeadlineSeconds": 30}}}))
    first = plan(spec, None, {}, T0, namespace="team-a", name="run-a", generation=1, uid="u")
    [ensure] = first.jobs
    job = jobs.build_stage_objects(spec, ensure, namespace="team-a", run_name="run-a",
                                   owner=jobs.owner_reference({"apiVersion": "selfalign.dev/v1alpha1",
                                                               "kind": "SelfAlignRun", "metadata": {
                                                                   "name": "run-a", "uid": "u"}}),
                                   settings=SETTINGS)[0]
    assert job["spec"]["activeDeadlineSeconds"] == 30
    seen = observe_job(*deadline_exceeded(job))
    assert (seen.phase, seen.reason) == ("Failed", "DeadlineExceeded")
    status = plan(spec, first.status, {ensure.name: seen}, T0, namespace="team-a", name="run-a",
                  generation=1, uid="u").status
    record = status["rounds"][0]["stages"]["synthesize"]
    assert record["phase"] == "Failed" and record["reason"] == "DeadlineExceeded"
    assert status["phase"] == "Failed"
