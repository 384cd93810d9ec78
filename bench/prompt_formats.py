"""Raw text or the chat template? Every prompt kind the stages send, both ways, on a real model.

    python -m bench.prompt_formats --prompts 12 --out formats/

On builtin://smollm2-135m-instruct (SmolLM2-135M-Instruct, vLLM CPU), each prompt kind is built by
the stages' own prompt builders from the packaged seed tasks and reference sample, then sent raw
and through the chat template (prompting.build) with the stages' decoding, and what comes back is
read by the stages' own parsers. Per kind and form it prints what the stage gets out of it:
- tasks (Self-Instruct list, I-SHEEP meta-prompt): prompts that gave >= 1 new task (parsed, passing
  the instruction rules, not a ROUGE-L > 0.7 copy of a task the prompt showed) and new tasks/prompt;
- classify: answers that read as Yes or No; instances: tasks with >= 1 clean instance;
- responses: non-empty, complete replies that pass I-SHEEP's response rules;
- judge (quality): mean label mass, and how often a seed's own output outscores another seed's
  output for the same instruction (0.5 is chance);
- AITP questions and answers: replies that parse (structured output on).
stages/text/prompting.py's CHAT_KINDS follows these numbers; docs/architecture.md keeps them. Every
completion is written to --out/completions.jsonl (the parser corpus under tests/data/ was drawn
from such a file). The ratio printed last is chat over raw for responses (usable share).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from selfalign.operator.spec import Engine as EngineSettings
from selfalign.operator.spec import Sampling
from selfalign.stages.runtime import builtin, storage
from selfalign.stages.text import parsing, prompting, records
from selfalign.stages.assess import SCORE_PREFIX, request_text
from selfalign.stages.text.dedup import rouge_l
from selfalign.stages.models.engines import Engine, template
from selfalign.stages.text.filters import instruction_rejection, response_rejection
from selfalign.stages.text.instances import (CLASSIFY_SAMPLING, INSTANCE_STOP, classify_examples,
                                             classify_prompt, clean_instances, instance_prompt,
                                             is_classification_answer, parse_input_first)
from selfalign.stages.text.records import Candidate
from selfalign.stages.synthesize import (ANSWER_SCHEMA, SELF_INSTRUCT_STOP, isheep_prompt,
                                         isheep_total, questions_schema, self_instruct_prompt)

from . import common

TASK_SAMPLING = Sampling(temperature=0.7, top_p=0.5, max_tokens=200, presence_penalty=1.5)
RESPONSE_SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_tokens=200)
INSTANCE_SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_tokens=350, presence_penalty=1.5)
FORMS = ("raw", "chat")


def new_tasks(tasks: list[parsing.Task], shown: list[str], families: list[str]) -> int:
    return sum(instruction_rejection(t.instruction, t.input, families) is None
               and all(rouge_l(t.instruction, s) <= 0.7 for s in shown) for t in tasks)


def measure(engine: Engine, count: int, seed: int, out: Path) -> dict:
    rng = random.Random(seed)
    seeds = records.load_seeds(builtin.data_path("self-instruct-seeds").as_uri())
    docs = [row for _, row in storage.iter_jsonl("builtin://reference-sample")]
    results: dict[str, dict[str, str]] = {}
    log = (out / "completions.jsonl").open("w")

    def record(kind: str, form: str, prompt, completion) -> None:
        log.write(json.dumps({"kind": kind, "form": form, "prompt": prompt, "text": completion.text,
                              "finish": completion.finish_reason}) + "\n")

    def send(kind, form, texts, sampling, prefix="", **kw):
        prompts = [prompting.build(t, form == "chat", prefix) for t in texts]
        found = engine.generate(prompts, sampling, desc=f"{kind} {form}", **kw)
        for p, c in zip(texts, found):
            record(kind, form, p, c)
        return found

    shown_si = [rng.sample(seeds, 8) for _ in range(count)]
    shown_is = [rng.sample(seeds, 5) for _ in range(count)]
    examples = classify_examples(seeds, seed)
    plain = [s for s in seeds if not s.is_classification]
    tasks = rng.sample(plain, count)
    for form in FORMS:
        row = results.setdefault(form, {})
        si = send("self-instruct", form, [self_instruct_prompt(
            [parsing.Task(s.instruction) for s in shown]) for shown in shown_si],
            TASK_SAMPLING, stop=SELF_INSTRUCT_STOP)
        found = [new_tasks([parsing.Task(i) for i in parsing.numbered_instructions(c.text, c.truncated)],
                           [s.instruction for s in shown], ["self-instruct"])
                 for c, shown in zip(si, shown_si)]
        row["self-instruct tasks"] = f"{sum(n > 0 for n in found)}/{count} prompts, {statistics.mean(found):.2f}/prompt"
        ish = send("isheep", form, [isheep_prompt([parsing.Task(s.instruction, s.input) for s in shown])
                                    for shown in shown_is], TASK_SAMPLING, stop=[f"\n{isheep_total(5) + 1}."])
        found = [new_tasks(parsing.alpaca_tasks(c.text, 6, c.truncated), [s.instruction for s in shown],
                           ["self-instruct", "isheep"]) for c, shown in zip(ish, shown_is)]
        row["isheep tasks"] = f"{sum(n > 0 for n in found)}/{count} prompts, {statistics.mean(found):.2f}/prompt"
        cls = send("classify", form, [classify_prompt(examples, t.instruction) for t in tasks],
                   CLASSIFY_SAMPLING)
        answered = sum(c.text.strip().lower().startswith(("yes", "no")) for c in cls)
        row["classify answers Yes/No"] = f"{answered}/{count} ({sum(map(is_classification_answer, (c.text for c in cls)))} yes)"
        inst = send("instances", form, [instance_prompt(t.instruction, False) for t in tasks],
                    INSTANCE_SAMPLING, stop=INSTANCE_STOP)
        clean = [len(clean_instances(parse_input_first(c.text, c.truncated)[0])[0]) for c in inst]
        row["instances"] = f"{sum(n > 0 for n in clean)}/{count} tasks, {statistics.mean(clean):.2f}/task"
        resp = send("response", form, [t.instruction for t in tasks], RESPONSE_SAMPLING)
        usable = sum(bool(c.text.strip()) and not c.truncated and response_rejection(t.instruction, "", c.text) is None
                     for c, t in zip(resp, tasks))
        row["responses usable"] = f"{usable}/{count}"
        matched = [Candidate(f"m{i}", s.instruction, s.input, s.output, "isheep", 0, "") for i, s in enumerate(tasks)]
        swapped = [Candidate(f"s{i}", s.instruction, s.input, tasks[i - 1].output, "isheep", 0, "")
                   for i, s in enumerate(tasks)]
        judged = []
        for items in (matched, swapped):
            texts = [template("judge_quality.txt").format(request=request_text(c), response=c.output) for c in items]
            judged.append(engine.score([prompting.build(t, form == "chat", SCORE_PREFIX) for t in texts],
                                       desc=f"judge {form}"))
        mass = statistics.mean(d.mass for d in judged[0] + judged[1] if d)
        wins = statistics.mean(a.expected > b.expected for a, b in zip(*judged) if a and b)
        row["judge label mass"] = f"{mass:.3f}"
        row["judge own > swapped output"] = f"{wins:.2f}"
        picked = rng.sample(docs, count)
        q = send("aitp-questions", form, [template("aitp_questions.txt").format(count=2, document=d["text"])
                                          for d in picked], TASK_SAMPLING, json_schema=questions_schema(2))
        qs = [parsing.questions(c.text, 2) if not c.truncated else [] for c in q]
        row["aitp questions parsed"] = f"{sum(bool(x) for x in qs)}/{count}"
        pairs = [(d, x[0]) for d, x in zip(picked, qs) if x]
        a = send("aitp-answer", form, [template("aitp_answer.txt").format(document=d["text"], question=x)
                                       for d, x in pairs], RESPONSE_SAMPLING, json_schema=ANSWER_SCHEMA)
        row["aitp answers parsed"] = f"{sum(parsing.answer(c.text) is not None and not c.truncated for c in a)}/{len(pairs)}"
        results[form]["_responses"] = usable / count
    log.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=12, help="prompts per kind and form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("prompt-formats"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    common.header("prompt formats: raw vs chat template per prompt kind, SmolLM2-135M-Instruct",
                  common.VLLM_PACKAGES)
    scratch = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    common.vllm_environment(scratch)
    model = builtin.materialize("smollm2-135m-instruct", scratch)
    engine = Engine(model, EngineSettings(max_model_len=2048, enforce_eager=True), gpus=0, seed=args.seed)
    results, timing = common.timed(lambda: measure(engine, args.prompts, args.seed, args.out))
    common.line("time", timing)
    for key in results["raw"]:
        if not key.startswith("_"):
            common.line(key, f"raw {results['raw'][key]} | chat {results['chat'][key]}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    engine.close()
    common.ratio(results["chat"]["_responses"] / max(results["raw"]["_responses"], 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
