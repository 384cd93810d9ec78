"""dedup.py against the reference: rouge_score's RougeScorer(["rougeL"]) without stemming."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from bench.dedup import edit_words
from selfalign.stages.runtime import storage
from selfalign.stages.text.dedup import RougeDeduper, dedup_file, rouge_l, rouge_tokens

QUESTIONS = Path(__file__).resolve().parents[1] / "bench" / "data" / "t0-questions.jsonl"
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def perturb(text: str, rng: random.Random) -> str:
    """10-45% of the words edited (more than the benchmark's light edits): many pairs land near 0.7."""
    return edit_words(text, max(1, round(len(text.split()) * rng.uniform(0.1, 0.45))), rng)


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines()]


@pytest.fixture(scope="module")
def scored_pairs(questions) -> list[tuple[str, str, float]]:
    """6,000 (target, prediction, reference F1): a question and its perturbed copy, a question and
    another of its domain (same template), and two perturbed copies of one question."""
    rng = random.Random(0)
    by_domain: dict[str, list[str]] = {}
    for q in questions:
        by_domain.setdefault(q["domain"], []).append(q["instruction"])
    pairs = []
    for q in rng.sample(questions, 2000):
        a = q["instruction"]
        pairs += [(a, perturb(a, rng)), (a, rng.choice(by_domain[q["domain"]])), (perturb(a, rng), perturb(a, rng))]
    return [(a, b, reference(a, b)) for a, b in pairs]


def test_pairs_crowd_the_threshold(scored_pairs):
    scores = [f for _, _, f in scored_pairs]
    assert len(scores) >= 5000
    assert sum(0.6 <= f <= 0.8 for f in scores) / len(scores) > 0.25
    assert sum(0.6 <= f <= 0.7 for f in scores) > 300 and sum(0.7 < f <= 0.8 for f in scores) > 300


def test_tokens_are_rouge_scores(scored_pairs):
    tokenizer = SCORER._tokenizer
    for text in [a for a, _, _ in scored_pairs[:500]] + ["", "  ", "İstanbul's ÜBER-cool K-9 (v2.0)!", "a\nb\tc"]:
        assert rouge_tokens(text) == tokenizer.tokenize(text)


def test_scores_are_bit_identical(scored_pairs):
    for a, b, expected in scored_pairs:
        assert rouge_l(a, b) == expected
        assert rouge_l(b, a) == expected


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_decisions_are_identical(scored_pairs, threshold):
    for a, b, expected in scored_pairs:
        duplicate, score, index = RougeDeduper(threshold, [a]).is_duplicate(b)
        assert duplicate == (expected > threshold), (a, b, expected)
        if duplicate:
            assert (score, index) == (expected, 0)
        else:
            assert index is None and score in (expected, 0.0)  # 0.0: pruned, it could not exceed


def test_float_ties_at_the_threshold_decide_as_the_reference():
    """2*7/(7+13) is 0.7 exactly, but rouge_score's float expression gives 0.7000000000000001 > 0.7:
    a duplicate. 2*7/(10+10) evaluates to exactly 0.7: not one. Pruning must keep both pairs."""
    target = "w1 w2 w3 w4 w5 w6 w7"
    prediction = target + " x1 x2 x3 x4 x5 x6"
    assert reference(target, prediction) > 0.7
    assert RougeDeduper(0.7, [target]).is_duplicate(prediction)[0]

    target = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    prediction = "w1 w2 w3 w4 w5 w6 w7 x1 x2 x3"
    assert reference(target, prediction) == 0.7
    assert not RougeDeduper(0.7, [target]).is_duplicate(prediction)[0]


def test_pool_decisions_and_best_match(questions):
    rng = random.Random(1)
    short = [q["instruction"] for q in questions if len(q["instruction"].split()) <= 25]
    pool = rng.sample(short, 150)
    pool += [perturb(rng.choice(pool), rng) for _ in range(50)]
    queries = [perturb(rng.choice(pool), rng) for _ in range(60)] + rng.sample(short, 20)
    deduper = RougeDeduper(0.7, pool)
    assert len(deduper) == len(pool)
    duplicates = 0
    for query in queries:
        scores = [reference(item, query) for item in pool]
        duplicate, best, index = deduper.is_duplicate(query)
        assert duplicate == (max(scores) > 0.7)
        if duplicate:
            duplicates += 1
            assert best == max(scores) == scores[index]
    assert 10 < duplicates < len(queries)


K = "one two three four five six seven eight nine ten"
R = "one two three four five six seven eight alpha beta"  # F1 0.8 against K
S = "three four five six seven eight alpha beta gamma delta"  # 0.6 against K, 0.8 against R


def test_offer_keeps_in_order_and_counts_earlier_items_of_the_batch():
    deduper = RougeDeduper(0.7)
    assert [deduper.offer(text) for text in (K, R, S, K.upper())] == [True, False, True, False]
    assert len(deduper) == 2  # R was rejected, so it never entered the pool: S survives
    assert deduper.is_duplicate(R) == (True, reference(K, R), 0)


def test_texts_without_tokens_are_never_duplicates():
    deduper = RougeDeduper(0.7, ["", "¿¡ ñ", K])
    assert deduper.is_duplicate("") == (False, 0.0, None)
    assert deduper.is_duplicate("¿¡ ñ") == (False, 0.0, None)  # rouge_score scores empty token lists 0
    assert deduper.is_duplicate("unseen words only here") == (False, 0.0, None)


def test_threshold_must_be_a_fraction():
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
        RougeDeduper(1.5)


def write_rows(uri: str, instructions: list[str]) -> list[dict]:
    rows = [{"instruction": text, "input": "", "output": f"out {i}", "id": i} for i, text in enumerate(instructions)]
    storage.write_jsonl(uri, rows)
    return rows


def test_dedup_file(tmp_path):
    pool, candidates, out = ((tmp_path / name).as_uri() for name in ("pool.jsonl", "c.jsonl", "out.jsonl"))
    write_rows(pool, [K, "Name a capital city of Europe"])
    rows = write_rows(candidates, [R, S, "Name the capital city of Europe", "Give three uses of copper",
                                   "Give three uses for copper"])
    counts = dedup_file(pool, candidates, out, threshold=0.7)
    assert counts == {"candidates": 5, "kept": 2, "duplicates": 3, "pool": 2}
    assert [row for _, row in storage.iter_jsonl(out)] == [rows[1], rows[3]]  # unchanged, in order


def test_dedup_file_without_pool_on_s3(s3_bucket):
    candidates, out = f"{s3_bucket}/c.jsonl", f"{s3_bucket}/out.jsonl"
    rows = write_rows(candidates, [K, R, S])
    assert dedup_file(None, candidates, out, threshold=0.7) == {"candidates": 3, "kept": 2, "duplicates": 1, "pool": 0}
    assert [row for _, row in storage.iter_jsonl(out)] == [rows[0], rows[2]]
