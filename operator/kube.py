"""The one module that talks to the Kubernetes API (with the official `kubernetes` client).

Every write is safe to repeat: a create reports 409 (the reconciler then reads whose the existing
object is: done if the run's own, never adopted otherwise), and the status write carries the
resourceVersion the plan was computed from, so a stale writer (a replica that lost its peering, a
handler thread still running after its operator died) gets 409 instead of moving status backwards.
"""
from __future__ import annotations

import json
import socket
import time
from datetime import datetime
from typing import Any, Callable, Mapping

import kubernetes
from kubernetes.client.exceptions import ApiException

from .naming import GROUP, KIND, PLURAL, VERSION
from .observe import SUSPENDED_BY, SUSPENDED_BY_RUN
from .planner import Event

COMPONENT = "selfalign-operator"
CONFLICT, NOT_FOUND, INVALID = 409, 404, 422
# Seconds to connect and to wait for a response: a half-open connection must fail the request
# (and the pass is retried) instead of hanging the pass and every later event of its run.
TIMEOUT = (10.0, 60.0)


class Kube:
    """Writes read the raw response (`_preload_content=False`): the operator never uses what a
    create returns, and building the client's model objects for every Job and Event is costly."""

    def __init__(self, api: kubernetes.client.ApiClient, timeout: tuple[float, float] = TIMEOUT):
        self.timeout = timeout
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.networking = kubernetes.client.NetworkingV1Api(api)
        self._create: dict[str, Callable[..., Any]] = {
            "Job": self.batch.create_namespaced_job,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
            "NetworkPolicy": self.networking.create_namespaced_network_policy,
        }
        self._read: dict[str, Callable[..., Any]] = {
            "Job": self.batch.read_namespaced_job,
            "Service": self.core.read_namespaced_service,
            "ConfigMap": self.core.read_namespaced_config_map,
            "NetworkPolicy": self.networking.read_namespaced_network_policy,
        }

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The run as stored now; None once it is gone."""
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                            _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise

    def write_status(self, run: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any] | None:
        """Replace the run's status through the status subresource, only if the run is still at the
        resourceVersion that was read. Returns the run as stored now; None when it moved on (its
        next event reconciles again)."""
        meta = run["metadata"]
        patch = merge_patch(run.get("status") or {}, status)
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
        try:
            return self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status in (CONFLICT, NOT_FOUND):
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a namespaced object; False when it exists already (an earlier pass made it)."""
        try:
            self._create[obj["kind"]](namespace=obj["metadata"]["namespace"], body=obj,
                                      _preload_content=False, _request_timeout=self.timeout).data
        except ApiException as exc:
            if exc.status == CONFLICT:
                return False
            raise
        return True

    def controller_uid(self, obj: Mapping[str, Any]) -> str | None:
        """The uid of the controller of the stored object with this one's kind and name; None when
        it has none or is gone."""
        meta = obj["metadata"]
        try:
            response = self._read[obj["kind"]](meta["name"], meta["namespace"], _preload_content=False,
                                               _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise
        refs = (json.loads(response.data).get("metadata") or {}).get("ownerReferences") or ()
        return next((ref.get("uid") for ref in refs if ref.get("controller")), None)

    def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        """Suspend a stage Job (the Job controller deletes its Pods at once) or resume it, marking
        it as suspended by the run (observe.SUSPENDED_BY), so that only what the run suspended is
        resumed and a Job that Kueue holds is left to Kueue. A Job already gone needs nothing."""
        body = {"metadata": {"annotations": {SUSPENDED_BY: SUSPENDED_BY_RUN if suspend else None}},
                "spec": {"suspend": suspend}}
        try:
            self.batch.patch_namespaced_job(name, namespace, body, _preload_content=False,
                                            _request_timeout=self.timeout).data
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise

    def update_config_map(self, config_map: Mapping[str, Any]) -> None:
        """Bring the ConfigMap's data to the current spec; create it if it is gone."""
        meta = config_map["metadata"]
        try:
            self.core.patch_namespaced_config_map(meta["name"], meta["namespace"], {"data": config_map.get("data", {})},
                                                  _preload_content=False, _request_timeout=self.timeout).data
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            self.create(config_map)

    def post_event(self, run: Mapping[str, Any], event: Event, now: datetime) -> None:
        """A core/v1 Event on the run, named as client-go names them (`<object>.<unix nanos hex>`)."""
        meta = run["metadata"]
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": event.type, "reason": event.reason, "message": event.message[:1024],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": socket.gethostname(),
        }
        self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False,
                                          _request_timeout=self.timeout).data


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: vanished keys become null."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(old.get(key), Mapping):
            patch[key] = merge_patch(old[key], value)
        else:
            patch[key] = value
    return patch


def compare_resource_versions(a: str | None, b: str | None) -> int | None:
    """-1, 0 or 1 as resourceVersion `a` is older than, the same as or newer than `b` (of one
    object); None when either is not the positive decimal integer that Kubernetes guarantees
    from 1.35 on (KEP-5504, client-go's CompareResourceVersion), so the caller must ask the API."""
    if not all(v and v.isdecimal() and v.isascii() and v[0] != "0" for v in (a, b)):
        return None
    x, y = int(a), int(b)
    return (x > y) - (x < y)
