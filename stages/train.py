"""Train stage: LoRA supervised fine-tuning of the round's model on the kept data.

One process (a CPU, or one GPU):
    python -m selfalign.stages train --spec spec.json --round K --run-uri URI --model URI
Several GPUs and nodes (the Job sets NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT):
    torchrun --nnodes=$NNODES --node-rank=$NODE_RANK --nproc-per-node=$NPROC_PER_NODE \
        --master-addr=$MASTER_ADDR --master-port=$MASTER_PORT -m selfalign.stages train ...

transformers' Trainer + PEFT LoRA, prompt tokens masked (sft_data.py), batches grouped by length.
Engine: DeepSpeed at spec.train.zeroStage whenever a GPU is present, and on a CPU when a ZeRO stage
> 0 is asked for (gloo; how tests run the DeepSpeed path); plain PyTorch on a CPU with zeroStage 0,
where DeepSpeed would only add start-up time. zeroStage "auto" is 2 when the bf16 model fits one
GPU with room for activations, 3 beyond, 0 on a CPU (deepspeed_config.zero_stage). The DeepSpeed
config is validated before the model is loaded. bf16 on GPU, fp32 on CPU. Under ZeRO-3 the adapter
is saved by gathering only its own tensors, never the frozen weights.

The ranks of a node share one download of an s3:// model (storage.local_path locks and renames).
The seed is applied before LoRA initialises its weights, so one seed gives one initial adapter.

Every checkpointSteps steps the Trainer's checkpoint (adapter, optimizer, scheduler, RNG, data
position) is copied to <out>/checkpoints/checkpoint-<step>/, `complete.json` last, and the older
ones are then deleted from storage; a restarted pod downloads the latest complete one and resumes
from it. Only global rank 0 writes the adapter and logs, and each stored file has one writer: the
first node uploads a checkpoint, the other nodes only their ranks' own shards. Every rank returns
the same outcome.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from .runtime import storage
from .runtime.context import StageContext, StageError, StageOutcome
from .models.deepspeed_config import DeepSpeedConfigError, deepspeed_config, validate, zero_stage
from .text.sft_data import Example, encode_all, ensure_chat_template, parse_kept

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "complete.json"
LOSS_CURVE_POINTS = 200  # logged points; the manifest keeps the whole curve
_CHECKPOINT = re.compile(r"/checkpoint-(\d+)/" + re.escape(CHECKPOINT_MARKER) + "$")
_CHECKPOINT_FOLDER = re.compile(r"/checkpoint-(\d+)/")
# A checkpoint's files that belong to one rank (its RNG state, its ZeRO shards); the rest is common.
_RANK_FILE = re.compile(r"(^|/)(rng_state_\d+\.pth|[^/]*zero_pp_rank_\d+_[^/]*)$")


def run(ctx: StageContext) -> StageOutcome:
    train = ctx.spec.train
    gpu = torch.cuda.is_available()
    rank0 = _env_int("RANK") == 0

    sources = kept_data_uris(ctx)
    examples = load_examples(sources)
    with ctx.setup("download"):
        model_dir = storage.local_path(ctx.model, ctx.scratch)
    stage = zero_stage(train.zero_stage, parameters=parameter_count(model_dir),
                       gpu_memory=_gpu_memory() if gpu else None)
    engine = choose_engine(stage, gpu=gpu)
    if engine == "deepspeed":
        _single_process_env(gpu=gpu)
    with ctx.setup("load"):
        tokenizer = _load_tokenizer(model_dir)
    features, counts = encode_all(tokenizer, examples, train.max_seq_length, progress=rank0)

    world = _env_int("WORLD_SIZE", default=1)
    steps = optimizer_steps(counts.examples, train.per_device_batch_size,
                            train.gradient_accumulation_steps, world, train.epochs)
    work = Path(ctx.scratch) / "train" / f"round-{ctx.round}"
    kwargs = training_kwargs(train, work / "trainer", gpu=gpu, steps=steps)
    config = None
    if engine == "deepspeed":
        config = _validated_deepspeed_config(train, stage, kwargs, model_dir, steps)
    with ctx.setup("load"):  # with DeepSpeed: the process group, a rendezvous of every rank
        args = _training_arguments(kwargs, config, gpu=gpu)
    with ctx.setup("download"):
        resume = _fetch_latest_checkpoint(ctx.out, work, args)
    if rank0:
        log.info("training engine=%s zero=%d zero_asked=%s world=%d examples=%d steps=%d resume_from=%s "
                 "model=%s", engine, stage, train.zero_stage, world, counts.examples, steps, resume, ctx.model)

    with ctx.setup("load"):
        model = _lora_model(model_dir, train, gpu=gpu)
    session = SessionStats()
    trainer = _trainer(model, args, tokenizer, features,
                       callbacks=[CheckpointUploader(f"{ctx.out}/checkpoints"), session])
    called = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # Until its first step the Trainer starts the engine: DeepSpeed's, the optimizer, the checkpoint.
    ctx.clock.add("load", session.began - called)

    adapter_uri = f"{ctx.out}/adapter"
    trainer.save_model(str(work / "adapter"))  # every rank: ZeRO-3 gathers the adapter here
    if rank0:
        storage.upload_dir(work / "adapter", adapter_uri)
    outcome = _outcome(trainer, session, counts, adapter_uri, ctx.out, engine=engine, sources=sources,
                       zero_stage=stage if engine == "deepspeed" else None)
    if rank0:
        summary = outcome.summary
        log.info("training finished steps=%d loss_first=%.4f loss_last=%.4f tokens_per_s=%.1f seconds=%.1f",
                 summary["steps"], summary["lossFirst"], summary["lossLast"], summary["tokensPerSecond"],
                 summary["trainSeconds"])
    return outcome


def _outcome(trainer, session: SessionStats, counts, adapter_uri: str, out: str, *, engine: str,
             zero_stage: int | None, sources: list[str]) -> StageOutcome:
    curve = loss_curve(trainer.state.log_history)
    if not curve:
        raise StageError(f"training logged no loss ({trainer.state.global_step} steps)")
    summary = {
        "lossFirst": curve[0][1], "lossLast": curve[-1][1], "steps": trainer.state.global_step,
        "examples": counts.examples, "tokensPerSecond": session.tokens_per_second,
        "trainSeconds": session.seconds, "adapter": adapter_uri,
    }
    metrics = {
        **summary, "lossCurve": curve, "engine": engine, "worldSize": trainer.args.world_size,
        "zeroStage": zero_stage,
        "precision": "bf16" if trainer.args.bf16 else "fp32", "resumedFromStep": session.start_step,
        "truncatedExamples": counts.truncated, "droppedExamples": counts.dropped,
        "tokens": counts.tokens,
        "supervisedTokens": counts.supervised_tokens, "dataFiles": sources,
        "trainableParameters": trainer.model.get_nb_trainable_parameters()[0],
    }
    return StageOutcome(summary=summary, metrics=metrics,
                        outputs={"adapter": adapter_uri, "checkpoints": f"{out}/checkpoints"})


# --- decisions (pure) --------------------------------------------------------------------------

def choose_engine(zero_stage: int, *, gpu: bool) -> str:
    """'deepspeed' on any GPU and for ZeRO > 0 on a CPU; 'torch' for a CPU at ZeRO 0."""
    return "deepspeed" if gpu or zero_stage > 0 else "torch"


def kept_data_uris(ctx: StageContext) -> list[str]:
    """This round's kept data, or every round's so far (spec.train.data: round | cumulative)."""
    rounds = range(ctx.round + 1) if ctx.spec.train.data == "cumulative" else [ctx.round]
    return [f"{ctx.stage_out(k, 'assess')}/kept.jsonl" for k in rounds]


def optimizer_steps(examples: int, batch: int, accumulation: int, world: int, epochs: float) -> int:
    """The Trainer's step count: batches per rank, grouped by accumulation, times epochs."""
    batches = math.ceil(math.ceil(examples / world) / batch)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(epochs * per_epoch)


def training_kwargs(train, output_dir: Path, *, gpu: bool, steps: int) -> dict:
    """TrainingArguments for spec.train (everything but the DeepSpeed config)."""
    return {
        "output_dir": str(output_dir), "seed": train.seed, "num_train_epochs": train.epochs,
        "per_device_train_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate, "lr_scheduler_type": train.scheduler,
        "warmup_steps": train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "train_sampling_strategy": "group_by_length",
        "bf16": gpu, "use_cpu": not gpu,
        "logging_steps": max(1, math.ceil(steps / LOSS_CURVE_POINTS)), "logging_first_step": True,
        "save_strategy": "steps", "save_steps": train.checkpoint_steps, "save_total_limit": 1,
        # Scratch is per pod: with several nodes each one keeps the files its ranks wrote.
        "save_on_each_node": train.nodes > 1,
        # Non-reentrant checkpointing needs no input that requires grad (PEFT freezes the embeddings).
        "gradient_checkpointing": train.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "include_num_input_tokens_seen": "non_padding", "report_to": [], "remove_unused_columns": False,
    }


def latest_checkpoint(uris: list[str]) -> int | None:
    """The step of the newest checkpoint whose completion marker exists, if any."""
    steps = [int(m.group(1)) for m in map(_CHECKPOINT.search, uris) if m]
    return max(steps, default=None)


def node_files(files: list[str], *, first_node: bool) -> list[str]:
    """What one node uploads of a checkpoint folder (paths relative to it): the first node all of
    it, every other node only its ranks' own files, so no common file (adapter, trainer state) has
    two writers and a node's copy never lands over the first node's."""
    return files if first_node else [f for f in files if _RANK_FILE.search(f)]


def parameter_count(model_dir: Path) -> int | None:
    """The model's parameters, from its safetensors headers (no weights read); None without any."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def superseded_checkpoints(uris: list[str], step: int) -> list[int]:
    """Steps of the checkpoint folders older than `step`, complete or not: once checkpoint `step`
    is complete, resuming never needs them (the Trainer keeps one locally, save_total_limit 1)."""
    steps = {int(m.group(1)) for m in map(_CHECKPOINT_FOLDER.search, uris) if m}
    return sorted(s for s in steps if s < step)


def loss_curve(log_history: list[dict]) -> list[list[float]]:
    """[[step, loss], ...] from the Trainer's log history."""
    return [[entry["step"], round(entry["loss"], 6)] for entry in log_history if "loss" in entry]


# --- the imperative shell ------------------------------------------------------------------------

def load_examples(uris: list[str]) -> list[Example]:
    """Every kept example of `uris`; invalid JSON (storage) or a bad row (parse_kept) names uri:line."""
    return [example for uri in uris for example in parse_kept(storage.iter_jsonl(uri), uri)]


def _env_int(name: str, default: int = 0) -> int:
    return int(os.environ.get(name, default))


def _single_process_env(*, gpu: bool) -> None:
    """Without a launcher, DeepSpeed looks for MPI; tell it this is rank 0 of 1 instead."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _load_tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if ensure_chat_template(tokenizer):
        log.info("model has no chat template; using the plain instruction template model=%s", model_dir)
    return tokenizer


def _gpu_memory() -> int:
    return torch.cuda.get_device_properties(_env_int("LOCAL_RANK")).total_memory


def _validated_deepspeed_config(train, stage: int, kwargs: dict, model_dir: Path, steps: int) -> dict:
    model_config = AutoConfig.from_pretrained(model_dir)
    hidden = getattr(model_config, "hidden_size", None) or model_config.get_text_config().hidden_size
    try:
        return validate(deepspeed_config(train, stage), TrainingArguments(**kwargs),
                        hidden_size=hidden, num_training_steps=steps)
    except DeepSpeedConfigError as exc:
        raise StageError(f"spec.train (zeroStage {train.zero_stage}: {stage}): {exc}") from None


def _training_arguments(kwargs: dict, config: dict | None, *, gpu: bool):
    """Built before the model: with ZeRO-3 it makes from_pretrained load straight into shards."""
    args = TrainingArguments(**kwargs, deepspeed=config)
    if config is not None:
        import deepspeed

        # ZeRO-3's loading (zero.Init) checks the batch against DeepSpeed's own process group, of
        # one rank until it exists; on a CPU nothing else starts it before the model loads.
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    return args


def _fetch_latest_checkpoint(out: str, work: Path, args) -> Path | None:
    """Start clean (local leftovers may be half-written); download the newest complete checkpoint."""
    step = latest_checkpoint(storage.list_uris(f"{out}/checkpoints"))
    local = Path(args.output_dir) / f"checkpoint-{step}"
    with args.main_process_first(local=True, desc="fetch checkpoint"):
        if args.local_process_index == 0:
            shutil.rmtree(work, ignore_errors=True)
            if step is not None:
                storage.download_dir(f"{out}/checkpoints/checkpoint-{step}", local)
                (local / CHECKPOINT_MARKER).unlink()
    return local if step is not None else None


def _lora_model(model_dir: Path, train, *, gpu: bool):
    dtype = torch.bfloat16 if gpu else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                     attn_implementation=train.attention_implementation)
    except (ImportError, ValueError) as exc:  # e.g. flash_attention_2 without flash-attn or a GPU
        raise StageError(f"spec.train.attentionImplementation {train.attention_implementation}: "
                         f"{' '.join(str(exc).split())}") from None
    targets = train.target_modules
    lora = LoraConfig(
        r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules="all-linear" if targets == ["all-linear"] else targets)
    # LoRA draws its A matrices here, before the Trainer would apply the seed.
    set_seed(train.seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target module name the model does not have
        raise StageError(f"spec.train.targetModules {targets}: {' '.join(str(exc).split())}") from None


def _trainer(model, args, tokenizer, features, *, callbacks):
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                      pad_to_multiple_of=8 if not args.use_cpu else None)
    return AdapterTrainer(model=model, args=args, train_dataset=features, processing_class=tokenizer,
                          data_collator=collator, callbacks=callbacks)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors, gathered whole on every rank; a collective under ZeRO-3.
    Only these are gathered: DeepSpeed's own 16-bit save walks every layer, frozen ones included."""
    import deepspeed

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(trainable.values())):
        return {name: p.detach().cpu().clone() for name, p in trainable.items()}


class AdapterTrainer(Trainer):
    """The Trainer, saving a ZeRO-3 adapter from `adapter_state_dict` (final save and checkpoints)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not is_deepspeed_zero3_enabled():
            return super().save_model(output_dir, _internal_call)
        state_dict = adapter_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)


class CheckpointUploader(TrainerCallback):
    """Copy each checkpoint the Trainer saves to storage; the completion marker goes last.

    Every node's local rank 0 uploads what its ranks wrote (ZeRO shards are per rank; the first
    node also the common files, `node_files`), all ranks wait, then global rank 0 writes the
    marker (a checkpoint without it is never resumed from) and deletes the checkpoints it
    supersedes, so storage holds one, as the Trainer's own folder does.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        target = f"{self.prefix}/checkpoint-{step}"
        _barrier()
        if args.local_process_index == 0:
            files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
            for name in node_files(files, first_node=args.process_index == 0):
                storage.upload_file(local / name, storage.join(target, name))
        _barrier()
        if args.process_index == 0:
            storage.write_json(f"{target}/{CHECKPOINT_MARKER}", {"step": step})
            log.info("checkpoint saved step=%d uri=%s", step, target)
            for old in superseded_checkpoints(storage.list_uris(self.prefix), step):
                storage.delete_dir(f"{self.prefix}/checkpoint-{old}")


class SessionStats(TrainerCallback):
    """This process's share of the training: the step it started from (the trainer state's counter
    after a checkpoint is loaded), when its first step began (monotonic), its seconds and tokens per
    second."""

    def __init__(self):
        self.start_step, self.tokens_per_second, self.seconds = 0, 0.0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self._tokens = state.global_step, state.num_input_tokens_seen
        self.began = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = round(time.monotonic() - self.began, 3)
        tokens = state.num_input_tokens_seen - self._tokens
        self.tokens_per_second = round(tokens / max(self.seconds, 1e-9), 1)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
