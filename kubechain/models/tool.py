"""Tool: a builtin function, an external HTTP API, or a delegation to another Agent."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field

from kubechain.models.base import PRESERVE_UNKNOWN, KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus, SecretKeyRef

# Why an externalAPI Tool with userinfo in its URL is not used: an HTTP client sends it as Basic auth, and
# the spec (password and all) is read by whoever may read Tools. Said without the URL, which holds them.
CREDENTIALS_IN_URL = (
    'execute.externalAPI.url holds credentials ("user:password@" before its host), which are never sent: '
    "put them in a Secret and name it in execute.externalAPI.credentialsFrom (its value is sent as "
    '"Authorization: Bearer <value>"), or in the query if the API takes a key there'
)
# a URL's authority: after "scheme://", up to the first "/", "?" or "#" (as httpx and urlsplit read it)
_AUTHORITY = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://(?P<authority>[^/?#]*)")


def url_has_userinfo(url: str) -> bool:
    """Whether ``url`` has userinfo (``user:password@``, or a token as the user) before its host."""
    found = _AUTHORITY.match(url)
    return found is not None and "@" in found.group("authority")


class BuiltinToolSpec(KubeModel):
    name: Literal["add", "subtract", "multiply", "divide"] | None = None


class ExternalAPISpec(KubeModel):
    url: str | None = None
    method: str | None = None
    requires_approval: bool | None = None
    credentials_from: SecretKeyRef | None = None
    timeout_seconds: int | None = Field(default=None, ge=1)


class ToolExecute(KubeModel):
    builtin: BuiltinToolSpec | None = None
    external_api: ExternalAPISpec | None = Field(default=None, alias="externalAPI")


class ToolSpec(KubeModel):
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, json_schema_extra=PRESERVE_UNKNOWN)
    arguments: dict[str, Any] | None = Field(default=None, json_schema_extra=PRESERVE_UNKNOWN)
    tool_type: Literal["function", "delegateToAgent", "externalAPI"] | None = None
    execute: ToolExecute | None = None
    agent_ref: LocalObjectReference | None = None
    idempotent: bool | None = None

    def function_name(self, metadata_name: str) -> str:
        return self.name or metadata_name


class ToolStatus(ReadyStatus):
    pass


class Tool(Resource[ToolSpec, ToolStatus]):
    KIND: ClassVar[str] = "Tool"
    PLURAL: ClassVar[str] = "tools"
    spec: ToolSpec = Field(default_factory=ToolSpec)
    status: ToolStatus = Field(default_factory=ToolStatus)
