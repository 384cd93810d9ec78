"""The stage contract: what every stage receives, and the error that names bad input."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from selfalign.operator.lineage import stage_uri
from selfalign.operator.spec import RunSpec


class StageError(Exception):
    """A failure with a one-line cause the user can act on (bad input: file, line and field)."""


@dataclass
class StageClock:
    """Where a stage's seconds go: setup (start-up and imports, model download, model load and
    engine start) or work. A stage wraps its setup steps in `ctx.setup(phase)`; everything else
    after `started` is work, so setup + work is the stage process's wall time by construction."""

    started: float = field(default_factory=time.time)  # epoch seconds; __main__ gives the process's start
    phases: dict[str, float] = field(default_factory=dict)  # phase -> setup seconds

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def split(self, now: float) -> dict:
        """{setupSeconds, workSeconds, setup: {phase: seconds}}, to the millisecond."""
        setup = sum(self.phases.values())
        return {"setupSeconds": round(setup, 3), "workSeconds": round(max(now - self.started - setup, 0.0), 3),
                "setup": {phase: round(seconds, 3) for phase, seconds in self.phases.items()}}


@dataclass(frozen=True)
class StageContext:
    stage: str
    spec: RunSpec
    round: int
    run_uri: str  # the run's storage prefix: <storage.uri>/<namespace>/<name>
    model: str | None  # the one model this stage loads (planner's lineage), None for coverage
    scratch: str  # local directory for model files (the Job's scratch volume)
    clock: StageClock = field(default_factory=StageClock)

    @contextmanager
    def setup(self, phase: str) -> Iterator[None]:
        """Count the block as setup: `download` (models from storage), `load` (weights, engine)."""
        begun = time.monotonic()
        try:
            yield
        finally:
            self.clock.add(phase, time.monotonic() - begun)

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
