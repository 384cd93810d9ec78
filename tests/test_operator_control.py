"""Run control through the operator (kopf against the emulator and the test kubelet, issue 14):
stopping a running stage, retrying a failed run, and saying why a stage waits."""
from __future__ import annotations

import asyncio

import kmock
import pytest

from selfalign.operator.jobs import TORCHRUN
from selfalign.operator.naming import job_name
from selfalign.operator.planner import attempt_job
from tests.fixtures.kube import FAKE_IMAGE, NS, api, wait_for
from tests.test_operator import condition, expected_jobs, metric, printer_columns, run_spec

JOBS = "/apis/batch/v1/namespaces/" + NS + "/jobs"
UNSCHEDULABLE = ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: "
                 "3 No preemption victims found for incoming pod.")


def stage(cluster, run: str, name: str, round_: int = 0) -> dict:
    return ((cluster.status(run).get("rounds") or [{}] * (round_ + 1))[round_].get("stages") or {}).get(name) or {}


def job(cluster, name: str) -> dict:
    return cluster.emulator.get_object("batch/v1/jobs", NS, name) or {}


def job_suspended(cluster, name: str) -> bool:
    conditions = (job(cluster, name).get("status") or {}).get("conditions") or ()
    return any(c["type"] == "Suspended" and c["status"] == "True" for c in conditions)


async def test_suspend_suspends_the_running_job_and_resume_continues_the_same_one(cluster):
    cluster.kubelet.held.add("train")
    await cluster.create_run("stop", run_spec(rounds=1))
    train = job_name("stop", 0, "train")
    await wait_for(lambda: train in cluster.kubelet.waiting, what="train pod waiting")
    pods = list(cluster.kubelet.pods[train])

    await cluster.patch_spec("stop", {"suspend": True})
    await wait_for(lambda: stage(cluster, "stop", "train").get("phase") == "Suspended", what="train suspended")
    assert job(cluster, train)["spec"]["suspend"] is True  # the Job itself, so its pods are released
    await wait_for(lambda: job_suspended(cluster, train), what="the Job controller to suspend the Job")
    assert all(cluster.emulator.get_object("v1/pods", NS, pod) is None for pod in pods)
    status = cluster.status("stop")
    assert status["phase"] == "Suspended" and condition(status, "Suspended")["status"] == "True"
    assert status["message"] == (f"suspended: round 1/1 stage train: its Job {train} is suspended, its pods "
                                 "released; resuming continues it")

    await cluster.patch_spec("stop", {"suspend": False})
    await wait_for(lambda: len(cluster.kubelet.pods.get(train, ())) == 1, what="a new train pod")
    assert job(cluster, train)["spec"]["suspend"] is False
    assert "selfalign.dev/suspended-by" not in (job(cluster, train)["metadata"].get("annotations") or {})
    cluster.kubelet.held.clear()
    status = await cluster.wait_phase("stop", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert cluster.job_posts() == expected_jobs("stop", 1)  # the same train Job continued: none re-created
    record = status["rounds"][0]["stages"]["train"]
    assert (record["phase"], record["attempt"], record["job"]) == ("Succeeded", 1, train)
    await wait_for(lambda: "StageSuspended" in [e["reason"] for e in cluster.events("stop")], what="the event")


async def test_retry_reruns_the_failed_stage_with_a_new_job_and_keeps_finished_work(cluster):
    cluster.kubelet.env.update(FAKE_FAIL="assess", FAKE_FAIL_CODE="2")
    await cluster.create_run("again", run_spec(rounds=1))
    failed = await cluster.wait_phase("again", "Failed", "Succeeded")
    assert failed["phase"] == "Failed" and "round 1/1 stage assess failed" in failed["message"]

    cluster.kubelet.env.pop("FAKE_FAIL")  # the cause is fixed (say, the seeds), then:
    await cluster.patch_spec("again", {"retry": 1})
    status = await cluster.wait_phase("again", "Succeeded", timeout=60)
    assess = status["rounds"][0]["stages"]["assess"]
    second = attempt_job("again", 0, "assess", 2)
    assert second == job_name("again", 0, "assess") + "-a2"
    assert (assess["phase"], assess["attempt"], assess["job"], assess["retry"]) == ("Succeeded", 2, second, 1)
    [earlier] = assess["history"]
    assert (earlier["attempt"], earlier["job"], earlier["reason"]) == (1, job_name("again", 0, "assess"),
                                                                       "PodFailurePolicy")
    assert "fake failure" in earlier["message"] and earlier["startTime"] and earlier["completionTime"]
    synthesize = job_name("again", 0, "synthesize")
    assert cluster.kubelet.started.count(synthesize) == 1  # finished work is kept, not redone
    assert cluster.job_posts() == [*expected_jobs("again", 1)[:2], second, *expected_jobs("again", 1)[2:]]
    assert condition(status, "Failed")["status"] == "False"


async def test_an_unschedulable_pod_shows_on_the_run_and_clears_when_it_runs(cluster):
    cluster.kubelet.held.add("train")
    cluster.kubelet.held_status["train"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE,
         "lastTransitionTime": "2030-01-01T00:00:00Z"}]}
    await cluster.create_run("full", run_spec(rounds=1))
    await wait_for(lambda: cluster.status("full").get("waiting") == "Unschedulable", what="Unschedulable")
    status = cluster.status("full")
    train = job_name("full", 0, "train")
    assert status["message"].startswith(f"round 1/1 stage train: waiting: Unschedulable: pod {train}-")
    assert status["message"].endswith(UNSCHEDULABLE)
    assert condition(status, "Progressing")["reason"] == "Unschedulable"
    assert stage(cluster, "full", "train")["waiting"]["reason"] == "Unschedulable"
    shown = printer_columns(cluster.run("full"))
    assert (shown["Phase"], shown["Round"], shown["Stage"], shown["Waiting"]) == ("Running", "1/1", "train",
                                                                                  "Unschedulable")
    await wait_for(lambda: "StageWaiting" in [e["reason"] for e in cluster.events("full")], what="the event")

    cluster.kubelet.held.clear()  # a node frees up
    status = await cluster.wait_phase("full", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded" and "waiting" not in status
    assert "waiting" not in status["rounds"][0]["stages"]["train"]


async def test_a_pod_stuck_creating_its_containers_reads_as_a_mount_wait(cluster):
    cluster.kubelet.held.add("merge")
    cluster.kubelet.held_status["merge"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
        "containerStatuses": [{"name": "stage", "ready": False, "restartCount": 0, "image": "x",
                               "state": {"waiting": {"reason": "ContainerCreating"}}}]}
    await cluster.create_run("mount", run_spec(rounds=1))
    await wait_for(lambda: cluster.status("mount").get("waiting") == "ContainerCreating", what="the mount wait")
    assert "FailedMount" in cluster.status("mount")["message"]
    cluster.kubelet.held.clear()
    assert (await cluster.wait_phase("mount", "Succeeded", "Failed"))["phase"] == "Succeeded"


async def test_a_job_kueue_holds_is_queued_and_its_queue_time_is_kept_apart(cluster):
    queued_before = metric("selfalign_stage_queued_seconds_count", stage="train")

    def kueue_webhook(request):  # Kueue's Job webhook: a Job of one of its queues starts suspended
        if (request.action == kmock.action.CREATE and request.resource.plural == "jobs"
                and request.data["metadata"]["labels"].get("kueue.x-k8s.io/queue-name")
                and request.data["metadata"]["labels"].get("selfalign.dev/stage") == "train"):
            request.data["spec"]["suspend"] = True

    cluster.emulator.admission = kueue_webhook
    await cluster.create_run("kq", run_spec(rounds=1, queueName="gpu"))
    train = job_name("kq", 0, "train")
    await wait_for(lambda: stage(cluster, "kq", "train").get("phase") == "Queued", what="train queued")
    status = cluster.status("kq")
    assert status["phase"] == "Running" and status["waiting"] == "Queued"
    assert condition(status, "Progressing")["reason"] == "Queued"
    assert f"Job {train} is suspended until admitted" in status["message"]
    assert printer_columns(cluster.run("kq"))["Waiting"] == "Queued"
    await asyncio.sleep(1.1)  # timestamps have one-second resolution: let the queue time show
    assert job(cluster, train)["spec"]["suspend"] is True  # the operator leaves a Job Kueue holds alone

    await api(cluster.emulator, "PATCH", f"{JOBS}/{train}", {"spec": {"suspend": False}})  # Kueue admits it
    status = await cluster.wait_phase("kq", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    record = status["rounds"][0]["stages"]["train"]
    assert record["queuedSeconds"] >= 1 and "runningSeconds" in record and "waiting" not in record
    assert metric("selfalign_stage_queued_seconds_count", stage="train") == queued_before + 1


# torchrun's own arguments dropped, the rest run by the fake stage: each rank is one fake stage.
FAKE_TORCHRUN = "selfalign-test/fake-torchrun"


@pytest.mark.parametrize("exit_code, jobs", [(1, 2), (2, 1)], ids=["restarted-whole", "bad-input-fails-at-once"])
async def test_a_multi_node_train_that_fails_is_restarted_whole(cluster, exit_code, jobs):
    fake_stage = cluster.kubelet.images[FAKE_IMAGE][1]
    cluster.kubelet.images[FAKE_TORCHRUN] = (("python", "-c", TORCHRUN), (
        "sh", "-c", 'stage="$1"; while [ "$1" != -m ]; do shift; done; shift 2; exec "$0" "$stage" "$@"',
        *fake_stage))
    cluster.kubelet.env.update(FAKE_FAIL="train", FAKE_FAIL_CODE=str(exit_code))
    spec = run_spec(rounds=1, backoffLimit=1, train={"nodes": 2},
                    resources={"train": {"gpus": 1, "image": FAKE_TORCHRUN}})
    await cluster.create_run("multi", spec)
    status = await cluster.wait_phase("multi", "Failed", "Succeeded")
    assert status["phase"] == "Failed"
    names = [attempt_job("multi", 0, "train", n) for n in range(1, jobs + 1)]
    assert [j for j in cluster.job_posts() if "train" in j] == names  # each attempt a whole new Job
    assert sum(pod.startswith(names[0]) for pod in cluster.kubelet.logs) == 2 * jobs  # both ranks, each attempt
    record = status["rounds"][0]["stages"]["train"]
    assert (record["attempt"], record.get("restarts", 0), len(record.get("history", []))) == (jobs, jobs - 1, jobs - 1)
    assert "fake failure" in status["message"]
