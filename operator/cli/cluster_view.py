"""The cluster as the CLI user sees it: SelfAlignRuns, their stage Pods' logs, and the spec
fields a user changes (`suspend`, `retry`), through the user's kubeconfig.

The operator's own API calls are in kube.py; these are the user's, with the user's identity:
they read what `kubectl get sar` reads and write only a run's spec, the same fields a GitOps
commit would change, so the CLI and GitOps drive the operator through one mechanism.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..naming import GROUP, KIND, LABEL_JOB, PLURAL, VERSION
from .report import Run, RunRow


class ClusterError(Exception):
    """The cluster refused or could not be reached: one line the user can act on."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status of a refusal


@dataclass(frozen=True)
class Cluster:
    api: Any  # kubernetes.client.ApiClient
    namespace: str  # -n, else the kubeconfig context's namespace, else "default"


def connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
    """A client for the kubeconfig's context (KUBECONFIG or ~/.kube/config when not given)."""
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        if chosen is None:
            raise ClusterError(f"no context {context!r} in the kubeconfig")
        api = config.new_client_from_config(config_file=kubeconfig, context=chosen["name"])
    except config.ConfigException as exc:
        raise ClusterError(f"kubeconfig: {exc}") from None
    return Cluster(api, namespace or chosen.get("context", {}).get("namespace") or "default")


def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """One API call; its refusal as a ClusterError naming the status and the API's message."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return method(*args, **kwargs)
    except ApiException as exc:
        try:
            message = json.loads(exc.body).get("message")
        except (TypeError, ValueError):
            message = None
        raise ClusterError(f"{exc.status} {exc.reason}: {message or exc.body or ''}".rstrip(": "),
                           exc.status) from None
    except HTTPError as exc:
        raise ClusterError(f"cannot reach the cluster: {exc}") from None


def _custom(cluster: Cluster) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api)


def get_run(cluster: Cluster, name: str) -> dict[str, Any]:
    try:
        return _call(_custom(cluster).get_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL,
                     name)
    except ClusterError as exc:
        if exc.status == 404:
            raise ClusterError(f"no {KIND} {name!r} in namespace {cluster.namespace}", 404) from None
        raise


def list_runs(cluster: Cluster, all_namespaces: bool) -> list[dict[str, Any]]:
    custom = _custom(cluster)
    if all_namespaces:
        found = _call(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
    else:
        found = _call(custom.list_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL)
    return sorted(found.get("items") or [], key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))


def watch_runs(cluster: Cluster, all_namespaces: bool,
               name: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(ADDED | MODIFIED | DELETED, object) of each SelfAlignRun (or only `name`) every time it
    changes, from a watch (no polling) that is resumed where it left off when the API server
    ends it."""
    from kubernetes import watch

    custom = _custom(cluster)
    if all_namespaces:
        method, args = custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
    else:
        method, args = custom.list_namespaced_custom_object, (GROUP, VERSION, cluster.namespace, PLURAL)
    options = {"field_selector": f"metadata.name={name}"} if name else {}
    while True:
        stream = watch.Watch().stream(method, *args, **options)
        try:
            while (event := _call(next, stream, None)) is not None:
                obj = event["object"]
                options["resource_version"] = obj["metadata"].get("resourceVersion")
                if event["type"] in ("ADDED", "MODIFIED", "DELETED") and name in (None, obj["metadata"]["name"]):
                    yield event["type"], obj
        except ClusterError as exc:
            if exc.status != 410:  # Gone: the version is too old to resume from; start afresh
                raise
            options.pop("resource_version", None)


def patch_spec(cluster: Cluster, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Merge `spec` into the run's spec (a JSON merge patch: only these fields change)."""
    get_run(cluster, name)  # a clear "no such run" before a patch's 404
    return _call(_custom(cluster).patch_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL,
                 name, {"spec": spec})


def stage_pods(cluster: Cluster, job: str) -> list[dict[str, Any]]:
    """The Pods of a stage Job (an Indexed train Job has one per node), oldest first."""
    from kubernetes import client

    response = _call(client.CoreV1Api(cluster.api).list_namespaced_pod, cluster.namespace,
                     label_selector=f"{LABEL_JOB}={job}", _preload_content=False)
    pods = [p for p in json.loads(response.data).get("items") or []
            if (p["metadata"].get("labels") or {}).get(LABEL_JOB) == job]
    return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))


def pod_log(cluster: Cluster, pod: str, follow: bool) -> Iterator[str]:
    """The Pod's log, streamed line by line while it runs when `follow`."""
    from kubernetes import client

    response = _call(client.CoreV1Api(cluster.api).read_namespaced_pod_log, pod, cluster.namespace,
                     follow=follow, _preload_content=False)
    for line in response.stream(decode_content=True) if follow else [response.data]:
        yield line.decode(errors="replace")


# --- what the CLI shows of a SelfAlignRun (pure) -------------------------------------------------

def row(obj: dict[str, Any], with_namespace: bool) -> RunRow:
    meta = obj["metadata"]
    return RunRow(meta["name"], obj.get("status") or {}, obj.get("spec") or {},
                  meta.get("namespace") if with_namespace else None)


def as_run(obj: dict[str, Any]) -> Run:
    """The run as `selfalign status` reads it: status and spec from the object, no artifacts
    (they are under its storage prefix, which the CLI user need not be able to read)."""
    from ..planner import storage_prefix
    from ..spec import SpecError, parse_spec

    meta, spec = obj["metadata"], obj.get("spec") or {}
    try:
        uri = storage_prefix(parse_spec(spec), meta.get("namespace"), meta["name"], meta.get("uid"))
    except SpecError:
        uri = ""  # an invalid spec: no stage ever ran, nothing is stored
    return Run(meta["name"], uri, obj.get("status") or {}, {}, spec=spec)
