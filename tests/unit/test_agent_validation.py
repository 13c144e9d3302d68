"""An Agent is Ready only if every function name it would offer its LLM can be used (pure planning)."""

from __future__ import annotations

from typing import Any

import pytest

from kubechain.models import LLM, Agent, ContactChannel, MCPServer, Task, Tool
from kubechain.statemachines.toolset import mcp_tool_name, resolve_tool_name, tool_definitions
from kubechain.statemachines.validation import FUNCTION_NAME, AgentDependencies, plan_agent, plan_task


def agent(**spec: Any) -> Agent:
    return Agent.model_validate(
        {
            "metadata": {"name": "a", "namespace": "default", "generation": 1},
            "spec": {"llmRef": {"name": "m"}, "system": "be brief", **spec},
        }
    )


def ready(model: Any, name: str, spec: dict[str, Any], status: dict[str, Any]) -> Any:
    return model.model_validate(
        {"metadata": {"name": name, "namespace": "default", "generation": 1}, "spec": spec, "status": status}
    )


LLM_READY = ready(LLM, "m", {"provider": "openai"}, {"status": "Ready", "ready": True})


def tool(name: str, function: str | None = None) -> Tool:
    spec = {"toolType": "function", "execute": {"builtin": {"name": "add"}}} | (
        {"name": function} if function else {}
    )
    return ready(Tool, name, spec, {"ready": True, "status": "Ready"})


def server(name: str, *tools: str) -> MCPServer:
    return ready(
        MCPServer,
        name,
        {"transport": "stdio", "command": "x"},
        {
            "connected": True,
            "status": "Ready",
            "tools": [{"name": t, "inputSchema": {"type": "object"}} for t in tools],
        },
    )


def status_of(a: Agent, deps: AgentDependencies) -> dict[str, Any]:
    transition = plan_agent(a, deps)
    assert transition is not None
    return transition.status


def test_usable_names_make_a_ready_agent() -> None:
    a = agent(tools=[{"name": "calc"}], mcpServers=[{"name": "fetch"}], subAgents=[{"name": "helper"}])
    deps = AgentDependencies(
        LLM_READY,
        tools={"calc": tool("calc", "add")},
        mcp_servers={"fetch": server("fetch", "fetch")},
        sub_agents={"helper": agent()},
    )
    assert status_of(a, deps)["ready"] is True


def test_a_name_the_llm_apis_refuse_is_an_error_naming_what_to_rename() -> None:
    long_agent = "customer-support-escalation-specialist-agent-v2"  # delegate_to_agent__... is 66 long
    a = agent(tools=[{"name": "web.search"}], subAgents=[{"name": long_agent}])
    deps = AgentDependencies(
        LLM_READY, tools={"web.search": tool("web.search")}, sub_agents={long_agent: agent()}
    )
    status = status_of(a, deps)
    assert status["ready"] is False and status["status"] == "Error"
    detail = status["statusDetail"]
    assert 'Tool "web.search" would be offered to the LLM as "web.search"' in detail and "spec.name" in detail
    assert f'sub-agent "{long_agent}"' in detail and "at most 64 characters" in detail


def test_one_name_offered_twice_is_an_error() -> None:
    a = agent(
        tools=[{"name": "calc"}, {"name": "add"}],
        mcpServers=[{"name": "crm"}],
        humanContactChannels=[{"name": "crm"}],
    )
    channel = ready(
        ContactChannel,
        "crm",
        {
            "type": "email",
            "apiKeyFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
            "email": {"address": "a@example.com"},
        },
        {"ready": True, "status": "Ready"},
    )
    deps = AgentDependencies(
        LLM_READY,
        tools={"calc": tool("calc", "add"), "add": tool("add")},
        mcp_servers={"crm": server("crm", "human_contact_email")},
        channels={"crm": channel},
    )
    detail = status_of(a, deps)["statusDetail"]
    assert 'Tool "calc" and Tool "add" are both offered to the LLM as "add"' in detail
    assert 'MCPServer "crm" tool "human_contact_email" and ContactChannel "crm"' in detail


def test_an_mcp_tool_name_the_llm_apis_refuse_is_offered_under_a_valid_name() -> None:
    """The MCP spec allows "." and 128 characters in a tool name, an LLM function name neither: one such
    tool put the whole Agent in Error (none of its tools usable) while its MCPServer was Ready. It is
    offered under a valid name of its own, stable, and a call of that name finds the tool again."""
    dotted, long = "files.write", "workspace.documents." + "x" * 100
    tools = ["read_file", dotted, "files_write", long, long + "y"]
    fs = server("fs", *tools)
    a = agent(mcpServers=[{"name": "fs"}])
    assert status_of(a, AgentDependencies(LLM_READY, mcp_servers={"fs": fs}))["ready"] is True

    offered = [d.name for d in tool_definitions(a, [], [fs], [], [])]
    assert offered[:3] == ["fs__read_file", offered[1], "fs__files_write"], "valid names stay as they are"
    assert offered[1].startswith("fs__files_write_") and offered[3].startswith("fs__workspace_documents_xxx")
    assert all(FUNCTION_NAME.fullmatch(name) for name in offered) and len(set(offered)) == len(tools)
    assert (
        offered == [d.name for d in tool_definitions(a, [], [server("fs", *reversed(tools))], [], [])][::-1]
    )
    for name, tool_name in zip(offered, tools, strict=True):
        target = resolve_tool_name(name, {"fs"})
        assert (target.kind, target.name) == ("mcp", "fs")
        assert mcp_tool_name("fs", target.tool, tools) == tool_name

    # The server's own name is not changed: one the LLM APIs refuse is still the user's to fix.
    renamed = ready(MCPServer, "file.store", {"transport": "stdio", "command": "x"}, fs.status.to_wire())
    detail = status_of(
        agent(mcpServers=[{"name": "file.store"}]),
        AgentDependencies(LLM_READY, mcp_servers={"file.store": renamed}),
    )["statusDetail"]
    assert (
        'MCPServer "file.store" tool "read_file" would be offered to the LLM as "file.store__read_file"'
        in detail
    )


def test_missing_dependencies_are_named_as_the_original_names_them() -> None:
    """The original's tests look for `"nonexistent-llm" not found` (its client's NotFound text)."""
    a = agent(tools=[{"name": "nonexistent-tool"}])
    a.spec.llm_ref.name = "nonexistent-llm"
    detail = status_of(a, AgentDependencies(None))["statusDetail"]
    assert (
        'failed to get LLM "nonexistent-llm": llms.kubechain.humanlayer.dev "nonexistent-llm" not found'
        in detail
    )
    assert '"nonexistent-tool" not found' in detail
    task = Task.model_validate(
        {
            "metadata": {"name": "t", "namespace": "default", "generation": 1},
            "spec": {"agentRef": {"name": "nonexistent-agent"}, "message": "hi"},
        }
    )
    transition = plan_task(task, None)
    assert transition is not None and '"nonexistent-agent" not found' in transition.status["statusDetail"]
    assert transition.status["status"] == "Error"


def test_a_task_does_not_start_its_run_on_an_agent_edited_since_it_was_validated() -> None:
    task = Task.model_validate(
        {
            "metadata": {"name": "t", "namespace": "default", "generation": 1},
            "spec": {"agentRef": {"name": "a"}, "message": "hi"},
        }
    )
    edited = ready(Agent, "a", {"llmRef": {"name": "m"}, "system": "s"}, {"ready": True, "status": "Ready"})
    edited.metadata.generation, edited.status.observed_generation = 2, 1
    waiting = plan_task(task, edited)
    assert waiting is not None and (waiting.status["status"], waiting.status["ready"]) == ("Pending", False)
    assert waiting.status["statusDetail"] == 'agent "a" is not ready: its spec changed since it was validated'
    edited.status.observed_generation = 2
    validated = plan_task(task, edited)
    assert validated is not None and validated.status["status"] == "Ready"


def delegating_tool(name: str, agent_name: str) -> Tool:
    spec = {"toolType": "delegateToAgent", "agentRef": {"name": agent_name}}
    return ready(Tool, name, spec, {"ready": True, "status": "Ready"})


def test_a_delegating_tool_whose_agent_does_not_exist_keeps_its_agent_pending() -> None:
    """As for spec.subAgents: the Agent was Ready, and each call of the Tool started a run that waited
    "for Agent to exist" until the start timeout (15 min), its parent run with it."""
    a = agent(tools=[{"name": "ask"}])
    missing = status_of(a, AgentDependencies(LLM_READY, tools={"ask": delegating_tool("ask", "helpr")}))
    assert missing["ready"] is False and missing["status"] == "Pending", missing
    assert (
        'waiting for sub-agent "helpr" (not found), which tool "ask" delegates to' in missing["statusDetail"]
    )
    assert missing["validTools"] == []
    there = AgentDependencies(
        LLM_READY, tools={"ask": delegating_tool("ask", "helpr")}, sub_agents={"helpr": agent()}
    )
    assert status_of(a, there)["ready"] is True


def test_a_delegating_tool_whose_agent_ref_is_not_an_agent_name_is_an_error() -> None:
    """It was Ready, and a call of it was refused by the API server (422) as its run's name."""
    from kubechain.statemachines.validation import validate_tool_spec

    for bad in ("Research_Bot", "research bot", "-helper", "a" * 254):
        problem = validate_tool_spec(delegating_tool("ask", bad))
        assert problem is not None and "agentRef.name" in problem and "not a valid Agent name" in problem
    for good in ("helper", "research.bot-2", "a" * 253):
        assert validate_tool_spec(delegating_tool("ask", good)) is None


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("https://user:secret@api.example/v1/x", True),
        ("https://ghp_0123456789abcdef@api.example/v1/x", True),  # a token as the user
        ("http://:secret@svc:8080/x", True),
        ("https://api.example/v1/models/claude@20241022?email=a@b.example#c@d", False),
        ("http://svc/x?e=a@b", False),
    ],
)
def test_an_external_api_tool_with_credentials_in_its_url_is_refused(url: str, refused: bool) -> None:
    """What comes before "@" in the URL's authority is sent as HTTP Basic auth; an "@" after it is not."""
    from kubechain.statemachines.validation import validate_tool_spec

    problem = validate_tool_spec(ready(Tool, "t", {"execute": {"externalAPI": {"url": url}}}, {}))
    if refused:
        assert problem is not None and "put them in a Secret" in problem, problem
        assert "secret@" not in problem and "ghp_" not in problem, problem
    else:
        assert problem is None, problem


# URLs an HTTP client cannot send requests to, each with what its refusal says (shared with the LLM and
# MCPServer validations' tests). They were found only when called, in the client's words (httpx's
# "Request URL is missing an 'http://' or 'https://' protocol", a DNS error for a host with a space).
MALFORMED_URLS = [
    ("api.example.com/v1/search", "has no scheme: start it with https:// or http://"),
    ("localhost:8080/search", "has no scheme: start it with https:// or http://"),
    ("ftp://files.example.com/search", "has scheme ftp://, not http:// or https://"),
    ("https:///search", "has no host"),
    ("http://:8080/search", "has no host"),
    (" https://api.example.com/search", "starts or ends with a space: remove it"),
    ("https://api.example.com/search\n", "has a character that is not printable (a line break or a tab?) at"),
    ("https://api.exa mple.com/search", "has a space in its host"),
    ("https://api.example.com:99999/search", "has a port that is no number from 1 to 65535"),
    ("https://api.example.com:8o8o/search", "has a port that is no number from 1 to 65535"),
    ("http://[::1/search", 'has an IPv6 host without its closing "]"'),
]
WELL_FORMED_URLS = [
    "https://api.example.com/v1/search",
    "http://svc:8080/x?e=a@b",
    "HTTPS://API.EXAMPLE.COM/v1",
    "http://[::1]:8080/v1",
    "https://bücher.example/v1",
    "https://api.example.com/my search?q=a b",  # a space in a path or query is sent as %20
]


@pytest.mark.parametrize(("url", "said"), MALFORMED_URLS)
def test_an_external_api_tool_with_a_malformed_url_is_refused_saying_what_to_fix(url: str, said: str) -> None:
    """It was Ready, and every call of it failed in the HTTP client's words."""
    from kubechain.statemachines.validation import validate_tool_spec

    problem = validate_tool_spec(ready(Tool, "t", {"execute": {"externalAPI": {"url": url}}}, {}))
    assert problem is not None and problem.startswith(f"execute.externalAPI.url {said}"), problem


@pytest.mark.parametrize("url", WELL_FORMED_URLS)
def test_an_external_api_tool_with_a_url_a_client_can_send_to_is_taken(url: str) -> None:
    from kubechain.statemachines.validation import validate_tool_spec

    assert validate_tool_spec(ready(Tool, "t", {"execute": {"externalAPI": {"url": url}}}, {})) is None


@pytest.mark.parametrize(
    "function",
    [
        "delegate_to_agent__billing",
        "ops__human_contact",
        "ops__human_contact_email",
        "ops__human_contact_slack",
    ],
)
def test_a_tool_named_as_a_delegation_or_a_human_contact_is_refused(function: str) -> None:
    """A call of it went to a sub-agent or a contact channel, never to the Tool: offered to the LLM (its
    Agent Ready), it failed every time."""
    from kubechain.statemachines.validation import validate_tool_spec

    problem = validate_tool_spec(tool("t", function))
    assert problem is not None and f'"{function}"' in problem and "is reserved" in problem, problem
    assert validate_tool_spec(tool("t", "ops__human_contacts")) is None, "only the exact forms are reserved"


def test_a_tool_named_as_a_tool_of_the_agents_mcp_server_is_an_error() -> None:
    """A call of "gh__create" went to MCP server "gh" (as its tool "create"), never to the Tool."""
    a = agent(tools=[{"name": "create-issue"}, {"name": "other"}], mcpServers=[{"name": "gh"}])
    deps = AgentDependencies(
        LLM_READY,
        tools={"create-issue": tool("create-issue", "gh__create"), "other": tool("other", "jira__create")},
        mcp_servers={"gh": server("gh", "list")},
    )
    status = status_of(a, deps)
    assert status["ready"] is False and status["status"] == "Error"
    detail = status["statusDetail"]
    assert 'Tool "create-issue" would be offered to the LLM as "gh__create"' in detail, detail
    assert 'MCPServer "gh"' in detail and "jira__create" not in detail, detail
    # and so whatever the server lists, connected or not
    deps.mcp_servers["gh"] = None
    assert 'Tool "create-issue" would be offered' in status_of(a, deps)["statusDetail"]
