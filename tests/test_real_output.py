"""The stages' parsers on real model output: SmolLM2-135M-Instruct's completions of every prompt
kind the stages send (tests/data/smollm2-completions.jsonl, recorded by bench/prompt_formats.py),
each with the parse a reader expects."""
import json
from pathlib import Path

import pytest

from selfalign.stages.text import parsing
from selfalign.stages.text.instances import clean_instances, is_classification_answer, parse_input_first

CORPUS = [json.loads(line) for line in
          (Path(__file__).parent / "data" / "smollm2-completions.jsonl").read_text().splitlines()]


def parse(kind: str, text: str, truncated: bool):
    """What the stage takes from a completion of `kind` (prompts as bench/prompt_formats.py built
    them: Self-Instruct lists end at item 9, I-SHEEP's at item 5)."""
    if kind == "self-instruct":
        return parsing.numbered_instructions(text, truncated, first_number=9)
    if kind == "isheep":
        return [[t.instruction, t.input] for t in parsing.alpaca_tasks(text, 6, truncated)]
    if kind == "classify":
        return is_classification_answer(text)
    if kind == "instances":
        found, _ = parse_input_first(text, truncated)
        return [[i.input, i.output] for i in clean_instances(found)[0]]
    if kind == "aitp-questions":
        return parsing.questions(text, 2)
    if kind == "aitp-answer":
        return parsing.answer(text)
    raise AssertionError(kind)


@pytest.mark.parametrize("row", CORPUS, ids=[f"{r['kind']}: {r['case']}" for r in CORPUS])
def test_a_real_completion_parses_as_a_reader_reads_it(row):
    assert parse(row["kind"], row["text"], row["finish"] != "stop") == row["expected"]


def test_the_corpus_covers_every_prompt_kind_and_both_forms():
    assert {r["kind"] for r in CORPUS} == {"self-instruct", "isheep", "classify", "instances",
                                           "aitp-questions", "aitp-answer"}
    assert {r["form"] for r in CORPUS} == {"raw", "chat"}
    assert any(r["finish"] == "length" for r in CORPUS)
