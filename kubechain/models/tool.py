"""Tool: a builtin function, an external HTTP API, or a delegation to another Agent."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kubechain.models.base import PRESERVE_UNKNOWN, KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus, SecretKeyRef
from kubechain.models.urls import credentials_in_url

# Why an externalAPI Tool with userinfo in its URL is not used: an HTTP client sends it as Basic auth, and
# the spec (password and all) is read by whoever may read Tools. Said without the URL, which holds them.
CREDENTIALS_IN_URL = credentials_in_url(
    "execute.externalAPI.url",
    "put them in a Secret and name it in execute.externalAPI.credentialsFrom (its value is sent as "
    '"Authorization: Bearer <value>"), or in the query if the API takes a key there',
)


class BuiltinToolSpec(KubeModel):
    name: Literal["add", "subtract", "multiply", "divide"] | None = Field(
        default=None,
        description="The function: add, subtract, multiply or divide, of the number arguments a and b.",
    )


class ExternalAPISpec(KubeModel):
    url: str | None = Field(
        default=None,
        description="The URL called; the Tool is in Error without it. Credentials in it "
        "(user:password@host) make the Tool Error too: name a Secret in credentialsFrom instead.",
    )
    method: str | None = Field(
        default=None,
        description="The HTTP method, default POST. GET and DELETE send the arguments in the query, others "
        "as a JSON body; the response body is the call's result.",
    )
    requires_approval: bool | None = Field(
        default=None,
        description="true: each call waits in AwaitingHumanApproval until a person approves or rejects it "
        "with kubectl (the kubechain.humanlayer.dev/approval annotation).",
    )
    credentials_from: SecretKeyRef | None = Field(
        default=None,
        description='A Secret key whose value is sent as the header "Authorization: Bearer <value>".',
    )
    timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        description="How long the whole request may take, headers and body included. Default: the workers' "
        "KUBECHAIN_TOOL_TIMEOUT_S (120); at most KUBECHAIN_CLAIM_TIMEOUT_S less 30 s (150).",
    )


class ToolExecute(KubeModel):
    builtin: BuiltinToolSpec | None = Field(default=None, description="A builtin arithmetic function.")
    external_api: ExternalAPISpec | None = Field(
        default=None, alias="externalAPI", description="An HTTP request to an external API."
    )


class ToolSpec(KubeModel):
    name: str | None = Field(
        default=None,
        description="The function name the LLM calls the tool by; default the Tool's metadata.name. Letters, "
        "digits, _ and -, at most 64 characters; names starting with delegate_to_agent__ or ending in "
        "__human_contact (_slack, _email) are reserved.",
    )
    description: str | None = Field(default=None, description="What the tool does, as the LLM is told.")
    parameters: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra=PRESERVE_UNKNOWN,
        description="The JSON schema (type object) of the arguments, passed to the LLM whole; one without a "
        "type is sent as type object.",
    )
    arguments: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra=PRESERVE_UNKNOWN,
        description="Kept from the original API and not used.",
    )
    tool_type: Literal["function", "delegateToAgent", "externalAPI"] | None = Field(
        default=None,
        description="function (a builtin), delegateToAgent or externalAPI. Only read when none of "
        "execute.builtin, agentRef and execute.externalAPI is set: otherwise the first of them set decides.",
    )
    execute: ToolExecute | None = Field(default=None, description="What a call runs: set one of its fields.")
    agent_ref: LocalObjectReference | None = Field(
        default=None,
        description="Delegation: each call starts a run of this Agent (a sub-agent) with the call's message "
        "argument, and its final answer is the call's result.",
    )
    idempotent: bool | None = Field(
        default=None,
        description="true: a call whose worker was lost mid-execution is run again (once). Default false: "
        "such a call fails, and the LLM is told so. Builtins are always run again.",
    )

    def function_name(self, metadata_name: str) -> str:
        return self.name or metadata_name


class ToolStatus(ReadyStatus):
    pass


class Tool(Resource[ToolSpec, ToolStatus]):
    KIND: ClassVar[str] = "Tool"
    PLURAL: ClassVar[str] = "tools"
    spec: ToolSpec = Field(default_factory=ToolSpec)
    status: ToolStatus = Field(default_factory=ToolStatus)
