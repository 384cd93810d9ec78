"""Shared fixtures live in tests/fixtures/, one module per concern (each owned by its area)."""
import os
import tempfile
from pathlib import Path

import pytest

from tests.fixtures import confinement

# Nothing in the test suite may reach a network or a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A private torch.compile cache for this session and its subprocesses: processes sharing
# /tmp/torchinductor_<user> have been seen to compile each other's half-written kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="selfalign-inductor-"))

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.kube",
]

READ_GUARD = confinement.install(Path(__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def reads_stay_in_the_repository():
    """Fails a test that read beside the repository, even where the code swallowed the error."""
    yield
    seen, READ_GUARD.seen[:] = list(READ_GUARD.seen), []
    assert not seen, f"read outside the repository: {seen}"
