"""Data quality in `selfalign report` and `selfalign status RUN` (issue 12 item 8), on a run folder
written by hand on file://: manifests with the keys stages/synthesize.py, assess.py and merge.py
write, and assess's kept.jsonl and scored.jsonl with rows whose ROUGE-L is known by hand.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from selfalign.operator.cli import quality, report
from selfalign.operator.cli.report_html import write_report

# ROUGE-L F1 by hand: "write a poem" / "write a story" share 2 of 3 tokens each (F = 2/3); "list
# three colors" shares nothing with either. Mean over the 3 pairs: 2/9. Leading words: write, list.
ROUND0_KEPT = ["Write a poem", "write a story", "List three colors", "Write a poem"]
ROUND1_KEPT = ["Explain gravity", "Explain gravity."]  # distinct strings, ROUGE-L 1.0
HOSTILE = '<script>alert("x")</script> & <b>bold</b>'
LONG = "word " * 200


def row(instruction, reject=None, scores=None, output="an answer", input_=""):
    return {"id": instruction[:8], "instruction": instruction, "input": input_, "output": output,
            "origin": "self-instruct", "scores": scores, "labelMass": None, "reject": reject}


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_manifest(folder: Path, round_: int, stage: str, summary: dict, metrics: dict) -> None:
    path = folder / f"round-{round_}" / stage
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({
        "stage": stage, "round": round_, "summary": summary, "metrics": metrics,
        "inputs": {"spec": {"rounds": 2, "recipe": "self-instruct"}},
    }))


def build(folder: Path, evaluated: bool) -> Path:
    for k in (0, 1):
        write_manifest(folder, k, "synthesize",
                       {"prompts": 10, "instructions": 5, "generated": 8, "rejected": 4 + k},
                       {"rejections": {"nothing-parsed": 1, "truncated-completion": k,
                                       "rouge-l-duplicate": 2, "too-short": 1}})
        write_manifest(folder, k, "assess",
                       {"candidates": 8, "kept": 4, "keptRatio": 0.5,
                        "meanLabelMass": 0.62 + 0.1 * k},
                       {"rejects": {"below-quality": 1, "rouge-l-duplicate": 3},
                        "labelMass": {"histogram": [0, 0, 0, 0, 0, 1, 2, 1, 1, 0],
                                      "edges": [round(0.1 * i, 1) for i in range(11)],
                                      "min": 0.55, "median": 0.65}})
        losses = {"evalLossBefore": 2.5 - 0.25 * k, "evalLossAfter": 2.25 - 0.25 * k}
        write_manifest(folder, k, "merge",
                       {"model": f"file:///m/{k + 1}", **(losses if evaluated else {})}, {})
    assess0, assess1 = folder / "round-0" / "assess", folder / "round-1" / "assess"
    write_jsonl(assess0 / "kept.jsonl",
                ({"instruction": i, "input": "", "output": "o"} for i in ROUND0_KEPT))
    write_jsonl(assess0 / "scored.jsonl", [
        row("Write a poem", scores={"quality": 7.25, "following": 6.5}, output=LONG),
        row(HOSTILE, reject="too-short", input_=HOSTILE, output=HOSTILE),
        row("Write a poem again", reject="rouge-l-duplicate"),
    ])
    write_jsonl(assess1 / "kept.jsonl", ({"instruction": i} for i in ROUND1_KEPT))
    write_jsonl(assess1 / "scored.jsonl",
                [row(f"kept {i}", scores={"quality": 8.0}) for i in range(15)]
                + [row(f"dup {i}", reject="rouge-l-duplicate") for i in range(12)]
                + [row(f"low {i}", reject="below-quality", scores={"quality": 3.0})
                   for i in range(2)])
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quality")
    return {name: build(root / name, evaluated=name == "evaluated")
            for name in ("evaluated", "plain")}


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("pages")
    return {name: write_report(report.read_run(folder.as_uri()), out / name).read_text()
            for name, folder in runs.items()}


def section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, f"no section {anchor}"
    return match[1]


def images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="(data:image/png;base64,[^"]+)"', page)


def quality_cells(page: str) -> dict[str, list[str]]:
    table = section(page, "quality")
    return {m[1]: re.findall(r'<td class="num">(.*?)</td>', m[2])
            for m in re.finditer(r"<tr><th>([^<]+)</th>(.*?)</tr>", table)}


# --- the figures, by hand -------------------------------------------------------------------------


def test_diversity_is_the_mean_pairwise_rouge_l_of_the_distinct_instructions():
    found = quality.diversity(ROUND0_KEPT)
    assert (found.rows, found.distinct, found.sampled, found.leading_words) == (4, 3, 3, 2)
    assert found.mean_rouge_l == pytest.approx(2 / 9)
    assert quality.diversity(ROUND1_KEPT).mean_rouge_l == 1.0
    assert quality.diversity(["alone"]).mean_rouge_l is None


def test_diversity_samples_with_a_fixed_seed():
    instructions = [f"task number {i} about topic {i % 7}" for i in range(50)]
    first = quality.diversity(instructions, sample=10)
    again = quality.diversity(instructions, sample=10)
    assert first.sampled == 10 and first.distinct == 50 and first == again
    assert first.mean_rouge_l != quality.diversity(instructions, sample=10, seed=1).mean_rouge_l


def test_parsing_and_kept_share_by_rule_come_from_the_manifests(runs):
    run = report.read_run(runs["evaluated"].as_uri())
    # 10 completions; 1 parsed nothing (round 1: one more was cut by length); items: 5 accepted + 3
    assert quality.parsing(run, 0) == quality.Parsing(10, 9, 8, 5, 8)
    assert quality.parsing(run, 1).parsed == 8
    assert quality.kept_by_rule(run, 0) == [
        ("kept", 4, 0.5), ("rouge-l-duplicate", 3, 0.375), ("below-quality", 1, 0.125)
    ]
    assert quality.eval_losses(run) == {0: (2.5, 2.25), 1: (2.25, 2.0)}
    assert quality.label_mass(run, 1).mean == pytest.approx(0.72)


def test_rejected_examples_take_each_rule_in_turn(runs):
    data = quality.read_round_data(runs["plain"].as_uri(), 1)
    assert [e.instruction for e in data.kept] == [f"kept {i}" for i in range(10)]
    assert [e.reject for e in data.rejected] == ["rouge-l-duplicate", "below-quality"] * 2 + [
        "rouge-l-duplicate"] * 6
    assert data.rejected[1].scores == {"quality": 3.0} and data.rejected[0].scores is None


# --- the report -----------------------------------------------------------------------------------


def test_report_shows_parsing_kept_share_diversity_and_label_mass_per_round(pages):
    cells = quality_cells(pages["plain"])
    assert cells["Completions parsed"] == ["9 of 10 (90%)", "8 of 10 (80%)"]
    assert cells["Items checked (accepted)"] == ["8 (5)", "8 (5)"]
    assert cells["Kept"] == ["4 (50.0%)", "4 (50.0%)"]
    assert cells["Rejected: rouge-l-duplicate"] == ["3 (37.5%)", "3 (37.5%)"]
    assert cells["Rejected: below-quality"] == ["1 (12.5%)", "1 (12.5%)"]
    assert cells["Distinct instructions"] == ["3 of 4 kept rows", "2 of 2 kept rows"]
    assert cells["Mean pairwise ROUGE-L"] == ["0.222 (sample of 3)", "1.000 (sample of 2)"]
    assert cells["Distinct leading words"] == ["2", "1"]
    assert cells["Judge label mass (mean)"] == ["0.620", "0.720"]
    assert len(images(section(pages["plain"], "labelmass"))) == 1


def test_report_shows_example_rows_escaped_and_cut(pages):
    examples = section(pages["plain"], "examples")
    assert "<script>" not in pages["plain"] and "<b>bold" not in pages["plain"]
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
    assert examples.count(escaped) == 3  # instruction, input and output
    assert "<td>too-short</td>" in examples and "<td>rouge-l-duplicate</td>" in examples
    assert "quality 7.25, following 6.50" in examples and "not judged" in examples
    assert (LONG[:299] + "…") in examples and LONG not in examples


def test_evaluation_is_plotted_when_measured_and_absent_otherwise(pages):
    evaluation = section(pages["evaluated"], "evaluation")
    assert len(images(evaluation)) == 1
    assert quality_cells(pages["evaluated"])["Held-out loss before → after"] == [
        "2.500 → 2.250", "2.250 → 2.000"]
    assert 'id="evaluation"' not in pages["plain"] and "Held-out" not in pages["plain"]


def test_the_page_references_nothing_outside_itself(pages):
    for page in pages.values():
        assert not re.search(r"<script|<link|<iframe|<object|url\(|@import", page, re.I)
        assert not re.findall(r'(?:src|href|srcset|action)="(?!data:image/png;base64,)', page)


def test_an_unreadable_data_file_is_named_and_the_rest_still_reports(runs, tmp_path):
    folder = shutil.copytree(runs["plain"], tmp_path / "garbled")
    (folder / "round-1" / "assess" / "scored.jsonl").write_text('{"instruction": "a"}\n{\n')
    page = write_report(report.read_run(folder.as_uri()), tmp_path / "out").read_text()
    unreadable = r"Unreadable: round 1: .*scored\.jsonl:2: invalid JSON"
    assert re.search(unreadable, section(page, "quality"))
    assert quality_cells(page)["Distinct instructions"] == ["3 of 4 kept rows", "2 of 2 kept rows"]
    assert "<h3>Round 0</h3>" in section(page, "examples")


# --- selfalign status -----------------------------------------------------------------------------


def test_status_shows_a_data_quality_line_per_round(runs):
    table = report.run_table(report.read_run(runs["evaluated"].as_uri()))
    assert "round 1 data: parsed 9/10 completions, kept 4/8 (50%), label mass 0.62, " \
           "eval loss 2.500 -> 2.250\n" in table
    assert "round 2 data: parsed 8/10 completions, kept 4/8 (50%), label mass 0.72, " \
           "eval loss 2.250 -> 2.000\n" in table
    assert "eval loss" not in report.run_table(report.read_run(runs["plain"].as_uri()))


def test_status_of_a_cluster_run_shows_what_its_status_keeps():
    """A SelfAlignRun's status keeps scalar metrics only: no per-rule counts, so no parse rate."""
    metrics = {
        "synthesize": {"prompts": 10, "instructions": 5},
        "assess": {"candidates": 8, "kept": 2, "meanLabelMass": 0.5},
        "merge": {"evalLossBefore": 2.0, "evalLossAfter": 2.5},
    }
    stages = {stage: {"phase": "Succeeded", "metrics": m} for stage, m in metrics.items()}
    status = {"phase": "Running", "rounds": [{"round": 0, "stages": stages}]}
    run = report.Run("r", "s3://b/ns/r/uid", status, {})
    assert quality.quality_line(run, 0) == (
        "kept 2/8 (25%), label mass 0.50, eval loss 2.000 -> 2.500"
    )
