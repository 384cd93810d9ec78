"""The ROUGE-L near-duplicate filter against the Self-Instruct reference, decisions checked.

    python -m bench.dedup --n 2000      # reference run in full, every decision compared
    python -m bench.dedup --n 20000     # reference time estimated from a timed random sample
    python -m bench.dedup --n 50000

Project: stages/text/dedup.py `RougeDeduper.offer` on the N candidates in order (repeated, median).
Reference: Self-Instruct's filter, rouge_score `RougeScorer(["rougeL"])` scoring each candidate
against the whole pool (seeds + accepted so far), one process (Self-Instruct maps the pool over a
4-process Pool; on this 2-core machine that would divide its time by 2 at best).

Up to --full-limit candidates the reference runs in full and every decision must equal the
project's (else exit 1). Above it, running the reference (hours) is replaced by an estimate: a
random sample of candidates is scored against the whole pool as it stood at that candidate (the
project's pool, which is the reference's pool as long as decisions agree), each sampled decision
must equal the project's (else exit 1), and the reference time is the sample's CPU time per pair
scoring times the number of pairs the reference would score (the sum of the pool sizes). The
ratio is reference CPU-seconds / project CPU-seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

from selfalign.stages.text.dedup import RougeDeduper

from . import common

THRESHOLD = 0.7
FILLERS = ("the", "a", "please", "now", "which", "of", "is", "and", "new", "text")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def load_instructions(path: Path) -> list[str]:
    texts = []
    with path.open() as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                texts.append(json.loads(raw)["instruction"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path}:{number}: field 'instruction': {exc!r}") from None
    return texts


def perturb(text: str, rng: random.Random) -> str:
    """A light edit (drop, swap or insert a few words), as a model restating a task would."""
    return edit_words(text, rng.randint(0, max(1, len(text.split()) // 4)), rng)


def edit_words(text: str, edits: int, rng: random.Random) -> str:
    """`edits` random word drops, swaps of neighbours, or filler insertions."""
    words = text.split()
    for _ in range(edits):
        op = rng.random()
        if op < 0.4 and len(words) > 1:
            del words[rng.randrange(len(words))]
        elif op < 0.7 and len(words) > 1:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words.insert(rng.randrange(len(words) + 1), rng.choice(FILLERS))
    return " ".join(words)


def candidates(source: list[str], n: int, seed: int) -> list[str]:
    """n draws with replacement, each lightly perturbed (zero edits leaves an exact repeat)."""
    rng = random.Random(seed)
    return [perturb(rng.choice(source), rng) for _ in range(n)]


def project_decisions(texts: list[str]) -> list[bool]:
    """Kept (True) or dropped, offering in order to a fresh filter."""
    deduper = RougeDeduper(THRESHOLD)
    return [deduper.offer(text) for text in texts]


def reference_duplicate(candidate: str, pool: list[str]) -> bool:
    """Self-Instruct: score the candidate against every pool item, drop it if the best is > 0.7."""
    scores = [SCORER.score(candidate, item)["rougeL"].fmeasure for item in pool]
    return bool(scores) and max(scores) > THRESHOLD


def reference_decisions(texts: list[str]) -> list[bool]:
    pool, kept = [], []
    for text in texts:
        keep = not reference_duplicate(text, pool)
        kept.append(keep)
        if keep:
            pool.append(text)
    return kept


@dataclass(frozen=True)
class Sample:
    indexes: list[int]
    cpu: np.ndarray  # CPU seconds scoring each sampled candidate against its pool
    pairs: np.ndarray  # pool size at each sampled candidate
    mismatches: list[int]

    def seconds_per_pair(self) -> float:
        return float(self.cpu.sum() / self.pairs.sum())

    def interval(self, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% bootstrap interval of the seconds per pair, over the sampled candidates."""
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(self.cpu), (draws, len(self.cpu)))
        estimates = self.cpu[picks].sum(axis=1) / np.maximum(self.pairs[picks].sum(axis=1), 1)
        low, high = np.percentile(estimates, [2.5, 97.5])
        return float(low), float(high)


def sample_reference(texts: list[str], kept: list[bool], count: int, seed: int) -> Sample:
    """Score `count` random candidates (those with a non-empty pool) as the reference would."""
    pool_sizes = np.cumsum([0] + kept[:-1])
    eligible = [i for i in range(len(texts)) if pool_sizes[i] > 0]
    indexes = sorted(random.Random(seed).sample(eligible, min(count, len(eligible))))
    accepted = [t for t, k in zip(texts, kept) if k]
    cpu, pairs, mismatches = [], [], []
    for i in indexes:
        pool = accepted[: pool_sizes[i]]
        duplicate, timing = common.timed(lambda: reference_duplicate(texts[i], pool))
        cpu.append(timing.cpu)
        pairs.append(len(pool))
        if duplicate == kept[i]:  # kept means "not a duplicate"
            mismatches.append(i)
    return Sample(indexes, np.array(cpu), np.array(pairs), mismatches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=common.T0_QUESTIONS,
                        help="JSONL with an `instruction` field per line")
    parser.add_argument("--n", type=int, default=2000, help="candidates (sampled with light perturbation)")
    parser.add_argument("--full-limit", type=int, default=2000,
                        help="up to this N the reference runs in full; above it, it is sampled")
    parser.add_argument("--sample", type=int, default=60, help="reference candidates timed above --full-limit")
    parser.add_argument("--repeats", type=int, default=3, help="project timings (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    common.header("dedup: RougeDeduper vs rouge_score RougeScorer (Self-Instruct)",
                  ("rouge-score", "rapidfuzz", "numpy"))
    texts = candidates(load_instructions(args.input), args.n, args.seed)
    common.line("input", f"{args.input} -> {len(texts)} candidates (seed {args.seed}, threshold {THRESHOLD})")

    runs = [common.timed(lambda: project_decisions(texts)) for _ in range(args.repeats)]
    kept = runs[0][0]
    if any(decisions != kept for decisions, _ in runs):
        common.line("error", "project decisions differ between repeats")
        return 1
    project = common.median_timing([t for _, t in runs])
    pairs = int(np.cumsum([0] + kept[:-1]).sum())
    common.line("kept", f"{sum(kept)} of {len(kept)} ({sum(kept) / len(kept):.1%})")
    common.line("reference pair scorings", f"{pairs:,} (sum of the pool size over candidates)")
    common.line("project", common.describe([t for _, t in runs]))
    common.line("project throughput", f"{len(texts) / project.cpu:,.0f} candidates per CPU-s")

    if args.n <= args.full_limit:
        reference_kept, reference = common.timed(lambda: reference_decisions(texts))
        mismatches = [i for i, (a, b) in enumerate(zip(kept, reference_kept)) if a != b]
        common.line("reference (run in full)", reference)
        common.line("decisions checked", f"{len(texts)} of {len(texts)}, mismatches {len(mismatches)}")
        if mismatches:
            common.line("error", f"decisions differ at candidates {mismatches[:20]}")
            return 1
        reference_cpu = reference.cpu
    else:
        sample = sample_reference(texts, kept, args.sample, args.seed)
        per_pair = sample.seconds_per_pair()
        low, high = sample.interval()
        reference_cpu = per_pair * pairs
        common.line("reference (ESTIMATED, not run in full)",
                    f"{reference_cpu:,.0f} CPU-s = {per_pair * 1e6:.1f} us per pair (95% CI "
                    f"{low * 1e6:.1f}-{high * 1e6:.1f}) x {pairs:,} pairs; timed sample: "
                    f"{len(sample.indexes)} random candidates, each scored against its whole pool "
                    f"({int(sample.pairs.sum()):,} pairs, {sample.cpu.sum():.1f} CPU-s)")
        common.line("reference estimate range", f"{low * pairs:,.0f}-{high * pairs:,.0f} CPU-s")
        common.line("decisions checked", f"{len(sample.indexes)} sampled candidates, mismatches "
                                         f"{len(sample.mismatches)}")
        if sample.mismatches:
            common.line("error", f"decisions differ at candidates {sample.mismatches[:20]}")
            return 1
    common.line("speedup (reference CPU-s / project CPU-s)", f"{reference_cpu / project.cpu:,.1f}x")
    common.ratio(reference_cpu / project.cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
