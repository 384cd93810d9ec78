"""A clone passes by itself: nothing in the suite, the benchmarks or the code reads beside it."""
import re
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.confinement import OutsideRepository, ReadGuard, sibling_roots

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def layout(tmp_path):
    """A clone with a folder beside it, as on the developers' machines."""
    (tmp_path / "clone").mkdir()
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "seeds.jsonl").write_text("{}\n")
    return tmp_path


def test_a_read_beside_the_repository_is_refused_and_remembered(layout):
    guard = ReadGuard(sibling_roots(layout / "clone", allowed=[]))
    with pytest.raises(OutsideRepository, match="beside"):
        guard("open", (str(layout / "clone" / ".." / "beside" / "seeds.jsonl"), "r", 0))
    with pytest.raises(OutsideRepository):
        guard("os.listdir", (layout / "beside",))
    guard("open", (str(layout / "clone" / "tests" / "data.jsonl"), "r", 0))
    guard("open", (3, "r", 0))
    assert guard.seen == [str(layout / "beside" / "seeds.jsonl"), str(layout / "beside")]


def test_siblings_that_hold_or_are_tool_or_temporary_places_stay_readable(layout):
    assert sibling_roots(layout / "clone", allowed=[layout / "beside" / "tmp"]) == []
    (layout / ".cache").mkdir()  # a clone in a home directory sits beside its tool caches
    assert sibling_roots(layout / "clone", allowed=[]) == [(layout / "beside").resolve()]
    assert sibling_roots(layout / "clone", allowed=[layout]) == []  # a clone in the temp dir


def test_the_suite_runs_under_the_guard():
    from tests import conftest

    siblings = sibling_roots(REPO, allowed=[])
    guarded = {p.rstrip("/") for p in conftest.READ_GUARD.prefixes}
    assert guarded <= {str(s) for s in siblings}
    for sibling in siblings:
        if str(sibling) in guarded:
            with pytest.raises(OutsideRepository):
                sibling.iterdir().__next__()
            conftest.READ_GUARD.seen.clear()


def test_no_tracked_file_names_a_path_beside_the_repository():
    """The guard sees this process only; stage subprocesses are covered by what the code says."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|[\"']shared[\"']\s*/")
    offenders = [name for name in tracked
                 if name.endswith((".py", ".sh", ".yaml", ".toml", ".json", ".txt", "run"))
                 and pattern.search((REPO / name).read_text(errors="replace"))]
    assert offenders == []
