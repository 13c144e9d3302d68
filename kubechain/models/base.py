"""Base classes shared by every KubeChain resource model.

Models hold no I/O. Field names are snake_case in Python and camelCase on the wire (the Kubernetes JSON
convention); irregular wire names (``externalCallID``, ``channelOrUserID``...) carry explicit aliases.
Every field of a kind's spec and status (nested ones too) has a ``Field(description=...)`` written for users:
the generated CRDs carry it, and ``kubectl explain`` shows it (a test fails on a field without one).
"""

from __future__ import annotations

import copy
import json
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

GROUP = "kubechain.humanlayer.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Marks a field the CRD schema lists as required even though the Python model has a default
# (e.g. Message.content: "" is legal, but the key must be present).
SCHEMA_REQUIRED: JsonDict = {"x-kubechain-required": True}
# Marks a free-form object whose keys the API server must keep (JSON schemas, tool arguments).
PRESERVE_UNKNOWN: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: ``patch``'s keys replace ``target``'s, None deletes, objects merge."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Characters Go's encoding/json writes as a 6-byte escape (HTML-safe escaping, on by default), and how
# many bytes more than their UTF-8 that is.
_GO_ESCAPED_EXTRA = {"<": 5, ">": 5, "&": 5, "\u2028": 3, "\u2029": 3}


def stored_json_bytes(value: Any) -> int:
    """The size of ``value`` as kube-apiserver stores it in etcd: Go's encoding/json, compact, UTF-8 as is
    (a lone surrogate becomes U+FFFD, 3 bytes), but ``<``, ``>``, ``&``, U+2028 and U+2029 each written as
    ``\\u003c``... (6 bytes). Python's json.dumps writes those as 1 and 3 bytes: an HTML tool result
    measured so is refused by etcd at a third of its stored size."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    extra = sum(text.count(char) * more for char, more in _GO_ESCAPED_EXTRA.items())
    return len(text.encode("utf-8", "surrogatepass")) + extra


class KubeModel(BaseModel):
    """A fragment of a Kubernetes object: camelCase on the wire, unknown keys ignored on read."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_enum_values=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict the API server expects (aliases, no unset/None fields)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class OwnerReference(KubeModel):
    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ObjectMeta(KubeModel):
    name: str = ""
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    owner_references: list[OwnerReference] = Field(default_factory=list)

    def owned_by(self, uid: str) -> bool:
        """Whether the object with ``uid`` is among this object's owners (a child found under a
        deterministic name is its parent's own only then)."""
        return any(ref.uid == uid for ref in self.owner_references)


SpecT = TypeVar("SpecT", bound=KubeModel)
StatusT = TypeVar("StatusT", bound=KubeModel)


class Resource(KubeModel, Generic[SpecT, StatusT]):
    """A namespaced custom resource of group kubechain.humanlayer.dev/v1alpha1."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""

    api_version: str = API_VERSION
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: SpecT
    status: StatusT
    # The status exactly as the API server sent it, fields this model does not know included (a newer
    # KubeChain's, during a rolling upgrade): a write of the whole status starts from it.
    _wire_status: dict[str, Any] | None = PrivateAttr(default=None)

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Self:
        data = dict(obj)
        data.setdefault("status", {})
        if data.get("status") is None:
            data["status"] = {}
        resource = cls.model_validate(data)
        resource._wire_status = data["status"]
        return resource

    def status_after(self, patch: dict[str, Any]) -> dict[str, Any] | None:
        """The whole status once ``patch`` (wire names; None deletes) is merged into this version's;
        None for a model not read from the API server (its status on the wire is unknown)."""
        if self._wire_status is None:
            return None
        merged: dict[str, Any] = merge_patch(self._wire_status, patch)
        return merged

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def uid(self) -> str:
        return self.metadata.uid or ""

    @property
    def resource_version(self) -> str:
        return self.metadata.resource_version or ""

    def owner_reference(self) -> OwnerReference:
        """An ownerReference making this object the controller of a child (GC cascades)."""
        return OwnerReference(
            api_version=API_VERSION,
            kind=self.KIND,
            name=self.name,
            uid=self.uid,
            controller=True,
            block_owner_deletion=True,
        )
