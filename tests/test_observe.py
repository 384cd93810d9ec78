"""observe.py: a Job and its Pods -> the planner's JobObservation (pure table tests)."""
import json

import pytest

from selfalign.operator.naming import LABEL_ROUND, LABEL_STAGE
from selfalign.operator.observe import observe_job, observe_jobs
from selfalign.operator.planner import JobObservation

T0, T1, T2 = "2030-01-01T00:00:00Z", "2030-01-01T00:01:00Z", "2030-01-01T00:02:00Z"


def job(name="r-r0-assess", round_="0", stage="assess", conditions=(), failed=0, **status):
    labels = {LABEL_ROUND: round_, LABEL_STAGE: stage} if round_ is not None else {}
    return {"metadata": {"name": name, "labels": labels},
            "status": {"startTime": T0, "failed": failed, **status,
                       "conditions": [{"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": T2}
                                      for t, s, r, m in conditions]}}


def pod(name, phase, message=None, exit_code=None, created=T0, index=None):
    state = {"running": {}} if exit_code is None else {"terminated": {"exitCode": exit_code, "message": message}}
    annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
    return {"metadata": {"name": name, "creationTimestamp": created, "annotations": annotations},
            "status": {"phase": phase, "containerStatuses": [{"name": "stage", "state": state}]}}


COMPLETE = [("SuccessCriteriaMet", "True", "CompletionsReached", ""), ("Complete", "True", "CompletionsReached", "")]
FAILED = [("FailureTarget", "True", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
          ("Failed", "True", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]
LOG_TAIL = "loading model\nscoring 10 items\nerror: assess round 0: spec.assess.threshold too high\n"


@pytest.mark.parametrize("the_job, pods, expected", [
    # Running: no conditions; attempts come from status.failed.
    (job(active=1), [pod("p0", "Running")],
     JobObservation("r-r0-assess", 0, "assess", "Active", 0, None, None, T0, None)),
    (job(active=1, failed=1), [pod("p0", "Failed", '{"error": "boom"}', 1), pod("p1", "Running", created=T1)],
     JobObservation("r-r0-assess", 0, "assess", "Active", 1, None, None, T0, None, exit_codes=(1,))),
    # Succeeded: the JSON summary of the succeeded Pod is the result.
    (job(conditions=COMPLETE, succeeded=1, completionTime=T1), [pod("p0", "Succeeded", '{"kept": 7}', 0)],
     JobObservation("r-r0-assess", 0, "assess", "Succeeded", 0, {"kept": 7}, None, T0, T1)),
    # A retried success reads the Pod that succeeded, not the failed one.
    (job(conditions=COMPLETE, succeeded=1, failed=1, completionTime=T2),
     [pod("p0", "Failed", '{"error": "oom"}', 137), pod("p1", "Succeeded", '{"kept": 3}', 0, created=T1)],
     JobObservation("r-r0-assess", 0, "assess", "Succeeded", 1, {"kept": 3}, None, T0, T2, exit_codes=(137,))),
    # SuccessCriteriaMet alone already decides the Job (Kubernetes >= 1.31 writes it first).
    (job(conditions=COMPLETE[:1], succeeded=1), [pod("p0", "Succeeded", '{"coverage": 0.42}', 0)],
     JobObservation("r-r0-assess", 0, "assess", "Succeeded", 0, {"coverage": 0.42}, None, T0, T2)),
    # Complete, but the Pod's termination is not visible yet: wait for the Pod's event.
    (job(conditions=COMPLETE, succeeded=1, completionTime=T1), [pod("p0", "Running")],
     JobObservation("r-r0-assess", 0, "assess", "Active", 0, None, None, T0, None)),
    # Complete and the Pods are gone: succeeded, without a result.
    (job(conditions=COMPLETE, succeeded=1, completionTime=T1), [],
     JobObservation("r-r0-assess", 0, "assess", "Succeeded", 0, None, None, T0, T1)),
    # Failed: the cause is the `error` of the newest failed Pod's JSON result.
    (job(conditions=FAILED, failed=3),
     [pod("p0", "Failed", '{"error": "first"}', 1), pod("p2", "Failed", '{"error": "assess round 0: no items kept"}',
                                                          1, created=T2), pod("p1", "Failed", '{"error": "x"}', 1, created=T1)],
     JobObservation("r-r0-assess", 0, "assess", "Failed", 3, {"error": "assess round 0: no items kept"},
                    "assess round 0: no items kept", T0, T2, "BackoffLimitExceeded", (1,))),
    # FallbackToLogsOnError: plain log text; the cause is its last line.
    (job(conditions=FAILED, failed=1), [pod("p0", "Failed", LOG_TAIL, 2)],
     JobObservation("r-r0-assess", 0, "assess", "Failed", 1, None,
                    "error: assess round 0: spec.assess.threshold too high", T0, T2, "BackoffLimitExceeded", (2,))),
    # No termination message at all (e.g. OOMKilled): the Job condition's reason and message.
    (job(conditions=FAILED, failed=2), [pod("p0", "Failed", None, 137), pod("p1", "Failed", "", 137, created=T1)],
     JobObservation("r-r0-assess", 0, "assess", "Failed", 2, None,
                    "BackoffLimitExceeded: Job has reached the specified backoff limit", T0, T2,
                    "BackoffLimitExceeded", (137,))),
    # Indexed Job (multi-node train): rank 0 writes the result.
    (job("r-r1-train", "1", "train", conditions=COMPLETE, succeeded=2, completionTime=T1),
     [pod("t1", "Succeeded", '{"loss": 9}', 0, created=T1, index=1), pod("t0", "Succeeded", '{"loss": 0.5}', 0, index=0)],
     JobObservation("r-r1-train", 1, "train", "Succeeded", 0, {"loss": 0.5}, None, T0, T1)),
    # A condition that is not True does not count.
    (job(conditions=[("Failed", "False", "", "")]), [pod("p0", "Running")],
     JobObservation("r-r0-assess", 0, "assess", "Active", 0, None, None, T0, None)),
])
def test_observe_job(the_job, pods, expected):
    assert observe_job(the_job, pods) == expected


@pytest.mark.parametrize("labels", [{}, {LABEL_ROUND: "x", LABEL_STAGE: "assess"}, {LABEL_ROUND: "0", LABEL_STAGE: "bake"}])
def test_jobs_without_a_valid_round_and_stage_are_not_observed(labels):
    foreign = {"metadata": {"name": "other", "labels": labels}, "status": {}}
    assert observe_job(foreign, []) is None


def test_observe_jobs_pairs_each_job_with_its_pods():
    a = job("r-r0-synth", "0", "synthesize", conditions=COMPLETE, succeeded=1, completionTime=T1)
    b = job("r-r0-assess", "0", "assess", active=1)
    foreign = {"metadata": {"name": "x", "labels": {}}, "status": {}}
    pods = {"r-r0-synth": [pod("s0", "Succeeded", json.dumps({"generated": 12}), 0)],
            "r-r0-assess": [pod("a0", "Running")]}
    observed = observe_jobs([a, b, foreign], pods)
    assert set(observed) == {"r-r0-synth", "r-r0-assess"}
    assert observed["r-r0-synth"].result == {"generated": 12}
    assert observed["r-r0-assess"].phase == "Active"


def waiting_pod(name, *, conditions=(), waiting=None):
    statuses = [{"name": "stage", "state": {"waiting": waiting}}] if waiting else []
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "conditions": list(conditions),
                                                   "containerStatuses": statuses}}


UNSCHEDULABLE = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}
SCHEDULED = {"type": "PodScheduled", "status": "True", "lastTransitionTime": T1}


@pytest.mark.parametrize("pods, waiting, since", [
    ([waiting_pod("p", conditions=[UNSCHEDULABLE])],
     ("Unschedulable", "pod p: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."), None),
    ([waiting_pod("p", conditions=[SCHEDULED], waiting={"reason": "ImagePullBackOff",
                                                        "message": 'Back-off pulling image "x:1"'})],
     ("ImagePullBackOff", 'pod p: Back-off pulling image "x:1"'), None),
    ([waiting_pod("p", conditions=[SCHEDULED], waiting={"reason": "CreateContainerConfigError",
                                                        "message": 'secret "hf-token" not found'})],
     ("CreateContainerConfigError", 'pod p: secret "hf-token" not found'), None),
    ([waiting_pod("p", conditions=[SCHEDULED], waiting={"reason": "ContainerCreating"})],
     ("ContainerCreating", "pod p: its containers are still being created (a volume not mounted yet? "
                           "kubectl describe pod p shows FailedMount events)"), T1),
    ([pod("p0", "Failed", "x", 1), pod("p1", "Running")], None, None),  # a failed pod ended; the new one runs
], ids=["unschedulable", "image-pull", "config", "creating", "running"])
def test_an_active_jobs_pods_say_why_it_waits(pods, waiting, since):
    seen = observe_job(job(active=1), pods)
    assert (seen.phase, seen.waiting, seen.waiting_since) == ("Active", waiting, since)


def test_a_suspended_job_is_queued_unless_the_run_suspended_it():
    suspended = [("Suspended", "True", "JobSuspended", "Job suspended")]
    kueue = {**job(conditions=suspended), "spec": {"suspend": True}}
    seen = observe_job(kueue, [])
    assert (seen.phase, seen.suspended_at, seen.message) == ("Queued", T2, "Job r-r0-assess is suspended until "
                                                                             "admitted (Kueue)")
    ours = {**kueue, "metadata": {**kueue["metadata"], "annotations": {"selfalign.dev/suspended-by": "run"}}}
    assert observe_job(ours, []).phase == "Suspended"
    resumed = {**kueue, "spec": {"suspend": False}}  # unsuspended, the Job controller not caught up yet
    assert observe_job(resumed, []).phase == "Active"
