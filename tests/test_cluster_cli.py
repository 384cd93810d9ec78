"""`selfalign status|report|logs|suspend|resume|retry` against a cluster: the kmock emulator over
real HTTP, reached through a kubeconfig as a user's CLI reaches an API server.

The runs' statuses are what the planner writes for a run it drove to the end (or to a failure);
the CLI runs in a thread of this process while the emulator serves from the test's event loop.
"""
from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from selfalign.operator.cli import main as cli, run_commands
from selfalign.operator.naming import LABEL_JOB
from selfalign.operator.planner import JobObservation, plan
from selfalign.operator.spec import parse_spec
from tests.fixtures.kube import NS, RUNS, api, run_manifest
from tests.invalid_specs import valid_base

START = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def planned_status(name: str, spec: dict, fail: str | None = None) -> dict:
    """The status the planner writes for a run whose stages all succeed (or `fail` fails)."""
    status, observed, now = {}, {}, START
    while True:
        result = plan(parse_spec(spec), status, observed, now, namespace=NS, name=name, generation=1)
        status = result.status
        if not result.jobs:
            return status
        job = result.jobs[0]
        failed = job.stage == fail
        observed[job.name] = JobObservation(job.name, job.round, job.stage, "Failed" if failed else "Succeeded",
                                            failures=int(failed), result={"kept": 16} if job.stage == "assess"
                                            else {"coverage": 0.5} if job.stage == "coverage" else {},
                                            message="boom" if failed else None)
        now += timedelta(seconds=45)


@pytest.fixture(autouse=True)
def watch_flag_as_the_api_server_reads_it(monkeypatch):
    """The Python client sends `?watch=True`; the API server parses the flag as Go's ParseBool
    does, kmock 0.8 takes only "true" (a harness gap, compensated here)."""
    from kmock._internal import parsing

    guess = parsing.guess_k8s
    monkeypatch.setattr(parsing, "guess_k8s", lambda k8s, method, query: guess(
        k8s, method, {**query, "watch": query["watch"].lower()} if "watch" in query else query))


@pytest.fixture
def kubeconfig(emulator, tmp_path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "emulator", "cluster": {"server": str(emulator.url).rstrip("/")}}],
        "users": [{"name": "user", "user": {"token": "user-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "emulator", "user": "user", "namespace": NS}}],
    }))
    return path


async def create(emulator, name: str, status: dict | None = None, **spec) -> dict:
    await api(emulator, "POST", RUNS, run_manifest(name, {**valid_base(), **spec}))
    if status is not None:
        await api(emulator, "PATCH", f"{RUNS}/{name}/status", {"status": status})
    return emulator.get_object("selfalign.dev/v1alpha1/selfalignruns", NS, name)


async def selfalign(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_lists_the_namespace_runs_and_counts_rounds_from_one(emulator, kubeconfig, capsys):
    await create(emulator, "done", planned_status("done", valid_base()), rounds=2)
    await create(emulator, "fresh")
    code, out, _ = await selfalign(capsys, "status", "--kubeconfig", str(kubeconfig))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["NAME"][:3] == ["NAME", "PHASE", "ROUND"]
    assert rows["done"][1:6] == ["Succeeded", "2/2", "coverage", "16", "50.0%"]
    assert rows["fresh"][1] == "?"  # not seen by an operator yet
    code, out, _ = await selfalign(capsys, "status", "-A", "--kubeconfig", str(kubeconfig))
    assert out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert out.splitlines()[1].split()[:3] == [NS, "done", "Succeeded"]


async def test_status_of_one_run_shows_its_stages_and_prints_the_object_as_json_or_yaml(emulator, kubeconfig,
                                                                                       capsys):
    stored = await create(emulator, "broken", planned_status("broken", valid_base(), fail="train"))
    code, out, _ = await selfalign(capsys, "status", "broken", "--kubeconfig", str(kubeconfig))
    assert code == 0 and out.startswith("run broken: Failed, round 1/2 stage train\n")
    prefix = f"s3://selfalign-test/runs/{NS}/broken/{stored['metadata']['uid']}"  # planner.storage_prefix
    assert f"artifacts: {prefix}\n" in out and "missing:" not in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("1 ")] == [
        ["1", "synthesize", "Succeeded"], ["1", "assess", "Succeeded"], ["1", "train", "Failed"]]
    code, out, _ = await selfalign(capsys, "status", "broken", "-o", "json", "--kubeconfig", str(kubeconfig))
    assert json.loads(out) == stored
    code, out, _ = await selfalign(capsys, "status", "-n", NS, "-o", "yaml", "--kubeconfig", str(kubeconfig))
    listed = yaml.safe_load(out.removesuffix("---\n"))
    assert listed["kind"] == "List" and [i["metadata"]["name"] for i in listed["items"]] == ["broken"]


async def test_watching_a_run_prints_each_change_until_it_ends(emulator, kubeconfig, capsys):
    running = planned_status("w", valid_base(), fail="merge")
    running["phase"], running["observedGeneration"] = "Running", 1
    await create(emulator, "w", running)
    watcher = asyncio.create_task(selfalign(capsys, "status", "w", "--watch", "--kubeconfig", str(kubeconfig)))
    await asyncio.sleep(1.5)
    assert not watcher.done()
    await api(emulator, "PATCH", f"{RUNS}/w/status", {"status": {"phase": "Failed"}})
    code, out, _ = await asyncio.wait_for(watcher, 30)
    assert code == 1  # the run failed
    assert [line for line in out.splitlines() if line.startswith("run w:")] == [
        "run w: Running, round 1/2 stage merge", "run w: Failed, round 1/2 stage merge"]


async def test_suspend_and_resume_change_only_the_spec_field_the_operator_watches(emulator, kubeconfig, capsys):
    before = (await create(emulator, "r", planned_status("r", valid_base(), fail="train")))["spec"]
    flags = ("-n", NS, "--kubeconfig", str(kubeconfig))

    def spec():
        return emulator.get_object("selfalign.dev/v1alpha1/selfalignruns", NS, "r")["spec"]

    code, out, _ = await selfalign(capsys, "suspend", "r", *flags)
    assert code == 0 and spec() == {**before, "suspend": True}
    assert out == f"r (namespace {NS}): suspended: the running stage stops; resume continues it\n"
    assert (await selfalign(capsys, "resume", "r", *flags))[0] == 0 and spec() == {**before, "suspend": False}


async def test_retry_raises_spec_retry_of_a_failed_run_only(emulator, kubeconfig, capsys):
    """The CRD has spec.retry (it may only grow): the CLI raises it by one, as a GitOps commit would."""
    before = (await create(emulator, "r", planned_status("r", valid_base(), fail="train")))["spec"]
    flags = ("-n", NS, "--kubeconfig", str(kubeconfig))
    code, out, err = await selfalign(capsys, "retry", "r", *flags)
    assert (code, err) == (0, "")
    assert out == f"r (namespace {NS}): spec.retry is now 1: the failed stage runs again with a new Job\n"
    assert emulator.get_object("selfalign.dev/v1alpha1/selfalignruns", NS, "r")["spec"] == {**before, "retry": 1}

    await create(emulator, "ok", planned_status("ok", valid_base()))
    code, out, err = await selfalign(capsys, "retry", "ok", *flags)
    assert (code, out) == (2, "")
    assert err == "selfalign retry: ok: the run is Succeeded, not Failed: nothing to retry\n"


async def test_logs_prints_the_stage_pods_log(emulator, kubeconfig, capsys):
    status = planned_status("l", valid_base(), fail="assess")
    await create(emulator, "l", status)
    job = status["rounds"][0]["stages"]["assess"]["job"]
    for pod in (f"{job}-abcde", "other-pod"):
        await api(emulator, "POST", f"/api/v1/namespaces/{NS}/pods",
                  {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod, "labels": {LABEL_JOB: job if pod != "other-pod" else "other"}}})
    emulator[f"get /api/v1/namespaces/{NS}/pods/{job}-abcde/log"] << b"assess: scoring 20 items\nerror: boom\n"
    code, out, _ = await selfalign(capsys, "logs", "l", "--kubeconfig", str(kubeconfig))
    assert code == 0 and out == "assess: scoring 20 items\nerror: boom\n"
    code, _, err = await selfalign(capsys, "logs", "l", "--stage", "train", "--kubeconfig", str(kubeconfig))
    assert code == 2 and err == "selfalign logs: run l: round 1 train has no Pod (not started, or deleted " \
                                "with its Job after the Job's TTL)\n"


async def test_cluster_errors_are_one_line(emulator, kubeconfig, tmp_path, capsys):
    code, out, err = await selfalign(capsys, "status", "nope", "--kubeconfig", str(kubeconfig))
    assert (code, out) == (2, "") and err == f"selfalign status: no SelfAlignRun 'nope' in namespace {NS}\n"
    code, _, err = await selfalign(capsys, "suspend", "nope", "--kubeconfig", str(kubeconfig))
    assert code == 2 and err == f"selfalign suspend: no SelfAlignRun 'nope' in namespace {NS}\n"
    code, _, err = await selfalign(capsys, "status", "--kubeconfig", str(tmp_path / "none"))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("selfalign status: kubeconfig: ")


async def test_report_of_a_cluster_run_reads_its_status_from_the_run_and_its_artifacts_from_storage(
        emulator, kubeconfig, tmp_path, capsys):
    spec = {**valid_base(), "storage": {"uri": (tmp_path / "bucket").as_uri()}}
    stored = await create(emulator, "rep", planned_status("rep", spec), storage=spec["storage"])
    prefix = tmp_path / "bucket" / NS / "rep" / stored["metadata"]["uid"]  # planner.storage_prefix
    (prefix / "round-0" / "coverage").mkdir(parents=True)
    (prefix / "round-0" / "coverage" / "manifest.json").write_text(json.dumps(
        {"summary": {"coverage": 0.4, "coverageBefore": 0.2}, "metrics": {}}))
    code, out, _ = await selfalign(capsys, "report", "rep", "--out", str(tmp_path / "out"),
                                   "--kubeconfig", str(kubeconfig))
    assert code == 0 and out == f"report of run rep (Succeeded): {tmp_path / 'out' / 'index.html'}\n"
    page = (tmp_path / "out" / "index.html").read_text()
    assert "1 of 2 finished" in page  # the total from the run's spec, round 0 from its manifest


async def test_watching_every_run_lists_them_again_on_each_change(emulator, kubeconfig):
    await create(emulator, "a", planned_status("a", valid_base()))
    args = cli.build_parser().parse_args(["status", "--watch", "--kubeconfig", str(kubeconfig)])
    listings = run_commands._listings(args)

    def next_names(before):
        """The names of the next listing that differs from `before` (a watch may repeat one)."""
        while (names := [row.name for row, _ in next(listings)]) == before:
            pass
        return names

    assert await asyncio.to_thread(next_names, None) == ["a"]
    following = asyncio.create_task(asyncio.to_thread(next_names, ["a"]))
    await asyncio.sleep(0.5)
    await create(emulator, "b")
    assert await asyncio.wait_for(following, 30) == ["a", "b"]
    following = asyncio.create_task(asyncio.to_thread(next_names, ["a", "b"]))
    await asyncio.sleep(0.5)
    await api(emulator, "DELETE", f"{RUNS}/a")
    assert await asyncio.wait_for(following, 30) == ["b"]
