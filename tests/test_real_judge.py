"""The AITP judge on a real instruct model puts its probability on the labels it is asked for.

tests/data/smollm2-rewrites.jsonl holds rewrites SmolLM2-135M-Instruct wrote in a run of
examples/smol-aitp.yaml (junk questions among them: the judge is asked about them all, and what it
says of junk is the rubric's business, not this test's). They are judged here by the stage's own
`judge` on the real model. Opening the reply with the rubric's own line ("Additional information
needed (yes or no): ") left SmolLM2 0.02 of its probability on yes/no and 0.27 on the quality
scores, under the label-mass floor for every rewrite; asked each criterion as a question, with the
reply opened by "Score:" or "Answer:", it put 0.73-0.93 there in that run.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from selfalign.operator.spec import parse_spec
from selfalign.stages.assess import AITP_CRITERIA, judge
from selfalign.stages.models.engines import open_engine
from selfalign.stages.text.records import Candidate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
REWRITES = [json.loads(line) for line in (REPO / "tests" / "data" / "smollm2-rewrites.jsonl").open()]


SPEC = parse_spec({**yaml.safe_load((REPO / "examples" / "smol-aitp.yaml").read_text())["spec"],
                   "storage": {"uri": "file:///unused"}})  # a local run adds it; the judge never reads it


@pytest.fixture(scope="module")
def judged(smollm2_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
        engine = open_engine(smollm2_dir, SPEC, gpus=0, seed=0)
        try:
            yield judge(engine, [Candidate(f"a{i}", row["instruction"], "", row["output"], "aitp", 1, "file:///m")
                                 for i, row in enumerate(REWRITES)])
        finally:
            engine.close()


@pytest.mark.parametrize("criterion", list(AITP_CRITERIA))
def test_the_aitp_judge_puts_its_probability_on_the_labels(judged, criterion):
    masses = [judged[f"a{i}"][criterion].mass for i in range(len(REWRITES))]
    assert min(masses) >= SPEC.assess.label_mass_floor and statistics.mean(masses) >= 0.5, masses
