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


def _json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines()]


def test_an_uncaught_exception_in_a_thread_is_one_json_line(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A watcher thread that died printed Python's raw multi-line traceback, which a JSON log pipeline
    takes for as many lines of garbage; logged, it is one line with the traceback inside it."""
    configure_logging("INFO", json_output=True)

    def fail() -> None:
        raise RuntimeError("boom")

    thread = threading.Thread(target=fail, name="watch-taskruns")
    thread.start()
    thread.join()

    (line,) = _json_lines(capsys.readouterr().err)
    assert line["level"] == "ERROR"
    assert "watch-taskruns" in str(line["message"])
    assert 'raise RuntimeError("boom")' in str(line["exception"])


def test_a_thread_that_exits_says_nothing_as_by_default(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json_output=True)

    thread = threading.Thread(target=sys.exit)
    thread.start()
    thread.join()

    assert capsys.readouterr().err == ""


def test_an_uncaught_exception_in_the_main_thread_is_one_json_line(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json_output=True)

    try:
        raise ValueError("bad setting")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # what Python calls as the process ends

    (line,) = _json_lines(capsys.readouterr().err)
    assert line["level"] == "CRITICAL"
    assert "ValueError: bad setting" in str(line["exception"])


def test_ctrl_c_keeps_pythons_own_report(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_output=True)

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)

    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().endswith("KeyboardInterrupt")


def test_warnings_are_logged(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A library's DeprecationWarning (or a ResourceWarning) otherwise goes to stderr as two raw lines."""
    import warnings

    configure_logging("INFO", json_output=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("this option goes away", UserWarning, stacklevel=1)

    (line,) = _json_lines(capsys.readouterr().err)
    assert (line["level"], line["logger"]) == ("WARNING", "py.warnings")
    assert "this option goes away" in str(line["message"])


def test_the_mcp_sdks_tracebacks_are_left_out_whatever_its_logger_is_named(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The MCP SDK logs what a server sent that it could not use with the traceback of the validation
    error, which quotes the server's data (a secret among it, beyond scrubbing). Its client session logs
    as "client", not under "mcp": every line from the SDK's code keeps its message and loses the traceback;
    a line of our own keeps it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("mcp")
    assert spec is not None and spec.origin is not None
    sdk_file = str(Path(spec.origin).parent / "client" / "session.py")
    configure_logging("INFO", json_output=True)
    for name, path in [("client", sdk_file), ("mcp.shared.session", __file__), ("kubechain.mcp", __file__)]:
        try:
            raise ValueError("1 validation error: input_value='key=s3cret-env-value'")
        except ValueError:
            record = logging.getLogger(name).makeRecord(
                name, logging.WARNING, path, 1, "Failed to validate notification: %s", ("x",), sys.exc_info()
            )
        logging.getLogger(name).handle(record)

    sdk_client, sdk_shared, ours = _json_lines(capsys.readouterr().err)
    for line in (sdk_client, sdk_shared):
        assert "exception" not in line and "s3cret" not in json.dumps(line)
        assert str(line["message"]).startswith("Failed to validate notification: x (ValueError;")
    assert "s3cret-env-value" in str(ours["exception"])
