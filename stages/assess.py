"""assess: rule filters, global near-duplicate removal, self-assessment by the judge, threshold.

    python -m selfalign.stages assess --spec spec.json --round K --run-uri URI --model JUDGE

Reads round K's synthesize/candidates.jsonl, the seeds and every earlier round's
assess/kept.jsonl. Writes scored.jsonl (every candidate with its scores and the reason it was
rejected, or null) and kept.jsonl (Alpaca rows for train). The judge (`--model`, the base model
or M_K per spec.assess.judge) scores with its next-token distribution over the score tokens
(engines.py): deterministic, one prefill per item and criterion, no reply text to parse.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

from . import records, storage
from .context import StageContext, StageError, StageOutcome
from .dedup import RougeDeduper
from .engines import Engine, as_prompt, open_engine, template
from .filters import instruction_rejection, response_rejection
from .records import Candidate

log = logging.getLogger(__name__)

DUPLICATE = "rouge-l-duplicate"
TOO_LONG = "judge-prompt-too-long"
YES_NO = ("yes", "no")
AITP_CRITERIA = {  # the last line of judge_aitp.txt per criterion, and its labels
    "quality": ("Quality (score 1-10): ", None),
    "difficulty": ("Difficulty (score 1-10): ", None),
    "additionalInfoNeeded": ("Additional information needed (yes or no): ", YES_NO),
}
HISTOGRAM_EDGES = np.arange(0.5, 11.5)  # one bin per integer score 1..10


def earlier_kept(ctx: StageContext) -> list[dict]:
    """Every item kept by rounds 0..K-1, in round order (the dedup pool, the machine pool)."""
    kept = []
    for round_ in range(ctx.round):
        kept += records.read_instruction_file(f"{ctx.stage_out(round_, 'assess')}/kept.jsonl")
    return kept


def run(ctx: StageContext) -> StageOutcome:
    spec, rules = ctx.spec, ctx.spec.assess.rules
    candidates = records.read_candidates(
        f"{ctx.stage_out(ctx.round, 'synthesize')}/candidates.jsonl"
    )
    pool = [s.instruction for s in records.load_seeds(spec.seeds)] + [
        r["instruction"] for r in earlier_kept(ctx)
    ]

    reasons: dict[str, str | None] = {c.id: rule_rejection(c, rules) for c in candidates}
    deduper = RougeDeduper(spec.assess.dedup.rouge_l, pool)
    for c in duplicates([c for c in candidates if reasons[c.id] is None], deduper):
        reasons[c.id] = DUPLICATE
    survivors = [c for c in candidates if reasons[c.id] is None]

    engine = open_engine(
        storage.local_path(ctx.model, ctx.scratch),
        spec.engine,
        spec.model.dtype,
        spec.resources.assess.gpus,
        spec.synthesize.seed,
    )
    chat = ctx.model != spec.model.base
    scores = judge(engine, survivors, chat)
    threshold = spec.assess.threshold
    for c in survivors:
        reasons[c.id] = threshold_rejection(scores[c.id], c.origin == "aitp", threshold)

    kept = [c for c in candidates if reasons[c.id] is None]
    outputs = {"scored": f"{ctx.out}/scored.jsonl", "kept": f"{ctx.out}/kept.jsonl"}
    storage.write_jsonl(
        outputs["scored"],
        ({**c.to_json(), "scores": scores.get(c.id), "reject": reasons[c.id]} for c in candidates),
    )
    storage.write_jsonl(
        outputs["kept"], (records.to_alpaca(c.instruction, c.input, c.output) for c in kept)
    )

    summary, metrics = summarize(candidates, reasons, scores)
    log.info(
        "assess done %s",
        " ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)),
    )
    if len(kept) < spec.assess.min_kept:
        top = dict(Counter(r for r in reasons.values() if r).most_common(4))
        raise StageError(
            f"kept {len(kept)} of {len(candidates)} candidates, fewer than assess.minKept "
            f"{spec.assess.min_kept} (rejects: {top}): lower assess.threshold.quality "
            f"({threshold.quality}) or assess.threshold.following ({threshold.following}), "
            "drop rule families from assess.rules, or raise synthesize.instructionsPerRound "
            f"({spec.synthesize.instructions_per_round})"
        )
    return StageOutcome(summary=summary, outputs=outputs, metrics=metrics)


def duplicates(candidates: Sequence[Candidate], deduper: RougeDeduper) -> list[Candidate]:
    """The candidates whose instruction is a near-duplicate of the pool or of an earlier one. A
    Self-Instruct task's instances (several candidates, one instruction) share the decision its
    instruction got the first time, instead of duplicating each other."""
    decided: dict[str, bool] = {}  # Self-Instruct instruction -> accepted
    found = []
    for c in candidates:
        if c.origin == "self-instruct" and c.instruction in decided:
            accepted = decided[c.instruction]
        else:
            accepted = deduper.offer(c.instruction)
            if c.origin == "self-instruct":
                decided[c.instruction] = accepted
        if not accepted:
            found.append(c)
    return found


def rule_rejection(candidate: Candidate, families: Sequence[str]) -> str | None:
    """The first rule that rejects the item: Self-Instruct's and I-SHEEP's instruction rules of
    `families`, then I-SHEEP's response rules when "isheep" is among them."""
    rule = (
        instruction_rejection(candidate.instruction, candidate.input, families)
        if families
        else None
    )
    if rule is None and "isheep" in families:
        rule = response_rejection(candidate.instruction, candidate.input, candidate.output)
    return rule


def judge(engine: Engine, candidates: Sequence[Candidate], chat: bool) -> dict[str, dict | None]:
    """Scores per candidate id: I-SHEEP quality and following for generated items; AITP quality,
    difficulty and P(additional information needed) for rewrites. None: a prompt too long."""
    generated = [c for c in candidates if c.origin != "aitp"]
    rewritten = [c for c in candidates if c.origin == "aitp"]
    results: dict[str, dict | None] = {}
    columns = {}
    for name in ("quality", "following"):
        prompts = [
            as_prompt(
                template(f"judge_{name}.txt").format(request=request_text(c), response=c.output),
                chat,
            )
            for c in generated
        ]
        columns[name] = engine.score(prompts, desc=f"judge {name}")
    for i, c in enumerate(generated):
        found = {name: column[i] for name, column in columns.items()}
        results[c.id] = (
            None if None in found.values() else {n: d.expected for n, d in found.items()}
        )
    columns = {}
    for name, (criterion, labels) in AITP_CRITERIA.items():
        prompts = [
            as_prompt(
                template("judge_aitp.txt").format(query=request_text(c), criterion=criterion), chat
            )
            for c in rewritten
        ]
        columns[name] = engine.score(prompts, labels or range(1, 11), desc=f"judge {name}")
    for i, c in enumerate(rewritten):
        found = {name: column[i] for name, column in columns.items()}
        results[c.id] = (
            None
            if None in found.values()
            else {n: d.prob("yes") if AITP_CRITERIA[n][1] else d.expected for n, d in found.items()}
        )
    return results


def request_text(c: Candidate) -> str:
    """Instruction and input as I-SHEEP's judge prompt joins them."""
    return f"{c.instruction} {c.input}" if c.input else c.instruction


def threshold_rejection(scores: dict | None, rewrite: bool, threshold) -> str | None:
    """Generated: quality > threshold.quality and following > threshold.following. Rewrites:
    quality >= threshold.rewriteQuality and additional information not needed (P(yes) < 0.5)."""
    if scores is None:
        return TOO_LONG
    if rewrite:
        if scores["quality"] < threshold.rewrite_quality:
            return "below-rewrite-quality"
        return "needs-additional-info" if scores["additionalInfoNeeded"] >= 0.5 else None
    if scores["quality"] <= threshold.quality:
        return "below-quality"
    return "below-following" if scores["following"] <= threshold.following else None


def score_column(origin: str, name: str) -> str:
    """Where a judge score is counted: I-SHEEP's rubrics (generated items) and AITP's (rewrites,
    e.g. "rewriteQuality") judge different things, so their columns stay apart."""
    return f"rewrite{name[0].upper()}{name[1:]}" if origin == "aitp" else name


def summarize(
    candidates: Sequence[Candidate], reasons: dict[str, str | None], scores: dict[str, dict | None]
) -> tuple[dict, dict]:
    """(summary for the operator, metrics for the manifest)."""
    rejects = Counter(r for r in reasons.values() if r)
    scoring = {
        "below-quality",
        "below-following",
        "below-rewrite-quality",
        "needs-additional-info",
        TOO_LONG,
    }
    rule_rejects = {r: n for r, n in rejects.items() if r not in scoring and r != DUPLICATE}
    kept = sum(r is None for r in reasons.values())
    columns: dict[str, list[float]] = {}
    for c in candidates:
        for name, value in (scores.get(c.id) or {}).items():
            columns.setdefault(score_column(c.origin, name), []).append(value)
    histograms = {
        name: np.histogram(values, HISTOGRAM_EDGES)[0].tolist()
        for name, values in columns.items()
        if name != score_column("aitp", "additionalInfoNeeded")  # a probability, not a 1-10 score
    }
    summary = {
        "candidates": len(candidates),
        "kept": kept,
        "keptRatio": round(kept / len(candidates), 4) if candidates else 0.0,
        "duplicates": rejects[DUPLICATE],
        "ruleRejects": sum(rule_rejects.values()),
        "belowThreshold": sum(n for r, n in rejects.items() if r in scoring),
        "rewritten": sum(c.origin == "aitp" for c in candidates),
        "rewrittenKept": sum(c.origin == "aitp" and reasons[c.id] is None for c in candidates),
    }
    for name in ("quality", "following", "rewriteQuality"):
        if columns.get(name):
            summary[f"mean{name[0].upper()}{name[1:]}"] = round(float(np.mean(columns[name])), 4)
    metrics = {
        "ruleRejects": rule_rejects,
        "rejects": dict(rejects),
        "histograms": histograms,
        "histogramBins": list(range(1, 11)),
        "keptRatio": summary["keptRatio"],
    }
    return summary, metrics
