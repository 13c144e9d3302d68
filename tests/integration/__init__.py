"""Integration tests: the real API server (and Redis, workers) started by the harness."""

from __future__ import annotations

import base64
from typing import Any


def create_secret(kube: Any, namespace: str, name: str, data: dict[str, str]) -> None:
    """Create a Secret holding ``data`` (plain text values) through the real API server's client."""
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=body)
