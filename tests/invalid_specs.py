"""SelfAlignRun specs as plain data: invalid ones with the field their error must name, and valid ones.

Shared by the agreement test of the CRD schema and the typed spec (tests/test_crd.py) and by the
operator integration test: an invalid spec with `schema_rejects` is refused by the CRD (schema or
CEL) before the operator sees it; the others reach the operator, which must fail the run with
reason InvalidSpec naming `field`, and create no Job.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

REMOVE = object()  # in a change: delete this key from the base spec


def valid_base() -> dict[str, Any]:
    """A minimal valid spec (camelCase, as in a manifest): the recipe preset supplies the rest."""
    return {
        "recipe": "isheep",
        "rounds": 2,
        "model": {"base": "file:///models/tiny"},
        "seeds": "file:///data/seed_tasks.jsonl",
        "storage": {"uri": "s3://selfalign-test/runs"},
        "coverage": {"reference": "file:///data/reference.jsonl"},
    }


def variant(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (default: valid_base()) with `changes` merged in at any depth; REMOVE deletes a key."""
    spec = copy.deepcopy(valid_base() if base is None else base)
    for key, value in changes.items():
        if value is REMOVE:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = variant(value, spec[key])
        else:
            spec[key] = copy.deepcopy(value)
    return spec


@dataclass(frozen=True)
class InvalidSpec:
    id: str
    spec: dict[str, Any]
    field: str  # the field path the error must name, e.g. spec.train.loraRank
    schema_rejects: bool  # the CRD's schema and CEL rules alone reject it (no recipe preset needed)


def _case(id_: str, changes: dict[str, Any], field: str, schema_rejects: bool = True) -> InvalidSpec:
    return InvalidSpec(id_, variant(changes), field, schema_rejects)


def _stage_resources(stage: str, **fields: Any) -> dict[str, Any]:
    return {"resources": {stage: fields}}


INVALID: list[InvalidSpec] = [
    # top level
    _case("recipe-missing", {"recipe": REMOVE}, "spec.recipe"),
    _case("recipe-unknown", {"recipe": "alpaca"}, "spec.recipe"),
    _case("rounds-zero", {"rounds": 0}, "spec.rounds"),
    _case("rounds-over-100", {"rounds": 101}, "spec.rounds"),
    _case("rounds-string", {"rounds": "3"}, "spec.rounds"),
    _case("unknown-field", {"roundz": 3}, "spec.roundz"),
    _case("suspend-not-boolean", {"suspend": "yes"}, "spec.suspend"),
    _case("backoff-limit-negative", {"backoffLimit": -1}, "spec.backoffLimit"),
    _case("queue-name-upper-case", {"queueName": "Team-A"}, "spec.queueName"),
    # model, seeds, storage
    _case("model-base-missing", {"model": {"base": REMOVE, "dtype": "bfloat16"}}, "spec.model.base"),
    _case("model-base-scheme", {"model": {"base": "gs://models/qwen"}}, "spec.model.base"),
    _case("model-dtype-unknown", {"model": {"dtype": "int8"}}, "spec.model.dtype"),
    _case("seeds-missing", {"seeds": REMOVE}, "spec.seeds"),
    _case("storage-uri-scheme", {"storage": {"uri": "http://bucket/runs"}}, "spec.storage.uri"),
    _case("storage-endpoint-no-scheme", {"storage": {"endpoint": "minio:9000"}}, "spec.storage.endpoint"),
    _case("storage-secret-name-empty", {"storage": {"secretRef": {"name": ""}}}, "spec.storage.secretRef.name"),
    _case("storage-endpoint-on-file", {"storage": {"uri": "file:///runs", "endpoint": "http://minio:9000"}},
          "spec.storage.endpoint"),
    _case("storage-secret-on-file", {"storage": {"uri": "file:///runs", "secretRef": {"name": "s3"}}},
          "spec.storage.secretRef"),
    # synthesize
    _case("seed-examples-over-32", {"synthesize": {"seedExamples": 33}}, "spec.synthesize.seedExamples"),
    _case("examples-sum-written", {"synthesize": {"seedExamples": 20, "machineExamples": 20}},
          "spec.synthesize.seedExamples"),
    _case("seed-sampling-unknown", {"synthesize": {"seedSampling": "weighted"}}, "spec.synthesize.seedSampling"),
    _case("top-p-zero", {"synthesize": {"instructionSampling": {"topP": 0}}},
          "spec.synthesize.instructionSampling.topP"),
    _case("temperature-over-5", {"synthesize": {"responseSampling": {"temperature": 6}}},
          "spec.synthesize.responseSampling.temperature"),
    _case("max-tokens-written-over-context", {"synthesize": {"responseSampling": {"maxTokens": 8192}}},
          "spec.synthesize.responseSampling.maxTokens"),
    # assess
    _case("judge-unknown", {"assess": {"judge": "gpt-4"}}, "spec.assess.judge"),
    _case("rules-unknown", {"assess": {"rules": ["alpaca"]}}, "spec.assess.rules[0]"),
    _case("rules-repeated", {"assess": {"rules": ["isheep", "isheep"]}}, "spec.assess.rules"),
    _case("threshold-over-10", {"assess": {"threshold": {"quality": 11}}}, "spec.assess.threshold.quality"),
    _case("rouge-l-zero", {"assess": {"dedup": {"rougeL": 0}}}, "spec.assess.dedup.rougeL"),
    # train
    _case("lora-rank-zero", {"train": {"loraRank": 0}}, "spec.train.loraRank"),
    _case("lora-dropout-one", {"train": {"loraDropout": 1.0}}, "spec.train.loraDropout"),
    _case("learning-rate-negative", {"train": {"learningRate": -1.0e-4}}, "spec.train.learningRate"),
    _case("zero-stage-4", {"train": {"zeroStage": 4}}, "spec.train.zeroStage"),
    _case("scheduler-unknown", {"train": {"scheduler": "step"}}, "spec.train.scheduler"),
    _case("train-from-unknown", {"train": {"from": "scratch"}}, "spec.train.from"),
    _case("unknown-nested-field", {"train": {"loraRnk": 8}}, "spec.train.loraRnk"),
    _case("target-modules-empty", {"train": {"targetModules": []}}, "spec.train.targetModules"),
    _case("target-modules-repeated", {"train": {"targetModules": ["q_proj", "q_proj"]}}, "spec.train.targetModules"),
    _case("all-linear-mixed", {"train": {"targetModules": ["all-linear", "q_proj"]}}, "spec.train.targetModules"),
    _case("multi-node-without-gpus", {"train": {"nodes": 2}}, "spec.train.nodes"),
    # merge, coverage, engine
    _case("merge-tolerance-zero", {"merge": {"tolerance": 0}}, "spec.merge.tolerance"),
    _case("coverage-missing", {"coverage": REMOVE}, "spec.coverage"),
    _case("coverage-reference-scheme", {"coverage": {"reference": "/data/ref.jsonl"}}, "spec.coverage.reference"),
    _case("coverage-similarity-over-1", {"coverage": {"similarity": 2}}, "spec.coverage.similarity"),
    _case("coverage-k-zero", {"coverage": {"k": 0}}, "spec.coverage.k"),
    _case("gpu-memory-utilization-over-1", {"engine": {"gpuMemoryUtilization": 1.5}},
          "spec.engine.gpuMemoryUtilization"),
    _case("tensor-parallel-over-gpus", {"engine": {"tensorParallelSize": 4}, **_stage_resources("synthesize", gpus=2)},
          "spec.engine.tensorParallelSize"),
    # resources
    _case("gpus-negative", _stage_resources("train", gpus=-1), "spec.resources.train.gpus"),
    _case("gpus-over-64", _stage_resources("train", gpus=65), "spec.resources.train.gpus"),
    _case("cpu-not-a-quantity", _stage_resources("synthesize", cpu="two"), "spec.resources.synthesize.cpu"),
    _case("memory-not-a-quantity", _stage_resources("train", memory="16GB"), "spec.resources.train.memory"),
    _case("resources-unknown-stage", {"resources": {"evaluate": {"gpus": 1}}}, "spec.resources.evaluate"),
    _case("toleration-effect-unknown", _stage_resources("train", tolerations=[{"key": "gpu", "effect": "Evict"}]),
          "spec.resources.train.tolerations[0].effect"),
    _case("toleration-exists-with-value",
          _stage_resources("train", tolerations=[{"key": "gpu", "operator": "Exists", "value": "true"}]),
          "spec.resources.train.tolerations[0].value"),
    _case("toleration-without-key-not-exists", _stage_resources("coverage", tolerations=[{"effect": "NoSchedule"}]),
          "spec.resources.coverage.tolerations[0].operator"),
    _case("toleration-seconds-without-no-execute",
          _stage_resources("assess", tolerations=[{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}]),
          "spec.resources.assess.tolerations[0].tolerationSeconds"),
    _case("node-selector-value-invalid", _stage_resources("train", nodeSelector={"pool": "gpu pool"}),
          "spec.resources.train.nodeSelector.pool"),
    _case("priority-class-invalid", _stage_resources("train", priorityClassName="High_Priority"),
          "spec.resources.train.priorityClassName"),
    _case("image-with-space", _stage_resources("merge", image="registry/train image:1"), "spec.resources.merge.image"),
    _case("active-deadline-zero", _stage_resources("train", activeDeadlineSeconds=0),
          "spec.resources.train.activeDeadlineSeconds"),
    # pod template overrides: the stage contract cannot be overridden
    _case("pod-template-stage-volume", _stage_resources("train", podTemplate={"spec": {"volumes": [
        {"name": "scratch", "emptyDir": {}}]}}), "spec.resources.train.podTemplate.spec.volumes[0].name"),
    _case("pod-template-pvc-volume", {"podTemplate": {"spec": {"volumes": [
        {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "m"}}]}}}, "spec.podTemplate.spec.volumes[0].name"),
    _case("pod-template-stage-env", {"podTemplate": {"spec": {"containers": [
        {"name": "stage", "env": [{"name": "HF_HOME", "value": "/models"}]}]}}},
          "spec.podTemplate.spec.containers[0].env[0].name"),
    _case("pod-template-selfalign-env", _stage_resources("assess", podTemplate={"spec": {"containers": [
        {"name": "stage", "env": [{"name": "SELFALIGN_RESULT_PATH", "value": "/x"}]}]}}),
          "spec.resources.assess.podTemplate.spec.containers[0].env[0].name"),
    _case("pod-template-stage-mount", {"podTemplate": {"spec": {"containers": [
        {"name": "stage", "volumeMounts": [{"name": "models", "mountPath": "/scratch/models"}]}]}}},
          "spec.podTemplate.spec.containers[0].volumeMounts[0].mountPath"),
    _case("pod-template-command", {"podTemplate": {"spec": {"containers": [{"name": "stage", "command": ["sh"]}]}}},
          "spec.podTemplate.spec.containers[0].command"),
    _case("pod-template-image", _stage_resources("train", podTemplate={"spec": {"containers": [
        {"name": "stage", "image": "other:1"}]}}), "spec.resources.train.podTemplate.spec.containers[0].image"),
    _case("pod-template-second-container", {"podTemplate": {"spec": {"containers": [{"name": "sidecar"}]}}},
          "spec.podTemplate.spec.containers[0].name"),
    _case("pod-template-security-context", {"podTemplate": {"spec": {"securityContext": {"runAsUser": 0}}}},
          "spec.podTemplate.spec.securityContext"),
    _case("pod-template-selector-label", {"podTemplate": {"metadata": {"labels": {"selfalign.dev/run": "other"}}}},
          "spec.podTemplate.metadata.labels"),
    _case("pod-template-env-value-and-source", {"podTemplate": {"spec": {"containers": [{"name": "stage", "env": [
        {"name": "HF_TOKEN", "value": "x", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]}]}}},
          "spec.podTemplate.spec.containers[0].env[0]"),
    _case("pod-template-env-from-both", {"podTemplate": {"spec": {"containers": [{"name": "stage", "envFrom": [
        {"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}]}}},
          "spec.podTemplate.spec.containers[0].envFrom[0]"),
    _case("pod-template-affinity-misspelt", {"podTemplate": {"spec": {"affinity": {"nodeAfinity": {}}}}},
          "spec.podTemplate.spec.affinity.nodeAfinity"),
    _case("pod-template-spread-skew-zero", {"podTemplate": {"spec": {"topologySpreadConstraints": [
        {"maxSkew": 0, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}]}}},
          "spec.podTemplate.spec.topologySpreadConstraints[0].maxSkew"),
    _case("pod-template-volume-repeated", {"podTemplate": {"spec": {"volumes": [
        {"name": "models", "emptyDir": {}}, {"name": "models", "persistentVolumeClaim": {"claimName": "m"}}]}}},
          "spec.podTemplate.spec.volumes"),
    _case("pod-template-env-repeated", _stage_resources("merge", podTemplate={"spec": {"containers": [{
        "name": "stage", "env": [{"name": "HF_TOKEN", "value": "a"}, {"name": "HF_TOKEN", "value": "b"}]}]}}),
          "spec.resources.merge.podTemplate.spec.containers[0].env"),
    _case("pod-template-spread-repeated", {"podTemplate": {"spec": {"topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"},
        {"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]}}},
          "spec.podTemplate.spec.topologySpreadConstraints"),
    # the API server cannot see inside a volume (its source is kept as written): the typed spec can
    _case("pod-template-volume-two-sources", {"podTemplate": {"spec": {"volumes": [
        {"name": "models", "emptyDir": {}, "persistentVolumeClaim": {"claimName": "m"}}]}}},
          "spec.podTemplate.spec.volumes[0]", schema_rejects=False),
    # evaluate
    _case("evaluate-without-data", {"evaluate": {"stopWhenWorse": True}}, "spec.evaluate.data"),
    _case("evaluate-data-not-a-uri", {"evaluate": {"data": "heldout.jsonl"}}, "spec.evaluate.data"),
    _case("evaluate-stop-not-a-boolean", {"evaluate": {"data": "s3://d/h.jsonl", "stopWhenWorse": "yes"}},
          "spec.evaluate.stopWhenWorse"),
    # Only the typed spec can tell: these need the recipe preset, or checks the CRD leaves out.
    _case("examples-sum-with-preset", {"recipe": "self-instruct", "synthesize": {"seedExamples": 31}},
          "spec.synthesize.seedExamples", schema_rejects=False),
    _case("machine-examples-sum-with-preset", {"synthesize": {"machineExamples": 30}},
          "spec.synthesize.seedExamples", schema_rejects=False),
    _case("context-shorter-than-preset-max-tokens", {"engine": {"maxModelLen": 512}},
          "spec.synthesize.instructionSampling.maxTokens", schema_rejects=False),
    _case("min-kept-over-preset-instructions", {"assess": {"minKept": 20_000}}, "spec.assess.minKept",
          schema_rejects=False),
    # a label key is checked by the typed spec only: a CEL regex over map keys is too costly for the API server
    _case("node-selector-key-invalid", _stage_resources("train", nodeSelector={"gpu type": "h100"}),
          "spec.resources.train.nodeSelector", schema_rejects=False),
]

VALID: dict[str, dict[str, Any]] = {
    "isheep-minimal": valid_base(),
    "pod-templates": variant({
        "model": {"base": "pvc://models/llama-3-8b"},
        "podTemplate": {
            "metadata": {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": {"serviceAccountName": "selfalign-irsa", "imagePullSecrets": [{"name": "registry"}],
                     "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
                     "containers": [{"name": "stage", "envFrom": [{"secretRef": {"name": "hf-token"}}],
                                     "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                                         "name": "hf", "key": "token", "optional": True}}},
                                             {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                     "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache", "readOnly": True}]}]}},
        "resources": {"train": {"gpus": 8, "activeDeadlineSeconds": 86400, "podTemplate": {"spec": {
            "runtimeClassName": "nvidia", "schedulerName": "volcano",
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "DoNotSchedule", "matchLabelKeys": ["job-name"],
                                           "labelSelector": {"matchLabels": {"app": "x"}}, "minDomains": 1}]}}}},
    }),
    "self-instruct-minimal": variant({"recipe": "self-instruct"}),
    "aitp-minimal": variant({"recipe": "aitp", "rounds": 3}),
    "file-storage": variant({"storage": {"uri": "file:///var/selfalign/runs"}}),
    "s3-storage": variant({"storage": {"uri": "s3://runs", "endpoint": "http://minio.minio:9000",
                                       "region": "us-east-1", "secretRef": {"name": "selfalign-s3"}}}),
    "every-model-scheme": variant({"model": {"base": "pvc://models/qwen", "dtype": "bfloat16"},
                                   "seeds": "hf://datasets/yizhongw/self_instruct"}),
    "deep-overrides": variant({
        "synthesize": {"instructionSampling": {"temperature": 0.3}, "seedExamples": 4, "seed": 7},
        "assess": {"judge": "current", "threshold": {"quality": 6.5}, "dedup": {"rougeL": 0.8}},
        "train": {"from": "previous", "data": "cumulative", "loraRank": 64, "learningRate": 1.0e-4,
                  "targetModules": ["all-linear"]},
    }),
    "no-rule-filters": variant({"assess": {"rules": []}}),
    "every-section": variant({
        "recipe": "aitp",
        "rounds": 100,
        "model": {"base": "s3://models/Qwen2.5-7B", "dtype": "bfloat16"},
        "storage": {"uri": "s3://runs", "endpoint": "https://s3.example.com", "secretRef": {"name": "creds"}},
        "synthesize": {"instructionsPerRound": 5000, "maxPrompts": 10000, "seedExamples": 6, "machineExamples": 2,
                       "seedSampling": "inverse", "questionsPerGapDoc": 3, "seed": 1,
                       "instructionSampling": {"temperature": 0.7, "topP": 0.5, "maxTokens": 512,
                                               "presencePenalty": 2.0},
                       "responseSampling": {"temperature": 0.0, "topP": 1.0, "maxTokens": 1024}},
        "assess": {"judge": "base", "rules": ["self-instruct"], "dedup": {"rougeL": 0.7}, "minKept": 10,
                   "threshold": {"quality": 7.0, "following": 7.0, "rewriteQuality": 8.0}},
        "train": {"from": "base", "data": "round", "loraRank": 8, "loraAlpha": 16, "loraDropout": 0.0,
                  "targetModules": ["q_proj", "v_proj"], "learningRate": 3.0e-4, "scheduler": "linear",
                  "warmupRatio": 0.1, "epochs": 1.5, "perDeviceBatchSize": 2, "gradientAccumulationSteps": 8,
                  "maxSeqLength": 2048, "zeroStage": 2, "nodes": 2, "checkpointSteps": 25, "seed": 3},
        "merge": {"tolerance": 0.05},
        "evaluate": {"data": "s3://data/heldout.jsonl", "stopWhenWorse": True},
        "coverage": {"embedder": "s3://models/bge-m3", "similarity": 0.6, "k": 20, "gapDocsPerRound": 500,
                     "exactSearchLimit": 50000},
        "engine": {"dtype": "bfloat16", "maxModelLen": 8192, "gpuMemoryUtilization": 0.85,
                   "tensorParallelSize": 2, "enforceEager": True},
        "resources": {
            "synthesize": {"gpus": 2, "cpu": "8", "memory": "64Gi"},
            "assess": {"gpus": 2, "cpu": "8", "memory": "64Gi"},
            "train": {"gpus": 8, "cpu": "96", "memory": "1Ti", "shmSize": "64Gi", "scratchSize": "500Gi",
                      "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "spot", "operator": "Equal", "value": "true",
                                       "effect": "NoExecute", "tolerationSeconds": 600}],
                      "priorityClassName": "batch-high", "image": "registry.example.com/selfalign/train:0.1.0"},
            "merge": {"cpu": "500m", "memory": "96Gi"},
            "coverage": {"gpus": 1, "image": "registry.example.com/selfalign/coverage@sha256:" + "a" * 64},
        },
        "queueName": "team-a",
        "suspend": True,
        "backoffLimit": 0,
    }),
}
