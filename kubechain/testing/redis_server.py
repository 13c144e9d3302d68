"""A real ``redis-server`` on a free loopback port (or, for ``kubechain up``, an external one via ``$REDIS_URL``)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from kubechain.redaction import redact_url
from kubechain.testing.binaries import Progress, default_progress, stop_process_group
from kubechain.testing.controlplane import ManagedProcess, _register_for_exit, _unregister_for_exit, free_port

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install redis-server (Debian: apt-get install redis-server); `kubechain up` can use a Redis named by "
    "REDIS_URL instead"
)
_apt_lock = threading.Lock()


class RedisError(RuntimeError):
    """redis-server could not be found, installed or started."""


def find_redis_server() -> Path | None:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


# How long an apt-get install interrupted (Ctrl-C, `up`'s SIGTERM) is let run to its end before it is stopped.
APT_FINISH_S = 120.0


def _apt(args: list[str], report: Progress, attempts: int = 5) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for (rather than fail on) a dpkg/apt lock held by a concurrent apt run.
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-o", "Dpkg::Use-Pty=0", *args]
    # an install runs dpkg, which cut short leaves packages half-installed; an update only fetches lists
    finish_s = APT_FINISH_S if args[:1] == ["install"] else 0.0
    last = ""
    for attempt in range(1, attempts + 1):
        report(f"running {' '.join(cmd)} (attempt {attempt})")
        returncode, output = _run_apt(cmd, env, report, finish_s=finish_s)
        if returncode == 0:
            return
        last = "\n".join(output.strip().splitlines()[-15:])
        logger.warning("apt-get %s failed (rc=%d): %s", " ".join(args), returncode, last)
        if "lock" not in last.lower() or attempt == attempts:
            break
        time.sleep(min(5.0 * attempt, 20.0))
    raise RedisError(f"apt-get {' '.join(args)} failed; {_INSTALL_HINT}\n{last}")


def _run_apt(cmd: list[str], env: dict[str, str], report: Progress, *, finish_s: float) -> tuple[int, str]:
    """Run ``cmd`` (apt-get) to its end: its exit code and output (stdout and stderr).

    In a session of its own, so that what interrupts the start (Ctrl-C, `up`'s SIGTERM) is decided here,
    not by the terminal's signals reaching apt-get and dpkg, and so that what it started is stopped with
    it (subprocess.run killed apt-get alone, 0.25 s after a Ctrl-C). Interrupted, it is let run to its
    end for up to ``finish_s`` (an install: dpkg cut short leaves packages half-installed, and every
    later apt-get refuses until ``dpkg --configure -a``: the machine's package manager broken, not only
    KubeChain's start), saying so; past that, or interrupted again, or at once for ``finish_s`` 0 (an
    update, which writes its lists whole or not at all), it is stopped as a group (SIGTERM, then SIGKILL
    for what is left). The interruption is raised then."""
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait()
        except BaseException:
            try:
                if finish_s > 0:
                    report(
                        f"waiting up to {finish_s:.0f} s for apt-get to finish: cut short, dpkg would leave "
                        "packages half-installed"
                    )
                    proc.wait(timeout=finish_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                pass
            finally:
                stop_process_group(proc)
            raise
        output.seek(0)
        return returncode, output.read().decode("utf-8", "replace")


def ensure_redis_server(progress: Progress | None = None) -> Path:
    """Path of ``redis-server``; installs it with apt-get when missing and running as root."""
    report = progress or default_progress
    found = find_redis_server()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RedisError(f"redis-server not found; {_INSTALL_HINT}")
    with _apt_lock:
        found = find_redis_server()
        if found:
            return found
        report("redis-server not found; installing it with apt-get")
        _apt(["update"], report)
        _apt(["install", "-y", "--no-install-recommends", "redis-server"], report)
    found = find_redis_server()
    if found is None:
        raise RedisError(f"redis-server still missing after apt-get install; {_INSTALL_HINT}")
    return found


def _unreadable(url: str, exc: Exception) -> str:
    """Why redis-py cannot read ``url``: in its words, unless they may quote a piece of the URL's userinfo.
    A password with "/", "?" or "#" unescaped ends the host's part there, and redis-py takes its start for
    the port ("Port could not be cast to integer value as 's3cr'") or its end for the query's options."""
    if not url.startswith(("redis://", "rediss://", "unix://")):  # as redis-py checks it, small letters
        return "it must start with redis://, rediss:// or unix://"
    userinfo = url.partition("://")[2].rpartition("@")[0]
    said = str(exc)
    if any(piece in said for piece in re.split(r"[:/?#&=;]", userinfo) if piece):
        return (
            "it cannot be read (a password with /, ? or # in it is written percent-encoded there: "
            "%2F, %3F, %23)"
        )
    return said


class LocalRedis:
    """A throw-away Redis (no persistence, ``noeviction``); with ``use_env``, ``$REDIS_URL`` if set.

    Tests start their own (the default): they flush databases and pause clients, which must never reach a
    Redis that a developer's shell names for the Procfile. ``kubechain up`` adopts ``$REDIS_URL``.
    """

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        progress: Progress | None = None,
        use_env: bool = False,
        start_timeout: float = 20.0,
        log_path: Path | None = None,
    ) -> None:
        env_url = os.environ.get("REDIS_URL") if use_env else None
        self._external_url = env_url or None
        self._port = port or 0
        self._owns_workdir = workdir is None
        self._workdir = workdir
        self._log_path = log_path  # None: redis.log in its folder
        self._progress = progress or default_progress
        self._start_timeout = start_timeout
        self._proc: ManagedProcess | None = None
        self._lock = threading.RLock()

    @property
    def managed(self) -> bool:
        """True when this object runs the server (False for ``$REDIS_URL``)."""
        return self._external_url is None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        if self._external_url:
            return self._external_url
        if not self._port:
            raise RedisError("redis not started")
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def data_dir(self) -> Path | None:
        """The server's folder (its --dir): the one given, or a temporary one made at start."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        if self._log_path is not None:
            return self._log_path
        return self._workdir / "redis.log" if self._workdir else None

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            if self._external_url:
                self._check_external(self._external_url)
                self._progress(f"using the Redis of REDIS_URL, {redact_url(self._external_url)}")
                return
            if self._proc is not None and self._proc.running():
                return
            binary = ensure_redis_server(self._progress)
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="kubechain-redis-"))
            self._workdir.mkdir(parents=True, exist_ok=True)
            # a throw-away Redis starts empty: never from a dump an earlier run's restart(flush=False) left
            (self._workdir / "dump.rdb").unlink(missing_ok=True)
            if not self._port:
                self._port = free_port()
            _register_for_exit(self)
            argv = [
                str(binary),
                "--port", str(self._port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--maxmemory-policy", "noeviction",
                "--daemonize", "no",
                "--dir", str(self._workdir),
                "--dbfilename", "dump.rdb",
                "--logfile", "",
            ]  # fmt: skip
            assert self.log_path is not None
            self._proc = ManagedProcess("redis-server", argv, self.log_path)
            t0 = time.monotonic()
            self._proc.start()
            try:
                self._wait_ping()
            except BaseException:
                self.stop()
                raise
            self._progress(f"redis-server ready at {self.url} in {time.monotonic() - t0:.2f}s")

    def _check_external(self, url: str, timeout_s: float = 3.0) -> None:
        """One PING, so that a Redis that is not there stops the start with its reason, rather than every
        process failing in its own log. The URL is said without its password."""
        import redis

        try:
            client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as exc:  # no redis://, rediss:// or unix:// scheme, a port that is no number
            raise RedisError(
                f"REDIS_URL {redact_url(url)} is not a Redis URL: {_unreadable(url, exc)}"
            ) from None
        try:
            client.ping()
        except redis.exceptions.RedisError as exc:
            raise RedisError(f"REDIS_URL {redact_url(url)} does not answer: {exc}") from None
        except TypeError as exc:  # an option of its query that redis-py passes on to the connection ("?a=1")
            raise RedisError(
                f"REDIS_URL {redact_url(url)} is not a Redis URL: {_unreadable(url, exc)}"
            ) from None
        finally:
            client.close()

    def _wait_ping(self) -> None:
        import redis

        deadline = time.monotonic() + self._start_timeout
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # one attempt per PING: this loop is the retry, and it looks at the process between attempts
        # (redis-py's own retries, with back-off, took 4 s to see a server that had exited at once)
        client = redis.Redis(
            host="127.0.0.1",
            port=self._port,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                assert self._proc is not None
                if not self._proc.running():
                    raise RedisError(
                        f"redis-server exited with {self._proc.returncode()}; last lines of "
                        f"{self._proc.log_path}:\n{self._proc.tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RedisError(f"redis-server did not answer PING within {self._start_timeout:.0f}s; "
                                     f"last lines of {self._proc.log_path}:\n{self._proc.tail()}")  # fmt: skip
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.stop(timeout=5.0)
                self._proc = None
            _unregister_for_exit(self)
            if self._owns_workdir and self._workdir is not None and self._workdir.exists():
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def restart(self, flush: bool = True) -> None:
        """Stop and start again on the same port.

        ``flush=True``: the new server starts empty.  ``flush=False``: the dataset is saved to an RDB file
        first and loaded by the new server.
        """
        with self._lock:
            if not self.managed:
                raise RedisError("cannot restart an external Redis (REDIS_URL is set)")
            if self._proc is None or self._workdir is None:
                raise RedisError("redis not started")
            import redis

            dump = self._workdir / "dump.rdb"
            if flush:
                dump.unlink(missing_ok=True)
            else:
                with redis.Redis(host="127.0.0.1", port=self._port) as client:
                    client.save()
            self._progress(f"restarting redis-server on port {self._port} (flush={flush})")
            self._proc.stop(timeout=5.0)
            self._proc.start()
            self._wait_ping()
