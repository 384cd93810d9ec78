"""The operator end to end under what a real API server does and the emulator now models: CRD
defaulting, garbage collection that lags, status the API rejects, and injected faults (issue 13).
"""
from __future__ import annotations

import json
from collections import Counter

import kmock
import pytest

from selfalign.operator import reconciler
from selfalign.operator.naming import job_name
from tests.fixtures.faults import requests
from tests.fixtures.kube import NS, RUNS, api, sent_by_operator, wait_for
from tests.test_operator import condition, expected_jobs, run_spec


async def test_a_run_created_again_under_its_name_starts_afresh(cluster, monkeypatch):
    """Deleting a run and creating it again (the only way to change model.base or seeds) runs
    every stage again under the new run's uid, while the old Jobs and ConfigMap still exist
    until the garbage collector gets to them: nothing of the old run is adopted or reused."""
    monkeypatch.setattr(reconciler, "REFUSAL_BACKOFF", 0.2)
    cluster.emulator.gc_delay = 1.0
    await cluster.create_run("again", run_spec(rounds=1))
    assert (await cluster.wait_phase("again", "Succeeded", "Failed"))["phase"] == "Succeeded"
    await api(cluster.emulator, "DELETE", f"{RUNS}/again")
    second = await cluster.create_run("again", run_spec(rounds=1))
    uid = second["metadata"]["uid"]
    await wait_for(lambda: cluster.status("again").get("phase") in ("Succeeded", "Failed"), 60, what="second run")
    status = cluster.status("again")
    assert status["phase"] == "Succeeded", status.get("message")
    assert Counter(cluster.kubelet.started) == {job: 2 for job in expected_jobs("again", 1)}  # every stage ran again
    jobs = cluster.jobs("again")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(expected_jobs("again", 1))
    assert {j["metadata"]["ownerReferences"][0]["uid"] for j in jobs} == {uid}
    spec_map = cluster.emulator.get_object("v1/configmaps", NS, "again-spec")
    assert spec_map["metadata"]["ownerReferences"][0]["uid"] == uid
    assert status["model"] == f"file:///data/runs/{NS}/again/{uid}/models/round-1"  # its own outputs


async def test_chart_stage_defaults_reach_the_jobs_of_a_run_the_api_server_defaulted(cluster, monkeypatch):
    monkeypatch.setenv("SELFALIGN_STAGE_RESOURCES", json.dumps({"train": {"gpus": 1}, "merge": {"gpus": 1}}))
    await cluster.operator.restart()
    await cluster.create_run("gpus", run_spec(rounds=1, resources={"merge": {"gpus": 2}}))
    assert (await cluster.wait_phase("gpus", "Succeeded", "Failed"))["phase"] == "Succeeded"
    assert cluster.run("gpus")["spec"]["resources"]["train"]["gpus"] == 0  # as the API server stored it
    limits = {j["metadata"]["name"]: j["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
              for j in cluster.jobs("gpus")}
    assert limits[job_name("gpus", 0, "train")]["nvidia.com/gpu"] == 1
    assert limits[job_name("gpus", 0, "merge")]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in limits[job_name("gpus", 0, "assess")]


async def test_a_status_the_api_rejects_fails_the_run_with_the_apis_message(cluster):
    def admission(request: kmock.Request) -> None:  # e.g. a CRD upgrade that tightened a bound
        if request.subresource == "status" and "kept" in (request.data.get("status") or {}):
            raise kmock.KubernetesError(status=422, reason="Invalid", message='SelfAlignRun.selfalign.dev "rej" is '
                                        "invalid: status.kept: Invalid value: 7: must be less than or equal to 5")

    cluster.emulator.admission = admission
    await cluster.create_run("rej", run_spec(rounds=1))
    status = await cluster.wait_phase("rej", "Failed", "Succeeded")
    assert status["phase"] == "Failed"
    assert "status.kept: Invalid value: 7: must be less than or equal to 5" in status["message"]
    assert condition(status, "Failed")["reason"] == "StatusRejected"
    assert [j["metadata"]["name"] for j in cluster.jobs("rej")] == expected_jobs("rej", 1)[:2]  # nothing after it
    await wait_for(lambda: "RunFailed" in [e["reason"] for e in cluster.events("rej")], what="RunFailed")


async def test_faults_on_the_operators_requests_are_retried_until_the_run_succeeds(cluster, monkeypatch):
    """5xx before and after the write, hung requests, 409s and dropped watches: kopf does not
    retry event handlers and resumed watches deliver nothing again, so each failed pass is the
    reconciler's own retry. Every Job is still created exactly once."""
    monkeypatch.setattr(reconciler, "RETRY_BASE", 0.05)
    faults = cluster.emulator.faults
    faults.add("error", requests("PATCH", r"/status$", by=sent_by_operator), rate=0.3)
    faults.add("lost", requests("POST", r"/jobs$", by=sent_by_operator), rate=0.5)
    faults.add("hang", requests("POST", r"/configmaps$", by=sent_by_operator), limit=1, seconds=0.2)
    faults.add("conflict", requests("PATCH", r"/status$", by=sent_by_operator), rate=0.1)
    faults.add("drop", requests(action=kmock.action.WATCH, by=sent_by_operator), rate=0.5, after_events=3)
    await cluster.create_run("shaky", run_spec(rounds=2))
    status = await cluster.wait_phase("shaky", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded", status.get("message")
    assert Counter(cluster.kubelet.started) == {job: 1 for job in expected_jobs("shaky", 2)}
    assert {"error", "lost", "hang", "drop"} <= set(faults.injected)


async def test_dropped_watches_resume_without_relisting_and_children_are_filtered_server_side(cluster):
    """kopf resumes a dropped watch from its last resourceVersion (nothing is listed again, so
    nothing is delivered again), and asks for the operator's Jobs and Pods only."""
    cluster.emulator.faults.add("drop", requests(action=kmock.action.WATCH, by=sent_by_operator), limit=6,
                                after_events=2)
    await cluster.create_run("resumed", run_spec(rounds=1))
    assert (await cluster.wait_phase("resumed", "Succeeded", "Failed"))["phase"] == "Succeeded"
    assert cluster.emulator.faults.injected["drop"] == 6
    sent = [r for r in cluster.operator_requests() if r.resource is not None and r.resource.plural in ("jobs", "pods")]
    lists = [r for r in sent if r.action == kmock.action.LIST]
    watches = [r for r in sent if r.action == kmock.action.WATCH]
    assert sorted(r.resource.plural for r in lists) == ["jobs", "pods"]  # once each, at start
    assert len(watches) > 2 and all(r.params.get("resourceVersion") for r in watches)
    assert {r.resource.plural: r.params.get("labelSelector") for r in lists + watches} == {
        "jobs": "selfalign.dev/run", "pods": "selfalign.dev/run,batch.kubernetes.io/job-name"}


async def test_children_orphaned_by_the_deleted_run_are_never_adopted(cluster, monkeypatch):
    """`kubectl delete --cascade=orphan` leaves the old ConfigMap and Jobs without an owner: the
    new run of the same name says which object blocks it, and goes on once a person deletes them."""
    monkeypatch.setattr(reconciler, "REFUSAL_BACKOFF", 0.2)
    await cluster.create_run("orph", run_spec(rounds=1))
    assert (await cluster.wait_phase("orph", "Succeeded", "Failed"))["phase"] == "Succeeded"
    await api(cluster.emulator, "DELETE", f"{RUNS}/orph", {"propagationPolicy": "Orphan"})
    await cluster.create_run("orph", run_spec(rounds=1))
    synth = job_name("orph", 0, "synthesize")

    def blocked() -> bool:
        record = ((cluster.status("orph").get("rounds") or [{}])[0].get("stages") or {}).get("synthesize") or {}
        return "ConfigMap orph-spec exists but belongs to another run (owner uid none)" in record.get("message", "")

    await wait_for(blocked, what="the orphaned ConfigMap named in status")
    assert cluster.status("orph")["phase"] == "Running" and Counter(cluster.kubelet.started)[synth] == 1
    await api(cluster.emulator, "DELETE", f"/api/v1/namespaces/{NS}/configmaps/orph-spec")
    await wait_for(lambda: f"Job {synth} exists" in cluster.status("orph")["message"], what="the orphaned Job named")
    for job in expected_jobs("orph", 1):
        await api(cluster.emulator, "DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{job}")
    await wait_for(lambda: cluster.status("orph").get("phase") == "Succeeded", 60, what="the new run")
    assert Counter(cluster.kubelet.started) == {job: 2 for job in expected_jobs("orph", 1)}
