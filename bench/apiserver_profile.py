"""Where kube-apiserver's CPU goes during a row's measured window (``--apiserver-profile``).

kube-apiserver then runs with ``--profiling=true``. While a row's CPU meter runs, a thread takes
consecutive CPU profiles from ``/debug/pprof/profile`` (short ones, so the last ends soon after the
window does) and keeps them as ``.pprof`` files for ``go tool pprof``. The row gets the share of the
profiled CPU by kind of work: each sampled stack is put in the first category whose marker it holds.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

PROFILING_FLAG = "--profiling=true"

# (category, markers): a stack belongs to the first category any of whose markers is in one of its frames.
# Requests run their handler in a goroutine of their own (finishRequest); their HTTP reading, TLS and
# filter chain (authentication, authorization, priority and fairness, audit) are a separate category.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "status writes",
        ("customresource.(*StatusREST)", "serveStatus.PatchResource", "serveStatus.UpdateResource"),
    ),
    ("creates (custom resources)", ("crdHandler).serveResource.CreateResource",)),
    ("Events (creates of core objects)", ("endpoints/handlers.CreateResource",)),
    ("other requests", ("finisher.finishRequest",)),
    ("watch: decoding etcd changes", ("etcd3.(*watchChan)",)),
    ("watch: sending to watchers", ("(*WatchServer)",)),
    ("HTTP, TLS and filters", ("net/http.(*conn).serve", "(*timeoutHandler).ServeHTTP", "crypto/tls.")),
    ("Go garbage collection", ("runtime.gcBgMarkWorker", "runtime.bgsweep", "runtime.bgscavenge")),
)
OTHER = "other"

_SAMPLE = re.compile(r"^\s*([\d.]+)(ns|us|µs|ms|s)\s+(\S.*)$")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def category_of(frames: Sequence[str]) -> str:
    for category, markers in CATEGORIES:
        if any(marker in frame for frame in frames for marker in markers):
            return category
    return OTHER


def cpu_shares(traces: str) -> dict[str, float]:
    """Percent of the sampled CPU by category, from ``go tool pprof -traces`` output (blocks separated
    by ``-----------+----…`` lines; a block's first line is ``<value><unit>  <leaf frame>``, the rest its
    callers)."""
    seconds: dict[str, float] = {}
    for block in re.split(r"^-+\+-+$", traces, flags=re.MULTILINE)[1:]:
        lines = [line for line in block.splitlines() if line.strip()]
        match = _SAMPLE.match(lines[0]) if lines else None
        if match is None:
            continue
        frames = [match.group(3).strip(), *(line.strip() for line in lines[1:])]
        category = category_of(frames)
        seconds[category] = seconds.get(category, 0.0) + float(match.group(1)) * _UNIT_S[match.group(2)]
    total = sum(seconds.values())
    if total <= 0:
        return {}
    ordered = sorted(seconds.items(), key=lambda item: -item[1])
    return {category: round(100 * value / total, 1) for category, value in ordered}


class ProfileSource(Protocol):
    def request(self, path: str, timeout: float = ...) -> tuple[int, bytes]: ...


class ProfileRecorder:
    """Consecutive ``chunk_s``-second CPU profiles of the API server, from ``start`` until ``stop``,
    written to ``<prefix>-<n>.pprof``."""

    def __init__(self, source: ProfileSource, prefix: Path, chunk_s: int = 2) -> None:
        self._source = source
        self._prefix = prefix
        self._chunk_s = chunk_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apiserver-profile", daemon=True)
        self.files: list[Path] = []
        self.error: str | None = None

    def start(self) -> ProfileRecorder:
        self._prefix.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        """``stop`` was asked for: the profile being taken is the last."""
        return self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                status, body = self._source.request(
                    f"/debug/pprof/profile?seconds={self._chunk_s}", timeout=self._chunk_s + 30
                )
            except Exception as exc:  # noqa: BLE001 - a profile is a diagnostic: never fail the row
                self.error = f"{type(exc).__name__}: {exc}"
                return
            if status != 200:
                self.error = f"/debug/pprof/profile answered {status} (is {PROFILING_FLAG} set?)"
                return
            path = self._prefix.with_name(f"{self._prefix.name}-{len(self.files) + 1}.pprof")
            path.write_bytes(body)
            self.files.append(path)

    def stop(self) -> list[Path]:
        """Ask for no further profile, wait for the one being taken (at most ``chunk_s`` more)."""
        self._stopping.set()
        self._thread.join(timeout=self._chunk_s + 60)
        return list(self.files)


def summarize(go: Path, go_env: dict[str, str], binary: Path, files: Sequence[Path]) -> dict[str, Any]:
    """The profiles' CPU shares by category (``go tool pprof`` merges the files), or why not."""
    if not files:
        return {"error": "no profile was taken"}
    proc = subprocess.run(
        [str(go), "tool", "pprof", "-traces", str(binary), *map(str, files)],
        capture_output=True,
        text=True,
        env=go_env,
        timeout=300,
    )
    if proc.returncode != 0:
        return {"error": f"go tool pprof failed: {proc.stderr.strip()[-300:]}"}
    return {"cpu_shares_pct": cpu_shares(proc.stdout), "files": [str(f) for f in files]}
