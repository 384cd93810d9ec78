"""From a Job turning Complete to the run's next Job existing, on the emulator harness.

    python -m bench.operator --runs 1 50 200

For each R, a fresh kmock emulator (tests/fixtures/kube.py `Emulator`) and test kubelet run in this
process, and the real operator (`OperatorProcess`: the kopf handlers of operator/handlers.py) runs
in its own process, as it does in a cluster. R runs of --rounds rounds (5 stage Jobs a round) are
created at once. The emulator stamps the moment it stored each Job's Complete condition and each
Job's creation; a gap is the time from a stage Job's Complete to the creation of the same run's
next stage Job: R x (5 x rounds - 1) gaps. Each gap is split in two with times taken in the
operator process (CLOCK_MONOTONIC is system-wide, so they compare): event delivery (Complete
stored -> the operator's Job index first sees the Job Complete: the watch stream and kopf's queue)
and operator reaction (-> its POST of the next Job returned: the reconcile pass and its API round
trips).

Two loads, both reported:
- paced (the goal's measurement): every stage Pod works for a time drawn uniformly from
  --stage-seconds (default 5-15 s, seeded by the Job's name) before the fast fake stage writes its
  result, and every Pod runs at once (one node slot per run). 200 runs then make ~12 transitions
  a second, far more than 200 real campaigns whose stages take minutes to hours, so the gap is the
  operator's reaction while it serves R concurrent runs.
- lockstep (capacity, --capacity-runs): zero-length stages, 4 Pods at a time, so every run is
  always between two stages. The operator and the emulator are saturated and a gap is about
  R / (transitions per second) (Little's law): this finds the throughput, not a latency.
The emulator is a single-threaded Python process that shares this machine's cores with the
operator and the stage subprocesses (and with other work: see the load average).

Operator CPU per transition: the operator process's CPU time (time.process_time, all its threads:
kopf's event loop and watch streams, the handler threads) from just before the runs are created
until all have finished, divided by the transitions. That window also holds each run's first Job
and its final status writes, so it is an upper bound. It is also split by thread (`thread_cpu`): kopf's
event loop, the reconciler's workers and its Event posters. The operator's own histogram
selfalign_job_gap_seconds is read from that process too (its timestamps come from Kubernetes
objects, with one-second resolution).

Reference: Argo Workflows between steps, modelled analytically: its workflow queue requeues at a
fixed DEFAULT_REQUEUE_TIME of 10 s (workflow/controller rate limiter), so every gap is 10 s (a
poller with a random phase would average 5 s, p95 9.5 s). The ratio is 10 s / the p95 gap at the
largest R, paced.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import attrs
import kmock
import numpy as np
import psutil

from selfalign.operator import handlers
from selfalign.operator.kube import Kube
from selfalign.operator.reconciler import Reconciler
from selfalign.operator.naming import GROUP, LABEL_JOB, PLURAL, VERSION, job_name
from selfalign.operator.spec import STAGES
from tests.fixtures.kube import (FAKE_IMAGE, NS, RUNS, WRITES, Emulator, Kubelet, OperatorProcess, api,
                                 run_manifest, sent_by_operator, wait_for)

from . import common

REFERENCE_GAP = 10.0  # Argo Workflows' DEFAULT_REQUEUE_TIME
DONE = ("Succeeded", "Failed")


def run_spec(rounds: int) -> dict:
    """A valid run whose stages the fake stage plays (paths are never read by it)."""
    return {"recipe": "isheep", "rounds": rounds, "model": {"base": "builtin://tiny-llama"},
            "seeds": "file:///data/seeds.jsonl", "storage": {"uri": "file:///data/runs"},
            "coverage": {"reference": "file:///data/reference.jsonl"}, "backoffLimit": 1}


@attrs.define(kw_only=True)
class TimedEmulator(Emulator):
    """The emulator, noting when it stored each Job creation and each Job's Complete condition."""

    created: dict[str, float] = attrs.field(factory=dict, init=False)
    completed: dict[str, float] = attrs.field(factory=dict, init=False)
    finished: set[str] = attrs.field(factory=set, init=False)  # runs whose status went Succeeded or Failed

    async def _serve(self, request: kmock.Request):
        response = await super()._serve(request)
        resource = request.resource
        if (request.action == kmock.action.UPDATE and request.subresource == "status" and response.status < 400
                and resource is not None and (resource.group, resource.plural) == (GROUP, PLURAL)
                and ((request.data or {}).get("status") or {}).get("phase") in DONE):
            # Noted as the write passes: polling every run's phase (a copy of each stored run, ten
            # times a second) cost the emulator's process more CPU than serving the operator.
            self.finished.add(request.name)
        if (request.action in WRITES and response.status < 400 and resource is not None
                and (resource.group, resource.plural) == ("batch", "jobs")):
            now = time.monotonic()
            if request.action == kmock.action.CREATE:
                self.created.setdefault(request.data["metadata"]["name"], now)
            elif request.subresource == "status" and _complete(request.data):
                self.completed.setdefault(request.name, now)
        return response


def _complete(patch: dict) -> bool:
    conditions = (patch.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


# --- the operator process ----------------------------------------------------------------------

def operator_process(url: str, conn) -> None:
    """The operator against the emulator at `url`: sends its CPU time when ready, and on "stop"
    its CPU time, RSS, job-gap histogram and the instrumentation's timeline, then stops."""
    for stage in STAGES:
        os.environ[f"SELFALIGN_IMAGE_{stage.upper()}"] = FAKE_IMAGE
    timeline = instrument()
    asyncio.run(_serve_operator(url, conn, timeline))


API_CALLS = ("get_run", "write_status", "create", "controller_uid", "suspend_job", "update_config_map", "post_event")


def instrument() -> dict:
    """Wrap operator functions, in this process only, to take the operator's own timestamps:
    when it first saw each Job Complete (kopf's Job index calls owning_run for every Job event,
    before any handler), when each pass started and ended, and when each API request was sent and
    answered; for each Job created, the start of the pass that created it, that pass's time in API
    requests before the POST, and the POST's own send and answer. CLOCK_MONOTONIC is
    system-wide, so these times compare with the emulator's."""
    timeline: dict = {"seen": {}, "posted": {}, "passes": [], "requests": {call: [] for call in API_CALLS}}
    local = threading.local()
    owning_run, reconcile = handlers.owning_run, Reconciler.reconcile

    def noting_owning_run(body):
        if _complete(body):
            timeline["seen"].setdefault(body["metadata"]["name"], time.monotonic())
        return owning_run(body)

    def noting_reconcile(self, *args, **kwargs):
        local.start, local.api = time.monotonic(), 0.0
        try:
            return reconcile(self, *args, **kwargs)
        finally:
            timeline["passes"].append(time.monotonic() - local.start)

    def noting(call: str):
        method = getattr(Kube, call)

        def timed(self, *args, **kwargs):
            sent = time.monotonic()
            try:
                return method(self, *args, **kwargs)
            finally:
                answered = time.monotonic()
                timeline["requests"][call].append(answered - sent)
                obj = args[0] if args else None
                if call == "create" and obj["kind"] == "Job":
                    timeline["posted"].setdefault(obj["metadata"]["name"], (local.start, local.api, sent, answered))
                local.api = getattr(local, "api", 0.0) + answered - sent
        return timed

    handlers.owning_run, Reconciler.reconcile = noting_owning_run, noting_reconcile
    for call in API_CALLS:
        setattr(Kube, call, noting(call))
    return timeline


async def _serve_operator(url: str, conn, timeline: dict) -> None:
    operator = OperatorProcess(SimpleNamespace(url=url))  # it only needs the URL until kill()
    await operator.start()
    conn.send(time.process_time())
    threads_before = thread_cpu()
    await asyncio.to_thread(conn.recv)
    cpu, threads = time.process_time(), thread_cpu()
    conn.send({"cpu": cpu, "rss": psutil.Process().memory_info().rss, "gap_histogram": _gap_histogram(),
               "threads": {group: seconds - threads_before.get(group, 0.0) for group, seconds in threads.items()},
               **timeline})
    await operator.stop()


THREAD_GROUPS = {"MainThread": "kopf loop", "selfalign-worker": "workers", "selfalign-events": "event posters"}


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads so far, by group: kopf's event loop (the main thread:
    watch streams, kopf's event processing, index and event handlers), the reconciler's workers
    (passes), its Event posters, and the rest (ended threads are not counted)."""
    names = {thread.native_id: thread.name.rstrip("0123456789-_") for thread in threading.enumerate()}
    groups: dict[str, float] = {}
    for thread in psutil.Process().threads():
        group = THREAD_GROUPS.get(names.get(thread.id, ""), "other")
        groups[group] = groups.get(group, 0.0) + thread.user_time + thread.system_time
    return groups


def _gap_histogram() -> dict:
    from prometheus_client import REGISTRY

    name = "selfalign_job_gap_seconds"
    samples = next((m.samples for m in REGISTRY.collect() if m.name == name), [])
    return {"count": next((s.value for s in samples if s.name == f"{name}_count"), 0.0),
            "sum": next((s.value for s in samples if s.name == f"{name}_sum"), 0.0),
            "buckets": {s.labels["le"]: s.value for s in samples if s.name == f"{name}_bucket"}}


class PacedKubelet(Kubelet):
    """The test kubelet whose stage Pods first work for a drawn time (the stage's duration)."""

    def __init__(self, *args, stage_seconds: tuple[float, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_seconds = stage_seconds

    async def _run_container(self, pod: dict, container: dict):
        low, high = self.stage_seconds
        await asyncio.sleep(random.Random(pod["metadata"]["labels"][LABEL_JOB]).uniform(low, high))
        return await super()._run_container(pod, container)


# --- one measurement ---------------------------------------------------------------------------

@contextlib.contextmanager
def without_collector_pauses():
    """The emulator's heap (every request logged, every object version kept) grows to millions of
    objects, and each of CPython's full collections of it stopped the emulator's loop for 0.1-0.6 s
    (10 in one R = 200 run, 3.1 s in all): gaps the operator did not cause. So the cyclic collector
    is off in this process while the runs go; the operator's process keeps its own, whose pauses
    are part of what is measured."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@dataclass(frozen=True)
class Result:
    runs: int
    load_model: str  # "paced" or "lockstep"
    gaps: np.ndarray  # seconds, emulator-stamped: Complete stored -> next Job stored
    notice: np.ndarray  # Complete stored -> the operator first sees that Job event
    react: np.ndarray  # the operator sees the Complete -> its POST of the next Job returns
    waited: np.ndarray  # of react: seen -> the start of the pass that created the next Job
    passed: np.ndarray  # of react: that pass's start -> its POST of the Job sent (API time within: api)
    api: np.ndarray  # of passed: time in that pass's API requests before the POST
    post: np.ndarray  # of react: the Job POST sent -> answered
    passes: np.ndarray  # every pass's duration
    requests: dict  # API call -> its durations (sent -> answered)
    rss_half: int  # operator RSS (bytes) when half the runs had finished
    rss_peak: int  # the largest operator RSS sampled while the runs ran
    wall: float  # creating the runs -> all finished
    operator_cpu: float
    operator_threads: dict  # thread group -> its CPU seconds in the same window (thread_cpu)
    harness_cpu: float  # this process: the emulator and the kubelet (not the stage subprocesses)
    operator_requests: int  # API requests the operator made (kopf's watches and the reconciler's calls)
    jobs: int
    gap_histogram: dict
    load_before: str
    load: str

    @property
    def transitions(self) -> int:
        return len(self.gaps)


async def measure(runs: int, rounds: int, root: Path, timeout: float,
                  stage_seconds: tuple[float, float] | None) -> Result:
    """One load: paced when `stage_seconds` is given (every Pod at once), else lockstep."""
    names = [f"bench-{i:03d}" for i in range(runs)]
    async with TimedEmulator() as emulator, kmock.Server(emulator):
        emulator.declare()
        if stage_seconds is None:
            kubelet = Kubelet(emulator, root, images={})
        else:
            kubelet = PacedKubelet(emulator, root, images={}, slots=runs, stage_seconds=stage_seconds)
        kubelet.use_fast_stage()
        kubelet_task = asyncio.create_task(kubelet.run(), name="kubelet")
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        operator = context.Process(target=operator_process, args=(str(emulator.url).rstrip("/"), theirs),
                                   name="operator")
        operator.start()
        try:
            cpu_before = await asyncio.wait_for(asyncio.to_thread(ours.recv), 120)
            memory = RssSampler(psutil.Process(operator.pid), runs)
            load_before = common.load_average()
            start, harness_before = time.monotonic(), time.process_time()
            await asyncio.gather(*(api(emulator, "POST", RUNS, run_manifest(name, run_spec(rounds)))
                                   for name in names))
            await wait_for(lambda: memory.sample(_done(emulator, kubelet)) == len(names), timeout, step=0.1,
                           what=f"{runs} runs to finish")
            wall, harness_cpu = time.monotonic() - start, time.process_time() - harness_before
            ours.send("stop")
            stopped = await asyncio.wait_for(asyncio.to_thread(ours.recv), 60)
        finally:
            await asyncio.to_thread(operator.join, 30)
            if operator.is_alive():
                operator.kill()
            kubelet_task.cancel()
            await asyncio.gather(kubelet_task, return_exceptions=True)
            await kubelet.stop()
        failed = [n for n in names if _phase(emulator, n) != "Succeeded"]
        if failed:
            raise RuntimeError(f"runs did not succeed: {failed[:5]}")
        sequences = [[job_name(n, k, stage) for k in range(rounds) for stage in STAGES] for n in names]
        pairs = [(before, after) for jobs in sequences for before, after in zip(jobs, jobs[1:])]
        seen, posted = stopped["seen"], stopped["posted"]
        return Result(
            runs,
            "lockstep" if stage_seconds is None else "paced",
            np.array([emulator.created[after] - emulator.completed[before] for before, after in pairs]),
            np.array([seen[before] - emulator.completed[before] for before, _ in pairs]),
            np.array([posted[after][3] - seen[before] for before, after in pairs]),
            np.array([posted[after][0] - seen[before] for before, after in pairs]),
            np.array([posted[after][2] - posted[after][0] for _, after in pairs]),
            np.array([posted[after][1] for _, after in pairs]),
            np.array([posted[after][3] - posted[after][2] for _, after in pairs]),
            np.array(stopped["passes"]),
            {call: np.array(times) for call, times in stopped["requests"].items() if times},
            memory.half or memory.peak,
            memory.peak,
            wall,
            stopped["cpu"] - cpu_before,
            stopped["threads"],
            harness_cpu,
            sum(map(sent_by_operator, emulator.log)),
            len(emulator.created),
            stopped["gap_histogram"],
            load_before,
            common.load_average())


class RssSampler:
    """The operator process's resident memory, sampled while the runs go: when half of them have
    finished (the issue's "1,000 runs, half finished") and at its largest."""

    def __init__(self, process: psutil.Process, runs: int):
        self.process, self.runs, self.half, self.peak = process, runs, 0, 0

    def sample(self, done: int) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        if not self.half and done * 2 >= self.runs:
            self.half = rss
        return done


def _phase(emulator: Emulator, name: str) -> str | None:
    run = emulator.get_object(f"{GROUP}/{VERSION}/{PLURAL}", NS, name) or {}
    return (run.get("status") or {}).get("phase")


def _done(emulator: TimedEmulator, kubelet: Kubelet) -> int:
    kubelet.check()
    return len(emulator.finished)


def spread(seconds: np.ndarray) -> str:
    p50, p95 = np.percentile(seconds, [50, 95])
    return f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {seconds.max() * 1000:.0f} ms"


def report(result: Result, repeat: int) -> None:
    histogram = result.gap_histogram
    within = histogram["buckets"].get("0.5", 0.0) / histogram["count"] if histogram["count"] else 0.0
    by_thread = ", ".join(f"{group} {seconds / result.transitions * 1000:.1f} ms"
                          for group, seconds in sorted(result.operator_threads.items(), key=lambda kv: -kv[1]))
    common.line(f"R={result.runs} {result.load_model} #{repeat}", (
        f"{result.transitions} transitions ({result.jobs} Jobs) in {result.wall:.1f} s; "
        f"gap {spread(result.gaps)}; of which event delivery {spread(result.notice)}, operator reaction "
        f"{spread(result.react)}; operator {result.operator_cpu:.2f} CPU-s = "
        f"{result.operator_cpu / result.transitions * 1000:.1f} CPU-ms per transition "
        f"({result.operator_cpu / result.wall:.0%} of a core), "
        f"{result.operator_requests / result.transitions:.1f} API requests per transition; of its CPU per "
        f"transition, {by_thread}; "
        f"{result.transitions / result.wall:.1f} transitions/s; emulator and kubelet "
        f"{result.harness_cpu:.1f} CPU-s ({result.harness_cpu / result.wall:.0%} of a core); operator RSS "
        f"{result.rss_half / 2**20:.0f} MiB with half the runs finished (peak {result.rss_peak / 2**20:.0f} MiB); "
        f"operator metric selfalign_job_gap_seconds: {histogram['count']:.0f} observed, mean "
        f"{histogram['sum'] / max(histogram['count'], 1):.2f} s, {within:.0%} <= 0.5 s; "
        f"load average before {result.load_before}, after {result.load}"))
    requests = ", ".join(f"{call} {len(times)}x p50 {np.median(times) * 1000:.0f} ms p95 "
                         f"{np.percentile(times, 95) * 1000:.0f} ms" for call, times in result.requests.items())
    common.line(f"R={result.runs} #{repeat} where the reaction went", (
        f"seen -> pass start {spread(result.waited)}; pass start -> Job POST sent {spread(result.passed)} "
        f"(in API requests {spread(result.api)}); POST {spread(result.post)}; every pass "
        f"({len(result.passes)}) {spread(result.passes)}; requests: {requests}"))


def summary(results: list[Result], goal: float | None) -> float:
    """The median p95 gap of the repeats, its spread, and the goal's verdict (median and worst)."""
    p95s = sorted(float(np.percentile(r.gaps, 95)) for r in results)
    median, worst = float(np.median(p95s)), p95s[-1]
    first = results[0]
    rss = sorted(r.rss_half for r in results)
    verdict = "" if goal is None else (
        f"; goal p95 < {goal * 1000:.0f} ms: {'met' if median < goal else 'NOT met'}, worst under 2x the goal: "
        f"{'yes' if worst < 2 * goal else 'no'}")
    common.line(f"R={first.runs} {first.load_model}, median of {len(results)}", (
        f"p95 gap {median * 1000:.0f} ms (runs: {', '.join(f'{p * 1000:.0f}' for p in p95s)} ms); p50 gap "
        f"{np.median([np.percentile(r.gaps, 50) for r in results]) * 1000:.0f} ms; p95 operator reaction "
        f"{np.median([np.percentile(r.react, 95) for r in results]) * 1000:.0f} ms; operator RSS with half "
        f"finished {np.median(rss) / 2**20:.0f} MiB (max {rss[-1] / 2**20:.0f}){verdict}; load average "
        f"before/after: {'; '.join(f'{r.load_before} / {r.load}' for r in results)}"))
    return median


GOALS = {200: 0.1, 1000: 0.5}  # seconds: the p95 gap the issue asks for at these R, paced
MEMORY_GOAL = 500 * 2**20  # bytes of operator RSS with 1,000 runs, half finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 50, 200],
                        help="concurrent runs, one paced measurement each")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per run (5 stage Jobs each)")
    parser.add_argument("--stage-seconds", type=float, nargs=2, default=[5.0, 15.0], metavar=("LOW", "HIGH"),
                        help="paced load: each stage Pod works for a time drawn uniformly from LOW..HIGH")
    parser.add_argument("--capacity-runs", type=int, default=200,
                        help="lockstep load (zero-length stages) with this many runs; 0 skips it")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per R; figures are their median")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for one measurement to finish")
    args = parser.parse_args(argv)
    low, high = args.stage_seconds
    if not 0 <= low <= high:
        parser.error("--stage-seconds needs 0 <= LOW <= HIGH")

    common.header("operator: Job Complete -> next Job created, kopf operator on the kmock emulator",
                  ("kopf", "kmock", "kubernetes", "aiohttp"))
    common.line("setup", f"{args.rounds} round(s) x 5 stages per run; operator in its own process, emulator "
                         "and kubelet in this one; fast fake stage")
    common.line("paced load", f"every stage Pod works {low:g}-{high:g} s (uniform), all Pods at once")
    common.line("lockstep load", "zero-length stages, 4 Pods at a time: saturation, gap ~ R / throughput")
    common.line("reference", f"Argo Workflows' fixed requeue between steps (DEFAULT_REQUEUE_TIME): every gap "
                             f"{REFERENCE_GAP:.0f} s, modelled analytically (not simulated)")
    medians = {}
    for runs in args.runs:
        results = []
        for repeat in range(1, args.repeats + 1):
            with tempfile.TemporaryDirectory() as root, without_collector_pauses():
                results.append(asyncio.run(measure(runs, args.rounds, Path(root), args.timeout, (low, high))))
            report(results[-1], repeat)
        medians[runs] = summary(results, GOALS.get(runs))
        if runs >= 1000:
            rss = float(np.median([r.rss_half for r in results]))
            common.line("memory", f"operator RSS {rss / 2**20:.0f} MiB with {runs} runs, half finished (median): "
                                  f"goal < {MEMORY_GOAL / 2**20:.0f} MiB {'met' if rss < MEMORY_GOAL else 'NOT met'}")
    if args.capacity_runs:
        with tempfile.TemporaryDirectory() as root, without_collector_pauses():
            capacity = asyncio.run(measure(args.capacity_runs, args.rounds, Path(root), args.timeout, None))
        report(capacity, 1)
        common.line("capacity", f"{capacity.transitions / capacity.wall:.1f} transitions/s with every run always "
                                f"waiting; p95 gap {np.percentile(capacity.gaps, 95):.2f} s at R={capacity.runs}")
    largest = max(medians)
    p95 = medians[largest]
    common.line("speedup (reference gap / p95 gap)", f"{REFERENCE_GAP / p95:.1f}x at R={largest}, paced (median)")
    common.ratio(REFERENCE_GAP / p95)
    return 0


if __name__ == "__main__":
    sys.exit(main())
