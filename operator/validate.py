"""Offline checks of SelfAlignRun manifests: what the API server and the operator would reject.

The API server takes a SelfAlignRun through these steps, and `validate_manifest` repeats them with
the CRD in `crds/` so that `selfalign validate` in CI catches what `kubectl apply` would refuse:
drop nulls from non-nullable fields, apply the CRD's defaults, check the OpenAPI schema, evaluate
the CEL rules. Then the typed spec (`parse_spec`) adds the checks that need the recipe preset,
which is what the operator would fail the run with. Transition rules (those reading `oldSelf`)
need the previous object: `check_transition` and `check_status_transition` evaluate them.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import re
import sys
from typing import Any, Callable, Iterable, TextIO

import celpy
import jsonschema
import yaml

from .naming import GROUP, KIND, VERSION
from .spec import DNS_SUBDOMAIN, SpecError, parse_spec

API_VERSION = f"{GROUP}/{VERSION}"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STDIN = "(stdin)"  # how results name the file "-"


class ManifestLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: `2e-5` is a number (PyYAML alone reads YAML 1.1's string)."""


ManifestLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


@functools.cache
def load_crd() -> dict[str, Any]:
    """The CRD exactly as the cluster gets it (packaged as `selfalign.crds`)."""
    text = (importlib.resources.files("selfalign.crds") / "selfalignrun.yaml").read_text()
    return yaml.safe_load(text)


def root_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the served version."""
    version = next(v for v in load_crd()["spec"]["versions"] if v["name"] == VERSION)
    return version["schema"]["openAPIV3Schema"]


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Translate a structural OpenAPI v3 schema into JSON Schema 2020-12 for `jsonschema`.

    Differences handled: `nullable`, boolean `exclusiveMinimum/Maximum`, unknown fields are errors
    (the API server prunes them, and kubectl's strict field validation refuses them), a
    `x-kubernetes-list-type: set` holds unique items. Other `x-kubernetes-*` keys, and the CEL
    rules, are not JSON Schema: CEL is evaluated separately.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "exclusiveMinimum", "exclusiveMaximum"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound):
            out[bound] = out.pop(limit)
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_json_schema(root_schema()))


# --- what the API server does before validating ----------------------------------------------

def _children(value: Any, node: dict[str, Any]) -> Iterable[tuple[Any, Any, dict[str, Any]]]:
    """(key or index, child value, child schema) for every child the schema describes."""
    if isinstance(value, dict):
        properties = node.get("properties", {})
        extra = node.get("additionalProperties")
        for key, child in value.items():
            schema = properties.get(key, extra if isinstance(extra, dict) else None)
            if schema is not None:
                yield key, child, schema
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, child in enumerate(value):
            yield index, child, node["items"]


def prune_nulls(value: Any, node: dict[str, Any]) -> Any:
    """Drop null values of non-nullable fields, as the API server does: null reads as unset."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items()
                 if v is not None or node.get("properties", {}).get(k, {}).get("nullable")}
    elif not isinstance(value, list):
        return value
    for key, child, schema in list(_children(value, node)):
        value[key] = prune_nulls(child, schema)
    return value


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Fill the CRD's defaults top-down (a defaulted `{}` gets its own fields' defaults too)."""
    if isinstance(value, dict):
        for key, schema in node.get("properties", {}).items():
            if key not in value and "default" in schema:
                value[key] = copy.deepcopy(schema["default"])
    for key, child, schema in list(_children(value, node)):
        value[key] = apply_defaults(child, schema)
    return value


def admitted(doc: Any, node: dict[str, Any]) -> Any:
    """The object as the API server would store it, before validation."""
    return apply_defaults(prune_nulls(copy.deepcopy(doc), node), node)


# --- schema and CEL ---------------------------------------------------------------------------

def _path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _schema_errors(doc: Any) -> list[str]:
    errors = []
    for error in sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = list(error.absolute_path)
        if error.validator == "required":
            errors += [f"{_path(where + [key])}: required" for key in error.validator_value
                       if key not in error.instance]
        elif error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            errors += [f"{_path(where + [key])}: unknown field" for key in error.instance if key not in known]
        else:
            errors.append(f"{_path(where) or '(document)'}: {error.message}")
    return list(dict.fromkeys(errors))


def list_map_errors(value: Any, node: dict[str, Any], where: list[Any]) -> list[str]:
    """Items of a `x-kubernetes-list-type: map` that repeat their keys, which the API server
    refuses (Duplicate value) and JSON Schema cannot express."""
    errors = []
    if isinstance(value, list) and node.get("x-kubernetes-list-type") == "map":
        keys = node["x-kubernetes-list-map-keys"]
        seen = [tuple(item.get(key) for key in keys) for item in value if isinstance(item, dict)]
        for repeated in sorted({entry for entry in seen if seen.count(entry) > 1}, key=str):
            errors.append(f"{_path(where)}: Duplicate value: "
                          + ", ".join(f"{key}={part}" for key, part in zip(keys, repeated)))
    for key, child, schema in _children(value, node):
        errors += list_map_errors(child, schema, where + [key])
    return errors


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _is_transition(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


def _evaluate(rule: dict[str, str], activation: dict[str, Any], where: list[Any], *,
              report_failures: bool = True) -> str | None:
    """None when the rule holds, else the error line (at the rule's fieldPath when it has one).

    A rule that cannot be evaluated (a field of the wrong type) is reported only when asked: after
    schema errors it would repeat them.
    """
    try:
        result = _program(rule["rule"]).evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
        holds = isinstance(result, celpy.celtypes.BoolType) and bool(result)
        message = rule.get("message", f"failed rule: {rule['rule']}")
    except celpy.CELEvalError as exc:
        holds, message = not report_failures, f"rule {rule['rule']!r} could not be evaluated: {exc.args[0]}"
    if holds:
        return None
    field = [part for part in rule.get("fieldPath", "").split(".") if part]
    return f"{_path(where + field)}: {message}"


def _cel_errors(value: Any, node: dict[str, Any], where: list[Any], report_failures: bool) -> list[str]:
    """Every CEL rule that needs no old object, at every node of `value` that has rules."""
    errors = [error for rule in node.get("x-kubernetes-validations", []) if not _is_transition(rule["rule"])
              if (error := _evaluate(rule, {"self": value}, where, report_failures=report_failures))]
    for key, child, schema in _children(value, node):
        errors += _cel_errors(child, schema, where + [key], report_failures)
    return errors


def _correlated(old: Any, new: Any, node: dict[str, Any]) -> Iterable[tuple[Any, Any, Any, dict[str, Any]]]:
    """(key, old child, new child, schema) for the children the API server correlates."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key, new_child, schema in _children(new, node):
            if key in old:
                yield key, old[key], new_child, schema
    elif isinstance(old, list) and isinstance(new, list) and node.get("x-kubernetes-list-type") == "map":
        keys = node["x-kubernetes-list-map-keys"]
        before = {tuple(item.get(k) for k in keys): item for item in old if isinstance(item, dict)}
        for index, item in enumerate(new):
            match = before.get(tuple(item.get(k) for k in keys)) if isinstance(item, dict) else None
            if match is not None:
                yield index, match, item, node["items"]


def _transition_errors(old: Any, new: Any, node: dict[str, Any], where: list[Any]) -> list[str]:
    errors = [error for rule in node.get("x-kubernetes-validations", []) if _is_transition(rule["rule"])
              if (error := _evaluate(rule, {"self": new, "oldSelf": old}, where))]
    for key, old_child, new_child, schema in _correlated(old, new, node):
        errors += _transition_errors(old_child, new_child, schema, where + [key])
    return errors


# --- the public checks ------------------------------------------------------------------------

def _metadata_errors(metadata: Any) -> list[str]:
    if not isinstance(metadata, dict):
        return ["metadata: required, with a name"]
    errors = []
    name = metadata.get("name")
    if name is None and not metadata.get("generateName"):
        errors.append("metadata.name: required")
    elif name is not None and not (isinstance(name, str) and len(name) <= 253 and re.match(DNS_SUBDOMAIN, name)):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain "
                      "(lower-case letters, digits, '-' and '.', at most 253 characters)")
    namespace = metadata.get("namespace")
    if namespace is not None and not (isinstance(namespace, str) and len(namespace) <= 63
                                      and re.match(DNS_LABEL, namespace)):
        errors.append(f"metadata.namespace: {namespace!r} is not a DNS-1123 label")
    return errors


def _inside(path: str, reported: tuple[str, ...]) -> bool:
    """Whether `path` is one of `reported` or a field within one of them."""
    return any(path == r or path.startswith((f"{r}.", f"{r}[")) for r in reported)


def validate_manifest(doc: dict[str, Any]) -> list[str]:
    """Every reason the API server or the operator would reject this SelfAlignRun, one line each.

    Each line starts with the field path (`spec.train.loraRank: ...`). Empty means valid.
    """
    if not isinstance(doc, dict):
        return [f"(document): expected a mapping, got {type(doc).__name__}"]
    errors = []
    if doc.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: expected {API_VERSION}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        return errors + [f"kind: expected {KIND}, got {doc.get('kind')!r}"]
    errors += _metadata_errors(doc.get("metadata"))
    schema = root_schema()
    stored = admitted(doc, schema)
    schema_errors = _schema_errors(stored) + list_map_errors(stored, schema, [])
    errors += schema_errors + _cel_errors(stored, schema, [], report_failures=not schema_errors)
    if isinstance(stored.get("spec"), dict):
        try:
            parse_spec(stored["spec"])
        except SpecError as exc:
            reported = tuple({error.split(": ", 1)[0] for error in errors})
            errors += [error for error in exc.errors if not _inside(error.split(": ", 1)[0], reported)]
    return errors


def check_transition(old_spec: dict[str, Any], new_spec: dict[str, Any]) -> list[str]:
    """The CRD's rules on changing a spec (immutable fields, rounds only grow); empty if allowed."""
    node = root_schema()["properties"]["spec"]
    return _transition_errors(admitted(old_spec, node), admitted(new_spec, node), node, ["spec"])


def check_status_transition(old_status: dict[str, Any], new_status: dict[str, Any]) -> list[str]:
    """The CRD's rules on changing a status (a Succeeded stage record is final); empty if allowed."""
    node = root_schema()["properties"]["status"]
    return _transition_errors(admitted(old_status, node), admitted(new_status, node), node, ["status"])


# --- files ------------------------------------------------------------------------------------

def _line(node: yaml.Node, path: str) -> int:
    """1-based line of the deepest YAML node on `path` (keys may hold dots, as label keys do)."""
    line = node.start_mark.line + 1
    rest = path
    while rest:
        if isinstance(node, yaml.MappingNode):
            matches = [(key, value) for key, value in node.value
                       if rest == key.value or rest.startswith((f"{key.value}.", f"{key.value}["))]
            if not matches:
                break
            key, node = max(matches, key=lambda kv: len(kv[0].value))
            line, rest = key.start_mark.line + 1, rest[len(key.value):].removeprefix(".")
        elif isinstance(node, yaml.SequenceNode) and (m := re.match(r"\[(\d+)\]\.?", rest)) \
                and int(m.group(1)) < len(node.value):
            node = node.value[int(m.group(1))]
            line, rest = node.start_mark.line + 1, rest[m.end():]
        else:
            break
    return line


def cluster_errors(doc: Any) -> list[str]:
    """Where a manifest that `selfalign run` accepts cannot work on a cluster: every file:// URI.

    A file:// path exists on one machine; the stage pods of a cluster run neither share it nor see
    it. `selfalign run` (the local backend) accepts file://, so `validate_manifest` does too.
    """
    spec = doc.get("spec") if isinstance(doc, dict) else None
    return [f"{_path(['spec', *where])}: {value} is a path on one machine: "
            + ("the stage pods of a cluster run cannot share it; use s3://"
               if where == ["storage", "uri"] else "the stage pods cannot read it; use s3:// or pvc://")
            + " (file:// works only with `selfalign run`: check such a file with `selfalign validate --local`)"
            for where, value in _strings(spec, []) if value.startswith("file://")]


def _strings(value: Any, where: list[Any]) -> Iterable[tuple[list[Any], str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _strings(child, where + [key])
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _strings(child, where + [index])


def is_other_kind(doc: Any) -> str | None:
    """`apiVersion/kind` of a document that is some other object (a folder of manifests holds
    ConfigMaps, Kustomizations...), else None: a SelfAlignRun, or a broken one, is checked."""
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or doc["kind"] == KIND:
        return None
    api_version = str(doc.get("apiVersion", ""))
    return None if api_version.split("/")[0] == GROUP else f"{api_version}/{doc['kind']}"


def validate_files(paths: Iterable[str], *, cluster: bool = True, stdin: TextIO | None = None,
                   note: Callable[[str], None] = lambda _: None) -> dict[str, list[str]]:
    """Validate every SelfAlignRun in multi-document YAML files ("-" is standard input); keys are
    `file#docindex`. Other kinds of objects are skipped, each with a `note`. `cluster`: also
    refuse what only the local backend can run (`cluster_errors`); else check the run as
    `selfalign run` would, its storage defaulted where the local runner puts it.

    Each error line ends with the line in the file it points at.
    """
    from .cli.local import with_local_storage

    results: dict[str, list[str]] = {}
    loader = ManifestLoader("")
    for path in paths:
        path = STDIN if path == "-" else path
        try:
            text = (stdin or sys.stdin).read() if path == STDIN else open(path, encoding="utf-8").read()
        except OSError as exc:
            results[f"{path}#0"] = [f"(file): cannot read: {exc.strerror}"]
            continue
        index = skipped = 0  # index: of the document being read, so a YAML error names it too
        try:
            for node in yaml.compose_all(text, Loader=ManifestLoader):
                doc = loader.construct_document(node)
                if (other := is_other_kind(doc)) is not None:
                    note(f"{path}#{index}: skipped: {other} is not a {KIND}")
                    skipped += 1
                elif doc is not None:  # an empty document, as kubectl skips it
                    errors = validate_manifest(doc if cluster else with_local_storage(doc)) \
                        + (cluster_errors(doc) if cluster else [])
                    results[f"{path}#{index}"] = [f"{error} (line {_line(node, error.split(': ', 1)[0])})"
                                                  for error in errors]
                index += 1
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            results[f"{path}#{index}"] = [f"(yaml): {getattr(exc, 'problem', None) or exc}{where}"]
        if not skipped and not any(key.startswith(f"{path}#") for key in results):
            results[f"{path}#0"] = [f"(file): no {KIND} in this file"]
    return results
