"""DeepSpeed configs from the spec, validated with transformers' and DeepSpeed's own config classes."""
import json

import pytest
from transformers import TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from selfalign.operator.spec import SpecError, parse_spec
from selfalign.stages.models.deepspeed_config import DeepSpeedConfigError, deepspeed_config, validate, zero_stage

HIDDEN = 128


@pytest.fixture(autouse=True)
def cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def train_spec(**train):
    raw = {"recipe": "isheep", "rounds": 1, "model": {"base": "builtin://tiny-llama"}, "seeds": "file:///s.jsonl",
           "storage": {"uri": "file:///tmp/runs"}, "coverage": {"reference": "file:///r.jsonl"}, "train": train}
    return parse_spec(raw).train


def args_for(train, tmp_path, **extra):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             per_device_train_batch_size=train.per_device_batch_size,
                             gradient_accumulation_steps=train.gradient_accumulation_steps,
                             learning_rate=train.learning_rate, **extra)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("batch, accumulation", [(1, 1), (4, 4), (16, 2)])
def test_every_zero_stage_validates_with_the_trainer_values_filled_in(stage, batch, accumulation, tmp_path):
    train = train_spec(zeroStage=stage, perDeviceBatchSize=batch, gradientAccumulationSteps=accumulation)
    filled = validate(deepspeed_config(train, train.zero_stage), args_for(train, tmp_path), hidden_size=HIDDEN, num_training_steps=50)
    assert filled["zero_optimization"]["stage"] == stage
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"]) == (batch, accumulation, batch * accumulation)
    assert filled["bf16"] == {"enabled": False} and filled["fp16"] == {"enabled": False}  # CPU: fp32
    assert '"auto"' not in json.dumps(filled)
    if stage:
        assert filled["zero_optimization"]["reduce_bucket_size"] == HIDDEN * HIDDEN
    if stage == 3:
        # The adapter is gathered alone (train.adapter_state_dict), never the whole 16-bit model.
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
        assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * HIDDEN


def test_precision_follows_the_training_arguments(tmp_path):
    train = train_spec(zeroStage=2)
    filled = validate(deepspeed_config(train, train.zero_stage), args_for(train, tmp_path, bf16=True),
                      hidden_size=HIDDEN, num_training_steps=50)
    assert filled["bf16"] == {"enabled": True}


def test_validation_leaves_no_zero3_switch_behind(tmp_path):
    """The Trainer's global DeepSpeed weakref would make later from_pretrained calls load into ZeRO-3."""
    train = train_spec(zeroStage=3)
    validate(deepspeed_config(train, train.zero_stage), args_for(train, tmp_path), hidden_size=HIDDEN, num_training_steps=50)
    assert not is_deepspeed_zero3_enabled()


def test_generation_is_pure_and_json():
    train = train_spec(zeroStage=2)
    assert deepspeed_config(train, train.zero_stage) == json.loads(json.dumps(deepspeed_config(train, train.zero_stage)))


def test_an_unknown_zero_setting_fails_with_deepspeeds_message(tmp_path):
    train = train_spec(zeroStage=2)
    config = deepspeed_config(train, train.zero_stage)
    config["zero_optimization"]["stagee"] = 2
    with pytest.raises(DeepSpeedConfigError, match=r"DeepSpeed config rejected: .*stagee.*Extra inputs are not permitted"):
        validate(config, args_for(train, tmp_path), hidden_size=HIDDEN, num_training_steps=50)


def test_a_value_that_contradicts_the_trainer_fails_with_the_mismatch(tmp_path):
    train = train_spec(zeroStage=1, gradientAccumulationSteps=2)
    config = {**deepspeed_config(train, train.zero_stage), "gradient_accumulation_steps": 8}
    with pytest.raises(DeepSpeedConfigError, match=r"ds gradient_accumulation_steps=8 vs hf gradient_accumulation_steps=2"):
        validate(config, args_for(train, tmp_path), hidden_size=HIDDEN, num_training_steps=50)


def test_a_value_deepspeed_refuses_fails_with_its_message(tmp_path):
    train = train_spec(zeroStage=2)
    config = {**deepspeed_config(train, train.zero_stage), "communication_data_type": "int8"}
    with pytest.raises(DeepSpeedConfigError, match=r"Invalid communication_data_type.*Got: int8"):
        validate(config, args_for(train, tmp_path), hidden_size=HIDDEN, num_training_steps=50)


def test_an_auto_value_nothing_fills_is_reported(tmp_path):
    train = train_spec(zeroStage=2)
    config = {**deepspeed_config(train, train.zero_stage), "communication_data_type": "auto"}
    with pytest.raises(DeepSpeedConfigError, match="values left 'auto' that nothing fills: communication_data_type"):
        validate(config, args_for(train, tmp_path), hidden_size=HIDDEN, num_training_steps=50)


def test_a_zero_stage_deepspeed_lacks_is_refused_by_the_spec():
    with pytest.raises(SpecError, match=r"spec\.train\.zeroStage: Input should be 0, 1, 2, 3 or 'auto'"):
        train_spec(zeroStage=4)


GIB = 1024 ** 3


@pytest.mark.parametrize("asked, parameters, gpu_memory, stage", [
    (3, 8 * 10**9, 80 * GIB, 3),  # asked for: kept, even where 2 would do
    (1, 70 * 10**9, 80 * GIB, 1),
    ("auto", 8 * 10**9, 80 * GIB, 2),  # 16 GB of bf16 weights on an 80 GiB GPU
    ("auto", 20 * 10**9, 80 * GIB, 2),  # 40 GB: within half of 80 GiB (85.9 GB)
    ("auto", 30 * 10**9, 80 * GIB, 3),  # 60 GB: too little room left for activations
    ("auto", 70 * 10**9, 80 * GIB, 3),
    ("auto", 8 * 10**9, 24 * GIB, 3),  # 16 GB on a 24 GiB card
    ("auto", 135 * 10**6, 24 * GIB, 2),
    ("auto", None, 80 * GIB, 3),  # size unknown: shard
    ("auto", 8 * 10**9, None, 0),  # no GPU: plain PyTorch
])
def test_zero_stage_by_model_size(asked, parameters, gpu_memory, stage):
    assert zero_stage(asked, parameters=parameters, gpu_memory=gpu_memory) == stage


def test_presets_let_the_size_decide():
    assert train_spec().zero_stage == "auto"
