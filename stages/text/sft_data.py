"""Supervised fine-tuning data: kept Alpaca rows -> chat-formatted token ids with the prompt masked.

The loss covers only the response: every token the chat template renders for the prompt (and the
generation prompt that opens the assistant turn) gets label -100, as in the I-SHEEP and
Self-Instruct training scripts. The prompt and the response are tokenized separately, as
LLaMA-Factory does, so the mask boundary is exact even where a joint tokenization would merge
tokens across it. Base models without a chat template get PLAIN_CHAT_TEMPLATE (Alpaca's
"### Instruction / ### Response" layout), and it is saved with the adapter and the merged model,
so the next round generates with the format the model was trained on.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..runtime.context import StageError
from .records import RecordError

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass(frozen=True)
class EncodeCounts:
    examples: int  # examples that reached the trainer
    truncated: int  # responses cut to fit max_seq_length
    dropped: int  # prompts so long that no response token fits: nothing to learn from them
    tokens: int  # every token of the kept examples
    supervised_tokens: int  # tokens the loss covers


def alpaca_prompt(instruction: str, input_: str) -> str:
    """The user turn of an Alpaca row: the instruction, then its input (if any) after a blank line."""
    return f"{instruction}\n\n{input_}" if input_.strip() else instruction


def parse_kept(rows: Iterable[tuple[int, Any]], source: str) -> list[Example]:
    """Alpaca rows (instruction, input, output) -> examples; a bad row names source:line and field."""
    examples = []
    for line, row in rows:
        where = f"{source}:{line}"
        if not isinstance(row, dict):
            raise RecordError(f"{where}: expected an object with instruction, input, output")
        for field in ("instruction", "output"):
            value = row.get(field)
            if field not in row:
                raise RecordError(f"{where}: field '{field}': missing")
            if not isinstance(value, str) or not value.strip():
                raise RecordError(
                    f"{where}: field '{field}': expected a non-empty string, got {value!r:.60}")
        input_ = row.get("input") or ""
        if not isinstance(input_, str):
            raise RecordError(f"{where}: field 'input': expected a string, got {input_!r:.60}")
        examples.append(Example(alpaca_prompt(row["instruction"], input_), row["output"]))
    if not examples:
        raise RecordError(f"{source}: no examples: the kept data is empty")
    return examples


def ensure_chat_template(tokenizer) -> bool:
    """Give a base model's tokenizer the plain template (and a pad token); True if it had none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return True


def split_rendering(tokenizer, example: Example) -> tuple[str, str]:
    """(prompt text, response text) as the chat template renders the two-turn conversation."""
    user = [{"role": "user", "content": example.prompt}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": example.response}], tokenize=False)
    if not full.startswith(prompt):
        raise StageError("the chat template does not render the prompt as a prefix of the "
                         "conversation; prompt masking needs it to")
    return prompt, full[len(prompt):]


def encode(tokenizer, example: Example,
           max_seq_length: int) -> tuple[dict[str, list[int]] | None, bool]:
    """(input_ids, attention_mask, labels with the prompt masked; whether the response was cut).

    The feature is None when the prompt leaves no room for a single response token.
    """
    prompt, response = split_rendering(tokenizer, example)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    room = max_seq_length - len(prompt_ids)
    if room <= 0:
        return None, True
    ids = prompt_ids + response_ids[:room]
    feature = {"input_ids": ids, "attention_mask": [1] * len(ids),
               "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids[:room]}
    return feature, len(response_ids) > room


def encode_all(tokenizer, examples: list[Example], max_seq_length: int,
               *, progress: bool = True) -> tuple[list[dict[str, list[int]]], EncodeCounts]:
    """Encode every example; drop the ones with nothing left to learn after truncation."""
    features, truncated, dropped = [], 0, 0
    for example in tqdm(examples, desc="tokenize", unit="ex", disable=not progress):
        feature, cut = encode(tokenizer, example, max_seq_length)
        if feature is None:
            dropped += 1
            continue
        truncated += cut
        features.append(feature)
    if not features:
        raise StageError(f"every one of {len(examples)} examples has a prompt of max_seq_length "
                         f"({max_seq_length}) tokens or more: raise spec.train.maxSeqLength")
    counts = EncodeCounts(
        examples=len(features), truncated=truncated, dropped=dropped,
        tokens=sum(len(f["input_ids"]) for f in features),
        supervised_tokens=sum(sum(label != IGNORE_INDEX for label in f["labels"]) for f in features))
    return features, counts
