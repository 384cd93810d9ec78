"""synthesize: new instructions (Self-Instruct or I-SHEEP), their answers, AITP rewrites of gaps.

    python -m selfalign.stages synthesize --spec spec.json --round K --run-uri URI --model M_K

Reads the seeds, every earlier round's assess/kept.jsonl (the machine-generated pool) and, when
round K-1's coverage stage left them, its gaps.jsonl. Writes candidates.jsonl (with provenance:
for Self-Instruct one row per instance of a new task, instances.py; for I-SHEEP and AITP one row
per instruction with its response) and, for `inverse` seed sampling, seed_perplexity.jsonl.
METHODS.md sections 1.1-1.5, 2.1-2.2 and 3.5 say what each step follows.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .text import parsing
from .runtime import storage
from .assess import earlier_kept
from .runtime.context import StageContext, StageError, StageOutcome
from .text.dedup import RougeDeduper
from .models.engines import TOO_LONG, Engine, open_engine, template
from .text.filters import instruction_rejection, normalize_instruction
from .text.instances import generate_instances
from .text.parsing import Task
from .text.prompting import RESPONSE, REWRITE, TASKS, Prompt
from .text.records import Candidate, RecordError, Seed, load_seeds

log = logging.getLogger(__name__)

SELF_INSTRUCT_STOP = ["\n\n", "\n16", "16.", "16 ."]  # the original's stop sequences
ISHEEP_TASKS = 20  # "come up with a set of 20 diverse task instructions"
FIRST_BATCH_YIELD = 8.0  # accepted instructions per prompt assumed before any were measured
MIN_YIELD = 0.05  # a batch never asks for more than remaining / MIN_YIELD prompts
# Machine tasks join the prompts only between batches (Self-Instruct shows 2 of them in each), so
# an uncapped first batch of a 52K-task round would be ~7K prompts of seeds alone.
MAX_BATCH = 1024
QUESTION_CHARS = (10, 500)  # an AITP question is a sentence or two, not an essay
EMPTY_COMPLETION = {
    "length": "truncated-completion",
    TOO_LONG: TOO_LONG,
}  # why a completion gave nothing


@dataclass(frozen=True)
class Generated:
    task: Task
    seed_ids: tuple[str, ...]


@dataclass(frozen=True)
class Answered:
    """An instruction with its answer and provenance: a candidate before the stage numbers it."""

    instruction: str
    input: str
    output: str
    origin: str
    seed_ids: tuple[str, ...] = ()
    source_doc_id: str | None = None


@dataclass(frozen=True)
class Rewrite:
    doc_id: str
    question: str
    answer: str


@dataclass(frozen=True)
class GapDoc:
    id: str
    text: str


def run(ctx: StageContext) -> StageOutcome:
    spec, syn = ctx.spec, ctx.spec.synthesize
    seeds = load_seeds(spec.seeds)  # before the engine starts: a bad file fails in a second
    machine = machine_pool(earlier_kept(ctx))
    gaps = read_gaps(ctx)
    with ctx.setup("download"):
        model_dir = storage.local_path(ctx.model, ctx.scratch)
    with ctx.setup("load"):
        engine = open_engine(model_dir, spec, spec.resources.synthesize.gpus, syn.seed)
    outputs, metrics = {}, {}

    weights = None
    if syn.seed_sampling == "inverse":
        perplexities = engine.perplexities([seed_text(s) for s in seeds], desc="seed perplexity")
        weights = inverse_perplexity_weights(perplexities)
        outputs["seedPerplexity"] = f"{ctx.out}/seed_perplexity.jsonl"
        storage.write_jsonl(
            outputs["seedPerplexity"],
            ({"id": s.id, "perplexity": p} for s, p in zip(seeds, perplexities)),
        )
        metrics["seedPerplexity"] = {
            "min": min(perplexities),
            "median": float(np.median(perplexities)),
            "max": max(perplexities),
        }

    generated, rejections, prompts = generate_instructions(
        engine, spec, seeds, machine, weights, ctx.round
    )
    rewrites, rewrite_drops = rewrite_gaps(engine, spec, gaps)
    answered, answer_metrics, answer_summary = answer_instructions(engine, spec, seeds, generated)
    answered += [
        Answered(rw.question, "", rw.answer, "aitp", source_doc_id=rw.doc_id) for rw in rewrites
    ]

    sampling = {
        "instruction": syn.instruction_sampling.model_dump(by_alias=True),
        "response": syn.response_sampling.model_dump(by_alias=True),
        "seed": syn.seed,
    }
    candidates = [
        Candidate(
            f"r{ctx.round}-{i:06d}",
            a.instruction,
            a.input,
            a.output,
            a.origin,
            ctx.round,
            ctx.model,
            seed_ids=a.seed_ids,
            source_doc_id=a.source_doc_id,
            sampling=sampling,
        )
        for i, a in enumerate(answered)
    ]
    if not candidates:
        raise StageError(
            f"no candidates after {prompts} prompts and {len(gaps)} gap documents (rejections: "
            f"{dict(rejections.most_common(5))}): raise synthesize.maxPrompts, loosen "
            "assess.rules, or check that the model continues the prompt format"
        )
    outputs["candidates"] = f"{ctx.out}/candidates.jsonl"
    storage.write_jsonl(outputs["candidates"], (c.to_json() for c in candidates))

    metrics.update(rejections=dict(rejections), rewriteDrops=dict(rewrite_drops), **answer_metrics)
    summary = {
        "generated": len(candidates),
        "prompts": prompts,
        "instructions": len(generated),
        "target": syn.instructions_per_round,
        "rewritten": len(rewrites),
        "gapDocs": len(gaps),
        "rejected": sum(rejections.values()),
        **answer_summary,
    }
    log.info("synthesize done %s", " ".join(f"{k}={v}" for k, v in summary.items()))
    return StageOutcome(summary=summary, outputs=outputs, metrics=metrics)


# --- instructions ---------------------------------------------------------------------------------


def machine_pool(kept_rows: Sequence[dict]) -> list[Task]:
    """Earlier rounds' kept tasks, one per instruction (its first row): Self-Instruct keeps up to
    five instances of a task, and the pool holds tasks, each as likely to be shown as any other."""
    tasks: dict[str, Task] = {}
    for row in kept_rows:
        tasks.setdefault(row["instruction"], Task(row["instruction"], row.get("input", "")))
    return list(tasks.values())


def seed_text(seed: Seed) -> str:
    """What a generation prompt shows of a seed, so its perplexity is that of the shown example."""
    return f"{seed.instruction}\n{seed.input}" if seed.input else seed.instruction


def inverse_perplexity_weights(perplexities: Sequence[float]) -> np.ndarray:
    """I-SHEEP's `inverse` weights, 1/ppl (its guard: 1 when ppl is ~0), normalised to sum to 1."""
    weights = np.array([1.0 / p if p > 1e-5 else 1.0 for p in perplexities])
    return weights / weights.sum()


def sample_examples(
    rng: np.random.Generator,
    seeds: Sequence[Seed],
    machine: Sequence[Task],
    seed_weights: np.ndarray | None,
    seed_count: int,
    machine_count: int,
) -> tuple[list[Task], list[str]]:
    """Examples for one prompt: `machine_count` from the pool (uniform, as Self-Instruct), seeds for
    the rest (weighted when given), without replacement, shuffled. Returns (tasks, seed ids)."""
    from_machine = min(machine_count, len(machine))
    from_seeds = min(seed_count + machine_count - from_machine, len(seeds))
    picked_seeds = rng.choice(len(seeds), size=from_seeds, replace=False, p=seed_weights)
    picked_machine = (
        rng.choice(len(machine), size=from_machine, replace=False) if from_machine else []
    )
    examples = [(Task(seeds[i].instruction, seeds[i].input), seeds[i].id) for i in picked_seeds]
    examples += [(machine[i], None) for i in picked_machine]
    rng.shuffle(examples)
    return [task for task, _ in examples], [sid for _, sid in examples if sid is not None]


def self_instruct_prompt(examples: Sequence[Task]) -> str:
    tasks = "\n".join(
        f"{i}. {normalize_instruction(t.instruction)}" for i, t in enumerate(examples, 1)
    )
    return template("self_instruct.txt").format(tasks=tasks, next=len(examples) + 1)


def isheep_total(examples: int) -> int:
    """How many tasks the meta-prompt asks for: 20, or one more than it shows."""
    return max(ISHEEP_TASKS, examples + 1)


def isheep_prompt(examples: Sequence[Task]) -> str:
    """The Alpaca-style meta-prompt; examples are numbered 1..n and the model goes on at n+1."""
    tasks = "".join(
        f"###\n{i}. Instruction: {normalize_instruction(t.instruction)}\n"
        f"{i}. Input:\n{t.input or parsing.NOINPUT}\n"
        for i, t in enumerate(examples, 1)
    )
    return template("isheep_meta.txt").format(
        total=isheep_total(len(examples)), tasks=tasks, next=len(examples) + 1
    )


def next_batch_size(remaining: int, accepted: int, prompts_used: int, max_prompts: int) -> int:
    """Prompts for the next batch: enough for the remaining target at the yield seen so far."""
    rate = accepted / prompts_used if prompts_used else FIRST_BATCH_YIELD
    wanted = math.ceil(remaining / max(rate, MIN_YIELD))
    wanted += wanted // 10  # a margin, so a batch rarely falls just short
    return max(1, min(wanted, MAX_BATCH, max_prompts - prompts_used))


def generate_instructions(
    engine: Engine,
    spec,
    seeds: Sequence[Seed],
    machine: list[Task],
    seed_weights: np.ndarray | None,
    round_: int,
) -> tuple[list[Generated], Counter, int]:
    """Ask in batches until instructionsPerRound instructions pass the filters or maxPrompts
    is spent.

    Each item passes the instruction rules of spec.assess.rules, then ROUGE-L against the seeds,
    the earlier rounds' kept instructions and everything accepted so far (Self-Instruct's pool).
    Returns (accepted, rejections per rule, prompts used).
    """
    syn = spec.synthesize
    self_instruct = spec.recipe == "self-instruct"
    rng = np.random.default_rng([syn.seed, round_])
    deduper = RougeDeduper(
        spec.assess.dedup.rouge_l, [s.instruction for s in seeds] + [t.instruction for t in machine]
    )
    machine = list(machine)
    accepted: list[Generated] = []
    rejections: Counter = Counter()
    used = 0
    bar = tqdm(total=syn.instructions_per_round, desc="instructions", unit="inst")
    while len(accepted) < syn.instructions_per_round and used < syn.max_prompts:
        size = next_batch_size(
            syn.instructions_per_round - len(accepted), len(accepted), used, syn.max_prompts
        )
        shown = [
            sample_examples(
                rng, seeds, machine, seed_weights, syn.seed_examples, syn.machine_examples
            )
            for _ in range(size)
        ]
        if self_instruct:
            prompts = [engine.prompt(TASKS, self_instruct_prompt(examples)) for examples, _ in shown]
            completions = engine.generate(
                prompts,
                syn.instruction_sampling,
                stop=SELF_INSTRUCT_STOP,
                desc="instruction prompts",
            )
            parsed = [
                [Task(i) for i in parsing.numbered_instructions(c.text, c.truncated, len(ex) + 1)]
                for c, (ex, _) in zip(completions, shown)
            ]
        else:
            shown_count = len(shown[0][0])  # the same for every prompt of a batch
            completions = engine.generate(
                [engine.prompt(TASKS, isheep_prompt(examples)) for examples, _ in shown],
                syn.instruction_sampling,
                stop=[f"\n{isheep_total(shown_count) + 1}."],
                desc="instruction prompts",
            )
            parsed = [
                parsing.alpaca_tasks(c.text, len(examples) + 1, c.truncated)
                for c, (examples, _) in zip(completions, shown)
            ]
        used += size
        for completion, tasks, (_, seed_ids) in zip(completions, parsed, shown):
            if not tasks:
                rejections[EMPTY_COMPLETION.get(completion.finish_reason, "nothing-parsed")] += 1
            for task in tasks:
                if len(accepted) == syn.instructions_per_round:
                    break
                rule = instruction_rejection(task.instruction, task.input, spec.assess.rules)
                if rule is None and not deduper.offer(task.instruction):
                    rule = "rouge-l-duplicate"
                if rule:
                    rejections[rule] += 1
                    continue
                accepted.append(Generated(task, tuple(seed_ids)))
                machine.append(task)
                bar.update(1)
        bar.set_postfix(prompts=used, rejected=sum(rejections.values()))
    bar.close()
    if len(accepted) < syn.instructions_per_round:
        log.warning(
            "instruction target not reached accepted=%d target=%d prompts=%d max_prompts=%d",
            len(accepted),
            syn.instructions_per_round,
            used,
            syn.max_prompts,
        )
    return accepted, rejections, used


# --- AITP rewriting of coverage gaps --------------------------------------------------------------


def read_gaps(ctx: StageContext) -> list[GapDoc]:
    """Round K-1's gap documents (rows with id, text, optional domain), at most gapDocsPerRound."""
    limit = ctx.spec.coverage.gap_docs_per_round
    if ctx.round == 0 or limit == 0:
        return []
    uri = f"{ctx.stage_out(ctx.round - 1, 'coverage')}/gaps.jsonl"
    if not storage.exists(uri):
        return []
    docs = []
    for line, row in storage.iter_jsonl(uri):
        for name in ("id", "text"):
            if (
                not isinstance(row.get(name), (str, int))
                or isinstance(row.get(name), bool)
                or not str(row[name]).strip()
            ):
                raise RecordError(
                    f"{uri}:{line}: field '{name}': missing or not a non-empty string"
                )
        docs.append(GapDoc(str(row["id"]), row["text"]))
        if len(docs) == limit:
            break
    return docs


def questions_schema(count: int) -> dict:
    low, high = QUESTION_CHARS
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["questions"],
        "properties": {
            "questions": {
                "type": "array",
                "minItems": count,
                "maxItems": count,
                "items": {"type": "string", "minLength": low, "maxLength": high},
            }
        },
    }


ANSWER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["answer"],
    "properties": {"answer": {"type": "string", "minLength": 1}},
}


def rewrite_gaps(engine: Engine, spec, docs: Sequence[GapDoc]) -> tuple[list[Rewrite], Counter]:
    """AITP: self-contained questions per document (JSON), then an answer to each with the
    document as background (JSON). Structured output keeps the JSON well-formed; a reply cut by
    the length limit is incomplete and dropped. Returns (rewrites, drops per cause)."""
    syn = spec.synthesize
    drops: Counter = Counter()
    if not docs:
        return [], drops
    count = syn.questions_per_gap_doc
    asked = engine.generate(
        [
            engine.prompt(
                REWRITE, template("aitp_questions.txt").format(count=count, document=d.text)
            )
            for d in docs
        ],
        syn.instruction_sampling,
        json_schema=questions_schema(count),
        desc="gap questions",
    )
    pairs = []
    for doc, reply in zip(docs, asked):
        found = [] if reply.truncated else parsing.questions(reply.text, count)
        if not found:
            drops[reply.finish_reason if reply.truncated else "questions-unparsed"] += 1
        pairs += [(doc, question) for question in found]
    answered = engine.generate(
        [
            engine.prompt(REWRITE, template("aitp_answer.txt").format(document=d.text, question=q))
            for d, q in pairs
        ],
        syn.response_sampling,
        json_schema=ANSWER_SCHEMA,
        desc="gap answers",
    )
    rewrites = []
    for (doc, question), reply in zip(pairs, answered):
        text = None if reply.truncated else parsing.answer(reply.text)
        if text is None:
            drops[reply.finish_reason if reply.truncated else "answer-unparsed"] += 1
            continue
        rewrites.append(Rewrite(doc.id, question, text))
    return rewrites, drops


# --- answers: Self-Instruct's instances, or one response each -------------------------------------


def answer_instructions(
    engine: Engine, spec, seeds: Sequence[Seed], generated: Sequence[Generated]
) -> tuple[list[Answered], dict, dict]:
    """Self-Instruct answers its new tasks with instances (METHODS.md 1.3-1.5), the other recipes
    with one response each (2.2). Returns (answered, metrics, summary entries)."""
    if spec.recipe == "self-instruct":
        return answer_with_instances(engine, spec.synthesize, seeds, generated)
    return answer_with_responses(engine, spec.synthesize, generated)


def answer_with_instances(
    engine: Engine, syn, seeds: Sequence[Seed], generated: Sequence[Generated]
) -> tuple[list[Answered], dict, dict]:
    """One candidate per kept instance, with its task's instruction and seed ids."""
    per_task, drops = generate_instances(
        engine, [g.task for g in generated], seeds, syn.response_sampling, syn.seed
    )
    answered = [
        Answered(g.task.instruction, i.input, i.output, "self-instruct", g.seed_ids)
        for g, found in zip(generated, per_task)
        for i in found.instances
    ]
    classification = sum(found.classification for found in per_task)
    metrics = {
        "classification": classification,
        "instanceDrops": dict(drops),
        "tasksWithoutInstances": sum(not found.instances for found in per_task),
    }
    return answered, metrics, {"classification": classification, "instances": len(answered)}


def answer_with_responses(
    engine: Engine, syn, generated: Sequence[Generated]
) -> tuple[list[Answered], dict, dict]:
    """I-SHEEP's step 2: one response per instruction; empty responses are not candidates."""
    responses = engine.generate(
        [response_prompt(engine, g.task) for g in generated],
        syn.response_sampling,
        desc="responses",
    )
    answered = [
        Answered(g.task.instruction, g.task.input, r.text, "isheep", g.seed_ids)
        for g, r in zip(generated, responses)
        if r.text.strip()
    ]
    metrics = {
        "emptyResponses": sum(not r.text.strip() for r in responses),
        "truncatedResponses": sum(r.truncated for r in responses),
    }
    return answered, metrics, {}



def response_prompt(engine: Engine, task: Task) -> Prompt:
    """The request as a chat turn, or raw as I-SHEEP prompts its base model:
    "{instruction}{input}\\n" (we put a newline between instruction and input so they do not run
    together)."""
    request = f"{task.instruction}\n{task.input}" if task.input else task.instruction
    prompt = engine.prompt(RESPONSE, request)
    return f"{prompt}\n" if isinstance(prompt, str) else prompt
