"""The typed SelfAlignRun spec: recipe presets, defaulting and validation.

One model serves the operator, the local runner and every stage, so a field means the same thing
everywhere. `parse_spec` merges the recipe's preset *under* what the user wrote (every preset value
can be overridden) and reports each problem with its field path, e.g. `spec.train.loraRank`.
The CRD in `crds/` carries the same shape; tests keep the two in agreement.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

STAGES: tuple[str, ...] = ("synthesize", "assess", "train", "merge", "coverage")
Stage = Literal["synthesize", "assess", "train", "merge", "coverage"]
Recipe = Literal["isheep", "self-instruct", "aitp"]

MODEL_URI = r"^(s3|pvc|hf|file|builtin)://\S+$"
STORAGE_URI = r"^(s3|file)://\S+$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class _Model(BaseModel):
    """camelCase on the wire (as in the CRD), snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ModelSource(_Model):
    base: str = Field(pattern=MODEL_URI, description="Base model: s3://, pvc://, hf://, file:// or builtin://")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto means bfloat16 on GPU, float32 on CPU"
    )


class SecretRef(_Model):
    name: str = Field(min_length=1, max_length=253, description="Secret with AWS_* keys, mounted with envFrom")


class Storage(_Model):
    uri: str = Field(pattern=STORAGE_URI, description="Root URI; a run writes under <uri>/<namespace>/<name>/")
    endpoint: str | None = Field(None, pattern=r"^https?://\S+$", description="S3 endpoint URL (MinIO, Ceph, ...)")
    region: str | None = Field(None, description="S3 region")
    secret_ref: SecretRef | None = Field(None, description="Credentials for the stage pods only")


class Sampling(_Model):
    temperature: float = Field(ge=0, le=5)
    top_p: float = Field(gt=0, le=1)
    max_tokens: int = Field(ge=1, le=32768)
    presence_penalty: float = Field(0.0, ge=-2, le=2)


class Synthesize(_Model):
    instructions_per_round: int = Field(ge=1, le=10_000_000, description="Target count of instructions surviving the filters")
    max_prompts: int = Field(ge=1, description="Cap on generation prompts per round")
    seed_examples: int = Field(ge=1, le=32, description="Seed tasks shown per prompt")
    machine_examples: int = Field(ge=0, le=32, description="Machine-generated tasks shown per prompt")
    seed_sampling: Literal["uniform", "inverse"] = Field(description="inverse: weight 1/perplexity under the current model")
    instruction_sampling: Sampling
    response_sampling: Sampling
    questions_per_gap_doc: int = Field(2, ge=1, le=16, description="AITP questions written per gap document")
    seed: int = Field(0, description="Sampling seed; a rerun gives the same data")


class Dedup(_Model):
    rouge_l: float = Field(0.7, gt=0, le=1, alias="rougeL", description="Reject when ROUGE-L F1 > this")


class Threshold(_Model):
    quality: float = Field(ge=0, le=10, description="Keep when expected quality > this")
    following: float = Field(ge=0, le=10, description="Keep when expected following > this")
    rewrite_quality: float = Field(7.0, ge=0, le=10, description="AITP rewrites: keep when quality >= this")


class Assess(_Model):
    judge: Literal["base", "current"] = Field(description="Which model scores the data")
    rules: list[Literal["self-instruct", "isheep"]] = Field(min_length=0, description="Rule-filter families applied")
    dedup: Dedup = Dedup()
    threshold: Threshold
    min_kept: int = Field(1, ge=1, description="Fewer kept items fail the stage")


class Train(_Model):
    from_: Literal["base", "previous"] = Field(alias="from", description="Train on the base model or on the previous round's")
    data: Literal["round", "cumulative"] = Field(description="This round's kept data, or every round's so far")
    lora_rank: int = Field(ge=1, le=1024)
    lora_alpha: float = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1, description='Module names, or ["all-linear"]')
    learning_rate: float = Field(gt=0, le=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_ratio: float = Field(ge=0, le=1)
    epochs: float = Field(gt=0, le=100)
    per_device_batch_size: int = Field(ge=1, le=4096)
    gradient_accumulation_steps: int = Field(ge=1, le=4096)
    max_seq_length: int = Field(ge=16, le=1_048_576)
    zero_stage: Literal[0, 1, 2, 3]
    nodes: int = Field(1, ge=1, le=1024, description="Nodes for one training Job (Indexed Job when > 1)")
    checkpoint_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps")
    seed: int = 0


class Merge(_Model):
    tolerance: float = Field(0.01, gt=0, description="Max abs logit difference, merged vs adapter, on a probe batch")


class Coverage(_Model):
    reference: str = Field(pattern=MODEL_URI, description="Reference corpus (JSONL with text, or text lines)")
    embedder: str = Field("builtin://all-minilm-l6-v2", pattern=MODEL_URI, description="sentence-transformers model")
    similarity: float = Field(0.5, ge=-1, le=1, description="A document is covered when its nearest item is at least this similar")
    k: int = Field(10, ge=1, le=1000, description="Neighbours for the SFT-density score")
    gap_docs_per_round: int = Field(ge=0, le=1_000_000, description="Gap documents handed to the next round's synthesize")
    exact_search_limit: int = Field(100_000, ge=1, description="Above this many vectors, an approximate index")


class Engine(_Model):
    """vLLM settings shared by synthesize and assess."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(4096, ge=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int | None = Field(None, ge=1, description="Default: the stage's GPU count")
    enforce_eager: bool = False


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class StageResources(_Model):
    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod")
    cpu: str | None = Field(None, pattern=QUANTITY)
    memory: str | None = Field(None, pattern=QUANTITY)
    shm_size: str = Field("1Gi", pattern=QUANTITY, description="Memory-backed /dev/shm")
    scratch_size: str = Field("50Gi", pattern=QUANTITY, description="Scratch volume for model files")
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    priority_class_name: str | None = None
    image: str | None = Field(None, description="Overrides the operator's image for this stage")


class Resources(_Model):
    synthesize: StageResources = StageResources()
    assess: StageResources = StageResources()
    train: StageResources = StageResources()
    merge: StageResources = StageResources()
    coverage: StageResources = StageResources()

    def for_stage(self, stage: str) -> StageResources:
        return getattr(self, stage)


class RunSpec(_Model):
    recipe: Recipe
    rounds: int = Field(ge=1, le=100)
    model: ModelSource
    seeds: str = Field(pattern=MODEL_URI, description="Seed tasks: Self-Instruct, Alpaca or chat JSONL")
    storage: Storage
    synthesize: Synthesize
    assess: Assess
    train: Train
    merge: Merge = Merge()
    coverage: Coverage
    engine: Engine = Engine()
    resources: Resources = Resources()
    queue_name: str | None = Field(None, max_length=63, description="Kueue LocalQueue")
    suspend: bool = False
    backoff_limit: int = Field(2, ge=0, le=20, description="Pod retries per stage Job")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") in PRESETS:
            return deep_merge(PRESETS[data["recipe"]], data)
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> RunSpec:
        if self.synthesize.seed_examples + self.synthesize.machine_examples > 32:
            raise ValueError("spec.synthesize: seedExamples + machineExamples must be <= 32")
        if self.train.nodes > 1 and self.resources.train.gpus < 1:
            raise ValueError("spec.train.nodes: more than one node needs resources.train.gpus >= 1")
        return self

    def stage_resources(self, stage: str) -> StageResources:
        return self.resources.for_stage(stage)


_SI_DECODING = {"temperature": 0.7, "topP": 0.5, "maxTokens": 1024, "presencePenalty": 2.0}
_ISHEEP_DECODING = {"temperature": 1.0, "topP": 0.95, "maxTokens": 1000, "presencePenalty": 0.0}
_TRAIN_COMMON = {
    "data": "round", "loraRank": 16, "loraAlpha": 32, "loraDropout": 0.05,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learningRate": 4e-4,
    "scheduler": "cosine", "warmupRatio": 0.03, "epochs": 3, "perDeviceBatchSize": 4,
    "gradientAccumulationSteps": 4, "maxSeqLength": 1024, "zeroStage": 3,
}

# METHODS.md's parameters, one preset per method. A user's spec is merged over these.
PRESETS: dict[str, dict[str, Any]] = {
    "self-instruct": {
        "synthesize": {
            "instructionsPerRound": 52_000, "maxPrompts": 200_000, "seedExamples": 6,
            "machineExamples": 2, "seedSampling": "uniform",
            "instructionSampling": _SI_DECODING,
            "responseSampling": {"temperature": 0.0, "topP": 1.0, "maxTokens": 1024},
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


def parse_spec(raw: dict[str, Any] | None) -> RunSpec:
    """Validate a spec as written in a manifest (camelCase); raise SpecError naming each field."""
    try:
        return RunSpec.model_validate(raw or {})
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"] or not message.startswith("spec."):
                message = f"{_field_path(err['loc'])}: {message}"
            errors.append(message)
        raise SpecError(errors) from None


def dump_spec(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as the stages receive it (camelCase, every default filled in)."""
    return spec.model_dump(mode="json", by_alias=True)
