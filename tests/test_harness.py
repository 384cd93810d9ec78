"""The test harness itself behaves like kube-apiserver where the operator depends on it: each
modelled behaviour (tests/fixtures/crd.py, tests/fixtures/kube.py) is checked here on its own."""
from __future__ import annotations

import asyncio
import json
import random

import kmock
import pytest

from tests.fixtures.crd import admit, default, prune
from tests.fixtures.faults import Faults, requests
from tests.fixtures.kube import NS, RUNS, Emulator, api, run_manifest, wait_for

SCHEMA = {"type": "object", "properties": {
    "spec": {"type": "object", "default": {}, "properties": {
        "size": {"type": "integer", "default": 1},
        "nested": {"type": "object", "default": {}, "properties": {"x": {"type": "string", "default": "a"}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer", "default": 7}}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {
            "y": {"type": "integer", "default": 3}}}},
    }},
    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
}}


def test_unknown_fields_are_pruned_except_where_preserved_and_metadata_is_kept():
    obj = {"apiVersion": "v", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}, "anything": 1},
           "spec": {"size": 2, "bogus": 1, "free": {"any": {"thing": 1}}, "list": [{"k": 1, "z": 2}],
                    "map": {"m": {"y": 1, "w": 2}}},
           "status": {"phase": "P", "extra": 1}, "top": 1}
    assert prune(obj, SCHEMA, root=True) == {
        "apiVersion": "v", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}, "anything": 1},
        "spec": {"size": 2, "free": {"any": {"thing": 1}}, "list": [{"k": 1}], "map": {"m": {"y": 1}}},
        "status": {"phase": "P"}}


def test_defaults_apply_top_down_through_parent_defaults_lists_and_maps():
    assert default({}, SCHEMA) == {"spec": {"size": 1, "nested": {"x": "a"}}}
    assert default({"spec": {"size": None, "list": [{}], "map": {"m": {}}}}, SCHEMA)["spec"] == \
        {"size": 1, "nested": {"x": "a"}, "list": [{"k": 7}], "map": {"m": {"y": 3}}}
    assert default({"spec": {"size": 5}}, SCHEMA)["spec"]["size"] == 5  # a set value stays


def test_a_selfalignrun_is_stored_with_the_crds_stage_resource_defaults():
    run = admit({"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "metadata": {"name": "r"},
                 "spec": {"rounds": 1, "unknown": True}})
    assert "unknown" not in run["spec"]
    assert run["spec"]["resources"]["train"]["gpus"] == 0


# ---- the emulator: lists and watches as the watch cache serves them -------------------------------

CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"


def config_map(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS, "labels": labels}}


async def watch(emulator: Emulator, path: str, count: int, **params: str) -> list[dict]:
    """The first `count` events of a watch (fewer if the server ends it)."""
    query = "&".join(f"{k}={v}" for k, v in {"watch": "true", **params}.items())
    events = []
    async with emulator.request("GET", f"{path}?{query}") as response:
        while len(events) < count:
            line = await asyncio.wait_for(response.content.readline(), 30)
            if not line:
                break
            if line.strip():
                events.append(json.loads(line))
    return events


def names(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name")) for e in events]


async def test_a_watch_resumes_from_its_resource_version_without_relisting(emulator):
    await api(emulator, "POST", CONFIGMAPS, config_map("a"))
    listed = await api(emulator, "GET", CONFIGMAPS)
    since = listed["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"] and since.isdecimal()
    await api(emulator, "POST", CONFIGMAPS, config_map("b"))
    await api(emulator, "DELETE", f"{CONFIGMAPS}/a")
    events = await watch(emulator, CONFIGMAPS, 2, resourceVersion=since)
    assert names(events) == [("ADDED", "b"), ("DELETED", "a")]  # "a" is not listed again
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert int(since) < versions[0] < versions[1]  # a deletion has a resourceVersion of its own
    fresh = await watch(emulator, CONFIGMAPS, 1)  # no resourceVersion: the current objects first
    assert names(fresh) == [("ADDED", "b")]


async def test_a_watch_from_a_compacted_version_gets_410_gone(emulator):
    await api(emulator, "POST", CONFIGMAPS, config_map("a"))
    since = (await api(emulator, "GET", CONFIGMAPS))["metadata"]["resourceVersion"]
    await api(emulator, "POST", CONFIGMAPS, config_map("b"))
    emulator.compact()
    [error] = await watch(emulator, CONFIGMAPS, 2, resourceVersion=since)
    assert error["type"] == "ERROR" and error["object"]["code"] == 410 and error["object"]["reason"] == "Expired"


async def test_a_quiet_watch_gets_bookmarks_and_ends_after_its_timeout(emulator):
    emulator.bookmark_interval = 0.05
    await api(emulator, "POST", CONFIGMAPS, config_map("a"))
    since = (await api(emulator, "GET", CONFIGMAPS))["metadata"]["resourceVersion"]
    [bookmark] = await watch(emulator, CONFIGMAPS, 1, resourceVersion=since, allowWatchBookmarks="true")
    assert bookmark["type"] == "BOOKMARK" and bookmark["object"]["metadata"]["resourceVersion"] == since
    assert await watch(emulator, CONFIGMAPS, 1, resourceVersion=since, timeoutSeconds="1") == []


async def test_lists_and_watches_filter_by_label_selector(emulator):
    await api(emulator, "POST", CONFIGMAPS, config_map("ours", run="r", job="j"))
    await api(emulator, "POST", CONFIGMAPS, config_map("other", run="s"))
    await api(emulator, "POST", CONFIGMAPS, config_map("none"))
    listed = await api(emulator, "GET", f"{CONFIGMAPS}?labelSelector=run,job")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["ours"]
    assert names(await watch(emulator, CONFIGMAPS, 2, labelSelector="run")) == [("ADDED", "ours"), ("ADDED", "other")]
    assert names(await watch(emulator, CONFIGMAPS, 1, labelSelector="run=s")) == [("ADDED", "other")]
    assert names(await watch(emulator, CONFIGMAPS, 1, labelSelector="!run")) == [("ADDED", "none")]


async def test_a_reaction_a_test_adds_answers_before_the_stored_objects(emulator):
    await api(emulator, "POST", CONFIGMAPS, config_map("a"))
    assert (await api(emulator, "GET", f"{CONFIGMAPS}/a"))["metadata"]["name"] == "a"  # kmock's own reaction
    emulator[f"get {CONFIGMAPS}/a"] << {"kind": "ConfigMap", "metadata": {"name": "from-the-test"}}
    assert (await api(emulator, "GET", f"{CONFIGMAPS}/a"))["metadata"]["name"] == "from-the-test"
    assert [i["metadata"]["name"] for i in (await api(emulator, "GET", CONFIGMAPS))["items"]] == ["a"]


# ---- the emulator: garbage collection, the CRD's schema --------------------------------------------

async def test_dependents_are_collected_in_the_background_after_their_owner(emulator):
    emulator.gc_delay = 1.0
    owner = await api(emulator, "POST", CONFIGMAPS, config_map("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"], "controller": True}
    child = await api(emulator, "POST", CONFIGMAPS, {**config_map("child"), "metadata": {
        **config_map("child")["metadata"], "ownerReferences": [ref]}})
    grandchild_ref = {**ref, "name": "child", "uid": child["metadata"]["uid"]}
    await api(emulator, "POST", CONFIGMAPS, {**config_map("grandchild"), "metadata": {
        **config_map("grandchild")["metadata"], "ownerReferences": [grandchild_ref]}})
    await api(emulator, "POST", CONFIGMAPS, {**config_map("other-uid"), "metadata": {
        **config_map("other-uid")["metadata"], "ownerReferences": [{**ref, "uid": "not-the-owner"}]}})
    await api(emulator, "DELETE", f"{CONFIGMAPS}/owner")
    assert emulator.get_object("v1/configmaps", NS, "child") is not None  # stale for a while, as on a cluster
    await wait_for(lambda: emulator.get_object("v1/configmaps", NS, "grandchild") is None, what="cascade")
    assert emulator.get_object("v1/configmaps", NS, "child") is None
    assert emulator.get_object("v1/configmaps", NS, "other-uid") is None  # its owner uid never existed


async def test_an_orphaning_delete_leaves_the_dependents_without_that_owner(emulator):
    owner = await api(emulator, "POST", CONFIGMAPS, config_map("owner"))
    other = await api(emulator, "POST", CONFIGMAPS, config_map("other"))
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]}
            for o in (owner, other)]
    await api(emulator, "POST", CONFIGMAPS, {**config_map("both"), "metadata": {
        **config_map("both")["metadata"], "ownerReferences": refs}})
    await api(emulator, "POST", CONFIGMAPS, {**config_map("only"), "metadata": {
        **config_map("only")["metadata"], "ownerReferences": refs[:1]}})
    await api(emulator, "DELETE", f"{CONFIGMAPS}/owner", {"propagationPolicy": "Orphan"})
    assert emulator.get_object("v1/configmaps", NS, "both")["metadata"]["ownerReferences"] == refs[1:]
    assert "ownerReferences" not in emulator.get_object("v1/configmaps", NS, "only")["metadata"]
    await api(emulator, "DELETE", f"{CONFIGMAPS}/other")  # the collector runs: "only" has no owner left to miss
    await wait_for(lambda: emulator.get_object("v1/configmaps", NS, "both") is None, what="collection")
    assert emulator.get_object("v1/configmaps", NS, "only") is not None


async def test_a_run_is_pruned_and_defaulted_on_create_and_update(emulator):
    run = await api(emulator, "POST", RUNS, run_manifest("r", {"rounds": 1, "bogus": 1}))
    assert "bogus" not in run["spec"] and run["spec"]["resources"]["train"]["gpus"] == 0
    patched = await api(emulator, "PATCH", f"{RUNS}/r", {"spec": {"resources": {"train": None}, "junk": 2}})
    assert "junk" not in patched["spec"] and patched["spec"]["resources"]["train"] == \
        {"gpus": 0, "shmSize": "1Gi", "scratchSize": "50Gi"}
    assert patched["metadata"]["generation"] == 1  # defaulting gave back what the patch removed


async def test_a_status_the_schema_forbids_is_refused_with_422(emulator):
    await api(emulator, "POST", RUNS, run_manifest("r", {"rounds": 1}))
    with pytest.raises(RuntimeError, match=r"422: SelfAlignRun.selfalign.dev \"r\" is invalid: status.coverage"):
        await api(emulator, "PATCH", f"{RUNS}/r/status", {"status": {"coverage": 150}})
    stored = await api(emulator, "PATCH", f"{RUNS}/r/status", {"status": {"coverage": 50, "extra": 1}})
    assert stored["status"] == {"coverage": 50}  # pruned


# ---- the emulator: injected faults ----------------------------------------------------------------

@pytest.mark.parametrize("kind, status, stored", [("error", 503, False), ("lost", 500, True),
                                                  ("hang", 504, False), ("conflict", 409, False)])
async def test_injected_faults_answer_as_a_real_server_would(emulator, kind, status, stored):
    emulator.faults.add(kind, requests("POST", r"/configmaps$"), limit=1, status=status if status >= 500 else 503,
                        seconds=0.01)
    with pytest.raises(RuntimeError, match=f"-> {status}"):
        await api(emulator, "POST", CONFIGMAPS, config_map("a"))
    assert (emulator.get_object("v1/configmaps", NS, "a") is not None) == stored
    assert emulator.faults.injected == {kind: 1}
    await api(emulator, "GET", CONFIGMAPS)  # only what the rule matches
    if not stored:
        await api(emulator, "POST", CONFIGMAPS, config_map("a"))  # the limit is reached


async def test_a_slow_request_is_answered_and_a_dropped_watch_ends_early(emulator):
    emulator.faults.add("slow", requests("GET"), limit=1, seconds=0.05)
    emulator.faults.add("drop", requests(action=kmock.action.WATCH), limit=1, after_events=1)
    for name in ("a", "b"):
        await api(emulator, "POST", CONFIGMAPS, config_map(name))
    assert len((await api(emulator, "GET", CONFIGMAPS))["items"]) == 2
    assert names(await watch(emulator, CONFIGMAPS, 2)) == [("ADDED", "a")]  # dropped after one event
    assert names(await watch(emulator, CONFIGMAPS, 2)) == [("ADDED", "a"), ("ADDED", "b")]
    assert emulator.faults.injected == {"slow": 1, "drop": 1}


def test_fault_rates_come_from_the_seeded_generator():
    faults = Faults(rng=random.Random(7))
    rule = faults.add("error", lambda request: True, rate=0.3)
    struck = [faults._strike(None, ("error",)) is rule for _ in range(1000)]
    again = Faults(rng=random.Random(7))
    again.add("error", lambda request: True, rate=0.3)
    assert struck == [again._strike(None, ("error",)) is not None for _ in range(1000)]
    assert 200 < sum(struck) < 400


async def test_a_killed_operator_leaves_no_retry_or_resync_behind(cluster):
    first = cluster.operator.memo
    await cluster.operator.restart()
    assert first.reconciler._closed.is_set() and first.reconciler.queue.pending() == 0
    assert not cluster.operator.memo.reconciler._closed.is_set()


async def test_the_job_controller_suspends_and_resumes_a_job_as_kubernetes_does(emulator, tmp_path, fake_images):
    """spec.suspend: the active Pods are deleted and not counted as failed (the Job controller
    removes their tracking finalizer first), Suspended True and no startTime; resumed: Suspended
    False (JobResumed), startTime reset, new Pods, and the Job completes."""
    from tests.fixtures.kube import FAKE_IMAGE, fake_stage_kubelet

    kubelet = fake_stage_kubelet(emulator, tmp_path / "node")
    kubelet.use_fast_stage()
    kubelet.held.add("assess")
    task = asyncio.create_task(kubelet.run())
    jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
    container = {"name": "stage", "image": FAKE_IMAGE, "command": ["python", "-m", "selfalign.stages", "assess"]}
    await api(emulator, "POST", jobs, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {
        "backoffLimit": 0, "template": {"metadata": {"labels": {"selfalign.dev/stage": "assess"}},
                                        "spec": {"restartPolicy": "Never", "containers": [container]}}}})
    try:
        await wait_for(lambda: "j" in kubelet.waiting, what="the pod held")
        [first] = kubelet.pods["j"]
        await api(emulator, "PATCH", f"{jobs}/j", {"spec": {"suspend": True}})

        def condition() -> dict:
            status = emulator.get_object("batch/v1/jobs", NS, "j").get("status") or {}
            return next((c for c in status.get("conditions") or () if c["type"] == "Suspended"), {})

        await wait_for(lambda: condition().get("status") == "True", what="Suspended")
        status = emulator.get_object("batch/v1/jobs", NS, "j")["status"]
        assert (condition()["reason"], status["active"], status["failed"]) == ("JobSuspended", 0, 0)
        assert "startTime" not in status and emulator.get_object("v1/pods", NS, first) is None

        kubelet.held.clear()
        await api(emulator, "PATCH", f"{jobs}/j", {"spec": {"suspend": False}})
        def finished() -> set:
            status = emulator.get_object("batch/v1/jobs", NS, "j").get("status") or {}
            return {c["type"] for c in status.get("conditions") or ()} & {"Complete", "Failed"}

        assert await wait_for(finished, 10, what="the Job to finish") == {"Complete"}, \
            emulator.get_object("batch/v1/jobs", NS, "j")["status"]
        assert len(kubelet.pods["j"]) == 1 and kubelet.pods["j"][0] != first
        assert emulator.get_object("batch/v1/jobs", NS, "j")["status"]["startTime"]
    finally:
        task.cancel()
        await kubelet.stop()
