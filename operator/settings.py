"""Operator-wide settings: the stage images, default stage resources, how long finished Jobs stay.

They come from the operator Deployment's environment (the Helm chart sets them), so a platform
team pins or mirrors images and sizes stage pods for its nodes without touching any run. A run
still overrides any of it per field in `spec.resources.<stage>`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Mapping

from pydantic import ValidationError

from .spec import STAGES, PodTemplate, StageResources

# What the CRD's schema writes into every stored run that leaves a stage's field out (gpus: 0,
# shmSize, scratchSize): the same defaults as the typed spec's, from which the CRD is generated.
SCHEMA_DEFAULTS = StageResources().model_dump(by_alias=True, mode="json")

REGISTRY = "ghcr.io/selfalign"
# Stages that share dependencies share an image: vLLM for synthesize/assess, PEFT+DeepSpeed for
# train/merge, sentence-transformers+faiss for coverage.
STAGE_IMAGE = {"synthesize": "stage-vllm", "assess": "stage-vllm", "train": "stage-train",
               "merge": "stage-train", "coverage": "stage-coverage"}
IMAGE_ENV = "SELFALIGN_IMAGE_{stage}"
TTL_ENV = "SELFALIGN_JOB_TTL_SECONDS"
# A finished Job must outlive any operator outage, or its outcome is never observed and a failed
# stage's Job is created again and again.
MIN_JOB_TTL = 3600
RESOURCES_ENV = "SELFALIGN_STAGE_RESOURCES"  # JSON {stage: {gpus, cpu, memory, ...}} (camelCase)
POD_TEMPLATE_ENV = "SELFALIGN_POD_TEMPLATE"  # JSON: a spec.podTemplate under every run's
NETWORK_POLICY_ENV = "SELFALIGN_NETWORK_POLICY"  # JSON {"egress": [rules] | null}: a policy per run


def default_images() -> dict[str, str]:
    """Each stage's image, tagged with this package's version so operator and stages match."""
    tag = metadata.version("selfalign")
    return {stage: f"{REGISTRY}/{STAGE_IMAGE[stage]}:{tag}" for stage in STAGES}


@dataclass(frozen=True)
class OperatorSettings:
    images: Mapping[str, str] = field(default_factory=default_images)
    # Status keeps every finished stage's result, so a finished Job is only needed for debugging.
    job_ttl_seconds: int = 7 * 86400
    stage_resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Under every run's spec.podTemplate: the cluster's pod labels, ServiceAccount, pull secrets...
    pod_template: PodTemplate | None = None
    # None: no NetworkPolicy; else one per run, egress restricted when "egress" holds rules.
    network_policy: Mapping[str, Any] | None = None

    def with_defaults(self, raw_spec: Mapping[str, Any] | None) -> dict[str, Any]:
        """The run's spec over the operator's default `resources`: a stage field the run sets wins,
        unless its value is the schema's default. The API server writes those defaults into every
        stored run, so such a value cannot be told from one left unset; read as the run's own, a
        chart's `gpus: 1` would always lose to the stored `gpus: 0`."""
        spec = dict(raw_spec or {})
        given = spec.get("resources") or {}
        if not self.stage_resources or not isinstance(given, Mapping):
            return spec  # nothing to add, or not a mapping: parse_spec names the error
        resources = dict(given)
        for stage, defaults in self.stage_resources.items():
            run = given.get(stage) or {}
            if isinstance(run, Mapping):
                resources[stage] = {**run, **{key: value for key, value in defaults.items()
                                              if run.get(key, SCHEMA_DEFAULTS.get(key)) == SCHEMA_DEFAULTS.get(key)}}
        return {**spec, "resources": resources}

    def __post_init__(self) -> None:
        missing = [stage for stage in STAGES if not self.images.get(stage)]
        if missing:
            raise ValueError(f"OperatorSettings.images: no image for stage(s) {', '.join(missing)}")
        if self.job_ttl_seconds < MIN_JOB_TTL:
            raise ValueError(f"{TTL_ENV}: must be >= {MIN_JOB_TTL} (a finished Job must outlive an "
                             f"operator outage to be observed), got {self.job_ttl_seconds}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """SELFALIGN_IMAGE_<STAGE> replaces one stage's image; SELFALIGN_JOB_TTL_SECONDS the TTL."""
        images = default_images()
        for stage in STAGES:
            override = environ.get(IMAGE_ENV.format(stage=stage.upper()), "").strip()
            if override:
                images[stage] = override
        given: dict[str, Any] = {
            "stage_resources": _stage_resources(environ.get(RESOURCES_ENV, "").strip()),
            "pod_template": _pod_template(environ.get(POD_TEMPLATE_ENV, "").strip()),
            "network_policy": _network_policy(environ.get(NETWORK_POLICY_ENV, "").strip()),
        }
        raw_ttl = environ.get(TTL_ENV, "").strip()
        if raw_ttl:
            try:
                given["job_ttl_seconds"] = int(raw_ttl)
            except ValueError:
                raise ValueError(f"{TTL_ENV}: expected a whole number of seconds, "
                                 f"got {raw_ttl!r}") from None
        return cls(images=images, **given)


def _stage_resources(raw: str) -> dict[str, dict[str, Any]]:
    if not raw:
        return {}
    value = _json(RESOURCES_ENV, raw)
    if not isinstance(value, dict) or not set(value) <= set(STAGES) or \
            not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"{RESOURCES_ENV}: expected {{stage: {{gpus, cpu, memory, ...}}}} "
                         f"with stages among {', '.join(STAGES)}")
    return value


def _json(name: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: invalid JSON: {exc}") from None


def _pod_template(raw: str) -> PodTemplate | None:
    """The chart's pod template, held to the rules of a run's (the stage contract stays)."""
    if not raw:
        return None
    try:
        return PodTemplate.model_validate(_json(POD_TEMPLATE_ENV, raw))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise ValueError("; ".join(
            f"{POD_TEMPLATE_ENV}: " + ".".join(str(part) for part in err["loc"]) + f": {err['msg']}"
            for err in errors)) from None


def _network_policy(raw: str) -> dict[str, Any] | None:
    if not raw:
        return None
    value = _json(NETWORK_POLICY_ENV, raw)
    if not isinstance(value, dict) or set(value) != {"egress"} or \
            not (value["egress"] is None or isinstance(value["egress"], list)):
        raise ValueError(f'{NETWORK_POLICY_ENV}: expected {{"egress": [NetworkPolicyEgressRule, ...] or null}}')
    return value
