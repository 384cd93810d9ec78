"""One batched engine call against one call per prompt: the same prompts on the same engine.

    python -m bench.synthesize --prompts 64

The project's synthesize stage hands every prompt of a step to vLLM in one `Engine.generate` call
(stages/models/engines.py), so the scheduler batches the decoding; the reference is the loop many
generation scripts run, one request at a time (the same engine, one prompt per call). Prompts are
Self-Instruct's (stages/synthesize.py `self_instruct_prompt`, 8 seed tasks each), the model the
tiny random Llama on vLLM CPU. Decoding is greedy so both ways do the same work: the completions
are compared and the generated tokens counted. The two ways alternate, each timed --repeats times
after a warm-up and with vLLM's prefix cache emptied first; the ratio is the median prompts/s batched over the median prompts/s one by one
(wall time: the engine's own process does the work; CPU-seconds of both processes are shown too).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys

from selfalign.operator.spec import Sampling
from selfalign.stages.runtime import builtin
from selfalign.stages.text import records
from selfalign.stages.text.parsing import Task
from selfalign.stages.synthesize import self_instruct_prompt

from . import common

EXAMPLES = 8  # Self-Instruct's prompt shows 8 tasks
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)


def prompts(count: int, seed: int) -> list[str]:
    tasks = [Task(s.instruction) for s in records.load_seeds(builtin.data_path("self-instruct-seeds").as_uri())]
    rng = random.Random(seed)
    return [self_instruct_prompt(rng.sample(tasks, EXAMPLES)) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timings of each way (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    common.header("synthesize: one batched Engine.generate call vs one call per prompt",
                  common.VLLM_PACKAGES)
    return common.run_on_tiny_engine(lambda engine: measure(engine, prompts(args.prompts, args.seed), args.repeats))


def measure(engine, texts: list[str], repeats: int) -> int:
    lengths = [len(ids) for ids in engine.encode(texts)]
    common.line("prompts", f"{len(texts)} Self-Instruct prompts ({EXAMPLES} seed tasks each), "
                           f"{statistics.mean(lengths):.0f} tokens avg (max {max(lengths)}); {GREEDY.max_tokens} "
                           "new tokens at most, greedy")
    engine.generate(texts[:2], GREEDY, desc="warm-up")
    batched, single = [], []
    for _ in range(repeats):
        batch_out, timing = common.uncached(engine, lambda: engine.generate(texts, GREEDY, desc="batched"))
        batched.append(timing)
        single_out, timing = common.uncached(
            engine, lambda: [engine.generate([t], GREEDY, desc="single")[0] for t in texts])
        single.append(timing)
    same = sum(a.text == b.text for a, b in zip(batch_out, single_out))
    tokens = sum(len(engine.tokenizer.encode(c.text, add_special_tokens=False)) for c in batch_out)
    common.line("generated", f"{tokens} tokens in {len(texts)} completions (batched); identical completions "
                             f"batched vs one by one: {same} of {len(texts)}")
    common.line("batched (one call)", common.describe(batched))
    common.line("one call per prompt", common.describe(single))
    fast, slow = common.median_timing(batched), common.median_timing(single)
    common.line("throughput", f"batched {len(texts) / fast.wall:.1f} prompts/s ({tokens / fast.wall:.0f} tokens/s), "
                              f"one by one {len(texts) / slow.wall:.1f} prompts/s")
    common.line("CPU-seconds per prompt", f"batched {fast.cpu / len(texts):.4f}, one by one {slow.cpu / len(texts):.4f}")
    common.ratio(slow.wall / fast.wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
