"""Operator-wide settings: the stage images and how long finished Jobs stay.

They come from the operator Deployment's environment (the Helm chart sets them), so a platform
team pins or mirrors images without touching any run. A run may still override one stage's image
in `spec.resources.<stage>.image`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Mapping

from .spec import STAGES

REGISTRY = "ghcr.io/selfalign"
# Stages that share dependencies share an image: vLLM for synthesize/assess, PEFT+DeepSpeed for
# train/merge, sentence-transformers+faiss for coverage.
STAGE_IMAGE = {"synthesize": "stage-vllm", "assess": "stage-vllm", "train": "stage-train",
               "merge": "stage-train", "coverage": "stage-coverage"}
IMAGE_ENV = "SELFALIGN_IMAGE_{stage}"
TTL_ENV = "SELFALIGN_JOB_TTL_SECONDS"


def default_images() -> dict[str, str]:
    """Each stage's image, tagged with this package's version so operator and stages match."""
    tag = metadata.version("selfalign")
    return {stage: f"{REGISTRY}/{STAGE_IMAGE[stage]}:{tag}" for stage in STAGES}


@dataclass(frozen=True)
class OperatorSettings:
    images: Mapping[str, str] = field(default_factory=default_images)
    # Status keeps every finished stage's result, so a finished Job is only needed for debugging.
    job_ttl_seconds: int = 7 * 86400

    def __post_init__(self) -> None:
        missing = [stage for stage in STAGES if not self.images.get(stage)]
        if missing:
            raise ValueError(f"OperatorSettings.images: no image for stage(s) {', '.join(missing)}")
        if self.job_ttl_seconds < 0:
            raise ValueError(f"{TTL_ENV}: must be >= 0, got {self.job_ttl_seconds}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """SELFALIGN_IMAGE_<STAGE> replaces one stage's image; SELFALIGN_JOB_TTL_SECONDS the TTL."""
        images = default_images()
        for stage in STAGES:
            override = environ.get(IMAGE_ENV.format(stage=stage.upper()), "").strip()
            if override:
                images[stage] = override
        raw_ttl = environ.get(TTL_ENV, "").strip()
        if not raw_ttl:
            return cls(images=images)
        try:
            ttl = int(raw_ttl)
        except ValueError:
            raise ValueError(f"{TTL_ENV}: expected a whole number of seconds, "
                             f"got {raw_ttl!r}") from None
        return cls(images=images, job_ttl_seconds=ttl)
