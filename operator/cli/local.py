"""The local backend: a whole campaign on this machine, with the operator's planner.

`selfalign run SPEC.yaml` loops: plan, persist status under the run's storage prefix, run the one
stage the plan asks for as a subprocess (the same command a Job runs), observe its exit code and
result file, plan again. Exit code 2 (bad input) fails the stage at once; other failures are
retried up to `spec.backoffLimit` times, as the Job's podFailurePolicy does on a cluster. Status
is the memory: Ctrl-C stops the running stage, and the same command later resumes where it
stopped (a stage with a manifest is complete; partial outputs are overwritten). Ctrl-C only sets
a flag that the loop checks: a KeyboardInterrupt raised at an arbitrary line can land in a
finalizer or a library's cleanup and be swallowed, and a CI run once went on with the campaign
after Ctrl-C that way; a flag cannot be lost.

The terminal gets one line per stage (campaign progress, result, ETA); what the stage itself
prints (vLLM, DeepSpeed, progress bars) goes to its log file in the run's folder,
`logs/round-<k>-<stage>.log` (`selfalign logs`), and also to the terminal with `verbose`.
A run without `spec.storage` lives in the user's data directory (XDG), which survives a reboot.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from ..lineage import run_uri
from ..planner import EnsureJob, JobObservation, plan
from ..spec import STAGES, RunSpec, dump_spec, parse_spec

LOCAL_NAMESPACE = "local"
EXIT_BAD_INPUT = 2  # the stage's "retrying cannot help" exit code (stages/__main__.py)
REFRESH_SECONDS = 1.0  # the running stage's line on a terminal
STOP_GRACE_SECONDS = 10.0  # a stopped stage's time to exit on its own Ctrl-C, then to SIGTERM
BAR_WIDTH = 20
STAGE_COMMAND = (sys.executable, "-m", "selfalign.stages")  # what a stage Job runs


def default_storage() -> str:
    """Where local runs live unless the spec or --storage says otherwise: the user's data
    directory ($XDG_DATA_HOME, else ~/.local/share), which survives a reboot, unlike /tmp."""
    home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return (Path(home) / "selfalign" / "runs").as_uri()


def stage_log_uri(run_uri: str, round_: int, stage: str) -> str:
    """The stage's own output (stdout and stderr of every attempt) in the run's folder."""
    return f"{run_uri}/logs/round-{round_}-{stage}.log"


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


def with_local_storage(manifest: dict[str, Any], storage_override: str | None = None) -> dict[str, Any]:
    """The manifest with its storage where the local run keeps it: `storage_override`, else the
    spec's, else `default_storage()`."""
    spec = dict(manifest.get("spec") or {})
    if storage_override or not spec.get("storage"):
        spec["storage"] = {**(spec.get("storage") or {}), "uri": storage_override or default_storage()}
    return {**manifest, "spec": spec}


def load_run(manifest: dict[str, Any], storage_override: str | None = None) -> LocalRun:
    """The run named by a SelfAlignRun manifest, its storage as `with_local_storage` puts it."""
    name = (manifest.get("metadata") or {}).get("name") or "local-run"
    return LocalRun(name, parse_spec(with_local_storage(manifest, storage_override)["spec"]))


def run_local(run: LocalRun, scratch: Path, echo: Callable[[str], None] = print, *, verbose: bool = False,
              live: IO[str] | None = None, stage_command: tuple[str, ...] = STAGE_COMMAND) -> int:
    """Run the campaign to its end; return 0 when it succeeded, 1 when it failed, 130 when stopped.

    `echo` gets one line per finished stage; `live` (a terminal) also shows the running stage's
    line, rewritten every second; `verbose` streams the stages' own output to stdout.
    """
    from selfalign.stages.runtime import storage

    status = storage.read_json(run.status_uri) if storage.exists(run.status_uri) else {}
    observed: dict[str, JobObservation] = {}
    scratch.mkdir(parents=True, exist_ok=True)
    spec_file = scratch / f"{run.name}-spec.json"
    spec_file.write_text(json.dumps(dump_spec(run.spec)))
    storage.write_json(f"{run.uri}/spec.json", dump_spec(run.spec))  # for status and report
    echo(f"stage logs: {run.uri}/logs/ (selfalign logs {run.name} --round K --stage S)")
    progress = Progress(run.spec.rounds, time.monotonic())
    with _ctrl_c_as_flag() as stop:
        while True:
            result = plan(run.spec, status, observed, datetime.now(timezone.utc),
                          namespace=LOCAL_NAMESPACE, name=run.name, generation=1)
            if result.status != status:
                storage.write_json(run.status_uri, result.status)
            status = result.status
            for event in result.events:
                if event.reason.startswith("Run") and event.reason != "RunRunning":
                    echo(f"[{progress.elapsed()}] {event.message}")
            job = next((j for j in result.jobs if j.name not in observed or observed[j.name].phase == "Active"),
                       None)
            if job is None:
                return 0 if status["phase"] == "Succeeded" else 1
            if stop.is_set():
                echo(f"stopped before round {job.round + 1} {job.stage}; {RESUME}")
                return 130
            if job.name not in observed:
                # Record the stage as running (and when it started) before it runs, as a Job would show.
                observed[job.name] = JobObservation(job.name, job.round, job.stage, "Active", start_time=_now())
                continue
            done = sum(1 for entry in status.get("rounds") or [] for record in entry["stages"].values()
                       if record.get("phase") == "Succeeded")
            try:
                observed[job.name] = _run_stage(run, job, spec_file, scratch, stage_command, verbose,
                                                _Line(progress, done, job, echo, live), stop)
            except _Stopped:
                echo(f"stopped during round {job.round + 1} {job.stage}; {RESUME}")
                return 130


RESUME = "run the same command again to resume"


class _Stopped(Exception):
    """Ctrl-C ended the running stage's attempt: not a failure, nothing to retry."""


@contextmanager
def _ctrl_c_as_flag() -> Iterator[threading.Event]:
    """SIGINT sets the yielded flag instead of raising KeyboardInterrupt (module docstring)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only it can take signals
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Progress:
    """The campaign's clock: stage durations seen so far, and what they predict for the rest."""

    rounds: int
    started: float
    seconds: dict[str, list[float]] = field(default_factory=dict)  # stage -> durations

    def elapsed(self) -> str:
        return _clock(time.monotonic() - self.started)

    def eta(self, done: int) -> float | None:
        """Seconds left after `done` stages: each remaining stage as long as that stage took on
        average so far (any stage's average where that one has not run yet); None before any."""
        every = [s for durations in self.seconds.values() for s in durations]
        if not every:
            return None
        order = [stage for _ in range(self.rounds) for stage in STAGES][done:]
        return sum(_mean(self.seconds.get(stage) or every) for stage in order)


@dataclass
class _Line:
    """The terminal line of one stage: `[elapsed] [bar] done/total round k/N stage: text, ETA`."""

    progress: Progress
    done: int  # stages finished before this one
    job: EnsureJob
    echo: Callable[[str], None]
    live: IO[str] | None

    def text(self, state: str, finished: bool, failed: bool = False) -> str:
        total = self.progress.rounds * len(STAGES)
        done = self.done + finished
        bar = "#" * (BAR_WIDTH * done // total) + "-" * (BAR_WIDTH - BAR_WIDTH * done // total)
        eta = self.progress.eta(done)
        tail = "" if eta is None or done == total or failed else f"; campaign ETA {_clock(eta)}"
        return (f"[{self.progress.elapsed()}] [{bar}] {done}/{total} round {self.job.round + 1}/"
                f"{self.progress.rounds} {self.job.stage}: {state}{tail}")

    def update(self, state: str) -> None:
        if self.live is not None:
            width = shutil.get_terminal_size().columns - 1
            self.live.write("\r" + self.text(state, False)[:width].ljust(width))
            self.live.flush()

    def finish(self, state: str, succeeded: bool) -> None:
        if self.live is not None:
            self.live.write("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r")
        self.echo(self.text(state, succeeded, failed=not succeeded))


def _run_stage(run: LocalRun, job: EnsureJob, spec_file: Path, scratch: Path, stage_command: tuple[str, ...],
               verbose: bool, line: _Line, stop: threading.Event) -> JobObservation:
    """Run one stage like a Job with `backoffLimit` retries; return what it shows when it ends."""
    from selfalign.stages.runtime import storage

    command = [*stage_command, job.stage, "--spec", str(spec_file), "--round", str(job.round),
               "--run-uri", job.run_uri, "--scratch", str(scratch)]
    if job.model:
        command += ["--model", job.model]
    log_uri = stage_log_uri(run.uri, job.round, job.stage)
    log_path = _local_log(log_uri, scratch / run.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failures, start_time, began = 0, _now(), time.monotonic()
    while True:
        with tempfile.TemporaryDirectory() as tmp, log_path.open("ab") as log:
            result_path = Path(tmp) / "result.json"
            # A private torch.compile cache: concurrent processes sharing /tmp/torchinductor_<user>
            # have been seen to compile each other's half-written kernels.
            env = {"TORCHINDUCTOR_CACHE_DIR": str(scratch / "torchinductor"), **os.environ,
                   "SELFALIGN_RESULT_PATH": str(result_path)}
            log.write(f"=== {_now()} attempt {failures + 1}: {' '.join(command)}\n".encode())
            log.flush()
            code = _attempt(command, env, log, verbose, line, f"running (attempt {failures + 1})", stop)
            result = _read_result(result_path)
        if code != 0 and stop.is_set():
            raise _Stopped
        if not log_uri.startswith("file://"):
            storage.write_bytes(log_uri, log_path.read_bytes())
        if code == 0:
            line.progress.seconds.setdefault(job.stage, []).append(time.monotonic() - began)
            brief = _brief(job, result)
            line.finish(f"done in {_clock(time.monotonic() - began)}" + (f": {brief}" if brief else ""), True)
            return JobObservation(job.name, job.round, job.stage, "Succeeded", failures=failures, result=result,
                                  start_time=start_time, completion_time=_now())
        failures += 1
        message = result.get("error") or f"exit code {code}"
        final = code == EXIT_BAD_INPUT or failures > run.spec.backoff_limit
        line.finish(f"failed{'' if final else ', retrying'}: {message} (log: {log_uri})", False)
        if final:
            return JobObservation(job.name, job.round, job.stage, "Failed", failures=failures, result=result,
                                  message=message, start_time=start_time, completion_time=_now())


def _attempt(command: list[str], env: dict[str, str], log: IO[bytes], verbose: bool, line: _Line,
             state: str, stop: threading.Event) -> int:
    """One run of the stage process, its output to `log` (and to stdout when `verbose`)."""
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE if verbose else log,
                          stderr=subprocess.STDOUT) as process:
        if not verbose:
            return _wait(process, stop, lambda seconds: line.update(f"{state} {_clock(seconds)}"))
        copier = threading.Thread(target=_tee, args=(process.stdout, log), daemon=True)
        copier.start()
        code = _wait(process, stop, lambda seconds: None)
        copier.join(timeout=STOP_GRACE_SECONDS)  # a stage's own children may hold the pipe open
        return code


def _wait(process: subprocess.Popen, stop: threading.Event, tick: Callable[[float], None]) -> int:
    """The stage's exit code; after Ctrl-C, it gets a grace period (the terminal sent it Ctrl-C
    too), then SIGTERM, then SIGKILL, so that a stage that ignores Ctrl-C cannot hold the run."""
    began = time.monotonic()
    while not stop.is_set():
        tick(time.monotonic() - began)
        try:
            return process.wait(timeout=REFRESH_SECONDS)
        except subprocess.TimeoutExpired:
            continue
    try:
        return process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        return process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _tee(source: IO[bytes], log: IO[bytes]) -> None:
    for chunk in source:
        log.write(chunk)
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


def _local_log(log_uri: str, fallback_dir: Path) -> Path:
    """Where the log is written while the stage runs: in the run's folder when it is on this
    machine, else in scratch (copied to the run's folder after each attempt)."""
    if log_uri.startswith("file://"):
        return Path(unquote(urlparse(log_uri).path))
    return fallback_dir / "logs" / log_uri.rsplit("/", 1)[-1]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _brief(job: EnsureJob, result: dict[str, Any]) -> str:
    """What the stage produced, in the words of `selfalign status` (report.key_metric)."""
    from .report import Run, key_metric

    return key_metric(Run("", "", {}, {(job.round, job.stage): {"summary": result}}), job.round, job.stage)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}" if whole >= 3600 \
        else f"{whole // 60:02d}:{whole % 60:02d}"
