"""synthesize: prompt building, seed sampling, batching, and the stage through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from selfalign.operator.spec import deep_merge, dump_spec, parse_spec
from selfalign.stages.text import prompting
from selfalign.stages.runtime import storage
from selfalign.stages.text.instances import MAX_INSTANCES
from selfalign.stages.text.parsing import Task
from selfalign.stages.text.records import Seed
from selfalign.stages.synthesize import (
    FIRST_BATCH_YIELD,
    MAX_BATCH,
    inverse_perplexity_weights,
    isheep_prompt,
    machine_pool,
    next_batch_size,
    response_prompt,
    sample_examples,
    self_instruct_prompt,
)
from tests.test_engine import CHAIN_CONTEXT, chain_model_dir  # noqa: F401 - a fixture

SEED_TASKS = Path(__file__).resolve().parents[1] / "stages" / "data" / "seed_tasks.jsonl"


def seeds(count: int) -> list[Seed]:
    return [Seed(f"s{i}", f"Instruction {i}", "", "out", False) for i in range(count)]


# --- pure parts -----------------------------------------------------------------------------------


def test_inverse_weights_favour_low_perplexity():
    weights = inverse_perplexity_weights([2.0, 4.0, 0.0])
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(2 * weights[1])  # 1/2 vs 1/4
    assert weights[2] == pytest.approx(4 * weights[1])  # ppl ~0 gets I-SHEEP's weight 1


def test_perplexity_weighted_sampling_picks_low_perplexity_seeds_more_often():
    pool = seeds(10)
    perplexities = [2.0] * 5 + [20.0] * 5
    weights = inverse_perplexity_weights(perplexities)
    rng = np.random.default_rng(0)
    picks = Counter()
    for _ in range(2000):
        _, ids = sample_examples(rng, pool, [], weights, seed_count=3, machine_count=0)
        assert len(set(ids)) == 3  # without replacement
        picks.update(ids)
    low = sum(picks[f"s{i}"] for i in range(5))
    high = sum(picks[f"s{i}"] for i in range(5, 10))
    assert low > 3 * high
    uniform = Counter()
    for _ in range(2000):
        uniform.update(sample_examples(rng, pool, [], None, 3, 0)[1])
    assert (
        0.8
        < sum(uniform[f"s{i}"] for i in range(5)) / sum(uniform[f"s{i}"] for i in range(5, 10))
        < 1.25
    )


def test_machine_examples_join_the_seeds_and_seeds_fill_an_empty_pool():
    rng = np.random.default_rng(1)
    tasks, ids = sample_examples(rng, seeds(10), [], None, seed_count=6, machine_count=2)
    assert len(tasks) == 8 and len(ids) == 8
    machine = [Task(f"Machine task {i}") for i in range(5)]
    tasks, ids = sample_examples(rng, seeds(10), machine, None, seed_count=6, machine_count=2)
    assert len(ids) == 6 and sum(t in machine for t in tasks) == 2


def test_self_instruct_prompt_is_a_numbered_list_ending_at_the_next_number():
    prompt = self_instruct_prompt([Task("Sort   these\nnumbers:"), Task("Name a river.")])
    assert prompt == "Come up with a series of tasks:\n1. Sort these numbers\n2. Name a river.\n3."


def test_isheep_prompt_shows_instruction_and_input_then_asks_for_the_next():
    prompt = isheep_prompt([Task("Translate to French.", "Good morning"), Task("Name a river.")])
    assert (
        "set of 20 diverse task instructions" in prompt
        and "List of 20 tasks:\n###\n1. Instruction:" in prompt
    )
    assert "1. Instruction: Translate to French.\n1. Input:\nGood morning\n###\n" in prompt
    assert "2. Instruction: Name a river.\n2. Input:\n<noinput>\n###\n" in prompt
    assert prompt.endswith("###\n3. Instruction:")


def test_batches_grow_with_the_measured_yield_and_respect_the_cap():
    assert next_batch_size(800, 0, 0, 10_000) == 800 // FIRST_BATCH_YIELD + 10  # plus a 10% margin
    assert next_batch_size(100, 50, 100, 10_000) == 220  # yield 0.5 per prompt
    assert next_batch_size(100, 0, 100, 10_000) == MAX_BATCH  # no yield yet: remaining / 0.05, capped
    assert next_batch_size(52_000, 0, 0, 200_000) == MAX_BATCH  # machine tasks join after the first
    assert next_batch_size(100, 0, 100, 150) == 50
    assert next_batch_size(1, 10, 5, 10_000) == 1


def test_response_prompt_raw_as_isheep_prompts_a_base_model_else_a_chat_turn():
    class Stub:  # the engine's choice of form (prompting.py, tested there), fixed per stub
        def __init__(self, chat):
            self.chat = chat

        def prompt(self, kind, text, answer_prefix=""):
            assert kind == "response"
            return prompting.build(text, self.chat, answer_prefix)

    assert response_prompt(Stub(False), Task("Add them.", "2 and 3")) == "Add them.\n2 and 3\n"
    assert response_prompt(Stub(False), Task("Name a river.")) == "Name a river.\n"
    assert response_prompt(Stub(True), Task("Add them.", "2 and 3")) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Add them.\n2 and 3"},
    ]


# --- the stage through the CLI --------------------------------------------------------------------


def write_spec(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(dump_spec(parse_spec(raw))))
    return path


def base_spec(recipe: str, bucket: str, model: str, seeds_uri: str, **overrides) -> dict:
    """A spec with tiny numbers for the chain model (engine settings of a CPU test)."""
    raw = {
        "recipe": recipe,
        "rounds": 2,
        "model": {"base": model, "chat": "never"},  # the chain toy continues raw formats only
        "seeds": seeds_uri,
        "storage": {"uri": bucket},
        "synthesize": {
            "instructionsPerRound": 8,
            "maxPrompts": 200,
            "instructionSampling": {"temperature": 1.0, "topP": 1.0, "maxTokens": 64},
            "responseSampling": {"temperature": 1.0, "topP": 1.0, "maxTokens": 32},
        },
        "coverage": {"reference": seeds_uri, "gapDocsPerRound": 3},
        "engine": {"maxModelLen": CHAIN_CONTEXT, "enforceEager": True, "dtype": "float32"},
    }
    return deep_merge(raw, overrides)


def upload_seeds(bucket: str, count: int = 6) -> str:
    uri = f"{bucket}/input/seeds.jsonl"
    lines = SEED_TASKS.read_text().splitlines()[:count]
    storage.write_jsonl(uri, (json.loads(line) for line in lines))
    return uri


def run_stage(
    stage: str, spec: Path, round_: int, run_uri: str, model: str, tmp_path: Path
) -> tuple[int, dict, str]:
    """`python -m selfalign.stages STAGE ...` as a Job runs it: (exit code, result, stderr)."""
    result = tmp_path / f"result-{stage}-{round_}.json"
    env = {
        **os.environ,
        "SELFALIGN_RESULT_PATH": str(result),
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfalign.stages",
            stage,
            "--spec",
            str(spec),
            "--round",
            str(round_),
            "--run-uri",
            run_uri,
            "--model",
            model,
            "--scratch",
            str(tmp_path / "scratch"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, json.loads(result.read_text()), proc.stderr


def test_bad_seed_file_fails_with_file_line_and_leaves_no_manifest(s3_bucket, tmp_path):
    seeds_uri = f"{s3_bucket}/input/seeds.jsonl"
    storage.write_text(
        seeds_uri, '{"instruction": "Fine.", "output": "ok"}\n{"instruction": "No output."}\n'
    )
    spec = write_spec(
        tmp_path / "spec.json", base_spec("isheep", s3_bucket, "builtin://tiny-llama", seeds_uri)
    )
    run_uri = f"{s3_bucket}/ns/run"
    code, result, stderr = run_stage(
        "synthesize", spec, 0, run_uri, "builtin://tiny-llama", tmp_path
    )
    assert code == 2
    assert f"{seeds_uri}:2: field 'output': missing" in result["error"]
    assert stderr.strip().splitlines()[-1].startswith("error: synthesize round 0:")
    assert not storage.exists(f"{run_uri}/round-0/synthesize/manifest.json")


@pytest.mark.slow
def test_aitp_rewrites_previous_gap_documents(s3_bucket, tmp_path, chain_model_dir):
    seeds_uri = upload_seeds(s3_bucket)
    model = chain_model_dir.as_uri()
    run_uri = f"{s3_bucket}/ns/aitp"
    gaps = [
        {"id": f"doc-{i}", "text": f"The quiet river {i} is busy in spring.", "domain": "wiki"}
        for i in range(4)
    ]
    storage.write_jsonl(f"{run_uri}/round-0/coverage/gaps.jsonl", gaps)
    storage.write_jsonl(
        f"{run_uri}/round-0/assess/kept.jsonl",
        [{"instruction": "Describe the old bridge at night.", "input": "", "output": "It is old."}],
    )
    raw = base_spec(
        "aitp",
        s3_bucket,
        "builtin://tiny-llama",
        seeds_uri,
        synthesize={
            "maxPrompts": 4,
            "instructionSampling": {"maxTokens": 128},
            "responseSampling": {"maxTokens": 64},
        },
    )
    spec = write_spec(tmp_path / "spec.json", raw)
    code, summary, stderr = run_stage(
        "synthesize", spec, 1, run_uri, model, tmp_path
    )  # M_1 != base: chat
    assert code == 0, stderr[-3000:]
    assert summary["gapDocs"] == 3  # coverage.gapDocsPerRound caps the documents
    assert summary["prompts"] <= 4 and summary["rewritten"] >= 1
    rows = [row for _, row in storage.iter_jsonl(f"{run_uri}/round-1/synthesize/candidates.jsonl")]
    rewritten = [r for r in rows if r["origin"] == "aitp"]
    assert len(rewritten) == summary["rewritten"]
    assert {r["source_doc_id"] for r in rewritten} <= {"doc-0", "doc-1", "doc-2"}
    assert all(
        r["round"] == 1 and r["model"] == model and r["instruction"] and r["output"]
        for r in rewritten
    )
    manifest = storage.read_json(f"{run_uri}/round-1/synthesize/manifest.json")
    assert manifest["summary"] == summary and "rewriteDrops" in manifest["metrics"]


@pytest.mark.slow
def test_self_instruct_candidates_are_instances_of_the_new_tasks(s3_bucket, tmp_path):
    lines = SEED_TASKS.read_text().splitlines()
    chosen = [json.loads(line) for line in lines[:6] + lines[148:154]]  # 6 open, 6 classification
    seeds_uri = f"{s3_bucket}/input/seeds.jsonl"
    storage.write_jsonl(seeds_uri, chosen)
    raw = base_spec(
        "self-instruct",
        s3_bucket,
        "builtin://tiny-llama",
        seeds_uri,
        synthesize={
            "instructionsPerRound": 6,
            # the preset's greedy decoding, shorter and without its presence penalty: the toy is a
            # bigram chain, and a penalty on the "Example" and "Output:" it already wrote breaks it
            "responseSampling": {"temperature": 0.0, "topP": 1.0, "maxTokens": 48,
                                 "presencePenalty": 0.0},
        },
    )
    spec = write_spec(tmp_path / "spec.json", raw)
    run_uri = f"{s3_bucket}/ns/si"
    code, summary, stderr = run_stage(
        "synthesize", spec, 0, run_uri, "builtin://tiny-llama", tmp_path
    )
    assert code == 0, stderr[-3000:]
    rows = [row for _, row in storage.iter_jsonl(f"{run_uri}/round-0/synthesize/candidates.jsonl")]
    assert rows and summary["instances"] == summary["generated"] == len(rows)
    seed_ids = {seed["id"] for seed in chosen}
    seed_instructions = {seed["instruction"] for seed in chosen}
    tasks = {row["instruction"] for row in rows}
    assert len(tasks) <= summary["instructions"] and not tasks & seed_instructions
    assert len(rows) <= MAX_INSTANCES * len(tasks)
    for row in rows:
        assert row["origin"] == "self-instruct" and set(row["seed_ids"]) <= seed_ids
        assert row["output"].strip() and row["input"] != row["output"]
        assert not any(marker in row["input"] + row["output"]
                       for marker in ("Example", "Output:", "Input:", "Task:"))  # parsed out
    manifest = storage.read_json(f"{run_uri}/round-0/synthesize/manifest.json")
    metrics = manifest["metrics"]
    assert 0 <= summary["classification"] == metrics["classification"] <= summary["instructions"]
    assert set(metrics["instanceDrops"]) <= {
        "cut-instance", "unparsed-instance", "input-equals-output", "empty-output",
        "ends-with-colon", "conflicting-outputs", "duplicate-instance", "over-limit",
        "prompt-too-long",
    }
    assert metrics["tasksWithoutInstances"] == summary["instructions"] - len(tasks)
    assert "emptyResponses" not in metrics  # instances replace I-SHEEP's responses


def test_the_machine_pool_holds_each_task_once_however_many_instances_were_kept():
    kept = [
        {"instruction": "Square the number.", "input": "2", "output": "4"},
        {"instruction": "Square the number.", "input": "3", "output": "9"},
        {"instruction": "Name a river.", "output": "Nile"},
    ]
    assert machine_pool(kept) == [Task("Square the number.", "2"), Task("Name a river.")]
