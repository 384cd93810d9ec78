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
import random
import statistics
import sys

from scipy.stats import spearmanr

from selfalign.operator.spec import Sampling
from selfalign.stages import assess as assess_stage
from selfalign.stages.runtime import builtin
from selfalign.stages.text import records
from selfalign.stages.text.prompting import JUDGE
from selfalign.stages.text.records import Candidate
from selfalign.stages.models.engines import template

from . import common, real_model
from .synthesize import real_spec

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
    parser.add_argument("--real-model", action="store_true",
                        help="the stage's judge on SmolLM2 against bare vLLM, and against free-text judging")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.real_model:
        spec = real_spec(16, 16, 96)  # examples/smol.yaml's engine settings and chat mode
        candidates = real_candidates(args.items, args.seed)
        common.header("assess: the stage's judge vs bare vLLM, and label probabilities vs free-text judging, "
                      "SmolLM2-135M-Instruct", common.VLLM_PACKAGES)
        return real_model.run_on_real_engine(spec, lambda engine: measure_real(engine, candidates, args.repeats),
                                             seed=args.seed)

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


def real_candidates(count: int, seed: int) -> list[Candidate]:
    """`count` seed tasks with their own output, then the same tasks each with the next one's."""
    tasks = random.Random(seed).sample(records.load_seeds(builtin.data_path("self-instruct-seeds").as_uri()), count)
    own = [Candidate(f"own-{i}", t.instruction, t.input, t.output, "isheep", 0, "") for i, t in enumerate(tasks)]
    swapped = [Candidate(f"swapped-{i}", t.instruction, t.input, tasks[(i + 1) % count].output, "isheep", 0, "")
               for i, t in enumerate(tasks)]
    return own + swapped


def own_wins(scores: list[float | None]) -> str:
    """How often the first half (own outputs) outscores the second (swapped): a tie counts half,
    a pair with an unparsed score is left out."""
    half = len(scores) // 2
    pairs = [(a, b) for a, b in zip(scores[:half], scores[half:]) if a is not None and b is not None]
    if not pairs:
        return "no pair scored"
    return f"{sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs):.2f} over {len(pairs)} pairs"


def measure_real(engine, candidates: list[Candidate], repeats: int) -> int:
    quality = [engine.prompt(JUDGE, template("judge_quality.txt").format(
        request=assess_stage.request_text(c), response=c.output), assess_stage.SCORE_PREFIX) for c in candidates]
    common.line("items", f"{len(candidates)} candidates: {len(candidates) // 2} seed tasks with their own output "
                         f"and with another's; judged on quality and following (the stage's judge_*.txt)")
    assess_stage.judge(engine, candidates[:2])  # warm-up
    engine.generate(quality[:2], JUDGMENT, desc="warm-up")
    rates, bare_rates, ratios, outside, stage_timings, bare_timings = [], [], [], [], [], []
    label_s, free_s, parse, rho = [], [], [], []
    for repeat in range(repeats):
        _, timing, calls = real_model.recorded(engine, lambda: assess_stage.judge(engine, candidates))
        outputs, bare = real_model.replay(engine, calls)
        judged = 2 * len(candidates)
        stage_timings.append(timing)
        bare_timings.append(bare)
        rates.append(judged / timing.wall)
        bare_rates.append(judged / bare.wall)
        ratios.append(bare.wall / timing.wall)
        outside.append(timing.wall - sum(c.wall for c in calls))
        tokens = real_model.prompt_tokens([c.outputs for c in calls])
        distributions, labels = common.uncached(engine, lambda: engine.score(quality, desc="label probabilities"))
        judgments, free = common.uncached(engine, lambda: engine.generate(quality, JUDGMENT, desc="free-text judge"))
        expected = [d.expected if d else None for d in distributions]
        sampled = [leading_score(c.text) for c in judgments]
        both = [(e, s) for e, s in zip(expected, sampled) if e is not None and s is not None]
        label_s.append(labels.wall / len(quality))
        free_s.append(free.wall / len(quality))
        parse.append(sum(s is not None for s in sampled) / len(sampled))
        rho.append(spearmanr(*zip(*both)).statistic if len(both) > 2 else float("nan"))
        common.line(f"repeat {repeat + 1}", f"stage calls (requests) {[len(c.prompts) for c in calls]}, prompt tokens "
                                           f"{tokens}, identical log-probabilities "
                                           f"{real_model.same_outputs(calls, outputs)}; stage {rates[-1]:.2f} judged "
                                           f"prompts/s ({tokens / timing.wall:.0f} prompt tokens/s), bare "
                                           f"{bare_rates[-1]:.2f} ({tokens / bare.wall:.0f} prompt tokens/s); free text "
                                           f"parsed {parse[-1]:.0%}, own > swapped: label probabilities "
                                           f"{own_wins(expected)}, free text {own_wins(sampled)}")
    common.line("stage judge (its functions on Engine)", common.describe(stage_timings))
    common.line("bare vLLM (same requests)", common.describe(bare_timings))
    common.line("stage throughput", real_model.spread(rates, "judged prompts/s", 2))
    common.line("bare throughput", real_model.spread(bare_rates, "judged prompts/s", 2))
    common.line("stage time outside vLLM calls", real_model.spread(outside, "s", 2))
    common.line("label probabilities (quality)", f"scored {sum(e is not None for e in expected)} of {len(quality)}, "
                                                 f"mean label mass {statistics.mean(d.mass for d in distributions if d):.3f}; "
                                                 + real_model.spread(label_s, "s per item", 3))
    common.line("free-text judging (quality)", f"parse rate {real_model.spread([100 * p for p in parse], '%', 0)}; "
                                               + real_model.spread(free_s, "s per item", 3))
    common.line("agreement", "Spearman of sampled vs expected score " + real_model.spread(rho, "", 2)
                + "; first judgments " + repr([c.text[:40] for c in judgments[:2]]))
    common.line("goal", "stage keeps >= 90% of the bare engine's judged prompts/s: "
                        + ("met" if statistics.median(ratios) >= 0.9 else "NOT met"))
    common.ratio(statistics.median(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
