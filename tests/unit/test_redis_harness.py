"""The test harness never uses a developer's Redis: it flushes databases and pauses clients of the Redis it
runs, so a ``$REDIS_URL`` left in the shell (the README sets one for the Procfile) must not reach it.
``kubechain up`` alone adopts ``$REDIS_URL``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import redis

from tests.unit.interrupting import Interrupted, a_child_and_grandchild, interrupted_once, survivors

FOREIGN = "redis://127.0.0.1:1/5"


def test_local_redis_starts_its_own_server_whatever_redis_url_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubechain.testing.redis_server import LocalRedis

    monkeypatch.setenv("REDIS_URL", FOREIGN)
    with LocalRedis() as server:
        assert server.managed
        assert server.url != FOREIGN and server.url.startswith("redis://127.0.0.1:")
        monkeypatch.setenv("REDIS_URL", server.url)  # one that answers, as a user's own would
        with LocalRedis(use_env=True) as adopted:
            assert not adopted.managed and adopted.url == server.url


def test_a_stack_starts_its_own_redis_unless_told_to_adopt_redis_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubechain.testing.stack import LocalStack, StackOptions

    monkeypatch.setenv("REDIS_URL", FOREIGN)
    stack = LocalStack(StackOptions(workdir=tmp_path / "tests", cluster="local"))
    stack.start_redis()
    try:
        assert stack.redis is not None and stack.redis.managed and stack.redis.url != FOREIGN
    finally:
        stack.redis.stop()
    adopting = LocalStack(StackOptions(workdir=tmp_path / "up", cluster="local", redis_from_env=True))
    monkeypatch.setattr(redis.Redis, "ping", lambda self: True)  # FOREIGN answers, here
    adopting.start_redis()
    assert adopting.redis is not None and adopting.redis.url == FOREIGN


def test_up_adopts_redis_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    seen: list[stack.StackOptions] = []

    class Recording:
        logs = tmp_path / "logs"

        def __init__(self, options: stack.StackOptions, **_: object) -> None:
            seen.append(options)

        def start(self) -> None:
            raise OSError("not starting anything here")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(stack, "LocalStack", Recording)
    CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "up")])
    (options,) = seen
    assert options.redis_from_env is True


def test_a_redis_url_that_does_not_answer_stops_the_start_without_showing_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`up` took $REDIS_URL on trust: the watcher and workers then failed in their logs, and the URL was
    printed with its password."""
    import time

    from kubechain.testing.redis_server import LocalRedis, RedisError

    said: list[str] = []
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret-pa55@127.0.0.1:1/0")
    adopted = LocalRedis(use_env=True, progress=said.append)
    started = time.monotonic()
    with pytest.raises(RedisError) as refused:
        adopted.start()
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert message.startswith("REDIS_URL redis://127.0.0.1:1/0 does not answer: "), message
    assert "s3cret" not in message + "".join(said)


@pytest.mark.parametrize(
    ("url", "password", "said"),
    [
        ("redis://:s3cr/et@127.0.0.1:1/0", "s3cr/et", "a password with"),
        ("redis://:sec#ret@127.0.0.1:1/0", "sec#ret", "a password with"),
        ("redis://:sec?ret@127.0.0.1:1/0", "sec?ret", "a password with"),
        ("redis://user:qx/zw@127.0.0.1:1/0", "qx/zw", "a password with"),
        ("http://:s3cr/et@127.0.0.1:1/0", "s3cr/et", "redis://, rediss:// or unix://"),
        # an option redis-py does not know, which it passed on to the connection: a TypeError at PING
        ("redis://k8s-user?wrap=now@127.0.0.1:1/0", "k8s-user?wrap=now", "a password with"),
    ],
)
def test_a_redis_url_that_cannot_be_read_is_refused_without_any_of_its_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, password: str, said: str
) -> None:
    """A password with "/", "#" or "?" unescaped was printed: whole by redact_url, which took the host's
    part to end there, and its start by redis-py's error ("Port could not be cast to integer value as
    's3cr'")."""
    from kubechain.testing.redis_server import LocalRedis, RedisError

    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(RedisError) as refused:
        LocalRedis(workdir=tmp_path, use_env=True, progress=lambda _: None).start()
    message = str(refused.value)
    assert message.startswith(f"REDIS_URL {url.partition('//')[0]}//127.0.0.1:1/0 is not a Redis URL"), (
        message
    )
    assert said in message, message
    assert not any(piece in message for piece in re.split(r"[/#?]", password)), message


def test_a_redis_url_without_userinfo_that_cannot_be_read_is_refused_in_redis_pys_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubechain.testing.redis_server import LocalRedis, RedisError

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0?socket_timeout=soon")
    with pytest.raises(RedisError, match="not a Redis URL: Invalid value for 'socket_timeout'"):
        LocalRedis(workdir=tmp_path, use_env=True, progress=lambda _: None).start()


def test_an_adopted_redis_url_is_said_without_its_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kubechain.testing.stack import LocalStack, StackOptions

    said: list[str] = []
    monkeypatch.setenv("REDIS_URL", "redis://kc:s3cret-pa55@redis.example:6379/2")
    monkeypatch.setattr(redis.Redis, "ping", lambda self: True)
    stack = LocalStack(
        StackOptions(workdir=tmp_path, cluster="local", redis_from_env=True), progress=said.append
    )
    stack.start_redis()
    assert stack.redis is not None and stack.redis.url == "redis://kc:s3cret-pa55@redis.example:6379/2"
    assert any("redis://redis.example:6379/2" in line for line in said), said
    assert not any("s3cret" in line for line in said), said


def test_the_stacks_redis_keeps_its_folder_and_log_in_the_workdir(tmp_path: Path) -> None:
    """It ran in a /tmp/kubechain-redis-* folder, left behind when `up` was killed (SIGKILL), and its log
    went with the folder at every stop: a Redis that would not start left nothing to read."""
    from kubechain.testing.stack import LocalStack, StackOptions

    stack = LocalStack(StackOptions(workdir=tmp_path / "kc", cluster="local"), progress=lambda _: None)
    stack.start_redis()
    assert stack.redis is not None
    try:
        assert stack.redis.log_path == tmp_path / "kc" / "logs" / "redis.log"
        assert stack.redis.data_dir is not None and stack.redis.data_dir.is_relative_to(tmp_path / "kc")
    finally:
        stack.redis.stop()
    assert "Ready to accept connections" in (tmp_path / "kc" / "logs" / "redis.log").read_text()


def test_a_redis_server_that_exits_at_start_names_its_log(tmp_path: Path) -> None:
    import socket
    import time

    from kubechain.testing.redis_server import LocalRedis, RedisError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # bound, not listening: redis-server cannot have it, a PING is refused
    try:
        server = LocalRedis(port=taken.getsockname()[1], workdir=tmp_path / "redis", progress=lambda _: None)
        began = time.monotonic()
        with pytest.raises(RedisError) as failed:
            server.start()
        # seen at once: redis-py's own retries of a refused PING, with back-off, took 4 s
        assert time.monotonic() - began < 2
    finally:
        taken.close()
    message = str(failed.value)
    assert f"last lines of {tmp_path / 'redis' / 'redis.log'}:" in message, message
    assert "==== " not in message, "its own run's lines only"


def test_a_redis_url_that_does_not_answer_is_found_before_the_control_plane_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The control plane (a 6-minute build on a fresh machine) was started, and the CRDs installed, before
    the Redis was looked at."""
    import kubechain.testing.stack as stack_module
    from kubechain.testing.redis_server import RedisError
    from kubechain.testing.stack import LocalStack, StackOptions

    started: list[str] = []
    monkeypatch.setattr(
        stack_module, "LocalControlPlane", lambda **_: started.append("control plane") or 1 / 0
    )
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    stack = LocalStack(
        StackOptions(workdir=tmp_path, cluster="local", redis_from_env=True), progress=lambda _: None
    )
    with pytest.raises(RedisError, match="does not answer"):
        stack.start()
    assert started == []


def test_an_apt_get_update_interrupted_is_stopped_with_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (which ends `up`'s start) or Ctrl-C killed apt-get alone, 0.25 s later (subprocess.run's
    way), leaving its children; apt-get update writes nothing dpkg needs whole: it is stopped at once, as
    a group (SIGTERM, then SIGKILL for what is left)."""
    import time

    import kubechain.testing.binaries as binaries
    from kubechain.testing.redis_server import _run_apt

    monkeypatch.setattr(binaries, "_STOP_GRACE_S", 0.5)
    started = time.monotonic()
    with pytest.raises(Interrupted), interrupted_once(tmp_path / "grandchild.pid"):
        _run_apt(["sh", "-c", a_child_and_grandchild(tmp_path)], dict(os.environ), lambda _: None, finish_s=0)
    assert time.monotonic() - started < 10
    assert not survivors(tmp_path)


def test_an_apt_get_install_interrupted_is_let_finish(tmp_path: Path) -> None:
    """Cut short, dpkg leaves packages half-installed, and every later apt-get refuses until `dpkg
    --configure -a`: the machine's package manager broken for more than KubeChain. An install is let
    finish (within finish_s), saying so, and then the start ends."""
    from kubechain.testing.redis_server import _run_apt

    said: list[str] = []
    script = a_child_and_grandchild(tmp_path, then=f'sleep 1; touch "{tmp_path}/installed"; kill -9 $!')
    with pytest.raises(Interrupted), interrupted_once(tmp_path / "grandchild.pid"):
        _run_apt(["sh", "-c", script], dict(os.environ), said.append, finish_s=30)
    assert (tmp_path / "installed").exists(), "it ran to its end"
    assert not survivors(tmp_path)
    assert any("waiting up to 30 s for apt-get to finish" in line for line in said), said


def test_an_apt_get_install_that_does_not_finish_in_time_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import kubechain.testing.binaries as binaries
    from kubechain.testing.redis_server import _run_apt

    monkeypatch.setattr(binaries, "_STOP_GRACE_S", 0.5)
    started = time.monotonic()
    with pytest.raises(Interrupted), interrupted_once(tmp_path / "grandchild.pid"):
        _run_apt(
            ["sh", "-c", a_child_and_grandchild(tmp_path)], dict(os.environ), lambda _: None, finish_s=0.5
        )
    assert time.monotonic() - started < 10
    assert not survivors(tmp_path)
