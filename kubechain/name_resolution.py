"""Resolving a host name by a deadline, which getaddrinfo cannot be made to keep.

getaddrinfo blocks in C, deaf to socket timeouts and signals: a resolver that does not answer (a DNS
server dropping queries, a stuck NSS module) holds its caller for as long as the resolver's own retries
take (resolv.conf's timeout × attempts × servers) or for ever. A request made under a claim (an LLM turn,
an externalAPI tool call) must end by its deadline, so the name is resolved on a helper thread and waited
for only until then. A thread left waiting cannot be stopped (nothing interrupts a C call): it ends when
getaddrinfo returns at last, its answer handed to whoever waits for the same name then, or dropped. Requests
for a name already being resolved wait for that resolution rather than start another, so a resolver that
hangs leaves at most one thread per (name, port) behind, however many calls time out on it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from concurrent.futures import Future

# The resolutions under way, by (host, port): a request for one of them waits for it.
_under_way: dict[tuple[str, int], Future[list[str]]] = {}
_under_way_lock = threading.Lock()


class ResolutionTimedOut(TimeoutError):
    """The name was not resolved by the deadline (its resolution goes on, on its own thread)."""


def is_address(host: str) -> bool:
    """Whether ``host`` is an IP address already (nothing to resolve)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 address may name its zone (fe80::1%eth0)
    except ValueError:
        return False
    return True


def addresses_by(host: str, port: int, deadline: float) -> list[str]:
    """The addresses ``host`` resolves to for a TCP connection to ``port``, in the order getaddrinfo gives
    them (the order socket.create_connection tries them in), each once. ResolutionTimedOut if the resolver
    has not answered by ``deadline`` (time.monotonic()); getaddrinfo's own error (socket.gaierror) if it
    answered that the name does not resolve."""
    if is_address(host):
        return [host]
    key = (host, port)
    with _under_way_lock:
        resolution = _under_way.get(key)
        if resolution is None:
            resolution = _under_way[key] = Future()
            threading.Thread(
                target=_resolve, args=(key, resolution), name=f"resolve {host}", daemon=True
            ).start()
    try:
        return resolution.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise ResolutionTimedOut(f"{host} was not resolved by the request's deadline") from None


def _resolve(key: tuple[str, int], resolution: Future[list[str]]) -> None:
    host, port = key
    try:
        found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, which raises it
        outcome: list[str] | BaseException = exc
    else:
        outcome = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in found))
    with _under_way_lock:
        # no longer under way: a request from now on resolves the name afresh (after a failure too)
        if _under_way.get(key) is resolution:
            del _under_way[key]
    if isinstance(outcome, BaseException):
        resolution.set_exception(outcome)
    else:
        resolution.set_result(outcome)


def _forget_resolutions_under_way() -> None:
    """In a fork's child: the threads resolving the parent's names are not in it, so a request waiting for
    one of their answers would wait until its deadline, every time; and the lock may have been held."""
    global _under_way_lock
    _under_way_lock = threading.Lock()
    _under_way.clear()


os.register_at_fork(after_in_child=_forget_resolutions_under_way)
