"""Merge stage: the adapter folded into the model shard by shard (PEFT's arithmetic, bounded memory),
saved as safetensors shards with tokenizer, chat template and generation config, and checked against
the adapter model after reload: agreement in float32, an effect not lost to the stored dtype."""
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
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


def save_adapter(model_dir, local, *, chat_template: str | None = None, strength: float = 1.0) -> None:
    """A LoRA adapter with random (non-zero) weights, B scaled by `strength`, and the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(strength)
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)


def publish_adapter(model_dir, run_uri: str, tmp_path, *, chat_template: str | None = None,
                    round_: int = 0, strength: float = 1.0) -> None:
    """An adapter (save_adapter) where the train stage puts it, and kept data."""
    local = tmp_path / "adapter"
    save_adapter(model_dir, local, chat_template=chat_template, strength=strength)
    storage.upload_dir(local, f"{run_uri}/round-{round_}/train/adapter")
    storage.write_jsonl(kept_uri(run_uri, round_), toy_rows())


def context(model_dir, run_uri: str, tmp_path, *, round_: int = 0, evaluate: dict | None = None,
            max_seq_length: int = 64, **merge_fields) -> StageContext:
    raw = spec_dict(model_dir, "file:///tmp/runs", maxSeqLength=max_seq_length) | {"merge": merge_fields}
    if evaluate:
        raw["evaluate"] = evaluate
    return StageContext(stage="merge", spec=parse_spec(raw), round=round_, run_uri=run_uri,
                        model=model_dir.as_uri(), scratch=str(tmp_path / "scratch"))


def probe(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def sharded_copy(model_dir, folder, dtype=torch.float32):
    """The model saved in shards of 400 KB, with its tokenizer."""
    AutoModelForCausalLM.from_pretrained(model_dir).to(dtype).save_pretrained(folder, max_shard_size="400KB")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def merged(tiny_model_dir, tmp_path):
    """The merge stage run through the stage runner on the model in small shards."""
    run_uri = (tmp_path / "run").as_uri()
    model_dir = sharded_copy(tiny_model_dir, tmp_path / "sharded")
    publish_adapter(model_dir, run_uri, tmp_path)
    summary = run_stage(context(model_dir, run_uri, tmp_path))
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


def bf16_copy(model_dir, folder):
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def test_bf16_model_passes_with_its_rounding_recorded(tiny_model_dir, tmp_path):
    """A bf16 checkpoint: the merged bf16 weights differ from the float32 adapter model by rounding,
    recorded (not judged against the tolerance); the adapter's effect survives it."""
    bf16_dir = bf16_copy(tiny_model_dir, tmp_path / "bf16-model")
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(bf16_dir, run_uri, tmp_path)
    metrics = merge.run(context(bf16_dir, run_uri, tmp_path)).metrics
    assert metrics["dtype"] == "bfloat16"
    assert metrics["maxAbsLogitDiff"] > metrics["tolerance"]  # rounding, far above a merge's error
    assert metrics["effectKept"] >= merge.MIN_EFFECT_KEPT and metrics["adapterEffect"] > 0


def test_an_adapter_lost_to_bf16_rounding_fails_and_publishes_nothing(tiny_model_dir, tmp_path):
    """An update far below bf16's precision: the merged weights round back to the base weights (all
    but those near zero), so the next round would train from the same model. Float32 sees the
    effect; the stage fails. (Measured on this model, the share kept by adapter strength: 1e-3 93%,
    1e-4 11%, 1e-5 and 1e-6 about 0.)"""
    bf16_dir = bf16_copy(tiny_model_dir, tmp_path / "bf16-model")
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(bf16_dir, run_uri, tmp_path, strength=1e-6)
    with pytest.raises(StageError, match=r"adapter's effect is lost to rounding to bfloat16: the merged weights "
                                         r"keep \d+% of its change of the probe logits \(up to .* in float32\), "
                                         r"under 25%"):
        merge.run(context(bf16_dir, run_uri, tmp_path))
    assert storage.list_uris(f"{run_uri}/models/round-1") == []


def test_a_float32_model_keeps_a_small_update(tiny_model_dir, tmp_path):
    """The same small update on the float32 model is kept: the check judges rounding, not size."""
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(tiny_model_dir, run_uri, tmp_path, strength=1e-6)
    metrics = merge.run(context(tiny_model_dir, run_uri, tmp_path)).metrics
    assert metrics["effectKept"] == pytest.approx(1, abs=0.05) and metrics["adapterEffect"] > 0


def test_the_probe_is_cut_at_max_seq_length(tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    publish_adapter(tiny_model_dir, run_uri, tmp_path)
    metrics = merge.run(context(tiny_model_dir, run_uri, tmp_path, max_seq_length=16)).metrics
    assert metrics["probeTokens"] == 16 * metrics["probeExamples"] == 16 * merge.PROBE_EXAMPLES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_merge_equals_peft_merge_and_unload(tiny_model_dir, tmp_path, dtype):
    """Every tensor of every shard, bit for bit, as PEFT merges the same adapter into the same model."""
    model_dir = sharded_copy(tiny_model_dir, tmp_path / "sharded", dtype)
    save_adapter(tiny_model_dir, tmp_path / "adapter")
    assert merge.merge_weights(model_dir, tmp_path / "adapter", tmp_path / "merged") == dtype

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    expected = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    shards = sorted((tmp_path / "merged").glob("*.safetensors"))
    assert [s.name for s in shards] == sorted(s.name for s in model_dir.glob("*.safetensors")) and len(shards) > 2
    assert (tmp_path / "merged" / "model.safetensors.index.json").read_text() == \
        (model_dir / "model.safetensors.index.json").read_text()
    names = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as tensors:
            for name in tensors.keys():
                assert torch.equal(tensors.get_tensor(name), expected[name]), name
                names.add(name)
    assert any(".lora" not in n and "q_proj" in n for n in names)


MEMORY_PROBE = """
import json, sys
from pathlib import Path
from selfalign.stages.merge import merge_weights

def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024

open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set size (VmHWM)
before = rss("VmHWM")
merge_weights(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
print(json.dumps({"before": before, "peak": rss("VmHWM")}))
"""


def test_streaming_merge_holds_about_one_shard_in_memory(tmp_path):
    """A 400 MB model in 48 shards of 8 MB merges with a peak resident memory far below the model's
    size: the subprocess's high-water mark (reset just before the merge) grows by a few shards
    (~60 MB measured: the shard read, its merged copy, its serialisation, the allocator's slack)."""
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    model_dir.mkdir()
    adapter_dir.mkdir()
    generator, shards, width, adapter = torch.Generator().manual_seed(0), 48, 1024, {}
    for shard in range(shards):
        tensors = {f"model.layers.{shard}.mlp.{proj}.weight": torch.full((width, width), shard / shards)
                   for proj in ("up_proj", "down_proj")}
        save_file(tensors, str(model_dir / f"model-{shard:05d}-of-{shards:05d}.safetensors"), {"format": "pt"})
        for name in tensors:
            module = "base_model.model." + name.removesuffix(".weight")
            adapter[f"{module}.lora_A.weight"] = torch.randn(8, width, generator=generator)
            adapter[f"{module}.lora_B.weight"] = torch.randn(width, 8, generator=generator)
    (model_dir / "config.json").write_text("{}")
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(model_dir), str(adapter_dir),
                             str(tmp_path / "merged")], capture_output=True, text=True, check=True)
    memory = json.loads(result.stdout)
    grown = memory["peak"] - memory["before"]
    assert model_bytes > 400e6 and grown < model_bytes / 4, (grown, model_bytes)
    assert len(list((tmp_path / "merged").glob("*.safetensors"))) == shards
    assert (tmp_path / "merged" / "config.json").exists()
    with safe_open(str(tmp_path / "merged" / f"model-00003-of-{shards:05d}.safetensors"), "pt") as merged:
        name = "model.layers.3.mlp.up_proj.weight"
        module = "base_model.model.model.layers.3.mlp.up_proj"
        with safe_open(str(model_dir / f"model-00003-of-{shards:05d}.safetensors"), "pt") as base:
            expected = base.get_tensor(name) + adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"] * 2
        assert torch.equal(merged.get_tensor(name), expected)


def test_an_adapter_the_merge_cannot_fold_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "use_dora": True}))
    with pytest.raises(StageError, match="sets use_dora=True, which this merge does not fold"):
        merge.lora_factors(tmp_path)


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
