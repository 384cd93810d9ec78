"""The typed spec: recipe presets hold METHODS.md's defaults, overrides win, errors name fields."""
from __future__ import annotations

import pytest

from selfalign.operator.spec import PRESETS, SpecError, dump_spec, parse_spec
from tests.invalid_specs import VALID, valid_base, variant


def _get(spec_dict: dict, path: str):
    node = spec_dict
    for key in path.split("."):
        node = node[key]
    return node


def _errors(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return caught.value.errors


QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("recipe, path, expected", [
    # Self-Instruct: 6 seed + 2 machine examples, temperature 0.7, top_p 0.5, presence penalty 2, 52K.
    ("self-instruct", "synthesize.seedExamples", 6),
    ("self-instruct", "synthesize.machineExamples", 2),
    ("self-instruct", "synthesize.instructionsPerRound", 52_000),
    ("self-instruct", "synthesize.seedSampling", "uniform"),
    ("self-instruct", "synthesize.instructionSampling",
     {"temperature": 0.7, "topP": 0.5, "maxTokens": 1024, "presencePenalty": 2.0}),
    ("self-instruct", "assess.rules", ["self-instruct"]),
    # I-SHEEP: 5 seeds, temperature 1.0, top_p 0.95, 1000 tokens, 10K per round, base judge,
    # keep quality > 8 and following > 8, LoRA r16 on q,k,v,o of the base with this round's data.
    ("isheep", "synthesize.seedExamples", 5),
    ("isheep", "synthesize.machineExamples", 0),
    ("isheep", "synthesize.instructionsPerRound", 10_000),
    ("isheep", "synthesize.seedSampling", "inverse"),
    ("isheep", "synthesize.responseSampling",
     {"temperature": 1.0, "topP": 0.95, "maxTokens": 1000, "presencePenalty": 0.0}),
    ("isheep", "assess.judge", "base"),
    ("isheep", "assess.rules", ["self-instruct", "isheep"]),
    ("isheep", "assess.threshold.quality", 8.0),
    ("isheep", "assess.threshold.following", 8.0),
    ("isheep", "assess.dedup.rougeL", 0.7),
    ("isheep", "train.from", "base"),
    ("isheep", "train.data", "round"),
    ("isheep", "train.loraRank", 16),
    ("isheep", "train.targetModules", QKVO),
    ("isheep", "train.learningRate", 4e-4),
    ("isheep", "train.zeroStage", "auto"),
    ("isheep", "train.maxSeqLength", 1024),
    # AITP: 2 questions per gap document, keep rewrites with quality >= 7, gap documents every round.
    ("aitp", "synthesize.questionsPerGapDoc", 2),
    ("aitp", "assess.threshold.rewriteQuality", 7.0),
    ("aitp", "coverage.gapDocsPerRound", 1000),
    ("aitp", "train.from", "base"),
])
def test_presets_hold_the_methods_defaults(recipe, path, expected):
    resolved = dump_spec(parse_spec(variant({"recipe": recipe})))
    assert _get(resolved, path) == expected


def test_only_aitp_hands_gap_documents_to_the_next_round():
    gaps = {recipe: parse_spec(variant({"recipe": recipe})).coverage.gap_docs_per_round for recipe in PRESETS}
    assert gaps["self-instruct"] == gaps["isheep"] == 0 < gaps["aitp"]


def test_an_override_wins_at_any_depth_and_keeps_its_preset_siblings():
    spec = parse_spec(variant({
        "synthesize": {"instructionSampling": {"temperature": 0.2}},
        "assess": {"threshold": {"quality": 6.0}},
        "train": {"loraRank": 64},
    }))
    assert spec.synthesize.instruction_sampling.temperature == 0.2
    assert spec.synthesize.instruction_sampling.top_p == 0.95  # sibling from the isheep preset
    assert spec.synthesize.response_sampling.temperature == 1.0
    assert (spec.assess.threshold.quality, spec.assess.threshold.following) == (6.0, 8.0)
    assert (spec.train.lora_rank, spec.train.lora_alpha) == (64, 32.0)


def test_a_list_override_replaces_the_preset_list():
    spec = parse_spec(variant({"train": {"targetModules": ["all-linear"]}, "assess": {"rules": []}}))
    assert spec.train.target_modules == ["all-linear"]
    assert spec.assess.rules == []


def test_overrides_never_leak_into_the_preset():
    parse_spec(variant({"synthesize": {"instructionSampling": {"temperature": 0.1}}}))
    assert parse_spec(valid_base()).synthesize.instruction_sampling.temperature == 1.0
    assert PRESETS["isheep"]["synthesize"]["instructionSampling"]["temperature"] == 1.0


@pytest.mark.parametrize("changes, field", [
    ({"train": {"loraRank": 0}}, "spec.train.loraRank"),
    ({"train": {"targetModules": ["q_proj", ""]}}, "spec.train.targetModules[1]"),
    ({"train": {"from": "scratch"}}, "spec.train.from"),
    ({"assess": {"dedup": {"rougeL": 1.5}}}, "spec.assess.dedup.rougeL"),
    ({"resources": {"train": {"tolerations": [{"effect": "Evict"}]}}}, "spec.resources.train.tolerations[0].effect"),
    ({"storage": {"secretRef": {}}}, "spec.storage.secretRef.name"),
])
def test_each_error_names_its_field_path(changes, field):
    assert [e for e in _errors(variant(changes)) if e.startswith(f"{field}: ")]


def test_every_problem_is_reported_at_once():
    errors = _errors(variant({"rounds": 0, "train": {"loraRank": 0}, "coverage": {"k": 0}}))
    assert [e.split(":")[0] for e in errors] == ["spec.rounds", "spec.train.loraRank", "spec.coverage.k"]


def test_combination_errors_are_one_line_each():
    errors = _errors(variant({"engine": {"maxModelLen": 512}, "train": {"nodes": 2}}))
    no_room = "1000 leaves no room for the prompt in spec.engine.maxModelLen 512"
    assert errors == [
        f"spec.synthesize.instructionSampling.maxTokens: {no_room}",
        f"spec.synthesize.responseSampling.maxTokens: {no_room}",
        "spec.train.nodes: more than one node needs resources.train.gpus >= 1",
    ]


def test_an_unknown_recipe_is_not_buried_under_fields_its_preset_would_fill():
    errors = _errors(variant({"recipe": "alpaca", "rounds": 0}))
    assert [e.split(":")[0] for e in errors] == ["spec.recipe", "spec.rounds"]


def test_a_recipe_of_the_wrong_type_is_a_spec_error():
    assert _errors(variant({"recipe": ["isheep"]}))[0].startswith("spec.recipe: ")


@pytest.mark.parametrize("changes, field", [
    ({"rounds": "3"}, "spec.rounds"),
    ({"suspend": "true"}, "spec.suspend"),
    ({"train": {"loraRank": 8.5}}, "spec.train.loraRank"),
    ({"synthesize": {"seed": True}}, "spec.synthesize.seed"),
])
def test_types_are_strict_like_the_crd(changes, field):
    assert _errors(variant(changes))[0].startswith(f"{field}: ")


def test_a_tensor_parallel_size_within_the_stage_gpus_is_accepted_and_cpu_stages_are_not_limited():
    within = variant({"engine": {"tensorParallelSize": 2},
                      "resources": {"synthesize": {"gpus": 2}, "assess": {"gpus": 4}}})
    cpu_only = variant({"engine": {"tensorParallelSize": 2}})
    assert parse_spec(within).engine.tensor_parallel_size == parse_spec(cpu_only).engine.tensor_parallel_size == 2
    over = variant({"engine": {"tensorParallelSize": 4},
                    "resources": {"synthesize": {"gpus": 4}, "assess": {"gpus": 2}}})
    assert _errors(over) == ["spec.engine.tensorParallelSize: 4 is more than the 2 GPU(s) of resources.assess.gpus"]


@pytest.mark.parametrize("name", sorted(VALID))
def test_dump_spec_round_trips_through_parse_spec(name):
    spec = parse_spec(VALID[name])
    dumped = dump_spec(spec)
    assert parse_spec(dumped) == spec
    assert dump_spec(parse_spec(dumped)) == dumped


def test_dump_spec_is_camel_case_resolved_and_has_no_nulls():
    dumped = dump_spec(parse_spec(valid_base()))
    assert dumped["train"]["from"] == "base" and dumped["assess"]["dedup"] == {"rougeL": 0.7}
    assert dumped["resources"]["train"] == {"gpus": 0, "shmSize": "1Gi", "scratchSize": "50Gi",
                                            "nodeSelector": {}, "tolerations": []}
    assert "endpoint" not in dumped["storage"] and "tensorParallelSize" not in dumped["engine"]


def test_evaluation_is_optional_and_does_not_stop_a_run_unless_asked():
    assert parse_spec(valid_base()).evaluate is None and "evaluate" not in dump_spec(parse_spec(valid_base()))
    evaluate = parse_spec(variant({"evaluate": {"data": "builtin://self-instruct-heldout"}})).evaluate
    assert evaluate.data == "builtin://self-instruct-heldout" and evaluate.stop_when_worse is False
