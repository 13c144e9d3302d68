"""Reading Secret values for MCPServer env vars and headers through the Kubernetes client."""

from __future__ import annotations

from typing import Protocol

from kubechain.kube.errors import NotFound
from kubechain.mcp.spec import SecretResolver


class SecretReader(Protocol):
    """A KubeClient, or anything with its ``read_secret`` (e.g. a short-TTL read cache)."""

    def read_secret(self, namespace: str, name: str) -> dict[str, str]: ...


class SecretNotResolvable(Exception):
    """A Secret or one of its keys is missing (the message names them, never a value)."""


def kube_secret_resolver(kube: SecretReader) -> SecretResolver:
    """resolve_secret(namespace, name, key) for MCPManager. Other API errors (e.g. Unavailable) propagate
    as the manager's MCPError cause, so callers can tell a transient failure from a missing secret."""

    def resolve(namespace: str, name: str, key: str) -> str:
        try:
            data = kube.read_secret(namespace, name)
        except NotFound:
            raise SecretNotResolvable(f'secret "{name}" not found in namespace "{namespace}"') from None
        if key not in data:
            raise SecretNotResolvable(f'key "{key}" not found in secret "{name}"')
        return data[key]

    return resolve
