"""Several ranks per node on CPU (gloo), the model on s3:// (moto): one launcher of two ranks, and
two launchers of two ranks each standing in for two pods of an Indexed Job, under ZeRO-3.

Run alone with `pytest -m multirank`."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from selfalign.stages import train
from selfalign.stages.runtime import storage
from tests.fixtures.s3 import free_port
from tests.test_train import kept_uri, spec_dict, stage_command, stage_env, toy_rows, write_spec

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


def launch(tmp_path: Path, spec: dict, run_uri: str, model_uri: str, *, nodes: int, ranks: int) -> list[str]:
    """torchrun once per node, each with its own scratch disk; the nodes' logs once all have ended."""
    spec_path = write_spec(tmp_path, spec)
    port = str(free_port())
    procs, log_paths = [], [tmp_path / f"node-{node}.log" for node in range(nodes)]
    for node in range(nodes):
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={node}",
                    f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        command = launcher + stage_command("train", spec_path, run_uri, model_uri, tmp_path / f"scratch-{node}")[1:]
        with log_paths[node].open("w") as log:  # files, not pipes: a full pipe would stall its node
            procs.append(subprocess.Popen(command, env=stage_env(tmp_path / f"result-{node}.json"),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
    logs = [path.read_text() for path in log_paths]
    assert [proc.returncode for proc in procs] == [0] * nodes, "".join(log[-3000:] for log in logs)
    return logs


@pytest.fixture
def s3_model(tiny_model_dir, s3_bucket) -> str:
    uri = f"{s3_bucket}/models/tiny"
    storage.upload_dir(tiny_model_dir, uri)
    return uri


def test_two_ranks_on_one_node_share_the_s3_model(tmp_path, s3_bucket, s3_model):
    run_uri = f"{s3_bucket}/ns/run"
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows())
    spec = spec_dict(Path("/unused"), s3_bucket, zeroStage="auto", epochs=1, checkpointSteps=100)
    launch(tmp_path, spec, run_uri, s3_model, nodes=1, ranks=2)

    metrics = storage.read_json(f"{run_uri}/round-0/train/manifest.json")["metrics"]
    # "auto" on a CPU: plain PyTorch (DDP over gloo), two ranks.
    assert (metrics["engine"], metrics["zeroStage"], metrics["worldSize"]) == ("torch", None, 2)
    assert metrics["steps"] == train.optimizer_steps(64, 8, 1, 2, 1)
    cache = tmp_path / "scratch-0" / "cache"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one copy, no staging left behind


def test_two_nodes_of_two_ranks_train_under_zero3(tmp_path, s3_bucket, s3_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_uri = f"{s3_bucket}/ns/run"
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows())
    spec = spec_dict(Path("/unused"), s3_bucket, zeroStage=3, nodes=2, epochs=1, checkpointSteps=1)
    logs = launch(tmp_path, spec | {"resources": {"train": {"gpus": 1}}}, run_uri, s3_model, nodes=2, ranks=2)

    metrics = storage.read_json(f"{run_uri}/round-0/train/manifest.json")["metrics"]
    steps = train.optimizer_steps(64, 8, 1, 4, 1)
    assert (metrics["engine"], metrics["zeroStage"], metrics["worldSize"], metrics["steps"]) == (
        "deepspeed", 3, 4, steps)
    checkpoints = f"{run_uri}/round-0/train/checkpoints"
    files = {uri.removeprefix(f"{checkpoints}/checkpoint-{steps}/") for uri in storage.list_uris(checkpoints)}
    assert {f"rng_state_{rank}.pth" for rank in range(4)} <= files
    assert {f"global_step{steps}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(4)} <= files
    assert "adapter_model.safetensors" in files and "complete.json" in files
    assert ["training engine=deepspeed" in log for log in logs] == [True, False]

    # The adapter, gathered from four shards, is whole and trained (PEFT initialises B to zero).
    adapter_dir = tmp_path / "adapter"
    storage.download_dir(f"{run_uri}/round-0/train/adapter", adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(storage.local_path(s3_model, tmp_path / "check"))
    model = PeftModel.from_pretrained(base, adapter_dir)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
