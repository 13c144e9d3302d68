"""How log lines are written: the JSON format's fields, and what configure_logging sets up."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from kubechain.observability.logs import JSONFormatter, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging sets process-wide state: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    known = dict(logging.root.manager.loggerDict)
    levels = {name: logger.level for name, logger in known.items() if isinstance(logger, logging.Logger)}
    hooks = sys.excepthook, threading.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)


def test_json_time_is_utc_iso_8601_with_milliseconds() -> None:
    """Lines from several pods are merged and sorted by time: without a zone or milliseconds they could not
    be placed against each other (or against a trace's spans)."""
    record = logging.LogRecord("kubechain", logging.INFO, __file__, 1, "hello", (), None)
    record.created = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC).timestamp()
    record.msecs = 123.456

    payload = json.loads(JSONFormatter().format(record))

    assert payload["time"] == "2024-05-01T12:30:45.123Z"


@pytest.mark.parametrize(
    "logger", ["httpx", "httpx2", "httpcore.http11", "httpcore2.http11", "httpcore2.connection"]
)
def test_the_llm_sdks_http_libraries_stay_quiet_at_debug(restore_logging: None, logger: str) -> None:
    """openai and anthropic send through httpx2 and httpcore2: at DEBUG each LLM request added a dozen
    httpcore2 lines (connect, send headers, receive body...) around the one line that says anything."""
    configure_logging("DEBUG")

    assert logging.getLogger(logger).getEffectiveLevel() == logging.WARNING
