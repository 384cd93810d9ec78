"""Merge stage: the adapter folded into the model, saved as safetensors shards with tokenizer, chat
template and generation config, and checked against the adapter model after save and reload."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.operator.spec import parse_spec
from selfalign.stages import merge, storage
from selfalign.stages.__main__ import run_stage
from selfalign.stages.context import StageContext, StageError
from selfalign.stages.sft_data import PLAIN_CHAT_TEMPLATE
from tests.test_train import kept_uri, spec_dict, toy_rows

pytestmark = pytest.mark.slow


def publish_adapter(model_dir, run_uri: str, tmp_path, *, chat_template: str | None = None) -> None:
    """A LoRA adapter with random (non-zero) weights where the train stage puts it, and kept data."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    local = tmp_path / "adapter"
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)
    storage.upload_dir(local, f"{run_uri}/round-0/train/adapter")
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows())


def context(model_dir, run_uri: str, tmp_path, **merge_fields) -> StageContext:
    raw = spec_dict(model_dir, "file:///tmp/runs") | {"merge": merge_fields}
    return StageContext(stage="merge", spec=parse_spec(raw), round=0, run_uri=run_uri,
                        model=model_dir.as_uri(), scratch=str(tmp_path / "scratch"))


def probe(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.fixture
def merged(tiny_model_dir, tmp_path, monkeypatch):
    """The merge stage run through the stage runner, with small shards so the model is sharded."""
    monkeypatch.setattr(merge, "MAX_SHARD_SIZE", "400KB")
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(tiny_model_dir, run_uri, tmp_path)
    summary = run_stage(context(tiny_model_dir, run_uri, tmp_path))
    return run_uri, summary


def test_merged_model_matches_the_adapter_after_save_and_reload(merged, tiny_model_dir, tmp_path):
    run_uri, summary = merged
    assert summary["model"] == f"{run_uri}/models/round-1"
    assert 0 <= summary["maxAbsLogitDiff"] < 1e-4
    manifest = storage.read_json(f"{run_uri}/round-0/merge/manifest.json")
    assert manifest["metrics"]["maxAbsLogitDiff"] == summary["maxAbsLogitDiff"]
    assert manifest["metrics"]["adapterEffect"] > 1e-2  # the probe sees the adapter change the logits

    # Independently: the saved model, reloaded from storage, against the base model + adapter.
    merged_dir, adapter_dir = tmp_path / "check-merged", tmp_path / "check-adapter"
    storage.download_dir(summary["model"], merged_dir)
    storage.download_dir(f"{run_uri}/round-0/train/adapter", adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = probe(tokenizer, ["<s><|user|>\nRepeat the word stone.</s>\n<|assistant|>\nstone</s>\n",
                              "<s><|user|>\nHello</s>\n"])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             adapter_dir)(**batch).logits
        actual = AutoModelForCausalLM.from_pretrained(merged_dir)(**batch).logits
    real = batch["attention_mask"].bool()
    assert (expected[real] - actual[real]).abs().max() < 1e-4


def test_merged_folder_holds_shards_tokenizer_template_and_generation_config(merged, tiny_model_dir, tmp_path):
    _, summary = merged
    names = {uri.rsplit("/", 1)[1] for uri in storage.list_uris(summary["model"])}
    shards = {n for n in names if n.endswith(".safetensors")}
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    assert not any(n.startswith("adapter_") for n in names)  # merged, not an adapter
    generation = json.loads(storage.read_text(f"{summary['model']}/generation_config.json"))
    base_generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == base_generation["eos_token_id"]
    merged_tokenizer = AutoTokenizer.from_pretrained(storage.local_path(summary["model"], tmp_path))
    assert merged_tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


def test_the_template_the_adapter_learned_goes_with_the_model(tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(tiny_model_dir, run_uri, tmp_path, chat_template=PLAIN_CHAT_TEMPLATE)
    summary = merge.run(context(tiny_model_dir, run_uri, tmp_path)).summary
    merged_tokenizer = AutoTokenizer.from_pretrained(storage.local_path(summary["model"], tmp_path))
    assert merged_tokenizer.chat_template == PLAIN_CHAT_TEMPLATE


def test_disagreement_above_tolerance_fails_and_publishes_nothing(tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(tiny_model_dir, run_uri, tmp_path)
    with pytest.raises(StageError, match=r"on 8 probe examples: max abs logit diff .* > spec.merge.tolerance 1e-12"):
        merge.run(context(tiny_model_dir, run_uri, tmp_path, tolerance=1e-12))
    assert storage.list_uris(f"{run_uri}/models/round-1") == []


def test_bf16_model_is_checked_exactly_and_its_rounding_only_recorded(tiny_model_dir, tmp_path):
    """A bf16 checkpoint: the merge (fp32) and the save round trip (bf16) pass the default
    tolerance; what bf16 rounding costs is recorded beside them, not mistaken for a bad merge."""
    bf16_dir = tmp_path / "bf16-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_dir)
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(bf16_dir, run_uri, tmp_path)
    outcome = merge.run(context(bf16_dir, run_uri, tmp_path))
    metrics = outcome.metrics
    assert metrics["dtype"] == "bfloat16"
    assert metrics["maxAbsLogitDiff"] < 1e-4 and metrics["saveRoundTripDiff"] < 1e-4
    assert metrics["dtypeRoundingDiff"] > metrics["tolerance"]
