"""The Helm chart, checked with the real tools: helm lint/template, Kubernetes schemas, checkov,
and a least-privilege test that derives the operator's API calls from its code.

helm and checkov come from .ci/tools.sh (into the venv's bin); a missing tool fails the test.
"""
from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "selfalign"
RELEASE, NAMESPACE = "sa", "selfalign-system"
MIN_KUBERNETES = "1.31.0"  # Chart.yaml kubeVersion
LATEST_KUBERNETES = kubernetes_validate.latest_version()
# Kinds from CRDs that kubernetes-validate has no schema for; each is still rendered and parsed.
NO_SCHEMA_KINDS = {"ServiceMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}

RENDERINGS = {
    "default": [],
    # Two replicas serving two namespaces, with every optional object on and a pinned digest.
    "namespaced-ha": [
        "--set", "replicaCount=2", "--set", "watchNamespaces={team-a,team-b}",
        "--set", "networkPolicy.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.dashboard.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
        "--set", "operator.logFormat=json",
        "--set", "image.digest=sha256:" + "ab" * 32,
        "--set", "stages.networkPolicy.enabled=true", "--set", "stages.networkPolicy.restrictEgress=true",
        "--set-json", 'stages.podTemplate={"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},'
                      ' "spec": {"imagePullSecrets": [{"name": "mirror"}]}}',
    ],
    "clusterwide-ha": ["--set", "replicaCount=2", "--set", "crds.keep=false"],
}


def tool(name: str) -> str:
    """A binary that .ci/tools.sh installs next to this venv's python."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (folder / name).exists():
            return str(folder / name)
    pytest.fail(f"{name} is not installed in the venv: run .ci/tools.sh")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args[:3])} failed ({result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}")
    return result


@cache
def render(name: str) -> tuple[dict, ...]:
    out = run(tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
              "--kube-version", MIN_KUBERNETES, "--include-crds", *RENDERINGS[name]).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(docs, kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def deployment(docs) -> dict:
    (dep,) = find(docs, "Deployment")
    return dep


def container(docs) -> dict:
    (operator,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return operator


# ---- helm lint, values.schema.json ---------------------------------------------------------

@pytest.mark.parametrize("name", RENDERINGS)
def test_helm_lint_is_clean(name):
    result = run(tool("helm"), "lint", "--strict", str(CHART), "--kube-version", MIN_KUBERNETES,
                 *RENDERINGS[name])
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("replicaCount=0", "/replicaCount"),
        ("stages.train.resources.gpus=-1", "/stages/train/resources/gpus"),
        ("image.digest=latest", "/image/digest"),
        ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
        ("securityContext.allowPrivilegeEscalation=true", "/securityContext/allowPrivilegeEscalation"),
        ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot"),
        ("metrics.port=70000", "/metrics/port"),
        ("stages.train.resources.activeDeadlineSeconds=0", "/stages/train/resources/activeDeadlineSeconds"),
        ("stages.podTemplate.spec.runtimeClassName=Bad_Name", "/stages/podTemplate/spec/runtimeClassName"),
        ("stages.podTemplate.spec.securityContext.runAsUser=0", "/stages/podTemplate/spec"),
        ("replicas=2", "replicas"),  # a misspelt key is an error, not silently ignored
    ],
)
def test_schema_rejects_bad_values_naming_the_field(setting, path):
    templated = run(tool("helm"), "template", RELEASE, str(CHART), "--set", setting, check=False)
    assert templated.returncode != 0
    assert path in templated.stderr
    linted = run(tool("helm"), "lint", str(CHART), "--set", setting, check=False)
    assert linted.returncode != 0 and path in linted.stdout + linted.stderr


def test_a_job_ttl_below_the_operators_minimum_fails_the_install():
    from selfalign.operator.settings import MIN_JOB_TTL

    templated = run(tool("helm"), "template", RELEASE, str(CHART), "--set", f"stages.jobTTLSeconds={MIN_JOB_TTL - 1}",
                    check=False)
    # values.schema.json refuses it (minimum), so the operator never starts into a crash loop.
    assert templated.returncode != 0 and "/stages/jobTTLSeconds': minimum" in templated.stderr
    assert f"{MIN_JOB_TTL:,}" in templated.stderr
    run(tool("helm"), "template", RELEASE, str(CHART), "--set", f"stages.jobTTLSeconds={MIN_JOB_TTL}")


# ---- every rendered manifest against the Kubernetes schemas ---------------------------------

@pytest.mark.parametrize("version", [MIN_KUBERNETES, LATEST_KUBERNETES])
@pytest.mark.parametrize("name", RENDERINGS)
def test_every_rendered_manifest_is_valid_kubernetes(name, version):
    checked = 0
    for doc in render(name):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in NO_SCHEMA_KINDS, f"no schema for {doc['kind']}"
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert checked >= 8


# ---- the CRD --------------------------------------------------------------------------------

def test_chart_crd_is_the_same_document_as_crds_dir():
    """Sync with: cp crds/selfalignrun.yaml charts/selfalign/files/crds/selfalignrun.yaml"""
    source = yaml.safe_load((ROOT / "crds" / "selfalignrun.yaml").read_text())
    copy = yaml.safe_load((CHART / "files" / "crds" / "selfalignrun.yaml").read_text())
    assert copy == source, "the chart's CRD is stale: see charts/selfalign/README.md"


def test_crd_is_rendered_from_templates_and_kept_on_uninstall():
    source = yaml.safe_load((ROOT / "crds" / "selfalignrun.yaml").read_text())
    (kept,) = find(render("default"), "CustomResourceDefinition", "selfalignruns.selfalign.dev")
    assert kept["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert kept == source
    (plain,) = find(render("clusterwide-ha"), "CustomResourceDefinition", "selfalignruns.selfalign.dev")
    assert plain == source
    off = run(tool("helm"), "template", RELEASE, str(CHART), "--set", "crds.install=false").stdout
    assert "selfalignruns.selfalign.dev" not in off


# ---- what each configuration renders ---------------------------------------------------------

def test_default_is_one_cluster_wide_standalone_replica():
    docs = render("default")
    dep = deployment(docs)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # never two standalone operators at once
    args = container(docs)["args"]
    assert args[0] == "operator"
    assert not any(a.startswith(("--peering", "--namespace")) for a in args)
    assert not find(docs, "ClusterKopfPeering") and not find(docs, "Role")
    assert not find(docs, "NetworkPolicy") and not find(docs, "ServiceMonitor")
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-selfalign",
                                    "namespace": NAMESPACE}]


def test_two_replicas_peer_through_kopf():
    docs = render("clusterwide-ha")
    dep = deployment(docs)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert f"--peering={RELEASE}-selfalign" in container(docs)["args"]
    assert find(docs, "ClusterKopfPeering", f"{RELEASE}-selfalign")
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The peering CRDs come from the chart's crds/ folder (installed before the peering object).
    crds = {d["metadata"]["name"]: d["spec"]["scope"] for d in find(docs, "CustomResourceDefinition")}
    assert crds["clusterkopfpeerings.kopf.dev"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"] == "Namespaced"
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] \
        == "kubernetes.io/hostname"


def test_watch_namespaces_get_roles_peerings_and_namespace_args():
    docs = render("namespaced-ha")
    args = container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    for ns in ("team-a", "team-b"):
        (role,) = find(docs, "Role", namespace=ns)
        (binding,) = find(docs, "RoleBinding", namespace=ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"][0]["namespace"] == NAMESPACE
        assert find(docs, "KopfPeering", f"{RELEASE}-selfalign", ns)
    assert not find(docs, "ClusterKopfPeering")


def test_operator_pod_is_hardened_and_probed():
    for name in RENDERINGS:
        docs = render(name)
        pod = deployment(docs)["spec"]["template"]["spec"]
        operator = container(docs)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        ctx = operator["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert {"requests", "limits"} <= set(operator["resources"])
        health = next(p for p in operator["ports"] if p["name"] == "health")["containerPort"]
        assert f"--liveness=http://0.0.0.0:{health}/healthz" in operator["args"]
        for probe in ("livenessProbe", "readinessProbe"):
            assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
        sa = find(docs, "ServiceAccount")[0]
        assert sa["automountServiceAccountToken"] is False  # only the operator pod opts in


def test_stage_images_resources_and_ttl_reach_the_operator():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    env = {e["name"]: e.get("value") for e in container(render("default"))["env"]}
    registry = "ghcr.io/selfalign"
    assert env["SELFALIGN_IMAGE_SYNTHESIZE"] == env["SELFALIGN_IMAGE_ASSESS"] == f"{registry}/stage-vllm:0.1.0"
    assert env["SELFALIGN_IMAGE_TRAIN"] == env["SELFALIGN_IMAGE_MERGE"] == f"{registry}/stage-train:0.1.0"
    assert env["SELFALIGN_IMAGE_COVERAGE"] == f"{registry}/stage-coverage:0.1.0"
    assert env["SELFALIGN_JOB_TTL_SECONDS"] == str(values["stages"]["jobTTLSeconds"])
    resources = json.loads(env["SELFALIGN_STAGE_RESOURCES"])
    assert resources["train"] == values["stages"]["train"]["resources"]
    override = run(tool("helm"), "template", RELEASE, str(CHART), "--set",
                   "stages.train.image=registry.local/train@sha256:" + "cd" * 32).stdout
    assert "registry.local/train@sha256:" + "cd" * 32 in override


def test_the_charts_pod_template_schema_is_the_crds():
    """values.schema.json checks stages.podTemplate as the API server checks spec.podTemplate
    (the rules on the stage contract's names are the operator's: it refuses them at start)."""
    from selfalign.operator import validate

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["stages"]["properties"]
    crd = validate.to_json_schema(validate.root_schema()["properties"]["spec"]["properties"]["podTemplate"])
    assert {**schema["podTemplate"], "description": crd["description"]} == crd


def test_pod_template_network_policy_and_deadlines_reach_the_operator():
    from selfalign.operator.settings import OperatorSettings

    values = yaml.safe_load((CHART / "values.yaml").read_text())["stages"]
    default = {e["name"]: e.get("value") for e in container(render("default"))["env"]}
    assert "SELFALIGN_POD_TEMPLATE" not in default and "SELFALIGN_NETWORK_POLICY" not in default
    deadlines = {stage: spec["activeDeadlineSeconds"]
                 for stage, spec in json.loads(default["SELFALIGN_STAGE_RESOURCES"]).items()}
    assert deadlines == {stage: values[stage]["resources"]["activeDeadlineSeconds"] for stage in deadlines}
    env = {e["name"]: e.get("value") for e in container(render("namespaced-ha"))["env"]}
    settings = OperatorSettings.from_env(env)
    assert settings.pod_template.metadata.annotations == {"sidecar.istio.io/inject": "false"}
    assert [s.name for s in settings.pod_template.spec.image_pull_secrets] == ["mirror"]
    assert settings.network_policy == {"egress": values["networkPolicy"]["egress"]}
    open_egress = run(tool("helm"), "template", RELEASE, str(CHART), "--set", "stages.networkPolicy.enabled=true").stdout
    (dep,) = [d for d in yaml.safe_load_all(open_egress) if d and d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert OperatorSettings.from_env(env).network_policy == {"egress": None}


def test_metrics_service_servicemonitor_networkpolicy_and_pdb_agree_on_ports():
    docs = render("namespaced-ha")
    metrics_port = next(p for p in container(docs)["ports"] if p["name"] == "metrics")
    (service,) = find(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"] == deployment(docs)["spec"]["selector"]["matchLabels"]
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (policy,) = find(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert {p["port"] for p in policy["spec"]["egress"][0]["ports"]} == {443, 6443}
    assert len(policy["spec"]["egress"]) == 1  # the API server only
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert metrics_port["containerPort"] == 8080
    image = container(docs)["image"]
    assert image.endswith("@sha256:" + "ab" * 32)


def test_notes_say_what_to_run_next():
    out = run(tool("helm"), "install", RELEASE, str(CHART), "--dry-run=client",
              "--namespace", NAMESPACE).stdout
    notes = out[out.index("NOTES:"):]
    assert "kubectl apply" in notes and "kubectl get sar" in notes
    assert f"rollout status deployment/{RELEASE}-selfalign" in notes


# ---- least privilege: the chart grants exactly what the operator's code calls ----------------

# Verbs of the kubernetes client's method names (create_namespaced_job -> create, ...).
CLIENT_VERBS = {"create": "create", "read": "get", "get": "get", "list": "list", "patch": "patch",
                "replace": "update", "delete": "delete", "delete_collection": "deletecollection"}
# kopf itself, whatever the handlers are (kopf/_core/reactor/observation.py, engines/peering.py):
# it scans and watches CRDs; namespaced, it lists and watches namespaces to resolve its
# --namespace arguments; peering, it watches the peering objects and patches its own.
KOPF_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
KOPF_NAMESPACES = {("", "namespaces", v) for v in ("list", "watch")}


def kopf_peering(resource: str) -> set:
    return {("kopf.dev", resource, v) for v in ("list", "watch", "patch")}


def handler_needs() -> set:
    """(group, resource, verb) for every resource a kopf handler of the operator serves."""
    import kopf

    import selfalign.operator.handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    # kopf exposes no public iteration over its registries; these are the ones it reads itself.
    watching = [*registry._watching.get_all_handlers(), *registry._indexing.get_all_handlers()]
    changing = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    assert not registry._webhooks.get_all_handlers(), "webhooks need RBAC and config the chart lacks"
    needs = set()
    for handler, verbs in [(h, ("list", "watch")) for h in watching] + \
                          [(h, ("list", "watch", "patch")) for h in changing]:
        selector = handler.selector
        needs |= {(selector.group or "", selector.plural or selector.any_name, v) for v in verbs}
    return needs


def client_needs() -> set:
    """(group, resource, verb) for every kubernetes-client method that operator/*.py uses."""
    import kubernetes.client

    from selfalign.operator import naming

    api_classes = {name: cls for name, cls in vars(kubernetes.client).items()
                   if name.endswith("Api") and inspect.isclass(cls)}
    api_methods = {m for c in api_classes.values() for m in dir(c) if not m.startswith("_")}
    constants = {k: v for k, v in vars(naming).items() if isinstance(v, str)}
    # cluster_view.py's calls are the CLI's, made with the user's kubeconfig, not the operator's.
    trees = {p: ast.parse(p.read_text()) for p in sorted((ROOT / "operator").glob("*.py"))
             if p.name != "cluster_view.py"}
    # The API classes the operator instantiates decide which group a shared method name means.
    instantiated = {node.func.attr for tree in trees.values() for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in api_classes}
    needs = set()
    for path, tree in trees.items():
        calls = {id(c.func): c for c in ast.walk(tree) if isinstance(c, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in api_methods:
                continue
            where = f"{path.name}:{node.lineno}"
            method = node.attr.removesuffix("_with_http_info").removesuffix("_for_all_namespaces")
            verb_part, _, kind = method.partition("_namespaced_") if "_namespaced_" in method \
                else method.partition("_")
            verb = CLIENT_VERBS.get(verb_part)
            assert verb, f"{where}: {method} is not a resource call this test knows"
            subresource = "/status" if kind.endswith("_status") else ""
            kind = kind.removesuffix("_status")
            if kind.endswith("custom_object"):
                call = calls.get(id(node))
                assert call is not None, f"{where}: call {method} directly so its arguments show"
                group, plural = _custom_object_target(call, cluster=kind.startswith("cluster"),
                                                      constants=constants, where=where)
                needs.add((group, plural + subresource, verb))
                continue
            owners = [n for n in instantiated if method in dir(api_classes[n])]
            assert len(owners) == 1, f"{where}: {method} belongs to {owners or 'no instantiated API'}"
            needs.add((_api_group(owners[0]), _plural(kind) + subresource, verb))
    return needs


def _custom_object_target(call: ast.Call, *, cluster: bool, constants: dict,
                          where: str) -> tuple[str, str]:
    """(group, plural) of a CustomObjectsApi call, from literals or naming.py constants."""
    positions = {"group": 0, "plural": 2 if cluster else 3}
    keywords = {k.arg: k.value for k in call.keywords}
    values = []
    for name, index in positions.items():
        node = keywords.get(name) or (call.args[index] if index < len(call.args) else None)
        if isinstance(node, ast.Constant):
            values.append(node.value)
        elif isinstance(node, ast.Name) and node.id in constants:
            values.append(constants[node.id])
        else:
            raise AssertionError(f"{where}: {name} must be a literal or a naming.py constant")
    return values[0], values[1]


def _api_group(class_name: str) -> str:
    """CoreV1Api -> "", BatchV1Api -> "batch", ... (the classes an operator plausibly uses)."""
    groups = {"CoreV1Api": "", "BatchV1Api": "batch", "EventsV1Api": "events.k8s.io",
              "AppsV1Api": "apps", "CoordinationV1Api": "coordination.k8s.io",
              "PolicyV1Api": "policy", "NetworkingV1Api": "networking.k8s.io"}
    assert class_name in groups, f"add {class_name}'s API group to _api_group"
    return groups[class_name]


def _plural(kind: str) -> str:
    """config_map -> configmaps, job -> jobs, network_policy -> networkpolicies."""
    word = kind.replace("_", "")
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def owner_reference_needs() -> set:
    """Children whose ownerReference has blockOwnerDeletion: the API's
    OwnerReferencesPermissionEnforcement admission (OpenShift, hardened clusters) then requires
    `update` on the owner's `finalizers` subresource, else every child create is 403."""
    from selfalign.operator.jobs import owner_reference
    from selfalign.operator.naming import GROUP, KIND, PLURAL, VERSION

    ref = owner_reference({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "r", "uid": "u"}})
    return {(GROUP, f"{PLURAL}/finalizers", "update")} if ref.get("blockOwnerDeletion") else set()


def operator_needs() -> set:
    return handler_needs() | client_needs() | owner_reference_needs()


def granted(rules: list[dict]) -> set:
    triples = set()
    for rule in rules:
        for value in (*rule["apiGroups"], *rule["resources"], *rule["verbs"]):
            assert value != "*", f"wildcard in {rule}"
        triples |= {(group, resource, verb) for group in rule["apiGroups"]
                    for resource in rule["resources"] for verb in rule["verbs"]}
    return triples


def rules_of(docs, kind: str, namespace: str | None = None) -> set:
    return set().union(*(granted(d["rules"]) for d in find(docs, kind, namespace=namespace)))


def test_operator_code_calls_are_derived():
    """The derivation itself sees the calls it must (so an empty result cannot pass vacuously)."""
    needs = operator_needs()
    assert ("selfalign.dev", "selfalignruns", "watch") in needs
    assert ("selfalign.dev", "selfalignruns/status", "patch") in needs
    assert ("batch", "jobs", "create") in needs
    assert ("selfalign.dev", "selfalignruns/finalizers", "update") in needs  # children block deletion


def test_cluster_role_grants_exactly_what_the_operator_calls():
    code = operator_needs()
    assert rules_of(render("default"), "ClusterRole") == code | KOPF_CLUSTER
    assert rules_of(render("clusterwide-ha"), "ClusterRole") == \
        code | KOPF_CLUSTER | kopf_peering("clusterkopfpeerings")


def test_namespaced_roles_grant_exactly_what_the_operator_calls():
    docs = render("namespaced-ha")
    code = operator_needs()
    assert rules_of(docs, "ClusterRole") == KOPF_CLUSTER | KOPF_NAMESPACES
    for ns in ("team-a", "team-b"):
        assert rules_of(docs, "Role", ns) == code | kopf_peering("kopfpeerings")


def test_peering_patch_is_limited_to_the_releases_own_peering_object():
    for name, kind in (("clusterwide-ha", "ClusterRole"), ("namespaced-ha", "Role")):
        for role in find(render(name), kind):
            for rule in role["rules"]:
                if "patch" in rule["verbs"] and rule["apiGroups"] == ["kopf.dev"]:
                    assert rule["resourceNames"] == [f"{RELEASE}-selfalign"]


# ---- checkov: the rendered chart and the Dockerfiles, in one run ------------------------------

# Checkov without a platform API key reports no severities, so every failed check blocks except
# these, each scoped to the rendering it is accepted for.
CHECKOV_SKIPS = {
    # The default values cannot name the digest of an image released after the chart; a release
    # pins it with image.digest (the namespaced-ha rendering does, and must pass this check).
    ("CKV_K8S_43", "default.yaml"): "digest unknown before release",
    ("CKV_K8S_43", "clusterwide-ha.yaml"): "digest unknown before release",
    # IfNotPresent is right for immutable version tags and digests; Always would make every
    # operator restart depend on the registry being reachable.
    ("CKV_K8S_15", "*"): "immutable tags",
    # The operator is the one pod that must call the API server: its token is the point. The
    # ServiceAccount itself has automountServiceAccountToken: false.
    ("CKV_K8S_38", "*"): "operator needs its token",
}


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory):
    scan = tmp_path_factory.mktemp("checkov")
    for name in RENDERINGS:
        (scan / f"{name}.yaml").write_text(yaml.safe_dump_all(render(name), sort_keys=False))
    for dockerfile in (ROOT / "images").glob("Dockerfile.*"):
        (scan / dockerfile.name).write_text(dockerfile.read_text())
    result = run(tool("checkov"), "--directory", str(scan), "--framework", "kubernetes", "dockerfile",
                 "--skip-download", "--quiet", "--compact", "--output", "json", check=False)
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def test_checkov_scanned_the_chart_and_every_dockerfile(checkov_report):
    counts = {r["check_type"]: r["summary"]["resource_count"] for r in checkov_report}
    assert counts["dockerfile"] == len(list((ROOT / "images").glob("Dockerfile.*")))
    assert counts["kubernetes"] >= 3 * 8
    assert all(r["summary"]["parsing_errors"] == 0 for r in checkov_report)


def test_checkov_finds_nothing_outside_the_justified_skips(checkov_report):
    failed = [
        f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})"
        for report in checkov_report
        for check in report["results"]["failed_checks"]
        if (check["check_id"], Path(check["file_path"]).name) not in CHECKOV_SKIPS
        and (check["check_id"], "*") not in CHECKOV_SKIPS
    ]
    assert not failed, "\n".join(failed)
