"""Each benchmark of bench/ runs end to end on a tiny size and prints its `ratio: X.XX` last.

No timing is asserted (numbers belong in bench/README.md); what is asserted is that each one
measures both sides, that the decision checks fail the run when the two sides disagree, and that
the reference implementations compute what the project computes. The two vLLM benchmarks share
one engine (their `measure`), as their `main` would start one each.
"""
from __future__ import annotations

import gc
import os
import re
import tempfile

# Before anything imports torch: the engine's kernels compile into a private inductor cache (see
# bench/common.py vllm_environment; torch fixes the directory once imported, and vLLM's workers
# inherit it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bench import assess, common, coverage, dedup, operator, real_model, synthesize
from selfalign.stages.vectors import coverage_report  # noqa: E402

RATIO = re.compile(r"ratio: (\d+\.\d\d)")


def final_ratio(out: str) -> float:
    """The benchmark's headline: its last printed line, `ratio: X.XX`."""
    last = out.strip().splitlines()[-1]
    match = RATIO.fullmatch(last)
    assert match, f"last line is not the ratio: {last!r}"
    return float(match.group(1))


def test_dedup_full_check_runs_both_sides_and_agrees(capsys):
    assert dedup.main(["--n", "120", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "decisions checked: 120 of 120, mismatches 0" in out
    assert "reference (run in full)" in out
    assert final_ratio(out) > 0


def test_dedup_sampled_estimate_says_so_and_checks_the_sample(capsys):
    assert dedup.main(["--n", "120", "--full-limit", "50", "--sample", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference (ESTIMATED, not run in full)" in out
    assert "decisions checked: 6 sampled candidates, mismatches 0" in out
    assert final_ratio(out) > 0


@pytest.mark.parametrize("argv", [["--n", "80"], ["--n", "80", "--full-limit", "10", "--sample", "200"]])
def test_dedup_exits_1_when_a_decision_differs(monkeypatch, capsys, argv):
    """In full, and on a sample that holds every candidate (so it holds the flipped one)."""
    honest = dedup.project_decisions

    def one_flipped(texts):
        decisions = honest(texts)
        decisions[40] = not decisions[40]
        return decisions

    monkeypatch.setattr(dedup, "project_decisions", one_flipped)
    assert dedup.main([*argv, "--repeats", "1"]) == 1
    assert "error: decisions differ" in capsys.readouterr().out


def test_dedup_candidates_are_deterministic_perturbations():
    source = ["Name three primary colors of light please", "What is the capital city of France"]
    first, again = dedup.candidates(source, 50, seed=3), dedup.candidates(source, 50, seed=3)
    assert first == again and len(first) == 50
    assert any(text not in source for text in first)  # perturbed
    assert any(text in source for text in first)  # and some exact repeats


def test_reference_duplicate_is_self_instruct_rule():
    pool = ["Write a poem about the sea in spring"]
    assert dedup.reference_duplicate("Write a poem about the sea in summer", pool)
    assert not dedup.reference_duplicate("List three prime numbers", pool)
    assert not dedup.reference_duplicate("anything", [])


def test_brute_force_computes_the_coverage_stage_metrics():
    rng = np.random.default_rng(1)
    reference, items = coverage.unit_vectors(300, rng), coverage.unit_vectors(70, rng)
    scores = coverage_report.score(reference, np.zeros((0, coverage.DIMENSIONS), np.float32), items, 10, 10_000)
    nearest, density = coverage.brute_force(reference, items, np.arange(300), 10)
    np.testing.assert_allclose(nearest, scores.nearest, atol=1e-5)
    assert np.mean(density == scores.density) > 0.98  # a near-tie at the k-th may round either way


def test_coverage_benchmark_runs_end_to_end(capsys):
    argv = ["--n", "400", "--full-limit", "200", "--sample", "50", "--passages", "4", "--questions", "4"]
    assert coverage.main(argv) == 0
    out = capsys.readouterr().out
    assert "reference (numpy brute force, ESTIMATED)" in out
    assert "50 documents compared" in out
    assert "embedding instructions (t0 questions): 4 texts" in out
    assert final_ratio(out) > 0


def test_operator_benchmark_measures_every_transition_in_both_loads(capsys):
    assert operator.main(["--runs", "1", "--rounds", "1", "--stage-seconds", "0.1", "0.3",
                          "--capacity-runs", "2", "--repeats", "2", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "R=1 paced #1: 4 transitions (5 Jobs)" in out and "R=1 paced #2: 4 transitions (5 Jobs)" in out
    assert "R=2 lockstep #1: 8 transitions (10 Jobs)" in out
    assert "selfalign_job_gap_seconds: 4 observed" in out and "selfalign_job_gap_seconds: 8 observed" in out
    assert "R=1 #1 where the reaction went: seen -> pass start" in out and "requests: write_status" in out
    split = re.findall(r"of its CPU per transition, ([^;]+);", out)
    assert len(split) == 3 and all("kopf loop" in s and "workers" in s for s in split)
    assert "R=1 paced, median of 2: p95 gap" in out and "load average before/after" in out
    assert final_ratio(out) > 0


def test_the_operator_benchmark_turns_the_harness_collector_off_only_while_runs_go():
    with operator.without_collector_pauses():
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.parametrize("text, score", [("7||clear and correct", 7), (" 10 || fine", 10), ("3", 3),
                                         ("11||", None), ("0||", None), ("Score: 7", None), ("", None)])
def test_leading_score_parses_like_isheep(text, score):
    assert assess.leading_score(text) == score


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = common.tiny_engine(tmp_path_factory.mktemp("bench-engine"))
    yield engine
    engine.close()


@pytest.mark.slow
def test_assess_benchmark_scores_both_ways(engine, capsys):
    assert assess.measure(engine, assess.judge_prompts(6), repeats=1) == 0
    out = capsys.readouterr().out
    scored = re.search(r"items scored: project (\d) of (\d) \(.*\), reference \d of \2", out)
    assert scored and scored.group(1) == scored.group(2)  # every item that fits gets a score
    assert final_ratio(out) > 0


@pytest.mark.slow
def test_synthesize_benchmark_compares_batched_and_single_calls(engine, capsys):
    assert synthesize.measure(engine, synthesize.prompts(3, seed=0), repeats=1) == 0
    out = capsys.readouterr().out
    assert "identical completions batched vs one by one" in out
    assert final_ratio(out) > 0


# --- the real-model rows: SmolLM2 is never started here; their code runs on the tiny engine -------


def test_real_spec_is_the_smol_example_sized():
    spec = synthesize.real_spec(instructions=5, prompts=7, max_tokens=96)
    syn = spec.synthesize
    assert (spec.recipe, spec.model.base) == ("isheep", "builtin://smollm2-135m-instruct")
    assert (syn.instructions_per_round, syn.max_prompts) == (5, 7)
    assert (syn.instruction_sampling.temperature, syn.instruction_sampling.max_tokens) == (0.8, 96)
    assert syn.instruction_sampling.presence_penalty == 1.0  # the example's, not capped
    assert synthesize.real_spec(5, 7, 10_000).synthesize.response_sampling.max_tokens == 192  # a cap only


@pytest.mark.parametrize("bench, argv", [(synthesize, ["--real-model", "--prompts", "7", "--instructions", "5"]),
                                          (assess, ["--real-model", "--items", "3"])])
def test_real_model_flag_plans_the_smol_engine_without_starting_it(monkeypatch, capsys, bench, argv):
    planned = {}

    def no_engine(spec, measure, seed=0):
        planned.update(spec=spec, seed=seed)
        return 0

    monkeypatch.setattr(real_model, "run_on_real_engine", no_engine)
    assert bench.main(argv) == 0
    assert planned["spec"].model.base == "builtin://smollm2-135m-instruct"
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_real_candidates_pair_each_task_with_its_own_and_another_output():
    found = assess.real_candidates(3, seed=0)
    own, swapped = found[:3], found[3:]
    assert [c.instruction for c in own] == [c.instruction for c in swapped]
    assert [c.output for c in swapped] == [c.output for c in own[1:] + own[:1]]


@pytest.mark.parametrize("scores, share", [([9, 5, 5, 5], "0.75 over 2 pairs"), ([9, None, 1, 3], "1.00 over 1 pairs"),
                                           ([None, 1], "no pair scored")])
def test_own_wins_counts_ties_half_and_skips_unparsed(scores, share):
    assert assess.own_wins(scores) == share


@pytest.mark.slow
def test_replay_sends_the_recorded_requests_to_bare_vllm(engine):
    """The bare side gets the stage's very requests: same seeds, so the same tokens come back."""
    sampling = synthesize.Sampling(temperature=0.9, top_p=0.9, max_tokens=8)
    found, _, calls = real_model.recorded(engine, lambda: engine.generate(["1. Write", "2. List"], sampling))
    assert [len(c.prompts) for c in calls] == [2] and [c.params[0].seed for c in calls][0] is not None
    outputs, _ = real_model.replay(engine, calls)
    assert real_model.texts(outputs) == [c.text for c in found]
    assert real_model.same_outputs(calls, outputs) == "2 of 2"
    assert real_model.generated_tokens(outputs) == real_model.generated_tokens([c.outputs for c in calls]) > 0
    assert not isinstance(engine.llm, real_model.Recorder)  # put back


@pytest.mark.slow
def test_synthesize_real_row_compares_the_stage_with_bare_vllm(engine, capsys):
    spec = synthesize.real_spec(instructions=2, prompts=2, max_tokens=16)
    assert synthesize.measure_real(engine, spec, repeats=1) == 0
    out = capsys.readouterr().out
    assert re.search(r"identical completions (\d+) of \1;", out)  # the bare side got the same requests
    assert "bare throughput:" in out and "stage time outside vLLM calls:" in out
    assert final_ratio(out) >= 0  # the tiny model's stage time is mostly its Python, so the ratio may round to 0


@pytest.mark.slow
def test_assess_real_rows_compare_bare_vllm_and_free_text(engine, capsys):
    assert assess.measure_real(engine, assess.real_candidates(2, seed=0), repeats=1) == 0
    out = capsys.readouterr().out
    assert re.search(r"identical log-probabilities (\d+) of \1;", out)
    assert "free-text judging (quality): parse rate" in out
    assert final_ratio(out) > 0
