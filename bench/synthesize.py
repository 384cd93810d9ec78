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

    python -m bench.synthesize --real-model --prompts 24 --instructions 16 --max-tokens 96

The real-model row (bench/real_model.py): the stage's own generation, `generate_instructions`
(I-SHEEP meta-prompts in its adaptive batches, parsing, rule filters, ROUGE-L) then
`answer_with_responses`, as examples/smol.yaml runs it (its sampling, its engine settings) on
SmolLM2-135M-Instruct, sized by --instructions (target), --prompts (maxPrompts) and --max-tokens
(cap of both samplings), against bare `vllm.LLM.generate` sent the same requests (token ids,
SamplingParams with their seeds) call by call on the same engine. Generated tokens per second of
both, per repeat; the ratio is the median of stage tokens/s over bare tokens/s (goal >= 0.90).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys

import yaml

from selfalign.operator.spec import Sampling, parse_spec
from selfalign.stages.runtime import builtin
from selfalign.stages.text import records
from selfalign.stages.text.parsing import Task
from selfalign.stages.synthesize import answer_with_responses, generate_instructions, self_instruct_prompt

from . import common, real_model

EXAMPLES = 8  # Self-Instruct's prompt shows 8 tasks
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)
SMOL = common.REPO / "examples" / "smol.yaml"


def prompts(count: int, seed: int) -> list[str]:
    tasks = [Task(s.instruction) for s in records.load_seeds(builtin.data_path("self-instruct-seeds").as_uri())]
    rng = random.Random(seed)
    return [self_instruct_prompt(rng.sample(tasks, EXAMPLES)) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="with --real-model: synthesize.maxPrompts")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each way (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-model", action="store_true",
                        help="the stage's I-SHEEP generation on SmolLM2 against bare vLLM")
    parser.add_argument("--instructions", type=int, default=16, help="with --real-model: instructionsPerRound")
    parser.add_argument("--max-tokens", type=int, default=96, help="with --real-model: cap of both samplings")
    args = parser.parse_args(argv)
    if args.real_model:
        spec = real_spec(args.instructions, args.prompts, args.max_tokens)
        common.header("synthesize: the stage's generation vs bare vLLM on the same requests, SmolLM2-135M-Instruct",
                      common.VLLM_PACKAGES)
        return real_model.run_on_real_engine(spec, lambda engine: measure_real(engine, spec, args.repeats),
                                             seed=args.seed)

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


def real_spec(instructions: int, prompts: int, max_tokens: int):
    """examples/smol.yaml's run, sized for a benchmark: instructionsPerRound, maxPrompts, and both
    samplings' maxTokens capped (the rest, e.g. temperature and presence penalty, as the example).
    Nothing is stored: the storage URI only completes the spec."""
    raw = {"storage": {"uri": "file:///nowhere"}, **yaml.safe_load(SMOL.read_text())["spec"]}
    syn = raw["synthesize"]
    syn.update(instructionsPerRound=instructions, maxPrompts=prompts)
    for key in ("instructionSampling", "responseSampling"):
        syn[key]["maxTokens"] = min(syn[key]["maxTokens"], max_tokens)
    return parse_spec(raw)


def measure_real(engine, spec, repeats: int) -> int:
    seeds = records.load_seeds(spec.seeds)
    syn = spec.synthesize

    def stage():
        generated, _, used = generate_instructions(engine, spec, seeds, [], None, 0)
        answer_with_responses(engine, syn, generated)
        return len(generated), used

    common.line("stage", f"I-SHEEP generate_instructions + answer_with_responses, examples/smol.yaml with "
                         f"instructionsPerRound {syn.instructions_per_round}, maxPrompts {syn.max_prompts}, "
                         f"seedExamples {syn.seed_examples}; instruction sampling {syn.instruction_sampling}; "
                         f"response sampling {syn.response_sampling}")
    engine.generate([engine.prompt("tasks", "1. Write a poem.\n2.")] * 2, syn.response_sampling, desc="warm-up")
    stage_rates, bare_rates, ratios, outside, stage_timings, bare_timings = [], [], [], [], [], []
    for repeat in range(repeats):
        (instructions, used), timing, calls = real_model.recorded(engine, stage)
        outputs, bare = real_model.replay(engine, calls)
        tokens = real_model.generated_tokens([c.outputs for c in calls])
        stage_timings.append(timing)
        bare_timings.append(bare)
        stage_rates.append(tokens / timing.wall)
        bare_rates.append(tokens / bare.wall)
        ratios.append(bare.wall / timing.wall)
        outside.append(timing.wall - sum(c.wall for c in calls))
        common.line(f"repeat {repeat + 1}", f"{used} prompts -> {instructions} instructions accepted; calls (requests) "
                                           f"{[len(c.prompts) for c in calls]}; prompt tokens "
                                           f"{real_model.prompt_tokens([c.outputs for c in calls])}, generated "
                                           f"{tokens} (bare {real_model.generated_tokens(outputs)}); identical "
                                           f"completions {real_model.same_outputs(calls, outputs)}; stage "
                                           f"{stage_rates[-1]:.1f} tokens/s, bare {bare_rates[-1]:.1f} tokens/s")
    common.line("stage (its functions on Engine)", common.describe(stage_timings))
    common.line("bare vLLM (same requests)", common.describe(bare_timings))
    common.line("stage throughput", real_model.spread(stage_rates, "generated tokens/s"))
    common.line("bare throughput", real_model.spread(bare_rates, "generated tokens/s"))
    common.line("stage time outside vLLM calls", real_model.spread(outside, "s", 2))
    common.line("goal", "stage keeps >= 90% of the bare engine's tokens/s: "
                        + ("met" if statistics.median(ratios) >= 0.9 else "NOT met"))
    common.ratio(statistics.median(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
