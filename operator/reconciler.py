"""One reconcile pass of a run, and the memory that spares the API requests.

`Reconciler.request` is what every kopf event handler calls (handlers.py), on kopf's event loop:
it only queues the run's key (workqueue.py, as controller-runtime's workqueue), so no handler ever
waits for a pass and kopf's watch streams and indices keep up whatever the passes cost. WORKERS
threads take keys from the queue: one pass at a time per run, every event that arrives while a
run waits or is reconciled folded into one more pass. A pass reads kopf's indices (`Cache`), calls
the pure planner, and acts through `Kube`, the one module that talks to the API (the official
sync client, in the worker thread). The Events a pass's plan announces go, once its status write
has succeeded, to EVENT_POSTERS threads of their own, as client-go's EventRecorder hands them to
its broadcaster: the worker is free for the next run instead of waiting for 2-3 more round trips.

Events alone are not enough on a real API server: kopf does not retry `on.event` handlers, and a
renewed watch resumes from its last resourceVersion, so nothing is delivered again. A failed pass
is therefore tried again with capped exponential backoff (`retry_delay`), and every unfinished run
is reconciled every RESYNC seconds whatever happens. Both go through the queue: kopf's retries
belong to its changing handlers (which persist progress on the run, a write per pass) and its
timers put a finalizer on every run (which then cannot be deleted while the operator is down).

A run's children are bound to its uid: a Job, Service or ConfigMap with the right name but another
controller (a deleted run of the same name, not yet collected) is never adopted; its stage waits.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Callable, Mapping

import urllib3
from kubernetes.client.exceptions import ApiException

from . import metrics
from .jobs import build_config_map, build_network_policy, build_stage_objects, owner_reference
from .kube import INVALID, Kube, compare_resource_versions
from .naming import config_map_name
from .observe import SUSPENDED_BY, SUSPENDED_BY_RUN, controller_uid, observe_foreign, observe_jobs
from .planner import FINAL_STAGE_PHASES, EnsureJob, Event, JobObservation, plan, status_rejected
from .settings import OperatorSettings
from .spec import RunSpec, SpecError, parse_spec
from .workqueue import WorkQueue

EXPECTATION_TTL = 300.0  # seconds a created Job may take to show up in the index (as kube-controller-manager)
REFUSAL_BACKOFF = 30.0  # seconds before a refused Job create is tried again
RETRY_BASE, RETRY_CAP = 1.0, 60.0  # seconds: a failed pass is tried again after 1, 2, 4, ... 60 s
RESYNC = 300.0  # seconds: every unfinished run is reconciled at least this often
# Threads doing passes (controller-runtime's MaxConcurrentReconciles). A pass is 3-5 API round
# trips in a row and almost no CPU (the sync client releases the GIL while it waits), so the
# passes a burst of transitions needs at once are bounded by threads, not cores: with 4, 200 runs
# finishing stages within seconds of each other waited 30 s (p50) in the queue on a loaded
# 2-core machine (bench/README.md).
WORKERS = 16
EVENT_POSTERS = 4  # threads posting the passes' Events (a few per transition, each a round trip)
TRANSIENT = (ApiException, urllib3.exceptions.HTTPError)  # an API error, a timeout, a reset


def retry_delay(failures: int) -> float:
    """Seconds before the next try after a run's `failures`-th failed pass in a row."""
    return min(RETRY_BASE * 2 ** max(failures - 1, 0), RETRY_CAP)


def unfinished_runs(runs: Mapping) -> list[tuple[str, str]]:
    """The runs the resync reconciles: every run not Succeeded or Failed."""
    return [key for key, bodies in list(runs.items())
            if any((body.get("status") or {}).get("phase") not in FINAL_STAGE_PHASES for body in bodies)]


def settled(run: Mapping[str, Any]) -> bool:
    """A run finished at its current spec (Succeeded or Failed, status observed at its
    generation): no pass has anything to do for it until its spec changes (a retry raises the
    generation) or it is deleted, so neither kopf's index nor the reconciler keeps more of it
    than `settled_facts`."""
    status, generation = run.get("status") or {}, run["metadata"].get("generation")
    return status.get("phase") in FINAL_STAGE_PHASES and generation is not None and \
        status.get("observedGeneration") == generation


def settled_facts(run: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of a settled run: enough to tell it is settled, for the resync and for the
    per-run gauges (metrics.py reads the phase and round of a finished run)."""
    meta, status = run["metadata"], run.get("status") or {}
    return {"metadata": {key: meta[key] for key in ("namespace", "name", "uid", "resourceVersion", "generation",
                                                     "deletionTimestamp") if key in meta},
            "status": {key: status[key] for key in ("phase", "round", "observedGeneration") if key in status}}


def _retrying(read: Callable[[], list], attempts: int = 10) -> list:
    """`read()` of kopf's index from another thread: the event loop may change the dict while it
    is iterated (RuntimeError), which a second look does not meet."""
    for _ in range(attempts - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


class Taken(Exception):
    """A child's name is held by an object this run does not control."""


@dataclass(frozen=True)
class Cache:
    """kopf's indices, kept current by the watch streams that also deliver the events: a pass
    observes runs, Jobs and Pods here and sends the API only its writes."""

    runs: Mapping
    run_jobs: Mapping
    job_pods: Mapping


class Reconciler:
    """One operator process's reconciler: the API, the settings, and memory that only saves
    requests: the queue of runs to reconcile (a burst of events becomes one more pass, never two
    overlapping ones), which Jobs were created but not seen yet, each run as this process last
    wrote it (newer than the watch until its echo arrives), each run's parsed spec and its
    ConfigMap as applied. And one observation the cluster cannot give back: which Job creates the
    API refused, and why (the planner keeps the stage Pending and says so; tried again after
    REFUSAL_BACKOFF). It also schedules the passes no event asks for: a failed one again after
    `retry_delay`, and every unfinished run every RESYNC seconds."""

    def __init__(self, kube: Kube, settings: OperatorSettings):
        self.kube, self.settings = kube, settings
        self._guard = threading.Lock()
        self.queue = WorkQueue()  # the runs to reconcile: one pass at a time per run
        self._expected: dict[tuple[str, str], tuple[float, str]] = {}  # (namespace, Job) -> when, by which run uid
        self._written: dict[tuple[str, str], dict[str, Any]] = {}  # run -> as our last status write stored it
        self._config_maps: dict[tuple[str, str], tuple[str, str]] = {}  # (ns, ConfigMap) -> run uid, data digest
        self._policies: dict[tuple[str, str], str] = {}  # run -> uid of the run its NetworkPolicy exists for
        self._specs: dict[tuple[str, str], tuple[tuple, RunSpec | SpecError]] = {}  # run -> (uid, generation), spec
        self._refused: dict[tuple[str, str], dict[str, tuple[float, JobObservation]]] = {}  # run -> Job -> when, why
        self._failures: dict[tuple[str, str], int] = {}  # run -> failed passes in a row
        self._closed = threading.Event()
        self._posters = ThreadPoolExecutor(EVENT_POSTERS, thread_name_prefix="selfalign-events")

    def start(self, cache: Cache, logger: Any, resync: float | None = None) -> None:
        """Start WORKERS worker threads on the queue, and the resync: every unfinished run queued
        every `resync` (RESYNC) seconds, until `close`."""
        self._cache, self._logger = cache, logger
        for number in range(WORKERS):
            threading.Thread(target=self._work, name=f"selfalign-worker-{number}", daemon=True).start()
        period = RESYNC if resync is None else resync

        def loop() -> None:
            while not self._closed.wait(period):
                for key in _retrying(lambda: unfinished_runs(cache.runs)):
                    self.queue.add(key)

        threading.Thread(target=loop, name="selfalign-resync", daemon=True).start()

    def close(self) -> None:
        """Stop the workers, the resync, every scheduled pass and the Events not posted yet (the
        operator is stopping)."""
        self._closed.set()
        self.queue.shut_down()
        self._posters.shutdown(wait=False, cancel_futures=True)

    def request(self, namespace: str, name: str) -> None:
        """Reconcile the run soon: queue it (at once; a worker thread does the pass). Never blocks,
        so kopf's handlers call it on the event loop."""
        self.queue.add((namespace, name))

    def _work(self) -> None:
        """A worker: one pass per key taken from the queue; a failed pass is queued again after
        `retry_delay`."""
        while (key := self.queue.get()) is not None:
            try:
                self.reconcile(*key, self._cache, self._logger)
                with self._guard:
                    self._failures.pop(key, None)
            except Exception:
                metrics.record_reconcile_error(key[0])
                with self._guard:
                    failures = self._failures[key] = self._failures.get(key, 0) + 1
                self._logger.exception("reconcile pass failed run=%s, again in %.0f s", key[1], retry_delay(failures))
                self._later(*key, retry_delay(failures))
            finally:
                self.queue.done(key)

    def reconcile(self, namespace: str, name: str, cache: Cache, logger: Any) -> None:
        # 1. The run as last seen; nothing to do once it is gone or going.
        run = self._load(namespace, name, cache.runs)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return
        # 2. Parse the spec; the planner turns a SpecError into a Failed run (InvalidSpec).
        spec = self._parse(run)
        # 3. Observe its Jobs and their Pods from the indices (no API request): only what it controls.
        uid = run["metadata"].get("uid")
        listed = list(cache.run_jobs.get((namespace, name), ()))
        jobs = [job for job in listed if controller_uid(job) == uid]
        foreign = {job["metadata"]["name"]: seen for job in listed if controller_uid(job) != uid
                   if (seen := observe_foreign(job)) is not None}
        pods = {job["metadata"]["name"]: [pod for pod in cache.job_pods.get((namespace, job["metadata"]["name"]), ())
                                          if controller_uid(pod) == job["metadata"].get("uid")]
                for job in jobs}
        observed = {**self._refusals(namespace, name), **foreign, **observe_jobs(jobs, pods)}
        # 4. Decide.
        now = datetime.now(UTC)
        generation = run["metadata"].get("generation", 1)
        result = plan(spec, run.get("status"), observed, now, namespace=namespace, name=name,
                      generation=generation, uid=uid)
        # 5. Write status once, before any child exists; a 409 means a newer run version is coming.
        if result.status != (run.get("status") or {}):
            try:
                stored = self.kube.write_status(run, result.status)
            except ApiException as exc:
                if exc.status != INVALID:
                    raise
                # Planned from the run as stored, it would be refused again: the run fails, saying
                # why. Planned from an older copy (a patch onto a newer status can break its
                # transition rules), it is a conflict: the next pass plans from the newer one.
                stored = None
                if self._is_current(run):
                    logger.warning("status rejected by the API run=%s: %s", name, _api_message(exc))
                    result = status_rejected(run.get("status"), _api_message(exc), now, generation=generation)
                    stored = self.kube.write_status(run, result.status)
            if stored is None:
                # The run moved on: its next event reconciles it, or, should none come (a 409 from
                # a proxy, a webhook), the pass after RETRY_BASE does.
                logger.info("status write conflicted run=%s", name)
                self._later(namespace, name, RETRY_BASE)
                return
            with self._guard:
                self._written[(namespace, name)] = stored
            metrics.record_status_change(run.get("status"), result.status, namespace)
            run = stored
        # 6. Make sure the Jobs the plan needs exist, suspended or not as it says; a new refusal goes
        # into status on another pass.
        seen = {j["metadata"]["name"]: j for j in jobs}
        for job in result.jobs:
            created = self._ensure(run, spec, job, seen=set(seen), foreign=set(foreign), now=now, logger=logger)
            if created is None:
                self.queue.add((namespace, name))  # the refusal goes into status on the next pass
            elif created:
                metrics.observe_job_created(result.status, datetime.now(UTC), namespace)
            elif job.name in seen and job.suspend is not None and suspended(seen[job.name]) != job.suspend:
                self.kube.suspend_job(namespace, job.name, job.suspend)
        if self._refusals(namespace, name):
            self._later(namespace, name, REFUSAL_BACKOFF)
        if result.recheck is not None:
            self._later(namespace, name, result.recheck)
        # 7. Tell the user what changed, without waiting for it.
        if result.events:
            self._announce(run, result.events, now, logger)

    def _is_current(self, run: Mapping[str, Any]) -> bool:
        """Whether the run is stored at the version this pass planned from (asks the API)."""
        stored = self.kube.get_run(run["metadata"]["namespace"], run["metadata"]["name"])
        return stored is not None and stored["metadata"].get("resourceVersion") == run["metadata"]["resourceVersion"]

    def _parse(self, run: Mapping[str, Any]) -> RunSpec | SpecError:
        """The run's typed spec, parsed once per spec version (its generation)."""
        meta = run["metadata"]
        key, version = (meta["namespace"], meta["name"]), (meta.get("uid"), meta.get("generation"))
        with self._guard:
            known = self._specs.get(key)
        if known is not None and known[0] == version and None not in version:
            return known[1]
        try:
            spec: RunSpec | SpecError = parse_spec(self.settings.with_defaults(run.get("spec")))
        except SpecError as exc:
            spec = exc
        with self._guard:
            self._specs[key] = (version, spec)
        return spec

    def _load(self, namespace: str, name: str, runs: Mapping) -> dict[str, Any] | None:
        """The newer of the run as the watch last delivered it and as this process last wrote it.
        Reading the watch's copy alone would plan from a status older than our own write until its
        echo arrives (the write would only get a 409; TTL-deleted Jobs could be re-created).
        None, and nothing remembered of the run, once it is gone or settled."""
        key = (namespace, name)
        watched = next(iter(runs.get(key, ())), None)
        with self._guard:
            written = self._written.get(key)
            if watched is None or settled(watched):  # deleted (or not listed yet: its own event comes), or done
                self._written.pop(key, None)
                self._specs.pop(key, None)
                self._refused.pop(key, None)
                self._failures.pop(key, None)
                if watched is None:  # a settled run keeps these two digests: a retry needs no GET
                    self._config_maps.pop((namespace, config_map_name(name)), None)
                    self._policies.pop(key, None)
                return None
            if written is None:
                return watched
            order = compare_resource_versions(watched["metadata"].get("resourceVersion"),
                                              written["metadata"].get("resourceVersion"))
            if order is not None and order < 0:
                return written
            del self._written[key]
        return watched if order is not None else self.kube.get_run(namespace, name)

    def _ensure(self, run: Mapping[str, Any], spec: RunSpec, job: EnsureJob, *, seen: set[str], foreign: set[str],
                now: datetime, logger: Any) -> bool | None:
        """Create the Job unless it is seen, was just created, or was just refused, or another
        run's Job holds its name (whose deletion event brings the next pass). True when this call
        created it; None when the API refused it with a cause not known before."""
        namespace, name, uid = run["metadata"]["namespace"], run["metadata"]["name"], run["metadata"]["uid"]
        key = (namespace, job.name)
        if job.name in seen or job.name in foreign:
            self._forget(key, run=name)
            return False
        if self._is_expected(key, uid) or self._refused_lately(namespace, name, job.name):
            return False
        owner = owner_reference(run)
        created = False
        try:
            self._apply_config_map(build_config_map(spec, namespace=namespace, run_name=name, owner=owner), uid)
            self._ensure_network_policy(namespace, name, owner, uid)
            for obj in build_stage_objects(spec, job, namespace=namespace, run_name=name, owner=owner,
                                           settings=self.settings, labels_of_run=run["metadata"].get("labels")):
                if self._create(obj, uid) and obj["kind"] == "Job":
                    created = True
        except (ApiException, Taken) as exc:
            if isinstance(exc, ApiException) and (exc.status is None or exc.status >= 500):
                raise
            # The API refused the object (quota, admission, validation), or another run holds its
            # name: say so on the run.
            cause = str(exc) if isinstance(exc, Taken) else \
                f"creating Job {job.name} was refused: {exc.status} {exc.reason}: {_api_message(exc)}"
            logger.warning("job create refused job=%s cause=%s", job.name, cause)
            with self._guard:
                refused = self._refused.setdefault((namespace, name), {})
                before = refused.get(job.name)
                refused[job.name] = (time.monotonic(), JobObservation(job.name, job.round, job.stage, "Refused",
                                                                      message=cause))
            if before is not None and before[1].message == cause:
                return False
            self._post(run, Event("Warning", "CreateFailed", f"round {job.round} stage {job.stage}: {cause}"),
                       now, logger)
            return None
        self._forget(key, run=name)  # no refusal to report any more
        with self._guard:
            self._expected[key] = (time.monotonic(), uid)
        return created

    def _create(self, obj: Mapping[str, Any], uid: str) -> bool:
        """Create a child of the run: True if created, False if it exists and is this run's own.
        An object of that name that another owner controls is never adopted (raises Taken)."""
        if self.kube.create(obj):
            return True
        owner = self.kube.controller_uid(obj)
        if owner != uid:
            meta = obj["metadata"]
            raise Taken(f"{obj['kind']} {meta['name']} exists but belongs to another run (owner uid "
                        f"{owner or 'none'}), e.g. a deleted run of this name: created once that one is deleted")
        return False

    def _announce(self, run: Mapping[str, Any], events: tuple[Event, ...], now: datetime, logger: Any) -> None:
        """Post a pass's Events in order on a poster thread; the pass goes on at once."""
        def post() -> None:
            for event in events:
                self._post(run, event, now, logger)
        try:
            self._posters.submit(post)
        except RuntimeError:  # closed: the operator is stopping, and its Events with it
            logger.info("events not posted, the operator is stopping run=%s", run["metadata"]["name"])

    def _post(self, run: Mapping[str, Any], event: Event, now: datetime, logger: Any) -> None:
        """Events are for people; the change they report is already in status. One the API does
        not take is logged, and the pass goes on."""
        try:
            self.kube.post_event(run, event, now)
        except TRANSIENT as exc:
            logger.warning("event not posted run=%s reason=%s: %s", run["metadata"]["name"], event.reason, exc)

    def _refusals(self, namespace: str, run: str) -> dict[str, JobObservation]:
        """The run's Job creates that the API refused, as observations of those Jobs."""
        with self._guard:
            return {job: seen for job, (_, seen) in self._refused.get((namespace, run), {}).items()}

    def _later(self, namespace: str, name: str, delay: float) -> None:
        """Reconcile the run again after `delay` seconds (a refused create may succeed once quota
        frees up; a failed pass may succeed once the API recovers). The sooner pass wins."""
        self.queue.add_after((namespace, name), delay)

    def _refused_lately(self, namespace: str, run: str, job: str) -> bool:
        with self._guard:
            refused = self._refused.get((namespace, run), {}).get(job)
        return refused is not None and time.monotonic() - refused[0] < REFUSAL_BACKOFF

    def _apply_config_map(self, config_map: Mapping[str, Any], uid: str) -> None:
        """Apply the run's spec ConfigMap once per content and run (the API is asked again after a
        restart): create it, or, when it is this run's already, bring its data to the spec."""
        meta = config_map["metadata"]
        key, data = (meta["namespace"], meta["name"]), config_map.get("data", {})
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()  # not the data: 1,000 runs
        with self._guard:
            applied = self._config_maps.get(key)
        if applied == (uid, digest):
            return
        if (applied is not None and applied[0] == uid) or not self._create(config_map, uid):
            self.kube.update_config_map(config_map)
        with self._guard:
            self._config_maps[key] = (uid, digest)

    def _ensure_network_policy(self, namespace: str, name: str, owner: dict, uid: str) -> None:
        """Create the run's NetworkPolicy (when the chart asks for one) once per run: it depends
        on the run's name only, never on its spec."""
        with self._guard:
            if self._policies.get((namespace, name)) == uid:
                return
        policy = build_network_policy(namespace=namespace, run_name=name, owner=owner, settings=self.settings)
        if policy is not None:
            self._create(policy, uid)
        with self._guard:
            self._policies[(namespace, name)] = uid

    def _is_expected(self, key: tuple[str, str], uid: str) -> bool:
        """Created by this run lately (a Job of an earlier run of the same name is not)."""
        with self._guard:
            created = self._expected.get(key)
            if created is not None and (created[1] != uid or time.monotonic() - created[0] > EXPECTATION_TTL):
                del self._expected[key]
                created = None
        return created is not None

    def _forget(self, key: tuple[str, str], run: str) -> None:
        """The Job exists: nothing to expect, no refusal to report."""
        with self._guard:
            self._expected.pop(key, None)
            refused = self._refused.get((key[0], run), {})
            refused.pop(key[1], None)
            if not refused:
                self._refused.pop((key[0], run), None)


def suspended(job: Mapping[str, Any]) -> bool:
    """Whether the run has suspended this Job: spec.suspend set and marked as the run's doing."""
    annotations = job["metadata"].get("annotations") or {}
    return bool((job.get("spec") or {}).get("suspend")) and annotations.get(SUSPENDED_BY) == SUSPENDED_BY_RUN


def _api_message(exc: ApiException) -> str:
    """The API's own sentence from its Status body (e.g. "exceeded quota: ..."), else the body."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or exc.body or "").split())[:300]
