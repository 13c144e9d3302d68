"""``kubechain run``: a mistyped agent, and a run that waits on an Agent whose LLM (or MCP server, or
contact channel) is in Error."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
from click.testing import CliRunner

from kubechain.cli import main
from kubechain.kube.errors import NotFound
from kubechain.models import TaskRun


def missing(plural: str, name: str) -> NotFound:
    body = {"reason": "NotFound", "message": f'{plural} "{name}" not found', "details": {"name": name}}
    return NotFound(404, "NotFound", body["message"], body)


class Objects:
    """Just enough of a KubeClient: get by kind and name, list, create (recorded)."""

    def __init__(self, objects: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.created: list[dict[str, Any]] = []

    def get(self, model: Any, namespace: str, name: str) -> Any:
        wire = self.objects.get((model.KIND, name))
        if wire is None:
            raise missing(model.PLURAL, name)
        return model.from_wire({"metadata": {"name": name, "namespace": namespace}} | wire)

    def list(self, model: Any, namespace: str, selector: str | None = None) -> list[Any]:
        return [self.get(model, namespace, name) for kind, name in self.objects if kind == model.KIND]

    def create_raw(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body)
        return body

    def close(self) -> None:
        pass


def test_run_refuses_an_agent_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped name made a TaskRun that waited the whole timeout (600 s) and was left Pending."""
    from kubechain.cli.resources import Target

    kube = Objects({("Agent", "my-assistant"): {"spec": {"llmRef": {"name": "gpt"}, "system": "s"}}})
    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))
    refused = CliRunner().invoke(main, ["run", "--agent", "my-asistant", "hello", "-n", "default"])
    assert refused.exit_code == 2, refused.output
    assert 'agent "my-asistant" not found in namespace "default"' in refused.output
    assert "agents there: my-assistant" in refused.output and "--wait-for-agent" in refused.output
    assert kube.created == [], "no run is left behind"
    waiting = CliRunner().invoke(
        main, ["run", "--agent", "later", "hello", "-n", "default", "--wait-for-agent", "--no-wait"]
    )
    assert waiting.exit_code == 0, waiting.output
    assert [body["spec"]["agentRef"]["name"] for body in kube.created] == ["later"]


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_run_no_wait_prints_the_created_run_without_its_managed_fields(
    monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """The API server's field-ownership bookkeeping, which kubectl leaves out unless asked
    (--show-managed-fields), was most of what ``run --no-wait -o json`` printed."""
    import yaml

    from kubechain.cli.resources import Target

    class Created(Objects):
        def create_raw(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
            created = super().create_raw(plural, namespace, body)
            managed = [{"manager": "kubechain-cli", "operation": "Update", "fieldsV1": {"f:spec": {}}}]
            return created | {"metadata": created["metadata"] | {"uid": "u-1", "managedFields": managed}}

    kube = Created({("Agent", "a"): {"spec": {"llmRef": {"name": "gpt"}, "system": "s"}}})
    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))
    result = CliRunner().invoke(
        main, ["run", "--agent", "a", "hello", "-n", "default", "--no-wait", "-o", output]
    )
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)  # (JSON is YAML)
    assert printed["metadata"]["uid"] == "u-1" and "managedFields" not in printed["metadata"], result.output
    assert printed["spec"]["agentRef"] == {"name": "a"}


PENDING_RUN = {
    "metadata": {"name": "r", "namespace": "default"},
    "spec": {"agentRef": {"name": "a"}, "userMessage": "hi"},
    "status": {
        "phase": "Pending",
        "status": "Pending",
        "statusDetail": 'Waiting for agent "a" to become ready: LLM "fake" is not ready',
    },
}


def blocked_objects(llm_detail: str) -> Objects:
    return Objects(
        {
            ("Agent", "a"): {
                "spec": {
                    "llmRef": {"name": "fake"},
                    "system": "s",
                    "mcpServers": [{"name": "fetch"}],
                    "humanContactChannels": [{"name": "ops"}],
                },
                "status": {"ready": False, "status": "Pending", "statusDetail": 'LLM "fake" is not ready'},
            },
            ("LLM", "fake"): {
                "spec": {"provider": "openai"},
                "status": {"ready": False, "status": "Error", "statusDetail": llm_detail},
            },
            ("MCPServer", "fetch"): {
                "spec": {"transport": "stdio", "command": "uvx"},
                "status": {"connected": True, "status": "Ready", "statusDetail": "Connected"},
            },
            ("ContactChannel", "ops"): {
                "spec": {"type": "slack", "apiKeyFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                "status": {"ready": False, "status": "Error", "statusDetail": "secret s not found"},
            },
        }
    )


def test_a_pending_run_says_what_its_agent_waits_for_is_in_error_once_and_when_it_changes() -> None:
    from kubechain.cli.run import Blockers

    kube = blocked_objects('the API key was refused: 401 "invalid_api_key"')
    blockers = Blockers(kube, "default")  # type: ignore[arg-type]
    run = TaskRun.from_wire(PENDING_RUN)
    said = [event.text for event in blockers.check(run)]
    assert said == [
        'LLM "fake" is in Error: the API key was refused: 401 "invalid_api_key"',
        'ContactChannel "ops" is in Error: secret s not found',
    ]
    assert blockers.check(run) == [], "said once"
    kube.objects[("LLM", "fake")]["status"]["statusDetail"] = "the provider did not answer"
    assert [event.text for event in blockers.check(run)] == [
        'LLM "fake" is in Error: the provider did not answer'
    ]
    kube.objects[("ContactChannel", "ops")]["status"] = {"ready": True, "status": "Ready"}
    assert blockers.check(run) == []
    kube.objects[("ContactChannel", "ops")]["status"] = {
        "status": "Error",
        "statusDetail": "secret s not found",
    }
    assert [event.text for event in blockers.check(run)] == [
        'ContactChannel "ops" is in Error: secret s not found'
    ]
    running = TaskRun.from_wire(PENDING_RUN | {"status": {"phase": "ReadyForLLM"}})
    assert blockers.check(running) == [], "only a run that waits is looked into"


def test_a_pending_runs_blockers_skip_what_cannot_be_read(caplog: pytest.LogCaptureFixture) -> None:
    """An object the model cannot read (an LLM of a provider it does not know, written under the Go
    original's CRD) raised pydantic's ValidationError out of `kubechain run`, a traceback; so did any
    other failure but the API server's. Looking into a run's blockers is a help only: such an object is
    skipped (logged at debug), and the others are still said."""
    import logging

    from kubechain.cli.run import Blockers

    kube = blocked_objects("unused")
    kube.objects[("LLM", "fake")]["spec"] = {"provider": "mistral"}
    real_get = kube.get

    def get(model: Any, namespace: str, name: str) -> Any:
        if model.KIND == "MCPServer":
            raise RuntimeError("something unexpected")
        return real_get(model, namespace, name)

    kube.get = get  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="kubechain.cli.run"):
        said = [event.text for event in Blockers(kube, "default").check(TaskRun.from_wire(PENDING_RUN))]  # type: ignore[arg-type]
    assert said == ['ContactChannel "ops" is in Error: secret s not found']
    assert 'LLM "fake"' in caplog.text and 'MCPServer "fetch"' in caplog.text, caplog.text
    kube.objects[("Agent", "a")]["spec"] = {"llmRef": {"name": "fake"}, "system": 7}
    assert Blockers(kube, "default").check(TaskRun.from_wire(PENDING_RUN)) == []  # type: ignore[arg-type]


def test_following_a_run_that_waits_on_an_llm_in_error_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """It showed `pending: Waiting for agent "a" to become ready: LLM "fake" is not ready` for the whole
    timeout, while the LLM's status said why."""
    from kubechain.cli import run as run_module
    from kubechain.cli.resources import Target

    kube = blocked_objects("the API key was refused")
    monkeypatch.setattr(Target, "client", lambda self, timeout_s=30.0: kube)
    monkeypatch.setattr(
        run_module.Follower,
        "start",
        lambda self: self.events.put(run_module.Observed("taskrun", PENDING_RUN)),
    )
    out = io.StringIO()
    code, _ = run_module.follow(Target("default", None, None), "r", out, 1.0)
    assert code == run_module.EXIT_OTHER  # the timeout
    lines = out.getvalue().splitlines()
    assert 'pending: LLM "fake" is in Error: the API key was refused' in lines, lines
    assert lines.count('pending: LLM "fake" is in Error: the API key was refused') == 1


@pytest.mark.parametrize("value", ["1.5", "soon", "0", "-5"])
def test_a_bad_cli_watch_timeout_stops_only_what_follows_a_run_and_in_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """KUBECHAIN_CLI_WATCH_TIMEOUT_S was read with int() as the CLI was imported: a value that is no whole
    number was a ValueError's traceback from every command (``kubechain worker`` and ``watcher`` among
    them), and 0 or less a watch without its timeout or one the API server refused. It is now read by what
    follows a run, before it creates one, and refused in one line."""
    import os
    import subprocess
    import sys

    from kubechain.cli.resources import Target

    started = subprocess.run(
        [sys.executable, "-c", "from kubechain.cli import main; main(['version'])"],
        env={**os.environ, "KUBECHAIN_CLI_WATCH_TIMEOUT_S": value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0 and started.stdout.startswith("kubechain "), started.stderr
    kube = Objects({("Agent", "a"): {"spec": {"llmRef": {"name": "gpt"}, "system": "s"}}})
    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))
    monkeypatch.setenv("KUBECHAIN_CLI_WATCH_TIMEOUT_S", value)
    for command in (["run", "--agent", "a", "hello"], ["logs", "-f", "a-run"]):
        refused = CliRunner().invoke(main, command)
        assert refused.exit_code == 2, refused.output
        assert refused.output == (
            f"Error: KUBECHAIN_CLI_WATCH_TIMEOUT_S: {value!r} is not a whole number of seconds, at least 1\n"
        )
    assert kube.created == [], "no run is left behind"
