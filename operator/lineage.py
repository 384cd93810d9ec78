"""Where each stage of round k reads and writes: the storage layout and the model lineage.

Round k generates with model M_k (M_0 is the base model); its merge stage writes M_{k+1} to
`models/round-<k+1>/`. `train.from` picks the model the adapter is trained on (and merged into):
the base model in every round (I-SHEEP) or the previous round's model. `assess.judge` picks the
scorer: the base model (I-SHEEP) or the current model M_k.
"""
from __future__ import annotations

from .spec import RunSpec


def run_uri(spec: RunSpec, namespace: str, name: str) -> str:
    """The run's storage prefix: every artifact of the run lives below it."""
    return f"{spec.storage.uri.rstrip('/')}/{namespace}/{name}"


def stage_uri(run: str, round_: int, stage: str) -> str:
    return f"{run}/round-{round_}/{stage}"


def model_uri(spec: RunSpec, run: str, round_: int) -> str:
    """M_k: the model that round k generates with."""
    return spec.model.base if round_ == 0 else f"{run}/models/round-{round_}"


def stage_model(spec: RunSpec, run: str, round_: int, stage: str) -> str | None:
    """The one model a stage loads, or None for stages that load none (coverage)."""
    if stage == "synthesize":
        return model_uri(spec, run, round_)
    if stage == "assess":
        return spec.model.base if spec.assess.judge == "base" else model_uri(spec, run, round_)
    if stage in ("train", "merge"):
        return spec.model.base if spec.train.from_ == "base" else model_uri(spec, run, round_)
    return None
