"""Data quality per round: how much of what the model wrote parsed, what assess kept and why, how
diverse the kept instructions are, how much of the judge's probability fell on its labels, and the
held-out evaluation.

The counts come from the stage summaries and manifests (pure functions over a `report.Run`, so
`selfalign status` shows them on every poll). Diversity and example rows come from the assess
stage's kept.jsonl and scored.jsonl, which only `read_round_data` reads, for `selfalign report`:
the stages record no diversity figure, and a data file is too big to re-read on every poll.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import Run

# stages/synthesize.py counts a completion that gave no item under one of these (EMPTY_COMPLETION,
# else "nothing-parsed"); every other rejection there is one parsed item.
EMPTY_COMPLETION = ("nothing-parsed", "truncated-completion", "prompt-too-long")
DIVERSITY_SAMPLE = 200  # instructions in the pairwise ROUGE-L sample (19,900 pairs, about 1 s)
SAMPLE_SEED = 0  # the same run reports the same figure every time
EXAMPLES = 10  # kept and rejected rows shown per round
SHOWN_CHARS = 300  # of an instruction, input or output in the example tables


@dataclass(frozen=True)
class Parsing:
    """What synthesize made of the model's completions in one round."""

    completions: int  # instruction prompts sent: one completion each
    parsed: int  # completions that gave at least one item
    items: int  # items checked: accepted as instructions, or rejected by a rule or as duplicate
    instructions: int  # items accepted
    generated: int  # candidates written (instructions with their answers, plus AITP rewrites)


@dataclass(frozen=True)
class LabelMass:
    """The judge's probability on its score labels (the least over an item's criteria)."""

    mean: float | None
    histogram: list[int]
    edges: list[float]


@dataclass(frozen=True)
class Diversity:
    rows: int  # kept rows (a Self-Instruct task keeps up to 5 instances under one instruction)
    distinct: int  # distinct instructions among them
    sampled: int  # instructions in the ROUGE-L sample
    mean_rouge_l: float | None  # mean pairwise ROUGE-L F1 of the sample; None under 2 instructions
    leading_words: int  # distinct first words: the verb of an imperative instruction


@dataclass(frozen=True)
class Example:
    instruction: str  # each text cut to SHOWN_CHARS
    input: str
    output: str
    scores: dict[str, float] | None  # None: rejected before the judge saw it
    reject: str | None  # the rule that rejected it; None: kept


@dataclass(frozen=True)
class RoundData:
    """What the report reads of one round's assess data files; `problem` names one it could not."""

    diversity: Diversity | None
    kept: list[Example]
    rejected: list[Example]
    problem: str | None = None


# --- from the manifests ---------------------------------------------------------------------------


def parsing(run: Run, round_: int) -> Parsing | None:
    """None unless synthesize's manifest (its per-rule rejections) is there: status keeps only
    scalars, and without the rejections nothing says how many completions parsed."""
    summary = run.summary(round_, "synthesize")
    rejections = run.metrics(round_, "synthesize").get("rejections")
    if "prompts" not in summary or not isinstance(rejections, dict):
        return None
    empty = sum(int(rejections.get(reason, 0)) for reason in EMPTY_COMPLETION)
    instructions = int(summary.get("instructions") or 0)
    return Parsing(
        completions=int(summary["prompts"]),
        parsed=int(summary["prompts"]) - empty,
        items=instructions + sum(int(n) for n in rejections.values()) - empty,
        instructions=instructions,
        generated=int(summary.get("generated") or 0),
    )


def kept_by_rule(run: Run, round_: int) -> list[tuple[str, int, float]]:
    """(label, count, share of the candidates): "kept" first, then each rule that rejected, most
    first; [] without assess's per-rule counts."""
    summary = run.summary(round_, "assess")
    rejects = run.metrics(round_, "assess").get("rejects")
    candidates = summary.get("candidates")
    if not isinstance(rejects, dict) or not candidates:
        return []
    kept = int(summary.get("kept", candidates - sum(rejects.values())))
    rules = sorted(((str(r), int(n)) for r, n in rejects.items()), key=lambda rn: (-rn[1], rn[0]))
    return [(label, n, n / candidates) for label, n in [("kept", kept), *rules]]


def label_mass(run: Run, round_: int) -> LabelMass | None:
    """The mean from assess's summary, the histogram from its manifest; None when neither."""
    mean = run.summary(round_, "assess").get("meanLabelMass")
    found = run.metrics(round_, "assess").get("labelMass") or {}
    if mean is None and not found.get("histogram"):
        return None
    return LabelMass(mean, list(found.get("histogram") or []), list(found.get("edges") or []))


def eval_losses(run: Run) -> dict[int, tuple[float, float]]:
    """round -> (held-out loss before the round, after it): merge's summary, when spec.evaluate."""
    from .report import total_rounds

    found = {}
    for round_ in range(total_rounds(run)):
        summary = run.summary(round_, "merge")
        before, after = summary.get("evalLossBefore"), summary.get("evalLossAfter")
        if before is not None and after is not None:
            found[round_] = (float(before), float(after))
    return found


def quality_line(run: Run, round_: int) -> str:
    """`selfalign status RUN`'s line for a round: parsed, kept share, label mass, evaluation."""
    parts = []
    found = parsing(run, round_)
    if found and found.completions:
        parts.append(f"parsed {found.parsed}/{found.completions} completions")
    assess = run.summary(round_, "assess")
    if assess.get("candidates") and "kept" in assess:
        parts.append(f"kept {assess['kept']}/{assess['candidates']} "
                     f"({assess['kept'] / assess['candidates']:.0%})")
    if assess.get("meanLabelMass") is not None:
        parts.append(f"label mass {assess['meanLabelMass']:.2f}")
    evaluated = eval_losses(run).get(round_)
    if evaluated:
        parts.append(f"eval loss {evaluated[0]:.3f} -> {evaluated[1]:.3f}")
    return ", ".join(parts)


# --- from the data files --------------------------------------------------------------------------


def diversity(instructions: Iterable[str], sample: int = DIVERSITY_SAMPLE,
              seed: int = SAMPLE_SEED) -> Diversity:
    """Mean pairwise ROUGE-L F1 (stages/text/dedup.py, the measure Self-Instruct dedups by; lower is
    more diverse) of a fixed-seed sample of the distinct instructions, and their leading words."""
    from selfalign.stages.text.dedup import rouge_l, rouge_tokens

    rows = list(instructions)
    distinct = list(dict.fromkeys(rows))
    chosen = random.Random(seed).sample(distinct, sample) if len(distinct) > sample else distinct
    pairs = list(itertools.combinations(chosen, 2))
    mean = sum(rouge_l(a, b) for a, b in pairs) / len(pairs) if pairs else None
    words = {tokens[0] for tokens in map(rouge_tokens, distinct) if tokens}
    return Diversity(len(rows), len(distinct), len(chosen), mean, len(words))


def examples(rows: Iterable[dict[str, Any]]) -> tuple[list[Example], list[Example]]:
    """(the first EXAMPLES kept rows, EXAMPLES rejected rows taken in turn from each rule) of
    scored.jsonl, so a rare rule shows next to the common one; holds at most EXAMPLES per rule."""
    kept: list[Example] = []
    by_rule: dict[str, list[Example]] = {}
    for row in rows:
        reject = row.get("reject")
        shelf = kept if reject is None else by_rule.setdefault(str(reject), [])
        if len(shelf) < EXAMPLES:
            shelf.append(_example(row))
    in_turn = itertools.chain.from_iterable(itertools.zip_longest(*by_rule.values()))
    return kept, [e for e in in_turn if e is not None][:EXAMPLES]


def read_round_data(run_uri: str, round_: int) -> RoundData | None:
    """Diversity of round k's kept.jsonl and example rows of its scored.jsonl; None when neither
    file is there (assess has not finished)."""
    from selfalign.stages.runtime import storage
    from selfalign.stages.text.records import RecordError

    prefix = f"{run_uri}/round-{round_}/assess"
    found_diversity, kept, rejected, problems = None, [], [], []
    try:
        found_diversity = diversity(
            row["instruction"] for _, row in storage.iter_jsonl(f"{prefix}/kept.jsonl")
            if isinstance(row.get("instruction"), str)
        )
    except storage.MissingObjectError:
        pass
    except (RecordError, storage.StorageError) as exc:
        problems.append(str(exc))
    try:
        kept, rejected = examples(row for _, row in storage.iter_jsonl(f"{prefix}/scored.jsonl"))
    except storage.MissingObjectError:
        pass
    except (RecordError, storage.StorageError) as exc:
        problems.append(str(exc))
    if found_diversity is None and not kept and not rejected and not problems:
        return None
    return RoundData(found_diversity, kept, rejected, "; ".join(problems) or None)


def read_data(run: Run) -> dict[int, RoundData]:
    """round -> what its assess data files say, for the rounds that have them."""
    from .report import total_rounds

    found = {k: read_round_data(run.uri, k) for k in range(total_rounds(run))}
    return {k: data for k, data in found.items() if data is not None}


def _example(row: dict[str, Any]) -> Example:
    scores = row.get("scores")
    return Example(
        *(_shorten(row.get(name)) for name in ("instruction", "input", "output")),
        scores={str(k): v for k, v in scores.items()} if isinstance(scores, dict) else None,
        reject=None if row.get("reject") is None else str(row["reject"]),
    )


def _shorten(text: Any, limit: int = SHOWN_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"

