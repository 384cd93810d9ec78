"""The report's data-quality sections: a table per round (parsing, kept share by rule, diversity,
label mass, held-out loss), the label-mass and evaluation figures, and example rows.

Kept apart from report_html.py, which lays out the page and owns the shared HTML helpers; every
text that came from a model or a file is HTML-escaped here, as there.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from . import quality as q
from . import report as r
from . import report_html as h

STYLE = """
table.rows td { max-width: 26rem; white-space: pre-wrap; overflow-wrap: anywhere;
                font-size: .85rem; }
table.quality td { font-variant-numeric: tabular-nums; }
"""


def sections(run: r.Run, data: dict[int, q.RoundData]) -> list[str]:
    """The data-quality table, the label mass, the evaluation (only when measured), the rows."""
    return [
        h._section("quality", "Data quality per round", _quality_table(run, data)),
        h._figure_section("labelmass", "Judge label mass", label_mass_figure(run),
                          "no label mass in any assess manifest"),
        _evaluation(run),
        h._section("examples", "Kept and rejected rows", _examples(data)),
    ]


# --- figures -------------------------------------------------------------------------------------


def label_mass_figure(run: r.Run) -> bytes | None:
    found = {
        k: m for k in range(r.total_rounds(run))
        if (m := q.label_mass(run, k)) and m.histogram and len(m.edges) == len(m.histogram) + 1
    }
    if not found:
        return None
    figure = Figure(figsize=(8, 3.6), dpi=h.DPI)
    ax = figure.add_subplot()
    width = 0.8 / len(found)
    for i, (k, mass) in enumerate(sorted(found.items())):
        edges = np.asarray(mass.edges, dtype=float)
        step = edges[1:] - edges[:-1]
        offset = (i - (len(found) - 1) / 2) * width
        mean = f", mean {mass.mean:.2f}" if mass.mean is not None else ""
        ax.bar(edges[:-1] + step * (0.5 + offset), mass.histogram, step * width, color=h._color(k),
               label=f"round {k} ({sum(mass.histogram)} judged{mean})")
    ax.set_xlabel("probability on the score labels (least over an item's criteria)")
    ax.set_ylabel("items")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=9)
    return h._png(figure)


def evaluation_figure(run: r.Run) -> bytes | None:
    losses = q.eval_losses(run)
    if not losses:
        return None
    rounds = sorted(losses)
    figure = Figure(figsize=(8, 3.6), dpi=h.DPI)
    ax = figure.add_subplot()
    series = ((0, "before the round", "#9aa5b1"), (1, "after the round", "#1d4ed8"))
    for index, label, color in series:
        values = [losses[k][index] for k in rounds]
        ax.plot(rounds, values, marker="o", color=color, label=label)
        for k, value in zip(rounds, values, strict=True):
            ax.annotate(f"{value:.3f}", (k, value), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8, color=color)
    ax.set_xticks(rounds, [f"round {k}" for k in rounds])
    ax.set_ylabel("held-out loss (mean NLL per token)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.2)
    h._legend_above(ax)
    return h._png(figure)


# --- HTML pieces ----------------------------------------------------------------------------------


def _evaluation(run: r.Run) -> str:
    """Nothing at all when no round was evaluated (spec.evaluate unset): not a "no data" note."""
    picture = evaluation_figure(run)
    if picture is None:
        return ""
    return h._figure_section("evaluation", "Held-out evaluation per round", picture, "")


def _quality_table(run: r.Run, data: dict[int, q.RoundData]) -> str:
    """One column per round that has any figure, one row per figure that any round has."""
    rows = [(label, cells) for label, cells in quality_rows(run, data) if cells]
    problems = [f"round {k}: {d.problem}" for k, d in sorted(data.items()) if d.problem]
    notes = "".join(f'<p class="missing">Unreadable: {h._e(p)}</p>' for p in problems)
    if not rows:
        return notes + '<p class="missing">No data: no synthesize or assess results.</p>'
    shown = sorted({k for _, cells in rows for k in cells})
    head = "".join(f"<th>Round {k}</th>" for k in shown)
    body = "".join(
        f"<tr><th>{h._e(label)}</th>"
        + "".join(h._td(cells.get(k, "-"), "num") for k in shown)
        + "</tr>"
        for label, cells in rows
    )
    return (
        f'{notes}<table class="quality"><tr><th></th>{head}</tr>{body}</table>'
        "<p>Shares are of the round's candidates. ROUGE-L: a fixed-seed sample of the distinct "
        "kept instructions (lower is more diverse). Label mass: the judge's probability on its "
        "score labels, the least over an item's criteria.</p>"
    )


def quality_rows(run: r.Run, data: dict[int, q.RoundData]) -> list[tuple[str, dict[int, str]]]:
    """(label, round -> cell text) for every figure of the data-quality table."""
    rounds = range(r.total_rounds(run))
    parsed = {k: p for k in rounds if (p := q.parsing(run, k))}
    shares = {k: {label: (n, s) for label, n, s in q.kept_by_rule(run, k)} for k in rounds}
    labels = dict.fromkeys(label for k in rounds for label in shares[k])
    found = {k: d.diversity for k, d in data.items() if d.diversity}
    masses = {k: m.mean for k in rounds if (m := q.label_mass(run, k)) and m.mean is not None}
    return [
        ("Completions parsed",
         {k: f"{p.parsed} of {p.completions} ({_share(p.parsed, p.completions)})"
          for k, p in parsed.items()}),
        ("Items checked (accepted)",
         {k: f"{p.items} ({p.instructions})" for k, p in parsed.items()}),
        ("Candidates", {k: str(p.generated) for k, p in parsed.items()}),
        *(
            ("Kept" if label == "kept" else f"Rejected: {label}",
             {k: f"{shares[k][label][0]} ({shares[k][label][1]:.1%})"
              for k in rounds if label in shares[k]})
            for label in labels
        ),
        ("Distinct instructions",
         {k: f"{d.distinct} of {d.rows} kept rows" for k, d in found.items()}),
        ("Mean pairwise ROUGE-L", {k: f"{d.mean_rouge_l:.3f} (sample of {d.sampled})"
                                   for k, d in found.items() if d.mean_rouge_l is not None}),
        ("Distinct leading words", {k: str(d.leading_words) for k, d in found.items()}),
        ("Judge label mass (mean)", {k: f"{mean:.3f}" for k, mean in masses.items()}),
        ("Held-out loss before → after",
         {k: f"{b:.3f} → {a:.3f}" for k, (b, a) in q.eval_losses(run).items()}),
    ]


def _examples(data: dict[int, q.RoundData]) -> str:
    parts = []
    for k, found in sorted(data.items()):
        if found.kept or found.rejected:
            parts.append(f"<h3>Round {k}</h3>"
                         f"<p>Kept: the first {len(found.kept)}.</p>{_rows(found.kept, False)}"
                         f"<p>Rejected: {len(found.rejected)}, taken in turn from each rule.</p>"
                         f"{_rows(found.rejected, True)}")
    return "".join(parts) or '<p class="missing">No data: no scored.jsonl in any round.</p>'


def _rows(examples: list[q.Example], rejected: bool) -> str:
    if not examples:
        return '<p class="missing">None.</p>'
    head = ("<th>Rule</th>" if rejected else "") + "".join(
        f"<th>{name}</th>" for name in ("Instruction", "Input", "Output", "Scores")
    )
    body = "".join(
        "<tr>" + (h._td(e.reject) if rejected else "") + h._td(e.instruction) + h._td(e.input)
        + h._td(e.output) + h._td(_scores(e.scores)) + "</tr>"
        for e in examples
    )
    return f'<table class="rows"><tr>{head}</tr>{body}</table>'


def _scores(scores: dict[str, float] | None) -> str:
    if not scores:
        return "not judged"
    return ", ".join(f"{name} {value:.2f}" if isinstance(value, (int, float)) else f"{name} {value}"
                     for name, value in scores.items())


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"
