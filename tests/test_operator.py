"""The kopf operator end to end: kmock emulator + test kubelet + the real handlers (issue 2, item 8).

The stage command is the fake stage (tests/fake_stage.py) behind the test image; the kubelet runs
it as a subprocess with the Job's env and volumes, so the Job manifests, the ConfigMap, the
termination messages and the Job conditions are the real ones.
"""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import kmock
import pytest
import yaml

from selfalign.operator import reconciler
from selfalign.operator.handlers import operator_options
from selfalign.operator.naming import PLURAL, job_name
from selfalign.operator.spec import STAGES, deep_merge
from tests.fixtures.kube import (NS, WRITES, KillSwitch, OperatorProcess, api, bearer_token, fake_stage_kubelet,
                                 running, wait_for)

CRD = Path(__file__).resolve().parents[1] / "crds" / "selfalignrun.yaml"
FAKE = {"synthesize": lambda r: {"generated": 12 + r, "instructions": 10 + r},
        "assess": lambda r: {"scored": 10 + r, "kept": 7 + r},
        "train": lambda r: {"loss": round(1.5 / (r + 1), 3), "steps": 4},
        "merge": lambda r: {"maxLogitDiff": 0.0001},
        "coverage": lambda r: {"coverage": round(0.42 + 0.1 * r, 2), "gaps": 3}}


def run_spec(rounds: int = 2, **overrides) -> dict:
    base = {"recipe": "isheep", "rounds": rounds, "model": {"base": "builtin://tiny-llama"},
            "seeds": "file:///data/seeds.jsonl", "storage": {"uri": "file:///data/runs"},
            "coverage": {"reference": "file:///data/reference.jsonl"}, "backoffLimit": 1}
    return deep_merge(base, overrides)


def expected_jobs(run: str, rounds: int) -> list[str]:
    return [job_name(run, k, stage) for k in range(rounds) for stage in STAGES]


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def printer_columns(run: dict) -> dict:
    """`kubectl get sar` as the CRD defines it: each column's jsonPath evaluated on the run."""
    crd = yaml.safe_load(CRD.read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    shown = {}
    for column in columns:
        value = run
        for part in column["jsonPath"].lstrip(".").split("."):
            value = (value or {}).get(part)
        shown[column["name"]] = value
    return shown


def metric(name: str, **labels) -> float:
    """A sample of the operator's metrics for the test namespace (every series carries it)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"namespace": NS, **labels}) or 0.0


async def test_two_round_run_succeeds_with_ten_jobs_in_order(cluster):
    succeeded_before = metric("selfalign_run_transitions_total", from_phase="Running", to_phase="Succeeded")
    gaps_before = metric("selfalign_job_gap_seconds_count")
    trains_before = metric("selfalign_stage_duration_seconds_count", stage="train")
    await cluster.create_run("two", run_spec(rounds=2))
    status = await cluster.wait_phase("two", "Succeeded", "Failed")

    expected = expected_jobs("two", 2)
    assert status["phase"] == "Succeeded", status.get("message")
    assert cluster.kubelet.started == expected  # each Job started after the previous one finished
    assert cluster.job_posts() == expected  # one POST per Job, in campaign order
    assert status["observedGeneration"] == 1
    for type_, value in {"Ready": "True", "Succeeded": "True", "Progressing": "False", "Failed": "False",
                         "Suspended": "False"}.items():
        assert condition(status, type_)["status"] == value, type_
        assert condition(status, type_)["observedGeneration"] == 1
    assert condition(status, "Succeeded")["reason"] == "RunSucceeded"
    for entry in status["rounds"]:
        k = entry["round"]
        for stage in STAGES:
            record = entry["stages"][stage]
            assert (record["phase"], record["attempts"], record["job"]) == ("Succeeded", 1, job_name("two", k, stage))
            assert record["metrics"] == FAKE[stage](k)
    assert printer_columns(cluster.run("two")) | {"Age": None} == {
        "Phase": "Succeeded", "Round": "2/2", "Stage": "coverage", "Waiting": None, "Kept": 8, "Coverage": 52.0,
        "Age": None, "Recipe": "isheep", "Message": status["message"]}
    assert cluster.run("two")["metadata"]["creationTimestamp"]
    # The operator's Prometheus metrics saw the same run: one transition to Succeeded, a gap for
    # each Job created after another finished, and both train stages timed.
    assert metric("selfalign_run_transitions_total", from_phase="Running", to_phase="Succeeded") == succeeded_before + 1
    assert metric("selfalign_job_gap_seconds_count") == gaps_before + 9
    assert metric("selfalign_stage_duration_seconds_count", stage="train") == trains_before + 2

    # Events follow the status write; the run's phase Event is the last of its pass.
    await wait_for(lambda: "RunSucceeded" in [e["reason"] for e in cluster.events("two")], what="RunSucceeded")
    reasons = [e["reason"] for e in cluster.events("two")]
    assert reasons.count("StageStarted") == 10 and reasons.count("StageSucceeded") == 10
    assert all(e["involvedObject"]["uid"] == cluster.run("two")["metadata"]["uid"] for e in cluster.events("two"))
    # The ConfigMap carries the resolved spec, owned by the run.
    config_map = cluster.emulator.get_object("v1/configmaps", NS, "two-spec")
    assert config_map["metadata"]["ownerReferences"][0]["name"] == "two"


async def test_operator_reads_through_its_watches_and_sends_only_writes(cluster):
    """A pass reads the run, its Jobs and Pods from kopf's indices: during a run the operator GETs
    no object, applies the run's ConfigMap once per spec version, and every status write lands
    (it never plans from a status older than its own last write)."""
    await cluster.create_run("lean", run_spec(rounds=1))
    assert (await cluster.wait_phase("lean", "Succeeded", "Failed"))["phase"] == "Succeeded"
    await cluster.patch_spec("lean", {"rounds": 2})  # a new spec version: the ConfigMap follows it
    await wait_for(lambda: (cluster.status("lean").get("round"), cluster.status("lean")["phase"]) == (1, "Succeeded"),
                   90, what="round 1 to succeed")

    sent = [r for r in cluster.operator_requests() if r.resource is not None]
    named_reads = [f"{r.resource.plural}/{r.name}" for r in sent if r.method == kmock.method.GET and r.name]
    assert named_reads == []
    config_map_writes = [str(r.method) for r in sent if r.resource.plural == "configmaps"]
    assert config_map_writes == ["method.POST", "method.PATCH"]
    spec = json.loads(cluster.emulator.get_object("v1/configmaps", NS, "lean-spec")["data"]["spec.json"])
    assert spec["rounds"] == 2
    status_writes = [r for r in sent if r.resource.plural == PLURAL and r.subresource == "status"]
    statuses = [v.get("status") for v in cluster.history("lean")]
    changes = sum(before != after for before, after in zip(statuses, statuses[1:]))
    # One write per transition: a stage Succeeded, with the next stage Running in the same write (the
    # pass that creates its Job records it Running; that Job's events change nothing); plus the
    # run's first write and its resumption.
    assert len(status_writes) == changes == 1 + 10 + 1


async def test_a_refused_job_create_shows_on_the_run_and_is_tried_again(cluster, monkeypatch):
    monkeypatch.setattr(reconciler, "REFUSAL_BACKOFF", 0.2)
    train = job_name("quota", 0, "train")
    quota = {"full": True}

    def admission(request):
        if (quota["full"] and request.action == kmock.action.CREATE and request.resource.plural == "jobs"
                and request.data["metadata"]["name"] == train):
            raise kmock.KubernetesError(status=403, reason="Forbidden",
                                        message=f'jobs "{train}" is forbidden: exceeded quota: jobs, used: 4, limited: 4')

    cluster.emulator.admission = admission
    await cluster.create_run("quota", run_spec(rounds=1))
    await wait_for(lambda: "refused" in cluster.status("quota").get("message", ""), what="the refusal in status")
    status = cluster.status("quota")
    record = status["rounds"][0]["stages"]["train"]
    assert record["phase"] == "Pending"
    assert record["message"] == (f'creating Job {train} was refused: 403 Forbidden: jobs "{train}" is forbidden: '
                                 "exceeded quota: jobs, used: 4, limited: 4")
    assert status["phase"] == "Running" and condition(status, "Progressing")["reason"] == "JobCreateRefused"
    assert [e["type"] for e in cluster.events("quota") if e["reason"] == "CreateFailed"] == ["Warning"]

    quota["full"] = False  # capacity frees up: the create is tried again, with nothing else happening
    status = await cluster.wait_phase("quota", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert "message" not in status["rounds"][0]["stages"]["train"]
    assert [j["metadata"]["name"] for j in cluster.jobs("quota")] == expected_jobs("quota", 1)


@pytest.mark.parametrize("exit_code, attempts", [(1, 2), (2, 1)], ids=["retried", "bad-input-fails-at-once"])
async def test_failing_stage_fails_the_run_after_retries(cluster, exit_code, attempts):
    cluster.kubelet.env.update(FAKE_FAIL="assess", FAKE_FAIL_CODE=str(exit_code))
    await cluster.create_run("bad", run_spec(rounds=2, backoffLimit=1))
    status = await cluster.wait_phase("bad", "Failed", "Succeeded")

    assert status["phase"] == "Failed"
    message = status["message"]
    assert "round 1/2 stage assess" in message
    assert "assess round 0: fake failure for the test" in message  # the stage's termination message
    assert condition(status, "Failed")["status"] == "True"
    assert condition(status, "Failed")["reason"] == "StageFailed"
    assert status["rounds"][0]["stages"]["assess"]["attempts"] == attempts
    assessed = [p for p in cluster.kubelet.logs if p.startswith(job_name("bad", 0, "assess"))]
    assert len(assessed) == attempts  # backoffLimit 1: one retry; exit code 2: podFailurePolicy FailJob
    assert [j["metadata"]["name"] for j in cluster.jobs("bad")] == expected_jobs("bad", 1)[:2]  # nothing after it
    await wait_for(lambda: "RunFailed" in [e["reason"] for e in cluster.events("bad")], what="RunFailed")
    warnings = [e for e in cluster.events("bad") if e["type"] == "Warning"]
    assert {e["reason"] for e in warnings} == {"StageFailed", "RunFailed"}


async def test_operator_killed_at_random_points_finishes_without_regression(cluster):
    switch = KillSwitch(cluster.operator, random.Random(20260607), kills=20, max_writes=3)
    cluster.emulator.after_write = switch.after_write
    restarts = asyncio.create_task(switch.serve())
    try:
        await cluster.create_run("kill", run_spec(rounds=2))
        status = await cluster.wait_phase("kill", "Succeeded", "Failed", timeout=150)
    finally:
        restarts.cancel()
    assert status["phase"] == "Succeeded", status.get("message")
    assert switch.kills == 20

    # Exactly one Job per (round, stage), each with exactly one successful Pod.
    assert sorted(j["metadata"]["name"] for j in cluster.jobs("kill")) == sorted(expected_jobs("kill", 2))
    pods = cluster.emulator.list_objects("v1/pods")
    for name in expected_jobs("kill", 2):
        succeeded = [p for p in pods if p["metadata"]["labels"]["batch.kubernetes.io/job-name"] == name
                     and p["status"]["phase"] == "Succeeded"]
        assert len(succeeded) == 1, name

    # No status regression across every version the run ever had.
    assert len(assert_no_regression(cluster.history("kill"))) == 10


async def test_fifty_concurrent_runs_all_complete(cluster):
    cluster.kubelet.use_fast_stage()
    names = [f"many-{i:02d}" for i in range(50)]
    await asyncio.gather(*(cluster.create_run(name, run_spec(rounds=1)) for name in names))
    for name in names:
        status = await cluster.wait_phase(name, "Succeeded", "Failed", timeout=150)
        assert status["phase"] == "Succeeded", (name, status.get("message"))
    assert sorted(cluster.job_posts()) == sorted(j for name in names for j in expected_jobs(name, 1))


async def test_two_replicas_one_acts_and_the_standby_takes_over_when_it_dies(emulator, tmp_path, fake_images):
    await api(emulator, "POST", "/apis/kopf.dev/v1/clusterkopfpeerings",
              {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "selfalign"}})
    kubelet = fake_stage_kubelet(emulator, tmp_path / "node")
    older, newer = OperatorProcess(emulator, peering="selfalign"), OperatorProcess(emulator, peering="selfalign")
    async with running(emulator, kubelet, [older, newer]) as cluster:  # the newer: lower priority, stands by
        kubelet.held.add("train")
        await cluster.create_run("ha", run_spec(rounds=1))
        await wait_for(lambda: job_name("ha", 0, "train") in kubelet.waiting, 60, what="train pod waiting")

        def writers() -> Counter:
            return Counter(bearer_token(r.headers) for r in emulator.log
                           if r.action in WRITES and r.resource is not None and r.resource.plural in ("jobs", PLURAL))

        assert set(writers()) - {None} == {older.token}  # the standby wrote nothing (None: the test kubelet)
        await older.kill()  # dead without a goodbye: its peering entry expires after PEERING_LIFETIME s
        kubelet.held.clear()
        status = await cluster.wait_phase("ha", "Succeeded", "Failed", timeout=60)
        assert status["phase"] == "Succeeded", status.get("message")
        assert writers()[newer.token] > 0
        assert cluster.job_posts() == expected_jobs("ha", 1)  # one POST per Job across both replicas


def test_operator_options_scope_and_peering():
    assert operator_options(None, None) == {"clusterwide": True, "standalone": True}
    assert operator_options(["a", "b"], None) == {"namespaces": ["a", "b"], "standalone": True}
    older = operator_options(None, "selfalign", clock=lambda: 1000.0)
    newer = operator_options(None, "selfalign", clock=lambda: 1000.5)
    assert older["peering_name"] == newer["peering_name"] == "selfalign"
    assert older["priority"] > newer["priority"] > 0  # the oldest replica is the active one


def assert_no_regression(history: list[dict]) -> dict:
    """The run's (round, stage) never moves back, and a finished stage record never changes.
    Returns the finished stage records by (round, stage)."""
    position, finished = (-1, -1), {}
    for version in history:
        status = version.get("status") or {}
        if "round" not in status:
            continue
        now = (status["round"], STAGES.index(status["stage"]))
        assert now >= position, f"status moved back from {position} to {now}"
        position = now
        for entry in status.get("rounds", []):
            for stage, record in entry["stages"].items():
                key = (entry["round"], stage)
                if key in finished:
                    assert record == finished[key], f"finished record {key} changed"
                elif record["phase"] in ("Succeeded", "Failed"):
                    finished[key] = record
    return finished
