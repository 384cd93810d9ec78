"""The kopf wiring's filters and the reconciler's memory, one by one (the operator tests run them
all together)."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
from datetime import UTC, datetime

import kopf
import kubernetes
import pytest
import urllib3

from selfalign.operator.handlers import NoDiffBase, configure, pod_ended
from selfalign.operator.kube import Kube, compare_resource_versions
from selfalign.operator.planner import Event
from selfalign.operator.reconciler import Reconciler
from selfalign.operator.settings import OperatorSettings


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
    reconciler._config_maps[("ns", "r-spec")] = {"spec.json": "{}"}
    assert reconciler._load("ns", "r", {}) is None
    assert reconciler._written == {} and reconciler._config_maps == {}


def pod(phase: str | None = None, terminated: int | None = None) -> dict:
    status: dict = {"phase": phase} if phase else {}
    if terminated is not None:
        status["containerStatuses"] = [{"name": "stage", "state": {"terminated": {"exitCode": terminated}}}]
    return {"metadata": {"name": "p"}, "status": status}


@pytest.mark.parametrize("event, body, ended", [
    ("ADDED", pod("Pending"), False),
    ("MODIFIED", pod("Running"), False),
    ("MODIFIED", pod("Running", terminated=0), True),  # container ended before the Pod phase moved
    ("MODIFIED", pod("Succeeded"), True),
    ("MODIFIED", pod("Failed"), True),
    (None, pod("Succeeded"), True),  # the initial listing after a restart
    ("DELETED", pod("Running"), True),  # gone before it was seen ending: the Job's result is read without it
])
def test_only_a_pods_end_or_removal_reconciles(event, body, ended):
    assert pod_ended(type=event, body=kopf.Body(body)) == ended


def test_configure_skips_kopfs_per_event_diff():
    settings, memo = kopf.OperatorSettings(), kopf.Memo()
    configure(settings=settings, memo=memo, logger=logging.getLogger("test"))
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, NoDiffBase)
    body = kopf.Body({"metadata": {"name": "j", "labels": {"a": "b"}}, "spec": {"template": {"spec": {}}}})
    assert storage.build(body=body) == {} and storage.fetch(body=body) is None


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
    "apply_config_map": lambda kube: kube.apply_config_map({"metadata": {"namespace": "ns", "name": "c"}}, exists=True),
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
    configure(settings=settings, memo=kopf.Memo(), logger=logging.getLogger("test"))
    jobs = settings.watching.label_selectors.collect(kopf.Resource("batch", "v1", "jobs"))
    pods = settings.watching.label_selectors.collect(kopf.Resource("", "v1", "pods"))
    runs = settings.watching.label_selectors.collect(kopf.Resource("selfalign.dev", "v1alpha1", "selfalignruns"))
    assert jobs == ["selfalign.dev/run"]
    assert pods == ["selfalign.dev/run,batch.kubernetes.io/job-name"]
    assert runs == []  # every run is the operator's
    # kopf's own default is 300 s per request and no separate connect timeout.
    assert (settings.networking.request_timeout, settings.networking.connect_timeout) == (60, 10)
