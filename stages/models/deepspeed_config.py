"""DeepSpeed ZeRO configuration for the train stage: generated from the spec, validated up front.

`zero_stage` is pure: spec.train.zeroStage, with "auto" decided by the model's size against one GPU's
memory. `deepspeed_config` is pure: the ZeRO section follows that stage, and every value
the Hugging Face Trainer also knows (batch sizes, accumulation, clipping, precision, bucket sizes
that depend on the model's hidden size) is "auto", so the Trainer fills it from its own arguments
and the two can never disagree. `validate` runs the exact checks the Trainer and DeepSpeed run at
start-up (transformers' HfTrainerDeepSpeedConfig, then DeepSpeed's own DeepSpeedConfig) without
starting DeepSpeed, so a bad combination fails with DeepSpeed's message before a GPU is touched.
"""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace
from typing import Any

from selfalign.operator.spec import Train

_STAGE_SETTINGS: dict[int, dict[str, Any]] = {
    0: {},
    1: {"reduce_bucket_size": "auto"},
    # ZeRO-2/3: overlap gradient reduction with the backward pass; contiguous buffers avoid
    # fragmentation (the settings of the Hugging Face DeepSpeed guide).
    2: {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
    # The adapter is saved by gathering only its own tensors (train.adapter_state_dict): the
    # stock 16-bit save would gather every frozen layer too, at every checkpoint.
    3: {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": False},
}
# "auto" picks ZeRO-2 while the bf16 weights take at most this share of one GPU's memory: LoRA's
# gradients and optimizer state are a few percent of it, and the rest holds activations (batch x
# sequence x hidden x layers, fewer with gradient checkpointing), the CUDA context and NCCL buffers.
# Beyond it ZeRO-3 shards the weights, at the price of gathering them every micro-step.
FITS_SHARE = 0.5
BF16_BYTES = 2


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed configuration that the Trainer or DeepSpeed itself rejects."""


def zero_stage(requested: int | str, *, parameters: int | None, gpu_memory: int | None) -> int:
    """The ZeRO stage to run: the one asked for, or for "auto" 0 without a GPU (plain PyTorch),
    2 when the bf16 weights of `parameters` fit one GPU of `gpu_memory` bytes, else 3 (also when
    the size is unknown: sharding is the choice that cannot run out of memory for weights)."""
    if requested != "auto":
        return int(requested)
    if gpu_memory is None:
        return 0
    if parameters is None:
        return 3
    return 2 if parameters * BF16_BYTES <= FITS_SHARE * gpu_memory else 3


def deepspeed_config(train: Train, stage: int) -> dict[str, Any]:
    """The DeepSpeed config for `spec.train` at ZeRO `stage` (from `zero_stage`), Hugging Face
    Trainer style, "auto" where the Trainer fills it."""
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": stage, **_STAGE_SETTINGS[stage]},
        # The Trainer builds torch's AdamW; DeepSpeed only vouches for its own optimizers with ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,  # the Trainer logs progress; DeepSpeed's own print is noise
        "wall_clock_breakdown": False,
    }


def validate(config: dict[str, Any], args, *, hidden_size: int,
             num_training_steps: int) -> dict[str, Any]:
    """Fill `config` from TrainingArguments `args` and validate it; return the filled config.

    `args` is built without `deepspeed=` (with it, TrainingArguments registers its own copy as
    the process-wide ZeRO-3 switch). Raises DeepSpeedConfigError with the Trainer's or
    DeepSpeed's own message.
    """
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.config import DeepSpeedConfigError as DeepSpeedOwnError
    from transformers.integrations.deepspeed import (
        HfTrainerDeepSpeedConfig,
        unset_hf_deepspeed_config,
    )

    model_stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))
    try:
        hf_config = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
        hf_config.trainer_config_process(args)
        hf_config.trainer_config_finalize(args, model_stub, num_training_steps)
        filled = hf_config.config
        unfilled = sorted(key for key, value in _flatten(filled) if value == "auto")
        if unfilled:
            raise ValueError(f"values left 'auto' that nothing fills: {', '.join(unfilled)}")
        # DeepSpeed takes the world size from its own process group, which starts later (world 1
        # until then); the Trainer has just checked train_batch_size = world x micro x accumulation.
        plain = json.loads(json.dumps(filled))
        DeepSpeedConfig({key: value for key, value in plain.items() if key != "train_batch_size"})
    except (ValueError, AssertionError, DeepSpeedOwnError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise DeepSpeedConfigError(f"DeepSpeed config rejected: {message}") from None
    finally:
        unset_hf_deepspeed_config()  # the global weakref would turn on ZeRO-3 loading elsewhere
    return filled


def _flatten(node: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        items.extend(_flatten(value, f"{path}.") if isinstance(value, dict) else [(path, value)])
    return items
