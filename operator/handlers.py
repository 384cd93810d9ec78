"""The kopf operator: every event about a run, its Jobs or their Pods reconciles that run.

A pass is level-triggered and idempotent: read the run, its Jobs and their Pods from kopf's
in-memory indices (filled by the same watch streams that deliver the events, as an informer cache
is), `plan`, write the status once (only if it changed, through the status subresource, before any
child exists), create what the plan needs (409 = done when the existing child is the run's own, by
uid), then hand the plan's Events to poster threads (reconciler.py). The API sees writes, and reads only to learn whose a 409's
object is (or the run, where resourceVersions are not integers). The triggers are the run's own watch (whose initial listing also resumes every run after a restart) and its
children's watches, filtered by label on the server; a Pod matters when it ends (its termination
message is the stage's result), waits (unschedulable, pulling an image, mounting) or runs. A renewed
watch resumes from its last resourceVersion and delivers nothing again, so the reconciler also
retries a failed pass itself and resyncs every unfinished run every 5 minutes: the safety net,
not the trigger.

Two replicas: kopf peering. `selfalign operator --peering NAME` makes peering mandatory (the Helm
chart installs the ClusterKopfPeering, or a KopfPeering per watched namespace); each replica's
priority is derived from its start time so that the OLDEST replica is the active one and a
restarted replica waits as a standby instead of taking over. Peering is not a lease, so during a
hand-over two replicas can act briefly; that is harmless because every create is idempotent and
the status write is conditional on the resourceVersion it was computed from (`kube.write_status`).
Without `--peering` the operator runs standalone (one replica).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import kopf
import kubernetes

from . import metrics
from .kube import Kube
from .observe import pod_phase, pod_waiting
from .naming import GROUP, KIND, LABEL_JOB, LABEL_RUN, PLURAL, VERSION
from .reconciler import EVENT_POSTERS, WORKERS, Cache, Reconciler, settled, settled_facts
from .settings import OperatorSettings

WATCH_RENEWAL = 600  # seconds
REQUEST_TIMEOUT, CONNECT_TIMEOUT = 60, 10  # seconds, for kopf's own short requests (as kube.TIMEOUT)
# Server-side filters for the children's watches: only the operator's Jobs and their Pods cross the
# wire and fill the indices, not every Job and Pod of the cluster (kopf's `labels=` filters only
# client-side).
CHILD_SELECTORS = {("batch", "v1", "jobs"): LABEL_RUN, ("", "v1", "pods"): f"{LABEL_RUN},{LABEL_JOB}"}


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf diffs every event's body against a stored copy to find changes for on.create/update
    handlers; this operator has none (only indices and event handlers), and the diff's deep copy
    of each Job and Pod was the largest CPU cost per event."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, runs: kopf.Index, run_jobs: kopf.Index,
              job_pods: kopf.Index, logger: kopf.Logger, **_: Any) -> None:
    settings.posting.enabled = False  # the reconciler posts its own Events, one per transition
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = WATCH_RENEWAL
    settings.watching.client_timeout = WATCH_RENEWAL + 60
    settings.networking.request_timeout, settings.networking.connect_timeout = REQUEST_TIMEOUT, CONNECT_TIMEOUT
    for resource, selector in CHILD_SELECTORS.items():
        settings.watching.label_selectors[resource] = selector
    memo.reconciler = Reconciler(Kube(api_client()), OperatorSettings.from_env(os.environ))
    # The per-run gauges and the runs by phase are read at scrape time from kopf's run index
    # (settled runs keep the phase and round they read): no copy of the runs to keep in step, and
    # no work on each run event.
    metrics.track_runs(lambda: [body for bodies in list(runs.values()) for body in bodies],
                       memo.reconciler.settings)
    memo.reconciler.start(Cache(runs, run_jobs, job_pods), logger)


def api_client() -> kubernetes.client.ApiClient:
    """The client as loaded (in-cluster or kubeconfig), keeping a connection for every thread that
    calls it (the worker and Event poster threads): the client's default keeps 5 per CPU and closes
    any connection beyond that after its request, so on a small node a busy operator would
    connect anew for many of its requests."""
    config = kubernetes.client.Configuration.get_default_copy()
    config.connection_pool_maxsize = WORKERS + EVENT_POSTERS
    return kubernetes.client.ApiClient(config)


@kopf.on.cleanup()
def stop(memo: kopf.Memo, **_: Any) -> None:
    """No retry or resync pass outlives the operator."""
    memo.reconciler.close()


@kopf.index(GROUP, VERSION, PLURAL)
async def runs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    """Each run as its watch last delivered it: a pass reads this instead of GETting the run. Of
    a settled run (finished at its current spec) only a few fields: with 1,000 runs, most of them
    finished, their specs and per-stage records would be most of the operator's memory."""
    return {(namespace, name): settled_facts(body) if settled(body) else dict(body)}


@kopf.index("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def run_jobs(namespace: str, body: kopf.Body, **_: Any) -> dict:
    run = owning_run(body)
    return {(namespace, run): {**_facts(body), "spec": {"suspend": bool(body.get("spec", {}).get("suspend"))}}} \
        if run else {}


@kopf.index("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def job_runs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    """Job -> run, for Pod events: a Pod's owner is its Job, and the run label may be shortened."""
    run = owning_run(body)
    return {(namespace, name): run} if run else {}


@kopf.index("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT, LABEL_JOB: kopf.PRESENT})
async def job_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_JOB]): _facts(body)}


# The event handlers are async and only queue the run (Reconciler.request never blocks): kopf runs
# a sync handler in its thread pool and holds the object's event queue until it returns, so a
# pass run inside a handler made events wait for threads, and each waiting event of a run cost
# a pass of its own.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.request(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def job_changed(namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    run = owning_run(body)
    if run:
        memo.reconciler.request(namespace, run)


def pod_matters(type: str | None, body: kopf.Body, **_: Any) -> bool:
    """A Pod changes a plan when it ends or goes (a finished Job's result is its Pod's termination
    message), when it waits for something (unschedulable, an image, a mount) and when it runs (the
    wait is over); not while it is merely being created or scheduled."""
    phase = pod_phase(body)
    return type == "DELETED" or phase in ("Running", "Succeeded", "Failed") or pod_waiting([body]) is not None


@kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT, LABEL_JOB: kopf.PRESENT}, when=pod_matters)
async def pod_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, job_runs: kopf.Index, **_: Any) -> None:
    for run in job_runs.get((namespace, labels[LABEL_JOB]), ()):
        memo.reconciler.request(namespace, run)


def owning_run(body: Mapping[str, Any]) -> str | None:
    """The name of the SelfAlignRun that controls this object (its ownerReference)."""
    for ref in body.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            return ref["name"]
    return None


def _facts(body: kopf.Body) -> dict[str, Any]:
    """What observe.py and the reconciler read of a Job or Pod (who controls it: children are bound
    to their owner's uid); the rest of the body is not kept in memory."""
    meta = body.metadata
    return {"metadata": {"name": meta.name, "uid": meta.uid, "labels": dict(meta.labels),
                         "ownerReferences": [dict(ref) for ref in meta.get("ownerReferences") or ()],
                         "annotations": dict(meta.annotations),
                         "creationTimestamp": meta.get("creationTimestamp")},
            "status": dict(body.get("status") or {})}


def operator_options(namespaces: list[str] | None, peering: str | None,
                     clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """kopf.run's scope and peering arguments. Priority: the older the replica, the higher."""
    scope: dict[str, Any] = {"namespaces": namespaces} if namespaces else {"clusterwide": True}
    if peering is None:
        return {**scope, "standalone": True}
    return {**scope, "peering_name": peering, "priority": 10**13 - int(clock() * 1000)}


def run_operator(namespaces: list[str] | None, peering: str | None, liveness: str | None = None,
                 metrics_port: int | None = None) -> None:
    """`selfalign operator`: in-cluster credentials in a Pod, else the local kubeconfig; Prometheus
    metrics on `metrics_port`, kopf's liveness probe at `liveness` (e.g. http://0.0.0.0:8081/healthz)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    if metrics_port:
        metrics.serve_metrics(metrics_port)
    kopf.run(**operator_options(namespaces, peering), liveness_endpoint=liveness)
