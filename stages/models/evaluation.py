"""Held-out loss: the mean per-token negative log-likelihood of reference outputs under a model.

The quantity training minimises, measured on data it never saw: each Alpaca row is rendered and
masked exactly as the train stage does it (`sft_data.encode`: chat template, prompt tokens
ignored, cut at train.maxSeqLength), and the loss is summed over every supervised token of the
set before dividing, so a long answer weighs by its tokens (as inside a training batch), not as one item.
Rows are right-padded, so a causal model's logits at real positions are those of the row alone,
and batched by length (the sum does not depend on the order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import cross_entropy
from torch.nn.utils.rnn import pad_sequence

from ..runtime import storage
from ..text.sft_data import IGNORE_INDEX, Example, encode_all, parse_kept

BATCH_SIZE = 4  # rows per forward pass: logits are batch x length x vocabulary floats


@dataclass(frozen=True)
class HeldOutLoss:
    nll: float  # mean negative log-likelihood per supervised token (nats)
    items: int  # rows measured (a row whose prompt alone fills maxSeqLength is left out)
    tokens: int  # supervised tokens


def read_heldout(uri: str) -> list[Example]:
    """The held-out Alpaca rows; a bad row names file:line and field."""
    return parse_kept(storage.iter_jsonl(uri), uri)


@torch.no_grad()
def mean_nll(model, tokenizer, examples: list[Example], max_seq_length: int,
             batch_size: int = BATCH_SIZE) -> HeldOutLoss:
    """Mean NLL per response token of `examples` under `model`, formatted as training formats them."""
    features, counts = encode_all(tokenizer, examples, max_seq_length, progress=False)
    features.sort(key=lambda row: len(row["input_ids"]))  # rows of like length share a batch: less padding
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        ids, mask, labels = (_padded(rows, key, pad) for key, pad in
                             (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)))
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        targets = labels[:, 1:].to(model.device)  # token t is predicted at position t - 1
        total += float(cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((targets != IGNORE_INDEX).sum())
    return HeldOutLoss(total / tokens, counts.examples, tokens)


def _padded(rows: list[dict[str, list[int]]], key: str, value: int) -> torch.Tensor:
    return pad_sequence([torch.tensor(row[key]) for row in rows], batch_first=True, padding_value=value)
