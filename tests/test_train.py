"""Train stage: LoRA on a learnable toy task (plain PyTorch and DeepSpeed ZeRO-2), checkpoints that a
killed stage resumes from, and kept data that is empty or malformed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfalign.operator.spec import parse_spec
from selfalign.stages.runtime import storage
from selfalign.stages import train
from selfalign.stages.runtime.context import StageContext, StageError

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "paper", "glass", "music", "light", "sugar", "plant",
         "train", "house", "bread", "chair", "ocean", "pilot", "robot", "spoon", "candle", "green", "table",
         "water", "horse", "night", "smile", "field", "money", "sheep", "watch", "bird", "lemon"]


def toy_rows() -> list[dict]:
    """64 pairs of one learnable task: repeat the given word."""
    return ([{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in WORDS]
            + [{"instruction": "Repeat this word.", "input": w, "output": w} for w in WORDS])


def spec_dict(model_dir: Path, storage_uri: str, **train_fields) -> dict:
    """A resolved run spec for the tiny model; `train_fields` override the toy-task training settings."""
    toy = {"zeroStage": 0, "loraRank": 8, "loraAlpha": 16, "loraDropout": 0.0, "targetModules": ["all-linear"],
           "learningRate": 3e-3, "scheduler": "constant", "warmupRatio": 0.0, "epochs": 6,
           "perDeviceBatchSize": 8, "gradientAccumulationSteps": 1, "maxSeqLength": 64, "checkpointSteps": 20}
    return {"recipe": "isheep", "rounds": 2, "model": {"base": Path(model_dir).as_uri()},
            "seeds": "file:///unused/seeds.jsonl", "storage": {"uri": storage_uri},
            "coverage": {"reference": "file:///unused/reference.jsonl"}, "train": {**toy, **train_fields}}


def kept_uri(run_uri: str, round_: int) -> str:
    return f"{run_uri}/round-{round_}/assess/kept.jsonl"


def context(spec: dict, run_uri: str, tmp_path: Path, round_: int = 0) -> StageContext:
    return StageContext(stage="train", spec=parse_spec(spec), round=round_, run_uri=run_uri,
                        model=spec["model"]["base"], scratch=str(tmp_path / "scratch"))


def stage_command(stage: str, spec_path: Path, run_uri: str, model_uri: str, scratch: Path) -> list[str]:
    return [sys.executable, "-m", "selfalign.stages", stage, "--spec", str(spec_path), "--round", "0",
            "--run-uri", run_uri, "--model", model_uri, "--scratch", str(scratch)]


def stage_env(result: Path) -> dict:
    # The first DeepSpeed run JIT-compiles its CPU communication op; the cache makes reruns reuse it.
    return {**os.environ, "SELFALIGN_RESULT_PATH": str(result),
            "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


# --- decisions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero, gpu, engine", [
    (0, False, "torch"), (1, False, "deepspeed"), (2, False, "deepspeed"), (3, False, "deepspeed"),
    (0, True, "deepspeed"), (3, True, "deepspeed"),
])
def test_engine_choice(zero, gpu, engine):
    assert train.choose_engine(zero, gpu=gpu) == engine


@pytest.mark.parametrize("examples, batch, accumulation, world, epochs, steps", [
    (64, 8, 1, 1, 6, 48), (64, 8, 2, 1, 1, 4), (65, 8, 2, 1, 1, 5), (3, 8, 4, 1, 2, 2),
    (64, 4, 2, 4, 1, 2), (64, 8, 1, 1, 0.5, 4),
])
def test_optimizer_steps_match_the_trainer_formula(examples, batch, accumulation, world, epochs, steps):
    assert train.optimizer_steps(examples, batch, accumulation, world, epochs) == steps


def test_latest_checkpoint_is_the_newest_with_its_marker():
    uris = ["s3://b/r/checkpoints/checkpoint-10/adapter_model.safetensors",
            "s3://b/r/checkpoints/checkpoint-10/complete.json",
            "s3://b/r/checkpoints/checkpoint-20/complete.json",
            "s3://b/r/checkpoints/checkpoint-100/optimizer.pt"]  # killed while uploading: no marker
    assert train.latest_checkpoint(uris) == 20
    assert train.latest_checkpoint(uris[3:]) is None
    assert train.superseded_checkpoints(uris, 20) == [10]
    assert train.superseded_checkpoints(uris, 100) == [10, 20]  # the new one is complete; no marker needed


def test_training_arguments_come_from_the_spec(tiny_model_dir, tmp_path):
    spec = parse_spec(spec_dict(tiny_model_dir, "file:///tmp/runs", learningRate=2e-4, scheduler="cosine",
                                warmupRatio=0.1, epochs=3, perDeviceBatchSize=2, gradientAccumulationSteps=4,
                                checkpointSteps=7, seed=5))
    kwargs = train.training_kwargs(spec.train, tmp_path, gpu=False, steps=1000)
    expected = {
        "learning_rate": 2e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "num_train_epochs": 3,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "save_steps": 7, "seed": 5,
        "bf16": False, "use_cpu": True, "logging_steps": 5, "train_sampling_strategy": "group_by_length",
        "save_on_each_node": False, "gradient_checkpointing": True}
    assert {key: kwargs[key] for key in expected} == expected
    assert train.training_kwargs(spec.train, tmp_path, gpu=True, steps=10)["bf16"] is True


def test_only_the_first_node_uploads_a_checkpoints_common_files():
    files = ["adapter_model.safetensors", "trainer_state.json", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
             "latest", "global_step8/mp_rank_00_model_states.pt",
             "global_step8/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert train.node_files(files, first_node=True) == files
    # A later node's copy of the adapter and state may be empty or stale: only its ranks' own files go up.
    assert train.node_files(["adapter_model.safetensors", "trainer_state.json", "rng_state_1.pth",
                             "global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                             "global_step8/zero_pp_rank_1_mp_rank_00_model_states.pt"], first_node=False) == [
        "rng_state_1.pth", "global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "global_step8/zero_pp_rank_1_mp_rank_00_model_states.pt"]


def test_parameter_count_reads_the_safetensors_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert train.parameter_count(tiny_model_dir) == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert train.parameter_count(tiny_model_dir / "absent") is None


def _initial_lora(model_dir, **train_fields):
    spec = parse_spec(spec_dict(model_dir, "file:///tmp/runs", **train_fields))
    model = train._lora_model(model_dir, spec.train, gpu=False)
    return model, {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}


def test_the_seed_decides_the_initial_adapter(tiny_model_dir):
    import torch

    _, first = _initial_lora(tiny_model_dir, seed=7)
    torch.manual_seed(1234)  # whatever the process drew before
    _, again = _initial_lora(tiny_model_dir, seed=7)
    _, other = _initial_lora(tiny_model_dir, seed=8)
    assert first and all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_attention_implementation_reaches_transformers(tiny_model_dir, attention):
    model, _ = _initial_lora(tiny_model_dir, attentionImplementation=attention)
    assert model.config._attn_implementation == attention


def test_flash_attention_without_its_package_names_the_field(tiny_model_dir):
    with pytest.raises(StageError, match="spec.train.attentionImplementation flash_attention_2: "):
        _initial_lora(tiny_model_dir, attentionImplementation="flash_attention_2")


def test_the_adapter_is_gathered_without_the_frozen_weights(tiny_model_dir, monkeypatch):
    """Under ZeRO-3 every gathered tensor crosses the network: only the LoRA tensors are asked for."""
    import deepspeed

    model, _ = _initial_lora(tiny_model_dir)
    gathered = []
    real = deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        gathered.extend(params)
        return real(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    state = train.adapter_state_dict(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(gathered) == len(trainable) and all(p.requires_grad for p in gathered)
    assert state and all("lora_" in name for name in state)


def test_cumulative_data_reads_every_round_so_far(tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows()[:5])
    storage.write_jsonl(kept_uri(run_uri, 1), toy_rows()[5:8])
    for data, expected in (("round", 3), ("cumulative", 8)):
        ctx = context(spec_dict(tiny_model_dir, "file:///tmp/runs", data=data), run_uri, tmp_path, round_=1)
        assert len(train.load_examples(train.kept_data_uris(ctx))) == expected


# --- bad kept data fails before any model is loaded -----------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("", "{uri}: no examples: the kept data is empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n', "{uri}:2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": ""}\n', "{uri}:3: field 'output': missing"),
    ('["instruction", "output"]\n', "{uri}:1: expected a JSON object"),
])
def test_empty_or_malformed_kept_data_names_the_file(content, message, tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    uri = kept_uri(run_uri, 0)
    storage.write_text(uri, content)
    with pytest.raises(StageError) as err:
        train.run(context(spec_dict(tiny_model_dir, "file:///tmp/runs"), run_uri, tmp_path))
    assert str(err.value).startswith(message.format(uri=uri))


# --- training ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("zero, epochs, engine", [(0, 6, "torch"), (2, 6, "deepspeed")],
                         ids=["pytorch", "deepspeed-zero2"])
def test_lora_learns_the_toy_task(zero, epochs, engine, tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows())
    spec_path = write_spec(tmp_path, spec_dict(tiny_model_dir, "file:///tmp/runs", zeroStage=zero, epochs=epochs))
    result = tmp_path / "result.json"
    proc = subprocess.run(stage_command("train", spec_path, run_uri, tiny_model_dir.as_uri(), tmp_path / "scratch"),
                          env=stage_env(result), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads(result.read_text())
    metrics = storage.read_json(f"{run_uri}/round-0/train/manifest.json")["metrics"]
    assert set(summary) == {"lossFirst", "lossLast", "steps", "examples", "tokensPerSecond", "trainSeconds", "adapter",
                            "setupSeconds", "workSeconds"}
    assert (metrics["engine"], metrics["zeroStage"], metrics["precision"]) == (engine, zero or None, "fp32")
    assert summary["steps"] == train.optimizer_steps(64, 8, 1, 1, epochs) == metrics["lossCurve"][-1][0]
    assert summary["examples"] == 64 and summary["tokensPerSecond"] > 0 and summary["trainSeconds"] > 0
    # Learned: the mean loss of the last 5 logged steps is below a fifth of the first step's.
    last = [loss for _, loss in metrics["lossCurve"][-5:]]
    assert sum(last) / len(last) < 0.2 * summary["lossFirst"], metrics["lossCurve"]
    adapter = {Path(u).name for u in storage.list_uris(summary["adapter"])}
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json"} <= adapter


@pytest.mark.slow
def test_a_killed_stage_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path, s3_bucket):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_uri = f"{s3_bucket}/ns/run"
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows())
    spec_path = write_spec(tmp_path, spec_dict(tiny_model_dir, s3_bucket, epochs=12, checkpointSteps=4))
    command = stage_command("train", spec_path, run_uri, tiny_model_dir.as_uri(), tmp_path / "scratch")
    checkpoints = f"{run_uri}/round-0/train/checkpoints"
    total = train.optimizer_steps(64, 8, 1, 1, 12)

    first = subprocess.Popen(command, env=stage_env(tmp_path / "first.json"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while train.latest_checkpoint(storage.list_uris(checkpoints)) is None:
            assert first.poll() is None, "the stage ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not storage.exists(f"{run_uri}/round-0/train/manifest.json"), "killed too late: training had finished"
    resume_step = train.latest_checkpoint(storage.list_uris(checkpoints))
    assert 0 < resume_step < total
    saved_state = json.loads(storage.read_text(f"{checkpoints}/checkpoint-{resume_step}/trainer_state.json"))

    proc = subprocess.run(command, env=stage_env(tmp_path / "second.json"), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = storage.read_json(f"{run_uri}/round-0/train/manifest.json")["metrics"]
    # The trainer state's step counter, read when training began, is the checkpoint's step.
    assert metrics["resumedFromStep"] == resume_step == saved_state["global_step"]
    assert metrics["steps"] == total
    assert f"resume_from={tmp_path / 'scratch'}" in proc.stderr and f"checkpoint-{resume_step}" in proc.stderr
    # The curve before the checkpoint is the first run's, carried in the checkpoint's trainer state.
    before = [[e["step"], round(e["loss"], 6)] for e in saved_state["log_history"] if "loss" in e]
    assert metrics["lossCurve"][:len(before)] == before
    assert metrics["lossCurve"][-1][0] == total
    # Storage keeps only the newest checkpoint; each one replaced the ones before it.
    folders = {uri.split("/checkpoints/")[1].split("/")[0] for uri in storage.list_uris(checkpoints)}
    assert folders == {f"checkpoint-{total}"}

    adapter_dir = tmp_path / "adapter"
    storage.download_dir(f"{run_uri}/round-0/train/adapter", adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained (PEFT initialises B to zero)


@pytest.mark.slow
def test_two_nodes_train_as_one_job_and_every_node_checkpoints_its_shards(tiny_model_dir, tmp_path):
    """Two torchrun launchers stand in for two pods of an Indexed Job, each with its own scratch disk."""
    from tests.fixtures.s3 import free_port

    run_uri = (tmp_path / "run").as_uri()
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows())
    spec = spec_dict(tiny_model_dir, "file:///tmp/runs", zeroStage=2, nodes=2, epochs=2, checkpointSteps=3)
    spec_path = write_spec(tmp_path, spec | {"resources": {"train": {"gpus": 1}}})
    port = str(free_port())
    nodes, log_paths = [], [tmp_path / "node-0.log", tmp_path / "node-1.log"]
    for rank in (0, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                    "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
        command = launcher + stage_command("train", spec_path, run_uri, tiny_model_dir.as_uri(),
                                           tmp_path / f"scratch-{rank}")[1:]
        with log_paths[rank].open("w") as log:  # files, not pipes: a full pipe would stall its node
            nodes.append(subprocess.Popen(command, env=stage_env(tmp_path / f"result-{rank}.json"),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for node in nodes:
            node.wait(timeout=600)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the launcher and its workers
    logs = [path.read_text() for path in log_paths]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    metrics = storage.read_json(f"{run_uri}/round-0/train/manifest.json")["metrics"]
    assert (metrics["worldSize"], metrics["steps"]) == (2, train.optimizer_steps(64, 8, 1, 2, 2))
    # Checkpoints at steps 3, 6 and the last (8): storage keeps the last, with both ranks' shards.
    checkpoints = f"{run_uri}/round-0/train/checkpoints"
    files = {uri.removeprefix(checkpoints + "/") for uri in storage.list_uris(checkpoints)}
    assert {"checkpoint-8/rng_state_0.pth", "checkpoint-8/rng_state_1.pth",
            "checkpoint-8/global_step8/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "checkpoint-8/global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt", "checkpoint-8/complete.json"} <= files
    assert {f.split("/")[0] for f in files} == {"checkpoint-8"}
    # Rank 0 alone logs the run and publishes the result.
    assert ["training engine=deepspeed" in log for log in logs] == [True, False]
    assert (tmp_path / "result-0.json").exists() and not (tmp_path / "result-1.json").exists()
