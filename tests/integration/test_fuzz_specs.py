"""Fuzzed specs on the real API server: the schema rejects them, or validation gives a clear status.
Never a crash."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubechain.kube.errors import Invalid, KubeAPIError
from kubechain.llm.base import LLMResponse
from kubechain.queueing import ResourceMessage
from tests.unit.fakes import FakeLLM, context
from workers.validators import validate

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.text(max_size=12),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
ref = st.one_of(st.fixed_dictionaries({"name": st.sampled_from(["x", "gpt-4o", "", "missing"])}), json_values)

SPECS: dict[str, Any] = {
    "LLM": st.fixed_dictionaries(
        {"provider": st.sampled_from(["openai", "anthropic", "foo", ""])},
        optional={
            "apiKeyFrom": st.one_of(
                st.fixed_dictionaries(
                    {
                        "secretKeyRef": st.fixed_dictionaries(
                            {"name": st.text(max_size=8), "key": st.text(max_size=8)}
                        )
                    }
                ),
                json_values,
            ),
            "temperature": st.one_of(st.sampled_from(["0.5", "1", "1.5", "abc"]), json_values),
            "maxTokens": st.one_of(st.integers(-3, 5000), json_values),
            "parameters": st.one_of(
                st.fixed_dictionaries(
                    {}, optional={"model": st.text(max_size=8), "baseUrl": st.text(max_size=20)}
                ),
                json_values,
            ),
        },
    ),
    "Tool": st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(max_size=10),
            "toolType": st.sampled_from(["function", "delegateToAgent", "externalAPI", "bogus"]),
            "parameters": json_values,
            "execute": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "builtin": st.fixed_dictionaries(
                            {}, optional={"name": st.sampled_from(["add", "pow"])}
                        )
                    },
                ),
                json_values,
            ),
            "agentRef": ref,
        },
    ),
    "Agent": st.fixed_dictionaries(
        {"llmRef": ref, "system": st.one_of(st.text(max_size=10), json_values)},
        optional={
            "tools": st.lists(ref, max_size=2),
            "mcpServers": st.lists(ref, max_size=2),
            "subAgents": st.lists(ref, max_size=2),
        },
    ),
    "Task": st.fixed_dictionaries({"agentRef": ref, "message": st.one_of(st.text(max_size=10), json_values)}),
}
PLURAL = {"LLM": "llms", "Tool": "tools", "Agent": "agents", "Task": "tasks"}
names = (f"fuzz-{i}" for i in itertools.count())


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_specs_are_rejected_or_get_a_clear_status(
    data: st.DataObject, kube: Any, namespace: str
) -> None:
    kind = data.draw(st.sampled_from(sorted(SPECS)))
    spec = data.draw(SPECS[kind])
    name = next(names)
    body = {
        "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }
    try:
        kube.create_raw(PLURAL[kind], namespace, body)
    except Invalid:
        return  # the schema said no, with a message kubectl shows
    except KubeAPIError as exc:
        assert exc.status == 400, exc  # strict decoding of a wrongly-typed field
        return
    ctx = context(kube, FakeLLM(lambda request: LLMResponse(content="ok")))
    validate(ctx, ResourceMessage(kind=kind, namespace=namespace, name=name))
    status = kube.get_raw(PLURAL[kind], namespace, name).get("status") or {}
    assert status.get("status") in ("Ready", "Error", "Pending"), status
    assert status.get("statusDetail"), status


def test_urls_no_client_can_send_to_are_errors_with_an_event_on_the_api_server(
    kube: Any, namespace: str
) -> None:
    """An LLM's baseUrl, an externalAPI Tool's url and an MCPServer's url, stored by the real API server
    (its schema takes any string), are refused by their validation: Error, saying what to fix without
    quoting the credentials, and a ValidationFailed Event."""
    specs = {
        ("LLM", "llms", "llm"): {
            "provider": "openai",
            "parameters": {"model": "m", "baseUrl": "https://bot:s3cret@llm.example/v1"},
        },
        ("Tool", "tools", "tool"): {"execute": {"externalAPI": {"url": "api.example.com/v1/search"}}},
        ("MCPServer", "mcpservers", "mcp"): {"transport": "http", "url": "http://[::1/mcp"},
    }
    said = {
        "llm": 'spec.parameters.baseUrl holds credentials ("user:password@" before its host)',
        "tool": "execute.externalAPI.url has no scheme: start it with https:// or http://",
        "mcp": 'Validation failed: url has an IPv6 host without its closing "]"',
    }
    ctx = context(kube, FakeLLM(lambda request: LLMResponse(content="ok")))
    for (kind, plural, name), spec in specs.items():
        body = {"apiVersion": "kubechain.humanlayer.dev/v1alpha1", "kind": kind, "metadata": {"name": name}}
        kube.create_raw(plural, namespace, body | {"spec": spec})
        validate(ctx, ResourceMessage(kind=kind, namespace=namespace, name=name))
        status = kube.get_raw(plural, namespace, name)["status"]
        assert status["status"] == "Error" and status["statusDetail"].startswith(said[name]), status
        assert "s3cret" not in str(status)
    ctx.events.flush()
    failed = {
        event["involvedObject"]["name"]: event["message"]
        for event in kube.list_events(namespace)
        if event["reason"] == "ValidationFailed"
    }
    assert sorted(failed) == ["llm", "mcp", "tool"], failed
    assert all("s3cret" not in text for text in failed.values()), failed
