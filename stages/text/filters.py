"""The rule filters of Self-Instruct and I-SHEEP (METHODS.md 1.2, 2.1 and 2.3), as pure functions.

Each rule has a stable name: assess counts rejections per name in its manifest, and a rejected
row carries the name of the first rule it failed. Where the original code over-matches by accident,
the rule does what it was written for; each such place is marked "Fix:".
ROUGE-L near-duplicate removal is the last instruction filter of both methods; it lives in dedup.py.
"""
from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

FAMILIES = ("self-instruct", "isheep")

_SELF_INSTRUCT_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                        "map", "maps", "draw", "plot", "go to")
_ISHEEP_WORDS = _SELF_INSTRUCT_WORDS + ("video", "audio", "music", "flowchart", "diagram")


def _whole_words(words: Sequence[str]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)


_SELF_INSTRUCT_BLACKLIST = _whole_words(_SELF_INSTRUCT_WORDS)
_ISHEEP_BLACKLIST = _whole_words(_ISHEEP_WORDS)
_NOINPUT = re.compile(r"noinput|no input", re.IGNORECASE)
_INSTRUCTION_FIELD = re.compile(r".\s+(?:Instruction|Input):")
_INPUT_FIELD = re.compile(r".\s+(?:Instruction|Input|Output):")
_URL = re.compile(r"https?:")

_ROLE_MARKER = re.compile(r"\n(?:assistant|system|human|question|output|user)[:\n]", re.IGNORECASE)
_ANSWER_CHOICES = re.compile(r"Answer\sChoices:", re.IGNORECASE)
# Fix: the original's `do you .{1,50}?` is a lazy quantifier, not a question mark, so it rejected
# every response containing "do you"; the intent (a question back to the user) needs a literal "?".
_FOLLOW_UP = re.compile(r"\n\n?can you|do you .{1,50}\?|\n\n.{1,100}\?", re.IGNORECASE)
# Fix: "e.g." is not an answer option; the original's `\b[A-Ea-e]\.` rejected it.
_CHOICE_LETTER = re.compile(r"\b[A-Ea-e]\.(?!g\.)|\([A-Ea-e]\)")
_CJK = re.compile(r"[\u4e00-\u9fff]")
# Fix: the original matched "none" anywhere ("nonetheless", "nonexistent"); the placeholder is a word.
_PLACEHOLDER = re.compile(r"noinput|no input|\bnone\b", re.IGNORECASE)
_TAG = re.compile(r"<.{1,20}>")


def normalize_instruction(text: str) -> str:
    """Whitespace collapsed, stripped, trailing ":" removed: how Self-Instruct shows an instruction."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def _words(instruction: str, input: str, families: Sequence[str]) -> bool:
    """Self-Instruct checks the instruction; I-SHEEP adds five words and checks the input too."""
    if "isheep" in families:
        return bool(_ISHEEP_BLACKLIST.search(instruction) or _ISHEEP_BLACKLIST.search(input))
    return bool(_SELF_INSTRUCT_BLACKLIST.search(instruction))


def _in_prompt(pattern: re.Pattern) -> Callable[..., bool]:
    """A rule that rejects when `pattern` occurs in the instruction or in the input."""
    return lambda instruction, input, *_: bool(pattern.search(instruction) or pattern.search(input))


def _in_output(pattern: re.Pattern) -> Callable[..., bool]:
    return lambda instruction, input, output: bool(pattern.search(output))


# (name, the families that apply it, test(instruction, input, families) -> reject?), in order.
InstructionRule = tuple[str, frozenset[str], Callable[[str, str, Sequence[str]], bool]]
_BOTH, _ISHEEP = frozenset(FAMILIES), frozenset({"isheep"})
INSTRUCTION_RULES: tuple[InstructionRule, ...] = (
    ("too-few-words", _BOTH, lambda inst, *_: len(inst.split()) <= 3),
    ("too-many-words", _BOTH, lambda inst, *_: len(inst.split()) > 150),
    ("blacklisted-word", _BOTH, _words),
    # The original compares after str.capitalize(), so the check is case-insensitive.
    ("write-a-program", frozenset({"self-instruct"}),
     lambda inst, *_: inst.lower().startswith("write a program")),
    ("starts-with-punctuation", _BOTH, lambda inst, *_: inst[0] in string.punctuation),
    ("starts-non-ascii", _BOTH, lambda inst, *_: not inst[0].isascii()),
    ("noinput", _ISHEEP, _in_prompt(_NOINPUT)),
    ("field-marker", _ISHEEP,
     lambda inst, inp, _: bool(_INSTRUCTION_FIELD.search(inst) or _INPUT_FIELD.search(inp))),
    ("url", _ISHEEP, _in_prompt(_URL)),
)

# (name, test(instruction, input, output) -> reject?), in order.
RESPONSE_RULES: tuple[tuple[str, Callable[[str, str, str], bool]], ...] = (
    ("role-marker", _in_output(_ROLE_MARKER)),
    ("answer-choices", _in_output(_ANSWER_CHOICES)),
    ("noinput-in-output", _in_output(_NOINPUT)),
    ("follow-up-question", _in_output(_FOLLOW_UP)),
    ("multiple-choice", _in_output(_CHOICE_LETTER)),
    ("cjk", _in_output(_CJK)),
    ("empty-output", lambda inst, inp, out: not out.strip()),
    ("placeholder-in-prompt", _in_prompt(_PLACEHOLDER)),
    ("tag-in-prompt", _in_prompt(_TAG)),
    ("input-in-instruction", lambda inst, inp, out: bool(inp.strip()) and inp in inst),
)

RULES: tuple[str, ...] = tuple(rule[0] for rule in INSTRUCTION_RULES + RESPONSE_RULES)
# What AITP rewrites are checked by: a question's shape, never the keyword lists (assess.py). A
# 135M model's "questions" were often identifiers, file paths or labels ("response_0",
# "./../*/nonpolar_molecules.json", "List of questions"), which the judge did not tell apart.
SHAPE_RULES = frozenset({"too-few-words", "too-many-words", "starts-with-punctuation", "starts-non-ascii"})


def instruction_rejection(instruction: str, input: str, families: Sequence[str]) -> str | None:
    """The name of the first instruction rule of `families` that rejects the pair, else None.

    The instruction is normalized first (as both originals do before filtering).
    """
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown rule families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    instruction = normalize_instruction(instruction)
    for name, applies_to, rejects in INSTRUCTION_RULES:
        if applies_to.intersection(families) and rejects(instruction, input, families):
            return name
    return None


def question_rejection(question: str) -> str | None:
    """The name of the first shape rule (SHAPE_RULES) that rejects an AITP question, else None."""
    question = normalize_instruction(question)
    for name, _, rejects in INSTRUCTION_RULES:
        if name in SHAPE_RULES and rejects(question, "", ()):
            return name
    return None


def response_rejection(instruction: str, input: str, output: str) -> str | None:
    """The name of the first I-SHEEP response rule that rejects the triple, else None."""
    for name, rejects in RESPONSE_RULES:
        if rejects(instruction, input, output):
            return name
    return None
