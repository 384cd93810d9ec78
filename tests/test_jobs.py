"""The stage Job builders: every manifest is valid Kubernetes, deterministic, hardened, and wired
to the stage contract (command, spec mount, storage env, multi-node rendezvous)."""
from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
import yaml

from selfalign.operator import jobs
from selfalign.operator.lineage import stage_model
from selfalign.operator.naming import LABEL_ROUND, LABEL_RUN, LABEL_STAGE, config_map_name, job_name
from selfalign.operator.planner import EnsureJob, storage_prefix
from selfalign.operator.settings import OperatorSettings, default_images
from selfalign.operator.spec import STAGES, SpecError, deep_merge, dump_spec, parse_spec
from tests.fixtures.crd import admit

K8S_VERSION = "1.33"  # podFailurePolicy, successPolicy and podReplacementPolicy are GA here
MIN_K8S_VERSION = "1.31"  # the chart's kubeVersion: successPolicy is beta there, on by default
NAMESPACE = "research"
SETTINGS = OperatorSettings(images={s: f"registry.test/selfalign/{s}:1.0" for s in STAGES},
                            job_ttl_seconds=3600)
LONG_NAME = "campaign-" + "x" * 51  # 60 characters
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

BASE_SPEC = {
    "recipe": "isheep",
    "rounds": 3,
    "model": {"base": "file:///models/base"},
    "seeds": "file:///data/seeds.jsonl",
    "storage": {"uri": "file:///runs"},
    "coverage": {"reference": "file:///data/reference.jsonl"},
}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
HF_TOKEN = {"secretRef": {"name": "hf-token"}}
MODELS_PVC = {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
RUN_TEMPLATE = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}},
    "spec": {"serviceAccountName": "selfalign-irsa", "imagePullSecrets": [{"name": "registry"}],
             "volumes": [MODELS_PVC],
             "containers": [{"name": "stage", "envFrom": [HF_TOKEN],
                             "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                             "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}]},
}
TRAIN_TEMPLATE = {
    "metadata": {"labels": {"team": "nlp-train"}},
    "spec": {"runtimeClassName": "nvidia", "schedulerName": "gang",
             "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                 {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
             "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                            "whenUnsatisfiable": "DoNotSchedule"}],
             "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models-fast"}}],
             "containers": [{"name": "stage", "env": [{"name": "HF_HUB_OFFLINE", "value": "0"},
                                                      {"name": "NCCL_DEBUG", "value": "INFO"}]}]},
}
# name -> (run name, overrides merged over BASE_SPEC)
VARIANTS = {
    "cpu-default": ("tiny", {}),
    "one-gpu": ("one-gpu", {"resources": {s: {"gpus": 1} for s in STAGES}}),
    "eight-gpus": ("eight", {"resources": {"train": {"gpus": 8, "cpu": "32", "memory": "256Gi"}}}),
    "four-nodes": ("multi", {"train": {"nodes": 4},
                             "resources": {"train": {"gpus": 8, "shmSize": "64Gi"}}}),
    "kueue": ("queued", {"queueName": "team-a"}),
    "pvc-inputs": ("on-pvc", {"model": {"base": "pvc://models/llama-3-8b"},
                              "coverage": {"reference": "pvc://corpora/wiki/ref.jsonl"}}),
    "image-override": ("custom", {"resources": {"assess": {"image": "registry.test/judge:7"}}}),
    "scheduling": ("placed", {"resources": {"train": {
        "gpus": 2, "nodeSelector": {"gpu.type": "h100"}, "tolerations": [TOLERATION],
        "priorityClassName": "research-high"}}}),
    "s3-secret": ("s3run", {"storage": {
        "uri": "s3://bucket/runs", "endpoint": "http://minio.storage:9000", "region": "eu-west-1",
        "secretRef": {"name": "s3-creds"}}}),
    "long-name": (LONG_NAME, {"train": {"nodes": 2}, "resources": {"train": {"gpus": 4}}}),
    # A custom resource's name may be a DNS subdomain; a Service or pod hostname may not.
    "dotted-name": ("team.a-run", {"train": {"nodes": 2}, "resources": {"train": {"gpus": 4}}}),
    "placed-pods": ("placed-pods", {
        "train": {"nodes": 2},
        "storage": {"uri": "s3://bucket/runs", "secretRef": {"name": "s3-creds"}},
        "podTemplate": RUN_TEMPLATE,
        "resources": {"train": {"gpus": 8, "activeDeadlineSeconds": 86400, "podTemplate": TRAIN_TEMPLATE}}}),
    "model-cache": ("cached", {"storage": {"uri": "s3://bucket/runs"}, "train": {"nodes": 2},
                               "resources": {"train": {"gpus": 8}}, "modelCache": {"claimName": "models"}}),
}
DNS_1123_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_1035_LABEL = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"


def make_spec(overrides: dict):
    return parse_spec(deep_merge(BASE_SPEC, overrides))


def owner_for(run_name: str) -> dict:
    return jobs.owner_reference({"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun",
                                 "metadata": {"name": run_name, "uid": f"uid-{run_name}"}})


def ensure(spec, run_name: str, round_: int, stage: str, uid: str | None = None) -> EnsureJob:
    run = storage_prefix(spec, NAMESPACE, run_name, uid)
    return EnsureJob(round_, stage, job_name(run_name, round_, stage), run,
                     stage_model(spec, run, round_, stage))


def build(variant: str, stage: str, round_: int = 1) -> list[dict]:
    run_name, overrides = VARIANTS[variant]
    spec = make_spec(overrides)
    return jobs.build_stage_objects(spec, ensure(spec, run_name, round_, stage),
                                    namespace=NAMESPACE, run_name=run_name,
                                    owner=owner_for(run_name), settings=SETTINGS)


def manifest_for(variant: str, namespace: str | None = NAMESPACE) -> dict:
    run_name, overrides = VARIANTS[variant]
    metadata = {"name": run_name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "metadata": metadata,
            "spec": deep_merge(BASE_SPEC, overrides)}


def the_job(objects: list[dict]) -> dict:
    [job] = [o for o in objects if o["kind"] == "Job"]
    return job


def container(job: dict) -> dict:
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(job)["env"]}


ALL_CASES = [(v, s) for v in VARIANTS for s in STAGES]


@pytest.mark.parametrize(("variant", "stage"), ALL_CASES)
def test_every_built_object_is_valid_kubernetes(variant, stage):
    run_name, overrides = VARIANTS[variant]
    spec = make_spec(overrides)
    objects = build(variant, stage) + [
        jobs.build_config_map(spec, namespace=NAMESPACE, run_name=run_name,
                              owner=owner_for(run_name))]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_names_are_deterministic_short_and_distinct_per_round_and_stage(variant):
    names = set()
    for round_ in range(3):
        for stage in STAGES:
            first, again = build(variant, stage, round_), build(variant, stage, round_)
            assert first == again
            job = the_job(first)
            assert job["metadata"]["name"] == job_name(VARIANTS[variant][0], round_, stage)
            assert all(len(o["metadata"]["name"]) <= 63 for o in first)
            names.add(job["metadata"]["name"])
    assert len(names) == 3 * len(STAGES)


@pytest.mark.parametrize(("variant", "stage"), ALL_CASES)
def test_labels_and_owner_reference_on_job_and_pods(variant, stage):
    run_name = VARIANTS[variant][0]
    expected = {
        LABEL_RUN: run_name, LABEL_ROUND: "1", LABEL_STAGE: stage,
        "app.kubernetes.io/name": "selfalign", "app.kubernetes.io/instance": run_name,
        "app.kubernetes.io/component": stage, "app.kubernetes.io/managed-by": "selfalign-operator",
        "app.kubernetes.io/part-of": "selfalign",
    }
    for obj in build(variant, stage):
        assert obj["metadata"]["labels"].items() >= expected.items()
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "name": run_name,
            "uid": f"uid-{run_name}", "controller": True, "blockOwnerDeletion": True}]
        assert obj["metadata"]["namespace"] == NAMESPACE
    added = jobs.pod_overrides(make_spec(VARIANTS[variant][1]), stage, SETTINGS).get("metadata", {})
    assert the_job(build(variant, stage))["spec"]["template"]["metadata"]["labels"] == {
        **added.get("labels", {}), **expected}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_child_names_are_dns_labels_for_any_run_name(variant):
    """Services are DNS-1035 labels; an Indexed Job's pods get the hostname `<job>-<index>`, and
    each Job name is its Pods' job-name label: both DNS-1123 labels (issue 13: `team.a-run`)."""
    run_name, overrides = VARIANTS[variant]
    spec = make_spec(overrides)
    objects = [o for stage in STAGES for o in build(variant, stage)]
    objects.append(jobs.build_config_map(spec, namespace=NAMESPACE, run_name=run_name, owner=owner_for(run_name)))
    for obj in objects:
        name = obj["metadata"]["name"]
        assert re.fullmatch(DNS_1035_LABEL if obj["kind"] == "Service" else DNS_1123_LABEL, name), name
        if obj["kind"] == "Job":
            nodes = int(obj["spec"].get("completions") or 1)
            assert all(re.fullmatch(DNS_1123_LABEL, f"{name}-{index}") for index in range(max(nodes, 1024)))
            assert re.fullmatch(DNS_1035_LABEL, obj["spec"]["template"]["spec"].get("subdomain", "s"))


def test_run_names_that_differ_only_by_a_dot_get_distinct_children():
    assert job_name("team.a-run", 0, "train") != job_name("team-a-run", 0, "train")
    assert config_map_name("team.a-run") != config_map_name("team-a-run")


def test_label_value_keeps_long_run_names_valid_and_distinct():
    a, b = "r" * 100, "r" * 99 + "s"
    assert jobs.label_value(LONG_NAME) == LONG_NAME
    assert len(jobs.label_value(a)) <= 63 and jobs.label_value(a) != jobs.label_value(b)


@pytest.mark.parametrize(("variant", "stage"), ALL_CASES)
def test_pods_are_hardened(variant, stage):
    job = the_job(build(variant, stage))
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert container(job)["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["restartPolicy"] == "Never"
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    assert "/tmp" in mounts and mounts["/etc/selfalign"]["readOnly"] is True
    assert env_of(job)["HOME"]["value"] == "/tmp"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_credential_values_anywhere_and_secret_only_through_env_from(variant, monkeypatch):
    for key in CREDENTIAL_KEYS:
        monkeypatch.setenv(key, f"SENTINEL-{key}")
    spec = make_spec(VARIANTS[variant][1])
    objects = jobs.render_round(manifest_for(variant), 0, SETTINGS)
    text = yaml.safe_dump_all(objects)
    assert "SENTINEL" not in text
    for job in (o for o in objects if o["kind"] == "Job"):
        assert not set(env_of(job)) & set(CREDENTIAL_KEYS)
        if spec.storage.secret_ref:
            assert container(job)["envFrom"][-1] == {"secretRef": {"name": "s3-creds"}}  # shadowed by none
        else:
            assert "envFrom" not in container(job)


def test_storage_endpoint_and_region_reach_the_stage_env():
    with_s3 = env_of(the_job(build("s3-secret", "synthesize")))
    assert with_s3["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert with_s3["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    local = env_of(the_job(build("cpu-default", "synthesize")))
    assert "AWS_ENDPOINT_URL" not in local and "AWS_DEFAULT_REGION" not in local
    assert local["HF_HOME"]["value"] == "/scratch/hf"
    assert local["SELFALIGN_SCRATCH"]["value"] == "/scratch"


@pytest.mark.parametrize(("variant", "stage", "gpus"), [
    ("cpu-default", "train", 0), ("one-gpu", "synthesize", 1), ("one-gpu", "coverage", 1),
    ("eight-gpus", "train", 8), ("eight-gpus", "merge", 0), ("four-nodes", "train", 8)])
def test_gpu_limits(variant, stage, gpus):
    resources = container(the_job(build(variant, stage)))["resources"]
    assert resources.get("limits", {}).get("nvidia.com/gpu", 0) == gpus
    assert "nvidia.com/gpu" not in resources.get("requests", {})


def test_cpu_and_memory_are_requested_and_limited():
    resources = container(the_job(build("eight-gpus", "train")))["resources"]
    assert resources == {"requests": {"cpu": "32", "memory": "256Gi"},
                         "limits": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 8}}
    assert container(the_job(build("cpu-default", "assess")))["resources"] == {}


@pytest.mark.parametrize("stage", STAGES)
def test_kueue_queue_label_only_when_set_and_job_not_created_suspended(stage):
    queued = the_job(build("kueue", stage))
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in queued["spec"]["template"]["metadata"]["labels"]
    assert "suspend" not in queued["spec"]
    unqueued = the_job(build("cpu-default", stage))
    assert "kueue.x-k8s.io/queue-name" not in unqueued["metadata"]["labels"]


@pytest.mark.parametrize(("variant", "stage"), ALL_CASES)
def test_stage_command_follows_the_stage_contract(variant, stage):
    job = the_job(build(variant, stage))
    command = container(job)["command"]
    run_name, overrides = VARIANTS[variant]
    expected = ensure(make_spec(overrides), run_name, 1, stage)
    tail = command[command.index("selfalign.stages") + 1:]
    assert tail[:7] == [stage, "--spec", "/etc/selfalign/spec.json", "--round", "1",
                        "--run-uri", expected.run_uri]
    assert tail[-2:] == ["--scratch", "/scratch"]
    if expected.model:
        assert tail[7:9] == ["--model", expected.model]
    else:
        assert "--model" not in tail


def test_spec_is_handed_over_through_the_owned_config_map():
    spec = make_spec(VARIANTS["s3-secret"][1])
    cm = jobs.build_config_map(spec, namespace=NAMESPACE, run_name="s3run",
                               owner=owner_for("s3run"))
    assert cm["metadata"]["name"] == config_map_name("s3run")
    assert cm["metadata"]["ownerReferences"] == [owner_for("s3run")]
    assert parse_spec(json.loads(cm["data"]["spec.json"])) == spec
    assert json.loads(cm["data"]["spec.json"]) == dump_spec(spec)
    pod = the_job(build("s3-secret", "assess"))["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert volume["configMap"]["items"] == [{"key": "spec.json", "path": "spec.json"}]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": "/etc/selfalign", "readOnly": True}


def test_image_comes_from_the_run_override_else_the_operator_settings():
    assess = container(the_job(build("image-override", "assess")))
    assert assess["image"] == "registry.test/judge:7"
    assert assess["imagePullPolicy"] == "IfNotPresent"
    train = container(the_job(build("image-override", "train")))
    assert train["image"] == "registry.test/selfalign/train:1.0"


def test_node_selector_tolerations_and_priority_class():
    pod = the_job(build("scheduling", "train"))["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu.type": "h100"}
    assert pod["tolerations"] == [TOLERATION]
    assert pod["priorityClassName"] == "research-high"
    other = the_job(build("scheduling", "assess"))["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(other)


def test_pvc_inputs_are_mounted_read_only_where_storage_reads_them(tmp_path, monkeypatch):
    from selfalign.stages.runtime import storage

    pod = the_job(build("pvc-inputs", "train"))["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"models", "corpora"}
    assert all(v["persistentVolumeClaim"]["readOnly"] for v in claims.values())
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    for claim, volume in claims.items():
        assert mounts[volume["name"]] == {"name": volume["name"], "mountPath": f"/mnt/pvc/{claim}",
                                          "readOnly": True}
    # The storage module finds pvc://<claim>/<path> at <PVC_ROOT>/<claim>/<path>: inside the mount.
    assert str(storage.PVC_ROOT) == jobs.PVC_ROOT
    monkeypatch.setattr(storage, "PVC_ROOT", tmp_path)
    (tmp_path / "models" / "llama-3-8b").mkdir(parents=True)
    resolved = storage.local_path("pvc://models/llama-3-8b", tmp_path / "scratch")
    mount = PurePosixPath(mounts[claims["models"]["name"]]["mountPath"])
    assert PurePosixPath(jobs.PVC_ROOT) / resolved.relative_to(tmp_path) == mount / "llama-3-8b"
    assert not any("persistentVolumeClaim" in v for v in
                   the_job(build("cpu-default", "train"))["spec"]["template"]["spec"]["volumes"])


@pytest.mark.parametrize(("variant", "stage"),
                         [("cpu-default", "synthesize"), ("four-nodes", "train")])
def test_shm_and_scratch_volumes_are_sized_from_the_spec(variant, stage):
    res = make_spec(VARIANTS[variant][1]).stage_resources(stage)
    job = the_job(build(variant, stage))
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": res.shm_size}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": res.scratch_size}
    mounts = {m["name"]: m["mountPath"] for m in container(job)["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm" and mounts["scratch"] == "/scratch"


@pytest.mark.parametrize(("variant", "stage"), ALL_CASES)
def test_failure_handling_and_cleanup(variant, stage):
    job = the_job(build(variant, stage))
    spec = job["spec"]
    disrupted = "FailJob" if "completionMode" in spec else "Ignore"  # a group fails as one
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": disrupted, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]}},
    ]
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["podReplacementPolicy"] == "Failed"
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container(job)["terminationMessagePath"] == "/dev/termination-log"
    if "completionMode" not in spec:
        assert spec["backoffLimit"] == make_spec(VARIANTS[variant][1]).backoff_limit


def test_single_node_training_is_one_plain_job():
    job = the_job(build("cpu-default", "train"))
    assert container(job)["command"][:3] == ["python", "-m", "selfalign.stages"]
    assert not {"NNODES", "NODE_RANK", "MASTER_ADDR"} & set(env_of(job))
    assert "completionMode" not in job["spec"]
    one_gpu = the_job(build("one-gpu", "train"))
    assert container(one_gpu)["command"][0] == "python"


def test_single_node_multi_gpu_training_uses_torchrun_on_localhost():
    objects = build("eight-gpus", "train")
    assert [o["kind"] for o in objects] == ["Job"]
    job = the_job(objects)
    assert container(job)["command"][:9] == [
        "python", "-c", jobs.TORCHRUN, "--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC_PER_NODE)",
        "--node-rank=$(NODE_RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
        "-m"]
    env = env_of(job)
    expected = {"NNODES": "1", "NPROC_PER_NODE": "8", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
    assert {k: env[k]["value"] for k in expected} == expected
    assert container(the_job(build("eight-gpus", "merge")))["command"][:3] == ["python", "-m", "selfalign.stages"]


@pytest.mark.parametrize("variant", ["four-nodes", "long-name"])
def test_multi_node_training_is_an_indexed_job_behind_a_headless_service(variant):
    run_name, overrides = VARIANTS[variant]
    spec = make_spec(overrides)
    nodes, gpus = spec.train.nodes, spec.resources.train.gpus
    service, job = build(variant, "train")
    assert (service["kind"], job["kind"]) == ("Service", "Job")
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", nodes, nodes)
    pod = js["template"]["spec"]
    assert pod["subdomain"] == svc
    # Each pod's hostname is <job>-<index>: it must stay a valid DNS label for the last index.
    assert len(f"{name}-{nodes - 1}") <= 63
    env = env_of(job)
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{svc}"
    assert env["NODE_RANK"]["valueFrom"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["NNODES"]["value"] == str(nodes)
    assert env["NPROC_PER_NODE"]["value"] == str(gpus)
    assert env["MASTER_PORT"]["value"] == "29500"
    assert container(job)["command"][:3] == ["python", "-c", jobs.TORCHRUN]
    ss = service["spec"]
    assert ss["clusterIP"] == "None" and ss["publishNotReadyAddresses"] is True
    assert ss["ports"][0]["port"] == 29500


def test_multi_node_service_selects_exactly_its_jobs_pods():
    service, job = build("four-nodes", "train", round_=1)
    selector = service["spec"]["selector"].items()
    assert job["spec"]["template"]["metadata"]["labels"].items() >= selector
    others = [the_job(build(v, s, r))
              for v in ("four-nodes", "cpu-default") for s in STAGES for r in range(3)]
    matching = [o["metadata"]["name"] for o in others
                if o["spec"]["template"]["metadata"]["labels"].items() >= selector]
    assert matching == [job["metadata"]["name"]]


def test_service_name_starts_with_a_letter():
    assert jobs.service_name("run-r0-train") == "run-r0-train"
    named = jobs.service_name("1" * 54 + "-r0-train")
    assert named[0].isalpha() and len(named) <= 63


def test_owner_reference_from_a_run_body():
    body = {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun",
            "metadata": {"name": "demo", "namespace": "ns", "uid": "1234-abcd"}, "spec": {}}
    assert jobs.owner_reference(body) == {
        "apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "name": "demo",
        "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}


@pytest.mark.parametrize(("variant", "round_"),
                         [("cpu-default", 0), ("four-nodes", 2), ("pvc-inputs", 1)])
def test_render_round_is_the_runs_dry_run(variant, round_):
    run_name, overrides = VARIANTS[variant]
    objects = jobs.render_round(manifest_for(variant), round_, SETTINGS)
    spec = make_spec(overrides)
    train_kinds = ["Service", "Job"] if spec.train.nodes > 1 else ["Job"]
    expected_kinds = ["ConfigMap"] + [
        kind for s in STAGES for kind in (train_kinds if s == "train" else ["Job"])]
    assert [o["kind"] for o in objects] == expected_kinds
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == jobs.OFFLINE_UID
    rendered_jobs = [o for o in objects if o["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in rendered_jobs] == [
        job_name(run_name, round_, s) for s in STAGES]
    assert rendered_jobs == [the_job(jobs.build_stage_objects(
        spec, ensure(spec, run_name, round_, s, jobs.OFFLINE_UID), namespace=NAMESPACE, run_name=run_name,
        owner=jobs.owner_reference({"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun",
                                    "metadata": {"name": run_name, "uid": jobs.OFFLINE_UID}}),
        settings=SETTINGS)) for s in STAGES]


@pytest.mark.parametrize(("manifest", "message"), [
    ({"kind": "SelfAlignRun", "metadata": {"name": "r"}, "spec": BASE_SPEC},
     "round 3: spec.rounds is 3"),
    ({"kind": "Job", "metadata": {"name": "r"}, "spec": BASE_SPEC}, "kind: expected SelfAlignRun"),
    ({"kind": "SelfAlignRun", "metadata": {}, "spec": BASE_SPEC}, "metadata.name: required"),
    ({"kind": "SelfAlignRun", "metadata": {"name": "r"}, "spec": {**BASE_SPEC, "rounds": 0}},
     "spec.rounds"),
])
def test_render_round_rejects_what_the_operator_could_not_run(manifest, message):
    with pytest.raises(SpecError, match=message):
        jobs.render_round(manifest, 3, SETTINGS)


def test_render_round_defaults_the_namespace():
    objects = jobs.render_round(manifest_for("cpu-default", namespace=None), 0, SETTINGS)
    assert {o["metadata"]["namespace"] for o in objects} == {"default"}
    command = container(objects[1])["command"]
    assert command[command.index("--run-uri") + 1] == f"file:///runs/default/tiny/{jobs.OFFLINE_UID}"


def test_settings_from_env_overrides_images_and_ttl():
    settings = OperatorSettings.from_env({"SELFALIGN_IMAGE_TRAIN": "mirror.test/train:9",
                                          "SELFALIGN_JOB_TTL_SECONDS": "7200"})
    defaults = default_images()
    assert settings.images == {**defaults, "train": "mirror.test/train:9"}
    assert settings.job_ttl_seconds == 7200
    assert OperatorSettings.from_env({}).job_ttl_seconds == 7 * 86400
    assert defaults["synthesize"] == defaults["assess"] and defaults["train"] == defaults["merge"]
    assert defaults["coverage"].startswith("ghcr.io/selfalign/stage-coverage:")
    assert defaults["train"].startswith("ghcr.io/selfalign/stage-train:")


@pytest.mark.parametrize(("environ", "message"), [
    ({"SELFALIGN_JOB_TTL_SECONDS": "a week"}, "SELFALIGN_JOB_TTL_SECONDS: expected a whole number"),
    ({"SELFALIGN_JOB_TTL_SECONDS": "-1"}, "SELFALIGN_JOB_TTL_SECONDS: must be >= 3600"),
    # A failed Job deleted before the operator saw it would be created again and again.
    ({"SELFALIGN_JOB_TTL_SECONDS": "0"}, "SELFALIGN_JOB_TTL_SECONDS: must be >= 3600"),
    ({"SELFALIGN_STAGE_RESOURCES": "{gpus: 1}"}, "SELFALIGN_STAGE_RESOURCES: invalid JSON"),
    ({"SELFALIGN_STAGE_RESOURCES": '{"trian": {"gpus": 1}}'}, "SELFALIGN_STAGE_RESOURCES: expected"),
])
def test_settings_from_env_rejects_bad_values_naming_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        OperatorSettings.from_env(environ)


def test_operator_default_stage_resources_apply_unless_the_run_sets_them():
    defaults = '{"train": {"gpus": 8, "memory": "96Gi"}, "synthesize": {"gpus": 1}}'
    settings = OperatorSettings.from_env({"SELFALIGN_STAGE_RESOURCES": defaults})
    manifest = {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "metadata": {"name": "r"},
                "spec": {**BASE_SPEC, "resources": {"train": {"gpus": 2}}}}
    objects = {o["metadata"]["name"]: o for o in jobs.render_round(manifest, 0, settings) if o["kind"] == "Job"}
    train = objects["r-r0-train"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    synth = objects["r-r0-synth"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert train["limits"]["nvidia.com/gpu"] == 2 and train["limits"]["memory"] == "96Gi"
    assert synth["limits"]["nvidia.com/gpu"] == 1


def test_operator_default_stage_resources_apply_to_a_run_as_the_api_server_stored_it():
    """The CRD writes gpus: 0, shmSize and scratchSize into every stored run: those values must
    not hide the operator's defaults (issue 13: the chart's GPUs never reached a Job)."""
    settings = OperatorSettings.from_env({"SELFALIGN_STAGE_RESOURCES": json.dumps(
        {stage: {"gpus": 1, "shmSize": "8Gi"} for stage in STAGES})})
    manifest = admit({"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "metadata": {"name": "r"},
                      "spec": {**BASE_SPEC, "resources": {"merge": {"gpus": 2, "shmSize": "2Gi"}}}})
    assert manifest["spec"]["resources"]["train"]["gpus"] == 0  # what the API server stored
    for job in (o for o in jobs.render_round(manifest, 0, settings) if o["kind"] == "Job"):
        pod = job["spec"]["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        shm = next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "shm")
        merge = job["metadata"]["labels"][LABEL_STAGE] == "merge"
        assert (gpus, shm) == ((2, "2Gi") if merge else (1, "8Gi")), job["metadata"]["name"]


def test_settings_need_an_image_for_every_stage():
    with pytest.raises(ValueError, match="no image for stage"):
        OperatorSettings(images={"train": "x"})


# --- pod template overrides (issue 14 item 1) ----------------------------------------------------

CHART_TEMPLATE = {"metadata": {"annotations": {"sidecar.istio.io/inject": "true", "cost-center": "ml"}},
                  "spec": {"serviceAccountName": "selfalign-stages", "imagePullSecrets": [{"name": "mirror"}],
                           "containers": [{"name": "stage", "envFrom": [{"configMapRef": {"name": "proxy"}}],
                                           "env": [{"name": "HF_HUB_OFFLINE", "value": "chart"}]}]}}


def chart_settings(**extra) -> OperatorSettings:
    env = {"SELFALIGN_POD_TEMPLATE": json.dumps(CHART_TEMPLATE), **extra}
    return OperatorSettings.from_env(env)


def test_pod_template_layers_merge_chart_then_run_then_stage():
    run_name, overrides = VARIANTS["placed-pods"]
    spec = make_spec(overrides)
    settings = chart_settings()
    train, assess = (the_job(jobs.build_stage_objects(spec, ensure(spec, run_name, 0, stage), namespace=NAMESPACE,
                                                      run_name=run_name, owner=owner_for(run_name), settings=settings))
                     for stage in ("train", "assess"))
    for job in (train, assess):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        meta, pod = job["spec"]["template"]["metadata"], job["spec"]["template"]["spec"]
        # annotations: the chart's, the run's value winning where both set one
        assert meta["annotations"] == {"sidecar.istio.io/inject": "false", "cost-center": "ml"}
        assert pod["serviceAccountName"] == "selfalign-irsa"  # the run's over the chart's
        assert pod["imagePullSecrets"] == [{"name": "mirror"}, {"name": "registry"}]  # merged by name
        assert container(job)["envFrom"] == [{"configMapRef": {"name": "proxy"}}, HF_TOKEN,
                                             {"secretRef": {"name": "s3-creds"}}]
    assert train["spec"]["template"]["metadata"]["labels"]["team"] == "nlp-train"
    assert assess["spec"]["template"]["metadata"]["labels"]["team"] == "nlp"
    train_pod, assess_pod = train["spec"]["template"]["spec"], assess["spec"]["template"]["spec"]
    # volumes merged by name: the stage's `models` replaces the run's whole
    assert [v for v in train_pod["volumes"] if v["name"] == "models"] == [
        {"name": "models", "persistentVolumeClaim": {"claimName": "models-fast"}}]
    assert [v for v in assess_pod["volumes"] if v["name"] == "models"] == [MODELS_PVC]
    # env merged by name: chart < run < stage
    assert env_of(train)["HF_HUB_OFFLINE"]["value"] == "0" and env_of(assess)["HF_HUB_OFFLINE"]["value"] == "1"
    assert "NCCL_DEBUG" in env_of(train) and "NCCL_DEBUG" not in env_of(assess)
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container(train)["volumeMounts"]
    assert (train_pod["runtimeClassName"], train_pod["schedulerName"]) == ("nvidia", "gang")
    assert train_pod["affinity"] == TRAIN_TEMPLATE["spec"]["affinity"]
    assert train_pod["topologySpreadConstraints"] == TRAIN_TEMPLATE["spec"]["topologySpreadConstraints"]
    assert not {"runtimeClassName", "schedulerName", "affinity", "topologySpreadConstraints"} & set(assess_pod)


def test_overrides_leave_the_hardening_and_the_stage_contract_as_they_were():
    run_name, overrides = VARIANTS["placed-pods"]
    bare = json.loads(json.dumps(overrides))
    del bare["podTemplate"], bare["resources"]["train"]["podTemplate"]
    for stage in STAGES:
        placed, plain = (the_job(jobs.build_stage_objects(
            spec, ensure(spec, run_name, 1, stage), namespace=NAMESPACE, run_name=run_name,
            owner=owner_for(run_name), settings=SETTINGS)) for spec in (make_spec(overrides), make_spec(bare)))
        placed_pod, plain_pod = placed["spec"]["template"]["spec"], plain["spec"]["template"]["spec"]
        for key, value in plain_pod.items():
            if key not in ("volumes", "containers"):
                assert placed_pod[key] == value, key
        assert placed_pod["volumes"][:len(plain_pod["volumes"])] == plain_pod["volumes"]
        for key, value in container(plain).items():
            if key in ("env", "volumeMounts", "envFrom"):  # the operator's first, then the additions
                assert container(placed)[key][:len(value)] == value or key == "envFrom", key
            else:
                assert container(placed)[key] == value, key
        assert placed["spec"] == {**plain["spec"], "template": placed["spec"]["template"]}
        labels = placed["spec"]["template"]["metadata"]["labels"]
        assert labels.items() >= plain["spec"]["template"]["metadata"]["labels"].items()


def test_every_env_volume_and_mount_of_the_stage_contract_is_reserved():
    """spec.py refuses overrides of exactly what jobs.py builds (an override could not break it)."""
    from selfalign.operator import spec as typed

    for variant, stage in ALL_CASES:
        job = the_job(build(variant, stage))
        added = jobs.pod_overrides(make_spec(VARIANTS[variant][1]), stage, SETTINGS).get("spec", {})
        [extra] = added.get("containers") or [{}]
        ours = set(env_of(job)) - {e["name"] for e in extra.get("env", [])}
        assert ours and all(name in typed.RESERVED_ENV or name.startswith("SELFALIGN_") for name in ours)
        user = {v["name"] for v in added.get("volumes", [])}
        for volume in job["spec"]["template"]["spec"]["volumes"]:
            if volume["name"] not in user:
                assert volume["name"] in typed.RESERVED_VOLUMES or volume["name"].startswith("pvc-")
        for mount in container(job)["volumeMounts"]:
            if mount["name"] not in user:
                assert typed._reserved_mount(mount["mountPath"]), mount


@pytest.mark.parametrize(("template", "message"), [
    ({"spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]}}, "SELFALIGN_POD_TEMPLATE: spec.volumes.0.name"),
    ({"spec": {"containers": [{"name": "stage", "command": ["sh"]}]}}, "spec.containers.0.command"),
    ({"metadata": {"labels": {"selfalign.dev/run": "x"}}}, "metadata.labels"),
])
def test_the_charts_pod_template_is_held_to_the_same_rules(template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OperatorSettings.from_env({"SELFALIGN_POD_TEMPLATE": json.dumps(template)})
    with pytest.raises(ValueError, match="SELFALIGN_POD_TEMPLATE: invalid JSON"):
        OperatorSettings.from_env({"SELFALIGN_POD_TEMPLATE": "{spec:"})


def test_render_shows_the_overrides(tmp_path, capsys, monkeypatch):
    """`selfalign render` prints the Jobs with the chart's, the run's and the stage's overrides."""
    from selfalign.operator.cli.main import main

    path = tmp_path / "run.yaml"
    manifest = manifest_for("placed-pods")
    manifest["spec"] |= {"model": {"base": "pvc://models/llama-3-8b"}, "seeds": "s3://bucket/seeds.jsonl",
                         "coverage": {"reference": "s3://bucket/reference.jsonl"}}
    path.write_text(yaml.safe_dump(manifest))
    monkeypatch.setenv("SELFALIGN_POD_TEMPLATE", json.dumps(CHART_TEMPLATE))
    assert main(["render", str(path), "--round", "0"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    train = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["labels"][LABEL_STAGE] == "train")
    pod = train["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "selfalign-irsa" and pod["runtimeClassName"] == "nvidia"
    assert train["spec"]["template"]["metadata"]["annotations"]["cost-center"] == "ml"
    assert train["spec"]["activeDeadlineSeconds"] == 86400


# --- deadlines (issue 14 item 2) -------------------------------------------------------------------

def test_active_deadline_from_the_stage_else_the_chart_else_none():
    assert the_job(build("placed-pods", "train"))["spec"]["activeDeadlineSeconds"] == 86400
    assert "activeDeadlineSeconds" not in the_job(build("placed-pods", "assess"))["spec"]
    settings = OperatorSettings.from_env({"SELFALIGN_STAGE_RESOURCES": json.dumps(
        {"train": {"activeDeadlineSeconds": 172800}, "synthesize": {"activeDeadlineSeconds": 21600}})})
    for variant, expected in (("placed-pods", 86400), ("cpu-default", 172800)):
        objects = jobs.render_round(admit(manifest_for(variant)), 0, settings)
        by_stage = {o["metadata"]["labels"][LABEL_STAGE]: o["spec"] for o in objects if o["kind"] == "Job"}
        assert by_stage["train"]["activeDeadlineSeconds"] == expected
        assert by_stage["synthesize"]["activeDeadlineSeconds"] == 21600
        assert "activeDeadlineSeconds" not in by_stage["merge"]


# --- multi-node train as one group (issue 14 item 6, the Job) ---------------------------------------

@pytest.mark.parametrize("version", [MIN_K8S_VERSION, K8S_VERSION])
def test_a_multi_node_job_succeeds_with_rank_0_and_fails_whole(version):
    job = the_job(build("four-nodes", "train"))
    kubernetes_validate.validate(job, version, strict=True)
    spec = job["spec"]
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["backoffLimit"] == 0
    assert not {"backoffLimitPerIndex", "maxFailedIndexes"} & set(spec)  # no index retried alone
    assert [rule["action"] for rule in spec["podFailurePolicy"]["rules"]] == ["FailJob", "FailJob"]
    single = the_job(build("eight-gpus", "train"))["spec"]
    assert "successPolicy" not in single and single["backoffLimit"] == 2


@pytest.mark.slow
def test_torchrun_launcher_keeps_bad_input_apart_from_a_crash(tmp_path):
    """torchrun alone exits 1 for a worker's 2; the Job's command must exit 2 (FailJob) for it."""
    import subprocess
    import sys

    from tests.fixtures.s3 import free_port

    command = container(the_job(build("eight-gpus", "train")))["command"]
    launcher = command[:3]
    assert launcher[:2] == ["python", "-c"]
    codes = {}
    for worker_exit in (1, 2):
        script = tmp_path / f"exit{worker_exit}.py"
        script.write_text(f"import sys\nsys.exit({worker_exit})\n")
        done = subprocess.run([sys.executable, "-c", launcher[2], "--nnodes=1", "--nproc-per-node=1",
                               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script)],
                              capture_output=True, text=True, timeout=300)
        codes[worker_exit] = done.returncode
    assert codes == {1: 1, 2: 2}


# --- Kueue priority (issue 14 item 5, pass-through) --------------------------------------------------

def test_kueue_priority_class_label_of_the_run_reaches_every_job():
    manifest = manifest_for("kueue")
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": "research-high", "team": "nlp"}
    objects = jobs.render_round(manifest, 0, SETTINGS)
    for job in (o for o in objects if o["kind"] == "Job"):
        labels = job["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/priority-class"] == "research-high"
        assert "team" not in labels  # only Kueue's label passes
    plain = jobs.render_round(manifest_for("kueue"), 0, SETTINGS)
    assert not any("kueue.x-k8s.io/priority-class" in o["metadata"]["labels"] for o in plain)


# --- the run's NetworkPolicy (issue 14 item 7) --------------------------------------------------------

def policy(egress) -> dict:
    settings = OperatorSettings.from_env({"SELFALIGN_NETWORK_POLICY": json.dumps({"egress": egress})})
    return jobs.build_network_policy(namespace=NAMESPACE, run_name="multi", owner=owner_for("multi"),
                                     settings=settings)


DNS = {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
       "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def test_network_policy_admits_only_the_runs_train_peers():
    assert jobs.build_network_policy(namespace=NAMESPACE, run_name="multi", owner=owner_for("multi"),
                                     settings=SETTINGS) is None
    open_egress = policy(None)
    kubernetes_validate.validate(open_egress, K8S_VERSION, strict=True)
    assert open_egress["metadata"]["ownerReferences"] == [owner_for("multi")]
    spec = open_egress["spec"]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    [rule] = spec["ingress"]
    assert "ports" not in rule  # NCCL listens on ephemeral ports
    [peer] = rule["from"]
    selected = spec["podSelector"]["matchLabels"].items()
    # it selects every pod of this run's Jobs, and admits only this run's train pods
    objects = [o for v, r in (("four-nodes", 1), ("cpu-default", 0)) for s in STAGES for o in build(v, s, r)]
    pods = [(o["spec"]["template"]["metadata"]["labels"], o["metadata"]["name"]) for o in objects if o["kind"] == "Job"]
    assert {name for labels, name in pods if labels.items() >= selected} == {
        job_name("multi", 1, s) for s in STAGES}
    assert [name for labels, name in pods if labels.items() >= peer["podSelector"]["matchLabels"].items()] == [
        job_name("multi", 1, "train")]


def test_network_policy_restricts_egress_to_peers_and_the_charts_rules():
    restricted = policy([DNS])
    kubernetes_validate.validate(restricted, K8S_VERSION, strict=True)
    assert restricted["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert restricted["spec"]["egress"] == [{"to": restricted["spec"]["ingress"][0]["from"]}, DNS]


def test_render_includes_the_network_policy_when_enabled():
    settings = OperatorSettings.from_env({"SELFALIGN_NETWORK_POLICY": '{"egress": null}'})
    kinds = [o["kind"] for o in jobs.render_round(manifest_for("cpu-default"), 0, settings)]
    assert kinds[:2] == ["ConfigMap", "NetworkPolicy"]
    assert "NetworkPolicy" not in [o["kind"] for o in jobs.render_round(manifest_for("cpu-default"), 0, SETTINGS)]


@pytest.mark.parametrize("raw", ['{"egress": {}}', '{"ingress": []}', "[]", "{egress"])
def test_network_policy_setting_rejects_other_shapes(raw):
    with pytest.raises(ValueError, match="SELFALIGN_NETWORK_POLICY"):
        OperatorSettings.from_env({"SELFALIGN_NETWORK_POLICY": raw})
