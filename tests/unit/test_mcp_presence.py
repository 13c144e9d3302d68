"""Which sessions a tools worker closes for their MCPServer being gone, replaced or edited, and the list
that tells (the sweep itself, with a real stdio server: tests/unit/test_mcpserver_validate.py)."""

from __future__ import annotations

import pytest

from kubechain.kube.client import custom_path
from kubechain.kube.fake import FakeKubeClient
from kubechain.mcp.presence import (
    MOST_NAMESPACES_LISTED_APART,
    ListedServer,
    ServedServer,
    kube_server_lister,
    sessions_to_close,
    still_served,
)
from tests.unit.fakes import create

KEY = ("default", "fs")
LISTED_FROM = 100.0
BEFORE, AFTER = LISTED_FROM - 1, LISTED_FROM + 1  # a session's last use, before or after the list was asked


def closes(serves: ServedServer, listed: ListedServer | None) -> bool:
    found = {KEY: listed} if listed is not None else {}
    return [key for key, _ in sessions_to_close({KEY: serves}, found, LISTED_FROM)] == [KEY]


@pytest.mark.parametrize(
    ("serves", "listed", "closed"),
    [
        (ServedServer("u1", 3, BEFORE), ListedServer("u1", 3, deleting=False), False),
        (ServedServer("u1", 3, BEFORE), None, True),
        (ServedServer("u1", 3, BEFORE), ListedServer("u1", 3, deleting=True), True),
        (ServedServer("u1", 3, BEFORE), ListedServer("u2", 1, deleting=False), True),
        (ServedServer("u1", 3, AFTER), ListedServer("u1", 4, deleting=False), True),
        # a list older than what the session serves: the list is too early, not the server gone
        (ServedServer("u1", 3, BEFORE), ListedServer("u1", 2, deleting=False), False),
        (ServedServer("u2", 1, AFTER), None, False),
        (ServedServer("u2", 1, AFTER), ListedServer("u1", 3, deleting=False), False),
        # an object not read from the API server (no uid): only a newer generation counts
        (ServedServer("", 3, BEFORE), ListedServer("u1", 3, deleting=False), False),
    ],
    ids=[
        "as-it-was",
        "deleted",
        "being-deleted",
        "replaced",
        "edited",
        "list-behind-an-edit",
        "created-after-the-list",
        "recreated-after-the-list",
        "uid-unknown",
    ],
)
def test_a_session_is_closed_for_its_server_gone_replaced_or_edited_never_for_a_list_too_early(
    serves: ServedServer, listed: ListedServer | None, closed: bool
) -> None:
    assert closes(serves, listed) is closed


def test_a_session_serves_the_latest_generation_any_caller_read_and_a_new_uid_outright() -> None:
    current = ServedServer("u1", 4, 10.0)
    assert still_served(current, ServedServer("u1", 3, 12.0)) == ServedServer("u1", 4, 12.0)
    assert still_served(current, ServedServer("u2", 1, 12.0)) == ServedServer("u2", 1, 12.0)
    assert still_served(None, current) == current


def test_a_worker_of_every_namespace_lists_the_namespaces_of_its_sessions_only() -> None:
    """One session must not cost a list of every MCPServer of the cluster, every 30 s, from each tools
    worker process: a few namespaces are listed each on its own (a ClusterRole grants those too)."""
    kube = FakeKubeClient()
    create(kube, "MCPServer", "mcpservers", "fs", {"transport": "stdio", "command": "x"})
    create(kube, "MCPServer", "mcpservers", "git", {"transport": "stdio", "command": "x"}, namespace="b")
    create(kube, "MCPServer", "mcpservers", "web", {"transport": "stdio", "command": "x"}, namespace="c")
    fs = kube.get_raw("mcpservers", "default", "fs")["metadata"]
    asked_before = len(kube.requests)
    listed = kube_server_lister(kube, [])(frozenset({"default", "b"}))
    assert set(listed) == {("default", "fs"), ("b", "git")}
    assert listed[("default", "fs")] == ListedServer(fs["uid"], 1, deleting=False)
    assert kube.requests[asked_before:] == [
        ("GET", custom_path("mcpservers", "b")),
        ("GET", custom_path("mcpservers", "default")),
    ]


def test_a_worker_of_every_namespace_lists_the_cluster_once_for_sessions_in_many_namespaces() -> None:
    """More namespaces than MOST_NAMESPACES_LISTED_APART: one list of the cluster is fewer requests."""
    kube = FakeKubeClient()
    for namespace in ("a", "b", "c", "d"):
        create(
            kube, "MCPServer", "mcpservers", "fs", {"transport": "stdio", "command": "x"}, namespace=namespace
        )
    namespaces = frozenset({"a", "b", "c", "d"})
    assert len(namespaces) > MOST_NAMESPACES_LISTED_APART
    asked_before = len(kube.requests)
    listed = kube_server_lister(kube, [])(namespaces)
    assert set(listed) == {(namespace, "fs") for namespace in namespaces}
    assert kube.requests[asked_before:] == [("GET", custom_path("mcpservers", None))]


def test_a_worker_limited_to_namespaces_lists_those_of_its_sessions_only() -> None:
    """It may be granted those namespaces alone (a Role in each): a list of the cluster would be refused."""
    kube = FakeKubeClient()
    create(kube, "MCPServer", "mcpservers", "fs", {"transport": "stdio", "command": "x"}, namespace="a")
    asked_before = len(kube.requests)
    listed = kube_server_lister(kube, ["a", "b", "c"])(frozenset({"a"}))
    assert set(listed) == {("a", "fs")}
    assert kube.requests[asked_before:] == [("GET", custom_path("mcpservers", "a"))]
