"""The local runner's terminal, logs and storage, with the fake stage in place of the real ones.

A whole two-round campaign of examples/tiny.yaml takes about a second this way; the real stages
through the same runner are tests/test_e2e.py's.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfalign.operator.cli import main as cli, report, run_commands
from selfalign.operator.cli.local import Progress, default_storage, load_run, run_local

REPO = Path(__file__).resolve().parents[1]
FAKE = (sys.executable, str(REPO / "tests" / "fake_stage.py"))
LINE = re.compile(r"^\[\d\d:\d\d\] \[[#-]{20}\] (\d+)/10 round (\d)/2 (\w+): (.*)$")


def tiny(storage: Path):
    return load_run(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text()), storage.as_uri())


def campaign(tmp_path: Path, **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_local(tiny(tmp_path / "runs"), tmp_path / "scratch", lines.append, stage_command=FAKE, **kwargs)
    return code, lines


def test_a_campaign_prints_one_line_per_stage_and_keeps_the_stage_output_in_its_log(tmp_path, capfd):
    code, lines = campaign(tmp_path)
    assert code == 0
    stages = [LINE.match(line) for line in lines[1:-1]]
    assert all(stages), lines
    assert [(int(m[1]), int(m[2]), m[3]) for m in stages] == [
        (n, 1 + (n - 1) // 5, stage) for n, stage in
        enumerate(["synthesize", "assess", "train", "merge", "coverage"] * 2, start=1)]
    assert all(m[4].startswith("done in ") for m in stages)
    assert re.fullmatch(r"done in \d\d:\d\d; campaign ETA \d\d:\d\d", stages[3][4])  # merge: nothing to show
    assert re.fullmatch(r"done in \d\d:\d\d: kept 8/\?; campaign ETA .*", stages[6][4])  # as status shows it
    assert "campaign ETA" in stages[0][4] and "campaign ETA" not in stages[-1][4]
    assert lines[-1].endswith("2 rounds finished; model " + tiny(tmp_path / "runs").uri + "/models/round-2")
    assert "fake synthesize" not in capfd.readouterr().out  # the stages' own output is in their logs
    log = tmp_path / "runs" / "local" / "tiny" / "logs" / "round-1-train.log"
    assert "fake train round=1 recipe=isheep" in log.read_text()


def test_verbose_streams_the_stages_own_output(tmp_path, capfd):
    code, _ = campaign(tmp_path, verbose=True)
    assert code == 0
    assert "fake coverage round=1 recipe=isheep" in capfd.readouterr().out


def test_a_failed_stage_names_its_cause_and_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "train")
    monkeypatch.setenv("FAKE_FAIL_CODE", "2")
    code, lines = campaign(tmp_path)
    assert code == 1
    log_uri = tiny(tmp_path / "runs").uri + "/logs/round-0-train.log"
    assert LINE.match(lines[3])[4] == f"failed: train round 0: fake failure for the test (log: {log_uri})"


def test_logs_prints_a_stage_log_of_a_local_run(tmp_path, capsys):
    campaign(tmp_path)
    capsys.readouterr()
    storage = (tmp_path / "runs").as_uri()
    assert cli.main(["logs", "tiny", "--storage", storage, "--round", "2", "--stage", "merge"]) == 0
    assert "fake merge round=1" in capsys.readouterr().out
    assert cli.main(["logs", "tiny", "--storage", storage]) == 0  # the run's last stage
    assert "fake coverage round=1" in capsys.readouterr().out


def test_the_eta_is_each_remaining_stage_at_its_average_so_far():
    progress = Progress(rounds=2, started=0.0)
    assert progress.eta(0) is None
    progress.seconds = {"synthesize": [10.0, 20.0], "assess": [4.0]}
    every = (10 + 20 + 4) / 3  # a stage not seen yet: the average of every stage so far
    # left after 2 stages: round 1's train, merge, coverage, then all five of round 2
    assert progress.eta(2) == pytest.approx(3 * every + 15 + 4 + 3 * every)


def test_runs_without_storage_live_in_the_users_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_storage() == (tmp_path / "data" / "selfalign" / "runs").as_uri()
    manifest = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    manifest["spec"].pop("storage", None)
    assert load_run(manifest).uri == f"{default_storage()}/local/tiny"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_storage() == (Path.home() / ".local" / "share" / "selfalign" / "runs").as_uri()


def test_status_prints_a_local_run_as_a_selfalignrun_object(tmp_path, capsys):
    campaign(tmp_path)
    capsys.readouterr()
    assert cli.main(["status", "tiny", "--storage", str(tmp_path / "runs"), "-o", "json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert (obj["kind"], obj["metadata"]) == ("SelfAlignRun", {"name": "tiny", "namespace": "local"})
    assert obj["spec"]["rounds"] == 2 and obj["status"]["phase"] == "Succeeded"
    assert cli.main(["status", "--storage", str(tmp_path / "runs"), "-o", "yaml"]) == 0
    listed = yaml.safe_load(capsys.readouterr().out.removesuffix("---\n"))
    assert [item["metadata"]["name"] for item in listed["items"]] == ["tiny"]


def test_watching_a_local_run_prints_each_change_until_it_ends(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_commands, "POLL_SECONDS", 0.05)
    folder = tmp_path / "runs" / "local" / "w"
    folder.mkdir(parents=True)
    states = iter([{"phase": "Running", "round": 0, "stage": "train"},
                   {"phase": "Running", "round": 0, "stage": "train"},
                   {"phase": "Running", "round": 1, "stage": "merge"},
                   {"phase": "Failed", "round": 1, "stage": "merge"}])

    def read_run(uri, real=report.read_run):
        (folder / "status.json").write_text(json.dumps(next(states)))
        return real(uri)

    monkeypatch.setattr(report, "read_run", read_run)
    assert cli.main(["status", "w", "--storage", str(tmp_path / "runs"), "--watch"]) == 1
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run w:")]
    assert heads == ["run w: Running, round 1 stage train", "run w: Running, round 2 stage merge",
                     "run w: Failed, round 2 stage merge"]


def runner_script(tmp_path: Path) -> str:
    """A `selfalign run` of examples/tiny.yaml whose stage command is this script's arguments."""
    return (f"import sys, yaml\nfrom pathlib import Path\n"
            f"from selfalign.operator.cli.local import load_run, run_local\n"
            f"run = load_run(yaml.safe_load(open({str(REPO / 'examples' / 'tiny.yaml')!r})), "
            f"{(tmp_path / 'runs').as_uri()!r})\n"
            f"sys.exit(run_local(run, Path({str(tmp_path / 'scratch')!r}), stage_command=tuple(sys.argv[1:])))\n")


def interrupt_when_started(tmp_path: Path, stage: tuple[str, ...]) -> tuple[int, str]:
    """Start the runner with `stage`, Ctrl-C its process group once the stage printed "stage started"
    (as a line of its own: the log's header line quotes the command, and with it those words)."""
    started = subprocess.Popen([sys.executable, "-c", runner_script(tmp_path), *stage], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    log = tmp_path / "runs" / "local" / "tiny" / "logs" / "round-0-synthesize.log"
    deadline = time.monotonic() + 60
    while not re.search(r"^stage started", log.read_text() if log.exists() else "", re.MULTILINE):
        assert time.monotonic() < deadline and started.poll() is None
        time.sleep(0.1)
    os.killpg(started.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, _ = started.communicate(timeout=60)
    return started.returncode, out


def test_ctrl_c_stops_the_running_stage_and_the_same_command_resumes(tmp_path):
    sleeper = (sys.executable, "-c", "import time; print('stage started', flush=True); time.sleep(60)")
    code, out = interrupt_when_started(tmp_path, sleeper)
    assert code == 130
    assert out.splitlines()[-1] == "stopped during round 1 synthesize; run the same command again to resume"
    resumed = subprocess.run([sys.executable, "-c", runner_script(tmp_path), *FAKE], capture_output=True,
                             text=True, timeout=120)
    model = f"{(tmp_path / 'runs').as_uri()}/local/tiny/models/round-2"
    assert resumed.returncode == 0 and resumed.stdout.splitlines()[-1].endswith(f"2 rounds finished; model {model}")


def test_a_stage_that_ignores_ctrl_c_is_terminated_and_the_run_stops(tmp_path):
    stubborn = (sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "print('stage started', os.getpid(), flush=True); time.sleep(120)")
    code, out = interrupt_when_started(tmp_path, stubborn)
    assert code == 130 and out.splitlines()[-1].startswith("stopped during round 1 synthesize")
    log = (tmp_path / "runs" / "local" / "tiny" / "logs" / "round-0-synthesize.log").read_text()
    stage_pid = int(re.search(r"^stage started (\d+)$", log, re.MULTILINE).group(1))
    with pytest.raises(ProcessLookupError):  # ended and reaped, not left running on its own
        os.kill(stage_pid, 0)


def test_ctrl_c_as_a_stage_finishes_keeps_its_result_and_starts_nothing_more(tmp_path):
    # The stage interrupts its runner and then completes: Ctrl-C landing as a stage exits.
    finishing = (sys.executable, "-c", "import os, runpy, signal, sys; os.kill(os.getppid(), signal.SIGINT); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')", FAKE[1])
    run = subprocess.run([sys.executable, "-c", runner_script(tmp_path), *finishing], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 130, run.stderr
    assert run.stdout.splitlines()[-1] == "stopped before round 1 assess; run the same command again to resume"
    status = json.loads((tmp_path / "runs" / "local" / "tiny" / "status.json").read_text())
    assert status["rounds"][0]["stages"]["synthesize"]["phase"] == "Succeeded"
    assert not (tmp_path / "runs" / "local" / "tiny" / "logs" / "round-0-assess.log").exists()
