"""What a researcher reads about a run: its numbers, collected from storage, and `selfalign status`.

A run's `status.json` (written by the local runner: the planner's status) says where the run is;
each stage's `round-<k>/<stage>/manifest.json` says what it produced. `read_run` is the only
function here that reads storage; everything else is pure over those documents, so the status
tables and the HTML report (report_html.py) are tested on synthetic runs. A run that failed midway,
or a cluster run read from its bucket without a status.json, still reads: what is missing is named,
never an error. Every key is read with a default because stages add metrics over time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .local import LOCAL_NAMESPACE
from .quality import quality_line
from ..spec import STAGES

STATUS_FILE = "status.json"
SPEC_FILE = "spec.json"  # the resolved spec, written by the local runner
MAP_FILE = "coverage.png"  # stages/vectors/coverage_report.py write_outputs
TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"  # the planner's timestamps
NOT_STARTED = "-"
ERROR_CHARS = 80  # of a failure in a table cell; the run's message carries all of it
_ARTIFACT = re.compile(
    r"^/round-(\d+)/(" + "|".join(STAGES) + r")/(manifest\.json|" + re.escape(MAP_FILE) + ")$"
)


@dataclass(frozen=True)
class Run:
    """Everything read of one run; `status` is {} where the run has no status.json."""

    name: str
    uri: str
    status: dict[str, Any]
    manifests: dict[tuple[int, str], dict[str, Any]]
    maps: dict[int, bytes] = field(default_factory=dict)  # round -> coverage.png
    unreadable: tuple[str, ...] = ()  # files that exist but could not be parsed: "uri: cause"
    spec: dict[str, Any] = field(default_factory=dict)  # spec.json, or the SelfAlignRun's spec

    def record(self, round_: int, stage: str) -> dict[str, Any]:
        """The planner's record of a stage (phase, attempts, times, metrics), or {}."""
        rounds = self.status.get("rounds") or []
        entry = rounds[round_] if round_ < len(rounds) else {}
        return (entry.get("stages") or {}).get(stage) or {}

    def summary(self, round_: int, stage: str) -> dict[str, Any]:
        """The stage's result summary: from its manifest, else what status kept of it."""
        manifest = self.manifests.get((round_, stage))
        if manifest is not None:
            return manifest.get("summary") or {}
        return self.record(round_, stage).get("metrics") or {}

    def metrics(self, round_: int, stage: str) -> dict[str, Any]:
        return (self.manifests.get((round_, stage)) or {}).get("metrics") or {}


@dataclass(frozen=True)
class RunRow:
    """One line of `selfalign status`: a local run (status.json, spec.json) or a SelfAlignRun."""

    name: str
    status: dict[str, Any]
    spec: dict[str, Any]
    namespace: str | None = None  # shown only when listing several namespaces


@dataclass(frozen=True)
class StageView:
    round: int
    stage: str
    phase: str  # the planner's phase; "Succeeded" when only a manifest says so; "-" not started
    attempts: int | None
    seconds: float | None
    setup: float | None = None  # of `seconds`: start-up, imports, download, load, engine start
    work: float | None = None


# --- reading --------------------------------------------------------------------------------------


def run_location(run: str, storage_root: str) -> str:
    """A run URI as given; a run folder given as a path (run names never hold a "/"); or the URI
    of a local run's name under `storage_root`."""
    if "://" in run:
        return run.rstrip("/")
    if "/" in run:
        return Path(run).resolve().as_uri()
    return f"{storage_root.rstrip('/')}/{LOCAL_NAMESPACE}/{run}"


def read_run(uri: str) -> Run:
    """Read status.json, every stage manifest and every coverage map below the run's prefix."""
    from selfalign.stages.runtime import storage
    from selfalign.stages.text.records import RecordError

    uri = uri.rstrip("/")
    status, spec, manifests, maps, unreadable = {}, {}, {}, {}, []
    for found in storage.list_uris(uri):
        relative = found[len(uri) :]
        match = _ARTIFACT.match(relative)
        try:
            if relative == f"/{STATUS_FILE}":
                status = storage.read_json(found)
            elif relative == f"/{SPEC_FILE}":
                spec = storage.read_json(found)
            elif match and match[3] == MAP_FILE:
                maps[int(match[1])] = storage.read_bytes(found)
            elif match:
                manifests[(int(match[1]), match[2])] = storage.read_json(found)
        except (RecordError, storage.StorageError) as exc:
            unreadable.append(str(exc))
    return Run(uri.rsplit("/", 1)[-1], uri, status, manifests, maps, tuple(unreadable), spec)


def list_runs(storage_root: str) -> list[RunRow]:
    """Every local run under `storage_root` (a folder with a status.json), by name; {} for a
    document that cannot be read (one broken run does not hide the others)."""
    from selfalign.stages.runtime import storage
    from selfalign.stages.text.records import RecordError

    prefix = f"{storage_root.rstrip('/')}/{LOCAL_NAMESPACE}/"
    documents: dict[str, dict[str, dict[str, Any]]] = {}
    for found in storage.list_uris(prefix.rstrip("/")):
        name, _, rest = found[len(prefix) :].partition("/")
        if rest in (STATUS_FILE, SPEC_FILE):
            try:
                documents.setdefault(name, {})[rest] = storage.read_json(found)
            except (RecordError, storage.StorageError):
                documents.setdefault(name, {})[rest] = {}
    return [RunRow(name, found[STATUS_FILE], found.get(SPEC_FILE, {}))
            for name, found in sorted(documents.items()) if STATUS_FILE in found]


# --- what the run shows ---------------------------------------------------------------------------


def spec_of(run: Run) -> dict[str, Any]:
    """The run's spec (spec.json, or the SelfAlignRun's), else as its latest stage recorded it
    (manifest inputs), else {}."""
    if run.spec:
        return run.spec
    for key in sorted(run.manifests, key=lambda k: (k[0], STAGES.index(k[1])), reverse=True):
        spec = (run.manifests[key].get("inputs") or {}).get("spec")
        if spec:
            return spec
    return {}


def total_rounds(run: Run) -> int:
    """Rounds the spec asks for, or the rounds seen so far where the spec is not recorded yet."""
    seen = [k for k, _ in run.manifests] + [
        e.get("round", 0) for e in run.status.get("rounds") or []
    ]
    return max(int(spec_of(run).get("rounds") or 0), max(seen) + 1 if seen else 0)


def stage_views(run: Run) -> list[StageView]:
    """One row per (round, stage) that the status or a manifest knows, in campaign order."""
    known = {(k, s) for k, s in run.manifests}
    for entry in run.status.get("rounds") or []:
        known |= {(entry.get("round", 0), stage) for stage in entry.get("stages") or {}}
    views = []
    for round_, stage in sorted(known, key=lambda key: (key[0], STAGES.index(key[1]))):
        record, manifest = run.record(round_, stage), run.manifests.get((round_, stage))
        phase = record.get("phase") or ("Succeeded" if manifest else NOT_STARTED)
        seconds = stage_seconds(record, manifest)
        summary = run.summary(round_, stage)
        setup, work = _number(summary.get("setupSeconds")), _number(summary.get("workSeconds"))
        views.append(StageView(round_, stage, phase, record.get("attempts"), seconds, setup, work))
    return views


def setup_share(run: Run, round_: int) -> tuple[float, float] | None:
    """(setup seconds, setup + work seconds) of a round's stages that recorded both, or None:
    the time its stage pods spent starting, downloading and loading rather than working."""
    views = [v for v in stage_views(run)
             if v.round == round_ and v.setup is not None and v.work is not None]
    if not views:
        return None
    setup = sum(v.setup for v in views)
    return setup, setup + sum(v.work for v in views)


def setup_line(run: Run, round_: int) -> str:
    """`setup 1m 02s of 3m 30s in stages (30%)`, or "" where no stage of the round recorded it."""
    share = setup_share(run, round_)
    if share is None or not share[1]:
        return ""
    setup, total = share
    return (f"setup {format_seconds(setup)} of {format_seconds(total)} in stages "
            f"({setup / total:.0%})")


def stage_seconds(record: dict[str, Any], manifest: dict[str, Any] | None) -> float | None:
    """The stage's own timing, else the span of its status record; None when neither says.

    The local runner stamps a record's start and completion in the same pass (equal times), so an
    empty span means "unknown", not zero.
    """
    seconds = ((manifest or {}).get("timings") or {}).get("seconds")
    if seconds is not None:
        return float(seconds)
    start, finish = _parse(record.get("startTime")), _parse(record.get("completionTime"))
    if start and finish and finish > start:
        return (finish - start).total_seconds()
    return None


def key_metric(run: Run, round_: int, stage: str) -> str:
    """One line on what the stage produced (or why it failed)."""
    s = run.summary(round_, stage)
    parts: list[str] = []
    if stage == "synthesize":
        parts = [
            _count("generated", s, "generated"),
            _count("instructions", s, "instructions"),
            _count("rewrites", s, "rewritten"),
            _count("rejected", s, "rejected"),
        ]
    elif stage == "assess" and "kept" in s:
        ratio = f" ({s['keptRatio']:.0%})" if isinstance(s.get("keptRatio"), (int, float)) else ""
        parts = [f"kept {s['kept']}/{s.get('candidates', '?')}{ratio}"]
    elif stage == "train" and "lossFirst" in s:
        parts = [
            f"loss {s['lossFirst']:.3f} -> {s.get('lossLast', float('nan')):.3f}",
            _count("steps", s, "steps"),
            _rate(s.get("tokensPerSecond"), "tok/s"),
        ]
    elif stage == "merge" and "maxAbsLogitDiff" in s:
        parts = [f"max |logit diff| {s['maxAbsLogitDiff']:.1e}"]
    elif stage == "coverage" and "coverage" in s:
        before = s.get("coverageBefore")
        parts = [
            f"coverage {s['coverage']:.1%}"
            + (f" (before {before:.1%})" if before is not None else "")
        ]
    error = run.record(round_, stage).get("message") or s.get("error")
    if error:
        parts.append(
            f"error: {error}" if len(error) <= ERROR_CHARS else f"error: {error[:ERROR_CHARS]}..."
        )
    return ", ".join(p for p in parts if p)


def missing(run: Run, explained: bool = True) -> list[str]:
    """Each expected stage of the campaign without a manifest, and why; unreadable files.
    `explained=False` leaves out the stages whose absence the status already explains (failed,
    running, not started), for the terminal, where the run's message says it."""
    notes = [f"unreadable: {cause}" for cause in run.unreadable]
    if not run.status and not run.manifests:
        return notes + [f"nothing found under {run.uri}: no status.json and no stage manifests"]
    if not run.status:
        notes.append(
            "no status.json (a cluster run keeps status on its SelfAlignRun: kubectl get sar)"
        )
    for round_ in range(total_rounds(run)):
        for stage in STAGES:
            if (round_, stage) in run.manifests:
                continue
            record = run.record(round_, stage)
            phase = record.get("phase")
            if phase != "Succeeded" and not explained:
                continue
            why = {
                "Failed": f"failed: {record.get('message') or 'no message'}",
                "Succeeded": "succeeded, but its manifest is gone",
            }.get(phase, (phase or "not started").lower())
            notes.append(f"round {round_} {stage}: no manifest ({why})")
    return notes


def lineage(run: Run) -> list[tuple[str, str]]:
    """(label, model URI): the base model, then each model a merge stage wrote."""
    base = spec_of(run).get("model", {}).get("base")
    rounds = run.status.get("rounds") or []
    base = (
        base
        or (rounds[0].get("model") if rounds else None)
        or ((run.manifests.get((0, "synthesize")) or {}).get("inputs") or {}).get("model")
    )
    chain = [("base", base)] if base else []
    for round_ in range(total_rounds(run)):
        model = run.summary(round_, "merge").get("model")
        if model:
            chain.append((f"after round {round_}", model))
    return chain


def wall_seconds(status: dict[str, Any]) -> float | None:
    """From the run's start to its completion, or to the latest thing status records."""
    start = _parse(status.get("startTime"))
    end = _parse(status.get("completionTime")) or _parse(updated(status))
    return (end - start).total_seconds() if start and end else None


def updated(status: dict[str, Any]) -> str | None:
    """The latest timestamp anywhere in the status (the planner stamps every change)."""
    stamps = [status.get("startTime"), status.get("completionTime")]
    stamps += [c.get("lastTransitionTime") for c in status.get("conditions") or []]
    for entry in status.get("rounds") or []:
        for record in (entry.get("stages") or {}).values():
            stamps += [record.get(k) for k in ("createTime", "startTime", "completionTime")]
    parsed = [t for t in (_parse(s) for s in stamps) if t]
    return max(parsed).strftime(TIMESTAMP) if parsed else None


# --- per-round series for the report's plots ------------------------------------------------------


def per_round(run: Run, stage: str, key: str) -> dict[int, Any]:
    """round -> summary[key] of a stage, for the rounds that have it."""
    values = {k: run.summary(k, stage).get(key) for k in range(total_rounds(run))}
    return {k: v for k, v in values.items() if v is not None}


def rejections(run: Run, stage: str) -> dict[int, dict[str, int]]:
    """round -> {reason: count}: synthesize's per-rule rejections while generating; assess's
    rejections by reason (rules, duplicates, thresholds), or its rule rejections if that is all."""
    found = {}
    for round_ in range(total_rounds(run)):
        m = run.metrics(round_, stage)
        counts = (
            m.get("rejections") if stage == "synthesize" else m.get("rejects", m.get("ruleRejects"))
        )
        if isinstance(counts, dict):
            found[round_] = {str(r): int(n) for r, n in counts.items()}
    return found


def score_histograms(run: Run) -> tuple[list[int], dict[str, dict[int, list[int]]]]:
    """(score bins, criterion -> round -> counts per bin) of the assess judge."""
    bins: list[int] = list(range(1, 11))
    found: dict[str, dict[int, list[int]]] = {}
    for round_ in range(total_rounds(run)):
        m = run.metrics(round_, "assess")
        bins = m.get("histogramBins") or bins
        for criterion, counts in (m.get("histograms") or {}).items():
            found.setdefault(criterion, {})[round_] = list(counts)
    return bins, found


def loss_curves(run: Run) -> dict[int, list[tuple[float, float]]]:
    """round -> [(step, loss), ...] of the train stage."""
    curves = {k: run.metrics(k, "train").get("lossCurve") for k in range(total_rounds(run))}
    return {k: [(float(s), float(v)) for s, v in c] for k, c in curves.items() if c}


def coverage_before_after(run: Run) -> dict[int, tuple[float | None, float]]:
    """round -> (coverage without the round's data, coverage with it)."""
    found = {}
    for round_ in range(total_rounds(run)):
        s, m = run.summary(round_, "coverage"), run.metrics(round_, "coverage")
        after = s.get("coverage", m.get("coverage"))
        if after is not None:
            found[round_] = (s.get("coverageBefore", m.get("coverage_before")), after)
    return found


def domain_coverage(run: Run) -> dict[str, dict[str, float]]:
    """domain -> {column: coverage}; columns "before round 0" (seeds only), then "round k"."""
    table: dict[str, dict[str, float]] = {}
    for round_ in range(total_rounds(run)):
        for domain, row in (run.metrics(round_, "coverage").get("per_domain") or {}).items():
            if round_ == 0 and "coverage_before" in row:
                table.setdefault(domain, {})["before round 0"] = row["coverage_before"]
            if "coverage" in row:
                table.setdefault(domain, {})[f"round {round_}"] = row["coverage"]
    return table


# --- text tables ----------------------------------------------------------------------------------


def position(status: dict[str, Any], rounds: Any) -> str:
    """Where the run is, counted as a user counts: the second of two rounds is "2/2" (status
    counts from 0); without the spec's rounds, the round alone."""
    if status.get("round") is None:
        return ""
    return f"{status['round'] + 1}" + (f"/{rounds}" if isinstance(rounds, int) else "")


def runs_table(runs: list[RunRow]) -> str:
    """`selfalign status`: one line per run, like `kubectl get sar`."""
    namespaced = any(r.namespace for r in runs)
    rows = [
        ([r.namespace or ""] if namespaced else [])
        + [
            r.name,
            r.status.get("phase", "?"),
            position(r.status, r.spec.get("rounds")),
            r.status.get("stage", ""),
            _text(r.status.get("kept")),
            f"{r.status['coverage']}%" if r.status.get("coverage") is not None else "",
            updated(r.status) or "",
        ]
        for r in runs
    ]
    headers = ["NAME", "PHASE", "ROUND", "STAGE", "KEPT", "COVERAGE", "UPDATED"]
    return _align((["NAMESPACE"] if namespaced else []) + headers, rows)


def run_table(run: Run, artifacts_read: bool = True) -> str:
    """`selfalign status RUN`: the run's phase, a line per stage (rounds counted from 1), a
    data-quality line per round, its message, and, when its artifacts were read
    (`artifacts_read`), what is missing."""
    status = run.status
    head = f"run {run.name}: {status.get('phase', 'phase unknown')}"
    if status.get("stage"):
        # The total is known once the spec is: spec.json, the SelfAlignRun or a stage's manifest.
        rounds = total_rounds(run) if spec_of(run) else None
        head += f", round {position({'round': 0, **status}, rounds)} stage {status['stage']}"
    rows = [
        [
            str(v.round + 1),
            v.stage,
            v.phase,
            _text(v.attempts),
            format_seconds(v.seconds),
            format_seconds(v.setup),
            key_metric(run, v.round, v.stage),
        ]
        for v in stage_views(run)
    ]
    lines = [head, f"artifacts: {run.uri}", ""]
    lines += (
        [_align(["ROUND", "STAGE", "PHASE", "ATTEMPTS", "DURATION", "SETUP", "RESULT"], rows), ""]
        if rows
        else []
    )
    data = [f"round {k + 1} data: {line}" for k in range(total_rounds(run))
            if (line := quality_line(run, k))]
    lines += [*data, ""] if data else []
    times = [f"round {k + 1} time: {line}" for k in range(total_rounds(run))
             if (line := setup_line(run, k))]
    lines += [*times, ""] if times else []
    if status.get("message"):
        lines.append(f"message: {status['message']}")
    if artifacts_read:
        lines += [f"missing: {note}" for note in missing(run, explained=False)]
    return "\n".join(lines).rstrip() + "\n"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return NOT_STARTED
    whole = int(round(seconds))
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _align(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart (kubectl's look; too small for a table library)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    )


def _count(label: str, summary: dict[str, Any], key: str) -> str:
    return f"{label} {summary[key]}" if summary.get(key) is not None else ""


def _rate(value: Any, unit: str) -> str:
    return f"{value:,.0f} {unit}" if isinstance(value, (int, float)) else ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _parse(stamp: str | None) -> datetime | None:
    try:
        return datetime.strptime(stamp, TIMESTAMP).replace(tzinfo=UTC) if stamp else None
    except (TypeError, ValueError):
        return None
