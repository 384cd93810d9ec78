"""Pure parsers of model completions: numbered lists (Self-Instruct), the Alpaca-style task list
(I-SHEEP) and the JSON replies of AITP rewriting. No I/O, no model: tested on handwritten text.

Every parser returns what it could read and nothing else; a malformed piece is skipped, never
guessed at, because a half-read instruction is worse training data than none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .filters import normalize_instruction

# Self-Instruct splits a completion on a newline, a number, an optional space and ". ".
_NUMBERED_ITEM = re.compile(r"\n\d+\s?\. ")
NOINPUT = "<noinput>"


@dataclass(frozen=True)
class Task:
    """An instruction with its (possibly empty) input, as a generation prompt produced it."""

    instruction: str
    input: str = ""


def numbered_instructions(completion: str, truncated: bool) -> list[str]:
    """Instructions of a Self-Instruct completion (the text after the prompt's final "9.").

    A completion cut by the length limit is dropped whole, as in the original: its last item is
    cut and the model was rambling. Items are whitespace-collapsed; empty items are skipped.
    """
    if truncated:
        return []
    items = (normalize_instruction(item) for item in _NUMBERED_ITEM.split(completion))
    return [item for item in items if item]


def alpaca_tasks(completion: str, first_number: int, truncated: bool) -> list[Task]:
    """Tasks of an I-SHEEP/Alpaca completion that continues "###\\n{first_number}. Instruction:".

    Chunks are separated by "###"; chunk k must read "{n}. Instruction: ... {n}. Input: ..." with
    n = first_number + k, else it is skipped. Only the last chunk of a length-cut completion is
    dropped (the Alpaca intent; I-SHEEP's code drops the last chunk of every completion, which
    throws away one good task per prompt when the model stopped cleanly).
    """
    chunks = f"{first_number}. Instruction:{completion}".split("###")
    if truncated:
        chunks = chunks[:-1]
    tasks = []
    for offset, chunk in enumerate(chunks):
        number = first_number + offset
        parts = re.split(rf"{number}\.\s+(Instruction|Input):", chunk)
        if len(parts) != 5 or parts[1] != "Instruction" or parts[3] != "Input":
            continue
        instruction = normalize_instruction(parts[2])
        input_ = parts[4].strip()
        if input_.lower() == NOINPUT:
            input_ = ""
        if instruction:
            tasks.append(Task(instruction, input_))
    return tasks


def json_object(completion: str) -> dict | None:
    """The first JSON object in `completion`: the whole text, else from the first "{" on.

    Structured output makes the whole text one object; the fallback reads replies that wrap it in
    prose or a code fence (engines without guided decoding). raw_decode stops at the object's end,
    so trailing text is ignored.
    """
    text = completion.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def questions(completion: str, limit: int) -> list[str]:
    """AITP step (a): {"questions": [...]}, items as strings or {"question": ...} (the original's
    format); blank and repeated questions are dropped; at most `limit`."""
    reply = json_object(completion)
    items = reply.get("questions") if reply else None
    if not isinstance(items, list):
        return []
    found: list[str] = []
    for item in items:
        text = item.get("question") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip() and text.strip() not in found:
            found.append(text.strip())
    return found[:limit]


def answer(completion: str) -> str | None:
    """AITP step (c): the "answer" string of {"answer": ...}, or None when absent or blank."""
    reply = json_object(completion)
    text = reply.get("answer") if reply else None
    return text.strip() if isinstance(text, str) and text.strip() else None
