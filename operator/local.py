"""The local backend: a whole campaign on this machine, with the operator's planner.

`selfalign run SPEC.yaml` loops: plan, persist status under the run's storage prefix, run the one
stage the plan asks for as a subprocess (the same command a Job runs), observe its exit code and
result file, plan again. Exit code 2 (bad input) fails the stage at once; other failures are
retried up to `spec.backoffLimit` times, as the Job's podFailurePolicy does on a cluster. Status
is the memory: Ctrl-C stops the running stage, and the same command later resumes where it
stopped (a stage with a manifest is complete; partial outputs are overwritten).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .lineage import run_uri
from .planner import EnsureJob, JobObservation, plan
from .spec import RunSpec, dump_spec, parse_spec

LOCAL_NAMESPACE = "local"
DEFAULT_STORAGE = "file:///tmp/selfalign-runs"  # examples/tiny.yaml's storage.uri
EXIT_BAD_INPUT = 2  # the stage's "retrying cannot help" exit code (stages/__main__.py)


@dataclass(frozen=True)
class LocalRun:
    name: str
    spec: RunSpec

    @property
    def uri(self) -> str:
        return run_uri(self.spec, LOCAL_NAMESPACE, self.name)

    @property
    def status_uri(self) -> str:
        return f"{self.uri}/status.json"


def load_run(manifest: dict[str, Any], storage_override: str | None = None) -> LocalRun:
    """The run named by a SelfAlignRun manifest, optionally with its storage moved elsewhere."""
    name = (manifest.get("metadata") or {}).get("name") or "local-run"
    raw = dict(manifest.get("spec") or {})
    if storage_override:
        raw["storage"] = {**(raw.get("storage") or {}), "uri": storage_override}
    return LocalRun(name, parse_spec(raw))


def run_local(run: LocalRun, scratch: Path, echo: Callable[[str], None] = print) -> int:
    """Run the campaign to its end; return 0 when it succeeded, 1 when it failed or was stopped."""
    from selfalign.stages import storage

    status = storage.read_json(run.status_uri) if storage.exists(run.status_uri) else {}
    observed: dict[str, JobObservation] = {}
    scratch.mkdir(parents=True, exist_ok=True)
    spec_file = scratch / f"{run.name}-spec.json"
    spec_file.write_text(json.dumps(dump_spec(run.spec)))
    storage.write_json(f"{run.uri}/spec.json", dump_spec(run.spec))  # for status and report
    started = time.monotonic()
    while True:
        result = plan(run.spec, status, observed, datetime.now(timezone.utc),
                      namespace=LOCAL_NAMESPACE, name=run.name, generation=1)
        if result.status != status:
            storage.write_json(run.status_uri, result.status)
        status = result.status
        for event in result.events:
            echo(f"[{_elapsed(started)}] {event.reason}: {event.message}")
        job = next((j for j in result.jobs if j.name not in observed or observed[j.name].phase == "Active"), None)
        if job is None:
            return 0 if status["phase"] == "Succeeded" else 1
        if job.name not in observed:
            # Record the stage as running (and when it started) before it runs, as a Job would show.
            observed[job.name] = JobObservation(job.name, job.round, job.stage, "Active", start_time=_now())
            continue
        try:
            observed[job.name] = _run_stage(run, job, spec_file, scratch, echo, started)
        except KeyboardInterrupt:
            echo(f"stopped during round {job.round} stage {job.stage}; run the same command again to resume")
            return 130


def _run_stage(run: LocalRun, job: EnsureJob, spec_file: Path, scratch: Path,
               echo: Callable[[str], None], started: float) -> JobObservation:
    """Run one stage like a Job with `backoffLimit` retries; return what it shows when it ends."""
    command = [sys.executable, "-m", "selfalign.stages", job.stage, "--spec", str(spec_file),
               "--round", str(job.round), "--run-uri", job.run_uri, "--scratch", str(scratch)]
    if job.model:
        command += ["--model", job.model]
    failures, start_time = 0, _now()
    while True:
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            # A private torch.compile cache: concurrent processes sharing /tmp/torchinductor_<user>
            # have been seen to compile each other's half-written kernels.
            env = {"TORCHINDUCTOR_CACHE_DIR": str(scratch / "torchinductor"), **os.environ,
                   "SELFALIGN_RESULT_PATH": str(result_path)}
            echo(f"[{_elapsed(started)}] round {job.round} {job.stage}: running (attempt {failures + 1})")
            code = subprocess.run(command, env=env, check=False).returncode
            result = _read_result(result_path)
        if code == 0:
            echo(f"[{_elapsed(started)}] round {job.round} {job.stage}: done {_brief(result)}")
            return JobObservation(job.name, job.round, job.stage, "Succeeded", failures=failures, result=result,
                                  start_time=start_time, completion_time=_now())
        failures += 1
        message = result.get("error") or f"exit code {code}"
        echo(f"[{_elapsed(started)}] round {job.round} {job.stage}: failed: {message}")
        if code == EXIT_BAD_INPUT or failures > run.spec.backoff_limit:
            return JobObservation(job.name, job.round, job.stage, "Failed", failures=failures, result=result,
                                  message=message, start_time=start_time, completion_time=_now())


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _brief(result: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str)))[:200]


def _elapsed(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"
