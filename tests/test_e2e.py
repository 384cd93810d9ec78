"""The embedded example end to end, every stage real (vLLM CPU, LoRA, merge, coverage).

(a) `selfalign run examples/tiny.yaml` on this machine, interrupted with Ctrl-C after its first
stage and run again: it resumes, reaches Succeeded, leaves every artifact, and `selfalign report`
builds. (b) the same spec through the kopf operator on the emulator, the test kubelet running the
real stage commands of the real Job manifests, with storage on a moto S3 server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfalign.operator.spec import STAGES
from selfalign.stages.runtime import storage
from tests.fixtures.kube import NS, Cluster, Kubelet, OperatorProcess, api, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
ARTIFACTS = {  # file each stage must leave, besides its manifest
    "synthesize": "candidates.jsonl", "assess": "kept.jsonl", "train": "adapter/adapter_config.json",
    "merge": "manifest.json", "coverage": "coverage.png",
}


def selfalign(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfalign.operator.cli.main", *args], **kwargs)


def assert_complete(run_uri: str, rounds: int = 2) -> None:
    for k in range(rounds):
        for stage in STAGES:
            prefix = f"{run_uri}/round-{k}/{stage}"
            assert storage.exists(f"{prefix}/manifest.json"), prefix
            assert storage.exists(f"{prefix}/{ARTIFACTS[stage]}"), f"{prefix}/{ARTIFACTS[stage]}"
        assert storage.exists(f"{run_uri}/models/round-{k + 1}/config.json")
    kept = storage.read_json(f"{run_uri}/round-1/assess/manifest.json")["summary"]["kept"]
    assert kept >= 1


def test_tiny_example_runs_locally_resumes_after_ctrl_c_and_reports(tmp_path):
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    run_uri = (store / "local" / "tiny").as_uri()
    first_manifest = store / "local" / "tiny" / "round-0" / "synthesize" / "manifest.json"
    args = ("run", str(TINY), "--storage", str(store), "--scratch", str(scratch))

    # Output goes to files: a pipe nobody reads until the end fills up and blocks the run.
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with first_log.open("w") as log:
        interrupted = selfalign(*args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while not first_manifest.exists():
            assert interrupted.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first stage did not finish: " + first_log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(interrupted.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        interrupted.wait(timeout=120)
    output = first_log.read_text()
    assert interrupted.returncode == 130, output[-3000:]
    assert "run the same command again to resume" in output
    synthesized = json.loads(first_manifest.read_text())

    with second_log.open("w") as log:
        resumed = selfalign(*args, stdout=log, stderr=subprocess.STDOUT)
        resumed.wait(timeout=1200)
    output = second_log.read_text()
    assert resumed.returncode == 0, output[-3000:]
    # Finished work is never redone: either status already recorded synthesize as done (no line
    # for it), or the stage found its own manifest and reported it again (Ctrl-C came between the
    # two); what a stage itself prints is in its log.
    synthesize_log = (store / "local" / "tiny" / "logs" / "round-0-synthesize.log").read_text()
    assert "round 1/2 synthesize: done" not in output or "stage complete already" in synthesize_log
    assert json.loads(first_manifest.read_text()) == synthesized
    status = storage.read_json(f"{run_uri}/status.json")
    assert status["phase"] == "Succeeded" and status["model"] == f"{run_uri}/models/round-2"
    assert_complete(run_uri)

    report = selfalign("report", "tiny", "--storage", str(store), "--out", str(tmp_path / "report"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert report.wait(timeout=300) == 0, report.communicate()[0]
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Succeeded" in html and html.count("data:image/png;base64,") >= 4


@pytest.fixture
async def real_cluster(emulator, tmp_path, s3_server):
    """The emulator, a kubelet running the stage images' real commands, and the operator."""
    async with running(emulator, Kubelet(emulator, tmp_path / "node", images={}, slots=1),
                       [OperatorProcess(emulator)]) as cluster:
        yield cluster


async def test_tiny_example_through_the_operator_with_real_stages_on_s3(real_cluster, s3_bucket):
    cluster: Cluster = real_cluster
    await api(cluster.emulator, "POST", f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": NS},
        "stringData": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}})
    spec = yaml.safe_load(TINY.read_text())["spec"]
    spec["storage"] = {"uri": s3_bucket, "endpoint": os.environ["AWS_ENDPOINT_URL"],
                       "region": os.environ["AWS_DEFAULT_REGION"], "secretRef": {"name": "s3"}}
    await cluster.create_run("tiny", spec)
    status = await cluster.wait_phase("tiny", "Succeeded", "Failed", timeout=1500)
    assert status["phase"] == "Succeeded", status.get("message")
    run_uri = f"{s3_bucket}/{NS}/tiny/{cluster.run('tiny')['metadata']['uid']}"
    assert_complete(run_uri)
    assert status["model"] == f"{run_uri}/models/round-2"
    assert status["kept"] >= 1 and 0 <= status["coverage"] <= 100
    assert [j["metadata"]["name"] for j in cluster.jobs("tiny")] and len(cluster.jobs("tiny")) == 10
