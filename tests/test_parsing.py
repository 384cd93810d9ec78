"""parsing.py on handwritten completions, well-formed and malformed."""

from __future__ import annotations

import json

import pytest

from selfalign.stages.text.parsing import (
    Task,
    alpaca_tasks,
    answer,
    json_object,
    numbered_instructions,
    questions,
)


def test_numbered_list_continues_after_the_prompts_last_number():
    completion = (
        " Write a haiku about   autumn leaves:\n10. Name three  prime numbers above 50.\n"
        "11 . Explain recursion to a child\n12.Not split without the space"
    )
    assert numbered_instructions(completion, truncated=False) == [
        "Write a haiku about autumn leaves",
        "Name three prime numbers above 50.",
        "Explain recursion to a child 12.Not split without the space",
    ]


def test_numbered_list_follows_its_own_numbering_in_any_common_format():
    completion = (
        " Plan a trip in three steps:\n1. Pick a place.\n2. Book it.\n"
        "10) Name a river.\nTask 11: Add two numbers.\n17. Not item twelve.\n12: Sort the list."
    )
    assert numbered_instructions(completion, truncated=False) == [
        "Plan a trip in three steps: 1. Pick a place. 2. Book it.",
        "Name a river.",
        "Add two numbers. 17. Not item twelve.",
        "Sort the list.",
    ]
    assert numbered_instructions(" A.\n4. B.\n5. C.", truncated=False, first_number=3) == ["A.", "B.", "C."]


def test_numbered_list_cut_by_the_length_limit_is_dropped_whole():
    assert numbered_instructions(" Sort the list.\n10. Reverse the", truncated=True) == []


@pytest.mark.parametrize("completion", ["", "   \n", "\n10. \n11. "])
def test_numbered_list_without_items(completion):
    assert numbered_instructions(completion, truncated=False) == []


ALPACA = (
    " Rewrite the sentence in the passive voice.\n6. Input:\nThe cat chased the mouse.\n###\n"
    "7. Instruction: What is the capital of Peru?\n7. Input:\n<noinput>\n###\n"
    "8. Instruction: An item without an input\n###\n"
    "9. Instruction: Numbered wrongly.\n10. Input:\nx\n###\n"
    "10. Instruction: Classify the review as positive or negative.\n"
    "10. Input:\nGreat food, slow service.\n10. Output: Negative\n"
    "11. Instruction: Summarise the text.\n11. Context: The river floods in May.\n###\n"
    "12. Instruction: Cut off in the mid"
)


def test_alpaca_tasks_read_each_well_formed_item():
    assert alpaca_tasks(ALPACA, first_number=6, truncated=True) == [
        Task("Rewrite the sentence in the passive voice.", "The cat chased the mouse."),
        Task("What is the capital of Peru?", ""),
        Task("An item without an input", ""),
        Task("Classify the review as positive or negative.", "Great food, slow service."),
        Task("Summarise the text.", "The river floods in May."),
    ]


def test_alpaca_last_chunk_is_kept_when_the_model_stopped_cleanly():
    completion = " Name a colour.\n6. Input:\n<noinput>\n###\n"
    completion += "7. Instruction: Add 2 and 3.\n7. Input:\n<noinput>"
    assert alpaca_tasks(completion, 6, truncated=False) == [
        Task("Name a colour."),
        Task("Add 2 and 3."),
    ]
    assert alpaca_tasks(completion, 6, truncated=True) == [Task("Name a colour.")]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        " \n###",
        " Twice\n6. Input:\na\n6. Input:\nb\n###",
        " Wrong field\n6. Answer:\nb\n###",
    ],
)
def test_alpaca_malformed_items_give_nothing(completion):
    assert alpaca_tasks(completion, 6, truncated=False) == []


def test_json_object_whole_fenced_or_embedded():
    assert json_object('{"a": 1}') == {"a": 1}
    assert json_object('Sure! ```json\n{"a": [1, 2]}\n``` hope this helps {"b": 2}') == {
        "a": [1, 2]
    }
    assert json_object('{"a": 1') is None
    assert json_object("no json here") is None
    assert json_object("[1, 2]") is None


def test_questions_as_strings_or_objects():
    assert questions('{"questions":["What is X?","Why does Y happen?"]}', limit=2) == [
        "What is X?",
        "Why does Y happen?",
    ]
    original_format = (
        '{"questions": [{"question": "What is X?"}, {"question": " What is X? "}, '
        '{"question": "How?"}]}'
    )
    assert questions(original_format, limit=5) == ["What is X?", "How?"]
    assert questions('{"questions":["a?","b?","c?"]}', limit=2) == ["a?", "b?"]


def test_a_question_label_before_the_question_is_removed():
    """Real SmolLM2 replies (examples/smol-aitp.yaml): the label is not part of the question, and a
    label alone is no question."""
    reply = json.dumps({"questions": ["Question: How many songs are included in The Reatards?", "Question 2:",
                                      "Second question: Will Narendra Modi win 400+ seat in L S 2019?"]})
    assert questions(reply, limit=5) == ["How many songs are included in The Reatards?",
                                         "Will Narendra Modi win 400+ seat in L S 2019?"]
    assert questions('{"questions": ["Questions about the text are listed here."]}', 1) == [
        "Questions about the text are listed here."]
    assert questions('{"questions": ["Question-answering systems: how do they rank passages?"]}', 1) == [
        "Question-answering systems: how do they rank passages?"]


@pytest.mark.parametrize(
    "completion",
    ['{"questions": "one"}', '{"questions":[1, null, " "]}', '{"q": []}', '{"questions":["cut', ""],
)
def test_malformed_questions(completion):
    assert questions(completion, limit=2) == []


def test_answer():
    assert answer('{"answer":" Step 1: add. Step 2: done. "}') == "Step 1: add. Step 2: done."
    assert answer('{"answer": ""}') is None
    assert answer('{"answer": 42}') is None
    assert answer('{"answer": "cut off') is None
