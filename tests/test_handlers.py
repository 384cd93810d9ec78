"""The kopf wiring's filters and the reconciler's memory, one by one (the operator tests run them
all together)."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from datetime import UTC, datetime

import kopf
import kubernetes
import pytest
import urllib3

from selfalign.operator.handlers import NoDiffBase, configure, job_changed, pod_changed, pod_matters, run_changed
from selfalign.operator import metrics
from selfalign.operator.kube import Kube, compare_resource_versions
from selfalign.operator.planner import Event
from kubernetes.client.exceptions import ApiException

from selfalign.operator import reconciler as reconciler_module
from selfalign.operator.observe import controller_uid
from selfalign.operator.reconciler import (Cache, Reconciler, retry_delay, settled, settled_facts,
                                           unfinished_runs)
from selfalign.operator.naming import LABEL_JOB
from selfalign.operator.settings import OperatorSettings
from selfalign.operator.workqueue import WorkQueue


@pytest.mark.parametrize("a, b, order", [
    ("9", "10", -1), ("10", "10", 0), ("123456789012345678901", "99", 1),
    ("07", "7", None), ("0", "1", None), ("", "1", None), (None, "1", None), ("12a", "1", None), ("١٢", "1", None),
])
def test_resource_versions_compare_as_integers_only_when_well_formed(a, b, order):
    assert compare_resource_versions(a, b) == order


class FakeKube:
    """Answers a GET with the run as the API stores it now, and counts the GETs."""

    def __init__(self, stored: dict):
        self.stored, self.gets = stored, 0

    def get_run(self, namespace: str, name: str) -> dict:
        self.gets += 1
        return self.stored


def run(rv: str, phase: str) -> dict:
    return {"metadata": {"namespace": "ns", "name": "r", "resourceVersion": rv}, "status": {"phase": phase}}


def reconciler_that_wrote(written: dict | None, stored: dict) -> Reconciler:
    reconciler = Reconciler(FakeKube(stored), OperatorSettings())
    if written is not None:
        reconciler._written[("ns", "r")] = written
    return reconciler


@pytest.mark.parametrize("watched, written, expected, remembered, gets", [
    (run("5", "Running"), None, "5", False, 0),  # nothing written: the watch's copy
    (run("5", "Running"), run("6", "Succeeded"), "6", True, 0),  # our write's echo is still on its way
    (run("6", "Succeeded"), run("6", "Succeeded"), "6", False, 0),  # the echo arrived
    (run("8", "Suspended"), run("6", "Succeeded"), "8", False, 0),  # someone wrote after us
    (run("abc", "Running"), run("6", "Succeeded"), "stored", False, 1),  # not comparable: ask the API
], ids=["unwritten", "echo-pending", "echo-arrived", "newer-watch", "incomparable"])
def test_a_pass_reads_the_newer_of_the_watch_and_its_own_last_write(watched, written, expected, remembered, gets):
    reconciler = reconciler_that_wrote(written, stored=run("stored", "Running"))
    loaded = reconciler._load("ns", "r", {("ns", "r"): [watched]})
    assert loaded["metadata"]["resourceVersion"] == expected
    assert (("ns", "r") in reconciler._written) == remembered
    assert reconciler.kube.gets == gets


def test_a_deleted_run_is_forgotten():
    reconciler = reconciler_that_wrote(run("6", "Succeeded"), stored=run("6", "Succeeded"))
    reconciler._config_maps[("ns", "r-spec")] = ("uid", "digest")
    assert reconciler._load("ns", "r", {}) is None
    assert reconciler._written == {} and reconciler._config_maps == {}


def pod(phase: str | None = None, terminated: int | None = None, waiting: str | None = None,
        unschedulable: bool = False) -> dict:
    status: dict = {"phase": phase} if phase else {}
    if terminated is not None:
        status["containerStatuses"] = [{"name": "stage", "state": {"terminated": {"exitCode": terminated}}}]
    if waiting is not None:
        status["containerStatuses"] = [{"name": "stage", "state": {"waiting": {"reason": waiting}}}]
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    return {"metadata": {"name": "p"}, "status": status}


@pytest.mark.parametrize("event, body, matters", [
    ("ADDED", pod("Pending"), False),  # being created: nothing to say yet
    ("MODIFIED", pod("Pending", unschedulable=True), True),  # why the stage waits
    ("MODIFIED", pod("Pending", waiting="ImagePullBackOff"), True),
    ("MODIFIED", pod("Pending", waiting="ContainerCreating"), True),  # a mount wait, once it lasts
    ("MODIFIED", pod("Running"), True),  # the wait is over
    ("MODIFIED", pod("Running", terminated=0), True),  # container ended before the Pod phase moved
    ("MODIFIED", pod("Succeeded"), True),
    ("MODIFIED", pod("Failed"), True),
    (None, pod("Succeeded"), True),  # the initial listing after a restart
    ("DELETED", pod("Pending"), True),  # gone before it was seen ending: the Job's result is read without it
])
def test_a_pod_reconciles_when_it_ends_goes_waits_or_runs(event, body, matters):
    assert pod_matters(type=event, body=kopf.Body(body)) == matters


NO_INDICES = {"runs": {}, "run_jobs": {}, "job_pods": {}}


def test_configure_skips_kopfs_per_event_diff():
    settings, memo = kopf.OperatorSettings(), kopf.Memo()
    configure(settings=settings, memo=memo, logger=logging.getLogger("test"), **NO_INDICES)
    memo.reconciler.close()
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, NoDiffBase)
    body = kopf.Body({"metadata": {"name": "j", "labels": {"a": "b"}}, "spec": {"template": {"spec": {}}}})
    assert storage.build(body=body) == {} and storage.fetch(body=body) is None


def test_the_client_keeps_a_connection_for_every_thread_that_calls_it():
    settings, memo = kopf.OperatorSettings(), kopf.Memo()
    configure(settings=settings, memo=memo, logger=logging.getLogger("test"), **NO_INDICES)
    memo.reconciler.close()
    pools = memo.reconciler.kube.custom.api_client.rest_client.pool_manager
    assert pools.connection_pool_kw["maxsize"] == reconciler_module.WORKERS + reconciler_module.EVENT_POSTERS


def test_configure_serves_the_per_run_gauges_from_kopfs_run_index():
    run = {"metadata": {"namespace": "team-a", "name": "r1", "generation": 1},
           "spec": {}, "status": {"phase": "Running", "round": 0, "observedGeneration": 1}}
    settings, memo = kopf.OperatorSettings(), kopf.Memo()
    configure(settings=settings, memo=memo, logger=logging.getLogger("test"),
              **{**NO_INDICES, "runs": {("team-a", "r1"): [run]}})
    memo.reconciler.close()
    assert metrics.REGISTRY.get_sample_value(
        "selfalign_run_phase", {"namespace": "team-a", "run": "r1", "phase": "Running"}) == 1


@pytest.fixture
def silent_server():
    """An API server that accepts connections and never answers (a half-open connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


RUN = {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun",
       "metadata": {"namespace": "ns", "name": "r", "uid": "u", "resourceVersion": "1"}}
CALLS = {
    "get_run": lambda kube: kube.get_run("ns", "r"),
    "write_status": lambda kube: kube.write_status(RUN, {"phase": "Running"}),
    "create": lambda kube: kube.create({"kind": "Job", "metadata": {"namespace": "ns", "name": "j"}}),
    "update_config_map": lambda kube: kube.update_config_map({"metadata": {"namespace": "ns", "name": "c"}}),
    "controller_uid": lambda kube: kube.controller_uid({"kind": "Job", "metadata": {"namespace": "ns", "name": "j"}}),
    "post_event": lambda kube: kube.post_event(RUN, Event("Normal", "R", "m"), datetime.now(UTC)),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_every_api_call_times_out_on_a_server_that_never_answers(silent_server, call):
    config = kubernetes.client.Configuration()
    config.host = silent_server
    kube = Kube(kubernetes.client.ApiClient(config), timeout=(1.0, 0.1))
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            CALLS[call](kube)
        except BaseException as exc:  # noqa: BLE001 (the outcome is what is checked)
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(60)  # a watchdog only: without a timeout the call never returns
    assert not thread.is_alive(), f"{call} hung"
    assert isinstance(outcome[0], urllib3.exceptions.HTTPError)


def test_configure_filters_the_children_watches_server_side_and_bounds_kopfs_requests():
    settings = kopf.OperatorSettings()
    memo = kopf.Memo()
    configure(settings=settings, memo=memo, logger=logging.getLogger("test"), **NO_INDICES)
    memo.reconciler.close()
    jobs = settings.watching.label_selectors.collect(kopf.Resource("batch", "v1", "jobs"))
    pods = settings.watching.label_selectors.collect(kopf.Resource("", "v1", "pods"))
    runs = settings.watching.label_selectors.collect(kopf.Resource("selfalign.dev", "v1alpha1", "selfalignruns"))
    assert jobs == ["selfalign.dev/run"]
    assert pods == ["selfalign.dev/run,batch.kubernetes.io/job-name"]
    assert runs == []  # every run is the operator's
    # kopf's own default is 300 s per request and no separate connect timeout.
    assert (settings.networking.request_timeout, settings.networking.connect_timeout) == (60, 10)


# ---- one pass against an API double: what a real API server can answer ------------------------

SPEC = {"recipe": "isheep", "rounds": 1, "model": {"base": "s3://m/base"}, "seeds": "s3://d/seeds.jsonl",
        "storage": {"uri": "s3://b/runs"}, "coverage": {"reference": "s3://d/ref.jsonl"}}
SYNTH = "r-r0-synth"


class ApiDouble:
    """Kube's interface over a dict of stored children; every call recorded; `fail[method]` holds
    exceptions to raise, first come first raised."""

    def __init__(self, *stored: dict):
        self.objects = {(o["kind"], o["metadata"]["name"]): o for o in stored}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.conflicts = 0  # status writes answered 409
        self.stored_rv = "1"  # the run's resourceVersion as the API stores it now (a_run's)

    def _call(self, method: str, what: str) -> None:
        self.calls.append((method, what))
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def write_status(self, run: dict, status: dict) -> dict | None:
        self._call("write_status", status.get("phase", ""))
        if self.conflicts:
            self.conflicts -= 1
            return None
        meta = {**run["metadata"], "resourceVersion": str(int(run["metadata"]["resourceVersion"]) + 1)}
        return {**run, "metadata": meta, "status": status}

    def get_run(self, namespace: str, name: str) -> dict:
        self._call("get_run", name)
        return {"metadata": {"namespace": namespace, "name": name, "resourceVersion": self.stored_rv}}

    def create(self, obj: dict) -> bool:
        self._call("create", f"{obj['kind']} {obj['metadata']['name']}")
        return self.objects.setdefault((obj["kind"], obj["metadata"]["name"]), obj) is obj

    def controller_uid(self, obj: dict) -> str | None:
        self._call("controller_uid", obj["metadata"]["name"])
        stored = self.objects.get((obj["kind"], obj["metadata"]["name"]))
        return controller_uid(stored) if stored else None

    def update_config_map(self, config_map: dict) -> None:
        self._call("update_config_map", config_map["metadata"]["name"])

    def post_event(self, run: dict, event: Event, now: datetime) -> None:
        self._call("post_event", event.reason)

    def created(self) -> list[str]:
        return [what for method, what in self.calls if method == "create"]


RUN_OWNER = {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "name": "r", "uid": "u", "controller": True}


def a_run(uid: str = "uid-new", status: dict | None = None) -> dict:
    return {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "spec": SPEC, "status": status or {},
            "metadata": {"namespace": "ns", "name": "r", "uid": uid, "resourceVersion": "1", "generation": 1}}


def child(kind: str, name: str, owner_uid: str, **labels: str) -> dict:
    return {"kind": kind, "metadata": {"name": name, "uid": f"{name}-{owner_uid}", "labels": labels,
                                       "ownerReferences": [{"kind": "SelfAlignRun", "uid": owner_uid, "controller": True}]}}


def cache_of(run: dict, jobs: list[dict] = (), pods: dict | None = None) -> Cache:
    return Cache({("ns", "r"): [run]}, {("ns", "r"): list(jobs)} if jobs else {},
                 {("ns", name): list(p) for name, p in (pods or {}).items()})


@pytest.fixture
def reconciler_with():
    made: list[Reconciler] = []

    def make(kube: ApiDouble, cache: Cache | None = None, resync: float | None = None) -> Reconciler:
        """A reconciler; with a cache, its workers and resync started on it."""
        made.append(Reconciler(kube, OperatorSettings()))
        if cache is not None:
            made[-1].start(cache, LOG, resync=resync)
        return made[-1]

    yield make
    for reconciler in made:
        reconciler.close()


LOG = logging.getLogger("test")


def events_posted(kube: ApiDouble) -> list[str]:
    return [what for method, what in kube.calls if method == "post_event"]


def test_an_event_the_api_refuses_is_logged_and_the_pass_goes_on(reconciler_with):
    kube = ApiDouble()
    kube.fail["post_event"] = [ApiException(status=500, reason="Internal Server Error")] * 3
    reconciler_with(kube).reconcile("ns", "r", cache_of(a_run()), LOG)
    assert f"Job {SYNTH}" in kube.created()
    wait_until(lambda: events_posted(kube) == ["StageStarted", "RunRunning"])


class HeldEvents(ApiDouble):
    """An API that holds every Event POST until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def post_event(self, run: dict, event: Event, now: datetime) -> None:
        self.release.wait(30)
        super().post_event(run, event, now)


def test_a_pass_is_done_before_its_events_are_posted_and_they_follow_in_order(reconciler_with):
    """The Events go out after the status write, on poster threads: a slow Event POST does not
    keep the worker from the next run."""
    kube = HeldEvents()
    reconciler_with(kube).reconcile("ns", "r", cache_of(a_run()), LOG)
    assert [method for method, _ in kube.calls] == ["write_status", "create", "create"]  # ConfigMap, Job
    kube.release.set()
    wait_until(lambda: events_posted(kube) == ["StageStarted", "RunRunning"])


def test_an_earlier_runs_job_of_the_same_name_is_never_adopted(reconciler_with):
    """Delete a run, create it again: until the garbage collector has deleted the old Jobs, the
    stage waits and says why, instead of reading the old Job's outcome as its own."""
    old = child("Job", SYNTH, "uid-old", **{"selfalign.dev/round": "0", "selfalign.dev/stage": "synthesize"})
    old["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    kube = ApiDouble()
    reconciler = reconciler_with(kube)
    for _ in range(2):  # the first records the stage, the second folds in what is observed
        reconciler.reconcile("ns", "r", cache_of(a_run(), jobs=[old]), LOG)
    written = reconciler._written[("ns", "r")]["status"]
    record = written["rounds"][0]["stages"]["synthesize"]
    assert record["phase"] == "Pending" and "belongs to another run (owner uid uid-old)" in record["message"]
    assert kube.created() == []
    reconciler.reconcile("ns", "r", cache_of(a_run()), LOG)  # the old Job is collected
    assert f"Job {SYNTH}" in kube.created()


def test_a_409_from_another_runs_child_is_a_refusal_not_done(reconciler_with):
    for kind, name in (("Job", SYNTH), ("ConfigMap", "r-spec")):
        kube = ApiDouble(child(kind, name, "uid-old"))
        reconciler = reconciler_with(kube)
        reconciler.reconcile("ns", "r", cache_of(a_run()), LOG)
        assert ("controller_uid", name) in kube.calls
        assert reconciler._expected == {}  # not taken as created
        refusal = reconciler._refusals("ns", "r")[SYNTH]
        assert refusal.phase == "Refused" and f"{kind} {name} exists but belongs to another run" in refusal.message
        assert ("post_event", "CreateFailed") in kube.calls


def test_a_409_from_the_runs_own_job_is_done(reconciler_with):
    kube = ApiDouble(child("Job", SYNTH, "uid-new"), child("ConfigMap", "r-spec", "uid-new"))
    reconciler = reconciler_with(kube)
    reconciler.reconcile("ns", "r", cache_of(a_run()), LOG)
    assert ("ns", SYNTH) in reconciler._expected and not reconciler._refusals("ns", "r")
    assert ("update_config_map", "r-spec") in kube.calls  # its data brought to this spec


def test_pods_of_an_earlier_job_of_the_same_name_are_not_read(reconciler_with):
    ours = child("Job", SYNTH, "uid-new", **{"selfalign.dev/round": "0", "selfalign.dev/stage": "synthesize"})
    ours["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    stale = {"metadata": {"name": "p-old", "ownerReferences": [{"uid": "someone-else", "controller": True}]},
             "status": {"phase": "Succeeded", "containerStatuses": [
                 {"state": {"terminated": {"exitCode": 0, "message": '{"generated": 999}'}}}]}}
    reconciler = reconciler_with(ApiDouble())
    for _ in range(2):  # the first records the stage, the second folds in what is observed
        reconciler.reconcile("ns", "r", cache_of(a_run(), jobs=[ours], pods={SYNTH: [stale]}), LOG)
    record = reconciler._written[("ns", "r")]["status"]["rounds"][0]["stages"]["synthesize"]
    assert record["phase"] == "Succeeded" and record["metrics"] == {}


def test_a_status_the_api_rejects_fails_the_run_with_the_apis_message(reconciler_with):
    kube = ApiDouble()
    rejected = ApiException(status=422, reason="Unprocessable Entity")
    rejected.body = '{"message": "SelfAlignRun.selfalign.dev \\"r\\" is invalid: status.coverage: must be <= 100"}'
    kube.fail["write_status"] = [rejected]
    reconciler = reconciler_with(kube)
    reconciler.reconcile("ns", "r", cache_of(a_run()), LOG)
    status = reconciler._written[("ns", "r")]["status"]
    assert status["phase"] == "Failed" and "status.coverage: must be <= 100" in status["message"]
    assert kube.created() == []


def test_a_status_rejected_because_it_was_planned_from_an_older_run_is_a_conflict(reconciler_with, monkeypatch):
    """A patch computed from a stale copy can break the CRD's transition rules (a Succeeded
    record moved back): 422, but the run must not fail for it; the next pass plans afresh."""
    monkeypatch.setattr(reconciler_module, "RETRY_BASE", 0.01)
    kube = ApiDouble()
    kube.fail["write_status"] = [ApiException(status=422, reason="Invalid")]
    kube.stored_rv = "7"  # someone wrote after the copy this pass planned from
    reconciler_with(kube, cache_of(a_run())).request("ns", "r")
    wait_until(lambda: f"Job {SYNTH}" in kube.created())  # planned again and written: never Failed
    assert [what for method, what in kube.calls if method == "write_status"] == ["Running", "Running"]


@pytest.mark.parametrize("failures, delay", [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)])
def test_failed_passes_back_off_exponentially_up_to_a_cap(failures, delay):
    assert retry_delay(failures) == delay


def test_a_failed_pass_is_tried_again_without_any_event(reconciler_with, monkeypatch):
    """kopf does not retry on.event handlers, and a resumed watch re-delivers nothing."""
    monkeypatch.setattr(reconciler_module, "RETRY_BASE", 0.01)
    kube = ApiDouble()
    kube.fail["write_status"] = [ApiException(status=503, reason="Service Unavailable"),
                                 urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")]
    reconciler_with(kube, cache_of(a_run())).request("ns", "r")
    wait_until(lambda: f"Job {SYNTH}" in kube.created())
    assert [what for method, what in kube.calls if method == "write_status"] == ["Running"] * 3


def test_a_conflicting_status_write_is_tried_again_even_if_no_event_follows(reconciler_with, monkeypatch):
    monkeypatch.setattr(reconciler_module, "RETRY_BASE", 0.01)
    kube = ApiDouble()
    kube.conflicts = 1
    reconciler_with(kube, cache_of(a_run())).request("ns", "r")
    wait_until(lambda: f"Job {SYNTH}" in kube.created())


@pytest.mark.parametrize("phase, resynced", [(None, True), ("Pending", True), ("Running", True),
                                             ("Suspended", True), ("Succeeded", False), ("Failed", False)])
def test_the_resync_covers_every_unfinished_run(phase, resynced):
    runs = {("ns", "r"): [a_run(status={"phase": phase} if phase else None)]}
    assert unfinished_runs(runs) == ([("ns", "r")] if resynced else [])


def test_the_resync_reconciles_a_run_whose_events_were_lost(reconciler_with):
    kube = ApiDouble()
    reconciler_with(kube, cache_of(a_run()), resync=0.01)  # no request: the resync queues it
    wait_until(lambda: f"Job {SYNTH}" in kube.created())


class ChangingIndex(dict):
    """kopf's index as another thread sees it: changed by the event loop while it is iterated."""

    changed = True

    def items(self):
        if self.changed:
            self.changed = False
            raise RuntimeError("dictionary changed size during iteration")
        return super().items()


def test_the_resync_survives_an_index_changing_under_it(reconciler_with):
    kube = ApiDouble()
    runs = ChangingIndex({("ns", "r"): [a_run()]})
    reconciler_with(kube, Cache(runs, {}, {}), resync=0.01)
    wait_until(lambda: f"Job {SYNTH}" in kube.created())


def wait_until(predicate, timeout: float = 30.0) -> None:
    """A watchdog for what background threads do; no assertion on how long it takes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.005)


# ---- the work queue (client-go's workqueue semantics) --------------------------------------------

def test_a_key_is_queued_once_however_often_it_is_asked_for():
    queue = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert [queue.get(), queue.get()] == ["a", "b"] and queue.pending() == 0


def test_a_key_asked_for_during_its_pass_is_queued_once_more_after_it_and_never_given_out_twice():
    queue = WorkQueue()
    queue.add("a")
    assert queue.get() == "a"
    queue.add("a")
    queue.add("a")
    assert queue.pending() == 0  # not handed to a second worker while the first has it
    queue.done("a")
    assert queue.pending() == 1 and queue.get() == "a"
    queue.done("a")
    assert queue.pending() == 0


def test_the_sooner_of_two_delays_wins_and_a_delayed_key_comes_due():
    queue = WorkQueue()
    queue.add_after("a", 3600)
    queue.add_after("a", 0.01)
    queue.add_after("a", 7200)  # later than what is pending: ignored
    assert queue.get() == "a"  # after about 0.01 s, not an hour
    queue.done("a")
    assert queue.pending() == 1  # the superseded hour-long entry, which gives nothing out
    queue.add("b")
    assert queue.get() == "b"


def test_a_shut_down_queue_wakes_its_workers_and_keeps_nothing():
    queue = WorkQueue()
    got: list = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    queue.add_after("a", 3600)
    queue.shut_down()
    worker.join(30)
    assert got == [None] and queue.pending() == 0
    queue.add("b")
    assert queue.get() is None


async def test_the_event_handlers_only_queue_the_run():
    """No pass runs in kopf's handler: the run is queued for the reconciler's workers."""
    reconciler = Reconciler(ApiDouble(), OperatorSettings())
    memo = kopf.Memo(reconciler=reconciler)
    job = kopf.Body(child("Job", SYNTH, "u") | {"metadata": {**child("Job", SYNTH, "u")["metadata"],
                                                             "ownerReferences": [RUN_OWNER]}})
    await run_changed(namespace="ns", name="r", memo=memo)
    await job_changed(namespace="ns", body=job, memo=memo)
    await pod_changed(namespace="ns", labels={LABEL_JOB: SYNTH}, memo=memo, job_runs={("ns", SYNTH): ["r"]})
    assert reconciler.kube.calls == [] and reconciler.queue.get() == ("ns", "r") and reconciler.queue.pending() == 0
    reconciler.close()


# ---- a finished run keeps almost nothing in memory (issue 17) ------------------------------------

def finished(phase: str = "Succeeded", observed: int = 1, generation: int = 1) -> dict:
    body = a_run(status={"phase": phase, "observedGeneration": observed, "round": 0, "message": "m" * 500,
                         "rounds": [{"round": 0, "stages": {"synthesize": {"phase": phase}}}]})
    body["metadata"]["generation"] = generation
    return body


@pytest.mark.parametrize("body, is_settled", [
    (finished(), True), (finished("Failed"), True),
    (finished("Failed", observed=1, generation=2), False),  # a retry raised the generation: one more pass
    (a_run(status={"phase": "Running", "observedGeneration": 1}), False),
])
async def test_the_runs_index_keeps_only_a_few_fields_of_a_settled_run(body, is_settled):
    from selfalign.operator.handlers import runs as runs_index

    kept = (await runs_index(namespace="ns", name="r", body=kopf.Body(body)))[("ns", "r")]
    assert settled(body) == is_settled and settled(kept) == is_settled
    if is_settled:
        assert "spec" not in kept and "rounds" not in kept["status"] and "message" not in kept["status"]
        assert kept["status"]["phase"] == body["status"]["phase"] and kept["metadata"]["name"] == "r"
        assert unfinished_runs({("ns", "r"): [kept]}) == []
    else:
        assert kept == body


def test_a_settled_run_gets_no_pass_and_the_reconciler_forgets_it(reconciler_with):
    kube = ApiDouble()
    reconciler = reconciler_with(kube)
    reconciler.reconcile("ns", "r", cache_of(a_run()), LOG)  # a pass: spec, ConfigMap, status remembered
    assert ("ns", "r") in reconciler._specs and reconciler._config_maps and ("ns", "r") in reconciler._written
    calls = len(kube.calls)
    settled_copy = settled_facts(finished(observed=1) | {"metadata": {**a_run()["metadata"], "resourceVersion": "9"}})
    reconciler.reconcile("ns", "r", cache_of(settled_copy), LOG)
    assert len(kube.calls) == calls  # nothing sent
    assert not reconciler._specs and not reconciler._written
    [(uid, digest)] = reconciler._config_maps.values()  # a digest of the ConfigMap applied, not its data
    assert uid == "uid-new" and len(digest) == 64
