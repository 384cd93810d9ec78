"""The real-model rows of bench/synthesize.py and bench/assess.py: a stage's step against bare vLLM.

The stage's own functions run on the project's Engine over SmolLM2-135M-Instruct; every request
they hand to vLLM (`LLM.generate`: prompts as token ids, one SamplingParams each) is recorded, and
the bare side sends those same requests straight to the same `vllm.LLM` (same engine process and
settings), so both sides do the same engine work, token for token. What the stage adds is all
around the engine: rendering and tokenizing prompts, the label tries, seeds and SamplingParams,
its batching, parsing, rule filters, ROUGE-L. The bare side is handed the stage's token ids, so
tokenizing (which a bare caller's text prompts cost inside vLLM) counts against the stage only,
and so does the recording itself (a copy of each SamplingParams).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.stages.models.engines import Engine, cpu_flags, open_engine, resolve_dtype
from selfalign.stages.runtime import builtin

from . import common

MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Call:
    """One `LLM.generate` call: what was sent, what came back, and its wall seconds."""

    prompts: list
    params: list
    outputs: list
    wall: float


class Recorder:
    """Stands in for `engine.llm`: forwards everything, and records each generate call."""

    def __init__(self, llm):
        self.llm = llm
        self.calls: list[Call] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)

    def generate(self, prompts, params, **kwargs):
        prompts = list(prompts)
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        sent = [p.clone() for p in params]  # as sent: vLLM may fill in a request's params
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, **kwargs)
        self.calls.append(Call(prompts, sent, outputs, time.perf_counter() - start))
        return outputs


def recorded(engine: Engine, work: Callable[[], Any]) -> tuple[Any, common.Timing, list[Call]]:
    """work() on an empty prefix cache, timed, with every engine call it makes recorded."""
    recorder = Recorder(engine.llm)
    engine.llm = recorder
    try:
        result, timing = common.uncached(engine, work)
    finally:
        engine.llm = recorder.llm
    return result, timing, recorder.calls


def replay(engine: Engine, calls: Sequence[Call]) -> tuple[list[list], common.Timing]:
    """The same requests, call by call, sent straight to vLLM (bare: no tqdm, nothing around it),
    timed on an empty prefix cache."""
    prepared = [(c.prompts, [p.clone() for p in c.params]) for c in calls]
    return common.uncached(engine, lambda: [engine.llm.generate(prompts, params, use_tqdm=False)
                                            for prompts, params in prepared])


def generated_tokens(outputs: Sequence[Sequence]) -> int:
    return sum(len(c.token_ids) for per_call in outputs for o in per_call for c in o.outputs)


def prompt_tokens(outputs: Sequence[Sequence]) -> int:
    return sum(len(o.prompt_token_ids) for per_call in outputs for o in per_call)


def texts(outputs: Sequence[Sequence]) -> list[str]:
    return [c.text for per_call in outputs for o in per_call for c in o.outputs]


def same_outputs(calls: Sequence[Call], bare: Sequence[Sequence]) -> str:
    """How many completions (or next-token log-probabilities) the bare side reproduced."""
    mine = [c for call in calls for o in call.outputs for c in o.outputs]
    theirs = [c for per_call in bare for o in per_call for c in o.outputs]
    same = sum(a.token_ids == b.token_ids and a.logprobs == b.logprobs for a, b in zip(mine, theirs))
    return f"{same} of {len(mine)}"


def spread(values: Sequence[float], unit: str, digits: int = 1) -> str:
    """Median (min-max) of repeated figures."""
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"(min {min(values):.{digits}f}, max {max(values):.{digits}f})")


def run_on_real_engine(spec, measure: Callable[[Engine], int], seed: int = 0) -> int:
    """measure(engine) on SmolLM2-135M-Instruct opened as a run of `spec` opens it (its engine
    settings, dtype and chat mode); start-up reported, not timed; then closed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-real-") as scratch:
        common.vllm_environment(Path(scratch))
        model, build = common.timed(lambda: builtin.materialize(MODEL, scratch))
        engine, start = common.timed(lambda: open_engine(model, spec, gpus=0, seed=seed))
        try:
            dtype = resolve_dtype(spec.engine.dtype, spec.model.dtype, False, cpu_flags())
            common.line("engine", f"builtin://{MODEL} (built in {build}) on vLLM CPU, {dtype}, max_model_len "
                                  f"{engine.max_model_len}, enforce_eager {spec.engine.enforce_eager}; "
                                  f"started in {start}")
            return measure(engine)
        finally:
            engine.close()
