"""Deterministic names and labels of a run's children, so a create can never happen twice."""
from __future__ import annotations

import hashlib

GROUP = "selfalign.dev"
VERSION = "v1alpha1"
PLURAL = "selfalignruns"
KIND = "SelfAlignRun"

LABEL_RUN = f"{GROUP}/run"
LABEL_ROUND = f"{GROUP}/round"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_JOB = "batch.kubernetes.io/job-name"

_STAGE_SHORT = {"synthesize": "synth", "assess": "assess", "train": "train", "merge": "merge", "coverage": "cov"}
# A Job's name becomes its Pods' `job-name` label (<= 63 characters), and an Indexed Job's pods
# get the hostname `<job>-<index>` (<= 63 characters, index up to 1023 as train.nodes allows).
MAX_LABEL = 63
MAX_NAME = MAX_LABEL - len("-1023")


def job_name(run: str, round_: int, stage: str) -> str:
    """`<run>-r<k>-<stage>`; a long run name is cut and suffixed with a hash of the full name."""
    suffix = f"-r{round_}-{_STAGE_SHORT[stage]}"
    if len(run) + len(suffix) <= MAX_NAME:
        return run + suffix
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    head = run[: MAX_NAME - len(suffix) - len(digest) - 1].rstrip("-.")
    return f"{head}-{digest}{suffix}"


def config_map_name(run: str) -> str:
    """The ConfigMap holding the run's resolved spec for its stage pods."""
    suffix = "-spec"
    if len(run) + len(suffix) <= MAX_NAME:
        return run + suffix
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    return f"{run[: MAX_NAME - len(suffix) - 9].rstrip('-.')}-{digest}{suffix}"
