"""The operator's log lines: kopf's text format, or one JSON object per line for log collectors.

kopf's own JSON format (`kopf.LogFormat.JSON`) writes only the message, a timestamp, a severity
and the object as a nested reference; a collector (Loki, Elasticsearch, Cloud Logging) filters
on flat fields, so this formatter writes `level`, `logger`, `message`, `timestamp` and, where the
record is about an object (kopf's object loggers attach `k8s_ref`), its `namespace` and `run`
(or `object` for a Job or Pod). `extra=` fields of a call (e.g. `{"run": name}`) come through as
they are.
"""
from __future__ import annotations

import logging
from typing import Any

import kopf
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from .naming import KIND

FORMATS = ("text", "json")
# kopf's record attributes: the object reference is flattened below, the rest is internal.
KOPF_ATTRS = ("k8s_ref", "k8s_skip", "settings")


class RunJsonFormatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         reserved_attrs=[*RESERVED_ATTRS, *KOPF_ATTRS], timestamp=True)

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        ref = getattr(record, "k8s_ref", None) or {}
        if ref.get("namespace"):
            log_record.setdefault("namespace", ref["namespace"])
        if ref.get("kind") == KIND:
            log_record.setdefault("run", ref.get("name"))
        elif ref.get("name"):
            log_record.setdefault("object", f"{ref.get('kind')}/{ref['name']}")


def configure_logging(log_format: str) -> None:
    """kopf's logging set-up (its stream handler on the root logger, asyncio quietened), in
    `log_format`; call it once, before `kopf.run`."""
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; expected one of {FORMATS}")
    root = logging.getLogger()
    before = set(root.handlers)
    kopf.configure(verbose=False)
    if log_format == "json":
        for handler in set(root.handlers) - before:  # kopf's own stream handler, not others'
            handler.setFormatter(RunJsonFormatter())
