"""Structured logging: every line carries the resource it is about (from a contextvar), JSON optional."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

_resource: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "kubechain_resource", default=None
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def resource_fields(kind: str, namespace: str, name: str, run: str = "") -> dict[str, str]:
    """The fields that name a resource on a log line: ``kind``, ``namespace`` and ``resource`` (its name),
    plus the ``run`` and ``toolcall`` it is part of, so one query finds every line of a run. A TaskRun is
    its own run; a tool call's run is given (a long run name is cut and hashed in the call's name)."""
    fields = {"kind": kind, "namespace": namespace, "resource": name}
    if kind == "TaskRun":
        fields["run"] = name
    elif kind == "TaskRunToolCall":
        fields["toolcall"] = name
        fields["run"] = run
    return {key: value for key, value in fields.items() if value}


@contextlib.contextmanager
def resource_context(kind: str, namespace: str, name: str, task: str = "") -> Iterator[None]:
    token = _resource.set({**resource_fields(kind, namespace, name), "task": task})
    try:
        yield
    finally:
        _resource.reset(token)


def bind_to_context(**fields: str) -> None:
    """Add ``fields`` to the enclosing resource_context's lines, once they are known (a tool call's run,
    from the call as read), until that context ends: its reset undoes this too. Outside one, nothing."""
    current = _resource.get()
    if current is not None:
        _resource.set({**current, **fields})


def detached_context(kind: str = "", namespace: str = "", name: str = "") -> contextvars.Context:
    """A fresh context for long-lived background work (an MCP connection's task), naming only its own
    resource. Started from a caller's context, such work would name that first caller on every line."""
    context = contextvars.Context()
    fields = {**resource_fields(kind, namespace, name), "task": ""} if kind else None
    context.run(_resource.set, fields)
    return context


class ResourceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_resource.get() or {}).items():
            if not hasattr(record, key) and value:
                setattr(record, key, value)
        return True


class WithoutMCPServerData(logging.Filter):
    """The MCP SDK logs what a server sent that it could not use (a line it could not parse, a notification
    it could not validate) with the exception's traceback, whose validation error quotes the server's data:
    a secret among it (a server that prints "using API key sk-..."), cut in the middle, is beyond
    scrubbing. Of a line logged by the SDK's code, whatever its logger is named (its client session logs
    as "client"), the message is kept and the traceback dropped; the session logs such errors scrubbed.
    A bug of ours the SDK logs (an exception raised in kubechain's code it called: a message handler, a
    transport wrapper) keeps its traceback: see _our_own_bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _from_mcp_sdk(record) and not _our_own_bug(record.exc_info[1]):
            kind = record.exc_info[0].__name__ if record.exc_info[0] else "error"
            record.msg = f"{record.getMessage()} ({kind}; its details may quote the server's data: left out)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


@functools.cache
def _mcp_sdk_dir() -> str | None:
    spec = importlib.util.find_spec("mcp")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(os.path.realpath(spec.origin)), "")


@functools.cache
def _kubechain_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "")


def _server_data_errors() -> tuple[type[BaseException], ...]:
    """The errors raised on what a server sent, whose text may quote it, even when raised in our code (of
    the modules imported: one that is not raised none)."""
    kinds: list[type[BaseException]] = [json.JSONDecodeError, UnicodeDecodeError]
    for module, name in (
        ("pydantic", "ValidationError"),
        ("pydantic_core", "ValidationError"),
        ("httpx2", "StreamError"),
    ):
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


def _printed(exc: BaseException, seen: set[int]) -> Iterator[BaseException]:
    """``exc`` and what a traceback of it prints too: its cause or context, the members of a group."""
    if id(exc) in seen:
        return
    seen.add(id(exc))
    yield exc
    chained = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if chained is not None:
        yield from _printed(chained, seen)
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            yield from _printed(member, seen)


def _raised_by_us(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback (where it was raised) is kubechain's code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(_kubechain_dir())


def _our_own_bug(exc: BaseException | None) -> bool:
    """Whether every exception a traceback of ``exc`` would print was raised in kubechain's own code and is
    not an error about a server's data (a validation or decoding error, an answer too large). Such a
    traceback is ours to read; any other may quote the server's data."""
    if exc is None:
        return False
    kinds = _server_data_errors()
    for printed in _printed(exc, set()):
        if isinstance(printed, BaseExceptionGroup):
            continue  # its members are looked at
        if isinstance(printed, kinds) or not _raised_by_us(printed):
            return False
    return True


def _from_mcp_sdk(record: logging.LogRecord) -> bool:
    if record.name == "mcp" or record.name.startswith("mcp."):
        return True
    sdk_dir = _mcp_sdk_dir()
    return sdk_dir is not None and os.path.realpath(record.pathname).startswith(sdk_dir)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = " ".join(f"{key}={value}" for key, value in sorted(_fields(record).items()))
        text = f"{base} {extras}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            # UTC with milliseconds: lines from several pods are merged and ordered by this field
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{
                key: value if isinstance(value, int | float | bool) else str(value)
                for key, value in _fields(record).items()
            },
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)  # Ctrl-C at a terminal: Python's own short report, as before
        return
    log.critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return  # as Python's own hook: a thread may end itself so
    name = args.thread.name if args.thread is not None else "?"
    # (exc_value may be None; the hook runs in the except block that caught it, where True finds it)
    log.error("uncaught exception in thread %s", name, exc_info=args.exc_value or True)


def configure_logging(level: str = "INFO", json_output: bool = False) -> None:
    """The one place logging is set up: a process's own lines, a library's, Python's warnings and the
    tracebacks of uncaught exceptions all go through it, so a JSON log holds nothing but JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if json_output else KeyValueFormatter())
    handler.addFilter(ResourceFilter())
    handler.addFilter(WithoutMCPServerData())  # on the handler: whatever logger the SDK's code logs to
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in (
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",  # what httpx2 (the openai and anthropic SDKs' client) sends through
        "urllib3",
        "kubernetes",
        "openai",
        "anthropic",
        "celery.worker.strategy",
        "celery.app.trace",
        "mcp",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
