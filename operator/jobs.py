"""Pure builders of every object the operator creates for a run: no I/O, no clock.

One Job per (round, stage) runs the stage contract
    python -m selfalign.stages STAGE --spec /etc/selfalign/spec.json --round K --run-uri URI \
        [--model URI] --scratch /scratch
with the run's resolved spec mounted from an owned ConfigMap. Training on more than one GPU goes
through `torchrun`; on more than one node (`spec.train.nodes > 1`) the Job is an Indexed Job whose
pods find rank 0 through a headless Service (`<job>-0.<service>`), the pattern the Kubernetes docs
give for Indexed Jobs with pod-to-pod communication. Names come from the planner's EnsureJob, so
the same inputs always give the same objects and a repeated create is a harmless 409.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from .lineage import stage_model
from .naming import (GROUP, KIND, LABEL_ROUND, LABEL_RUN, LABEL_STAGE, MAX_LABEL, MAX_NAME, VERSION,
                     config_map_name, job_name)
from .planner import EnsureJob, storage_prefix
from .settings import OperatorSettings
from .spec import STAGES, RunSpec, SpecError, StageResources, dump_spec, parse_spec

CONTAINER = "stage"
SPEC_DIR, SPEC_FILE = "/etc/selfalign", "spec.json"
SCRATCH = "/scratch"
PVC_ROOT = "/mnt/pvc"  # selfalign.stages.runtime.storage reads pvc://<claim>/<path> below <claim>/
EXIT_BAD_INPUT = 2  # selfalign.stages.__main__: bad input, so a retry cannot help
MASTER_PORT = 29500
STAGE_UID = 1000
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# `selfalign render` runs offline, before the cluster has given the run its uid.
OFFLINE_UID = "00000000-0000-0000-0000-000000000000"

Object = dict[str, Any]


def owner_reference(run: Mapping) -> Object:
    """Makes the run the controller of a child: deleting the run deletes its Jobs and Services."""
    return {
        "apiVersion": run["apiVersion"],
        "kind": run["kind"],
        "name": run["metadata"]["name"],
        "uid": run["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def label_value(name: str) -> str:
    """A run name as a label value (<= 63 characters): long ones are cut and given a hash."""
    if len(name) <= MAX_LABEL:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_LABEL - len(digest) - 1].rstrip('-.')}-{digest}"


def run_labels(run_name: str, component: str) -> dict[str, str]:
    return {
        LABEL_RUN: label_value(run_name),
        "app.kubernetes.io/name": "selfalign",
        "app.kubernetes.io/instance": label_value(run_name),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "selfalign-operator",
        "app.kubernetes.io/part-of": "selfalign",
    }


def stage_selector(run_name: str, round_: int, stage: str) -> dict[str, str]:
    """The labels that pick out exactly one stage Job's pods."""
    return {LABEL_RUN: label_value(run_name), LABEL_ROUND: str(round_), LABEL_STAGE: stage}


def build_config_map(spec: RunSpec, *, namespace: str, run_name: str, owner: dict) -> Object:
    """The resolved spec, defaults filled in, exactly as every stage pod reads it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(run_name),
            "namespace": namespace,
            "labels": run_labels(run_name, "spec"),
            "ownerReferences": [owner],
        },
        "data": {SPEC_FILE: json.dumps(dump_spec(spec), indent=2, sort_keys=True)},
    }


def build_stage_objects(spec: RunSpec, job: EnsureJob, *, namespace: str, run_name: str,
                        owner: dict, settings: OperatorSettings) -> list[Object]:
    """[Job], or [headless Service, Indexed Job] for training on more than one node."""
    if not _multi_node(spec, job.stage):
        return [_job(spec, job, namespace, run_name, owner, settings, service=None)]
    service = service_name(job.name)
    return [_service(job, service, namespace, run_name, owner),
            _job(spec, job, namespace, run_name, owner, settings, service=service)]


def render_round(manifest: dict, round_: int, settings: OperatorSettings) -> list[Object]:
    """Everything the operator would create for one round of this SelfAlignRun: its dry run."""
    kind = manifest.get("kind")
    if kind != KIND:
        raise SpecError([f"kind: expected {KIND}, got {kind!r}"])
    metadata = manifest.get("metadata") or {}
    if not metadata.get("name"):
        raise SpecError(["metadata.name: required"])
    name, namespace = metadata["name"], metadata.get("namespace") or "default"
    spec = parse_spec(settings.with_defaults(manifest.get("spec")))
    if not 0 <= round_ < spec.rounds:
        raise SpecError([f"round {round_}: spec.rounds is {spec.rounds}, "
                         f"so rounds are 0..{spec.rounds - 1}"])
    owner = owner_reference({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                             "metadata": {"name": name, "uid": OFFLINE_UID}})
    run = storage_prefix(spec, namespace, name, OFFLINE_UID)  # on a cluster: the run's own uid
    objects = [build_config_map(spec, namespace=namespace, run_name=name, owner=owner)]
    for stage in STAGES:
        ensure = EnsureJob(round_, stage, job_name(name, round_, stage), run,
                           stage_model(spec, run, round_, stage))
        objects += build_stage_objects(spec, ensure, namespace=namespace, run_name=name,
                                       owner=owner, settings=settings)
    return objects


def service_name(job: str) -> str:
    """The headless Service of a multi-node Job: a Service name must start with a letter."""
    return job if job[0].isalpha() else f"s{job}"[:MAX_NAME]


# --- the Job ---------------------------------------------------------------------------------

def _multi_node(spec: RunSpec, stage: str) -> bool:
    return stage == "train" and spec.train.nodes > 1


def _distributed(spec: RunSpec, stage: str) -> bool:
    return stage == "train" and (spec.train.nodes > 1 or spec.resources.train.gpus > 1)


def _job(spec: RunSpec, job: EnsureJob, namespace: str, run_name: str, owner: dict,
         settings: OperatorSettings, service: str | None) -> Object:
    labels = {**run_labels(run_name, job.stage), **stage_selector(run_name, job.round, job.stage)}
    metadata: Object = {"name": job.name, "namespace": namespace, "labels": dict(labels),
                        "ownerReferences": [owner]}
    if spec.queue_name:
        # Kueue's docs: label the Job with its LocalQueue; Kueue's webhook suspends it until the
        # workload is admitted, so the Job is not created suspended (that would hang without Kueue).
        metadata["labels"][QUEUE_LABEL] = spec.queue_name
    job_spec: Object = {
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": {"rules": [
            # Preemption, eviction and node drain are not the stage's fault: retry without counting.
            {"action": "Ignore",
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [EXIT_BAD_INPUT]}},
        ]},
        # A replacement pod starts only once the failed one is gone: never two ranks of one index.
        "podReplacementPolicy": "Failed",
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "template": {"metadata": {"labels": labels},
                     "spec": _pod_spec(spec, job, run_name, settings, service)},
    }
    if service is not None:
        nodes = spec.train.nodes
        # One rank failing brings every rank down (NCCL), so each index gets the run's whole retry
        # budget and the first index out of retries ends the Job; backoffLimit caps the same total.
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes,
                        backoffLimitPerIndex=spec.backoff_limit, maxFailedIndexes=0,
                        backoffLimit=spec.backoff_limit * nodes)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def _pod_spec(spec: RunSpec, job: EnsureJob, run_name: str, settings: OperatorSettings,
              service: str | None) -> Object:
    res = spec.stage_resources(job.stage)
    claims = _pvc_claims(spec)
    container = {
        "name": CONTAINER,
        "image": res.image or settings.images[job.stage],
        "imagePullPolicy": "IfNotPresent",
        "command": _command(spec, job),
        "env": _env(spec, job, service),
        "resources": _resources(res),
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            *({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}
              for i, claim in enumerate(claims)),
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }
    if spec.storage.secret_ref is not None:
        # Credentials reach the pod only from the Secret: never as values in any manifest.
        container["envFrom"] = [{"secretRef": {"name": spec.storage.secret_ref.name}}]
    pod: Object = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": STAGE_UID, "runAsGroup": STAGE_UID, "fsGroup": STAGE_UID,
            # Model folders hold many files: chown them only when the volume root does not match.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": config_map_name(run_name), "defaultMode": 0o444,
                                           "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
            {"name": "scratch", "emptyDir": {"sizeLimit": res.scratch_size}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": "tmp", "emptyDir": {}},
            *({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
              for i, claim in enumerate(claims)),
        ],
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                              for t in res.tolerations]
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    if service is not None:
        pod["subdomain"] = service
    return pod


def _stage_args(job: EnsureJob) -> list[str]:
    args = [job.stage, "--spec", f"{SPEC_DIR}/{SPEC_FILE}", "--round", str(job.round),
            "--run-uri", job.run_uri]
    if job.model:
        args += ["--model", job.model]
    return args + ["--scratch", SCRATCH]


def _command(spec: RunSpec, job: EnsureJob) -> list[str]:
    """The stage CLI, under torchrun when distributed (Kubernetes fills `$(VAR)` from the env)."""
    if not _distributed(spec, job.stage):
        return ["python", "-m", "selfalign.stages", *_stage_args(job)]
    return ["torchrun", "--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC_PER_NODE)",
            "--node-rank=$(NODE_RANK)", "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            "-m", "selfalign.stages", *_stage_args(job)]


def _env(spec: RunSpec, job: EnsureJob, service: str | None) -> list[Object]:
    env = [
        {"name": "SELFALIGN_SCRATCH", "value": SCRATCH},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        # The root filesystem is read-only: caches (vLLM, triton, matplotlib) go to volumes.
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH}/cache"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    if spec.storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": spec.storage.region})
    if _distributed(spec, job.stage):
        env += _torchrun_env(spec, job, service)
    return env


def _torchrun_env(spec: RunSpec, job: EnsureJob, service: str | None) -> list[Object]:
    gpus = spec.resources.train.gpus
    env = [
        {"name": "NNODES", "value": str(spec.train.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(max(gpus, 1))},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    if service is None:
        return env + [{"name": "MASTER_ADDR", "value": "127.0.0.1"},
                      {"name": "NODE_RANK", "value": "0"}]
    # An Indexed Job's pod is named <job>-<index> in DNS under its subdomain: rank 0 is the master.
    return env + [
        {"name": "MASTER_ADDR", "value": f"{job.name}-0.{service}"},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
    ]


def _resources(res: StageResources) -> Object:
    """Requests equal limits (Guaranteed QoS: the last pods a node evicts); GPUs as a limit."""
    amounts = {key: value for key, value in (("cpu", res.cpu), ("memory", res.memory)) if value}
    resources: Object = {}
    if amounts:
        resources = {"requests": dict(amounts), "limits": dict(amounts)}
    if res.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = res.gpus
    return resources


def _pvc_claims(spec: RunSpec) -> list[str]:
    """Claims named by any pvc:// input of the spec, each mounted read-only in every stage pod."""
    uris = (spec.model.base, spec.seeds, spec.coverage.reference, spec.coverage.embedder)
    return sorted({uri.removeprefix("pvc://").split("/", 1)[0]
                   for uri in uris if uri.startswith("pvc://")})


def _service(job: EnsureJob, service: str, namespace: str, run_name: str, owner: dict) -> Object:
    """Headless, and publishing pods before they are ready: rank 0 must resolve while it starts."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service,
            "namespace": namespace,
            "labels": {**run_labels(run_name, job.stage),
                       **stage_selector(run_name, job.round, job.stage)},
            "ownerReferences": [owner],
        },
        "spec": {
            "clusterIP": "None",
            "selector": stage_selector(run_name, job.round, job.stage),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "torch-dist", "port": MASTER_PORT, "targetPort": MASTER_PORT,
                       "protocol": "TCP"}],
        },
    }
