"""The stage contract: what every stage receives, and the error that names bad input."""
from __future__ import annotations

from dataclasses import dataclass

from selfalign.operator.lineage import stage_uri
from selfalign.operator.spec import RunSpec


class StageError(Exception):
    """A failure with a one-line cause the user can act on (bad input: file, line and field)."""


@dataclass(frozen=True)
class StageContext:
    stage: str
    spec: RunSpec
    round: int
    run_uri: str  # the run's storage prefix: <storage.uri>/<namespace>/<name>
    model: str | None  # the one model this stage loads (planner's lineage), None for coverage
    scratch: str  # local directory for model files (the Job's scratch volume)

    @property
    def out(self) -> str:
        """This stage's output prefix: <run>/round-<k>/<stage>."""
        return stage_uri(self.run_uri, self.round, self.stage)

    def stage_out(self, round_: int, stage: str) -> str:
        """Another stage's output prefix (e.g. the assess output this round's train reads)."""
        return stage_uri(self.run_uri, round_, stage)


@dataclass(frozen=True)
class StageOutcome:
    """What a stage's `run` returns; `__main__` writes it into manifest.json and the result."""

    summary: dict  # small (< 4 KB) JSON for the operator's status: counts, scores, loss, coverage
    outputs: dict  # name -> URI of every file written
    metrics: dict  # everything else worth keeping: histograms, curves, per-rule counts
