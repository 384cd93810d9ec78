"""The `selfalign` console script as a user runs it: real subprocesses, real files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SELFALIGN = [sys.executable, "-m", "selfalign.operator.cli.main"]


REPO = Path(__file__).resolve().parents[1]


def selfalign(*args, cwd=None, stdin=None):
    return subprocess.run([*SELFALIGN, *args], capture_output=True, text=True, cwd=cwd, check=False, input=stdin)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_dedup_drops_near_duplicates_of_the_pool_and_of_earlier_candidates(tmp_path):
    write_jsonl(tmp_path / "pool.jsonl", [{"instruction": "Write a short poem about the sea at night."}])
    write_jsonl(tmp_path / "new.jsonl", [
        {"instruction": "Write a short poem about the sea at night!", "id": "near-pool"},
        {"instruction": "List three causes of the French Revolution.", "id": "fresh"},
        {"instruction": "List three causes of the French Revolution, please.", "id": "near-fresh"},
        {"instruction": "Explain how a bicycle gear works to a child.", "id": "other"},
    ])
    result = selfalign("dedup", "--pool", str(tmp_path / "pool.jsonl"), "--candidates",
                       str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "kept.jsonl"))
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["candidates"] == 4 and counts["kept"] == 2 and counts["duplicates"] == 2
    kept = [json.loads(line)["id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == ["fresh", "other"]


def test_dedup_names_the_file_and_line_of_a_broken_row(tmp_path):
    (tmp_path / "new.jsonl").write_text('{"instruction": "fine"}\n{"instruction": \n')
    result = selfalign("dedup", "--candidates", str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "k.jsonl"))
    assert result.returncode == 2
    assert "new.jsonl:2" in result.stderr and "Traceback" not in result.stderr


def test_validate_accepts_the_examples_and_names_each_bad_field(tmp_path):
    examples = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "examples").glob("run-*.yaml"))
    assert examples
    ok = selfalign("validate", *examples)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(examples[0]).read_text().replace("rounds:", "rounds: 0\n  x-rounds:", 1))
    result = selfalign("validate", str(bad))
    assert result.returncode == 1
    assert "spec.rounds" in result.stdout


def test_render_prints_every_object_of_the_round(tmp_path):
    import yaml
    example = Path(__file__).resolve().parents[1] / "examples" / "run-isheep.yaml"
    result = selfalign("render", str(example), "--round", "1")
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds.count("Job") == 5 and kinds.count("ConfigMap") == 1
    out_of_range = selfalign("render", str(example), "--round", "99")
    assert out_of_range.returncode == 1 and "round 99" in out_of_range.stderr


def test_coverage_writes_report_gaps_and_map_for_any_instruction_set(tmp_path):
    passages = Path(__file__).resolve().parent / "data" / "t0-passages.jsonl"
    rows = [json.loads(line) for line in passages.read_text().splitlines()]
    reference = [r for r in rows if r["domain"] == "imdb"][:6] + [r for r in rows if r["domain"] == "sciq"][:6]
    write_jsonl(tmp_path / "reference.jsonl", reference)
    write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"Summarise this review: {r['text'][:200]}", "output": "ok"}
                                         for r in reference if r["domain"] == "imdb"])
    result = subprocess.run([*SELFALIGN, "coverage", "--reference", str(tmp_path / "reference.jsonl"),
                             "--instructions", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "out"),
                             "--gaps", "3"], capture_output=True, text=True, check=False,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert 0 < summary["coverage"] < 1
    gaps = [json.loads(line) for line in (tmp_path / "out" / "gaps.jsonl").read_text().splitlines()]
    assert len(gaps) == 3 and {g["domain"] for g in gaps} == {"sciq"}
    assert (tmp_path / "out" / "coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coverage" in json.loads((tmp_path / "out" / "report.json").read_text())


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    result = selfalign("--version")
    assert result.returncode == 0 and result.stdout == f"selfalign {version('selfalign')}\n"


def test_a_missing_file_is_one_line_naming_it_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = selfalign("run", str(missing))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"selfalign run: {missing}#0: (file): cannot read: No such file or directory\n"
    for debug in (selfalign("run", str(missing), "--debug"), selfalign("--debug", "run", str(missing))):
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_a_path_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    scratch = tmp_path / "file" / "scratch"
    result = selfalign("run", str(REPO / "examples" / "tiny.yaml"), "--storage", str(tmp_path / "runs"),
                       "--scratch", str(scratch))
    assert result.returncode == 2 and result.stderr == f"selfalign run: {scratch}: Not a directory\n"


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: selfalign.dev/v1alpha1\nkind: SelfAlignRun\nspec: [unclosed\n")
    for command in ("run", "render"):
        result = selfalign(command, str(broken))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr == (f"selfalign {command}: {broken}#0: (yaml): expected ',' or ']', "
                                 "but got '<stream end>' (line 4)\n")


def test_validate_reads_standard_input_and_skips_other_kinds_with_a_note():
    folder = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n---\n" \
             + (REPO / "examples" / "run-aitp.yaml").read_text() \
             + "---\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    result = selfalign("validate", "-", stdin=folder)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        "(stdin)#0: skipped: v1/ConfigMap is not a SelfAlignRun",
        "(stdin)#2: skipped: kustomize.config.k8s.io/v1beta1/Kustomization is not a SelfAlignRun",
        "(stdin)#1: ok",
    ]


def test_validate_still_checks_a_broken_selfalignrun_of_the_group():
    result = selfalign("validate", "-", stdin="apiVersion: selfalign.dev/v1alpha1\nkind: SelfAlignRuns\n")
    assert result.returncode == 1
    assert "(stdin)#0: kind: expected SelfAlignRun, got 'SelfAlignRuns' (line 2)" in result.stdout


def test_validate_refuses_file_storage_for_a_cluster_run_and_accepts_it_locally(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text((REPO / "examples" / "run-aitp.yaml").read_text()
                   .replace("uri: s3://selfalign-runs", "uri: file:///srv/runs")
                   .replace("endpoint:", "# endpoint:").replace("region:", "# region:")
                   .replace("secretRef:", "# secretRef:").replace("name: selfalign-s3", "# name"))
    cluster = selfalign("validate", str(run))
    assert cluster.returncode == 1
    [error] = cluster.stdout.splitlines()
    assert error.startswith(f"{run}#0: spec.storage.uri: file:///srv/runs is a path on one machine: "
                            "the stage pods of a cluster run cannot share it; use s3://")
    assert "selfalign validate --local" in error
    local = selfalign("validate", "--local", str(run))
    assert local.returncode == 0 and local.stdout == f"{run}#0: ok\n"


def test_coverage_accepts_instruction_rows_without_output(tmp_path):
    topics = ["tides and the moon", "baking sourdough bread", "tax returns", "chess openings", "bird migration"]
    write_jsonl(tmp_path / "reference.jsonl", [{"text": f"A short article about {t}."} for t in topics])
    write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"Explain {t}."} for t in topics[:2]])
    result = subprocess.run([*SELFALIGN, "coverage", "--reference", str(tmp_path / "reference.jsonl"),
                             "--instructions", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "out"),
                             "--gaps", "2"], capture_output=True, text=True, check=False,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["coverage"] > 0
