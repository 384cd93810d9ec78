"""instances.py without an engine: few-shot choice, prompts, both parsers, the Yes/No check and
Self-Instruct's post-processing of instances."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from selfalign.operator.spec import Sampling
from selfalign.stages.models.engines import TOO_LONG, Completion
from selfalign.stages.text.instances import (
    CLASSIFY_EXAMPLES,
    CLASSIFY_SAMPLING,
    MAX_INSTANCES,
    OUTPUT_FIRST_MAX_TOKENS,
    TASK_BOUNDARY,
    Instance,
    TaskInstances,
    balanced_examples,
    classify_prompt,
    clean_instances,
    classify_examples,
    generate_instances,
    instance_prompt,
    is_classification_answer,
    parse_input_first,
    parse_output_first,
)
from selfalign.stages.text.parsing import Task
from selfalign.stages.text.records import Seed


def seeds(classification: int, other: int) -> list[Seed]:
    return [Seed(f"c{i}", f"Label sentence {i}.", f"text {i}", "Positive", True)
            for i in range(classification)] + [
        Seed(f"g{i}", f"Write line {i}.", "", f"Line {i}.", False) for i in range(other)]


# --- few-shot examples and prompts ----------------------------------------------------------------


@pytest.mark.parametrize(("classification", "other", "expected_yes"), [
    (20, 20, CLASSIFY_EXAMPLES // 2),  # balanced
    (3, 20, 3),  # few classification seeds: the rest are not
    (0, 20, 0),  # Alpaca or chat seeds: no classification examples at all
    (20, 2, CLASSIFY_EXAMPLES - 2),  # few other seeds: classification fills up
])
def test_classification_examples_are_balanced_as_far_as_the_seeds_allow(classification, other,
                                                                       expected_yes):
    picked = balanced_examples(np.random.default_rng(0), seeds(classification, other),
                               CLASSIFY_EXAMPLES)
    assert len(picked) == CLASSIFY_EXAMPLES and len({s.id for s in picked}) == CLASSIFY_EXAMPLES
    assert sum(s.is_classification for s in picked) == expected_yes


def test_classification_examples_are_fixed_by_the_synthesize_seed():
    pool = seeds(20, 20)
    assert classify_examples(pool, 3) == classify_examples(pool, 3)
    assert classify_examples(pool, 3) != classify_examples(pool, 4)


def test_classify_prompt_shows_each_seed_with_its_answer_and_ends_at_the_question():
    examples = [Seed("a", "Is this   spam?", "", "No", True),
                Seed("b", "Write a poem:", "", "x", False)]
    prompt = classify_prompt(examples, "Tell if the review\nis positive.")
    assert ("Can the following task be regarded as a classification task with finite output "
            "labels?") in prompt
    assert ("Task: Is this spam?\nIs it classification? Yes\n\n"
            "Task: Write a poem\nIs it classification? No") in prompt
    assert prompt.endswith("\n\nTask: Tell if the review is positive.\nIs it classification?")


def few_shot_tasks(prompt: str) -> list[str]:
    """The prompt's example tasks, each with its lines, less the task left open at the end."""
    return prompt.split("\n\nTask: ")[1:-1]


def test_instance_prompts_show_several_instances_per_task_as_the_original_does():
    plain = instance_prompt("Multiply two\nnumbers:", classification=False)
    assert plain.endswith("\n\nTask: Multiply two numbers")
    shown = few_shot_tasks(plain)
    assert len(shown) >= 3 and "Class label:" not in plain
    assert sum(block.count("\nExample ") >= 2 for block in shown) >= 2  # several instances each
    assert any("\nInput:" not in block for block in shown)  # a task without input: output alone
    for block in shown:  # every example reads back through the stage's own parser
        instances, drops = parse_input_first(block.split("\n", 1)[1], truncated=False)
        assert instances and not drops and clean_instances(instances)[0] == instances
    labels = instance_prompt("Tell the sentiment.", classification=True)
    assert labels.endswith("\n\nTask: Tell the sentiment.")
    for block in few_shot_tasks(labels):
        instances, drops = parse_output_first(block.split("\n", 1)[1], truncated=False)
        assert len({i.output for i in instances}) >= 2 and not drops  # several labels covered


# --- parsers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("completion", "truncated", "instances", "drops"), [
    ("\nExample 1\nInput: 2 and 3\nOutput: 5\n\nExample 2\nInput: 1 and 1\nOutput: 2\n", False,
     [Instance("2 and 3", "5"), Instance("1 and 1", "2")], {}),
    ("\nExample 1\nOutput: A poem.\nTwo lines.\n\nExample 2\nOutput: Another.", False,
     [Instance("", "A poem.\nTwo lines."), Instance("", "Another.")], {}),
    ("\nOutput: No header.", False, [Instance("", "No header.")], {}),  # the header may be skipped
    ("\nExample 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOut", True,  # cut by the length limit
     [Instance("a", "b")], {"cut-instance": 1}),
    ("\nExample 1\nInput: a\nOutput: b\nExample 2\n", True, [Instance("a", "b")], {}),
    ("\nExample 1\nInput: only an input\n\nExample 2\nSure, here:\nOutput: x\n"
     "\nExample 3\nOutput: x\nOutput: y", False, [], {"unparsed-instance": 3}),
    ("zebra quantum", False, [], {"unparsed-instance": 1}),  # garbage
    ("zebra quantum", True, [], {"cut-instance": 1}),
    ("", False, [], {}),
])
def test_parse_input_first(completion, truncated, instances, drops):
    assert parse_input_first(completion, truncated) == (instances, Counter(drops))


@pytest.mark.parametrize(("completion", "truncated", "instances", "drops"), [
    ("\nClass label: Positive\nInput: I love it.\n\nClass label: Negative\nInput: Awful.\n", False,
     [Instance("I love it.", "Positive"), Instance("Awful.", "Negative")], {}),
    ("\nClass label: Yes\nClass label: No", False, [Instance("", "Yes"), Instance("", "No")], {}),
    ("\nClass label: Positive\nInput: Fine.\nClass label: Negative\nInp", True,
     [Instance("Fine.", "Positive")], {"cut-instance": 1}),
    # a preamble, a blank label, two inputs, a stray field
    ("Sure!\nClass label: \nInput: x\nClass label: A\nInput: y\nInput: z"
     "\nClass label: B\nOutput: q", False, [], {"unparsed-instance": 4}),
    ("zebra quantum", False, [], {"unparsed-instance": 1}),
    ("", True, [], {}),
])
def test_parse_output_first(completion, truncated, instances, drops):
    assert parse_output_first(completion, truncated) == (instances, Counter(drops))


@pytest.mark.parametrize(("answer", "classification"), [
    (" Yes", True), ("Yes\n", True), ("\n Yes, it", True), (" No", False), (" yes", False),
    ("", False), (" Maybe", False),
])
def test_classification_iff_the_answer_starts_with_yes(answer, classification):
    assert is_classification_answer(answer) is classification


# --- post-processing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("instances", "kept", "drops"), [
    ([Instance("a", "b")], [Instance("a", "b")], {}),
    ([Instance("same", "same"), Instance("a", "b")], [Instance("a", "b")],
     {"input-equals-output": 1}),
    ([Instance("a", ""), Instance("", "")], [], {"empty-output": 1, "input-equals-output": 1}),
    ([Instance("Input:", "b"), Instance("a", "Answer:"), Instance("c", "d")], [Instance("c", "d")],
     {"ends-with-colon": 2}),
    ([Instance("a", "b"), Instance("a", "c"), Instance("d", "e")], [],
     {"conflicting-outputs": 3}),  # one input, two outputs: the whole task goes
    ([Instance("", "b"), Instance("", "c")], [Instance("", "b"), Instance("", "c")], {}),
    ([Instance("a", "b"), Instance("a", "b"), Instance("", "c")],
     [Instance("a", "b"), Instance("", "c")], {"duplicate-instance": 1}),
    ([Instance(str(i), f"out {i}") for i in range(7)],
     [Instance(str(i), f"out {i}") for i in range(MAX_INSTANCES)],
     {"over-limit": 7 - MAX_INSTANCES}),
])
def test_post_processing_rules(instances, kept, drops):
    assert clean_instances(instances) == (kept, Counter(drops))


# --- steps 3-5 together, on canned completions ---------------------------------------------------


class CannedEngine:
    """Engine.generate's contract with fixed replies: one list of completions per call, in order."""

    def __init__(self, *replies: list[Completion]):
        self.replies = list(replies)
        self.calls: list[tuple[list[str], Sampling, list[str] | None]] = []

    def prompt(self, kind, text, answer_prefix=""):
        assert kind == "tasks"  # continued as documents, never chat turns (prompting.py)
        return text

    def generate(self, prompts, sampling, stop=None, desc=""):
        self.calls.append((list(prompts), sampling, stop))
        return self.replies.pop(0)


def test_each_task_is_checked_then_asked_for_instances_in_its_format():
    engine = CannedEngine(
        [Completion(" Yes", "length"), Completion(" No", "length"), Completion(" No", "length")],
        [Completion("\nExample 1\nInput: 2\nOutput: 4\nExample 2\nInput: 3\nOutput: 9\n"
                    "Example 3\nInput: 4\nOut", "length"),
         Completion("", TOO_LONG)],  # input-first first,
        [Completion("\nClass label: Good\nInput: Fine day.\nClass label: Bad\nInput: Rain.",
                    "stop")],  # then output-first
    )
    tasks = [Task("Rate the weather."), Task("Square the number."), Task("Write a long essay.")]
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=350)
    results, drops = generate_instances(engine, tasks, seeds(6, 6), sampling, seed=0)

    (checks, check_sampling, _), (plain, plain_sampling, stop), (labels, label_sampling, _) = (
        engine.calls)
    assert [p.splitlines()[-2:] for p in checks] == [
        [f"Task: {t.instruction}", "Is it classification?"] for t in tasks]
    assert check_sampling == CLASSIFY_SAMPLING and plain_sampling == sampling
    assert label_sampling == sampling.model_copy(update={"max_tokens": OUTPUT_FIRST_MAX_TOKENS})
    assert [p.rsplit("Task: ", 1)[1] for p in plain] == ["Square the number.", "Write a long essay."]
    assert len(labels) == 1 and "Class label:" in labels[0] and "Class label:" not in plain[0]
    assert TASK_BOUNDARY in stop
    assert results == [
        TaskInstances(True, (Instance("Fine day.", "Good"), Instance("Rain.", "Bad"))),
        TaskInstances(False, (Instance("2", "4"), Instance("3", "9"))),
        TaskInstances(False, ()),
    ]
    assert drops == Counter({"cut-instance": 1, TOO_LONG: 1})
