"""Merge stage: fold the round's LoRA adapter into its model, giving the next round's model.

    python -m selfalign.stages merge --spec spec.json --round K --run-uri URI --model URI

Runs in its own process (a ZeRO-3 trained model cannot be merged where it was partitioned). The
merge streams: for each safetensors shard of the model the adapter was trained on (train.from:
base | previous), every LoRA target becomes W + scale * B @ A computed in float32 and cast back to
the shard's dtype, and the shard is written under the same name; the index and the other non-weight
files are copied, the tokenizer (with the chat template it trained on) comes from the adapter. Peak
memory is about one shard plus the adapter, whatever the model's size.

Then a check on a probe (the round's first kept examples, cut at train.maxSeqLength), one example
per forward pass, logits kept on the CPU: the base model with the adapter (PEFT, float32) gives the
adapter's logits A and, adapter disabled, the base's B; the saved model, reloaded in float32, gives
M. Before anything is uploaded, so a broken merge never becomes models/round-<K+1>/, the stage fails
- when a float32 model's M differs from A by more than spec.merge.tolerance (a wrong merge), and
- when the share of the adapter's logit change A - B that the stored weights keep, the projection
  <M - B, A - B> / |A - B|^2, is under MIN_EFFECT_KEPT: an update below the stored dtype's
  precision (bf16 keeps ~3 significant digits; the weights are already on its grid, so an update
  under half a step rounds back exactly) is lost, and the next round would train from the same
  model. A projection, not a ratio of largest changes: rounding noise is uncorrelated with the
  adapter's change and averages out of it.
For a bf16 model max|M - A| is what rounding costs: recorded, not judged.

With spec.evaluate, the held-out loss (evaluation.py) of the model this round generated with (M_K)
and of the saved merged model (M_{K+1}, as the next round loads it) goes into the summary, so the
planner can stop a run that got worse (evaluate.stopWhenWorse).
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.operator.lineage import model_uri

from .runtime import storage
from .runtime.context import StageContext, StageError, StageOutcome
from .models.evaluation import mean_nll, read_heldout
from .text.sft_data import Example, parse_kept, split_rendering

log = logging.getLogger(__name__)

PROBE_EXAMPLES = 8
# A merged model must keep at least this share of the adapter's logit change (Agreement.effect_kept):
# with less, rounding to the stored dtype undid most of the round's training. Measured (2026-12-02):
# SmolLM2-135M in bf16 after 2 and 4 LoRA steps at lr 4e-4 (examples/smol.yaml's settings) keeps
# 46% and 61%; an update 100x below the tiny model's test adapter keeps 11%, 1,000x 0%.
MIN_EFFECT_KEPT = 0.25
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}  # the unmerged weights: never copied
# adapter_config.json fields that, when set, change how LoRA folds in (the train stage sets none)
UNSUPPORTED_LORA = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                    "lora_bias")


@dataclass(frozen=True)
class Agreement:
    """Largest logit differences on the probe's real tokens."""
    merged_vs_adapter: float  # max|M - A|: the merge's error, plus rounding to the stored dtype
    adapter_effect: float  # max|A - B| in float32: what the adapter changes
    merged_effect: float  # max|M - B|: what the stored weights change
    effect_kept: float  # <M - B, A - B> / |A - B|^2: the share of the adapter's change they keep


def run(ctx: StageContext) -> StageOutcome:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Setup is the download only: the merge streams the weights, so loading them is the work.
    with ctx.setup("download"):
        model_dir = storage.local_path(ctx.model, ctx.scratch)
        adapter_dir = storage.local_path(f"{ctx.stage_out(ctx.round, 'train')}/adapter", ctx.scratch)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # with the chat template it trained on
    kept = f"{ctx.stage_out(ctx.round, 'assess')}/kept.jsonl"
    probe = probe_ids(tokenizer, probe_examples(kept), ctx.spec.train.max_seq_length)
    heldout = read_heldout(ctx.spec.evaluate.data) if ctx.spec.evaluate else []  # bad rows fail here

    out = Path(ctx.scratch) / "merge" / f"round-{ctx.round + 1}"
    shutil.rmtree(out, ignore_errors=True)
    dtype = merge_weights(model_dir, adapter_dir, out, device)
    tokenizer.save_pretrained(out)

    offload = Path(ctx.scratch) / "offload"
    adapted, base = reference_logits(model_dir, adapter_dir, probe, offload)
    merged = _load(out, offload)
    agreement = compare(adapted, base, probe_logits(merged, probe))
    tolerance = ctx.spec.merge.tolerance
    check(agreement, dtype, tolerance, len(probe))
    evaluation = held_out_losses(ctx, heldout, tokenizer, merged, offload)
    log.info("merge checked max_abs_logit_diff=%.3g adapter_effect=%.3g merged_effect=%.3g effect_kept=%.3f "
             "dtype=%s tolerance=%g probe=%d", agreement.merged_vs_adapter, agreement.adapter_effect,
             agreement.merged_effect, agreement.effect_kept, dtype, tolerance, len(probe))

    merged_uri = model_uri(ctx.spec, ctx.run_uri, ctx.round + 1)
    storage.upload_dir(out, merged_uri)
    files = sorted(p.name for p in out.iterdir())
    diff = agreement.merged_vs_adapter
    return StageOutcome(
        summary={"model": merged_uri, "maxAbsLogitDiff": diff, **evaluation},
        outputs={"model": merged_uri},
        metrics={"maxAbsLogitDiff": diff, "tolerance": tolerance,
                 "adapterEffect": agreement.adapter_effect, "mergedEffect": agreement.merged_effect,
                 "effectKept": agreement.effect_kept,
                 "probeExamples": len(probe), "probeTokens": sum(map(len, probe)),
                 "dtype": str(dtype).removeprefix("torch."),
                 "shards": sum(name.endswith(".safetensors") for name in files), "files": files,
                 **evaluation},
    )


def merge_weights(model_dir: Path, adapter_dir: Path, out: Path, device: str = "cpu") -> torch.dtype:
    """Write `model_dir` with the adapter folded in to `out`, shard by shard; the weights' dtype.

    Hand-written rather than PEFT's merge_and_unload, which needs the whole model in memory; it is
    the same arithmetic (tests/test_merge.py compares the two): W + (B @ A) * scale in float32."""
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise StageError(f"merge reads safetensors shards; {model_dir} has none")
    deltas = lora_factors(adapter_dir)
    out.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(path, out / path.name)
    pending, dtype = set(deltas), None
    for shard in shards:
        with safe_open(str(shard), framework="pt") as reader:
            tensors = {}
            for name in reader.keys():
                tensor = reader.get_tensor(name)
                if name in deltas:
                    tensor = _folded(tensor, *deltas[name], device)
                    pending.discard(name)
                    dtype = tensor.dtype
                tensors[name] = tensor
            metadata = reader.metadata() or {"format": "pt"}
        save_file(tensors, str(out / shard.name), metadata=metadata)
        del tensors
    if pending:
        raise StageError(f"the adapter targets weights the model's shards lack: {sorted(pending)[:3]}")
    return dtype


def lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{model weight name: (A, B, scale)} from a PEFT LoRA adapter folder."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for field in UNSUPPORTED_LORA:
        if config.get(field):
            raise StageError(f"adapter_config.json sets {field}={config[field]!r}, "
                             "which this merge does not fold")
    rank = config["r"] ** 0.5 if config.get("use_rslora") else config["r"]
    scale = config["lora_alpha"] / rank
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = {}
    for key, a in weights.items():
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise StageError(f"the adapter holds {key!r}; this merge folds only LoRA A/B of linear layers")
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        factors[f"{module}.weight"] = (a, weights[key.replace(".lora_A.", ".lora_B.")], scale)
    if not factors:
        raise StageError(f"{adapter_dir} holds no LoRA weights")
    return factors


def _folded(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
            device: str) -> torch.Tensor:
    delta = (b.to(device, torch.float32) @ a.to(device, torch.float32)) * scale
    return (weight.to(device, torch.float32) + delta).to(weight.dtype).cpu()


def reference_logits(model_dir: Path, adapter_dir: Path, probe: list[list[int]], offload: Path):
    """(logits with the adapter, logits without it) of the float32 model the adapter was trained on."""
    model = PeftModel.from_pretrained(_load(model_dir, offload), adapter_dir)
    adapted = probe_logits(model, probe)
    with model.disable_adapter():
        base = probe_logits(model, probe)
    del model
    gc.collect()  # the float32 weights go before the merged model loads
    return adapted, base


def compare(adapted, base, merged) -> Agreement:
    def largest(xs, ys):
        return max(float((x - y).abs().max()) for x, y in zip(xs, ys, strict=True))
    change = sum(float((a - b).double().square().sum()) for a, b in zip(adapted, base, strict=True))
    kept = sum(float(((m - b).double() * (a - b).double()).sum())
               for m, a, b in zip(merged, adapted, base, strict=True))
    return Agreement(largest(merged, adapted), largest(adapted, base), largest(merged, base),
                     kept / change if change else 1.0)


def check(agreement: Agreement, dtype: torch.dtype, tolerance: float, examples: int) -> None:
    diff = agreement.merged_vs_adapter
    if dtype == torch.float32 and not diff <= tolerance:  # also catches NaN
        raise StageError(f"merged model disagrees with the adapter model on {examples} probe examples: "
                         f"max abs logit diff {diff:.3g} > spec.merge.tolerance {tolerance:g}")
    if not agreement.effect_kept >= MIN_EFFECT_KEPT:
        raise StageError(
            f"the adapter's effect is lost to rounding to {str(dtype).removeprefix('torch.')}: the merged "
            f"weights keep {agreement.effect_kept:.0%} of its change of the probe logits (up to "
            f"{agreement.adapter_effect:.3g} in float32), under {MIN_EFFECT_KEPT:.0%}; its update is below "
            f"the stored precision")


def held_out_losses(ctx: StageContext, examples: list[Example], tokenizer, merged, offload: Path) -> dict:
    """evalLossBefore (M_K), evalLossAfter (M_{K+1}), evalItems, evalTokens; {} without held-out rows.

    Both models read the rows through the adapter's tokenizer: the chat template training used."""
    if not examples:
        return {}
    limit = ctx.spec.train.max_seq_length
    after = mean_nll(merged, tokenizer, examples, limit)
    before_dir = storage.local_path(model_uri(ctx.spec, ctx.run_uri, ctx.round), ctx.scratch)
    before = mean_nll(_load(before_dir, offload), tokenizer, examples, limit)
    log.info("held-out loss before=%.4f after=%.4f items=%d tokens=%d", before.nll, after.nll,
             after.items, after.tokens)
    return {"evalLossBefore": before.nll, "evalLossAfter": after.nll, "evalItems": after.items,
            "evalTokens": after.tokens}


def probe_examples(kept_uri: str) -> list[Example]:
    """The first kept examples: the merged model must agree with the adapter on the round's data."""
    return parse_kept(islice(storage.iter_jsonl(kept_uri), PROBE_EXAMPLES), kept_uri)


def probe_ids(tokenizer, examples: list[Example], max_length: int) -> list[list[int]]:
    """Prompt + response as the chat template renders them, cut at train.maxSeqLength as training cuts."""
    texts = ["".join(split_rendering(tokenizer, example)) for example in examples]
    return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


@torch.no_grad()
def probe_logits(model, probe: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits per example, one forward pass each (no padding) and moved to the CPU: a
    150K-token vocabulary makes a batch's logits gigabytes."""
    model.eval()
    return [model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu()
            for ids in probe]


def _load(model_dir: Path, offload: Path):
    """The model in float32, placed by accelerate over the GPUs, then the CPU, then `offload`."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="auto",
                                                offload_folder=str(offload))
