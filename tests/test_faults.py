"""Fault soak: 20 concurrent two-round runs while the API server misbehaves and the operator is
killed, through the emulator's fault layer (tests/fixtures/faults.py, issue 13).

Every run must succeed with one accepted POST per Job, its status must never move back, and no
finished Job may wait longer than the resync period to be recorded. The test prints what it
injected.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import kmock

from selfalign.operator import reconciler
from selfalign.operator.spec import STAGES
from tests.fixtures.faults import requests
from tests.fixtures.kube import KillSwitch, sent_by_operator
from tests.test_operator import assert_no_regression, expected_jobs, run_spec

RUNS, ROUNDS, KILLS = 20, 2, 5
RESYNC = 10.0  # seconds (the operator's default is 300: shortened so a soak fits in CI)
WRITE = r"/(jobs|configmaps|services|events|status)$"


async def test_runs_succeed_through_injected_faults_and_operator_kills(cluster, monkeypatch):
    monkeypatch.setattr(reconciler, "RETRY_BASE", 0.05)
    monkeypatch.setattr(reconciler, "RESYNC", RESYNC)
    await cluster.operator.restart()  # its resync runs with the shortened period
    cluster.kubelet.use_fast_stage()
    faults = cluster.emulator.faults
    faults.rng = random.Random(13)
    operator = sent_by_operator
    faults.add("error", requests("POST", WRITE, by=operator), rate=0.15)
    faults.add("error", requests("PATCH", WRITE, by=operator), rate=0.15, status=500)
    faults.add("lost", requests("POST", r"/jobs$", by=operator), rate=0.3)
    faults.add("lost", requests("PATCH", r"/status$", by=operator), rate=0.1, status=504)
    faults.add("hang", requests(by=operator), rate=0.02, seconds=0.3)
    faults.add("conflict", requests("PATCH", r"/status$", by=operator), rate=0.05)
    faults.add("drop", requests(action=kmock.action.WATCH, by=operator), rate=0.5, after_events=3)
    switch = KillSwitch(cluster.operator, random.Random(7), kills=KILLS, max_writes=60)
    cluster.emulator.after_write = switch.after_write
    restarts = asyncio.create_task(switch.serve())
    names = [f"soak-{i:02d}" for i in range(RUNS)]
    lags: list[float] = []
    watcher = asyncio.create_task(record_lags(cluster, names, lags))
    try:
        await asyncio.gather(*(cluster.create_run(name, run_spec(rounds=ROUNDS)) for name in names))
        for name in names:
            status = await cluster.wait_phase(name, "Succeeded", "Failed", timeout=300)
            assert status["phase"] == "Succeeded", (name, status.get("message"))
    finally:
        restarts.cancel()
        watcher.cancel()
    print(f"\ninjected: {dict(faults.injected)}, operator kills: {switch.kills}, "
          f"slowest finished-Job-to-status lag: {max(lags):.2f} s")

    assert sum(faults.injected.values()) >= 200 and switch.kills == KILLS
    jobs = [job for name in names for job in expected_jobs(name, ROUNDS)]
    assert Counter(cluster.kubelet.started) == Counter(jobs)  # each Job created (and run) once
    for name in names:
        assert len(assert_no_regression(cluster.history(name))) == ROUNDS * len(STAGES)
    assert max(lags) < RESYNC


async def record_lags(cluster, names: list[str], lags: list[float]) -> None:
    """How long each finished Job waits for its run's status to record it."""
    finished: dict[str, float] = {}
    recorded: set[str] = set()
    while True:
        now = time.monotonic()
        for job in cluster.emulator.list_objects("batch/v1/jobs"):
            if any(c["type"] == "Complete" for c in (job.get("status") or {}).get("conditions") or ()):
                finished.setdefault(job["metadata"]["name"], now)
        for name in names:
            for entry in cluster.status(name).get("rounds") or ():
                for record in entry["stages"].values():
                    if record["phase"] == "Succeeded" and record["job"] in finished and record["job"] not in recorded:
                        recorded.add(record["job"])
                        lags.append(now - finished[record["job"]])
        await asyncio.sleep(0.1)
