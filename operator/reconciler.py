"""One reconcile pass of a run, and the memory that spares the API requests.

`Reconciler.request` is what every kopf event handler calls (handlers.py): it runs a run's passes
one at a time, coalescing the events that arrive during a pass into one more pass. A pass reads
kopf's indices (`Cache`), calls the pure planner, and acts through `Kube`, the one module that
talks to the API.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Mapping

from kubernetes.client.exceptions import ApiException

from . import metrics
from .jobs import build_config_map, build_stage_objects, owner_reference
from .kube import Kube, compare_resource_versions
from .naming import config_map_name
from .observe import observe_jobs
from .planner import EnsureJob, Event, JobObservation, plan
from .settings import OperatorSettings
from .spec import RunSpec, SpecError, parse_spec

EXPECTATION_TTL = 300.0  # seconds a created Job may take to show up in the index (as kube-controller-manager)
REFUSAL_BACKOFF = 30.0  # seconds before a refused Job create is tried again


@dataclass(frozen=True)
class Cache:
    """kopf's indices, kept current by the watch streams that also deliver the events: a pass
    observes runs, Jobs and Pods here and sends the API only its writes."""

    runs: Mapping
    run_jobs: Mapping
    job_pods: Mapping


class Reconciler:
    """One operator process's reconciler: the API, the settings, and memory that only saves
    requests: which runs are being reconciled (a burst of events becomes one more pass, never two
    overlapping ones), which Jobs were created but not seen yet, each run as this process last
    wrote it (newer than the watch until its echo arrives), each run's parsed spec and its
    ConfigMap as applied. And one observation the cluster cannot give back: which Job creates the
    API refused, and why (the planner keeps the stage Pending and says so; tried again after
    REFUSAL_BACKOFF)."""

    def __init__(self, kube: Kube, settings: OperatorSettings):
        self.kube, self.settings = kube, settings
        self._guard = threading.Lock()
        self._again: dict[tuple[str, str], bool] = {}  # run being reconciled -> another pass wanted
        self._expected: dict[tuple[str, str], float] = {}  # (namespace, Job) -> when it was created
        self._written: dict[tuple[str, str], dict[str, Any]] = {}  # run -> as our last status write stored it
        self._config_maps: dict[tuple[str, str], dict[str, str]] = {}  # (namespace, ConfigMap) -> data applied
        self._specs: dict[tuple[str, str], tuple[tuple, RunSpec | SpecError]] = {}  # run -> (uid, generation), spec
        self._refused: dict[tuple[str, str], dict[str, tuple[float, JobObservation]]] = {}  # run -> Job -> when, why
        self._retrying: set[tuple[str, str]] = set()  # runs with a retry of a refused create scheduled

    def request(self, namespace: str, name: str, cache: Cache, logger: Any) -> None:
        """Reconcile the run now, or, if a pass is under way in another thread, once more after it."""
        key = (namespace, name)
        with self._guard:
            if key in self._again:
                self._again[key] = True
                return
            self._again[key] = False
        try:
            while True:
                self.reconcile(namespace, name, cache, logger)
                with self._guard:
                    if not self._again[key]:
                        del self._again[key]
                        return
                    self._again[key] = False
        except BaseException:
            metrics.record_reconcile_error()
            with self._guard:
                self._again.pop(key, None)
            raise

    def reconcile(self, namespace: str, name: str, cache: Cache, logger: Any) -> None:
        # 1. The run as last seen; nothing to do once it is gone or going.
        run = self._load(namespace, name, cache.runs)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return
        # 2. Parse the spec; the planner turns a SpecError into a Failed run (InvalidSpec).
        spec = self._parse(run)
        # 3. Observe its Jobs and their Pods from the indices (no API request).
        jobs = list(cache.run_jobs.get((namespace, name), ()))
        pods = {job["metadata"]["name"]: list(cache.job_pods.get((namespace, job["metadata"]["name"]), ()))
                for job in jobs}
        observed = {**self._refusals(namespace, name), **observe_jobs(jobs, pods)}
        # 4. Decide.
        now = datetime.now(UTC)
        result = plan(spec, run.get("status"), observed, now, namespace=namespace, name=name,
                      generation=run["metadata"].get("generation", 1))
        # 5. Write status once, before any child exists; a 409 means a newer run version is coming.
        if result.status != (run.get("status") or {}):
            stored = self.kube.write_status(run, result.status)
            if stored is None:
                logger.info("status write conflicted; the run's next event reconciles it run=%s", name)
                return
            with self._guard:
                self._written[(namespace, name)] = stored
            metrics.record_status_change(run.get("status"), result.status)
            run = stored
        # 6. Make sure the Jobs the plan needs exist; a new refusal goes into status on another pass.
        for job in result.jobs:
            created = self._ensure(run, spec, job, seen={j["metadata"]["name"] for j in jobs}, now=now, logger=logger)
            if created is None:
                with self._guard:
                    self._again[(namespace, name)] = True
            elif created:
                metrics.observe_job_created(result.status, datetime.now(UTC))
        if self._refusals(namespace, name):
            self._retry_later(namespace, name, cache, logger)
        # 7. Tell the user what changed.
        for event in result.events:
            self.kube.post_event(run, event, now)

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
        echo arrives (the write would only get a 409; TTL-deleted Jobs could be re-created)."""
        key = (namespace, name)
        watched = next(iter(runs.get(key, ())), None)
        with self._guard:
            written = self._written.get(key)
            if watched is None:  # deleted (or not listed yet: its own event comes)
                self._written.pop(key, None)
                self._specs.pop(key, None)
                self._refused.pop(key, None)
                self._config_maps.pop((namespace, config_map_name(name)), None)
                return None
            if written is None:
                return watched
            order = compare_resource_versions(watched["metadata"].get("resourceVersion"),
                                              written["metadata"].get("resourceVersion"))
            if order is not None and order < 0:
                return written
            del self._written[key]
        return watched if order is not None else self.kube.get_run(namespace, name)

    def _ensure(self, run: Mapping[str, Any], spec: RunSpec, job: EnsureJob, *, seen: set[str],
                now: datetime, logger: Any) -> bool | None:
        """Create the Job unless it is seen, was just created, or was just refused. True when this
        call created it; None when the API refused it with a cause not known before."""
        namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
        key = (namespace, job.name)
        if job.name in seen:
            self._forget(key, run=name)
            return False
        if self._is_expected(key) or self._refused_lately(namespace, name, job.name):
            return False
        owner = owner_reference(run)
        created = False
        try:
            self._apply_config_map(build_config_map(spec, namespace=namespace, run_name=name, owner=owner))
            for obj in build_stage_objects(spec, job, namespace=namespace, run_name=name, owner=owner,
                                           settings=self.settings):
                if self.kube.create(obj) and obj["kind"] == "Job":
                    created = True
        except ApiException as exc:
            if exc.status is None or exc.status >= 500:
                raise
            # The API refused the object (quota, admission, validation): say so on the run.
            cause = f"creating Job {job.name} was refused: {exc.status} {exc.reason}: {_api_message(exc)}"
            logger.warning("job create refused job=%s status=%s", job.name, exc.status)
            with self._guard:
                refused = self._refused.setdefault((namespace, name), {})
                before = refused.get(job.name)
                refused[job.name] = (time.monotonic(), JobObservation(job.name, job.round, job.stage, "Refused",
                                                                      message=cause))
            if before is not None and before[1].message == cause:
                return False
            self.kube.post_event(run, Event("Warning", "CreateFailed", f"round {job.round} stage {job.stage}: {cause}"),
                                 now)
            return None
        self._forget(key, run=name)  # no refusal to report any more
        with self._guard:
            self._expected[key] = time.monotonic()
        return created

    def _refusals(self, namespace: str, run: str) -> dict[str, JobObservation]:
        """The run's Job creates that the API refused, as observations of those Jobs."""
        with self._guard:
            return {job: seen for job, (_, seen) in self._refused.get((namespace, run), {}).items()}

    def _retry_later(self, namespace: str, name: str, cache: Cache, logger: Any) -> None:
        """Reconcile the run again after REFUSAL_BACKOFF: a refused create may succeed later (quota
        freed) with nothing else happening to the run. One retry at a time per run."""
        key = (namespace, name)
        with self._guard:
            if key in self._retrying:
                return
            self._retrying.add(key)

        def retry() -> None:
            with self._guard:
                self._retrying.discard(key)
            try:
                self.request(namespace, name, cache, logger)
            except Exception:
                logger.exception("retrying a refused Job create failed run=%s", name)

        timer = threading.Timer(REFUSAL_BACKOFF, retry)
        timer.daemon = True
        timer.start()

    def _refused_lately(self, namespace: str, run: str, job: str) -> bool:
        with self._guard:
            refused = self._refused.get((namespace, run), {}).get(job)
        return refused is not None and time.monotonic() - refused[0] < REFUSAL_BACKOFF

    def _apply_config_map(self, config_map: Mapping[str, Any]) -> None:
        """Apply the run's spec ConfigMap once per content (the API is asked again after a restart)."""
        meta = config_map["metadata"]
        key, data = (meta["namespace"], meta["name"]), config_map.get("data", {})
        with self._guard:
            applied = self._config_maps.get(key)
        if applied == data:
            return
        self.kube.apply_config_map(config_map, exists=applied is not None)
        with self._guard:
            self._config_maps[key] = data

    def _is_expected(self, key: tuple[str, str]) -> bool:
        with self._guard:
            created = self._expected.get(key)
            if created is not None and time.monotonic() - created > EXPECTATION_TTL:
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


def _api_message(exc: ApiException) -> str:
    """The API's own sentence from its Status body (e.g. "exceeded quota: ..."), else the body."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or exc.body or "").split())[:300]
