"""Invalid specs that the CRD schema cannot reject reach the operator (issue 2, item 8e).

Each such run must end Failed with reason InvalidSpec and a message naming the field, and no Job
may exist for it. (tests/test_crd.py checks that the schema rejects the `schema_rejects` ones.)
"""
import asyncio

from tests.fixtures.kube import wait_for
from tests.invalid_specs import INVALID

REACHES_OPERATOR = [case for case in INVALID if not case.schema_rejects]


async def test_invalid_specs_fail_with_invalid_spec_and_create_nothing(cluster):
    assert len(REACHES_OPERATOR) >= 4
    names = {case.id: f"invalid-{i:02d}" for i, case in enumerate(REACHES_OPERATOR)}
    await asyncio.gather(*(cluster.create_run(names[case.id], case.spec) for case in REACHES_OPERATOR))

    for case in REACHES_OPERATOR:
        name = names[case.id]
        status = await cluster.wait_phase(name, "Failed", "Running", "Succeeded")
        assert status["phase"] == "Failed", (case.id, status.get("message"))
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec"), case.id
        assert case.field in status["message"] and case.field in failed["message"], (case.id, status["message"])
        await wait_for(lambda: "RunFailed" in [e["reason"] for e in cluster.events(name)], what=f"{name} event")
        warning = next(e for e in cluster.events(name) if e["reason"] == "RunFailed")
        assert warning["type"] == "Warning" and case.field in warning["message"]
    assert cluster.jobs() == [] and cluster.job_posts() == []
