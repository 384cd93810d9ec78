"""k-NN coverage with faiss (the coverage stage's code) against a numpy brute force; embedder speed.

    python -m bench.coverage --n 2000
    python -m bench.coverage --n 20000
    python -m bench.coverage --n 100000

Both sides compute what the coverage stage computes (stages/vectors/coverage_report.py `score`): for each
of N reference documents its nearest instruction item (coverage) and its SFT density (the share of
instruction items among its k = 10 nearest neighbours in reference + instructions, itself
excluded), with N // 4 instruction items. Vectors: random unit vectors of the embedder's size
(384), so the sizes need no embedding; both sides get the same arrays and run with the same 2 BLAS
threads. Project: `score(...)` with the stage's default exactSearchLimit (100,000 vectors: exact
`IndexFlatIP` search up to it, so this is exact search against exact search). Reference: one
matrix product per block of documents against all vectors and `np.argpartition` for the top k.

Above --full-limit documents the brute force runs on a random sample of documents and its time is
scaled by N / sample (its cost is linear in the documents; the output says so); its results are
compared with the project's on the documents it computed. The ratio is reference CPU-seconds /
project CPU-seconds. Last, the throughput of the default embedder (builtin://all-minilm-l6-v2)
on real text: reference passages and instruction-like questions.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import threadpoolctl

from selfalign.operator.spec import Coverage
from selfalign.stages.runtime import builtin
from selfalign.stages.vectors import coverage_report, embeddings

from . import common

DIMENSIONS = 384  # all-MiniLM-L6-v2
K = Coverage.model_fields["k"].default
EXACT_LIMIT = Coverage.model_fields["exact_search_limit"].default
EMBEDDER = Coverage.model_fields["embedder"].default
BLOCK = 512  # documents per matrix product: a 512 x (N + N/4) float32 block is < 300 MB at 100k


def unit_vectors(count: int, rng: np.random.Generator) -> np.ndarray:
    vectors = rng.standard_normal((count, DIMENSIONS), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def brute_force(reference: np.ndarray, items: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(nearest item similarity, SFT density) of the documents `rows`, from full similarity rows."""
    everything = np.vstack([reference, items])
    is_item = np.arange(len(everything)) >= len(reference)
    nearest, density = [], []
    for start in range(0, len(rows), BLOCK):
        block = rows[start:start + BLOCK]
        similarities = reference[block] @ everything.T
        similarities[np.arange(len(block)), block] = -np.inf  # the document itself
        top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        density.append(is_item[top].mean(axis=1))
        nearest.append(similarities[:, len(reference):].max(axis=1))
    return np.concatenate(nearest), np.concatenate(density)


def embedding_throughput(scratch: Path, passages: int, questions: int) -> None:
    """Texts per second of the stage's embedder on passages and on short instructions."""
    passages = [json.loads(line)["text"] for line in builtin.data_path("reference-sample").read_text().splitlines()
                if line.strip()][:passages]
    instructions = [json.loads(line)["instruction"] for line in common.T0_QUESTIONS.read_text().splitlines()
                    if line.strip()][:questions]
    embedder, loading = common.timed(lambda: embeddings.Embedder(EMBEDDER, scratch))
    common.line("embedder", f"{EMBEDDER} ({embedder.dimensions} dims, max_seq_length "
                            f"{embedder.model.max_seq_length}, device {embedder.model.device}), loaded in {loading}")
    embedder.encode(passages[:8])  # warm-up: the first batch pays one-time set-up
    for name, texts in (("reference passages", passages), ("instructions (t0 questions)", instructions)):
        _, timing = common.timed(lambda: embedder.encode(texts))
        words = sum(len(t.split()) for t in texts) / len(texts)
        common.line(f"embedding {name}", f"{len(texts)} texts ({words:.0f} words avg) in {timing}: "
                                         f"{len(texts) / timing.wall:.1f} texts/s wall, "
                                         f"{len(texts) / timing.cpu:.1f} texts per CPU-s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="reference documents (instruction items: n // 4)")
    parser.add_argument("--full-limit", type=int, default=20000,
                        help="above this many documents the brute force runs on a sample of them")
    parser.add_argument("--sample", type=int, default=5000, help="documents the brute force computes above --full-limit")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each side up to --full-limit (median)")
    parser.add_argument("--passages", type=int, default=335, help="reference passages embedded (335 ship)")
    parser.add_argument("--questions", type=int, default=1000, help="t0 questions embedded")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    common.header("coverage: faiss k-NN (coverage_report.score) vs numpy brute force; embedder throughput",
                  ("faiss-cpu", "numpy", "sentence-transformers", "torch"))
    rng = np.random.default_rng(args.seed)
    reference, items = unit_vectors(args.n, rng), unit_vectors(args.n // 4, rng)
    before = np.zeros((0, DIMENSIONS), np.float32)
    common.line("data", f"{args.n:,} reference documents + {len(items):,} instruction items, random unit "
                        f"vectors of {DIMENSIONS} dims, k={K}, exactSearchLimit={EXACT_LIMIT:,}")
    common.line("threads", ", ".join(f"{lib['internal_api']} {lib['num_threads']} ({Path(lib['filepath']).name})"
                                     for lib in threadpoolctl.threadpool_info()))
    repeats = args.repeats if args.n <= args.full_limit else 1

    runs = [common.timed(lambda: coverage_report.score(reference, before, items, K, EXACT_LIMIT))
            for _ in range(repeats)]
    scores, project = runs[0][0], common.median_timing([t for _, t in runs])
    common.line("project index", json.dumps(scores.search["reference"]))
    common.line("project", common.describe([t for _, t in runs]))

    if args.n <= args.full_limit:
        rows = np.arange(args.n)
        brute = [common.timed(lambda: brute_force(reference, items, rows, K)) for _ in range(repeats)]
        (nearest, density), timing = brute[0][0], common.median_timing([t for _, t in brute])
        reference_cpu = timing.cpu
        common.line("reference (numpy brute force, all documents)", common.describe([t for _, t in brute]))
    else:
        rows = np.sort(rng.choice(args.n, min(args.sample, args.n), replace=False))
        (nearest, density), timing = common.timed(lambda: brute_force(reference, items, rows, K))
        reference_cpu = timing.cpu * args.n / len(rows)
        common.line("reference (numpy brute force, ESTIMATED)",
                    f"{reference_cpu:.1f} CPU-s = {timing} on {len(rows):,} random documents x "
                    f"{args.n / len(rows):.1f} (cost is linear in the documents)")
    nearest_diff = float(np.abs(nearest - scores.nearest[rows]).max())
    same_density = float(np.mean(density == scores.density[rows]))
    common.line("agreement", f"{len(rows):,} documents compared: nearest similarity max |diff| "
                             f"{nearest_diff:.2e}; SFT density identical for {same_density:.2%}"
                             + ("" if same_density == 1 else
                                " (the rest: a near-tie at the k-th neighbour rounded differently)"))
    common.line("mean nearest-item similarity", f"project {scores.nearest[rows].mean():.6f}, brute force "
                                                f"{nearest.mean():.6f}; mean SFT density project "
                                                f"{scores.density[rows].mean():.6f}, brute force {density.mean():.6f}")
    with tempfile.TemporaryDirectory() as scratch:
        embedding_throughput(Path(scratch), args.passages, args.questions)
    common.line("speedup (reference CPU-s / project CPU-s)", f"{reference_cpu / project.cpu:.2f}x")
    common.ratio(reference_cpu / project.cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
