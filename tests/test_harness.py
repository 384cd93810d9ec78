"""The test harness itself behaves like kube-apiserver where the operator depends on it: each
modelled behaviour (tests/fixtures/crd.py, tests/fixtures/kube.py) is checked here on its own."""
from __future__ import annotations

from tests.fixtures.crd import admit, default, prune

SCHEMA = {"type": "object", "properties": {
    "spec": {"type": "object", "default": {}, "properties": {
        "size": {"type": "integer", "default": 1},
        "nested": {"type": "object", "default": {}, "properties": {"x": {"type": "string", "default": "a"}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer", "default": 7}}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {
            "y": {"type": "integer", "default": 3}}}},
    }},
    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
}}


def test_unknown_fields_are_pruned_except_where_preserved_and_metadata_is_kept():
    obj = {"apiVersion": "v", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}, "anything": 1},
           "spec": {"size": 2, "bogus": 1, "free": {"any": {"thing": 1}}, "list": [{"k": 1, "z": 2}],
                    "map": {"m": {"y": 1, "w": 2}}},
           "status": {"phase": "P", "extra": 1}, "top": 1}
    assert prune(obj, SCHEMA, root=True) == {
        "apiVersion": "v", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}, "anything": 1},
        "spec": {"size": 2, "free": {"any": {"thing": 1}}, "list": [{"k": 1}], "map": {"m": {"y": 1}}},
        "status": {"phase": "P"}}


def test_defaults_apply_top_down_through_parent_defaults_lists_and_maps():
    assert default({}, SCHEMA) == {"spec": {"size": 1, "nested": {"x": "a"}}}
    assert default({"spec": {"size": None, "list": [{}], "map": {"m": {}}}}, SCHEMA)["spec"] == \
        {"size": 1, "nested": {"x": "a"}, "list": [{"k": 7}], "map": {"m": {"y": 3}}}
    assert default({"spec": {"size": 5}}, SCHEMA)["spec"]["size"] == 5  # a set value stays


def test_a_selfalignrun_is_stored_with_the_crds_stage_resource_defaults():
    run = admit({"apiVersion": "selfalign.dev/v1alpha1", "kind": "SelfAlignRun", "metadata": {"name": "r"},
                 "spec": {"rounds": 1, "unknown": True}})
    assert "unknown" not in run["spec"]
    assert run["spec"]["resources"]["train"]["gpus"] == 0
