"""`selfalign report`: one static HTML page about a run, readable offline.

Every figure is drawn with matplotlib's object API (no pyplot state, no display backend) and
embedded as a data: URI, as are the coverage stage's maps, so the page is one file with no
script, stylesheet or image fetched from anywhere. A section whose data is missing says so.
The data-quality sections (quality_html.py) also read each round's assess data files.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import report as r
from ..spec import STAGES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNRECORDED = "not recorded yet (a stage's manifest records the spec)"
DPI = 100
ROUND_COLORS = [f"C{i}" for i in range(10)]
PHASE_CLASS = {
    "Succeeded": "ok",
    "Failed": "bad",
    "Running": "busy",
    "Pending": "busy",
    "Suspended": "busy",
}
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1f2933; line-height: 1.45; }
h1 { margin-bottom: .2rem; }
h2 { border-bottom: 1px solid #d9e2ec; padding-bottom: .2rem; margin-top: 2.2rem; }
.uri { color: #52606d; font-family: ui-monospace, monospace; font-size: .9rem; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #d9e2ec; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f0f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { width: 11rem; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #b42318; font-weight: 600; }
.busy { color: #b54708; font-weight: 600; }
.failure { border: 2px solid #b42318; background: #fef3f2; padding: .6rem 1rem; border-radius: 6px;
           margin-top: 1rem; }
.failure pre { white-space: pre-wrap; margin: .3rem 0; }
.missing { color: #7c5e10; background: #fffaeb; padding: .4rem .8rem;
           border-left: 4px solid #f79009; }
ul.missing { padding-left: 2rem; }
img { max-width: 100%; height: auto; } figcaption { color: #52606d; font-size: .9rem; }
.maps { display: grid; grid-template-columns: repeat(auto-fit, minmax(720px, 1fr)); gap: 1rem; }
.maps figure { margin: 0; } .maps img { width: 100%; border: 1px solid #d9e2ec; }
ol.lineage { margin: 0; padding-left: 1.2rem; font-family: ui-monospace, monospace;
             font-size: .9rem; }
"""


def write_report(run: r.Run, out_dir: Path) -> Path:
    """Write out_dir/index.html; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text(render(run), encoding="utf-8")
    return page


def render(run: r.Run) -> str:
    from . import quality
    from . import quality_html  # quality_html builds on this module's helpers

    sections = [
        _failure(run),
        _section("summary", "Summary", _summary_table(run)),
        _section("stages", "Stages", _stages_table(run)),
        _section("missing", "What is missing", _missing(run)),
        _figure_section(
            "counts",
            "Generated and kept per round",
            counts_figure(run),
            "no synthesize or assess results in any round",
        ),
        _figure_section(
            "rejections",
            "Rejections by rule",
            rejections_figure(run),
            "no per-rule rejection counts in any synthesize or assess manifest",
        ),
        _figure_section(
            "scores",
            "Judge score histograms",
            scores_figure(run),
            "no score histograms in any assess manifest",
        ),
        *quality_html.sections(run, quality.read_data(run)),
        _figure_section(
            "loss", "Training loss", loss_figure(run), "no loss curve in any train manifest"
        ),
        _figure_section(
            "coverage",
            "Coverage before and after each round",
            coverage_figure(run),
            "no coverage results in any round",
        ),
        _figure_section(
            "domains",
            "Coverage per reference domain",
            domains_figure(run),
            "no per-domain coverage (no coverage manifest, or a reference corpus without domains)",
        ),
        _section("maps", "Coverage maps", _maps(run)),
    ]
    title = f"selfalign run {run.name}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}{quality_html.STYLE}</style></head><body>\n"
        f'<h1>{_e(title)}</h1>\n<p class="uri">{_e(run.uri)}</p>\n'
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )


# --- figures -------------------------------------------------------------------------------------


def counts_figure(run: r.Run) -> bytes | None:
    generated, kept = (
        r.per_round(run, "synthesize", "generated"),
        r.per_round(run, "assess", "kept"),
    )
    rounds = sorted(set(generated) | set(kept))
    if not rounds:
        return None
    figure = Figure(figsize=(8, 3.6), dpi=DPI)
    ax = figure.add_subplot()
    x = np.arange(len(rounds))
    bars = ax.bar(
        x - 0.2,
        [generated.get(k, 0) for k in rounds],
        0.4,
        label="generated (synthesize)",
        color="#9aa5b1",
    )
    ax.bar_label(bars, [_text(generated.get(k)) for k in rounds], padding=2, fontsize=9)
    bars = ax.bar(
        x + 0.2, [kept.get(k, 0) for k in rounds], 0.4, label="kept (assess)", color="#1d4ed8"
    )
    ax.bar_label(
        bars, [_kept_label(kept.get(k), generated.get(k)) for k in rounds], padding=2, fontsize=9
    )
    _round_axis(ax, x, rounds)
    ax.set_ylabel("items")
    ax.margins(y=0.15)
    _legend_above(ax)
    return _png(figure)


def _kept_label(kept: int | None, generated: int | None) -> str:
    if kept is None:
        return ""
    return f"{kept} ({kept / generated:.0%})" if generated else str(kept)


def rejections_figure(run: r.Run) -> bytes | None:
    stages = {"synthesize": "while generating (synthesize)", "assess": "in assessment (assess)"}
    found = {stage: r.rejections(run, stage) for stage in stages}
    if not any(found.values()):
        return None
    totals: Counter[str] = Counter()
    for counts in found.values():
        for per_reason in counts.values():
            totals.update(per_reason)
    colors = {reason: f"C{i % 10}" for i, (reason, _) in enumerate(totals.most_common())}
    reasons = max(len({n for c in counts.values() for n in c}) for counts in found.values())
    figure = Figure(figsize=(11, 3.6 + 0.22 * reasons), dpi=DPI)
    axes = figure.subplots(1, 2)
    for ax, (stage, title) in zip(axes, stages.items(), strict=True):
        ax.set_title(title, fontsize=11)
        counts = found[stage]
        if not counts:
            ax.text(
                0.5,
                0.5,
                f"no {stage} rejection counts",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_axis_off()
            continue
        rounds = sorted(counts)
        x, bottom = np.arange(len(rounds)), np.zeros(len(rounds))
        for reason in (name for name in colors if any(name in counts[k] for k in rounds)):
            heights = np.array([counts[k].get(reason, 0) for k in rounds], dtype=float)
            ax.bar(
                x,
                heights,
                0.6,
                bottom=bottom,
                label=f"{reason} ({int(heights.sum())})",
                color=colors[reason],
                hatch="//" if list(colors).index(reason) >= 10 else None,
            )
            bottom += heights
        _round_axis(ax, x, rounds)
        ax.set_ylabel("items rejected")
        ax.legend(
            fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False
        )
    figure.tight_layout()
    return _png(figure)


def scores_figure(run: r.Run) -> bytes | None:
    bins, histograms = r.score_histograms(run)
    if not histograms:
        return None
    figure = Figure(figsize=(min(4.6 * len(histograms), 12), 3.8), dpi=DPI)
    axes = np.atleast_1d(figure.subplots(1, len(histograms)))
    for ax, (criterion, per_round) in zip(axes, histograms.items(), strict=True):
        width = 0.8 / len(per_round)
        for i, (k, counts) in enumerate(sorted(per_round.items())):
            offset = (i - (len(per_round) - 1) / 2) * width
            ax.bar(
                np.asarray(bins[: len(counts)]) + offset,
                counts,
                width,
                color=_color(k),
                label=f"round {k} ({sum(counts)} scored)",
            )
        ax.set_title(criterion, fontsize=11)
        ax.set_xticks(bins)
        ax.set_xlabel("score (expected value under the judge)")
        ax.set_ylabel("items")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def loss_figure(run: r.Run) -> bytes | None:
    curves = r.loss_curves(run)
    if not curves:
        return None
    figure = Figure(figsize=(8, 3.6), dpi=DPI)
    ax = figure.add_subplot()
    for k, curve in sorted(curves.items()):
        steps, losses = zip(*curve, strict=True)
        ax.plot(
            steps,
            losses,
            marker="o",
            markersize=3,
            color=_color(k),
            label=f"round {k}: {losses[0]:.3f} -> {losses[-1]:.3f}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(figure)


def coverage_figure(run: r.Run) -> bytes | None:
    found = r.coverage_before_after(run)
    if not found:
        return None
    rounds = sorted(found)
    figure = Figure(figsize=(8, 3.6), dpi=DPI)
    ax = figure.add_subplot()
    x = np.arange(len(rounds))
    before = [100 * (found[k][0] or 0) for k in rounds]
    after = [100 * found[k][1] for k in rounds]
    bars = ax.bar(x - 0.2, before, 0.4, label="before the round's data", color="#9aa5b1")
    ax.bar_label(
        bars,
        [
            f"{v:.1f}%" if found[k][0] is not None else "n/a"
            for v, k in zip(before, rounds, strict=True)
        ],
        padding=2,
        fontsize=9,
    )
    bars = ax.bar(x + 0.2, after, 0.4, label="after", color="#1a7f37")
    ax.bar_label(bars, [f"{v:.1f}%" for v in after], padding=2, fontsize=9)
    _round_axis(ax, x, rounds)
    ax.set_ylabel("reference documents covered (%)")
    ax.set_ylim(0, min(100, max(after + before) * 1.2 + 5))
    _legend_above(ax)
    return _png(figure)


def domains_figure(run: r.Run) -> bytes | None:
    table = r.domain_coverage(run)
    if not table:
        return None
    columns = sorted({c for row in table.values() for c in row}, key=_column_order)
    domains = sorted(table, key=lambda d: (table[d].get(columns[-1], 0), d))
    values = np.array([[100 * table[d].get(c, np.nan) for c in columns] for d in domains])
    figure = Figure(figsize=(2.6 + 1.3 * len(columns), 1.2 + 0.3 * len(domains)), dpi=DPI)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="Greens", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(
                j,
                i,
                f"{value:.0f}%",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 60 else "#1f2933",
            )
    ax.set_xticks(range(len(columns)), columns)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(domains)), domains, fontsize=8)
    figure.colorbar(image, ax=ax, label="coverage (%)", shrink=0.6)
    figure.tight_layout()
    return _png(figure)


def _legend_above(ax) -> None:
    """Above the axes, where no bar or its label can be under it."""
    ax.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)


def _round_axis(ax, x: np.ndarray, rounds: list[int]) -> None:
    ax.set_xticks(x, [f"round {k}" for k in rounds])
    ax.set_xlim(-0.7, len(rounds) - 0.3)


def _column_order(column: str) -> tuple[int, int]:
    """ "before round 0" first, then "round 0", "round 1", ..."""
    return (0, 0) if column.startswith("before") else (1, int(column.split()[-1]))


def _color(round_: int) -> str:
    return ROUND_COLORS[round_ % len(ROUND_COLORS)]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# --- HTML pieces ----------------------------------------------------------------------------------


def _failure(run: r.Run) -> str:
    if run.status.get("phase") != "Failed":
        return ""
    return (
        f'<div class="failure" id="failure"><strong>The run failed.</strong>'
        f"<pre>{_e(run.status.get('message') or 'no message recorded')}</pre></div>"
    )


def _summary_table(run: r.Run) -> str:
    status, spec = run.status, r.spec_of(run)
    phase = status.get("phase")
    total = r.total_rounds(run)
    finished = sum(1 for k in range(total) if (k, STAGES[-1]) in run.manifests)
    stage_time = sum(v.seconds or 0 for v in r.stage_views(run))
    kept = r.per_round(run, "assess", "kept")
    coverage = r.coverage_before_after(run)
    rows = [
        ("Phase", _badge(phase or "unknown (no status.json)", phase)),
        ("Recipe", _e(spec.get("recipe", UNRECORDED))),
        (
            "Rounds",
            f"{finished} of {total} finished"
            if spec
            else f"{finished} finished; total {UNRECORDED}",
        ),
    ]
    if phase not in (None, "Succeeded") and status.get("stage"):
        rows.append(("Current", _e(f"round {status.get('round', 0)} stage {status['stage']}")))
    chain = "".join(f"<li>{_e(label)}: {_e(uri)}</li>" for label, uri in r.lineage(run))
    rows += [
        ("Model lineage", f'<ol class="lineage">{chain}</ol>' if chain else "unknown"),
        (
            "Kept per round",
            _e(", ".join(f"round {k}: {n}" for k, n in sorted(kept.items())) or "none yet"),
        ),
        ("Coverage", _e(_coverage_text(coverage))),
        ("Wall-clock time", _e(r.format_seconds(r.wall_seconds(status)))),
        ("Time in stages", _e(r.format_seconds(stage_time or None))),
        ("Setup per round", _e(_setup_text(run, total))),
        ("Started", _e(status.get("startTime", "-"))),
        (
            "Finished" if status.get("completionTime") else "Last update",
            _e(status.get("completionTime") or r.updated(status) or "-"),
        ),
        ("Software", _e(_versions(run))),
    ]
    return (
        '<table class="summary">'
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _setup_text(run: r.Run, total: int) -> str:
    """Each round's share of stage time spent setting up (start-up, download, load)."""
    lines = [f"round {k}: {line}" for k in range(total) if (line := r.setup_line(run, k))]
    return "; ".join(lines) or "not recorded"


def _coverage_text(coverage: dict[int, tuple[float | None, float]]) -> str:
    if not coverage:
        return "not measured yet"
    first, last = min(coverage), max(coverage)
    start = coverage[first][0]
    text = f"{coverage[last][1]:.1%} after round {last}"
    return text + (f" (seeds alone: {start:.1%})" if start is not None else "")


def _versions(run: r.Run) -> str:
    found: dict[str, str] = {}
    for key in sorted(run.manifests):
        found.update(run.manifests[key].get("versions") or {})
    return ", ".join(f"{name} {version}" for name, version in found.items()) or "not recorded"


def _stages_table(run: r.Run) -> str:
    views = r.stage_views(run)
    if not views:
        return '<p class="missing">No stage has started.</p>'
    rows = "".join(
        f"<tr>{_td(v.round, 'num')}{_td(v.stage)}<td>{_badge(v.phase, v.phase)}</td>"
        f"{_td(_text(v.attempts), 'num')}{_td(r.format_seconds(v.seconds), 'num')}"
        f"{_td(r.format_seconds(v.setup), 'num')}{_td(r.format_seconds(v.work), 'num')}"
        f"{_td(r.key_metric(run, v.round, v.stage))}</tr>"
        for v in views
    )
    return (
        "<table><tr><th>Round</th><th>Stage</th><th>Phase</th><th>Attempts</th><th>Duration</th>"
        f"<th>Setup</th><th>Work</th><th>Result</th></tr>{rows}</table>"
    )


def _missing(run: r.Run) -> str:
    notes = r.missing(run)
    if not notes:
        return "<p>Nothing: every stage of every round left its manifest.</p>"
    return '<ul class="missing">' + "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul>"


def _maps(run: r.Run) -> str:
    parts = []
    for k in range(r.total_rounds(run)):
        picture = run.maps.get(k)
        if picture is None:
            parts.append(f'<p class="missing">Round {k}: no coverage map ({r.MAP_FILE}).</p>')
        elif not picture.startswith(PNG_MAGIC):
            parts.append(f'<p class="missing">Round {k}: {r.MAP_FILE} is not a PNG image.</p>')
        else:
            parts.append(
                f'<figure><img alt="coverage map, round {k}" src="{_data_uri(picture)}">'
                f"<figcaption>Round {k}</figcaption></figure>"
            )
    if not parts:
        return '<p class="missing">No round has started.</p>'
    return (
        "<p>Reference documents and instruction items in the reference's first two principal "
        "components; gap documents (rewritten by the next round) circled.</p>"
        f'<div class="maps">{"".join(parts)}</div>'
    )


def _figure_section(anchor: str, title: str, picture: bytes | None, absent: str) -> str:
    body = (
        f'<img alt="{_e(title)}" src="{_data_uri(picture)}">'
        if picture
        else f'<p class="missing">No data: {_e(absent)}.</p>'
    )
    return _section(anchor, title, body)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _badge(text: str, phase: str | None) -> str:
    return f'<span class="{PHASE_CLASS.get(phase, "")}">{_e(text)}</span>'


def _td(text: object, css: str = "") -> str:
    return f'<td class="{css}">{_e(text)}</td>' if css else f"<td>{_e(text)}</td>"


def _e(text: object) -> str:
    return html.escape(str(text))


def _text(value: object) -> str:
    return "" if value is None else str(value)
