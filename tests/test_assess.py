"""assess: rules, dedup, thresholds, summary; and a whole round synthesize -> assess on S3."""

from __future__ import annotations

import pytest

from selfalign.operator.spec import Threshold
from selfalign.stages.runtime import storage
from selfalign.stages.assess import (
    DUPLICATE,
    LOW_MASS,
    duplicates,
    judge,
    prob_above,
    rule_rejection,
    score_rejections,
    summarize,
    threshold_rejection,
)
from selfalign.stages.text.dedup import RougeDeduper
from selfalign.stages.models.engines import ScoreDistribution
from selfalign.stages.text import prompting
from selfalign.stages.text.records import Candidate
from tests.test_engine import chain_model_dir  # noqa: F401 - a fixture
from tests.test_synthesize import base_spec, run_stage, upload_seeds, write_spec


def candidate(
    instruction="Describe the river in one sentence.",
    input="",
    output="It is long.",
    origin="isheep",
    id="c1",
):
    return Candidate(id, instruction, input, output, origin, 0, "file:///m")


def test_rule_rejection_by_family():
    assert rule_rejection(candidate("Draw a cat."), ["self-instruct"]) == "too-few-words"
    assert (
        rule_rejection(candidate("Please draw a picture of a cat."), ["self-instruct"])
        == "blacklisted-word"
    )
    assert rule_rejection(candidate("Describe a video about cats here."), ["self-instruct"]) is None
    assert (
        rule_rejection(candidate("Describe a video about cats here."), ["isheep"])
        == "blacklisted-word"
    )
    assert rule_rejection(candidate(output="Sure.\nuser: and then"), ["isheep"]) == "role-marker"
    assert (
        rule_rejection(candidate(output="Sure.\nuser: and then"), ["self-instruct"]) is None
    )  # response rules are I-SHEEP's
    assert rule_rejection(candidate("Please draw a picture of a cat."), []) is None


def judged(mass=1.0, **expected):
    """A distribution per criterion with the given expected score (mass on two labels around it),
    or P(yes) for additionalInfoNeeded."""
    found = {}
    for name, value in expected.items():
        if name == "additionalInfoNeeded":
            found[name] = ScoreDistribution(("yes", "no"), (value, 1 - value), mass)
        else:
            low = int(value)
            weights = [0.0] * 10
            weights[low - 1] = 1 - (value - low)
            if low < 10:
                weights[low] = value - low
            found[name] = ScoreDistribution(tuple(map(str, range(1, 11))), tuple(weights), mass)
    return found


def test_thresholds_for_generated_and_rewritten_items():
    t = Threshold(quality=8, following=8, rewrite_quality=7)
    assert threshold_rejection(judged(quality=8.5, following=8.1), False, t, 0.2) is None
    assert threshold_rejection(judged(quality=8.0, following=9), False, t, 0.2) == "below-quality"
    assert threshold_rejection(judged(quality=9, following=8.0), False, t, 0.2) == "below-following"
    rewrite = judged(quality=7.0, difficulty=3, additionalInfoNeeded=0.1)
    assert threshold_rejection(rewrite, True, t, 0.2) is None
    rewrite = judged(quality=6.9, difficulty=3, additionalInfoNeeded=0.1)
    assert threshold_rejection(rewrite, True, t, 0.2) == "below-rewrite-quality"
    rewrite = judged(quality=9, difficulty=3, additionalInfoNeeded=0.7)
    assert threshold_rejection(rewrite, True, t, 0.2) == "needs-additional-info"
    assert threshold_rejection(None, False, t, 0.2) == "judge-prompt-too-long"


def test_an_item_the_judge_barely_scored_is_rejected_by_name_not_kept_at_its_score():
    t = Threshold(quality=5, following=5)
    assert threshold_rejection(judged(0.19, quality=9, following=9), False, t, 0.2) == LOW_MASS
    assert threshold_rejection(judged(0.2, quality=9, following=9), False, t, 0.2) is None
    rewrite = judged(0.05, quality=9, difficulty=3, additionalInfoNeeded=0.0)
    assert threshold_rejection(rewrite, True, t, 0.2) == LOW_MASS


def test_probability_decision_keeps_items_likely_above_the_cut_off():
    """A judge torn between 1 and 10 has a low expected score but is often above the cut-off."""
    labels = tuple(map(str, range(1, 11)))
    torn = ScoreDistribution(labels, (0.55,) + (0.0,) * 8 + (0.45,), 1.0)  # expected 5.05
    item = {"quality": torn, "following": torn}
    expected = Threshold(quality=7.5, following=7.5)
    probable = Threshold(quality=7.5, following=7.5, decision="probability", min_probability=0.4)
    assert prob_above(torn, 7.5) == pytest.approx(0.45)
    assert threshold_rejection(item, False, expected, 0.2) == "below-quality"
    assert threshold_rejection(item, False, probable, 0.2) is None
    stricter = probable.model_copy(update={"min_probability": 0.5})
    assert threshold_rejection(item, False, stricter, 0.2) == "below-quality"


def test_top_fraction_keeps_the_best_share_of_what_the_judge_could_score():
    t = Threshold(quality=8, following=8, decision="top-fraction", top_fraction=0.5)
    items = [candidate(id=f"c{i}") for i in range(5)] + [candidate(origin="aitp", id="a1")]
    found = {
        "c0": judged(quality=4.0, following=4.0),
        "c1": judged(quality=6.0, following=5.0),
        "c2": judged(quality=5.0, following=5.0),
        "c3": judged(0.01, quality=9.0, following=9.0),  # no mass: out before the ranking
        "c4": judged(quality=3.0, following=3.5),
        "a1": judged(quality=7.5, difficulty=4.0, additionalInfoNeeded=0.2),
    }
    verdicts = score_rejections(items, found, t, 0.2)
    assert verdicts == {"c0": "below-top-fraction", "c1": None, "c2": None, "c3": LOW_MASS,
                        "c4": "below-top-fraction", "a1": None}


def test_rewrites_skip_the_keyword_rules_that_would_remove_gap_domains():
    rewrite = candidate("Which file format does the archive in the passage use?", origin="aitp")
    assert rule_rejection(rewrite, ["self-instruct", "isheep"]) is None
    generated = candidate("Which file format does the archive in the passage use?")
    assert rule_rejection(generated, ["self-instruct"]) == "blacklisted-word"


@pytest.mark.parametrize("chat", [True, False])
def test_rewrites_are_asked_each_criterion_as_a_question_and_the_reply_opens_at_its_label(chat):
    """Prefilling the rubric's line put 0.27 (scores) and 0.02 (yes/no) of SmolLM2's mass on the
    labels; asked as a question with "Score:"/"Answer:" opening the reply: 0.87/0.88/0.57."""
    asked = {}

    class Recorder:
        def prompt(self, kind, text, answer_prefix="", prefix_raw=False):
            assert kind == prompting.JUDGE
            return prompting.build(text, chat, answer_prefix, prefix_raw)

        def score(self, prompts, labels=range(1, 11), desc=""):
            asked[desc] = (prompts, tuple(labels))
            return [ScoreDistribution(tuple(labels), (1.0,) + (0.0,) * (len(labels) - 1), 1.0)] * len(prompts)

    found = judge(Recorder(), [candidate("Which format does the archive use?", origin="aitp", id="a1")])
    assert set(found["a1"]) == {"quality", "difficulty", "additionalInfoNeeded"}
    for criterion, prefix, labels in [("quality", "Score:", tuple(range(1, 11))),
                                      ("difficulty", "Score:", tuple(range(1, 11))),
                                      ("additionalInfoNeeded", "Answer:", ("yes", "no"))]:
        (prompt,), asked_labels = asked[f"judge {criterion}"]
        assert asked_labels == labels
        if chat:
            assert prompt[-1] == {"role": "assistant", "content": prefix}
            assert prompt[-2]["content"].endswith(f"Reply with {'yes or no' if prefix == 'Answer:' else 'a score from 1 to 10'}.")
        else:
            assert prompt.endswith(f".\n{prefix}") and "Which format does the archive use?" in prompt


@pytest.mark.parametrize("question, rule", [  # what SmolLM2-135M wrote as questions (smol-aitp.yaml)
    ("7a65f38122e0f19b", "too-few-words"),
    ("the_title_of_federal_judge_usually_means_a_judge_appointed_by_the_President", "too-few-words"),
    ("List of questions", "too-few-words"),
    ("./../*/small_nonpolar_molecules.md/*./de/*./dff/*/nonpolar molecules of the json", "starts-with-punctuation"),
    (", Question 1: what protects the soft organs of the body?", "starts-with-punctuation"),
    ("How many songs are included in The Reatards?", None),
])
def test_rewrites_get_the_rules_of_a_questions_shape(question, rule):
    assert rule_rejection(candidate(question, origin="aitp"), ["self-instruct"]) == rule
    assert rule_rejection(candidate(question, origin="aitp"), []) is None  # no rules asked for


def test_a_self_instruct_tasks_instances_share_its_dedup_decision():
    pooled = "Describe the old river in one short sentence."
    items = [
        candidate("Name three famous rivers of Europe.", "", "Rhine", "self-instruct", "t1"),
        candidate("Name three famous rivers of Europe.", "", "Danube", "self-instruct", "t2"),  # same task
        candidate(pooled, "", "It flows.", "self-instruct", "p1"),
        candidate(pooled, "a map", "It is long.", "self-instruct", "p2"),  # its task was a duplicate
        candidate("Plan a quiet weekend trip to the sea.", "", "Go.", "isheep", "i1"),
        candidate("Plan a quiet weekend trip to the sea.", "", "Stay.", "isheep", "i2"),  # not one task
    ]
    found = duplicates(items, RougeDeduper(0.7, [pooled]))
    assert [c.id for c in found] == ["p1", "p2", "i2"]


def test_summary_counts_rules_duplicates_and_histograms():
    items = [candidate(id=f"c{i}") for i in range(5)] + [candidate(origin="aitp", id="a1")]
    reasons = {
        "c0": None,
        "c1": "blacklisted-word",
        "c2": DUPLICATE,
        "c3": "below-quality",
        "c4": None,
        "a1": None,
    }
    scores = {
        "c0": {"quality": 9.2, "following": 8.9},
        "c3": {"quality": 3.0, "following": 9.0},
        "c4": {"quality": 8.6, "following": 9.4},
        "a1": {"quality": 7.5, "difficulty": 4.0, "additionalInfoNeeded": 0.2},
    }
    masses = {"c0": {"quality": 0.9, "following": 0.75}, "c3": {"quality": 0.35, "following": 0.9},
              "c4": {"quality": 0.95, "following": 0.95}, "a1": {"quality": 0.55, "difficulty": 0.6,
                                                                 "additionalInfoNeeded": 0.99}}
    summary, metrics = summarize(items, reasons, scores, masses)
    assert summary["candidates"] == 6 and summary["kept"] == 3 and summary["keptRatio"] == 0.5
    assert (
        summary["duplicates"] == 1
        and summary["ruleRejects"] == 1
        and summary["belowThreshold"] == 1
    )
    assert summary["rewritten"] == 1 and summary["rewrittenKept"] == 1
    # I-SHEEP's rubrics and AITP's are averaged and counted apart.
    assert summary["meanQuality"] == pytest.approx((9.2 + 3.0 + 8.6) / 3, abs=1e-4)
    assert summary["meanRewriteQuality"] == 7.5
    assert metrics["ruleRejects"] == {"blacklisted-word": 1}
    assert metrics["histograms"]["quality"] == [0, 0, 1, 0, 0, 0, 0, 0, 2, 0]  # 3.0, 8.6, 9.2
    assert metrics["histograms"]["rewriteQuality"] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]  # 7.5
    assert sum(metrics["histograms"]["following"]) == 3 and sum(metrics["histograms"]["rewriteDifficulty"]) == 1
    # Each item's least mass over its criteria: 0.75, 0.35, 0.95, 0.55.
    assert summary["meanLabelMass"] == pytest.approx(0.65)
    assert metrics["labelMass"]["histogram"] == [0, 0, 0, 1, 0, 1, 0, 1, 0, 1]
    assert metrics["labelMass"]["min"] == 0.35 and metrics["labelMass"]["median"] == pytest.approx(0.65)
    assert "rewriteAdditionalInfoNeeded" not in metrics["histograms"]


@pytest.mark.slow
def test_a_whole_round_synthesize_then_assess_on_s3(s3_bucket, tmp_path, chain_model_dir):
    seeds_uri = upload_seeds(s3_bucket)
    model = chain_model_dir.as_uri()
    run_uri = f"{s3_bucket}/ns/isheep"
    spec = write_spec(tmp_path / "spec.json", base_spec("isheep", s3_bucket, model, seeds_uri))

    code, synthesized, stderr = run_stage("synthesize", spec, 0, run_uri, model, tmp_path)
    assert code == 0, stderr[-3000:]
    assert (
        synthesized["instructions"] == 8
        and synthesized["generated"] >= 1
        and synthesized["rewritten"] == 0
    )
    out = f"{run_uri}/round-0/synthesize"
    rows = [row for _, row in storage.iter_jsonl(f"{out}/candidates.jsonl")]
    assert len(rows) == synthesized["generated"]
    seed_ids = {row["id"] for _, row in storage.iter_jsonl(seeds_uri)}
    for row in rows:
        assert row["origin"] == "isheep" and row["round"] == 0 and row["model"] == model
        assert len(row["seed_ids"]) == 5 and set(row["seed_ids"]) <= seed_ids
        assert row["sampling"]["instruction"]["temperature"] == 1.0
    perplexity = [
        row for _, row in storage.iter_jsonl(f"{out}/seed_perplexity.jsonl")
    ]  # inverse sampling
    assert {row["id"] for row in perplexity} == seed_ids and all(
        row["perplexity"] > 1 for row in perplexity
    )
    manifest = storage.read_json(f"{out}/manifest.json")
    assert (
        manifest["summary"] == synthesized
        and manifest["outputs"]["candidates"] == f"{out}/candidates.jsonl"
    )

    code, assessed, stderr = run_stage("assess", spec, 0, run_uri, model, tmp_path)
    assert code == 0, stderr[-3000:]
    out = f"{run_uri}/round-0/assess"
    scored = [row for _, row in storage.iter_jsonl(f"{out}/scored.jsonl")]
    kept = [row for _, row in storage.iter_jsonl(f"{out}/kept.jsonl")]
    assert len(scored) == assessed["candidates"] == synthesized["generated"]
    assert len(kept) == assessed["kept"] >= 1
    assert all(set(row) == {"instruction", "input", "output"} for row in kept)
    for row in scored:
        if row["scores"]:  # the chain judge says 7 or 10 with probability 1/2 each: 8.5 > preset 8
            assert row["scores"]["quality"] == pytest.approx(8.5, abs=1e-4)
        assert (row["reject"] is None) == (row["instruction"] in {k["instruction"] for k in kept})
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["summary"] == assessed and assessed["keptRatio"] == pytest.approx(
        len(kept) / len(scored), abs=1e-4
    )
    assert sum(manifest["metrics"]["histograms"]["quality"]) == sum(
        1 for r in scored if r["scores"]
    )
    assert set(manifest["metrics"]["ruleRejects"]) <= set(manifest["metrics"]["rejects"])

    # A rerun of a complete stage is a no-op that reports the same result.
    code, again, _ = run_stage("assess", spec, 0, run_uri, model, tmp_path)
    assert code == 0 and again == assessed

    # The same candidates judged against a bar nobody reaches: exit 2, advice, no manifest.
    strict_run = f"{s3_bucket}/ns/strict"
    storage.write_bytes(
        f"{strict_run}/round-0/synthesize/candidates.jsonl",
        storage.read_bytes(f"{run_uri}/round-0/synthesize/candidates.jsonl"),
    )
    strict = write_spec(
        tmp_path / "strict.json",
        base_spec("isheep", s3_bucket, model, seeds_uri, assess={"threshold": {"quality": 9.5}}),
    )
    code, failed, _ = run_stage("assess", strict, 0, strict_run, model, tmp_path)
    assert code == 2
    assert (
        "fewer than assess.minKept 1" in failed["error"]
        and "lower assess.threshold.quality (9.5)" in failed["error"]
    )
    assert not storage.exists(f"{strict_run}/round-0/assess/manifest.json")


def test_rewrites_follow_the_decision_rule_against_rewrite_quality():
    """A small judge's expected quality crowds the middle: a rewrite's rule must follow the
    decision the run chose, not AITP's fixed >= 7 on the expected score alone."""
    labels = tuple(map(str, range(1, 11)))
    torn = ScoreDistribution(labels, (0.5,) + (0.0,) * 5 + (0.5,) + (0.0,) * 3, 1.0)  # 1 or 7
    rewrite = {"quality": torn, "difficulty": torn,
               "additionalInfoNeeded": ScoreDistribution(("yes", "no"), (0.1, 0.9), 1.0)}
    expected = Threshold(quality=8, following=8, rewrite_quality=7)
    assert threshold_rejection(rewrite, True, expected, 0.2) == "below-rewrite-quality"  # 4.0
    probable = expected.model_copy(update={"decision": "probability", "min_probability": 0.5})
    assert threshold_rejection(rewrite, True, probable, 0.2) is None  # P(score >= 7) = 0.5
    top = expected.model_copy(update={"decision": "top-fraction", "top_fraction": 0.5})
    items = [candidate(origin="aitp", id=f"a{i}") for i in range(4)] + [candidate(id="c0")]
    found = {f"a{i}": judged(quality=q, difficulty=3, additionalInfoNeeded=info)
             for i, (q, info) in enumerate([(3.0, 0.1), (5.0, 0.1), (4.0, 0.1), (9.0, 0.9)])}
    found["c0"] = judged(quality=2.0, following=2.0)
    assert score_rejections(items, found, top, 0.2) == {
        "a0": "below-rewrite-quality", "a1": None, "a2": None,  # best half of the three ranked
        "a3": "needs-additional-info", "c0": None}  # generated items are ranked apart
