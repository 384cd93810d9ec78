"""filters.py: every rule rejects its positive case and lets its near-miss negative case through."""
from __future__ import annotations

import pytest

from selfalign.stages.text.filters import (
    RULES,
    instruction_rejection,
    normalize_instruction,
    response_rejection,
)

SI, ISHEEP = ("self-instruct",), ("isheep",)
BOTH = ("self-instruct", "isheep")

# (rule, families, instruction, input, rejected?)
INSTRUCTION_CASES = [
    ("too-few-words", SI, "Name three fruits", "", True),
    ("too-few-words", SI, "Name three red fruits.", "", False),
    ("too-few-words", ISHEEP, "   ", "", True),
    ("too-many-words", SI, "word " * 151, "", True),
    ("too-many-words", SI, "word " * 150, "", False),
    ("blacklisted-word", SI, "Describe the attached image in detail.", "", True),
    ("blacklisted-word", SI, "Tell me how to GO TO the station.", "", True),
    ("blacklisted-word", SI, "Describe the imagery of this poem.", "", False),  # whole words only
    ("blacklisted-word", SI, "Write a short song about music lovers.", "", False),  # not a Self-Instruct word
    ("blacklisted-word", ISHEEP, "Write a short song about music lovers.", "", True),
    ("blacklisted-word", SI, "Summarize the passage below please.", "a map of Paris", False),  # input unchecked
    ("blacklisted-word", ISHEEP, "Summarize the passage below please.", "a map of Paris", True),
    ("write-a-program", SI, "Write a program that sorts numbers.", "", True),
    ("write-a-program", SI, "write a program that sorts numbers.", "", True),
    ("write-a-program", SI, "Write a poem about a programmer.", "", False),
    ("write-a-program", ISHEEP, "Write a program that sorts numbers.", "", False),  # not an I-SHEEP rule
    ("starts-with-punctuation", SI, "- List four kinds of trees.", "", True),
    ("starts-with-punctuation", SI, "List four kinds of trees.", "", False),
    ("starts-non-ascii", ISHEEP, "Éxplain how tides work here.", "", True),
    ("starts-non-ascii", ISHEEP, "Explain how tides work in Érd.", "", False),
    ("noinput", ISHEEP, "Give an example of a simile.", "<noinput>", True),
    ("noinput", ISHEEP, "Give an example of a simile.", "No input needed", True),
    ("noinput", ISHEEP, "Give an example of a simile.", "", False),
    ("noinput", SI, "Give an example of a simile.", "<noinput>", False),
    ("field-marker", ISHEEP, "Classify the sentiment. 7. Input: great", "", True),
    ("field-marker", ISHEEP, "Classify the sentiment of the text.", "great. Output: positive", True),
    ("field-marker", ISHEEP, "Classify the sentiment of the text.", "Output: positive", False),
    ("url", ISHEEP, "Summarize the page at https://example.com now.", "", True),
    ("url", ISHEEP, "Summarize the page about the HTTP protocol.", "", False),
]


@pytest.mark.parametrize("rule, families, instruction, input, rejected", INSTRUCTION_CASES)
def test_instruction_rule(rule, families, instruction, input, rejected):
    assert instruction_rejection(instruction, input, families) == (rule if rejected else None)


def test_instruction_rules_run_in_methods_order():
    # Short and blacklisted and punctuated: the first rule in METHODS.md's order names it.
    assert instruction_rejection("- draw it", "", BOTH) == "too-few-words"
    assert instruction_rejection("- Draw a cat please.", "", BOTH) == "blacklisted-word"
    assert instruction_rejection("Write a program: see https://x.org", "", BOTH) == "write-a-program"


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown rule families"):
        instruction_rejection("Name three red fruits.", "", ["alpaca"])


EXPLAIN = "Explain photosynthesis to a child briefly."

# (rule, instruction, input, output, rejected?)
RESPONSE_CASES = [
    ("role-marker", EXPLAIN, "", "Sugar.\nUser: thanks", True),
    ("role-marker", EXPLAIN, "", "Sugar for the user: plants.", False),
    ("answer-choices", EXPLAIN, "", "Answer Choices: sugar or salt", True),
    ("answer-choices", EXPLAIN, "", "The choices a plant makes are few.", False),
    ("noinput-in-output", EXPLAIN, "", "There is noinput here, so sugar.", True),
    ("noinput-in-output", EXPLAIN, "", "There is no further detail, so sugar.", False),
    ("follow-up-question", EXPLAIN, "", "Plants make sugar.\n\nCan you name one plant?", True),
    ("follow-up-question", EXPLAIN, "", "Plants make sugar. Do you want to know more?", True),
    ("follow-up-question", EXPLAIN, "", "Plants make sugar, as you may know if you do your homework.", False),
    ("multiple-choice", EXPLAIN, "", "The answer is B. Sugar.", True),
    ("multiple-choice", EXPLAIN, "", "Pick (c) sugar.", True),
    ("multiple-choice", EXPLAIN, "", "Plants make sugars, e.g. glucose.", False),
    ("cjk", EXPLAIN, "", "Plants make sugar 糖.", True),
    ("cjk", EXPLAIN, "", "Plants make sugar (sucre).", False),
    ("empty-output", EXPLAIN, "", "  \n", True),
    ("empty-output", EXPLAIN, "", "Sugar.", False),
    ("placeholder-in-prompt", EXPLAIN, "None", "Sugar.", True),
    ("placeholder-in-prompt", EXPLAIN, "Nonetheless, be brief.", "Sugar.", False),
    ("tag-in-prompt", "Explain <topic> briefly.", "", "Sugar.", True),
    ("tag-in-prompt", "Explain why 3 < 4 and 5 > 2.", "", "Because.", True),
    ("tag-in-prompt", "Explain why 3 is less than 4.", "", "Because.", False),
    ("input-in-instruction", "Translate 'bonjour' to English.", "bonjour", "Hello.", True),
    ("input-in-instruction", "Translate the word to English.", "bonjour", "Hello.", False),
    ("input-in-instruction", "Translate the word to English.", " ", "Hello.", False),
]


@pytest.mark.parametrize("rule, instruction, input, output, rejected", RESPONSE_CASES)
def test_response_rule(rule, instruction, input, output, rejected):
    assert response_rejection(instruction, input, output) == (rule if rejected else None)


def test_a_clean_item_passes_every_rule():
    assert instruction_rejection(EXPLAIN, "", BOTH) is None
    assert response_rejection(EXPLAIN, "", "Plants turn light, water and CO2 into sugar and oxygen.") is None


def test_every_rule_has_cases_and_a_stable_name():
    tested = {case[0] for case in INSTRUCTION_CASES} | {case[0] for case in RESPONSE_CASES}
    assert tested == set(RULES)
    assert len(RULES) == len(set(RULES))


@pytest.mark.parametrize("raw, normalized", [
    ("  Sort\tthe\n list:  ", "Sort the list"),
    ("Answer this: ", "Answer this"),
    ("Already clean.", "Already clean."),
])
def test_normalize_instruction(raw, normalized):
    assert normalize_instruction(raw) == normalized
