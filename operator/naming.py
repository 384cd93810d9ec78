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
    """`<run>-r<k>-<stage>`."""
    return _child(run, f"-r{round_}-{_STAGE_SHORT[stage]}")


def config_map_name(run: str) -> str:
    """The ConfigMap holding the run's resolved spec for its stage pods."""
    return _child(run, "-spec")


def _child(run: str, suffix: str) -> str:
    """`<run><suffix>` when that is a DNS label of at most MAX_NAME characters. A run name may be a
    DNS subdomain (dots, up to 253 characters), which no Service or pod hostname may be: then the
    dots become dashes, the name is cut, and a hash of the full name keeps it unique (`team.a`
    and `team-a` must not share children)."""
    if "." not in run and len(run) + len(suffix) <= MAX_NAME:
        return run + suffix
    digest = hashlib.sha256(run.encode()).hexdigest()[:8]
    head = run.replace(".", "-")[: MAX_NAME - len(suffix) - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}{suffix}"
