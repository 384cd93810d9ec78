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

NOINPUT = "<noinput>"
INPUT_FIELDS = ("Input", "Context", "Text", "Example", "Data")  # what real models call the input


@dataclass(frozen=True)
class Task:
    """An instruction with its (possibly empty) input, as a generation prompt produced it."""

    instruction: str
    input: str = ""


def _item_start(number: int) -> re.Pattern:
    """Where item `number` of a numbered list starts: a line "10. ", "10) ", "10 . " or
    "Task 10: " (formats SmolLM2 and others write)."""
    return re.compile(rf"\n[ \t]*(?:Task[ \t]+)?{number}[ \t]?[.):](?=\s|$)[ \t]*")


def numbered_instructions(completion: str, truncated: bool, first_number: int = 9) -> list[str]:
    """Instructions of a Self-Instruct completion (the text after the prompt's final
    "{first_number}.").

    Items follow the list's own numbering: after item 9 only "10" starts an item, so a number
    inside an item (a step list, "17. ...") stays part of it, where the original's split on any
    "\n<number>. " would cut it into pieces. A reply that starts a list of its own ("1. ...", as
    chat replies do, often echoing the prompt's tasks, which synthesize's ROUGE-L filter removes)
    follows its own numbering. A completion cut by the length limit is dropped whole, as in the
    original: its last item is cut and the model was rambling. Items are whitespace-collapsed;
    empty items are skipped.
    """
    if truncated:
        return []
    items, rest, number = [], completion, first_number + 1
    if restart := re.match(r"\s*(?:Task[ \t]+)?(\d+)[ \t]?[.):](?=\s|$)[ \t]*", completion):
        rest, number = completion[restart.end():], int(restart.group(1)) + 1
    while match := _item_start(number).search(rest):
        items.append(rest[: match.start()])
        rest, number = rest[match.end():], number + 1
    items.append(rest)
    first = number - len(items)  # the number of items[0]
    found = (  # "1. 1. Task": a chat reply that numbers its echo of the prompt's list twice
        normalize_instruction(re.sub(rf"^\s*{first + i}[.)]\s+", "", item)) for i, item in enumerate(items)
    )
    return [item for item in found if item]


_FIELD_LINE = re.compile(r"^[ \t]*(\d+)[ \t]*\.[ \t]*([A-Za-z][A-Za-z ]*?)[ \t]*:", re.MULTILINE)


def _alpaca_task(number: int, body: str) -> Task | None:
    """One "{number}. Instruction: ..." item, or None when malformed. The input is the field
    "{number}. Input:" (or another INPUT_FIELDS name) and may be missing; a "{number}. Output:"
    the model added after it is ignored; any other field line makes the item malformed."""
    fields = list(_FIELD_LINE.finditer(body))
    instruction = normalize_instruction(body[: fields[0].start()] if fields else body)
    input_ = ""
    if fields:
        first = fields[0]
        if int(first.group(1)) != number or first.group(2) not in INPUT_FIELDS:
            return None
        end = len(body)
        if len(fields) > 1:
            second = fields[1]
            if int(second.group(1)) != number or second.group(2) != "Output":
                return None
            end = second.start()
        input_ = body[first.end(): end].strip()
    if input_.lower() == NOINPUT:
        input_ = ""
    return Task(instruction, input_) if instruction else None


def alpaca_tasks(completion: str, first_number: int, truncated: bool) -> list[Task]:
    """Tasks of an I-SHEEP/Alpaca completion that continues "###\\n{first_number}. Instruction:".

    Items follow the numbering: item n + 1 starts at the line "{n + 1}. Instruction:" (after "###"
    or not: real models drop it), and an item ends at "###" (what follows it up to the next item is
    not the item's). Only a length-cut completion's last item without its "###" is dropped (the
    Alpaca intent; I-SHEEP's code drops the last item of every completion, which throws away one
    good task per prompt when the model stopped cleanly).
    """
    bodies, rest, number = [], completion, first_number
    while match := re.search(rf"(?:^|\n)[ \t]*(?:###\s*)?{number + 1}[ \t]*\.[ \t]*Instruction[ \t]*:", rest):
        bodies.append(rest[: match.start()])
        rest, number = rest[match.end():], number + 1
    bodies.append(rest)
    tasks = []
    for offset, body in enumerate(bodies):
        item, ended, _ = body.partition("###")
        if truncated and not ended and offset == len(bodies) - 1:
            break  # the item the length limit cut
        task = _alpaca_task(first_number + offset, item.strip())
        if task:
            tasks.append(task)
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


# Placeholders of a format example: shown one ({"questions": ["first question", ...]}), a small
# model copies it as its reply, so the AITP prompts (prompts/aitp_*.txt) describe the JSON instead
# of showing it; replies recorded from prompts that showed it (tests/data/) are still read right.
PLACEHOLDERS = ("first question", "second question", "your answer")


def _letters(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalpha())


def _content(text: object) -> str | None:
    """`text` stripped, or None when it is not content: blank, a template placeholder echoed (or a
    "{{variable}}" of the model's own), or the debris of a reply forced into JSON (a string that
    opens with "]" or "}" where the model wanted to close the object)."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    if text[0] in "]}" or "{{" in text or _letters(text) in {_letters(p) for p in PLACEHOLDERS}:
        return None
    return text


# A label a small model puts before the question itself: "Question: ...", "Second question: ...".
_QUESTION_LABEL = re.compile(r"^(?:(?:first|second|third|\d+(?:st|nd|rd|th)?)\s+)?question\s*\d*\s*[:.)]\s*",
                             re.IGNORECASE)


def questions(completion: str, limit: int) -> list[str]:
    """AITP step (a): {"questions": [...]}, items as strings or {"question": ...} (the original's
    format), a leading "Question N:" label removed; blank, echoed, debris and repeated questions
    are dropped; at most `limit`."""
    reply = json_object(completion)
    items = reply.get("questions") if reply else None
    if not isinstance(items, list):
        return []
    found: list[str] = []
    for item in items:
        text = item.get("question") if isinstance(item, dict) else item
        text = _content(_QUESTION_LABEL.sub("", text.strip()) if isinstance(text, str) else text)
        if text and text not in found:
            found.append(text)
    return found[:limit]


def answer(completion: str) -> str | None:
    """AITP step (c): the "answer" string of {"answer": ...}, or None when absent, blank or the
    template's placeholder echoed."""
    reply = json_object(completion)
    return _content(reply.get("answer") if reply else None)
