"""Self-Instruct steps 3-5 (METHODS.md 1.3-1.5): which new tasks are classification tasks, up to
five instances of each, and the clean-up of those instances.

Step 3 asks the model, few-shot and greedy, whether a task is a classification task. Step 4 asks
for instances: output-first for classification tasks (a class label, then an input of that class:
asked input-first, a model tends to write inputs of one class only), input-first for the others.
Step 5 drops bad instances, and whole tasks whose instances contradict each other.

The few-shot examples are the run's own seed tasks, drawn once per stage from
spec.synthesize.seed, so every prompt of a step shares its head and prefix caching reads it once.
Seed files without classification tasks (Alpaca and chat seeds have is_classification false)
degrade gracefully: the check then shows only "No" examples, which leans the model towards "No",
so fewer tasks go output-first; the output-first prompt shows non-classification seeds in the
output-first layout, which still teaches the format but not what a class label looks like.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selfalign.operator.spec import Sampling

from ..models.engines import TOO_LONG, Engine, template
from .filters import normalize_instruction
from .parsing import Task
from .prompting import TASKS
from .records import Seed

MAX_INSTANCES = 5  # per task, asked for and kept
CLASSIFY_EXAMPLES = 12  # seed tasks shown by the classification check, half of each kind
INSTANCE_EXAMPLES = 4  # seed tasks shown by an instance prompt
EXAMPLE_CHARS = 600  # longer seed instances are not shown: the shared head stays short
TASK_BOUNDARY = "\nTask:"  # where the next few-shot task would start: the model is done
INSTANCE_STOP = [TASK_BOUNDARY, f"Example {MAX_INSTANCES + 1}"]
CLASSIFY_SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_tokens=3)  # the original's decoding

_EXAMPLE_HEADER = re.compile(r"^[ \t]*Example[ \t]*\d+[ \t]*:?[ \t]*$", re.MULTILINE)
_INPUT_FIRST = re.compile(
    r"\s*(?:Input[ \t]*:(?P<input>.*?))?^[ \t]*Output[ \t]*:(?P<output>.*)", re.S | re.M
)
_CLASS_LABEL = re.compile(r"^[ \t]*Class label[ \t]*:", re.MULTILINE)
_INPUT_LINE = re.compile(r"^[ \t]*Input[ \t]*:", re.MULTILINE)
_FIELD_LINE = re.compile(r"^[ \t]*(?:Input|Output|Class label)[ \t]*:", re.MULTILINE)


@dataclass(frozen=True)
class Instance:
    input: str
    output: str


@dataclass(frozen=True)
class FewShot:
    """The seed tasks every prompt of one stage run shows."""

    classify: tuple[Seed, ...]
    input_first: tuple[Seed, ...]
    output_first: tuple[Seed, ...]


@dataclass(frozen=True)
class TaskInstances:
    classification: bool
    instances: tuple[Instance, ...]


# --- few-shot examples and prompts ----------------------------------------------------------------


def _sample(rng: np.random.Generator, pool: Sequence[Seed], count: int) -> list[Seed]:
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def balanced_examples(rng: np.random.Generator, seeds: Sequence[Seed], count: int) -> list[Seed]:
    """`count` seeds, half classification tasks and half not; the other kind fills a short side."""
    yes = [s for s in seeds if s.is_classification]
    no = [s for s in seeds if not s.is_classification]
    take_yes = min(len(yes), max(count // 2, count - len(no)))
    picked = _sample(rng, yes, take_yes) + _sample(rng, no, min(len(no), count - take_yes))
    rng.shuffle(picked)
    return picked


def matching_examples(
    rng: np.random.Generator, seeds: Sequence[Seed], count: int, classification: bool
) -> list[Seed]:
    """`count` short seeds of the prompt's kind; seeds of the other kind fill a short side."""
    short = [s for s in seeds if s.output.strip() and len(s.input) + len(s.output) <= EXAMPLE_CHARS]
    pool = short or list(seeds)
    same = [s for s in pool if s.is_classification == classification]
    other = [s for s in pool if s.is_classification != classification]
    picked = _sample(rng, same, min(count, len(same)))
    return picked + _sample(rng, other, min(count - len(picked), len(other)))


def few_shot(seeds: Sequence[Seed], seed: int) -> FewShot:
    rng = np.random.default_rng(seed)
    return FewShot(
        tuple(balanced_examples(rng, seeds, CLASSIFY_EXAMPLES)),
        tuple(matching_examples(rng, seeds, INSTANCE_EXAMPLES, classification=False)),
        tuple(matching_examples(rng, seeds, INSTANCE_EXAMPLES, classification=True)),
    )


def classify_prompt(examples: Sequence[Seed], instruction: str) -> str:
    shown = "\n\n".join(
        f"Task: {normalize_instruction(s.instruction)}\n"
        f"Is it classification? {'Yes' if s.is_classification else 'No'}"
        for s in examples
    )
    return template("self_instruct_classify.txt").format(
        examples=shown, instruction=normalize_instruction(instruction)
    )


def input_first_block(instance: Instance) -> str:
    """A seed's one instance, as the first example of its task."""
    given = f"\nInput: {instance.input.strip()}" if instance.input.strip() else ""
    return f"Example 1{given}\nOutput: {instance.output.strip()}"


def output_first_block(instance: Instance) -> str:
    given = f"\nInput: {instance.input.strip()}" if instance.input.strip() else ""
    return f"Class label: {instance.output.strip()}{given}"


def instance_prompt(shots: FewShot, instruction: str, classification: bool) -> str:
    """Output-first for a classification task, input-first otherwise; each seed shows its one
    instance. The model goes on after "Task: {instruction}" and stops at TASK_BOUNDARY."""
    examples = shots.output_first if classification else shots.input_first
    block = output_first_block if classification else input_first_block
    shown = "\n\n".join(
        f"Task: {normalize_instruction(s.instruction)}\n{block(Instance(s.input, s.output))}"
        for s in examples
    )
    name = "output_first" if classification else "input_first"
    return template(f"self_instruct_instances_{name}.txt").format(
        examples=shown, instruction=normalize_instruction(instruction)
    )


# --- reading the completions ----------------------------------------------------------------------


def is_classification_answer(text: str) -> bool:
    return text.strip().startswith("Yes")


def _complete_blocks(blocks: list[str], truncated: bool, drops: Counter) -> list[str]:
    """The non-blank blocks, less the last one when the length limit cut it."""
    if truncated and blocks:
        *blocks, cut = blocks
        if cut.strip():
            drops["cut-instance"] += 1
    return [b for b in blocks if b.strip()]


def parse_input_first(completion: str, truncated: bool) -> tuple[list[Instance], Counter]:
    """Instances of "Example k / Input: ... / Output: ..." blocks (Input optional; text before the
    first header is a block too, as the model may skip the header). A block must be exactly an
    optional input and one output, else it is counted as unparsed and skipped."""
    drops: Counter = Counter()
    instances = []
    for block in _complete_blocks(_EXAMPLE_HEADER.split(completion), truncated, drops):
        match = _INPUT_FIRST.fullmatch(block)
        if not match or _FIELD_LINE.search(match["output"]):
            drops["unparsed-instance"] += 1
            continue
        instances.append(Instance((match["input"] or "").strip(), match["output"].strip()))
    return instances, drops


def parse_output_first(completion: str, truncated: bool) -> tuple[list[Instance], Counter]:
    """Instances of "Class label: X / Input: ..." blocks (Input optional): the label is the output.
    Text before the first label is unparsed; so is a block with a blank label or another field."""
    drops: Counter = Counter()
    preamble, *blocks = _CLASS_LABEL.split(completion)
    if preamble.strip():
        drops["unparsed-instance"] += 1
    instances = []
    for block in _complete_blocks(blocks, truncated, drops):
        label, *given = _INPUT_LINE.split(block)
        if not label.strip() or len(given) > 1 or _FIELD_LINE.search("".join([label, *given])):
            drops["unparsed-instance"] += 1
            continue
        instances.append(Instance(given[0].strip() if given else "", label.strip()))
    return instances, drops


# --- post-processing ------------------------------------------------------------------------------

INVALID_INSTANCE_RULES = (
    ("input-equals-output", lambda i: i.input == i.output),
    ("empty-output", lambda i: not i.output),
    ("ends-with-colon", lambda i: i.input.endswith(":") or i.output.endswith(":")),
)


def clean_instances(instances: Sequence[Instance]) -> tuple[list[Instance], Counter]:
    """Step 5 for one task, on stripped instances: drop invalid ones; drop the whole task when a
    non-empty input has two different outputs (the original exempts empty inputs: an open task
    has many right outputs); exact-dedup; keep the first MAX_INSTANCES."""
    drops: Counter = Counter()
    valid = []
    for instance in instances:
        rule = next((name for name, bad in INVALID_INSTANCE_RULES if bad(instance)), None)
        if rule:
            drops[rule] += 1
        else:
            valid.append(instance)
    outputs: defaultdict[str, set[str]] = defaultdict(set)
    for instance in valid:
        if instance.input:
            outputs[instance.input].add(instance.output)
    if any(len(seen) > 1 for seen in outputs.values()):
        drops["conflicting-outputs"] += len(valid)  # every instance of the task
        return [], drops
    unique = list(dict.fromkeys(valid))
    if len(unique) < len(valid):
        drops["duplicate-instance"] += len(valid) - len(unique)
    if len(unique) > MAX_INSTANCES:
        drops["over-limit"] += len(unique) - MAX_INSTANCES
    return unique[:MAX_INSTANCES], drops


# --- on the engine --------------------------------------------------------------------------------


def generate_instances(
    engine: Engine, tasks: Sequence[Task], seeds: Sequence[Seed], sampling: Sampling, seed: int
) -> tuple[list[TaskInstances], Counter]:
    """Steps 3-5 for every task: one batched classification check, one batched instance call.
    Returns the instances of each task (in `tasks` order) and the count of dropped instances per
    cause."""
    shots = few_shot(seeds, seed)
    answers = engine.generate(
        [engine.prompt(TASKS, classify_prompt(shots.classify, t.instruction)) for t in tasks],
        CLASSIFY_SAMPLING,
        desc="classification check",
    )
    classification = [is_classification_answer(a.text) for a in answers]
    completions = engine.generate(
        [engine.prompt(TASKS, instance_prompt(shots, t.instruction, c))
         for t, c in zip(tasks, classification)],
        sampling,
        stop=INSTANCE_STOP,
        desc="instances",
    )
    drops: Counter = Counter()
    results = []
    for completion, is_classification in zip(completions, classification):
        if completion.finish_reason == TOO_LONG:
            drops[TOO_LONG] += 1
        parse = parse_output_first if is_classification else parse_input_first
        parsed, parse_drops = parse(completion.text, completion.truncated)
        kept, clean_drops = clean_instances(parsed)
        drops.update(parse_drops + clean_drops)
        results.append(TaskInstances(is_classification, tuple(kept)))
    return results, drops
