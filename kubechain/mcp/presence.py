"""Whether the MCPServers a worker's sessions serve are still there as they were.

A tools worker's session (a stdio child with the server's secrets in its environment) outlives its
MCPServer's deletion: no message reaches every process that used it. So the manager asks, every
``SWEEP_INTERVAL_S``, for the metadata of the MCPServers of its sessions (one list per namespace of a
session; one of the cluster instead for sessions in many namespaces, unless the worker is limited to
namespaces, which it may be granted alone), and closes each session whose server is gone, was replaced
(same name, another uid) or edited (a newer generation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubechain.models import MCPServer

Key = tuple[str, str]  # (namespace, name)

# How long a deleted MCPServer's session may outlive it (plus a call still running on it).
SWEEP_INTERVAL_S = 30.0

# Sessions in at most this many namespaces: their MCPServers are listed one namespace at a time (a request
# each), rather than every MCPServer of the cluster at once (one request, but as large as the cluster's).
MOST_NAMESPACES_LISTED_APART = 3


@dataclass(frozen=True)
class ServedServer:
    """The MCPServer a session was last used for, as its caller had read it."""

    uid: str  # "" when not known (an object not read from the API server): not compared
    generation: int
    since: float  # time.monotonic() when the call reached the manager: the object was read before


@dataclass(frozen=True)
class ListedServer:
    """An MCPServer as a list found it."""

    uid: str
    generation: int
    deleting: bool


# Given the namespaces of the sessions, the MCPServers there (at least), by (namespace, name).
ServerLister = Callable[[frozenset[str]], Mapping[Key, ListedServer]]


def served(server: MCPServer, now: float) -> ServedServer:
    return ServedServer(server.uid, server.metadata.generation or 0, now)


def still_served(current: ServedServer | None, caller: ServedServer) -> ServedServer:
    """What a session serves once ``caller`` uses it too: a caller may hold an older read of the same
    server (its generation is then not the latest seen)."""
    if current is None or current.uid != caller.uid:
        return caller
    return ServedServer(
        caller.uid, max(current.generation, caller.generation), max(current.since, caller.since)
    )


def sessions_to_close(
    sessions: Mapping[Key, ServedServer], listed: Mapping[Key, ListedServer], listed_from: float
) -> list[tuple[Key, str]]:
    """The sessions whose MCPServer is gone, replaced or edited, each with why, from a list asked for at
    ``listed_from`` (time.monotonic()). A server missing from the list, or listed with another uid, counts
    only for a session used before the list was asked for: one used since may serve a server the list
    is too early to show. A newer generation listed is an edit whenever the list was made."""
    closing: list[tuple[Key, str]] = []
    for key, serves in sessions.items():
        found = listed.get(key)
        if found is None or found.deleting:
            if serves.since < listed_from:
                closing.append((key, "its MCPServer was deleted"))
        elif serves.uid and found.uid != serves.uid:
            if serves.since < listed_from:
                closing.append((key, "its MCPServer was replaced by another of the same name"))
        elif found.generation > serves.generation:
            closing.append((key, f"its MCPServer changed (generation {found.generation})"))
    return closing


class MetadataLister(Protocol):
    """A KubeClient, or anything with its ``list_metadata``."""

    def list_metadata(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]: ...


def kube_server_lister(kube: MetadataLister, served_namespaces: Sequence[str]) -> ServerLister:
    """A ServerLister over the API server (metadata only): one list per namespace of the sessions, or, for
    a worker of every namespace with sessions in more than MOST_NAMESPACES_LISTED_APART, one of the
    cluster. ``served_namespaces``: KUBECHAIN_NAMESPACES (empty: all); a worker limited to namespaces may
    be granted those alone (a Role in each), so it never lists the cluster."""

    def listed(namespaces: frozenset[str]) -> dict[Key, ListedServer]:
        apart = served_namespaces or len(namespaces) <= MOST_NAMESPACES_LISTED_APART
        scopes: list[str | None] = list(sorted(namespaces)) if apart else [None]
        found: dict[Key, ListedServer] = {}
        for scope in scopes:
            for meta in kube.list_metadata(MCPServer.PLURAL, scope):
                key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
                found[key] = ListedServer(
                    uid=str(meta.get("uid") or ""),
                    generation=int(meta.get("generation") or 0),
                    deleting=bool(meta.get("deletionTimestamp")),
                )
        return found

    return listed
