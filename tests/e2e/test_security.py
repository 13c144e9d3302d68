"""Secrets never leak: not into logs, status, Events or error messages."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import ScriptedLLM, apply, get, phase, resource, secret
from tests.e2e.test_tools import SlowAPI


def test_secret_values_appear_nowhere(
    stack: LocalStack, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    api_key = f"sk-leak-canary-{uuid.uuid4().hex}"
    tool_token = f"tok-leak-canary-{uuid.uuid4().hex}"
    ok_question, bad_question = f"safe run {namespace}", f"failing run {namespace}"
    llm.add_rule(
        ok_question, [{"tool_calls": [{"name": "call_api", "arguments": {"q": 1}}]}, {"content": "fine"}]
    )
    llm.add_rule(bad_question, [{"error": {"status": 401, "message": "Incorrect API key provided"}}])
    api = SlowAPI(0.0)
    try:
        apply(
            kubectl,
            namespace,
            secret("llm-key", {"key": api_key}),
            secret("tool-key", {"token": tool_token}),
            resource(
                "LLM",
                "gpt-4o",
                {"provider": "openai", "apiKeyFrom": {"secretKeyRef": {"name": "llm-key", "key": "key"}}},
            ),
            resource(
                "Tool",
                "call-api",
                {
                    "name": "call_api",
                    "toolType": "externalAPI",
                    "execute": {
                        "externalAPI": {
                            "url": api.url,
                            "credentialsFrom": {"name": "tool-key", "key": "token"},
                        }
                    },
                },
            ),
            resource(
                "Agent",
                "careful",
                {"llmRef": {"name": "gpt-4o"}, "tools": [{"name": "call-api"}], "system": "Be careful."},
            ),
        )
        wait_for(
            lambda: get(kubectl, namespace, "agent", "careful").get("status", {}).get("ready"),
            60,
            what="agent ready",
        )
        apply(
            kubectl,
            namespace,
            resource("TaskRun", "ok", {"agentRef": {"name": "careful"}, "userMessage": ok_question}),
            resource("TaskRun", "bad", {"agentRef": {"name": "careful"}, "userMessage": bad_question}),
        )
        wait_for(lambda: phase(kubectl, namespace, "ok") == "FinalAnswer", 60, what="ok run")
        wait_for(lambda: phase(kubectl, namespace, "bad") == "Failed", 60, what="bad run")
    finally:
        api.server.shutdown()

    everything = []
    for kind in ("llm", "tool", "agent", "taskrun", "taskruntoolcall"):
        everything.append(kubectl("get", kind, "-o", "json", namespace=namespace).stdout)
    everything.append(kubectl("get", "events", "-o", "json", namespace=namespace).stdout)
    for log in Path(stack.logs).glob("*.log"):
        everything.append(log.read_text(errors="replace"))
    text = "\n".join(everything)
    assert "LLM request failed with status 401" in json.dumps(
        get(kubectl, namespace, "taskrun", "bad")["status"]
    )
    assert api_key not in text and api_key[-12:] not in text
    assert tool_token not in text and tool_token[-12:] not in text
