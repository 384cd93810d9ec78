"""Pod template overrides in the typed spec and the CRD (issue 14 item 1): every name of the stage
contract is refused by both, each at its field; what the API server cannot check, the typed spec does."""
from __future__ import annotations

import pytest

from selfalign.operator import spec as typed
from selfalign.operator import validate as v
from selfalign.operator.spec import SpecError, parse_spec
from tests.invalid_specs import variant

ROOT = v.root_schema()


def crd_rejections(spec: dict) -> list[str]:
    doc = {"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "metadata": {"name": "r"}, "spec": spec}
    stored = v.admitted(doc, ROOT)
    schema_errors = v._schema_errors(stored) + v.list_map_errors(stored, ROOT, [])
    return schema_errors + v._cel_errors(stored, ROOT, [], report_failures=not schema_errors)


def typed_errors(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    return caught.value.errors


def container(**fields) -> dict:
    return {"podTemplate": {"spec": {"containers": [{"name": "stage", **fields}]}}}


def at(errors: list[str], field: str) -> bool:
    return any(error.startswith(f"{field}: ") for error in errors)


@pytest.mark.parametrize("name", sorted(typed.RESERVED_ENV) + ["SELFALIGN_RESULT_PATH"])
def test_every_env_name_of_the_stage_contract_is_refused_by_both(name):
    spec = variant(container(env=[{"name": name, "value": "x"}]))
    field = "spec.podTemplate.spec.containers[0].env[0].name"
    assert at(crd_rejections(spec), field) and at(typed_errors(spec), field)


@pytest.mark.parametrize("name", sorted(typed.RESERVED_VOLUMES) + ["pvc-3"])
def test_every_volume_of_the_stage_contract_is_refused_by_both(name):
    spec = variant({"resources": {"coverage": {"podTemplate": {"spec": {"volumes": [
        {"name": name, "emptyDir": {}}]}}}}})
    field = "spec.resources.coverage.podTemplate.spec.volumes[0].name"
    assert at(crd_rejections(spec), field) and at(typed_errors(spec), field)


@pytest.mark.parametrize("path", [*typed.RESERVED_MOUNTS, "/scratch/hf", "/mnt/pvc/models/x"])
def test_every_mount_of_the_stage_contract_is_refused_by_both(path):
    spec = variant(container(volumeMounts=[{"name": "extra", "mountPath": path}]))
    field = "spec.podTemplate.spec.containers[0].volumeMounts[0].mountPath"
    assert at(crd_rejections(spec), field) and at(typed_errors(spec), field)


@pytest.mark.parametrize("path", ["/models", "/scratchpad", "/etc/ssl/certs", "/mnt/data"])
def test_other_mounts_are_accepted(path):
    spec = variant({"podTemplate": {"spec": {
        "volumes": [{"name": "extra", "persistentVolumeClaim": {"claimName": "c"}}],
        "containers": [{"name": "stage", "volumeMounts": [{"name": "extra", "mountPath": path}]}]}}})
    assert crd_rejections(spec) == []
    assert parse_spec(spec).pod_template.spec.containers[0].volume_mounts[0].mount_path == path


@pytest.mark.parametrize(("template", "field", "message"), [
    ({"metadata": {"labels": {"bad key": "x"}}}, "spec.podTemplate.metadata.labels", "not a label key"),
    ({"spec": {"volumes": [{"name": "v"}]}}, "spec.podTemplate.spec.volumes[0]", "got none"),
    ({"spec": {"volumes": [{"name": "v", "gitRepo": {"repository": "x"}}]}}, "spec.podTemplate.spec.volumes[0]",
     "got gitRepo"),
])
def test_what_only_the_typed_spec_can_see(template, field, message):
    errors = typed_errors(variant({"podTemplate": template}))
    assert any(e.startswith(f"{field}: ") and message in e for e in errors), errors


def test_the_spec_the_stages_read_keeps_the_template():
    """The ConfigMap's spec.json (dump_spec) parses back to the same spec in every stage pod."""
    from selfalign.operator.spec import dump_spec
    from tests.invalid_specs import VALID

    spec = parse_spec(VALID["pod-templates"])
    assert parse_spec(dump_spec(spec)) == spec
    assert dump_spec(spec)["podTemplate"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
