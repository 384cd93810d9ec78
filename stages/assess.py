"""assess: rule filters, global near-duplicate removal, self-assessment by the judge, threshold.

    python -m selfalign.stages assess --spec spec.json --round K --run-uri URI --model JUDGE

Reads round K's synthesize/candidates.jsonl, the seeds and every earlier round's
assess/kept.jsonl. Writes scored.jsonl (every candidate with its scores and the reason it was
rejected, or null) and kept.jsonl (Alpaca rows for train). The judge (`--model`, the base model
or M_K per spec.assess.judge) scores with its next-token distribution over the score tokens
(engines.py): deterministic, one prefill per item and criterion, no reply text to parse.

Decision rule (spec.assess.threshold.decision). I-SHEEP samples one "<score>||..." reply at
temperature 1 and keeps an item when that sampled score is above 8 on both criteria; its expected
outcome is P(score > 8) per criterion. `expected` (the default) keeps an item when the expected
score is above the cut-off: deterministic, and it uses the whole distribution. A small judge
spreads its probability over the scale, so its expected scores crowd the middle and a cut-off set
for a 72B judge keeps nothing: `probability` keeps an item when P(score > cut-off) reaches
minProbability on both criteria (I-SHEEP's rule in expectation), and `top-fraction` ranks the
judged items by their mean expected score and keeps the best share, whatever the judge's scale.
Every judged item records its label mass (the probability the judge put on the labels at all);
below assess.labelMassFloor the score means nothing and the item is rejected by a named rule.
AITP rewrites are judged by AITP's rubric, after the rules of a question's shape only (length, a
leading punctuation mark): the Self-Instruct and I-SHEEP keyword rules remove exactly the
gap-domain questions that rewriting exists to add. The same decision applies to
their quality against rewriteQuality (AITP keeps quality >= 7: `expected` compares the expected
score, `probability` P(score >= rewriteQuality), `top-fraction` ranks the rewrites among
themselves), and a rewrite that needs additional information is rejected under every decision.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .text import records
from .runtime import storage
from .runtime.context import StageContext, StageError, StageOutcome
from .text.dedup import RougeDeduper
from .models.engines import Engine, ScoreDistribution, open_engine, template
from .text.filters import instruction_rejection, question_rejection, response_rejection
from .text.prompting import JUDGE
from .text.records import Candidate

log = logging.getLogger(__name__)

DUPLICATE = "rouge-l-duplicate"
TOO_LONG = "judge-prompt-too-long"
LOW_MASS = "judge-label-mass-below-floor"
YES_NO = ("yes", "no")
SCORE_PREFIX = "Score:"  # opens the judge's assistant turn in chat form (prompting.py)
ANSWER_PREFIX = "Answer:"
# AITP's three criteria, each asked as a question after the rubric (judge_aitp.txt), with the
# prefix that opens the judge's reply and the labels. Prefilling the rubric's own line instead
# ("Quality (score 1-10): ") left SmolLM2-135M 0.27 of its mass on the scores and 0.02 on yes/no,
# so every rewrite fell under the label-mass floor (docs/architecture.md, "A real model").
AITP_CRITERIA = {
    "quality": ("How clear and accurate is the query? Reply with a score from 1 to 10.", SCORE_PREFIX, None),
    "difficulty": ("How difficult is the query? Reply with a score from 1 to 10.", SCORE_PREFIX, None),
    "additionalInfoNeeded": ("Does answering the query need information that the query does not give? "
                             "Reply with yes or no.", ANSWER_PREFIX, YES_NO),
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

    with ctx.setup("download"):
        model_dir = storage.local_path(ctx.model, ctx.scratch)
    with ctx.setup("load"):
        engine = open_engine(model_dir, spec, spec.resources.assess.gpus, spec.synthesize.seed)
    judged = judge(engine, survivors)
    scores = {cid: expected_scores(found) for cid, found in judged.items()}
    masses = {cid: found and {n: d.mass for n, d in found.items()} for cid, found in judged.items()}
    threshold = spec.assess.threshold
    reasons.update(score_rejections(survivors, judged, threshold, spec.assess.label_mass_floor))

    kept = [c for c in candidates if reasons[c.id] is None]
    outputs = {"scored": f"{ctx.out}/scored.jsonl", "kept": f"{ctx.out}/kept.jsonl"}
    storage.write_jsonl(
        outputs["scored"],
        (
            {**c.to_json(), "scores": scores.get(c.id), "labelMass": masses.get(c.id),
             "reject": reasons[c.id]}
            for c in candidates
        ),
    )
    storage.write_jsonl(
        outputs["kept"], (records.to_alpaca(c.instruction, c.input, c.output) for c in kept)
    )

    summary, metrics = summarize(candidates, reasons, scores, masses)
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
    `families`, then I-SHEEP's response rules when "isheep" is among them. AITP rewrites get only
    the rules of a question's shape: AITP's own rubric judges them (module docstring)."""
    if candidate.origin == "aitp":
        return question_rejection(candidate.instruction) if families else None
    rule = (
        instruction_rejection(candidate.instruction, candidate.input, families)
        if families
        else None
    )
    if rule is None and "isheep" in families:
        rule = response_rejection(candidate.instruction, candidate.input, candidate.output)
    return rule


Judged = dict[str, ScoreDistribution]  # criterion -> the judge's distribution


def judge(engine: Engine, candidates: Sequence[Candidate]) -> dict[str, Judged | None]:
    """Distributions per candidate id: I-SHEEP quality and following for generated items; AITP
    quality, difficulty and additional information needed for rewrites. None: a prompt too long."""
    generated = [c for c in candidates if c.origin != "aitp"]
    rewritten = [c for c in candidates if c.origin == "aitp"]
    results: dict[str, Judged | None] = {}
    columns = {}
    for name in ("quality", "following"):
        prompts = [
            engine.prompt(
                JUDGE,
                template(f"judge_{name}.txt").format(request=request_text(c), response=c.output),
                SCORE_PREFIX,
            )
            for c in generated
        ]
        columns[name] = engine.score(prompts, desc=f"judge {name}")
    for i, c in enumerate(generated):
        found = {name: column[i] for name, column in columns.items()}
        results[c.id] = None if None in found.values() else found
    columns = {}
    for name, (question, prefix, labels) in AITP_CRITERIA.items():
        prompts = [
            engine.prompt(JUDGE, template("judge_aitp.txt").format(query=request_text(c), question=question),
                          prefix, prefix_raw=True)
            for c in rewritten
        ]
        columns[name] = engine.score(prompts, labels or range(1, 11), desc=f"judge {name}")
    for i, c in enumerate(rewritten):
        found = {name: column[i] for name, column in columns.items()}
        results[c.id] = None if None in found.values() else found
    return results


def expected_scores(found: Judged | None) -> dict | None:
    """What scored.jsonl shows: each criterion's expected score, P(yes) for a yes/no criterion."""
    if found is None:
        return None
    return {n: d.prob("yes") if "yes" in d.labels else d.expected for n, d in found.items()}


def request_text(c: Candidate) -> str:
    """Instruction and input as I-SHEEP's judge prompt joins them."""
    return f"{c.instruction} {c.input}" if c.input else c.instruction


def prob_above(found: ScoreDistribution, cut_off: float, inclusive: bool = False) -> float:
    return sum(p for label, p in zip(found.labels, found.probs)
               if float(label) > cut_off or (inclusive and float(label) == cut_off))


def threshold_rejection(found: Judged | None, rewrite: bool, threshold, floor: float) -> str | None:
    """One item's verdict. Generated: per threshold.decision (module docstring; top-fraction is
    decided over all items by score_rejections). Rewrites: quality >= threshold.rewriteQuality and
    additional information not needed (P(yes) < 0.5)."""
    if found is None:
        return TOO_LONG
    if min(d.mass for d in found.values()) < floor:
        return LOW_MASS
    if rewrite:
        if found["additionalInfoNeeded"].prob("yes") >= 0.5:
            return "needs-additional-info"
        quality, cut_off = found["quality"], threshold.rewrite_quality
        below = {
            "expected": lambda: quality.expected < cut_off,
            "probability": lambda: prob_above(quality, cut_off, inclusive=True) < threshold.min_probability,
            "top-fraction": lambda: False,  # ranked among the rewrites by score_rejections
        }[threshold.decision]()
        return "below-rewrite-quality" if below else None
    if threshold.decision == "top-fraction":
        return None
    for name, cut_off in (("quality", threshold.quality), ("following", threshold.following)):
        passed = (
            prob_above(found[name], cut_off) >= threshold.min_probability
            if threshold.decision == "probability"
            else found[name].expected > cut_off
        )
        if not passed:
            return f"below-{name}"
    return None


def score_rejections(
    candidates: Sequence[Candidate], judged: dict[str, Judged | None], threshold, floor: float
) -> dict[str, str | None]:
    """Every judged candidate's verdict. Under top-fraction, the generated items that pass the
    other rules are ranked by their summed expected scores, the rewrites apart by expected quality,
    and the best ceil(topFraction * n) of each are kept (ties broken by candidate order)."""
    verdicts = {
        c.id: threshold_rejection(judged[c.id], c.origin == "aitp", threshold, floor)
        for c in candidates
    }
    if threshold.decision == "top-fraction":
        for rewrites, rank_by, rule in (
            (False, lambda j: sum(d.expected for d in j.values()), "below-top-fraction"),
            (True, lambda j: j["quality"].expected, "below-rewrite-quality"),
        ):
            ranked = [c for c in candidates
                      if (c.origin == "aitp") == rewrites and verdicts[c.id] is None]
            ranked.sort(key=lambda c: -rank_by(judged[c.id]))
            for c in ranked[math.ceil(threshold.top_fraction * len(ranked)):]:
                verdicts[c.id] = rule
    return verdicts


def score_column(origin: str, name: str) -> str:
    """Where a judge score is counted: I-SHEEP's rubrics (generated items) and AITP's (rewrites,
    e.g. "rewriteQuality") judge different things, so their columns stay apart."""
    return f"rewrite{name[0].upper()}{name[1:]}" if origin == "aitp" else name


MASS_EDGES = np.linspace(0.0, 1.0, 11)  # label mass histogram: ten bins of 0.1


def summarize(
    candidates: Sequence[Candidate],
    reasons: dict[str, str | None],
    scores: dict[str, dict | None],
    masses: dict[str, dict | None],
) -> tuple[dict, dict]:
    """(summary for the operator, metrics for the manifest)."""
    rejects = Counter(r for r in reasons.values() if r)
    scoring = {
        "below-quality",
        "below-following",
        "below-top-fraction",
        "below-rewrite-quality",
        "needs-additional-info",
        LOW_MASS,
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
    mass = [min(m.values()) for m in masses.values() if m]
    if mass:
        summary["meanLabelMass"] = round(float(np.mean(mass)), 4)
    metrics = {
        "labelMass": {
            "histogram": np.histogram(mass, MASS_EDGES)[0].tolist(),
            "edges": MASS_EDGES.round(1).tolist(),
            "min": min(mass, default=None),
            "median": float(np.median(mass)) if mass else None,
        },
        "ruleRejects": rule_rejects,
        "rejects": dict(rejects),
        "histograms": histograms,
        "histogramBins": list(range(1, 11)),
        "keptRatio": summary["keptRatio"],
    }
    return summary, metrics
