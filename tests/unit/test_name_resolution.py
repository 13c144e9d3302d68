"""Resolving a host name by a deadline (getaddrinfo on a helper thread, waited for until then)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from kubechain.name_resolution import ResolutionTimedOut, _under_way, addresses_by, is_address
from kubechain.testing.waiting import wait_for
from tests.unit.slow_peers import HangingResolver


def test_requests_for_a_name_being_resolved_wait_for_that_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call timing out on a hung resolver must not leave a thread of its own behind (fifty tool calls
    of a turn, each retried): the second waits for the first's resolution. Once the resolver answers, the
    thread ends and the name is resolved afresh next time."""
    with HangingResolver(monkeypatch, "hangs.test") as resolver:
        for _ in range(2):
            with pytest.raises(ResolutionTimedOut, match="hangs.test was not resolved by the request's"):
                addresses_by("hangs.test", 443, time.monotonic() + 0.05)
        assert resolver.asked == ["hangs.test"], "one resolution, waited for twice"
        resolver.release()
        wait_for(lambda: ("hangs.test", 443) not in _under_way, 30, what="the resolution to end")
        assert resolver.unanswered == 0
        with pytest.raises(socket.gaierror, match="Temporary failure in name resolution"):
            addresses_by("hangs.test", 443, time.monotonic() + 30)  # afresh: released, it fails at once
        assert resolver.asked == ["hangs.test", "hangs.test"]


def test_a_name_resolves_to_its_addresses_in_order_each_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with HangingResolver(monkeypatch, "unused.test", {"two.test": ["127.0.0.2", "127.0.0.1", "127.0.0.2"]}):
        assert addresses_by("two.test", 80, time.monotonic() + 30) == ["127.0.0.2", "127.0.0.1"]


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", True), ("::1", True), ("fe80::1%eth0", True), ("llm.test", False), ("1.2.3", False)],
)
def test_an_address_is_not_resolved(host: str, address: bool) -> None:
    assert is_address(host) is address


def test_a_forked_child_resolves_a_name_its_parent_was_resolving_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prefork worker forks its pool's children while a resolution may be under way: the child has no
    thread to answer it, so it must not wait for that one (every call to the host would time out in it, for
    ever) but resolve the name itself."""
    with HangingResolver(monkeypatch, "hangs.test") as resolver:
        with pytest.raises(ResolutionTimedOut):
            addresses_by("hangs.test", 443, time.monotonic() + 0.05)  # under way, on a thread, when forked
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:  # the child: reports what a call to the host came to, then leaves at once
            outcome = "nothing"
            try:
                resolver.release()  # the child's resolver answers (fails at once) once asked
                addresses_by("hangs.test", 443, time.monotonic() + 10)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(exc).__name__}: {exc}"
            finally:
                os.write(writing, outcome.encode())
                os._exit(0)
        os.close(writing)
        with os.fdopen(reading, "rb") as report:
            outcome = report.read().decode()
        os.waitpid(child, 0)
        assert outcome == "gaierror: [Errno -3] Temporary failure in name resolution", (
            "the child resolved the name itself"
        )
        assert resolver.asked == ["hangs.test"], "the parent's resolution is still the one under way"
    wait_for(lambda: ("hangs.test", 443) not in _under_way, 30, what="the parent's resolution to end")
