"""The CRD: a valid structural apiextensions/v1 object that agrees with the typed spec.

The agreement test of issue 2: every valid example passes both the CRD (schema and CEL) and
`parse_spec`; every invalid spec fails `parse_spec` naming its field, and the CRD rejects exactly
those marked `schema_rejects`. Then the transition rules, the status schema against what the
planner writes, and `validate_manifest`/`validate_files` as a user runs them.
"""
from __future__ import annotations

import copy
import glob
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from selfalign.operator import validate as v
from selfalign.operator.cli.local import with_local_storage
from selfalign.operator.planner import JobObservation, plan
from selfalign.operator.spec import PRESETS, STAGES, RunSpec, SpecError, dump_spec, parse_spec
from tests.invalid_specs import INVALID, VALID, valid_base, variant

REPO = Path(__file__).resolve().parents[1]
CRD = v.load_crd()
ROOT = v.root_schema()
SPEC = ROOT["properties"]["spec"]
STATUS = ROOT["properties"]["status"]


def manifest(spec: dict[str, Any], name: str = "run-a") -> dict[str, Any]:
    return {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun",
            "metadata": {"name": name, "namespace": "team-a"}, "spec": spec}


def crd_rejections(spec: dict[str, Any]) -> list[str]:
    """What the API server alone refuses: schema plus CEL, after pruning and defaulting."""
    stored = v.admitted(manifest(spec), ROOT)
    schema_errors = v._schema_errors(stored) + v.list_map_errors(stored, ROOT, [])
    return schema_errors + v._cel_errors(stored, ROOT, [], report_failures=not schema_errors)


def names(errors: list[str], field: str) -> bool:
    """Some error is about `field` or a field inside it."""
    paths = [error.split(": ", 1)[0] for error in errors]
    return any(p == field or p.startswith((f"{field}.", f"{field}[")) for p in paths)


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from nodes(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}.*")


def example_runs() -> list[tuple[str, dict[str, Any]]]:
    runs = []
    for path in sorted(glob.glob(str(REPO / "examples" / "*.yaml"))):
        for index, doc in enumerate(yaml.load_all(Path(path).read_text(), Loader=v.ManifestLoader)):
            if isinstance(doc, dict) and doc.get("kind") == "SelfAlignRun":
                # tiny.yaml is a local run: its storage is where `selfalign run` puts it
                runs.append((f"{Path(path).name}#{index}", with_local_storage(doc)))
    return runs


# --- the CRD object ---------------------------------------------------------------------------

def test_crd_names_scope_and_version():
    spec = CRD["spec"]
    assert (CRD["apiVersion"], CRD["kind"]) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    assert CRD["metadata"]["name"] == "selfalignruns.selfalign.dev"
    assert (spec["group"], spec["scope"]) == ("selfalign.dev", "Namespaced")
    assert spec["names"] == {"kind": "SelfAlignRun", "listKind": "SelfAlignRunList", "plural": "selfalignruns",
                          "singular": "selfalignrun", "shortNames": ["sar"], "categories": ["selfalign"]}
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns():
    columns = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [(c["name"], c["type"], c["jsonPath"]) for c in columns if not c.get("priority")]
    assert default == [("Phase", "string", ".status.phase"), ("Round", "string", ".status.roundOf"),
                       ("Stage", "string", ".status.stage"), ("Waiting", "string", ".status.waiting"),
                       ("Kept", "integer", ".status.kept"),
                       ("Coverage", "number", ".status.coverage"), ("Age", "date", ".metadata.creationTimestamp")]


@pytest.mark.parametrize("kubernetes", ["1.31", "1.37"])  # the chart's kubeVersion, the newest
def test_crd_is_a_valid_apiextensions_v1_object(kubernetes):
    assert kubernetes_validate.validate(CRD, kubernetes, strict=True)


def test_the_crd_check_catches_a_malformed_rule():
    broken = copy.deepcopy(CRD)
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rounds"][
        "x-kubernetes-validations"][0]["rul"] = "self > 0"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37", strict=True)


# Kept as written: stage metrics, and the deep Kubernetes types of a pod template (the API server
# checks them when it admits the Job).
PRESERVED = (".metrics", ".nodeAffinity", ".podAffinity", ".podAntiAffinity", ".labelSelector", ".volumes[]")


def test_schema_is_structural():
    for path, node in nodes(ROOT):
        # Kubernetes lets an int-or-string node (spec.train.zeroStage: 0-3 or "auto") omit its type.
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: every node needs a type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path.endswith(PRESERVED) and node["type"] == "object", path
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path
    jsonschema.Draft202012Validator.check_schema(v.to_json_schema(ROOT))


def test_every_field_is_described_and_bounded():
    for path, node in nodes(ROOT):
        if path.startswith((".spec", ".status")):
            assert node.get("description"), f"{path}: no description"
        if path.startswith(".spec") and node.get("type") == "string":
            assert "enum" in node or "maxLength" in node, f"{path}: unbounded string"
        if path.startswith(".spec") and node.get("type") in ("integer", "number"):
            assert "enum" in node or "minimum" in node, f"{path}: unbounded number"


def test_every_cel_rule_compiles():
    rules = [rule["rule"] for _, node in nodes(ROOT) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) > 20
    env = celpy.Environment()
    for rule in rules:
        env.compile(rule)


# --- the CRD and spec.py describe the same fields ---------------------------------------------

def _pydantic_fields(schema: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, dict[str, Any]]:
    """Path -> JSON Schema constraints of the typed spec, optional values unwrapped."""
    if "$ref" in schema:
        outer = {k: x for k, x in schema.items() if k != "$ref"}
        return _pydantic_fields({**defs[schema["$ref"].split("/")[-1]], **outer}, defs, path)
    if "anyOf" in schema:
        [inner] = [option for option in schema["anyOf"] if option.get("type") != "null"]
        outer = {k: x for k, x in schema.items() if k != "anyOf"}
        return _pydantic_fields({**outer, **inner}, defs, path)
    fields = {path: schema}
    for key, child in schema.get("properties", {}).items():
        fields |= _pydantic_fields(child, defs, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        fields |= _pydantic_fields(schema["items"], defs, f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        fields |= _pydantic_fields(schema["additionalProperties"], defs, f"{path}.*")
    return fields


TYPED = _pydantic_fields(RunSpec.model_json_schema(by_alias=True), RunSpec.model_json_schema()["$defs"])
CRD_FIELDS = {path: v.to_json_schema(node) for path, node in nodes(SPEC)}
CONSTRAINTS = ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
               "pattern", "minItems", "maxItems", "maxProperties")


def test_crd_and_typed_spec_have_the_same_fields():
    assert sorted(CRD_FIELDS) == sorted(TYPED)


@pytest.mark.parametrize("path", sorted(TYPED))
def test_crd_and_typed_spec_have_the_same_constraints(path):
    typed = {k: TYPED[path][k] for k in CONSTRAINTS if k in TYPED[path]}
    if "const" in TYPED[path]:
        typed["enum"] = [TYPED[path]["const"]]
    crd = {k: CRD_FIELDS[path][k] for k in CONSTRAINTS if k in CRD_FIELDS[path]}
    assert crd == typed


def _in_a_preset(path: str) -> bool:
    keys = path.strip(".").split(".")
    return any(_dig(preset, keys) is not None for preset in PRESETS.values())


def _dig(node: Any, keys: list[str]) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


@pytest.mark.parametrize("path", sorted(p for p in TYPED if "default" in TYPED[p]))
def test_crd_defaults_are_the_typed_defaults_of_recipe_independent_fields(path):
    typed, crd = TYPED[path]["default"], CRD_FIELDS[path].get("default")
    if _in_a_preset(path):
        assert crd is None, f"{path}: a CRD default would override the recipe preset"
    elif isinstance(typed, dict) and "properties" in CRD_FIELDS[path]:
        assert crd == {}, f"{path}: a section defaults to {{}} so that its fields get their defaults"
    elif typed in (None, [], {}):
        assert crd is None
    else:
        assert crd == typed


def test_crd_defaults_are_valid_values():
    for path, node in nodes(SPEC):
        if "default" in node:
            jsonschema.validate(node["default"], v.to_json_schema(node))


def test_recipe_dependent_fields_are_not_required_by_the_crd():
    assert SPEC["required"] == ["recipe", "rounds", "model", "seeds", "storage", "coverage"]
    assert "required" not in SPEC["properties"]["synthesize"] and "required" not in SPEC["properties"]["train"]


# --- agreement on examples ----------------------------------------------------------------------

def test_the_table_is_big_enough_and_has_both_kinds():
    assert len(INVALID) >= 30 and len({case.id for case in INVALID}) == len(INVALID)
    assert sum(not case.schema_rejects for case in INVALID) >= 4
    assert {"isheep", "self-instruct", "aitp"} <= {spec["recipe"] for spec in VALID.values()}


@pytest.mark.parametrize("where, doc", example_runs(), ids=[w for w, _ in example_runs()])
def test_examples_are_accepted_by_the_crd_and_the_typed_spec(where, doc):
    assert crd_rejections(doc["spec"]) == []
    assert v.validate_manifest(doc) == []
    assert parse_spec(doc["spec"]).rounds >= 1


def test_the_cluster_examples_exist_one_per_recipe():
    recipes = {doc["spec"]["recipe"] for where, doc in example_runs() if where.startswith("run-")}
    assert recipes == {"isheep", "self-instruct", "aitp"}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_specs_are_accepted_by_both(name):
    assert crd_rejections(VALID[name]) == []
    assert v.validate_manifest(manifest(VALID[name])) == []
    parse_spec(VALID[name])


@pytest.mark.parametrize("name", sorted(VALID))
def test_the_resolved_spec_the_stages_get_is_valid_against_the_crd(name):
    assert crd_rejections(dump_spec(parse_spec(VALID[name]))) == []


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_invalid_specs_typed_spec_rejects_naming_the_field(case):
    with pytest.raises(SpecError) as caught:
        parse_spec(case.spec)
    assert names(caught.value.errors, case.field), caught.value.errors


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_invalid_specs_crd_rejects_exactly_those_marked(case):
    rejections = crd_rejections(case.spec)
    assert bool(rejections) == case.schema_rejects, rejections
    if case.schema_rejects:
        assert names(rejections, case.field), rejections


@pytest.mark.parametrize("case", INVALID, ids=[case.id for case in INVALID])
def test_validate_manifest_reports_every_invalid_spec_at_its_field(case):
    errors = v.validate_manifest(manifest(case.spec))
    assert names(errors, case.field), errors
    if case.schema_rejects:  # the typed spec does not repeat what the CRD already said about a field
        rejections = crd_rejections(case.spec)
        assert [e for e in errors if e.startswith(case.field)] == [e for e in rejections if e.startswith(case.field)]


# --- transition rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"rounds": 5},
    {"rounds": 2},
    {"suspend": True},
    {"train": {"loraRank": 32}, "coverage": {"gapDocsPerRound": 10}},
    {"resources": {"train": {"gpus": 4}}, "storage": {"secretRef": {"name": "other"}}},
])
def test_allowed_changes(changes):
    assert v.check_transition(valid_base(), variant(changes)) == []


@pytest.mark.parametrize("changes, field", [
    ({"rounds": 1}, "spec.rounds"),
    ({"recipe": "aitp"}, "spec.recipe"),
    ({"model": {"base": "s3://models/other"}}, "spec.model.base"),
    ({"seeds": "s3://data/other-seeds.jsonl"}, "spec.seeds"),
    ({"storage": {"uri": "s3://elsewhere"}}, "spec.storage.uri"),
])
def test_changes_that_would_orphan_finished_work_are_refused(changes, field):
    errors = v.check_transition(valid_base(), variant(changes))
    assert [e.split(": ", 1)[0] for e in errors] == [field]


def test_a_changed_model_dtype_is_allowed_but_not_a_changed_base():
    old = variant({"model": {"dtype": "float32"}})
    assert v.check_transition(old, variant({"model": {"dtype": "bfloat16"}})) == []
    assert v.check_transition(old, variant({"model": {"base": "file:///other", "dtype": "float32"}}))


# --- the status schema holds what the planner writes -----------------------------------------------

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
STATUS_VALIDATOR = jsonschema.Draft202012Validator(v.to_json_schema(STATUS))


def _statuses(spec, outcomes: dict[tuple[int, str], str], merge: dict | None = None) -> list[dict[str, Any]]:
    """Every status the planner writes for a run whose Jobs end as `outcomes` says (default success)."""
    results = {"assess": {"kept": 812, "scored": 1000}, "coverage": {"coverage": 0.734, "gapDocs": 10},
               "train": {"loss": 1.25, "curve": [2.0, 1.5, 1.25]}, "merge": merge or {"ok": True}}
    status, observed, history = None, {}, []
    for step in range(200):
        now = T0 + timedelta(seconds=step)
        result = plan(spec, status, observed, now, namespace="team-a", name="run-a", generation=1)
        history.append(result.status)
        status = result.status
        if not result.jobs:
            return history
        for job in result.jobs:
            seen = observed.get(job.name)
            if seen is None:
                observed[job.name] = JobObservation(job.name, job.round, job.stage, "Active",
                                                    start_time=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif seen.phase == "Active":
                failed = outcomes.get((job.round, job.stage)) == "Failed"
                observed[job.name] = JobObservation(
                    job.name, job.round, job.stage, "Failed" if failed else "Succeeded", failures=3 if failed else 0,
                    result=results.get(job.stage, {"ok": True}), message="CUDA out of memory" if failed else None,
                    start_time=seen.start_time, completion_time=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    raise AssertionError("the run did not settle")


@pytest.mark.parametrize("scenario", ["success", "stage-failure", "suspended", "invalid-spec", "converged"])
def test_every_status_the_planner_writes_fits_the_status_schema_and_its_rules(scenario):
    spec = parse_spec(valid_base())
    if scenario == "success":
        history = _statuses(spec, {})
        assert history[-1]["phase"] == "Succeeded" and history[-1]["kept"] == 812 and history[-1]["coverage"] == 73.4
    elif scenario == "stage-failure":
        history = _statuses(spec, {(1, "train"): "Failed"})
        assert history[-1]["phase"] == "Failed"
    elif scenario == "converged":
        spec = parse_spec(variant({"evaluate": {"data": "s3://d/heldout.jsonl", "stopWhenWorse": True}}))
        history = _statuses(spec, {}, merge={"evalLossBefore": 2.0, "evalLossAfter": 2.5, "evalItems": 25})
        assert history[-1]["phase"] == "Succeeded" and history[-1]["round"] == 0
    elif scenario == "suspended":
        history = _statuses(parse_spec(variant({"suspend": True})), {})
        assert history[-1]["phase"] == "Suspended"
    else:
        history = [plan(SpecError(["spec.rounds: bad"]), None, {}, T0, namespace="n", name="r", generation=2).status]
        assert history[-1]["phase"] == "Failed"
    for status in history:
        assert v.prune_nulls(copy.deepcopy(status), STATUS) == status, "a null would be dropped"
        assert list(STATUS_VALIDATOR.iter_errors(status)) == []
    for old, new in zip(history, history[1:]):
        assert v.check_status_transition(old, new) == []


def test_a_succeeded_stage_record_is_final():
    history = _statuses(parse_spec(valid_base()), {})
    final = history[-1]
    rewritten = copy.deepcopy(final)
    rewritten["rounds"][0]["stages"]["train"]["phase"] = "Running"
    errors = v.check_status_transition(final, rewritten)
    assert errors == ["status.rounds[0].stages.train: a Succeeded stage record is final: "
                      "status is the memory of finished work"]
    rejob = copy.deepcopy(final)
    rejob["rounds"][1]["stages"]["merge"]["job"] = "run-a-r1-merge-2"
    assert v.check_status_transition(final, rejob)


# --- validate_manifest and validate_files ----------------------------------------------------------

@pytest.mark.parametrize("doc, expected", [
    ({**manifest(valid_base()), "apiVersion": "selfalign.dev/v1"},
     ["apiVersion: expected selfalign.dev/v1alpha1, got 'selfalign.dev/v1'"]),
    ({**manifest(valid_base()), "kind": "Job"}, ["kind: expected SelfAlignRun, got 'Job'"]),
    ({**manifest(valid_base()), "metadata": {"name": "Run_A"}},
     ["metadata.name: 'Run_A' is not a DNS-1123 subdomain "
      "(lower-case letters, digits, '-' and '.', at most 253 characters)"]),
    ({**manifest(valid_base()), "metadata": {}}, ["metadata.name: required"]),
    ({**manifest(valid_base()), "metadata": {"name": "a", "namespace": "Team"}},
     ["metadata.namespace: 'Team' is not a DNS-1123 label"]),
    ({k: x for k, x in manifest(valid_base()).items() if k != "spec"}, ["spec: required"]),
    ({**manifest(valid_base()), "specs": {}}, ["specs: unknown field"]),
    (["not", "a", "mapping"], ["(document): expected a mapping, got list"]),
])
def test_validate_manifest_checks_the_envelope(doc, expected):
    assert v.validate_manifest(doc) == expected


def test_generate_name_stands_in_for_a_name():
    doc = manifest(valid_base())
    doc["metadata"] = {"generateName": "run-"}
    assert v.validate_manifest(doc) == []


def test_nulls_read_as_unset_as_on_the_api_server():
    assert v.validate_manifest(manifest(variant({"suspend": None, "engine": {"tensorParallelSize": None}}))) == []


def test_the_crd_defaults_are_applied_before_the_rules():
    stored = v.admitted(manifest(variant({"train": {"loraRank": 8}})), ROOT)["spec"]
    assert stored["resources"]["train"] == {"gpus": 0, "shmSize": "1Gi", "scratchSize": "50Gi"}
    assert stored["engine"]["maxModelLen"] == 4096 and stored["merge"] == {"tolerance": 0.01}
    assert stored["train"] == {"loraRank": 8, "nodes": 1, "checkpointSteps": 50, "seed": 0,
                               "gradientCheckpointing": True, "attentionImplementation": "sdpa"}


def test_to_json_schema_translates_nullable_and_boolean_exclusive_bounds():
    node = {"type": "object", "properties": {"x": {"type": "number", "nullable": True, "minimum": 0,
                                                   "exclusiveMinimum": True, "x-kubernetes-validations": []}}}
    assert v.to_json_schema(node) == {"type": "object", "additionalProperties": False,
                                      "properties": {"x": {"type": ["number", "null"], "exclusiveMinimum": 0}}}


RUN_FILE = """\
# two runs in one file
apiVersion: selfalign.dev/v1alpha1
kind: SelfAlignRun
metadata:
  name: good
spec:
  recipe: isheep
  rounds: 2
  model: {base: "s3://models/base"}
  seeds: s3://data/seeds.jsonl
  storage: {uri: "s3://runs"}
  coverage: {reference: "s3://data/ref.jsonl"}
  train:
    learningRate: 2e-5
---
apiVersion: selfalign.dev/v1alpha1
kind: SelfAlignRun
metadata:
  name: bad
spec:
  recipe: isheep
  rounds: 2
  model: {base: "s3://models/base"}
  seeds: s3://data/seeds.jsonl
  storage: {uri: "s3://runs"}
  coverage: {reference: "s3://data/ref.jsonl"}
  train:
    loraRank: 0
  resources:
    train:
      nodeSelector:
        nvidia.com/gpu.product: "H100 SXM"
"""


def test_validate_files_reports_each_document_with_field_and_line(tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text(RUN_FILE)
    results = v.validate_files([str(path)])
    assert results == {
        f"{path}#0": [],
        f"{path}#1": [
            "spec.resources.train.nodeSelector.nvidia.com/gpu.product: 'H100 SXM' does not match "
            "'^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$' (line 32)",
            "spec.train.loraRank: 0 is less than the minimum of 1 (line 28)",
        ],
    }


def test_a_number_in_exponent_form_is_a_number_as_kubectl_reads_it():
    assert yaml.load("lr: 2e-5", Loader=v.ManifestLoader) == {"lr": 2e-5}
    assert yaml.load("n: 10\nname: e5", Loader=v.ManifestLoader) == {"n": 10, "name": "e5"}


def test_validate_files_reports_yaml_errors_unreadable_and_empty_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: selfalign.dev/v1alpha1\n---\nspec: [unclosed\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    missing = tmp_path / "missing.yaml"
    results = v.validate_files([str(broken), str(empty), str(missing)])
    assert results[f"{broken}#0"] == ["kind: expected SelfAlignRun, got None (line 1)"]
    [yaml_error] = results[f"{broken}#1"]
    assert yaml_error.startswith("(yaml): ") and yaml_error.endswith("(line 4)")
    assert results[f"{empty}#0"] == ["(file): no SelfAlignRun in this file"]
    assert results[f"{missing}#0"] == ["(file): cannot read: No such file or directory"]
