"""`selfalign operator --log-format json`: one JSON object per line, through kopf's own loggers."""
from __future__ import annotations

import json
import logging

import kopf
import pytest

from selfalign.operator import logging_setup
from selfalign.operator.cli import main as cli
from selfalign.operator.naming import GROUP, KIND, VERSION


@pytest.fixture
def root_logging():
    """configure_logging replaces the root logger's kopf handler and level: put them back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def kopf_handler(root: logging.Logger) -> logging.Handler:
    (handler,) = [h for h in root.handlers if type(h).__name__ == "_KopfStreamHandler"]
    return handler


def lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def run_body(namespace: str, name: str) -> kopf.Body:
    return kopf.Body({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                      "metadata": {"namespace": namespace, "name": name, "uid": "u1"}})


def test_a_run_logger_writes_one_json_object_per_line_with_its_namespace_and_run(root_logging, capsys):
    logging_setup.configure_logging("json")
    logger = kopf.ObjectLogger(body=run_body("team-a", "camp"), settings=kopf.OperatorSettings())
    logger.warning("status write conflicted run=%s", "camp")
    (line,) = lines(capsys)
    assert line["level"] == "WARNING" and line["logger"] == "kopf.objects"
    assert line["message"] == "status write conflicted run=camp"
    assert (line["namespace"], line["run"]) == ("team-a", "camp")
    assert "timestamp" in line and "k8s_ref" not in line and "settings" not in line


def test_a_job_logger_names_its_object_and_extra_fields_come_through(root_logging, capsys):
    logging_setup.configure_logging("json")
    body = kopf.Body({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"namespace": "team-a", "name": "camp-r0-train"}})
    logger = kopf.ObjectLogger(body=body, settings=kopf.OperatorSettings())
    logger.warning("job create refused", extra={"run": "camp"})
    logging.getLogger("selfalign.operator").error("no object here")
    job, plain = lines(capsys)
    assert (job["namespace"], job["run"], job["object"]) == ("team-a", "camp", "Job/camp-r0-train")
    assert plain["level"] == "ERROR" and plain["logger"] == "selfalign.operator" and "namespace" not in plain


def test_text_stays_kopfs_format(root_logging):
    logging_setup.configure_logging("text")
    assert not isinstance(kopf_handler(root_logging).formatter, logging_setup.RunJsonFormatter)


def test_the_operator_command_configures_the_format_before_the_operator_runs(root_logging, monkeypatch):
    seen = []
    monkeypatch.setattr("selfalign.operator.handlers.run_operator",
                        lambda **_: seen.append(type(kopf_handler(root_logging).formatter)))
    assert cli.main(["operator", "--log-format", "json", "--metrics-port", "0"]) == 0
    assert seen == [logging_setup.RunJsonFormatter]


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown log format"):
        logging_setup.configure_logging("xml")
