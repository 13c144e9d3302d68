"""Kubernetes Events (core/v1) with deterministic names, so a retried transition never duplicates one."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import AlreadyExists, KubeAPIError
from kubechain.models import Resource

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]
MAX_MESSAGE = 1024


def event_name(object_name: str, uid: str, reason: str, key: str) -> str:
    digest = hashlib.sha256(f"{uid}/{reason}/{key}".encode()).hexdigest()[:16]
    return f"{object_name[:200]}.{digest}"


class EventRecorder:
    """Posts Events about KubeChain objects. Best effort: a failure is logged, never raised."""

    def __init__(self, client: KubeClient, controller: str, instance: str) -> None:
        self._client = client
        self.controller = controller
        self.instance = instance

    def emit(
        self,
        obj: Resource[Any, Any],
        event_type: EventType,
        reason: str,
        message: str,
        *,
        key: str,
        component: str | None = None,
    ) -> None:
        """Record ``reason`` on ``obj``. ``key`` names the transition (e.g. the resourceVersion the
        transition produced): the same (object, reason, key) always maps to the same Event name."""
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": event_name(obj.name, obj.uid, reason, key),
                "namespace": obj.namespace,
            },
            "involvedObject": {
                "apiVersion": obj.api_version,
                "kind": obj.KIND,
                "name": obj.name,
                "namespace": obj.namespace,
                "uid": obj.uid,
                "resourceVersion": obj.resource_version,
            },
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "type": event_type,
            "source": {"component": component or self.controller},
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "count": 1,
            "action": reason,
            "reportingComponent": self.controller,
            "reportingInstance": self.instance[:128],
        }
        try:
            self._client.create_event(obj.namespace, body)
        except AlreadyExists:
            pass
        except KubeAPIError as exc:
            log.warning("could not record event %s on %s/%s: %s", reason, obj.KIND, obj.name, exc)
