"""Merge stage: the adapter folded into the model, saved as safetensors shards with tokenizer, chat
template and generation config, and checked against the adapter model after save and reload."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.operator.spec import parse_spec
from selfalign.stages import merge
from selfalign.stages.runtime import storage
from selfalign.stages.__main__ import run_stage
from selfalign.stages.runtime.context import StageContext, StageError
from selfalign.stages.models.evaluation import mean_nll, read_heldout
from selfalign.stages.text.records import RecordError
from selfalign.stages.text.sft_data import PLAIN_CHAT_TEMPLATE
from tests.test_train import kept_uri, spec_dict, toy_rows

pytestmark = pytest.mark.slow


def publish_adapter(model_dir, run_uri: str, tmp_path, *, chat_template: str | None = None,
                    round_: int = 0) -> None:
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
    storage.upload_dir(local, f"{run_uri}/round-{round_}/train/adapter")
    storage.write_jsonl(kept_uri(run_uri, round_), toy_rows())


def context(model_dir, run_uri: str, tmp_path, *, round_: int = 0, evaluate: dict | None = None,
            **merge_fields) -> StageContext:
    raw = spec_dict(model_dir, "file:///tmp/runs") | {"merge": merge_fields}
    if evaluate:
        raw["evaluate"] = evaluate
    return StageContext(stage="merge", spec=parse_spec(raw), round=round_, run_uri=run_uri,
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
    assert not any(key.startswith("eval") for key in summary)  # no spec.evaluate, no held-out loss

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


def test_held_out_loss_of_the_model_the_round_generated_with_and_of_the_merged_model(tiny_model_dir, tmp_path):
    """Round 1 trained on the base model (train.from: base) still compares against M_1, the model
    round 1 generated with, and the merged M_2 as saved; both read as training formats the rows."""
    run_uri = (tmp_path / "run").as_uri()
    m1 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        m1.lm_head.weight.mul_(0.5)  # M_1 differs from the base model
    m1.save_pretrained(tmp_path / "m1")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "m1")
    storage.upload_dir(tmp_path / "m1", f"{run_uri}/models/round-1")
    publish_adapter(tiny_model_dir, run_uri, tmp_path, round_=1)
    heldout = (tmp_path / "heldout.jsonl").as_uri()
    storage.write_jsonl(heldout, toy_rows()[:6])

    summary = run_stage(context(tiny_model_dir, run_uri, tmp_path, round_=1, evaluate={"data": heldout}))

    tokenizer = AutoTokenizer.from_pretrained(storage.local_path(f"{run_uri}/round-1/train/adapter", tmp_path))
    rows = read_heldout(heldout)
    loss = {name: mean_nll(AutoModelForCausalLM.from_pretrained(storage.local_path(uri, tmp_path)), tokenizer,
                           rows, 64)
            for name, uri in (("m1", f"{run_uri}/models/round-1"), ("m2", summary["model"]),
                              ("base", tiny_model_dir.as_uri()))}
    assert summary["evalLossBefore"] == pytest.approx(loss["m1"].nll, rel=1e-5)
    assert summary["evalLossBefore"] != pytest.approx(loss["base"].nll, rel=1e-3)
    assert summary["evalLossAfter"] == pytest.approx(loss["m2"].nll, rel=1e-5)
    assert (summary["evalItems"], summary["evalTokens"]) == (6, loss["m2"].tokens)
    manifest = storage.read_json(f"{run_uri}/round-1/merge/manifest.json")
    assert {k: manifest["metrics"][k] for k in ("evalLossBefore", "evalLossAfter", "evalItems")} == \
        {k: summary[k] for k in ("evalLossBefore", "evalLossAfter", "evalItems")}


def test_a_bad_held_out_row_fails_the_stage_and_publishes_no_model(tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(tiny_model_dir, run_uri, tmp_path)
    heldout = (tmp_path / "heldout.jsonl").as_uri()
    storage.write_jsonl(heldout, [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say bye."}])
    with pytest.raises(RecordError, match=r"heldout.jsonl:2: field 'output': missing"):
        merge.run(context(tiny_model_dir, run_uri, tmp_path, evaluate={"data": heldout}))
    assert storage.list_uris(f"{run_uri}/models/round-1") == []
