"""records.py: seed formats, candidate rows, and errors that name file:line and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfalign.stages.runtime import storage
from selfalign.stages.runtime.context import StageError
from selfalign.stages.text.records import (
    Candidate,
    RecordError,
    Seed,
    load_seeds,
    read_candidates,
    read_instruction_file,
    to_alpaca,
)

SEED_TASKS = Path(__file__).resolve().parents[1] / "stages" / "data" / "seed_tasks.jsonl"


def jsonl(tmp_path, *lines: str) -> str:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path.as_uri()


def test_self_instruct_seed_file():
    seeds = load_seeds(SEED_TASKS.as_uri())
    assert len(seeds) == 175
    assert sum(s.input == "" for s in seeds) == 50
    assert sum(s.is_classification for s in seeds) == 26
    assert len({s.id for s in seeds}) == 175
    assert seeds[0].id == "seed_task_0"
    assert seeds[0].instruction.startswith("Is there anything I can eat for a breakfast")
    assert seeds[0].output.startswith("Yes, you can have 1 oatmeal banana protein shake")


def test_each_seed_format(tmp_path):
    uri = jsonl(
        tmp_path,
        json.dumps({"name": "sort", "instruction": " Sort the list. ", "is_classification": True,
                    "instances": [{"input": "3, 1", "output": "1, 3"}, {"input": "x", "output": "y"}]}),
        json.dumps({"instruction": "Name a colour.", "output": "Blue."}),
        json.dumps({"id": 7, "instruction": "Add them.", "input": "2 and 2", "output": "4"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Say hi."},
                                 {"role": "assistant", "content": "Hi."},
                                 {"role": "user", "content": "Again."},
                                 {"role": "assistant", "content": "Hi again."}]}),
    )
    assert load_seeds(uri) == [
        Seed("sort", "Sort the list.", "3, 1", "1, 3", True),
        Seed("seed-2", "Name a colour.", "", "Blue.", False),
        Seed("7", "Add them.", "2 and 2", "4", False),
        Seed("seed-4", "Say hi.", "", "Hi.", False),
    ]


@pytest.mark.parametrize("line, field, why", [
    ('{"instruction": "x", "output": ', "", "invalid JSON"),
    ('{"input": "x", "output": "y"}', "instruction", "missing"),
    ('{"instruction": "   ", "output": "y"}', "instruction", "empty"),
    ('{"instruction": 5, "output": "y"}', "instruction", "expected string, got integer"),
    ('{"instruction": "x", "instances": []}', "instances", "empty"),
    ('{"instruction": "x", "instances": "a"}', "instances", "expected array, got string"),
    ('{"instruction": "x", "instances": [{"input": "a", "output": 3}]}', "output", "expected string, got integer"),
    ('{"instruction": "x", "instances": [{"input": "a"}]}', "output", "missing"),
    ('{"instruction": "x", "output": "y", "is_classification": "yes"}', "is_classification", "expected boolean"),
    ('{"instruction": "x"}', "output", "missing"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "messages", "no user turn"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "messages", "no assistant reply"),
    ('{"messages": [{"role": "user", "content": ["q"]}]}', "content", "expected string, got array"),
    ('{"id": "a", "instruction": "x", "output": "y"}', "id", "repeats line 1"),
])
def test_bad_seed_line_names_file_line_and_field(tmp_path, line, field, why):
    uri = jsonl(tmp_path, '{"id": "a", "instruction": "Good one.", "output": "ok"}', line)
    with pytest.raises(RecordError) as caught:
        load_seeds(uri)
    message = str(caught.value)
    assert message.startswith(f"{uri}:2: ")
    assert why in message
    if field:
        assert f"field '{field}'" in message


def test_empty_seed_file_is_an_error(tmp_path):
    uri = jsonl(tmp_path, "")
    with pytest.raises(RecordError, match="no seed tasks: the file is empty"):
        load_seeds(uri)
    assert issubclass(RecordError, StageError)  # __main__ exits 2 (bad input) on it


def candidate(**overrides) -> Candidate:
    fields = dict(id="r0-000001", instruction="Name a fruit.", input="", output="Apple.", origin="isheep",
                  round=0, model="s3://b/base", seed_ids=("seed_task_1", "seed_task_9"),
                  source_doc_id=None, sampling={"temperature": 1.0})
    return Candidate(**{**fields, **overrides})


def test_candidates_round_trip_through_jsonl(tmp_path):
    uri = (tmp_path / "candidates.jsonl").as_uri()
    rows = [candidate(), candidate(id="r0-000002", origin="aitp", source_doc_id="doc-3", seed_ids=())]
    storage.write_jsonl(uri, (c.to_json() for c in rows))
    assert storage.read_text(uri).splitlines()[0].count('"seed_ids": ["seed_task_1", "seed_task_9"]') == 1
    assert read_candidates(uri) == rows


@pytest.mark.parametrize("change, field, why", [
    ({"origin": "magic"}, "origin", "not one of self-instruct, isheep, aitp"),
    ({"round": "0"}, "round", "expected integer, got string"),
    ({"round": True}, "round", "expected integer, got boolean"),
    ({"seed_ids": [1]}, "seed_ids", "list of strings"),
    ({"output": None}, "output", "expected string, got null"),
    ({"sampling": []}, "sampling", "expected object"),
])
def test_bad_candidate_row(change, field, why):
    row = {**candidate().to_json(), **change}
    with pytest.raises(RecordError, match=f"^c.jsonl:4: field '{field}': .*{why}"):
        Candidate.from_json(row, "c.jsonl:4")


def test_alpaca_row():
    assert to_alpaca("Add.", "1 2", "3") == {"instruction": "Add.", "input": "1 2", "output": "3"}


def test_instruction_file(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text('{"instruction": "A b c d.", "extra": 1}\n{"instruction": "E.", "input": "i", "output": "o"}\n')
    assert read_instruction_file(path.as_uri()) == [
        {"instruction": "A b c d.", "extra": 1}, {"instruction": "E.", "input": "i", "output": "o"}]
    path.write_text('{"instruction": "A."}\n{"prompt": "B."}\n')
    with pytest.raises(RecordError, match=f"^{path.as_uri()}:2: field 'instruction': missing"):
        read_instruction_file(path.as_uri())
