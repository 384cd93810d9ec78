"""The typed SelfAlignRun spec: recipe presets, defaulting and validation.

One model serves the operator, the local runner and every stage, so a field means the same thing
everywhere. `parse_spec` merges the recipe's preset *under* what the user wrote (every preset value
can be overridden) and reports each problem with its field path, e.g. `spec.train.loraRank`.
The CRD in `crds/` carries the same shape and bounds; tests keep the two in agreement. The checks
in `_combination_errors` need the preset merged in, which the CRD cannot see: they live only here
(the CRD mirrors the ones whose fields it can see).
"""
from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

STAGES: tuple[str, ...] = ("synthesize", "assess", "train", "merge", "coverage")
Stage = Literal["synthesize", "assess", "train", "merge", "coverage"]
Recipe = Literal["isheep", "self-instruct", "aitp"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Patterns shared with the CRD (Go RE2, Python re and pydantic's Rust regex read them alike;
# no backslash escapes where a CEL string literal repeats them).
MODEL_URI = r"^(s3|pvc|hf|file|builtin)://\S+$"
STORAGE_URI = r"^(s3|file)://\S+$"
HTTP_URL = r"^https?://\S+$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
             r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
IMAGE = r"^\S+$"
URI_MAX = 2048
MAX_PROMPT_EXAMPLES = 32  # tasks shown in one generation prompt, seeds and machine ones together
SEED_MAX = 2**32 - 1

LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


class _Model(BaseModel):
    """camelCase on the wire (as in the CRD), snake_case in Python; unknown fields are errors.

    Strict, like the CRD schema: `"3"` is not a number and `"yes"` is not a boolean.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True
    )


class ModelSource(_Model):
    base: str = Field(max_length=URI_MAX, pattern=MODEL_URI,
                      description="Base model M_0: s3://, pvc://, hf:// (clusters with egress), file:// or builtin://")
    dtype: Dtype = Field("auto", description="Weights dtype; auto means bfloat16 on GPUs and CPUs with native bf16, float32 elsewhere")
    chat: Literal["auto", "always", "never"] = Field(
        "auto", description="Chat template use: auto sends responses, judges and rewrites through it and "
                            "task-generation prompts raw; always or never for every prompt")


class SecretRef(_Model):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="Secret in the run's namespace with AWS_* keys, given to stage pods with envFrom")


class Storage(_Model):
    uri: str = Field(max_length=URI_MAX, pattern=STORAGE_URI,
                     description="Root URI; a run writes under <uri>/<namespace>/<name>/")
    endpoint: str | None = Field(None, max_length=URI_MAX, pattern=HTTP_URL,
                                 description="S3 endpoint URL (MinIO, Ceph, ...); s3:// storage only")
    region: str | None = Field(None, max_length=64, pattern=r"^[a-z0-9-]+$",
                               description="S3 region; s3:// storage only")
    secret_ref: SecretRef | None = Field(None, description="Credentials for the stage pods only; s3:// storage only")


class ModelCache(_Model):
    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description=(
        "PersistentVolumeClaim in the run's namespace (ReadWriteMany, writable by uid 1000) mounted in every "
        "stage pod: s3:// models are kept there by content, so one download serves every stage and run"))


class Sampling(_Model):
    temperature: float = Field(ge=0, le=5, description="Sampling temperature; 0 is greedy")
    top_p: float = Field(gt=0, le=1, description="Nucleus sampling mass")
    max_tokens: int = Field(ge=1, le=32768,
                            description="Generated tokens per completion; must be below engine.maxModelLen")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Penalty on tokens already present")


class Synthesize(_Model):
    instructions_per_round: int = Field(ge=1, le=10_000_000,
                                        description="Target count of instructions surviving the filters")
    max_prompts: int = Field(ge=1, le=100_000_000, description="Cap on generation prompts per round")
    seed_examples: int = Field(ge=1, le=MAX_PROMPT_EXAMPLES, description="Seed tasks shown per prompt")
    machine_examples: int = Field(ge=0, le=MAX_PROMPT_EXAMPLES, description="Machine-generated tasks shown per prompt")
    seed_sampling: Literal["uniform", "inverse"] = Field(
        description="How seeds are drawn; inverse weights each seed by 1/perplexity under the current model")
    instruction_sampling: Sampling = Field(description="Decoding of new instructions")
    response_sampling: Sampling = Field(description="Decoding of responses")
    questions_per_gap_doc: int = Field(2, ge=1, le=16, description="AITP questions written per gap document")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Sampling seed; a rerun gives the same data")


class Dedup(_Model):
    rouge_l: float = Field(0.7, gt=0, le=1, alias="rougeL",
                           description="Reject an instruction whose ROUGE-L F1 against the pool is above this")


class Threshold(_Model):
    quality: float = Field(ge=0, le=10, description="Keep when the expected quality score is above this")
    following: float = Field(ge=0, le=10, description="Keep when the expected following score is above this")
    rewrite_quality: float = Field(7.0, ge=0, le=10, description="AITP rewrites: keep when quality is at least this")
    decision: Literal["expected", "probability", "top-fraction"] = Field(
        "expected", description="expected: the expected scores must pass quality and following; probability: "
                                "P(score above each cut-off) must reach minProbability; top-fraction: keep "
                                "the topFraction of judged items by mean expected score")
    min_probability: float = Field(0.5, gt=0, le=1,
                                   description="decision probability: least P(score above the cut-off) per criterion")
    top_fraction: float = Field(0.25, gt=0, le=1,
                                description="decision top-fraction: share of judged generated items kept")


class Assess(_Model):
    judge: Literal["base", "current"] = Field(description="Which model scores the data: the base model or this round's")
    rules: list[Literal["self-instruct", "isheep"]] = Field(
        max_length=2, description="Rule-filter families applied, each at most once; empty applies none")
    dedup: Dedup = Field(Dedup(), description="Global near-duplicate removal")
    threshold: Threshold = Field(description="Self-assessment score cut-offs")
    label_mass_floor: float = Field(0.2, ge=0, le=1,
                                    description="Reject a judged item when the judge put less probability than "
                                                "this on the score labels (its score would mean nothing)")
    min_kept: int = Field(1, ge=1, le=10_000_000, description="Fewer kept items fail the stage")

    @field_validator("rules")
    @classmethod
    def _rules_once(cls, rules: list[str]) -> list[str]:
        if len(set(rules)) != len(rules):
            raise ValueError("each rule family may appear once")
        return rules


class Train(_Model):
    from_: Literal["base", "previous"] = Field(
        alias="from", description="Train (and merge) on the base model every round, or on the previous round's")
    data: Literal["round", "cumulative"] = Field(description="This round's kept data, or every round's so far")
    lora_rank: int = Field(ge=1, le=1024, description="LoRA rank r")
    lora_alpha: float = Field(gt=0, le=4096, description="LoRA scaling alpha")
    lora_dropout: float = Field(ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S+$")]] = Field(
        min_length=1, max_length=64, description='Module names to adapt, or ["all-linear"] alone')
    learning_rate: float = Field(gt=0, le=1, description="Peak learning rate")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        description="Learning-rate schedule")
    warmup_ratio: float = Field(ge=0, lt=1, description="Share of steps spent warming up (below 1: transformers reads 1 as one step)")
    epochs: float = Field(gt=0, le=100, description="Passes over the training data")
    per_device_batch_size: int = Field(ge=1, le=4096, description="Sequences per device per step")
    gradient_accumulation_steps: int = Field(ge=1, le=4096, description="Steps accumulated per optimizer update")
    max_seq_length: int = Field(ge=16, le=1_048_576,
                                description="Token cut-off; prompt tokens are masked from the loss")
    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        description='DeepSpeed ZeRO stage; "auto": 2 when the bf16 model fits one GPU with room for activations, 3 beyond')
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: less memory for about a third more compute")
    attention_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="transformers attn_implementation; flash_attention_2 needs a GPU and the flash-attn package")
    nodes: int = Field(1, ge=1, le=1024, description="Nodes for one training Job (an Indexed Job when > 1)")
    checkpoint_steps: int = Field(50, ge=1, le=1_000_000, description="Save a resumable checkpoint every N steps")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Training seed")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, modules: list[str]) -> list[str]:
        if len(set(modules)) != len(modules):
            raise ValueError("module names must be unique")
        if "all-linear" in modules and len(modules) > 1:
            raise ValueError('"all-linear" already selects every linear layer: list it alone')
        return modules


class Merge(_Model):
    tolerance: float = Field(0.01, gt=0, le=100,
                             description="Float32 models: max abs logit difference, merged vs adapter model, "
                                         "on a probe batch (bf16 rounding is recorded, judged by effectKept)")


class Evaluate(_Model):
    data: str = Field(max_length=URI_MAX, pattern=MODEL_URI,
                      description="Held-out Alpaca JSONL (instruction, input, output) whose outputs' mean per-token "
                                  "NLL is measured before and after each round's merge")
    stop_when_worse: bool = Field(False, description="End the run as Succeeded (Converged) after a round that "
                                                     "raises the held-out loss")


class Coverage(_Model):
    reference: str = Field(max_length=URI_MAX, pattern=MODEL_URI,
                           description="Reference corpus: JSONL with a text field, or text lines")
    embedder: str = Field("builtin://all-minilm-l6-v2", max_length=URI_MAX, pattern=MODEL_URI,
                          description="sentence-transformers model")
    similarity: float | None = Field(
        None, ge=-1, le=1, description="A document is covered when its nearest instruction is at least this similar; "
        "unset: at least as similar as the document's nearest other reference document")
    k: int = Field(10, ge=1, le=1000, description="Neighbours for the SFT-density score")
    gap_docs_per_round: int = Field(ge=0, le=1_000_000,
                                    description="Gap documents handed to the next round's synthesize")
    exact_search_limit: int = Field(100_000, ge=1, le=1_000_000_000,
                                    description="Above this many vectors, an approximate index")


class Engine(_Model):
    """vLLM settings shared by synthesize and assess."""

    dtype: Dtype = Field("auto", description="Engine dtype; auto follows the model")
    max_model_len: int = Field(4096, ge=64, le=1_048_576, description="Context length: prompt plus generated tokens")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take")
    tensor_parallel_size: int | None = Field(None, ge=1, le=64,
                                             description="GPUs one engine spans; default: the stage's GPU count")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (slower, less memory, faster start)")


class Toleration(_Model):
    key: str | None = Field(None, max_length=317, pattern=LABEL_KEY, description="Taint key; empty matches every key")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Equal (the default) or Exists")
    value: LabelValue | None = Field(None, description="Taint value for operator Equal")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; empty matches every effect")
    toleration_seconds: int | None = Field(None, ge=0, description="How long a NoExecute taint is tolerated")


# What a pod template override may not touch: the stage contract's own env, volumes and mounts
# (selfalign.operator.jobs builds them; tests/test_jobs.py checks that every one is listed here)
# and the labels the operator selects a run's Jobs and Pods by.
RESERVED_ENV = frozenset({"SELFALIGN_SCRATCH", "HF_HOME", "XDG_CACHE_HOME", "HOME", "PYTHONUNBUFFERED",
                          "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "NNODES", "NPROC_PER_NODE",
                          "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"})
RESERVED_ENV_PREFIX = "SELFALIGN_"
RESERVED_VOLUMES = frozenset({"spec", "scratch", "shm", "tmp", "model-cache"})
RESERVED_VOLUME_PREFIX = "pvc-"  # pvc-<i>: the claims of pvc:// inputs
RESERVED_MOUNTS = ("/etc/selfalign", "/scratch", "/dev/shm", "/tmp", "/mnt/pvc", "/model-cache")
RESERVED_LABEL_PREFIXES = ("selfalign.dev/", "app.kubernetes.io/")
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ABSOLUTE_PATH = r"^/\S*$"
VOLUME_SOURCES = frozenset({
    "persistentVolumeClaim", "configMap", "secret", "emptyDir", "csi", "ephemeral", "projected",
    "downwardAPI", "nfs", "hostPath", "image", "iscsi", "fc", "cephfs", "rbd", "glusterfs",
    "awsElasticBlockStore", "gcePersistentDisk", "azureDisk", "azureFile", "flexVolume"})


def _reserved_mount(path: str) -> bool:
    return any(path == root or path.startswith(f"{root}/") for root in RESERVED_MOUNTS)


class KeyRef(_Model):
    """One key of a Secret or ConfigMap in the run's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Object name")
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the object")
    optional: bool | None = Field(None, description="Start the pod even if the object or key is missing")


class FieldRef(_Model):
    """A field of the pod (downward API), e.g. metadata.name."""

    field_path: str = Field(min_length=1, max_length=256, pattern=r"^\S+$", description="Field path, e.g. metadata.name")


class EnvSource(_Model):
    """Where an env value comes from: exactly one of secretKeyRef, configMapKeyRef, fieldRef."""

    secret_key_ref: KeyRef | None = Field(None, description="A key of a Secret")
    config_map_key_ref: KeyRef | None = Field(None, description="A key of a ConfigMap")
    field_ref: FieldRef | None = Field(None, description="A field of the pod")

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if sum(ref is not None for ref in (self.secret_key_ref, self.config_map_key_ref, self.field_ref)) != 1:
            raise ValueError("exactly one of secretKeyRef, configMapKeyRef, fieldRef")
        return self


class EnvVar(_Model):
    """An environment variable of the stage container (as in a Pod spec)."""

    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME, description="Variable name")
    value: str | None = Field(None, max_length=32768, description="Literal value")
    value_from: EnvSource | None = Field(None, description="Value from a Secret, ConfigMap or pod field")

    @field_validator("name")
    @classmethod
    def _not_the_stages(cls, name: str) -> str:
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"{name} is set by the operator for the stage contract: choose another name")
        return name

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("value and valueFrom exclude each other")
        return self


class ObjectName(_Model):
    """A Secret or ConfigMap in the run's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Object name")
    optional: bool | None = Field(None, description="Start the pod even if the object is missing")


class LocalObjectReference(_Model):
    """A Secret in the run's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name")


class EnvFrom(_Model):
    """Every key of a Secret or ConfigMap as env (exactly one of secretRef, configMapRef)."""

    prefix: str | None = Field(None, max_length=253, pattern=ENV_NAME, description="Prepended to every key")
    secret_ref: ObjectName | None = Field(None, description="A Secret, e.g. one holding HF_TOKEN")
    config_map_ref: ObjectName | None = Field(None, description="A ConfigMap")

    @model_validator(mode="after")
    def _one(self) -> EnvFrom:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("exactly one of secretRef, configMapRef")
        return self


class VolumeMount(_Model):
    """A volume of podTemplate.spec.volumes mounted into the stage container."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL, description="Volume name")
    mount_path: str = Field(min_length=2, max_length=4096, pattern=ABSOLUTE_PATH, description="Absolute path in the container")
    sub_path: str | None = Field(None, max_length=4096, pattern=r"^[^/]\S*$", description="Path inside the volume")
    read_only: bool | None = Field(None, description="Mount read-only")

    @field_validator("mount_path")
    @classmethod
    def _not_the_stages(cls, path: str) -> str:
        if _reserved_mount(path):
            raise ValueError(f"{path} is at or under a mount of the stage contract "
                             f"({', '.join(RESERVED_MOUNTS)}): choose another path")
        return path


class ContainerOverride(_Model):
    """Additions to the stage container, the pod's only container (named stage)."""

    name: Literal["stage"] = Field(description="The stage container")
    env: list[EnvVar] = Field([], max_length=128, description="Env merged by name over the operator's")
    env_from: list[EnvFrom] = Field([], max_length=32, description="Secrets and ConfigMaps given as env")
    volume_mounts: list[VolumeMount] = Field([], max_length=64, description="Mounts merged by mountPath")

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        return _unique(env, "name")

    @field_validator("volume_mounts")
    @classmethod
    def _unique_mounts(cls, mounts: list[VolumeMount]) -> list[VolumeMount]:
        return _unique(mounts, "mount_path")


class Volume(_Model):
    """A pod volume: a name and one volume source, as in a Pod spec (the API server checks the source)."""

    model_config = ConfigDict(**_Model.model_config | {"extra": "allow"})
    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL, description="Volume name")

    @field_validator("name")
    @classmethod
    def _not_the_stages(cls, name: str) -> str:
        if name in RESERVED_VOLUMES or name.startswith(RESERVED_VOLUME_PREFIX):
            raise ValueError(f"{name!r} is a volume of the stage contract ({', '.join(sorted(RESERVED_VOLUMES))}, "
                             f"{RESERVED_VOLUME_PREFIX}<i> for pvc:// inputs): choose another name")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        sources = sorted(self.model_extra or {})
        if len(sources) != 1 or sources[0] not in VOLUME_SOURCES:
            raise ValueError(f"needs exactly one volume source (persistentVolumeClaim, configMap, secret, csi, "
                             f"...), got {', '.join(sources) or 'none'}")
        return self


class Affinity(_Model):
    """Pod affinity, as in a Pod spec; each kind replaces the one below it."""

    node_affinity: dict[str, Any] | None = Field(None, description="Node affinity (Kubernetes NodeAffinity)")
    pod_affinity: dict[str, Any] | None = Field(None, description="Pod affinity (Kubernetes PodAffinity)")
    pod_anti_affinity: dict[str, Any] | None = Field(None, description="Pod anti-affinity (Kubernetes PodAntiAffinity)")


class TopologySpread(_Model):
    """A topology spread constraint, as in a Pod spec."""

    max_skew: int = Field(ge=1, le=1024, description="Largest allowed difference in matching pods between domains")
    topology_key: str = Field(min_length=1, max_length=317, pattern=LABEL_KEY, description="Node label of the domain")
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(description="What the scheduler does then")
    label_selector: dict[str, Any] | None = Field(None, description="Pods counted (Kubernetes LabelSelector)")
    match_label_keys: list[Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY)]] = Field(
        [], max_length=16, description="Pod label keys whose values select the pods counted")
    min_domains: int | None = Field(None, ge=1, le=1024, description="Least eligible domains")


class PodMetadata(_Model):
    """Labels and annotations of the stage pods, e.g. sidecar.istio.io/inject: "false"."""

    labels: dict[str, LabelValue] = Field({}, max_length=64, description="Pod labels")
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        {}, max_length=64, description="Pod annotations")

    @field_validator("labels", "annotations")
    @classmethod
    def _keys(cls, mapping: dict[str, str]) -> dict[str, str]:
        bad = [key for key in mapping if len(key) > 317 or not re.match(LABEL_KEY, key)]
        if bad:
            raise ValueError(f"not a label key: {', '.join(map(repr, bad))}")
        ours = [key for key in mapping if key.startswith(RESERVED_LABEL_PREFIXES)]
        if ours:
            raise ValueError(f"{', '.join(ours)}: the operator sets the {' and '.join(RESERVED_LABEL_PREFIXES)} "
                             f"keys (it finds a run's pods by them)")
        return mapping


class PodSpecOverride(_Model):
    """The pod fields a run may set; everything else (security context, command, the stage's
    volumes) stays as the operator builds it."""

    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN, description=(
        "ServiceAccount of the stage pods, e.g. one bound to a cloud role (IRSA, Workload Identity) for "
        "storage without static keys; its API token is still not mounted"))
    image_pull_secrets: list[LocalObjectReference] = Field(
        [], max_length=16, description="Secrets for private registries, merged by name")
    affinity: Affinity | None = Field(None, description="Node and pod affinity")
    topology_spread_constraints: list[TopologySpread] = Field(
        [], max_length=16, description="Spread of the pods; merged by topologyKey and whenUnsatisfiable")
    runtime_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                           description="RuntimeClass, e.g. nvidia")
    scheduler_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                       description="Scheduler of the pods, e.g. a gang scheduler")
    volumes: list[Volume] = Field([], max_length=64, description="Extra volumes, merged by name")
    containers: list[ContainerOverride] = Field([], max_length=1, description="The stage container: env, envFrom, volumeMounts")

    @field_validator("volumes", "image_pull_secrets")
    @classmethod
    def _unique_names(cls, items: list) -> list:
        return _unique(items, "name")

    @field_validator("topology_spread_constraints")
    @classmethod
    def _unique_spreads(cls, spreads: list[TopologySpread]) -> list[TopologySpread]:
        keys = [(spread.topology_key, spread.when_unsatisfiable) for spread in spreads]
        if len(set(keys)) != len(keys):
            raise ValueError("topologyKey and whenUnsatisfiable must be unique together")
        return spreads


class PodTemplate(_Model):
    """Overrides of the stage pods (a typed subset of a PodTemplateSpec): the chart's under the
    run's (spec.podTemplate) under the stage's (spec.resources.<stage>.podTemplate)."""

    metadata: PodMetadata = Field(PodMetadata(), description="Pod labels and annotations")
    spec: PodSpecOverride = Field(PodSpecOverride(), description="Pod fields")


def _unique(items: list, key: str) -> list:
    values = [getattr(item, key) for item in items]
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{key} must be unique: {', '.join(map(str, repeated))} repeated")
    return items


class StageResources(_Model):
    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod")
    cpu: str | None = Field(None, max_length=32, pattern=QUANTITY, description="CPU request and limit, e.g. 8 or 500m")
    memory: str | None = Field(None, max_length=32, pattern=QUANTITY, description="Memory request and limit, e.g. 64Gi")
    shm_size: str = Field("1Gi", max_length=32, pattern=QUANTITY, description="Memory-backed /dev/shm size")
    scratch_size: str = Field("50Gi", max_length=32, pattern=QUANTITY, description="Scratch volume for model files")
    node_selector: dict[str, LabelValue] = Field({}, max_length=64, description="Node labels the pod requires")
    tolerations: list[Toleration] = Field([], max_length=64, description="Taints the pod tolerates")
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                            description="PriorityClass of the pod")
    image: str | None = Field(None, max_length=512, pattern=IMAGE,
                              description="Overrides the operator's image for this stage")
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=31_536_000, description="Seconds the stage's Job may run before it fails with "
                                               "DeadlineExceeded, releasing its GPUs (a hung NCCL or vLLM)")
    pod_template: PodTemplate | None = Field(None, description="Pod overrides of this stage, over spec.podTemplate")

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, selector: dict[str, str]) -> dict[str, str]:
        bad = [key for key in selector if len(key) > 317 or not re.match(LABEL_KEY, key)]
        if bad:
            raise ValueError(f"not a label key: {', '.join(map(repr, bad))}")
        return selector


class Resources(_Model):
    synthesize: StageResources = Field(StageResources(), description="Pod of the synthesize stage")
    assess: StageResources = Field(StageResources(), description="Pod of the assess stage")
    train: StageResources = Field(StageResources(), description="Pod(s) of the train stage, per node")
    merge: StageResources = Field(StageResources(), description="Pod of the merge stage")
    coverage: StageResources = Field(StageResources(), description="Pod of the coverage stage")

    def for_stage(self, stage: str) -> StageResources:
        return getattr(self, stage)


class RunSpec(_Model):
    recipe: Recipe = Field(description="Method preset of every stage parameter; immutable")
    rounds: int = Field(ge=1, le=100, description="Rounds of synthesize, assess, train, merge, coverage; may only grow")
    model: ModelSource = Field(description="The model the campaign starts from")
    seeds: str = Field(max_length=URI_MAX, pattern=MODEL_URI,
                       description="Seed tasks: Self-Instruct, Alpaca or chat JSONL; immutable")
    storage: Storage = Field(description="Where stages exchange data")
    model_cache: ModelCache | None = Field(None, description=(
        "A volume for s3:// models that outlives a pod; without it each stage pod downloads into its scratch"))
    synthesize: Synthesize = Field(description="Instruction and response generation")
    assess: Assess = Field(description="Filters, dedup and self-assessment")
    train: Train = Field(description="LoRA fine-tuning")
    merge: Merge = Field(Merge(), description="Folding the adapter into the model")
    coverage: Coverage = Field(description="Coverage of the reference corpus and gap documents")
    evaluate: Evaluate | None = Field(None, description="Held-out loss per round, measured by the merge stage")
    engine: Engine = Field(Engine(), description="vLLM engine of synthesize and assess")
    resources: Resources = Field(Resources(), description="Pod resources per stage")
    pod_template: PodTemplate | None = Field(None, description="Pod overrides of every stage, over the chart's")
    queue_name: str | None = Field(None, max_length=63, pattern=DNS_SUBDOMAIN,
                                   description="Kueue LocalQueue the stage Jobs are submitted to")
    suspend: bool = Field(False, description="Stop now: the running stage's Job is suspended (its pods released); false resumes it")
    backoff_limit: int = Field(2, ge=0, le=20, description="Pod retries per stage Job")
    retry: int = Field(0, ge=0, le=1000,
                       description="Raise it to run a failed stage again with a new Job; may only grow")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("recipe"), str) and data["recipe"] in PRESETS:
            return deep_merge(PRESETS[data["recipe"]], data)
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> RunSpec:
        errors = _combination_errors(self)
        if errors:
            raise ValueError("\n".join(errors))  # parse_spec reports one error per line
        return self

    def stage_resources(self, stage: str) -> StageResources:
        return self.resources.for_stage(stage)


def _combination_errors(spec: RunSpec) -> list[str]:
    """Checks across fields, after the preset is merged in. Each line names one field."""
    errors = []
    syn = spec.synthesize
    if syn.seed_examples + syn.machine_examples > MAX_PROMPT_EXAMPLES:
        errors.append(f"spec.synthesize.seedExamples: seedExamples + machineExamples is "
                      f"{syn.seed_examples} + {syn.machine_examples}, more than {MAX_PROMPT_EXAMPLES} per prompt")
    for field, sampling in (("instructionSampling", syn.instruction_sampling),
                            ("responseSampling", syn.response_sampling)):
        if sampling.max_tokens >= spec.engine.max_model_len:
            errors.append(f"spec.synthesize.{field}.maxTokens: {sampling.max_tokens} leaves no room for the prompt "
                          f"in spec.engine.maxModelLen {spec.engine.max_model_len}")
    if spec.assess.min_kept > syn.instructions_per_round:
        errors.append(f"spec.assess.minKept: {spec.assess.min_kept} is more than "
                      f"spec.synthesize.instructionsPerRound {syn.instructions_per_round}: the stage could never pass")
    if spec.train.nodes > 1 and spec.resources.train.gpus < 1:
        errors.append("spec.train.nodes: more than one node needs resources.train.gpus >= 1")
    tp = spec.engine.tensor_parallel_size
    for stage in ("synthesize", "assess"):
        gpus = spec.resources.for_stage(stage).gpus
        if tp is not None and gpus and tp > gpus:
            errors.append(f"spec.engine.tensorParallelSize: {tp} is more than the {gpus} GPU(s) "
                          f"of resources.{stage}.gpus")
    if not spec.storage.uri.startswith("s3://"):
        for field, value in (("endpoint", spec.storage.endpoint), ("region", spec.storage.region),
                             ("secretRef", spec.storage.secret_ref)):
            if value is not None:
                errors.append(f"spec.storage.{field}: only for s3:// storage, but uri is {spec.storage.uri}")
    for stage in STAGES:
        for i, toleration in enumerate(spec.resources.for_stage(stage).tolerations):
            path = f"spec.resources.{stage}.tolerations[{i}]"
            if not toleration.key and toleration.operator != "Exists":
                errors.append(f"{path}.operator: a toleration without a key matches every taint: it needs Exists")
            if toleration.operator == "Exists" and toleration.value:
                errors.append(f"{path}.value: must be empty when operator is Exists")
            if toleration.toleration_seconds is not None and toleration.effect != "NoExecute":
                errors.append(f"{path}.tolerationSeconds: only for effect NoExecute")
    return errors


_SI_DECODING = {"temperature": 0.7, "topP": 0.5, "maxTokens": 1024, "presencePenalty": 2.0}
_ISHEEP_DECODING = {"temperature": 1.0, "topP": 0.95, "maxTokens": 1000, "presencePenalty": 0.0}
_TRAIN_COMMON = {
    "data": "round", "loraRank": 16, "loraAlpha": 32.0, "loraDropout": 0.05,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learningRate": 4e-4,
    "scheduler": "cosine", "warmupRatio": 0.03, "epochs": 3.0, "perDeviceBatchSize": 4,
    "gradientAccumulationSteps": 4, "maxSeqLength": 1024, "zeroStage": "auto",
}

# METHODS.md's parameters, one preset per method. A user's spec is merged over these.
PRESETS: dict[str, dict[str, Any]] = {
    "self-instruct": {
        "synthesize": {
            "instructionsPerRound": 52_000, "maxPrompts": 200_000, "seedExamples": 6,
            "machineExamples": 2, "seedSampling": "uniform",
            "instructionSampling": _SI_DECODING,
            "responseSampling": {"temperature": 0.0, "topP": 1.0, "maxTokens": 350, "presencePenalty": 1.5},
        },
        "assess": {"judge": "base", "rules": ["self-instruct"],
                   "threshold": {"quality": 0.0, "following": 0.0}},
        "train": {**_TRAIN_COMMON, "from": "base"},
        "coverage": {"gapDocsPerRound": 0},
    },
    "isheep": {
        "synthesize": {
            "instructionsPerRound": 10_000, "maxPrompts": 20_000, "seedExamples": 5,
            "machineExamples": 0, "seedSampling": "inverse",
            "instructionSampling": _ISHEEP_DECODING, "responseSampling": _ISHEEP_DECODING,
        },
        "assess": {"judge": "base", "rules": ["self-instruct", "isheep"],
                   "threshold": {"quality": 8.0, "following": 8.0}},
        "train": {**_TRAIN_COMMON, "from": "base"},
        "coverage": {"gapDocsPerRound": 0},
    },
    "aitp": {
        "synthesize": {
            "instructionsPerRound": 10_000, "maxPrompts": 20_000, "seedExamples": 5,
            "machineExamples": 0, "seedSampling": "uniform",
            "instructionSampling": _ISHEEP_DECODING, "responseSampling": _ISHEEP_DECODING,
        },
        "assess": {"judge": "base", "rules": ["self-instruct", "isheep"],
                   "threshold": {"quality": 8.0, "following": 8.0, "rewriteQuality": 7.0}},
        "train": {**_TRAIN_COMMON, "from": "base"},
        "coverage": {"gapDocsPerRound": 1000},
    },
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins; nested mappings merge key by key; lists and scalars replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class SpecError(ValueError):
    """An invalid spec; `errors` holds one `field.path: message` line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = ["spec"]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _in_a_preset(loc: tuple[Any, ...]) -> bool:
    """Whether some recipe preset supplies the value at `loc`."""
    for preset in PRESETS.values():
        node: Any = preset
        for key in loc:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return True
    return False


def parse_spec(raw: dict[str, Any] | None) -> RunSpec:
    """Validate a spec as written in a manifest (camelCase); raise SpecError naming each field."""
    try:
        return RunSpec.model_validate(raw or {})
    except ValidationError as exc:
        details = exc.errors(include_url=False)
        bad_recipe = any(err["loc"] == ("recipe",) for err in details)
        errors = []
        for err in details:
            if bad_recipe and err["type"] == "missing" and _in_a_preset(err["loc"]):
                continue  # only noise: the recipe's preset would have supplied it
            for message in err["msg"].removeprefix("Value error, ").splitlines():
                if err["loc"] or not message.startswith("spec."):
                    message = f"{_field_path(err['loc'])}: {message}"
                errors.append(message)
        raise SpecError(errors) from None


def dump_spec(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as the stages receive it: camelCase, every default filled in, no nulls."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)
