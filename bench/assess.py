"""Self-assessment by next-token score probabilities against I-SHEEP's generated judgments.

    python -m bench.assess --items 128

Both ways judge the same items with the same prompt (stages/prompts/judge_quality.txt, I-SHEEP's
quality rubric, which asks for '<score>||<explanation>') on the same engine: the tiny random Llama
on vLLM CPU. Project: `Engine.score` reads the judge's probabilities of the labels 1..10 after the
prompt (one prefill per item, plus a decode step per branching label token) and keeps their
expected value: every item that fits the context gets a score. Reference (I-SHEEP): sample a
64-token judgment at temperature 1 and parse its leading number; an item whose text does not start
with a number in 1..10 gets none (I-SHEEP drops the row). Items: the 175 Self-Instruct seed tasks
(instruction, input, output), cycled up to --items; those whose prompt
leaves no room for 64 generated tokens in the tiny model's context are left out of both ways.

The two ways alternate, each timed --repeats times after a warm-up with vLLM's prefix cache
emptied first. The ratio is items/s of the project's way over items/s of I-SHEEP's (medians, wall
time; CPU-seconds of this process and the engine's are shown too). The share of items each way
could score is printed beside it; with a random-weight model the reference's share is what such a
model writes, not what a trained judge would (a trained judge follows the format far more often).
"""
from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys

from selfalign.operator.spec import Sampling
from selfalign.stages.runtime import builtin
from selfalign.stages.text import records
from selfalign.stages.models.engines import template

from . import common

JUDGMENT = Sampling(temperature=1.0, top_p=1.0, max_tokens=64)  # I-SHEEP: sampled at temperature 1
_LEADING_NUMBER = re.compile(r"\s*(\d+)")


def leading_score(text: str) -> int | None:
    """I-SHEEP's parse: the number the judgment starts with, if it is a score 1..10."""
    match = _LEADING_NUMBER.match(text)
    if not match:
        return None
    score = int(match.group(1))
    return score if 1 <= score <= 10 else None


def judge_prompts(count: int) -> list[str]:
    seeds = records.load_seeds(builtin.data_path("self-instruct-seeds").as_uri())
    rubric = template("judge_quality.txt")
    return [rubric.format(request=f"{s.instruction} {s.input}" if s.input else s.instruction, response=s.output)
            for s in itertools.islice(itertools.cycle(seeds), count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timings of each way (median reported)")
    args = parser.parse_args(argv)

    common.header("assess: Engine.score (label probabilities) vs 64-token judgment + parse (I-SHEEP)",
                  common.VLLM_PACKAGES)
    return common.run_on_tiny_engine(lambda engine: measure(engine, judge_prompts(args.items), args.repeats))


def measure(engine, prompts: list[str], repeats: int) -> int:
    """Only items whose prompt leaves room for the 64-token judgment are judged (by both ways),
    so neither way's share or speed counts items it could not be given."""
    lengths = [len(ids) for ids in engine.encode(prompts)]
    fitting = [p for p, n in zip(prompts, lengths) if n + JUDGMENT.max_tokens <= engine.max_model_len]
    common.line("items", f"{len(fitting)} of {len(prompts)} judge prompts (judge_quality.txt on Self-Instruct "
                         f"seed tasks) leave room for {JUDGMENT.max_tokens} tokens in the {engine.max_model_len}-"
                         f"token context; the others are left out of both ways")
    prompts = fitting
    engine.score(prompts[:2], desc="warm-up")
    engine.generate(prompts[:2], JUDGMENT, desc="warm-up")
    scoring, judging = [], []
    for _ in range(repeats):
        distributions, timing = common.uncached(engine, lambda: engine.score(prompts, desc="score"))
        scoring.append(timing)
        judgments, timing = common.uncached(engine, lambda: engine.generate(prompts, JUDGMENT, desc="judge"))
        judging.append(timing)
    scored = sum(d is not None for d in distributions)
    parsed = [leading_score(c.text) for c in judgments]
    readable = sum(s is not None for s in parsed)
    common.line("project (Engine.score)", common.describe(scoring))
    common.line("reference (generate 64 tokens + parse)", common.describe(judging))
    fast, slow = common.median_timing(scoring), common.median_timing(judging)
    common.line("throughput", f"project {len(prompts) / fast.wall:.1f} items/s, reference "
                              f"{len(prompts) / slow.wall:.1f} items/s (wall); CPU-s per item: project "
                              f"{fast.cpu / len(prompts):.4f}, reference {slow.cpu / len(prompts):.4f}")
    common.line("items scored", f"project {scored} of {len(prompts)} ({scored / len(prompts):.1%}), reference "
                                f"{readable} of {len(prompts)} ({readable / len(prompts):.1%}, last repeat)")
    if scored:
        mean = statistics.mean(d.expected for d in distributions if d)
        mass = statistics.mean(d.mass for d in distributions if d)
        common.line("project scores", f"mean expected score {mean:.2f}; mean probability on the labels 1..10 "
                                      f"before renormalising {mass:.3g}")
    common.line("reference judgments, first two", repr([c.text[:60] for c in judgments[:2]]))
    common.ratio(slow.wall / fast.wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
