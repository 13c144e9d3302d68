"""How log lines are written: the JSON format's fields, and what configure_logging sets up."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from kubechain.observability.logs import JSONFormatter


def test_json_time_is_utc_iso_8601_with_milliseconds() -> None:
    """Lines from several pods are merged and sorted by time: without a zone or milliseconds they could not
    be placed against each other (or against a trace's spans)."""
    record = logging.LogRecord("kubechain", logging.INFO, __file__, 1, "hello", (), None)
    record.created = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC).timestamp()
    record.msecs = 123.456

    payload = json.loads(JSONFormatter().format(record))

    assert payload["time"] == "2024-05-01T12:30:45.123Z"
