"""Pure builders of every object the operator creates for a run: no I/O, no clock.

One Job per (round, stage) runs the stage contract
    python -m selfalign.stages STAGE --spec /etc/selfalign/spec.json --round K --run-uri URI \
        [--model URI] --scratch /scratch
with the run's resolved spec mounted from an owned ConfigMap. Training on more than one GPU goes
through `torchrun`; on more than one node (`spec.train.nodes > 1`) the Job is an Indexed Job whose
pods find rank 0 through a headless Service (`<job>-0.<service>`), the pattern the Kubernetes docs
give for Indexed Jobs with pod-to-pod communication. Names come from the planner's EnsureJob, so
the same inputs always give the same objects and a repeated create is a harmless 409.

Pod template overrides (the chart's, then `spec.podTemplate`, then the stage's) are merged over
the hardened pod; what they may not touch (the stage's env, volumes and mounts) spec.py refuses.

How a stage Job fails, the contract with the planner:
- exit code 2 (bad input) fails the Job at once (podFailurePolicy FailJob): a retry cannot help;
- single node: any other failure is retried in place up to `spec.backoffLimit`; a disrupted pod
  (preemption, eviction, drain: DisruptionTarget) is replaced without counting;
- several nodes (Indexed Job): the Job succeeds when index 0 (rank 0, which writes the manifest)
  succeeds (successPolicy; beta and on by default from Kubernetes 1.31, GA in 1.33), and any
  failed or disrupted pod fails the whole Job at once (backoffLimit 0, podFailurePolicy FailJob),
  so no index restarts alone while its peers wait in a collective. The planner then creates the
  whole train Job again as a new attempt, unless a pod exited with 2;
- `activeDeadlineSeconds` fails any Job that runs longer (reason DeadlineExceeded).
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
MODEL_CACHE = "/model-cache"  # spec.modelCache's claim; storage keeps s3:// models there (MODEL_CACHE_ENV)
EXIT_BAD_INPUT = 2  # selfalign.stages.__main__: bad input, so a retry cannot help
MASTER_PORT = 29500
STAGE_UID = 1000
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue reads a Job's WorkloadPriorityClass from this label: set on the run, it reaches every Job.
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
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
                        owner: dict, settings: OperatorSettings,
                        labels_of_run: Mapping[str, str] | None = None) -> list[Object]:
    """[Job], or [headless Service, Indexed Job] for training on more than one node.
    `labels_of_run`: the run's metadata.labels, of which Kueue's priority class goes to the Job."""
    passed = {key: value for key, value in (labels_of_run or {}).items() if key == PRIORITY_LABEL}
    if not _multi_node(spec, job.stage):
        return [_job(spec, job, namespace, run_name, owner, settings, None, passed)]
    service = service_name(job.name)
    return [_service(job, service, namespace, run_name, owner),
            _job(spec, job, namespace, run_name, owner, settings, service, passed)]


def build_network_policy(*, namespace: str, run_name: str, owner: dict,
                         settings: OperatorSettings) -> Object | None:
    """The run's NetworkPolicy (when the chart enables it): its stage pods admit traffic only from
    the run's own train pods, on every port: torch's rendezvous store listens on MASTER_PORT
    (29500), but NCCL's bootstrap and socket transport (and gloo) listen on ephemeral ports that
    no setting pins. Egress is open unless the chart restricts it to the train peers plus its
    rules (DNS and the storage endpoint, say)."""
    if settings.network_policy is None:
        return None
    run = {LABEL_RUN: label_value(run_name), "app.kubernetes.io/managed-by": "selfalign-operator"}
    peers = [{"podSelector": {"matchLabels": {**run, LABEL_STAGE: "train"}}}]
    spec: Object = {"podSelector": {"matchLabels": run}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": peers}]}
    egress = settings.network_policy.get("egress")
    if egress is not None:
        spec["policyTypes"].append("Egress")
        spec["egress"] = [{"to": peers}, *egress]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": run_name, "namespace": namespace,  # a DNS subdomain, as the run's
                         "labels": run_labels(run_name, "network"), "ownerReferences": [owner]},
            "spec": spec}


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
    policy = build_network_policy(namespace=namespace, run_name=name, owner=owner, settings=settings)
    objects += [policy] if policy else []
    for stage in STAGES:
        ensure = EnsureJob(round_, stage, job_name(name, round_, stage), run,
                           stage_model(spec, run, round_, stage))
        objects += build_stage_objects(spec, ensure, namespace=namespace, run_name=name,
                                       owner=owner, settings=settings,
                                       labels_of_run=metadata.get("labels"))
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
         settings: OperatorSettings, service: str | None, passed: Mapping[str, str]) -> Object:
    labels = {**run_labels(run_name, job.stage), **stage_selector(run_name, job.round, job.stage)}
    metadata: Object = {"name": job.name, "namespace": namespace, "labels": {**labels, **passed},
                        "ownerReferences": [owner]}
    if spec.queue_name:
        # Kueue's docs: label the Job with its LocalQueue; Kueue's webhook suspends it until the
        # workload is admitted, so the Job is not created suspended (that would hang without Kueue).
        metadata["labels"][QUEUE_LABEL] = spec.queue_name
    overrides = pod_overrides(spec, job.stage, settings)
    pod_metadata = overrides.get("metadata", {})
    template_metadata: Object = {"labels": {**pod_metadata.get("labels", {}), **labels}}
    if pod_metadata.get("annotations"):
        template_metadata["annotations"] = dict(pod_metadata["annotations"])
    bad_input = {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                      "values": [EXIT_BAD_INPUT]}}
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    job_spec: Object = {
        "backoffLimit": spec.backoff_limit,
        "podFailurePolicy": {"rules": [
            # Preemption, eviction and node drain are not the stage's fault: retry without counting.
            {"action": "Ignore", "onPodConditions": disrupted},
            bad_input,
        ]},
        # A replacement pod starts only once the failed one is gone: never two ranks of one index.
        "podReplacementPolicy": "Failed",
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "template": {"metadata": template_metadata,
                     "spec": _pod_spec(spec, job, run_name, settings, service, overrides.get("spec", {}))},
    }
    deadline = spec.stage_resources(job.stage).active_deadline_seconds
    if deadline is not None:
        job_spec["activeDeadlineSeconds"] = deadline
    if service is not None:
        nodes = spec.train.nodes
        # The ranks work as one (a collective waits for every rank): the Job is done when rank 0
        # is, and fails as a whole the moment any pod fails or is disrupted (the module docstring).
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes,
                        backoffLimit=0, successPolicy={"rules": [{"succeededIndexes": "0"}]},
                        podFailurePolicy={"rules": [
                            {"action": "FailJob", "onPodConditions": disrupted}, bad_input]})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


# Lists merged item by item on these keys (the patchMergeKeys of kubectl's strategic merge patch
# for these Pod fields, which the Python client does not implement); a later item of the same key
# replaces the earlier one whole.
MERGE_KEYS = {"imagePullSecrets": ("name",), "volumes": ("name",), "containers": ("name",),
              "env": ("name",), "volumeMounts": ("mountPath",),
              "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable")}
# Replaced whole by a later layer: merging two affinities or two selectors term by term would
# build a rule that neither layer wrote.
ATOMIC = {"nodeAffinity", "podAffinity", "podAntiAffinity"}


def pod_overrides(spec: RunSpec, stage: str, settings: OperatorSettings) -> Object:
    """The chart's pod template, the run's and the stage's, merged in that order (later wins):
    mappings key by key, named lists by name, envFrom lists appended (Kubernetes applies them in
    order), anything else replaced."""
    merged: Object = {}
    for layer in (settings.pod_template, spec.pod_template, spec.stage_resources(stage).pod_template):
        if layer is not None:
            merged = _merge(merged, layer.model_dump(mode="json", by_alias=True, exclude_none=True,
                                                     exclude_defaults=True))
    return merged


def _merge(base: Object, over: Mapping[str, Any]) -> Object:
    out = dict(base)
    for key, value in over.items():
        if key in MERGE_KEYS:
            out[key] = _merge_items(out.get(key, []), value, MERGE_KEYS[key], deep=key == "containers")
        elif key == "envFrom":
            out[key] = [*out.get(key, []), *(item for item in value if item not in out.get(key, []))]
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ATOMIC:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _merge_items(base: list[Object], over: list[Object], keys: tuple[str, ...], deep: bool) -> list[Object]:
    items = {tuple(item.get(k) for k in keys): item for item in base}
    for item in over:
        key = tuple(item.get(k) for k in keys)
        items[key] = _merge(items[key], item) if deep and key in items else item
    return list(items.values())


def _pod_spec(spec: RunSpec, job: EnsureJob, run_name: str, settings: OperatorSettings,
              service: str | None, overrides: Mapping[str, Any]) -> Object:
    res = spec.stage_resources(job.stage)
    [added] = overrides.get("containers") or [{}]
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
            *([{"name": "model-cache", "mountPath": MODEL_CACHE}] if spec.model_cache else []),
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }
    container["env"] += added.get("env", [])
    container["volumeMounts"] += added.get("volumeMounts", [])
    env_from = list(added.get("envFrom", []))
    if spec.storage.secret_ref is not None:
        # Credentials reach the pod only from the Secret: never as values in any manifest. Last,
        # so that no other Secret given as env shadows the storage keys.
        env_from.append({"secretRef": {"name": spec.storage.secret_ref.name}})
    if env_from:
        container["envFrom"] = env_from
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
            *([{"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.model_cache.claim_name}}]
              if spec.model_cache else []),
        ],
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                              for t in res.tolerations]
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    pod["volumes"] += overrides.get("volumes", [])
    pod.update({key: value for key, value in overrides.items() if key not in ("volumes", "containers")})
    if service is not None:
        pod["subdomain"] = service
    return pod


def _stage_args(job: EnsureJob) -> list[str]:
    args = [job.stage, "--spec", f"{SPEC_DIR}/{SPEC_FILE}", "--round", str(job.round),
            "--run-uri", job.run_uri]
    if job.model:
        args += ["--model", job.model]
    return args + ["--scratch", SCRATCH]


# torchrun itself exits 1 whatever code its workers exit with (its main re-raises the agent's
# ChildFailedError), so bad input (2) would count as a crash and be retried. This runs torchrun's
# own main and exits 2 when any worker of this node did.
TORCHRUN = f"""\
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as exc:
    sys.exit({EXIT_BAD_INPUT} if any(f.exitcode == {EXIT_BAD_INPUT} for f in exc.failures.values()) else 1)
"""


def _command(spec: RunSpec, job: EnsureJob) -> list[str]:
    """The stage CLI, under torchrun when distributed (Kubernetes fills `$(VAR)` from the env)."""
    if not _distributed(spec, job.stage):
        return ["python", "-m", "selfalign.stages", *_stage_args(job)]
    return ["python", "-c", TORCHRUN, "--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC_PER_NODE)",
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
    if spec.model_cache:
        env.append({"name": "SELFALIGN_MODEL_CACHE", "value": MODEL_CACHE})
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
