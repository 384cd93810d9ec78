"""Setup seconds apart from work seconds: every stage's manifest and result split its wall time into
setup (start-up and imports, model download, model load and engine start) and work."""
import json
import subprocess
import time

from selfalign.operator.spec import parse_spec
from selfalign.stages.runtime import storage
from selfalign.stages.runtime.context import StageClock, StageContext
from tests.test_train import kept_uri, spec_dict, stage_command, stage_env, toy_rows, write_spec

TICK = 0.011  # a clock tick of /proc/<pid>/stat's starttime (USER_HZ 100), and a little


def test_the_clock_counts_setup_blocks_and_the_rest_is_work(tmp_path):
    ctx = StageContext(stage="train", spec=parse_spec(spec_dict(tmp_path, "file:///tmp/runs")), round=0,
                       run_uri="file:///tmp/runs/r", model=None, scratch=str(tmp_path),
                       clock=StageClock(started=100.0))
    ctx.clock.add("startup", 2.0)
    with ctx.setup("load"):
        pass
    ctx.clock.add("load", 3.0)
    split = ctx.clock.split(now=110.0)
    assert split["setup"]["startup"] == 2.0 and 3.0 <= split["setup"]["load"] < 3.1
    assert split["setupSeconds"] == round(sum(split["setup"].values()), 3)
    assert split["setupSeconds"] + split["workSeconds"] == 10.0


def test_a_stage_run_records_setup_and_work_that_add_up_to_its_wall_time(tiny_model_dir, tmp_path):
    run_uri = (tmp_path / "run").as_uri()
    storage.write_jsonl(kept_uri(run_uri, 0), toy_rows()[:16])
    spec_path = write_spec(tmp_path, spec_dict(tiny_model_dir, "file:///tmp/runs", epochs=1))
    result = tmp_path / "result.json"
    launched = time.time()
    proc = subprocess.run(stage_command("train", spec_path, run_uri, tiny_model_dir.as_uri(), tmp_path / "scratch"),
                          env=stage_env(result), capture_output=True, text=True, timeout=600, check=False)
    returned = time.time()
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads(result.read_text())
    timings = storage.read_json(f"{run_uri}/round-0/train/manifest.json")["timings"]
    assert summary["setupSeconds"] == timings["setupSeconds"] > 0
    assert summary["workSeconds"] == timings["workSeconds"] > 0
    # Counted from the process's own start (before the interpreter imported anything), so the
    # stage's wall time lies inside the span the parent saw it run (the kernel counts in 10 ms ticks).
    assert launched - TICK <= timings["start"] < timings["finish"] <= returned
    assert abs(timings["setupSeconds"] + timings["workSeconds"] - timings["seconds"]) < 0.01
    assert {"startup", "download", "load"} <= set(timings["setup"])
    assert abs(sum(timings["setup"].values()) - timings["setupSeconds"]) < 0.01
