"""`kubechain create`: an invalid parameter, and against a stub API server what the command leaves behind
when the API server refuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubechain.cli import main
from tests.unit.http_stub import StubAnswer, StubHTTPServer, StubRequest

SECRETS = "/api/v1/namespaces/default/secrets"
LLMS = "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/llms"


def status(code: int, reason: str, message: str, name: str = "") -> StubAnswer:
    details = {"name": name} if name else {}
    body = {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message}
    return StubAnswer(code, json.dumps(body | {"details": details}).encode())


class FakeAPIServer:
    """Secrets are kept; an LLM create gets ``llm_create`` (a refusal unless told otherwise)."""

    def __init__(self, llm_create: StubAnswer, secret_delete: StubAnswer | None = None) -> None:
        self.secrets: dict[str, bytes] = {}
        self.llm_create = llm_create
        self.secret_delete = secret_delete
        self.stub = StubHTTPServer(self.answer)

    def answer(self, request: StubRequest) -> StubAnswer:
        path = request.path.split("?")[0]
        if path.startswith(f"{LLMS}/") and request.method == "GET":
            return status(404, "NotFound", "not found", name=path.rsplit("/", 1)[1])
        if path == LLMS and request.method == "POST":
            return self.llm_create
        if path == SECRETS and request.method == "POST":
            name = json.loads(request.body)["metadata"]["name"]
            if name in self.secrets:
                return status(409, "AlreadyExists", f'secrets "{name}" already exists', name=name)
            self.secrets[name] = request.body
            return StubAnswer(201, request.body)
        if path.startswith(f"{SECRETS}/") and request.method == "DELETE":
            name = path.rsplit("/", 1)[1]
            if self.secret_delete is not None:
                return self.secret_delete
            if self.secrets.pop(name, None) is None:
                return status(404, "NotFound", "not found", name=name)
            return StubAnswer(200, b'{"kind":"Status","status":"Success"}')
        return status(500, "InternalError", f"the stub does not serve {request.method} {path}")


@pytest.fixture
def kubeconfig_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def point_at(url: str) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stub", "cluster": {"server": url}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [
                {"name": "stub", "context": {"cluster": "stub", "user": "me", "namespace": "default"}}
            ],
            "current-context": "stub",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    return point_at


CREATE = ["create", "llm", "gpt", "--provider", "openai", "--model", "gpt-4o", "--api-key", "sk-test"]


def test_a_refused_llm_takes_the_secret_made_for_it_away_again(kubeconfig_of: Callable[[str], None]) -> None:
    """The Secret holding the key stayed, ownerless, and the same command, once fixed, was refused."""
    refusal = status(403, "Forbidden", 'llms.kubechain.humanlayer.dev is forbidden: User "me" cannot create')
    server = FakeAPIServer(llm_create=refusal)
    with server.stub:
        kubeconfig_of(server.stub.url)
        result = CliRunner().invoke(main, CREATE)
        assert result.exit_code == 1, result.output
        assert "cannot create llm.kubechain.humanlayer.dev/gpt" in result.output
        assert "secret/gpt-api-key deleted" in result.output
        assert server.secrets == {}, "no Secret with the key is left behind"

        server.llm_create = StubAnswer(201, b'{"metadata":{"name":"gpt","uid":"u1"},"spec":{}}')
        again = CliRunner().invoke(main, CREATE)
        assert "secret/gpt-api-key created" in again.output, again.output
        assert "gpt-api-key" in server.secrets


def test_a_secret_that_cannot_be_deleted_is_named_with_the_command_to_delete_it(
    kubeconfig_of: Callable[[str], None],
) -> None:
    server = FakeAPIServer(
        llm_create=status(422, "Invalid", "spec.llmProvider: Unsupported value"),
        secret_delete=status(403, "Forbidden", "cannot delete secrets"),
    )
    with server.stub:
        kubeconfig_of(server.stub.url)
        result = CliRunner().invoke(main, CREATE)
    assert result.exit_code == 1
    assert "kubectl delete secret gpt-api-key -n default" in result.output


def test_a_secret_that_was_there_before_is_never_deleted(kubeconfig_of: Callable[[str], None]) -> None:
    server = FakeAPIServer(llm_create=status(403, "Forbidden", "cannot create llms"))
    server.secrets["gpt-api-key"] = b"{}"
    with server.stub:
        kubeconfig_of(server.stub.url)
        result = CliRunner().invoke(main, [*CREATE, "--update"])
    assert result.exit_code == 1
    assert "gpt-api-key" in server.secrets, "--update reused the user's Secret: it stays"
    assert not [r for r in server.stub.requests if r.method == "DELETE"]


def test_an_invalid_llm_parameter_is_a_cli_error_not_a_traceback() -> None:
    from click.testing import CliRunner

    from kubechain.cli import main

    result = CliRunner().invoke(
        main, ["create", "llm", "x", "--provider", "openai", "--temperature", "abc", "--dry-run"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), "a CLI error, not a crash"
    assert "invalid resource: temperature" in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--agent", "my-agent", "hello"],
        ["logs", "my-run"],
        ["create", "agent", "a", "--llm", "gpt", "--system", "hi"],
        ["approve", "my-call"],
    ],
)
def test_an_api_server_that_is_not_there_is_named_with_what_to_check(
    kubeconfig_of: Callable[[str], None], tmp_path: Path, command: list[str]
) -> None:
    """It said "cannot reach the API server (...): GET /apis/...: MaxRetryError('HTTPSConnectionPool(...'",
    and neither where the server was nor that `kubechain up` may simply not be running."""
    kubeconfig_of("https://127.0.0.1:1")
    result = CliRunner().invoke(main, command)
    assert result.exit_code in (1, 2), result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: cannot reach the API server at https://127.0.0.1:1 ("), message
    assert "Connection refused" in message and "MaxRetryError" not in message, message
    assert message.endswith(f"is `kubechain up` running? (KUBECONFIG={tmp_path / 'kubeconfig'})"), message


def test_a_remote_api_server_that_is_not_there_is_not_blamed_on_kubechain_up() -> None:
    from kubechain.cli.resources import Unreachable

    said = str(Unreachable("cannot read agent a", "timed out").at("https://10.0.0.7:6443", "/k/config"))
    assert said == (
        "cannot reach the API server at https://10.0.0.7:6443 (cannot read agent a): timed out: is the "
        "cluster up, and are this kubeconfig and context the right ones? (KUBECONFIG=/k/config)"
    )
