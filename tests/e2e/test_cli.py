"""The ``kubechain`` CLI as a user runs it (a subprocess, KUBECONFIG in the environment) against the real
stack: API server, watcher and worker processes, scripted LLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import (
    ADD_TOOL,
    OPENAI_SECRET,
    ScriptedLLM,
    apply,
    deploy_tool,
    get,
    llm_resource,
    resource,
)
from tests.e2e.test_tools import SlowAPI


def cli(
    kubeconfig: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kubechain.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def in_order(lines: list[str], expected_prefixes: list[str]) -> None:
    """Each expected prefix starts some line, after the line the previous one matched."""
    position = 0
    for prefix in expected_prefixes:
        for index in range(position, len(lines)):
            if lines[index].startswith(prefix):
                position = index + 1
                break
        else:
            raise AssertionError(
                f"no line starting {prefix!r} after line {position} in:\n" + "\n".join(lines)
            )


def created_name(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if line.startswith("taskrun.kubechain.humanlayer.dev/"))
    return line.split("/", 1)[1].split()[0]


def setup_calculator(kubeconfig: Path, kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, ADD_TOOL)
    result = ok(
        cli(
            kubeconfig,
            "create",
            "llm",
            "gpt-4o",
            "--provider",
            "openai",
            "--api-key",
            "sk-x",
            "-n",
            namespace,
        )
    )
    assert result.stdout.splitlines() == [
        "secret/gpt-4o-api-key created",
        "llm.kubechain.humanlayer.dev/gpt-4o created",
    ]
    llm = get(kubectl, namespace, "llm", "gpt-4o")
    assert llm["spec"]["apiKeyFrom"] == {"secretKeyRef": {"name": "gpt-4o-api-key", "key": "OPENAI_API_KEY"}}
    result = ok(
        cli(
            kubeconfig,
            "create",
            "agent",
            "calc",
            "--llm",
            "gpt-4o",
            "--system",
            "You add.",
            "--tools",
            "add",
            "-n",
            namespace,
        )
    )
    assert result.stdout.strip() == "agent.kubechain.humanlayer.dev/calc created"
    wait_for(
        lambda: get(kubectl, namespace, "agent", "calc").get("status", {}).get("ready"),
        60,
        what="agent ready",
    )


def test_version() -> None:
    result = ok(
        subprocess.run([sys.executable, "-m", "kubechain.cli", "version"], capture_output=True, text=True)
    )
    assert result.stdout.startswith("kubechain ")


def test_create_run_and_logs(
    stack: LocalStack, kubeconfig: Path, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    setup_calculator(kubeconfig, kubectl, namespace)
    question = f"Add 2 and 3 ({namespace})"
    llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
            {"content_template": "The sum is {last_tool_results}."},
        ],
    )

    result = ok(cli(kubeconfig, "run", "--agent", "calc", question, "-n", namespace))
    name = created_name(result.stderr)
    assert name.startswith("calc-") and len(name) == len("calc-") + 6
    lines = result.stdout.splitlines()
    in_order(
        lines,
        [
            "system: You add.",
            f"user: {question}",
            'tool call add({"a": 2, "b": 3}) [',
            "tool add [",
            "tool result add: 5",
            "assistant: The sum is 5.",
            "final answer: The sum is 5.",
        ],
    )
    assert lines[-1] == "final answer: The sum is 5."
    assert sum(line.startswith("tool result") for line in lines) == 1, "each message is printed once"
    assert any(line.startswith("tool add [") and line.endswith("] Succeeded") for line in lines)

    logs = ok(cli(kubeconfig, "logs", name, "-n", namespace)).stdout.splitlines()
    assert logs == [line for line in lines if not line.endswith(" Running")]

    conversation = json.loads(ok(cli(kubeconfig, "logs", name, "-o", "json", "-n", namespace)).stdout)
    assert conversation["phase"] == "FinalAnswer" and conversation["output"] == "The sum is 5."
    assert [m["role"] for m in conversation["contextWindow"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert [(t["tool"], t["phase"], t["result"]) for t in conversation["toolCalls"]] == [
        ("add", "Succeeded", "5")
    ]

    # the same agent again, printing the final object; the conversation then goes to stderr
    again = f"Add 2 and 3 again ({namespace})"
    llm.add_rule(
        again, [{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}, {"content": "Five."}]
    )
    result = ok(
        cli(kubeconfig, "run", "--agent", "calc", again, "--name", "again", "-o", "yaml", "-n", namespace)
    )
    final = yaml.safe_load(result.stdout)
    assert final["metadata"]["name"] == "again" and final["status"]["phase"] == "FinalAnswer"
    assert final["status"]["output"] == "Five."
    assert "final answer: Five." in result.stderr.splitlines()

    # create refuses to overwrite, --update replaces the spec
    refused = cli(
        kubeconfig, "create", "agent", "calc", "--llm", "gpt-4o", "--system", "Other.", "-n", namespace
    )
    assert refused.returncode == 1 and "already exists" in refused.stderr
    updated = ok(
        cli(
            kubeconfig,
            "create",
            "agent",
            "calc",
            "--llm",
            "gpt-4o",
            "--system",
            "Other.",
            "--update",
            "-n",
            namespace,
        )
    )
    assert updated.stdout.strip() == "agent.kubechain.humanlayer.dev/calc configured"
    assert get(kubectl, namespace, "agent", "calc")["spec"]["system"] == "Other."


def test_failed_run_exits_1(
    stack: LocalStack, kubeconfig: Path, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    setup_calculator(kubeconfig, kubectl, namespace)
    question = f"This request is refused ({namespace})"
    llm.add_rule(question, [{"error": {"status": 400, "message": "scripted bad request"}}])

    result = cli(kubeconfig, "run", "--agent", "calc", question, "--name", "refused", "-n", namespace)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    in_order(lines, [f"user: {question}", "failed: "])
    assert lines[-1].startswith("failed: ") and "400" in lines[-1]
    assert get(kubectl, namespace, "taskrun", "refused")["status"]["phase"] == "Failed"
    assert ok(cli(kubeconfig, "logs", "refused", "-n", namespace)).stdout.splitlines()[-1] == lines[-1]


def test_run_outlives_its_watches(
    stack: LocalStack, kubeconfig: Path, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    """Watches of 1 s, LLM answers of 2.5 s: every watch ends mid-run; the stream must go on, in order."""
    setup_calculator(kubeconfig, kubectl, namespace)
    question = f"Slowly add 2 and 3 ({namespace})"
    llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}], "delay_s": 2.5},
            {"content": "Slowly: 5.", "delay_s": 2.5},
        ],
    )
    result = ok(
        cli(
            kubeconfig,
            "run",
            "--agent",
            "calc",
            question,
            "-n",
            namespace,
            env={"KUBECHAIN_CLI_WATCH_TIMEOUT_S": "1"},
        )
    )
    lines = result.stdout.splitlines()
    in_order(lines, [f"user: {question}", "tool call add(", "tool result add: 5", "final answer: Slowly: 5."])
    assert len(lines) == len(set(lines)), "nothing printed twice across re-watches"


def test_run_shows_the_approval_a_sub_agents_tool_call_waits_for(
    stack: LocalStack, kubeconfig: Path, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    """A run whose sub-agent's tool call waited for approval printed nothing: the run waited on its
    delegation and nobody learnt there was something to approve."""
    api = SlowAPI(0.0)
    question, sub_question = f"Have it deployed ({namespace})", f"Deploy version 3 ({namespace})"
    llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "delegate_to_agent__deployer", "arguments": {"message": sub_question}}]},
            {"content_template": "Boss: {last_tool_results}"},
        ],
    )
    llm.add_rule(
        sub_question,
        [{"tool_calls": [{"name": "deploy", "arguments": {"version": "3"}}]}, {"content": "deployed"}],
    )
    deploy = deploy_tool(api.url)
    deployer = resource(
        "Agent",
        "deployer",
        {
            "llmRef": {"name": "gpt-4o"},
            "system": "You deploy.",
            "description": "Deploys",
            "tools": [{"name": "deploy"}],
        },
    )
    boss = resource(
        "Agent",
        "boss",
        {"llmRef": {"name": "gpt-4o"}, "system": "You delegate.", "subAgents": [{"name": "deployer"}]},
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), deploy, deployer, boss)
    wait_for(
        lambda: get(kubectl, namespace, "agent", "boss").get("status", {}).get("ready"), 60, what="boss ready"
    )

    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "kubechain.cli", "run", "--agent", "boss", question, "-n", namespace]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        hint = wait_for(
            lambda: next(
                (line for line in list(lines) if "waiting for approval: kubechain approve" in line), None
            ),
            90,
            what="the sub-agent's approval to be shown",
        )
        assert hint.startswith("tool deploy (sub-agent run delegate-"), hint
        toolcall = hint.rsplit(" ", 1)[1]
        assert api.intervals == [], "nothing ran before the approval"
        ok(cli(kubeconfig, "approve", toolcall, "-n", namespace))
        assert process.wait(timeout=90) == 0, process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
        api.server.shutdown()
    reader.join(timeout=10)
    in_order(
        lines,
        [
            f"user: {question}",
            "tool call delegate_to_agent__deployer(",
            "tool deploy (sub-agent run delegate-",
            "tool deploy (sub-agent run delegate-",
            "tool result delegate_to_agent__deployer: deployed",
            "final answer: Boss: deployed",
        ],
    )
    assert any(line.endswith(f"[{toolcall}] ReadyToExecuteApprovedTool") for line in lines), lines
    assert len(api.intervals) == 1, "the approved call ran once"


def test_no_wait_prints_the_taskrun(
    stack: LocalStack, kubeconfig: Path, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    question = f"No waiting ({namespace})"
    llm.add_rule(question, [{"content": "done"}])
    result = ok(
        cli(
            kubeconfig,
            "run",
            "--agent",
            "calc",
            question,
            "--no-wait",
            "--wait-for-agent",
            "-o",
            "json",
            "-n",
            namespace,
        )
    )
    run: dict[str, Any] = json.loads(result.stdout)
    assert run["kind"] == "TaskRun" and run["metadata"]["namespace"] == namespace
    assert run["spec"] == {"agentRef": {"name": "calc"}, "userMessage": question}
    assert run["metadata"]["name"].startswith("calc-")

    name = ok(
        cli(kubeconfig, "run", "--agent", "calc", question, "--no-wait", "--wait-for-agent", "-n", namespace)
    ).stdout.strip()
    assert get(kubectl, namespace, "taskrun", name)["spec"]["userMessage"] == question

    # the agent is created after the runs (--wait-for-agent: without it a missing agent is refused): they
    # wait for it, and `logs -f` follows one to its end
    setup_calculator(kubeconfig, kubectl, namespace)
    followed = ok(cli(kubeconfig, "logs", "-f", name, "-n", namespace))
    assert followed.stdout.splitlines()[-1] == "final answer: done"


def test_approve_and_reject(kubeconfig: Path, kubectl: Kubectl, namespace: str) -> None:
    # The calls belong to a run being deleted (a finalizer holds it): workers leave such calls alone, so
    # they stay undecided for as long as the test needs (a call whose run is missing or finished is
    # failed, and a failed call takes no decision).
    held = resource("TaskRun", "held", {"agentRef": {"name": "nobody"}, "userMessage": "hi"})
    held["metadata"]["finalizers"] = [HOLD_FINALIZER]
    apply(kubectl, namespace, held)
    kubectl("delete", "taskrun", "held", "--wait=false", namespace=namespace)
    try:
        decide_on_calls_of(kubeconfig, kubectl, namespace, "held")
    finally:
        kubectl(
            "patch",
            "taskrun",
            "held",
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            namespace=namespace,
        )


HOLD_FINALIZER = "kubechain.test/hold"


def decide_on_calls_of(kubeconfig: Path, kubectl: Kubectl, namespace: str, run: str) -> None:
    for tc in ("tc-a", "tc-b", "tc-c"):
        body = resource(
            "TaskRunToolCall",
            tc,
            {
                "toolCallId": f"call-{tc}",
                "taskRunRef": {"name": run},
                "toolRef": {"name": "add"},
                "arguments": "{}",
            },
        )
        apply(kubectl, namespace, body)

    def annotations(name: str) -> dict[str, str]:
        found = get(kubectl, namespace, "taskruntoolcall", name)["metadata"].get("annotations") or {}
        return {key: value for key, value in found.items() if key.startswith("kubechain.humanlayer.dev/")}

    approved = ok(cli(kubeconfig, "approve", "tc-a", "--comment", "looks fine", "-n", namespace))
    assert approved.stdout.strip() == "taskruntoolcall.kubechain.humanlayer.dev/tc-a approved"
    assert annotations("tc-a") == {
        "kubechain.humanlayer.dev/approval": "approved",
        "kubechain.humanlayer.dev/approval-comment": "looks fine",
    }
    for second in (["reject", "tc-a", "--comment", "changed my mind"], ["approve", "tc-a"]):
        refused = cli(kubeconfig, *second, "-n", namespace)
        assert refused.returncode == 1
        assert "already approved; ignoring" in refused.stderr
    assert annotations("tc-a")["kubechain.humanlayer.dev/approval-comment"] == "looks fine"

    ok(cli(kubeconfig, "reject", "tc-b", "--comment", "not this one", "-n", namespace))
    assert annotations("tc-b") == {
        "kubechain.humanlayer.dev/approval": "rejected",
        "kubechain.humanlayer.dev/approval-comment": "not this one",
    }
    refused = cli(kubeconfig, "approve", "tc-b", "-n", namespace)
    assert refused.returncode == 1 and "already rejected; ignoring" in refused.stderr

    # a decision made with kubectl, spelled as the workers still accept it, is not overwritten
    kubectl(
        "annotate",
        "taskruntoolcall",
        "tc-c",
        "kubechain.humanlayer.dev/approval= Approved",
        namespace=namespace,
    )
    refused = cli(kubeconfig, "reject", "tc-c", "--comment", "no", "-n", namespace)
    assert refused.returncode == 1 and "already approved; ignoring" in refused.stderr
    assert annotations("tc-c") == {"kubechain.humanlayer.dev/approval": " Approved"}

    assert cli(kubeconfig, "reject", "tc-b", "-n", namespace).returncode == 2, "reject needs --comment"
    missing = cli(kubeconfig, "approve", "no-such-call", "-n", namespace)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_dry_run_output_and_mcpserver(kubeconfig: Path, kubectl: Kubectl, namespace: str) -> None:
    listed = json.loads(
        ok(
            cli(
                kubeconfig,
                *(
                    "create",
                    "llm",
                    "claude",
                    "--provider",
                    "anthropic",
                    "--model",
                    "claude-3-5-sonnet-latest",
                ),
                *("--api-key", "sk-ant", "--dry-run", "-o", "json", "-n", namespace),
            )
        ).stdout
    )
    assert [item["kind"] for item in listed["items"]] == ["Secret", "LLM"]
    llm = listed["items"][1]
    assert llm["spec"] == {
        "provider": "anthropic",
        "apiKeyFrom": {"secretKeyRef": {"name": "claude-api-key", "key": "ANTHROPIC_API_KEY"}},
        "parameters": {"model": "claude-3-5-sonnet-latest"},
    }
    server = yaml.safe_load(
        ok(
            cli(
                kubeconfig,
                *("create", "mcpserver", "fetch", "--transport", "stdio", "--command", "uvx"),
                *("--args", "mcp-server-fetch --verbose", "--dry-run", "-o", "yaml", "-n", namespace),
            )
        ).stdout
    )
    assert server["kind"] == "MCPServer" and server["metadata"] == {"name": "fetch", "namespace": namespace}
    assert server["spec"] == {
        "transport": "stdio",
        "command": "uvx",
        "args": ["mcp-server-fetch", "--verbose"],
    }
    assert get(kubectl, namespace, "mcpserver", "fetch") == {}, "a dry run creates nothing"

    bad = cli(kubeconfig, "create", "mcpserver", "web", "--transport", "http", "-n", namespace)
    assert bad.returncode == 2 and "--url" in bad.stderr
    created = ok(
        cli(
            kubeconfig,
            "create",
            "mcpserver",
            "web",
            "--transport",
            "http",
            "--url",
            "http://127.0.0.1:9/mcp",
            "-n",
            namespace,
        )
    )
    assert created.stdout.strip() == "mcpserver.kubechain.humanlayer.dev/web created"
    assert get(kubectl, namespace, "mcpserver", "web")["spec"] == {
        "transport": "http",
        "url": "http://127.0.0.1:9/mcp",
    }


def test_install(kubeconfig: Path, kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    crds = ok(cli(kubeconfig, "install", "--crds-only")).stdout.splitlines()
    assert "customresourcedefinition.apiextensions.k8s.io/taskruns.kubechain.humanlayer.dev applied" in crds
    assert len(crds) == 8

    missing = cli(kubeconfig, "install", "--manifest", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "nope.yaml not found" in missing.stderr

    manifest = tmp_path / "release.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kubechain-config\ndata:\n  a: b\n---\n"
        f"apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: kubechain\n  namespace: {namespace}\n"
    )
    installed = ok(cli(kubeconfig, "install", "--manifest", str(manifest), "-n", namespace))
    applied = installed.stdout.splitlines()
    assert "warning: this cluster has no nodes" in installed.stderr  # the test control plane has none
    assert f"configmap/kubechain-config serverside-applied (namespace {namespace})" in applied
    assert f"serviceaccount/kubechain serverside-applied (namespace {namespace})" in applied
    config = json.loads(
        kubectl("get", "configmap", "kubechain-config", "-o", "json", namespace=namespace).stdout
    )
    assert config["data"] == {"a": "b"}

    # --image: the watcher and workers from an image of one's own; other images stay as they are
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "kubechain-watcher", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "w"}},
            "template": {
                "metadata": {"labels": {"app": "w"}},
                "spec": {
                    "containers": [
                        {"name": "watcher", "image": "ghcr.io/kubechain/kubechain:0.1.0"},
                        {"name": "sidecar", "image": "redis:7-alpine"},
                    ]
                },
            },
        },
    }
    manifest.write_text(json.dumps(deployment))
    ok(cli(kubeconfig, "install", "--manifest", str(manifest), "--image", "registry.local/kc:dev"))
    pods = json.loads(
        kubectl("get", "deployment", "kubechain-watcher", "-o", "json", namespace=namespace).stdout
    )
    images = [c["image"] for c in pods["spec"]["template"]["spec"]["containers"]]
    assert images == ["registry.local/kc:dev", "redis:7-alpine"]
    deployment["spec"]["template"]["spec"]["containers"] = [{"name": "sidecar", "image": "redis:7-alpine"}]
    manifest.write_text(json.dumps(deployment))
    unused = cli(kubeconfig, "install", "--manifest", str(manifest), "--image", "registry.local/kc:dev")
    assert unused.returncode == 1 and "nothing would use registry.local/kc:dev" in unused.stderr
