"""What Flux (kstatus) computes for a run, from statuses the planner really writes.

`kstatus` below is the generic rule of sigs.k8s.io/cli-utils pkg/kstatus/status (generic.go
`checkGenericProperties`, `checkGeneration`; status.go: a kind without its own rule and without
either condition True is Current): it is what Flux's kustomize-controller and helm-controller wait
on for a custom resource.
"""
from __future__ import annotations

from datetime import timedelta

from selfalign.operator import conditions as c
from selfalign.operator.planner import JobObservation

from .test_planner import NAME, T0, cond, make_spec, run_to_end, step


def kstatus(run: dict) -> str:
    meta, status = run["metadata"], run.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if "observedGeneration" in status and status["observedGeneration"] != meta.get("generation"):
        return "InProgress"
    for condition in status.get("conditions") or ():
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    return "Current"


def as_run(status: dict, generation: int = 1) -> dict:
    return {"metadata": {"name": NAME, "generation": generation}, "status": status}


def test_a_running_run_is_in_progress():
    status = step(make_spec(), None).status
    assert kstatus(as_run(status)) == "InProgress"
    assert cond(status, c.RECONCILING)["reason"] == c.STAGE_RUNNING


def test_a_succeeded_run_is_current_and_ready():
    final, _ = run_to_end(make_spec())
    assert kstatus(as_run(final.status)) == "Current"
    assert cond(final.status, c.READY)["status"] == "True"
    assert cond(final.status, c.STALLED)["status"] == "False"


def test_a_failed_run_is_stalled_so_flux_reports_it_failed():
    started = step(make_spec(), None)
    (job,) = started.jobs
    failed = step(make_spec(), started.status,
                  {job.name: JobObservation(job.name, 0, "synthesize", "Failed", message="exit code 2")},
                  T0 + timedelta(minutes=1))
    assert failed.status["phase"] == "Failed" and kstatus(as_run(failed.status)) == "Failed"
    assert (cond(failed.status, c.STALLED)["status"], cond(failed.status, c.STALLED)["reason"]) == \
        ("True", c.STAGE_FAILED)
    assert cond(failed.status, c.RECONCILING)["status"] == "False"


def test_a_retry_of_a_failed_run_reconciles_again_with_the_new_generation():
    started = step(make_spec(), None)
    (job,) = started.jobs
    failed = step(make_spec(), started.status,
                  {job.name: JobObservation(job.name, 0, "synthesize", "Failed", message="OOMKilled")})
    # The user raises spec.retry (generation 2): until the operator acts, kstatus waits on it.
    assert kstatus(as_run(failed.status, generation=2)) == "InProgress"
    retried = step(make_spec(retry=1), failed.status, generation=2)
    assert retried.status["observedGeneration"] == 2
    assert kstatus(as_run(retried.status, generation=2)) == "InProgress"
    assert cond(retried.status, c.STALLED) == {**cond(retried.status, c.STALLED), "status": "False",
                                                "observedGeneration": 2}


def test_an_invalid_spec_is_stalled():
    from selfalign.operator.spec import SpecError
    status = step(SpecError("rounds: must be >= 1"), None).status
    assert kstatus(as_run(status)) == "Failed"
    assert cond(status, c.STALLED)["reason"] == c.INVALID_SPEC


def test_a_suspended_run_is_neither_reconciling_nor_stalled():
    status = step(make_spec(suspend=True), None).status
    assert status["phase"] == "Suspended" and kstatus(as_run(status)) == "Current"
