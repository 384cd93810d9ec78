"""The Argo CD health check (charts/selfalign/argocd/health.lua), run with a real Lua (lupa).

The statuses come from the planner itself, so the check is tested against exactly what the
operator writes; a few hand-written ones cover what the planner never produces on its own
(no status yet, a status older than the spec, an operator that wrote no conditions).
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from selfalign.operator.planner import JobObservation, plan
from selfalign.operator.spec import STAGES, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
HEALTH_LUA = ROOT / "charts" / "selfalign" / "argocd" / "health.lua"
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def health():
    try:
        from lupa import LuaRuntime
    except ImportError:
        pytest.fail("lupa is not installed: it belongs in the test extra (pip install lupa)")
    script = HEALTH_LUA.read_text()

    def check(obj: dict) -> tuple[str, str]:
        # A fresh runtime per call: the script sets globals, as Argo CD's per-resource VM allows.
        lua = LuaRuntime()
        lua.globals().obj = lua.table_from(obj, recursive=True)
        result = lua.execute(script)
        return result["status"], result["message"]

    return check


def make_spec(**overrides):
    raw = {
        "recipe": "isheep", "rounds": 1,
        "model": {"base": "s3://models/base"}, "seeds": "s3://data/seeds.jsonl",
        "storage": {"uri": "s3://bucket/runs"}, "coverage": {"reference": "s3://data/ref.jsonl"},
        **overrides,
    }
    return parse_spec(raw)


def step(spec, status, observed=None, generation=1):
    return plan(spec, status, observed or {}, T0, namespace="team-a", name="camp", generation=generation)


def run_object(status, generation=1) -> dict:
    obj = {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun",
           "metadata": {"name": "camp", "namespace": "team-a", "generation": generation}}
    if status is not None:
        obj["status"] = status
    return obj


def finish_every_stage(spec):
    result = step(spec, None)
    observed = {}
    for _ in STAGES:
        (job,) = result.jobs
        observed[job.name] = JobObservation(job.name, job.round, job.stage, "Succeeded", result={})
        result = step(spec, result.status, observed)
    return result.status


def test_a_running_run_is_progressing_with_its_round_and_stage(health):
    status = step(make_spec(), None).status
    state, message = health(run_object(status))
    assert state == "Progressing"
    assert "synthesize" in message


def test_a_succeeded_run_is_healthy(health):
    status = finish_every_stage(make_spec())
    assert status["phase"] == "Succeeded"
    assert health(run_object(status))[0] == "Healthy"


def test_a_failed_run_is_degraded_and_says_where_and_why(health):
    spec = make_spec()
    first = step(spec, None)
    (job,) = first.jobs
    failed = {job.name: JobObservation(job.name, 0, "synthesize", "Failed", failures=3,
                                       message="seeds.jsonl:4: field instruction missing")}
    status = step(spec, first.status, failed).status
    state, message = health(run_object(status))
    assert state == "Degraded"
    assert "synthesize" in message and "seeds.jsonl:4" in message


def test_an_invalid_spec_is_degraded(health):
    with pytest.raises(SpecError) as bad:
        make_spec(rounds=0)
    status = step(bad.value, None).status
    assert health(run_object(status))[0] == "Degraded"


def test_a_suspended_run_is_suspended(health):
    status = step(make_spec(suspend=True), None).status
    assert status["phase"] == "Suspended"
    assert health(run_object(status))[0] == "Suspended"


def test_a_status_older_than_the_spec_is_progressing_whatever_it_says(health):
    status = finish_every_stage(make_spec())
    state, message = health(run_object(status, generation=2))
    assert state == "Progressing"
    assert "generation 2" in message


def test_a_run_without_status_is_progressing(health):
    assert health(run_object(None))[0] == "Progressing"


@pytest.mark.parametrize(
    ("phase", "expected"),
    [("Pending", "Progressing"), ("Running", "Progressing"), ("Succeeded", "Healthy"),
     ("Failed", "Degraded"), ("Suspended", "Suspended")],
)
def test_the_phase_decides_when_there_are_no_conditions(health, phase, expected):
    status = {"phase": phase, "observedGeneration": 1, "message": "from an older operator"}
    assert health(run_object(status)) == (expected, "from an older operator")


def test_a_condition_of_an_older_generation_is_ignored(health):
    status = {"phase": "Running", "observedGeneration": 3, "conditions": [
        {"type": "Failed", "status": "True", "observedGeneration": 2, "message": "old failure"},
        {"type": "Progressing", "status": "True", "observedGeneration": 3, "message": "round 0 stage train"},
    ]}
    assert health(run_object(status, generation=3)) == ("Progressing", "round 0 stage train")


def test_docs_carry_the_script_verbatim():
    """docs/gitops.md's argocd-cm sample is what users paste: it must be the tested script."""
    docs = (ROOT / "docs" / "gitops.md").read_text()
    blocks = [block.split("```")[0] for block in docs.split("```yaml\n")[1:]]
    config_map = next(yaml.safe_load(b) for b in blocks if "kind: ConfigMap" in b)
    assert config_map["metadata"]["name"] == "argocd-cm"
    key = "resource.customizations.health.selfalign.dev_SelfAlignRun"
    assert config_map["data"][key] == HEALTH_LUA.read_text()
