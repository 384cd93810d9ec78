"""assess: rules, dedup, thresholds, summary; and a whole round synthesize -> assess on S3."""

from __future__ import annotations

import pytest

from selfalign.operator.spec import Threshold
from selfalign.stages import storage
from selfalign.stages.assess import DUPLICATE, duplicates, rule_rejection, summarize, threshold_rejection
from selfalign.stages.dedup import RougeDeduper
from selfalign.stages.records import Candidate
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


def test_thresholds_for_generated_and_rewritten_items():
    t = Threshold(quality=8, following=8, rewrite_quality=7)
    assert threshold_rejection({"quality": 8.5, "following": 8.1}, False, t) is None
    assert (
        threshold_rejection({"quality": 8.0, "following": 9}, False, t) == "below-quality"
    )  # strictly above
    assert threshold_rejection({"quality": 9, "following": 8.0}, False, t) == "below-following"
    assert (
        threshold_rejection({"quality": 7.0, "difficulty": 3, "additionalInfoNeeded": 0.1}, True, t)
        is None
    )
    assert (
        threshold_rejection({"quality": 6.9, "difficulty": 3, "additionalInfoNeeded": 0.1}, True, t)
        == "below-rewrite-quality"
    )
    assert (
        threshold_rejection({"quality": 9, "difficulty": 3, "additionalInfoNeeded": 0.7}, True, t)
        == "needs-additional-info"
    )
    assert threshold_rejection(None, False, t) == "judge-prompt-too-long"


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
    summary, metrics = summarize(items, reasons, scores)
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
