"""Stage coverage: how well the run's instruction data covers the reference corpus, and its gaps.

    python -m selfalign.stages coverage --spec spec.json --round K --run-uri URI

Instruction data is the seeds plus every round's kept items up to round K; "before" leaves out
round K's. Writes report.json (every metric), gaps.jsonl (the `coverage.gapDocsPerRound` least
covered reference rows, as given, which round K+1's synthesize rewrites into instructions, AITP)
and coverage.png (the map) to round-K/coverage/. Embeddings are cached under
<storage.uri>/cache/embeddings/<sha256 of embedder + texts>.npy: content-addressed, so every round
and every run over the same bucket embeds a reference corpus once, and each round embeds only its
new data. Scores and gap selection: coverage_report.py.
"""
from __future__ import annotations

from .runtime import storage
from .runtime.context import StageContext, StageOutcome
from .vectors.coverage_report import alpaca_set, analyse, read_reference, seed_set, write_outputs
from .vectors.embeddings import Embedder


def run(ctx: StageContext) -> StageOutcome:
    config = ctx.spec.coverage
    reference = read_reference(config.reference, ctx.scratch)
    sets = [seed_set(ctx.spec.seeds, new=False)] + [
        alpaca_set(storage.join(ctx.stage_out(k, "assess"), "kept.jsonl"), new=k == ctx.round)
        for k in range(ctx.round + 1)]
    cache = storage.join(ctx.spec.storage.uri, "cache", "embeddings")
    with ctx.setup("load"):  # its download too: the embedder is small, and usually builtin://
        embedder = Embedder(config.embedder, ctx.scratch)
    analysis = analyse(reference, sets, embedder, config, cache, ctx.scratch)
    outputs = write_outputs(ctx.out, analysis)
    return StageOutcome(summary=summary(analysis.report), outputs=outputs, metrics=analysis.report)


def summary(report: dict) -> dict:
    """The numbers the operator puts in status (camelCase, like the rest of status)."""
    return {
        "coverage": report["coverage"],
        "coverageBefore": report["coverage_before"],
        "coverageGain": report["coverage_gain"],
        "referenceDocs": report["reference"]["docs"],
        "instructionItems": report["instructions"]["items"],
        "gapDocs": report["gaps"]["selected"],
        "meanSftDensity": report["sft_density"]["mean"],
    }
