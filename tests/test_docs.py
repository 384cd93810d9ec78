"""The README's and docs/gitops.md's commands, as written, against the shipped examples.

Every line of a ```bash block is one of:
- run verbatim here: `selfalign validate` and `render`, and pipelines (`kubectl kustomize ... |`),
  in the folder the page assumes (the repository; for GitOps, a repository whose runs/ holds the
  cluster examples, a kustomization.yaml and a ConfigMap);
- run against no cluster: `kubectl create` with `--dry-run=client -o yaml`, `helm install` as
  `helm template`; the objects they print are the cluster that the lines after them see;
- checked against that cluster: `kubectl apply -f FILE` (its namespace exists and agrees with
  `-n`, the Secret it names and the LocalQueue it queues on exist there; the LocalQueues are those
  docs/gitops.md creates), `kubectl get sar -n NS` and the CLI's `-n NS` (a run was applied there);
- parsed only: every other `selfalign` line goes through the real argument parser, its run names
  an applied or example run, and `selfalign run FILE` checks FILE as the local runner would;
- not run: the CI entry points, listed below.
A line that fits none of these fails, so a new command in the docs gets a check too.
"""
from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from selfalign.operator.cli.main import build_parser
from selfalign.operator.validate import ManifestLoader, validate_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: selfalign, kubectl, helm
NOT_RUN = {
    ("bash", ".ci/run"): "the CI entry point: this suite is what it runs",
    ("bash", ".ci/install.sh"): "installs the environment this test runs in",
}
RUN_COMMANDS = ("status", "logs", "report", "suspend", "resume", "retry")  # take a run's name


def fences(page: Path, language: str) -> list[str]:
    return [t.content for t in MarkdownIt().parse(page.read_text()) if t.type == "fence" and t.info == language]


def shell_lines(block: str) -> list[str]:
    """Logical lines (continuations joined), comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def local_queues() -> set[tuple[str, str]]:
    """(namespace, name) of every Kueue LocalQueue docs/gitops.md sets up."""
    return {(doc["metadata"]["namespace"], doc["metadata"]["name"])
            for block in fences(REPO / "docs" / "gitops.md", "yaml") for doc in yaml.safe_load_all(block)
            if isinstance(doc, dict) and doc.get("kind") == "LocalQueue"}


@dataclass
class Cluster:
    """What the commands so far created: the state a later command depends on."""

    namespaces: set[str] = field(default_factory=lambda: {"default"})
    secrets: set[tuple[str, str]] = field(default_factory=set)
    queues: set[tuple[str, str]] = field(default_factory=local_queues)
    runs: set[tuple[str, str]] = field(default_factory=set)


def tool(argv: list[str], cwd: Path, shell: bool = False) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "KUBECONFIG": os.devnull}
    command = ["bash", "-o", "pipefail", "-c", argv[0]] if shell else argv
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout}{result.stderr}"
    return result.stdout


def option(argv: list[str], *names: str) -> str | None:
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(f"{name}="):
                return word.split("=", 1)[1]
    return None


def kubectl_create(argv: list[str], cwd: Path, cluster: Cluster) -> None:
    for obj in yaml.safe_load_all(tool([*argv, "--dry-run=client", "-o", "yaml"], cwd)):
        namespace = obj["metadata"].get("namespace", "default")
        if obj["kind"] == "Namespace":
            cluster.namespaces.add(obj["metadata"]["name"])
        elif obj["kind"] == "Secret":
            assert namespace in cluster.namespaces, f"{shlex.join(argv)}: namespace {namespace} not created yet"
            cluster.secrets.add((namespace, obj["metadata"]["name"]))


def kubectl_apply(argv: list[str], cwd: Path, cluster: Cluster) -> None:
    flag, path = option(argv, "-n", "--namespace"), cwd / option(argv, "-f", "--filename")
    assert validate_files([str(path)]) == {f"{path}#0": []}
    for doc in yaml.load_all(path.read_text(), Loader=ManifestLoader):
        namespace = doc["metadata"].get("namespace")
        assert flag is None or namespace in (None, flag), \
            f"kubectl refuses: the file's namespace {namespace} does not match -n {flag}"
        namespace = namespace or flag or "default"
        spec = doc["spec"]
        assert namespace in cluster.namespaces, f"{path.name}: namespace {namespace} not created"
        secret = ((spec.get("storage") or {}).get("secretRef") or {}).get("name")
        assert secret is None or (namespace, secret) in cluster.secrets, \
            f"{path.name}: Secret {secret} does not exist in {namespace}"
        queue = spec.get("queueName")
        assert queue is None or (namespace, queue) in cluster.queues, \
            f"{path.name}: no LocalQueue {queue} in {namespace} (docs/gitops.md sets up the queues)"
        cluster.runs.add((namespace, doc["metadata"]["name"]))


def selfalign(argv: list[str], cwd: Path, cluster: Cluster) -> None:
    args = build_parser().parse_args(argv[1:])
    if args.command in ("validate", "render"):
        words = [found for word in argv[1:] for found in sorted(glob.glob(word, root_dir=cwd)) or [word]]
        tool([str(BIN / "selfalign"), *words], cwd)  # globs expanded as the shell would
    elif args.command == "run":
        assert validate_files([str(cwd / args.file)], cluster=False) == {f"{cwd / args.file}#0": []}
    elif args.command in RUN_COMMANDS and args.run is not None:
        on_cluster = args.command in ("suspend", "resume", "retry") or args.namespace or args.kubeconfig
        if on_cluster:
            assert (args.namespace, args.run) in cluster.runs, f"{shlex.join(argv)}: no such run applied"
        else:
            tiny = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
            assert args.run == tiny["metadata"]["name"], f"{shlex.join(argv)}: the local example is not {args.run}"


def run_line(line: str, cwd: Path, cluster: Cluster) -> None:
    words = shlex.split(line, comments=True)
    if "|" in words:
        tool([line], cwd, shell=True)
        return
    commands, current = [], []
    for word in words:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    for argv in [*commands, current]:
        if tuple(argv[:2]) in NOT_RUN:
            continue
        name = Path(argv[0]).name
        if name == "selfalign":
            selfalign(argv, cwd, cluster)
        elif argv[:2] == ["kubectl", "create"]:
            kubectl_create(argv, cwd, cluster)
        elif argv[:2] == ["kubectl", "apply"]:
            kubectl_apply(argv, cwd, cluster)
        elif argv[:3] == ["kubectl", "get", "sar"]:
            namespace = option(argv, "-n", "--namespace") or "default"
            assert any(ns == namespace for ns, _ in cluster.runs), f"{line}: no run was applied to {namespace}"
        elif argv[:2] == ["helm", "install"]:
            tool([str(BIN / "helm"), "template", *argv[2:]], cwd)
            if "--create-namespace" in argv:
                cluster.namespaces.add(option(argv, "-n", "--namespace"))
        else:
            pytest.fail(f"no check for this documented command: {line}")


@pytest.fixture
def gitops_repository(tmp_path) -> Path:
    """A runs repository as docs/gitops.md assumes it: the cluster examples under runs/, with a
    kustomization.yaml and a ConfigMap beside them (which validate skips)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    examples = sorted(p.name for p in (REPO / "examples").glob("run-*.yaml"))
    for name in examples:
        (runs / name).write_text((REPO / "examples" / name).read_text())
    (runs / "settings.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n")
    (runs / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [*examples, "settings.yaml"]}))
    return tmp_path


def test_the_readme_works_as_written_against_the_examples():
    cluster = Cluster()
    for block in fences(REPO / "README.md", "bash"):
        for line in shell_lines(block):
            run_line(line, REPO, cluster)
    assert ("alignment", "qwen7b-isheep") in cluster.runs  # the quick start got as far as its run


def test_the_gitops_page_works_as_written_on_a_runs_repository(gitops_repository):
    cluster = Cluster()
    lines = [line for block in fences(REPO / "docs" / "gitops.md", "bash") for line in shell_lines(block)]
    assert any("validate -" in line for line in lines)
    for line in lines:
        run_line(line, gitops_repository, cluster)


def test_every_example_that_queues_names_a_queue_the_docs_create():
    queues = local_queues()
    for path in sorted((REPO / "examples").glob("run-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        queue = doc["spec"].get("queueName")
        assert queue is None or (doc["metadata"]["namespace"], queue) in queues, path.name


def test_a_documented_name_that_drifts_fails_the_check(tmp_path):
    """The check itself: the README's old quick start (Secret s3, -n team-a) fails it."""
    cluster = Cluster()
    run_line("kubectl create namespace team-a", REPO, cluster)
    run_line("kubectl create secret generic s3 -n team-a --from-literal=A=b", REPO, cluster)
    with pytest.raises(AssertionError, match="does not match -n team-a"):
        run_line("kubectl apply -n team-a -f examples/run-isheep.yaml", REPO, cluster)
    run_line("kubectl create namespace alignment", REPO, cluster)
    with pytest.raises(AssertionError, match="Secret selfalign-s3 does not exist in alignment"):
        run_line("kubectl apply -f examples/run-isheep.yaml", REPO, cluster)
    with pytest.raises(pytest.fail.Exception, match="no check for this documented command"):
        run_line("kubectl delete sar --all", REPO, cluster)


def test_the_chart_takes_global_values_as_an_umbrella_chart_passes_them(tmp_path):
    umbrella = tmp_path / "platform"
    umbrella.mkdir()
    (umbrella / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "0.1.0",
        "dependencies": [{"name": "selfalign", "version": ">=0",
                          "repository": (REPO / "charts" / "selfalign").as_uri()}]}))
    (umbrella / "values.yaml").write_text("global:\n  imageRegistry: registry.example.com\n")
    tool([str(BIN / "helm"), "dependency", "build", str(umbrella)], tmp_path)
    rendered = tool([str(BIN / "helm"), "template", "platform", str(umbrella)], tmp_path)
    assert any(doc and doc["kind"] == "Deployment" for doc in yaml.safe_load_all(rendered))
