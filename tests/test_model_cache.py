"""spec.modelCache: a claim mounted in every stage pod where storage keeps s3:// models by content,
so the stages (and ranks, and runs) that share it download a model once."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from selfalign.operator import jobs
from selfalign.operator.spec import STAGES
from selfalign.stages.runtime import storage
from tests.test_jobs import VARIANTS, build, container, env_of, the_job
from tests.test_storage import _fetch_model


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_pod_mounts_the_cache_claim_and_is_told_where(stage):
    job = the_job(build("model-cache", stage))
    pod = job["spec"]["template"]["spec"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    assert {"name": "model-cache", "mountPath": jobs.MODEL_CACHE} in container(job)["volumeMounts"]
    assert env_of(job)[storage.MODEL_CACHE_ENV] == {"name": storage.MODEL_CACHE_ENV, "value": jobs.MODEL_CACHE}


@pytest.mark.parametrize("stage", STAGES)
def test_without_the_field_models_stay_in_the_pods_scratch(stage):
    """As before: each pod downloads into its own emptyDir."""
    assert "modelCache" not in VARIANTS["s3-secret"][1]
    job = the_job(build("s3-secret", stage))
    assert "model-cache" not in {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}
    assert storage.MODEL_CACHE_ENV not in env_of(job)
    assert "model-cache" not in {m["name"] for m in container(job)["volumeMounts"]}


def test_the_cache_root_is_the_mount_when_set_else_scratch(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.MODEL_CACHE_ENV, raising=False)
    assert storage.cache_root(tmp_path) == tmp_path / "cache"
    monkeypatch.setenv(storage.MODEL_CACHE_ENV, str(tmp_path / "shared"))
    assert storage.cache_root(tmp_path) == tmp_path / "shared"


def _stage_fetch(uri: str, cache: str, scratch: str, start, downloads, results) -> None:
    """One stage pod (a spawned process with its own scratch) asking for the round's model, with
    the cache root the Job gives it; the fetch and its download count are test_storage's."""
    import os

    os.environ[storage.MODEL_CACHE_ENV] = cache  # as the Job sets it
    _fetch_model(uri, scratch, start, downloads, results)


def test_stages_sharing_one_cache_download_a_model_once(tmp_path, s3_bucket):
    """Two stage processes, each with its own scratch, one cache: one downloads, the other reuses it;
    a third, later, finds it there; none of their scratch folders holds a copy."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"shard-{i}.bin").write_bytes(bytes([i]) * 100_000)
    storage.upload_dir(src, f"{s3_bucket}/models/round-1")
    expected = sorted([(p.name, p.read_bytes()) for p in src.iterdir()] + [(storage.COMPLETE_MARKER, b"")])
    cache = tmp_path / "model-cache"

    spawn = multiprocessing.get_context("spawn")
    start, downloads, results = spawn.Barrier(2), spawn.Value("i", 0), spawn.Queue()
    procs = [spawn.Process(target=_stage_fetch, args=(f"{s3_bucket}/models/round-1", str(cache),
                                                      str(tmp_path / f"scratch-{stage}"), start, downloads, results))
             for stage in ("synthesize", "assess")]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    alone = spawn.Barrier(1)  # held here until the process has read it
    later = spawn.Process(target=_stage_fetch, args=(f"{s3_bucket}/models/round-1", str(cache),
                                                     str(tmp_path / "scratch-train"), alone, downloads, results))
    later.start()
    outcomes.append(results.get(timeout=120))
    later.join(timeout=60)

    assert [status for status, _, _ in outcomes] == ["ok"] * 3, [why for _, why, _ in outcomes]
    assert downloads.value == 1
    [path] = {path for _, path, _ in outcomes}
    assert Path(path).parent == cache
    assert all(files == expected for _, _, files in outcomes)
    assert not any((tmp_path / f"scratch-{stage}").exists() for stage in ("synthesize", "assess", "train"))
