"""Merge stage: fold the round's LoRA adapter into its model, giving the next round's model.

    python -m selfalign.stages merge --spec spec.json --round K --run-uri URI --model URI

Runs in its own process (a ZeRO-3 trained model cannot be merged where it was partitioned): load
the model the adapter was trained on (train.from: base | previous) and the adapter, record the
adapter model's logits on a probe batch (the round's first kept examples), `merge_and_unload`,
save safetensors shards + tokenizer + chat template + generation config, reload what was saved.
Two checks, each against spec.merge.tolerance, fail the stage before anything is uploaded, so a
broken merge never becomes models/round-<K+1>/: the merge itself (merged vs adapter logits, both
float32) and the save (every tensor in the written shards vs the merged weights). The
weights are saved in the model's own dtype, which is what the next round loads; what rounding to
that dtype costs (adapter vs reloaded) is recorded, not judged: for bf16 it is far above any
tolerance that would catch a wrong merge.

With spec.evaluate, the held-out loss (evaluation.py) of the model this round generated with (M_K)
and of the saved merged model (M_{K+1}, as the next round loads it) goes into the summary, so the
planner can stop a run that got worse (evaluate.stopWhenWorse).
"""
from __future__ import annotations

import logging
import shutil
from itertools import islice
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from selfalign.operator.lineage import model_uri

from .runtime import storage
from .runtime.context import StageContext, StageError, StageOutcome
from .models.evaluation import mean_nll, read_heldout
from .text.sft_data import Example, parse_kept, split_rendering

log = logging.getLogger(__name__)

PROBE_EXAMPLES = 8
MAX_SHARD_SIZE = "5GB"  # the Hugging Face Hub's shard size: loaders fetch shards in parallel


def run(ctx: StageContext) -> StageOutcome:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = storage.local_path(ctx.model, ctx.scratch)
    adapter_dir = storage.local_path(f"{ctx.stage_out(ctx.round, 'train')}/adapter", ctx.scratch)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # with the chat template it trained on
    kept = f"{ctx.stage_out(ctx.round, 'assess')}/kept.jsonl"
    probe = probe_batch(tokenizer, probe_examples(kept)).to(device)
    heldout = read_heldout(ctx.spec.evaluate.data) if ctx.spec.evaluate else []  # bad rows fail here

    model, save_dtype = _adapter_model(model_dir, adapter_dir, device)
    adapter_logits = logits(model, probe)
    with model.disable_adapter():
        adapter_effect = max_abs_diff(adapter_logits, logits(model, probe), probe["attention_mask"])
    merged = model.merge_and_unload()
    mask, examples = probe["attention_mask"], probe["input_ids"].shape[0]
    tolerance = ctx.spec.merge.tolerance
    diff = max_abs_diff(adapter_logits, logits(merged, probe), mask)
    _check(diff, tolerance, f"merged model disagrees with the adapter model on {examples} probe examples")

    out = Path(ctx.scratch) / "merge" / f"round-{ctx.round + 1}"
    shutil.rmtree(out, ignore_errors=True)
    merged = merged.to(save_dtype)
    merged.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    round_trip = saved_weights_diff(merged.state_dict(), out)
    _check(round_trip, tolerance, f"the saved shards differ from the merged {save_dtype} weights")
    del model, merged
    reloaded = _load(out, device)
    rounding = max_abs_diff(adapter_logits, logits(reloaded, probe), mask)
    evaluation = held_out_losses(ctx, heldout, tokenizer, reloaded, device)
    log.info("merge checked max_abs_logit_diff=%.3g round_trip=%.3g dtype_rounding=%.3g tolerance=%g "
             "adapter_effect=%.3g probe=%d", diff, round_trip, rounding, tolerance, adapter_effect, examples)

    merged_uri = model_uri(ctx.spec, ctx.run_uri, ctx.round + 1)
    storage.upload_dir(out, merged_uri)
    files = sorted(p.name for p in out.iterdir())
    return StageOutcome(
        summary={"model": merged_uri, "maxAbsLogitDiff": diff, **evaluation},
        outputs={"model": merged_uri},
        metrics={"maxAbsLogitDiff": diff, "saveRoundTripDiff": round_trip, "dtypeRoundingDiff": rounding,
                 "tolerance": tolerance, "adapterEffect": adapter_effect,
                 "probeExamples": int(probe["input_ids"].shape[0]),
                 "probeTokens": int(probe["attention_mask"].sum()),
                 "dtype": str(save_dtype).removeprefix("torch."),
                 "shards": sum(name.endswith(".safetensors") for name in files), "files": files,
                 **evaluation},
    )


def held_out_losses(ctx: StageContext, examples: list[Example], tokenizer, merged, device: str) -> dict:
    """evalLossBefore (M_K), evalLossAfter (M_{K+1}), evalItems, evalTokens; {} without held-out rows.

    Both models read the rows through the adapter's tokenizer: the chat template training used."""
    if not examples:
        return {}
    limit = ctx.spec.train.max_seq_length
    after = mean_nll(merged, tokenizer, examples, limit)
    before_dir = storage.local_path(model_uri(ctx.spec, ctx.run_uri, ctx.round), ctx.scratch)
    before = mean_nll(_load(before_dir, device), tokenizer, examples, limit)
    log.info("held-out loss before=%.4f after=%.4f items=%d tokens=%d", before.nll, after.nll,
             after.items, after.tokens)
    return {"evalLossBefore": before.nll, "evalLossAfter": after.nll, "evalItems": after.items,
            "evalTokens": after.tokens}


def saved_weights_diff(expected: dict[str, torch.Tensor], folder: Path) -> float:
    """Largest |saved - expected| over every tensor in the safetensors shards of `folder`.

    Compares weights, not logits: a reload in another dtype recomputes buffers such as rotary
    frequencies, which would blur an exact check of what was written."""
    worst, compared = 0.0, 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as tensors:
            for name in tensors.keys():
                if name not in expected:
                    raise StageError(f"saved shard {shard.name} holds {name!r}, which the merged model lacks")
                saved = tensors.get_tensor(name).float()
                worst = max(worst, float((saved - expected[name].detach().float().cpu()).abs().max()))
                compared += 1
    if not compared:
        raise StageError(f"no safetensors shards were written to {folder}")
    return worst


def _check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise StageError(f"{what}: max abs logit diff {diff:.3g} > spec.merge.tolerance {tolerance:g}")


def probe_examples(kept_uri: str) -> list[Example]:
    """The first kept examples: the merged model must agree with the adapter on the round's data."""
    return parse_kept(islice(storage.iter_jsonl(kept_uri), PROBE_EXAMPLES), kept_uri)


def probe_batch(tokenizer, examples):
    """Prompt + response as the chat template renders them, right-padded into one batch."""
    texts = ["".join(split_rendering(tokenizer, example)) for example in examples]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest |a - b| over real (unpadded) positions."""
    real = attention_mask.bool()
    return float((a[real] - b[real]).abs().max())


def _load(model_dir: Path, device: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


def _adapter_model(model_dir: Path, adapter_dir: Path, device: str):
    """(the model with the adapter in float32, the dtype the model's checkpoint is stored in)."""
    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None) or torch.float32
    if isinstance(stored, str):
        stored = getattr(torch, stored)
    return PeftModel.from_pretrained(_load(model_dir, device), adapter_dir), stored
