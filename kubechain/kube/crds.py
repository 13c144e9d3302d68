"""Install (create or update) CustomResourceDefinitions and wait until they are Established."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import AlreadyExists, Conflict

CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def load_crds(directory: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


# Updates of one CRD tried, each after a fresh read: a conflict means another writer updated it meanwhile.
UPDATE_ATTEMPTS = 5


def apply_crds(kube: KubeClient, crds: list[dict[str, Any]], timeout_s: float = 60.0) -> None:
    """Create or update each CRD, then wait until all are Established. An update that still conflicts
    after UPDATE_ATTEMPTS raises Conflict: the CRD there is not the one given, however Established."""
    for crd in crds:
        name = crd["metadata"]["name"]
        for attempt in range(1, UPDATE_ATTEMPTS + 1):
            try:
                kube.request("POST", CRD_PATH, body=crd)
                break
            except AlreadyExists:
                current = kube.request("GET", f"{CRD_PATH}/{name}")
                body = {
                    **crd,
                    "metadata": {
                        **crd["metadata"],
                        "resourceVersion": current["metadata"]["resourceVersion"],
                    },
                }
                try:
                    kube.request("PUT", f"{CRD_PATH}/{name}", body=body)
                    break
                except Conflict:
                    if attempt == UPDATE_ATTEMPTS:
                        raise
                    continue
    deadline = time.monotonic() + timeout_s
    for crd in crds:
        name = crd["metadata"]["name"]
        while True:
            current = kube.request("GET", f"{CRD_PATH}/{name}")
            conditions = (current.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout_s:.0f}s")
            time.sleep(0.1)
