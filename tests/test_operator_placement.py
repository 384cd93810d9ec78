"""Stage pod placement through the operator (kopf against the emulator and the test kubelet,
issue 14 items 1 and 2): the Jobs it creates carry the run's and the stage's pod template and
deadline, and what the template adds reaches the stage's process."""
from __future__ import annotations

import base64

import pytest

from selfalign.operator.naming import LABEL_RUN, job_name
from selfalign.operator.spec import STAGES
from tests.fixtures.kube import NS, RUNS, api, run_manifest
from tests.test_operator import expected_jobs, run_spec

SECRETS = f"/api/v1/namespaces/{NS}/secrets"
TEMPLATE = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}},
    "spec": {"serviceAccountName": "selfalign-irsa", "imagePullSecrets": [{"name": "registry-pull"}],
             "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
             "containers": [{"name": "stage", "envFrom": [{"secretRef": {"name": "hf-token"}}],
                             "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}]},
}


async def secret(cluster, name: str, data: dict[str, str]) -> None:
    await api(cluster.emulator, "POST", SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


async def test_the_jobs_carry_the_runs_and_the_stages_overrides(cluster):
    await secret(cluster, "hf-token", {"HF_TOKEN": "hf_test"})
    spec = run_spec(rounds=1, podTemplate=TEMPLATE, resources={"train": {
        "activeDeadlineSeconds": 3600,
        "podTemplate": {"spec": {"runtimeClassName": "nvidia",
                                 "containers": [{"name": "stage", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}]}}}})
    await cluster.create_run("placed", spec)
    status = await cluster.wait_phase("placed", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert cluster.job_posts() == expected_jobs("placed", 1)
    jobs = {j["metadata"]["name"]: j for j in cluster.jobs("placed")}
    for stage in STAGES:
        job = jobs[job_name("placed", 0, stage)]
        template = job["spec"]["template"]
        pod, [container] = template["spec"], template["spec"]["containers"]
        assert template["metadata"]["labels"]["team"] == "nlp"
        assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
        assert (pod["serviceAccountName"], pod["imagePullSecrets"]) == ("selfalign-irsa", [{"name": "registry-pull"}])
        assert pod["automountServiceAccountToken"] is False
        assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
        train = stage == "train"
        assert (job["spec"].get("activeDeadlineSeconds"), pod.get("runtimeClassName")) == (
            (3600, "nvidia") if train else (None, None))
        assert any(e["name"] == "NCCL_DEBUG" for e in container["env"]) is train


async def test_a_secret_given_by_the_pod_template_reaches_the_stage_process(cluster):
    """The fake stage fails with the exit code in FAKE_FAIL_CODE when its name is in FAKE_FAIL:
    here both come only from the Secret the run's podTemplate hands over with envFrom."""
    await secret(cluster, "hf-token", {"FAKE_FAIL": "coverage", "FAKE_FAIL_CODE": "2"})
    await cluster.create_run("secreted", run_spec(rounds=1, podTemplate=TEMPLATE))
    status = await cluster.wait_phase("secreted", "Failed", "Succeeded")
    stages = status["rounds"][0]["stages"]
    assert status["phase"] == "Failed" and stages["coverage"]["phase"] == "Failed"
    assert all(stages[stage]["phase"] == "Succeeded" for stage in STAGES[:-1])
    # exit code 2 (bad input) from the Secret's FAKE_FAIL_CODE: failed at once, with no retry
    coverage = stages["coverage"]
    assert (coverage["reason"], coverage["attempts"]) == ("PodFailurePolicy", 1)
    assert "fake failure" in coverage["message"]


@pytest.fixture
def network_policy(monkeypatch) -> None:
    """The chart's stages.networkPolicy, as the operator's env carries it (egress left open)."""
    monkeypatch.setenv("SELFALIGN_NETWORK_POLICY", '{"egress": null}')


async def test_a_run_gets_its_network_policy_and_its_jobs_its_priority_class(network_policy, cluster):
    manifest = run_manifest("guarded", run_spec(rounds=1))
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": "research-high", "team": "nlp"}
    await api(cluster.emulator, "POST", RUNS, manifest)
    status = await cluster.wait_phase("guarded", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    (policy,) = cluster.emulator.list_objects("networking.k8s.io/v1/networkpolicies")
    assert policy["metadata"]["name"] == "guarded"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == cluster.run("guarded")["metadata"]["uid"]
    assert policy["spec"]["podSelector"]["matchLabels"][LABEL_RUN] == "guarded"
    posts = [r for r in cluster.operator_requests() if r.resource == "networking.k8s.io/v1/networkpolicies"]
    assert len(posts) == 1  # once per run, not once per stage
    for job in cluster.jobs("guarded"):
        labels = job["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/priority-class"] == "research-high" and "team" not in labels


async def test_no_network_policy_unless_the_chart_asks(cluster):
    await cluster.create_run("open", run_spec(rounds=1))
    await cluster.wait_phase("open", "Succeeded", "Failed")
    assert cluster.emulator.list_objects("networking.k8s.io/v1/networkpolicies") == []
