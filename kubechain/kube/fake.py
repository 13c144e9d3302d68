"""An in-memory API server behind :class:`KubeClient`'s transport boundary, for fast unit tests.

It emulates what our correctness rests on: resourceVersion preconditions (409), the status subresource
(a /status write cannot change spec and vice versa), AlreadyExists on create, label selectors, generation
bumps on spec changes, owner-reference garbage collection on delete, the API server's 422 for an
invalid object name or label value, its 413 for a request body over 3 MiB, and its 500 for an object
over etcd's 1.5 MiB.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from kubechain.kube.client import KubeClient
from kubechain.kube.connection import ClusterConnection
from kubechain.kube.errors import ETCD_TOO_LARGE, error_for
from kubechain.models.base import merge_patch, stored_json_bytes

# apimachinery's validation: DNS-1123 subdomain names, and label values of at most 63 characters.
# DNS-1123 subdomain, as the API server checks it: dot-separated labels, each alphanumeric at both ends.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


MAX_REQUEST_BYTES = 3 * 1024 * 1024  # kube-apiserver's limit on a request body
MAX_STORED_BYTES = 1536 * 1024  # etcd's default --max-request-bytes: the stored object must fit


def _check_stored_size(obj: dict[str, Any]) -> None:
    if stored_json_bytes(obj) > MAX_STORED_BYTES:  # measured as kube-apiserver writes it (Go's JSON)
        # what kube-apiserver answers when etcd refuses the object (checked against v1.33)
        raise error_for(500, {"reason": "InternalError", "message": ETCD_TOO_LARGE})


def metadata_problems(meta: dict[str, Any]) -> list[str]:
    """What the API server would reject in ``meta`` (its 422 messages, shortened)."""
    problems = []
    name = str(meta.get("name") or "")
    if name and (len(name) > 253 or not _NAME.match(name)):
        problems.append(
            f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of "
            "lower case alphanumeric characters, '-' or '.', and must be no more than 253 characters"
        )
    for key, value in (meta.get("labels") or {}).items():
        label = str(key).rpartition("/")[2]
        if len(label) > 63 or not _LABEL_NAME.match(label):
            problems.append(f"metadata.labels: Invalid value: {key!r}: name part must be a valid label name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(
                f"metadata.labels: Invalid value: {value!r}: must be no more than 63 characters, "
                "and begin and end with an alphanumeric character"
            )
    return problems


def _invalid(kind: str, name: str, problems: list[str]) -> Exception:
    message = f'{kind} "{name}" is invalid: ' + ", ".join(problems)
    return error_for(422, {"reason": "Invalid", "message": message})


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class FakeKubeClient(KubeClient):
    def __init__(self) -> None:
        super().__init__(
            ClusterConnection(host="http://fake.invalid", verify=False, cert=None), qps=1e6, burst=10**6
        )
        self._lock = threading.RLock()
        self._rv = itertools.count(1)
        # (api prefix, plural, namespace, name) -> object
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.request_params: list[dict[str, Any]] = []  # each request's query parameters, in order

    # -- helpers for tests -------------------------------------------------------------------------

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        import base64

        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/secrets",
            body={"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded},
        )

    def events(self, namespace: str = "default") -> list[dict[str, Any]]:
        with self._lock:
            items = [
                obj
                for (prefix, plural, ns, _), obj in self.objects.items()
                if plural == "events" and ns == namespace
            ]
        return sorted(items, key=lambda event: int(event["metadata"]["resourceVersion"]))

    def event_reasons(self, name: str, namespace: str = "default") -> list[str]:
        return [e["reason"] for e in self.events(namespace) if e["involvedObject"]["name"] == name]

    # -- the transport -----------------------------------------------------------------------------

    @staticmethod
    def _parse(path: str) -> tuple[str, str, str | None, str | None, str | None]:
        # split, then decoded: a name is one segment, percent-encoded (path_segment)
        parts = [unquote(part) for part in path.strip("/").split("/")]
        if parts[0] == "api":
            prefix, rest = "/".join(parts[:2]), parts[2:]
        else:
            prefix, rest = "/".join(parts[:3]), parts[3:]
        namespace = None
        if rest and rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        return prefix, plural, namespace, name, sub

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str | None = None,
    ) -> dict[str, Any]:
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.6-fake"}
        if body is not None and len(json.dumps(body).encode()) > MAX_REQUEST_BYTES:
            raise error_for(
                413,
                {"reason": "RequestEntityTooLarge", "message": "Request entity too large: limit is 3145728"},
            )
        with self._lock:
            self.requests.append((method, path))
            self.request_params.append(dict(params or {}))
            prefix, plural, namespace, name, sub = self._parse(path)
            params = params or {}
            if method == "GET" and name is None:
                items = [
                    copy.deepcopy(obj)
                    for (p, pl, ns, _), obj in sorted(self.objects.items())
                    if p == prefix
                    and pl == plural
                    and (namespace is None or ns == namespace)
                    and _matches(obj["metadata"].get("labels") or {}, params.get("labelSelector"))
                ]
                metadata: dict[str, Any] = {"resourceVersion": str(next(self._rv))}
                if params.get("limit"):  # pages, as the API server serves them (offset as the token)
                    start, limit = int(params.get("continue") or 0), int(params["limit"])
                    if start + limit < len(items):
                        metadata["continue"] = str(start + limit)
                    items = items[start : start + limit]
                return {"items": items, "metadata": metadata}
            key = (prefix, plural, namespace or "", name or "")
            if method == "POST":
                return self._create(prefix, plural, namespace or "default", body)
            current = self.objects.get(key)
            if current is None:
                raise error_for(404, {"reason": "NotFound", "message": f'{plural} "{name}" not found'})
            if method == "GET":
                return copy.deepcopy(current)
            if method == "DELETE":
                wanted = ((body or {}).get("preconditions") or {}).get("resourceVersion")
                if wanted and wanted != current["metadata"].get("resourceVersion"):
                    raise error_for(
                        409, {"reason": "Conflict", "message": "Precondition failed: resourceVersion"}
                    )
                self._delete(key)
                return {}
            if method in ("PATCH", "PUT"):
                return self._update(key, current, body, sub, replace=method == "PUT")
        raise error_for(405, {"message": f"{method} not supported by the fake"})

    def _create(self, prefix: str, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise error_for(422, {"message": "metadata.name: Required value"})
        problems = metadata_problems(meta)
        if problems:
            raise _invalid(str(obj.get("kind") or plural), name, problems)
        key = (prefix, plural, namespace, name)
        if key in self.objects:
            raise error_for(409, {"reason": "AlreadyExists", "message": f'{plural} "{name}" already exists'})
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._rv)),
            generation=1,
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        if prefix.startswith("apis/kubechain"):
            obj.pop("status", None)
        _check_stored_size(obj)
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def _delete(self, key: tuple[str, str, str, str]) -> None:
        obj = self.objects.pop(key)
        uid = obj["metadata"]["uid"]
        for child_key, child in list(self.objects.items()):
            owners = child["metadata"].get("ownerReferences") or []
            if any(owner.get("uid") == uid for owner in owners) and child_key in self.objects:
                self._delete(child_key)

    def _update(
        self,
        key: tuple[str, str, str, str],
        current: dict[str, Any],
        body: dict[str, Any],
        sub: str | None,
        *,
        replace: bool,
    ) -> dict[str, Any]:
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise error_for(
                409,
                {
                    "reason": "Conflict",
                    "message": "the object has been modified; please apply your changes to the latest version and try again",
                },
            )
        updated = copy.deepcopy(body) if replace else merge_patch(current, body)
        if sub == "status":
            updated = {**copy.deepcopy(current), "status": updated.get("status")}
        elif key[0].startswith("apis/kubechain"):
            updated["status"] = copy.deepcopy(current.get("status"))
            if updated.get("spec") != current.get("spec"):
                updated["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        for field in ("uid", "creationTimestamp", "namespace", "name"):
            updated["metadata"][field] = current["metadata"][field]
        problems = metadata_problems(updated["metadata"])
        if problems:
            raise _invalid(str(current.get("kind") or key[1]), key[3], problems)
        if updated.get("status") is None:
            updated.pop("status", None)
        _check_stored_size(updated)
        updated["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[key] = updated
        return copy.deepcopy(updated)

    def watch_raw(
        self,
        plural: str,
        namespace: str | None,
        resource_version: str,
        timeout_s: int = 300,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        raise NotImplementedError("the fake has no watch; drive the watcher's dispatch logic directly")
