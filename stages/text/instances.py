"""Self-Instruct steps 3-5 (METHODS.md 1.3-1.5): which new tasks are classification tasks, up to
five instances of each, and the clean-up of those instances.

Step 3 asks the model, few-shot and greedy, whether a task is a classification task; its examples
are the run's own seed tasks, drawn once per stage from spec.synthesize.seed, so every prompt of
the step shares its head and prefix caching reads it once. Seed files without classification tasks
(Alpaca and chat seeds have is_classification false) lean the check towards "No".

Step 4 asks for instances: output-first for classification tasks (a class label, then an input of
that class: asked input-first, a model tends to write inputs of one class only), input-first for
the others. As in the original's templates, the few-shot tasks show several instances each (a
seed has only one, and a prompt of one-instance examples gets one instance back), so they are
fixed, hand-written tasks in the prompt files; decoding is the original's: greedy, presence
penalty 1.5, 350 tokens (300 output-first).
Step 5 drops bad instances, and whole tasks whose instances contradict each other.
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
OUTPUT_FIRST_MAX_TOKENS = 300  # the original's limit for classification tasks (350 for the others)
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


def classify_examples(seeds: Sequence[Seed], seed: int) -> tuple[Seed, ...]:
    """The classification check's examples, fixed by the synthesize seed."""
    return tuple(balanced_examples(np.random.default_rng(seed), seeds, CLASSIFY_EXAMPLES))


def classify_prompt(examples: Sequence[Seed], instruction: str) -> str:
    shown = "\n\n".join(
        f"Task: {normalize_instruction(s.instruction)}\n"
        f"Is it classification? {'Yes' if s.is_classification else 'No'}"
        for s in examples
    )
    return template("self_instruct_classify.txt").format(
        examples=shown, instruction=normalize_instruction(instruction)
    )


def instance_prompt(instruction: str, classification: bool) -> str:
    """Output-first for a classification task, input-first otherwise. The model goes on after
    "Task: {instruction}" and stops at TASK_BOUNDARY."""
    name = "output_first" if classification else "input_first"
    return template(f"self_instruct_instances_{name}.txt").format(
        instruction=normalize_instruction(instruction)
    )


def output_first_sampling(sampling: Sampling) -> Sampling:
    """The instance decoding for classification tasks: their label-input pairs are shorter."""
    return sampling.model_copy(update={"max_tokens": min(sampling.max_tokens, OUTPUT_FIRST_MAX_TOKENS)})


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
    """Steps 3-5 for every task: one batched classification check, then one batched instance call
    per kind (input-first, output-first). Returns the instances of each task (in `tasks` order) and the count of dropped instances per
    cause."""
    examples = classify_examples(seeds, seed)
    answers = engine.generate(
        [engine.prompt(TASKS, classify_prompt(examples, t.instruction)) for t in tasks],
        CLASSIFY_SAMPLING,
        desc="classification check",
    )
    classification = [is_classification_answer(a.text) for a in answers]
    completions = {}
    for kind, kind_sampling in ((False, sampling), (True, output_first_sampling(sampling))):
        chosen = [i for i, c in enumerate(classification) if c == kind]
        found = engine.generate(
            [engine.prompt(TASKS, instance_prompt(tasks[i].instruction, kind)) for i in chosen],
            kind_sampling,
            stop=INSTANCE_STOP,
            desc="instances, output-first" if kind else "instances",
        ) if chosen else []
        for i, completion in zip(chosen, found):
            completions[i] = completion
    drops: Counter = Counter()
    results = []
    for index, is_classification in enumerate(classification):
        completion = completions[index]
        if completion.finish_reason == TOO_LONG:
            drops[TOO_LONG] += 1
        parse = parse_output_first if is_classification else parse_input_first
        parsed, parse_drops = parse(completion.text, completion.truncated)
        kept, clean_drops = clean_instances(parsed)
        drops.update(parse_drops + clean_drops)
        results.append(TaskInstances(is_classification, tuple(kept)))
    return results, drops
