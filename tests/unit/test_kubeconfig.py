"""KUBECONFIG as kubectl reads it: one file or several separated by ':', merged (the first definition of a
name wins, and so does the first file that sets current-context); ``kubechain up`` writes only its own file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubechain.kube import connection as kc


def kubeconfig(
    path: Path,
    clusters: dict[str, str],
    users: dict[str, str],
    contexts: dict[str, tuple[str, str, str | None]],
    current: str | None,
) -> Path:
    """A kubeconfig file: cluster name → server, user name → token, context name → (cluster, user, ns)."""
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": {"server": s}} for n, s in clusters.items()],
        "users": [{"name": n, "user": {"token": t}} for n, t in users.items()],
        "contexts": [
            {"name": n, "context": {"cluster": c, "user": u} | ({"namespace": ns} if ns else {})}
            for n, (c, u, ns) in contexts.items()
        ],
    }
    if current is not None:
        config["current-context"] = current
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    first = kubeconfig(
        tmp_path / "first.yaml",
        clusters={"one": "https://one.example:6443"},
        users={"alice": "token-alice"},
        contexts={"ctx-one": ("one", "alice", "team-one")},
        current="ctx-one",
    )
    second = kubeconfig(
        tmp_path / "second.yaml",
        # "one" again, elsewhere: the first file's definition wins
        clusters={"two": "https://two.example:6443", "one": "https://not-this-one.example:6443"},
        users={"bob": "token-bob"},
        contexts={"ctx-two": ("two", "bob", "team-two")},
        current="ctx-two",
    )
    return first, second


def listed(*paths: Path | str) -> str:
    return os.pathsep.join(str(p) for p in paths)


def test_the_first_file_that_sets_current_context_wins(
    two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_files
    monkeypatch.setenv("KUBECONFIG", listed(first, second))
    connection = kc.load_connection()
    assert connection.host == "https://one.example:6443", "kubectl uses the first file's current-context"
    assert connection.auth_headers() == {"Authorization": "Bearer token-alice"}
    assert kc.current_context() == "ctx-one"
    # the other order: the other context
    monkeypatch.setenv("KUBECONFIG", listed(second, first))
    assert kc.load_connection().host == "https://two.example:6443"
    assert kc.current_context() == "ctx-two"


def test_contexts_clusters_and_users_of_every_file_are_merged(
    two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_files
    monkeypatch.setenv("KUBECONFIG", listed(first, second))
    connection = kc.load_connection(context="ctx-two")  # defined in the second file only
    assert connection.host == "https://two.example:6443"
    assert connection.auth_headers() == {"Authorization": "Bearer token-bob"}
    # cluster "one" is defined by both files: the first definition wins
    monkeypatch.setenv("KUBECONFIG", listed(second, first))
    assert kc.load_connection(context="ctx-one").host == "https://not-this-one.example:6443"


def test_a_file_without_current_context_and_missing_files_are_skipped(
    two_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two_files
    plain = kubeconfig(
        tmp_path / "plain.yaml",
        clusters={"three": "https://three.example"},
        users={},
        contexts={},
        current=None,
    )
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv("KUBECONFIG", listed(missing, plain, "", second, first))
    assert kc.load_connection().host == "https://two.example:6443"
    assert kc.kubeconfig_exists()
    assert not kc.kubeconfig_exists(listed(missing, tmp_path / "also-missing"))


def test_an_explicit_kubeconfig_may_be_a_list_too(
    two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--kubeconfig`` takes its default from $KUBECONFIG (click's envvar), so it may hold a list."""
    first, second = two_files
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    assert kc.load_connection(listed(second, first)).host == "https://two.example:6443"


def test_the_cli_namespace_is_that_of_the_merged_current_context(
    two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.cli.resources import context_namespace

    first, second = two_files
    assert context_namespace(listed(first, second), None) == "team-one"
    assert context_namespace(listed(first, second), "ctx-two") == "team-two"
    assert context_namespace(listed(second, first), None) == "team-two"


def test_kubeconfig_paths_parse_like_kubectl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", listed("/a", "", "~/b"))
    assert kc.kubeconfig_paths() == ["/a", os.path.expanduser("~/b")]
    assert kc.kubeconfig_path() == listed("/a", os.path.expanduser("~/b"))
    assert kc.kubeconfig_paths("/explicit") == ["/explicit"]
    monkeypatch.setenv("KUBECONFIG", "")
    assert kc.kubeconfig_paths() == [os.path.expanduser("~/.kube/config")]


def test_the_stack_uses_the_list_for_the_current_cluster_and_its_own_file_for_a_local_one(
    two_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.testing.stack import LocalStack, StackOptions

    first, second = two_files
    monkeypatch.setenv("KUBECONFIG", listed(first, second))
    current = LocalStack(StackOptions(workdir=tmp_path / "current", cluster="current"))
    assert current.kubeconfig == listed(first, second), "the processes get the list, as kubectl reads it"
    local = LocalStack(StackOptions(workdir=tmp_path / "local", cluster="local"))
    assert local.kubeconfig == str(tmp_path / "local" / "kubeconfig"), "its own file, never the user's list"
    with pytest.raises(ValueError, match="its own kubeconfig"):
        LocalStack(StackOptions(workdir=tmp_path / "x", cluster="local", kubeconfig=listed(first, second)))


def test_up_passes_the_whole_list_for_the_current_cluster(
    two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    first, second = two_files
    monkeypatch.setenv("KUBECONFIG", listed(first, second))
    seen: list[Any] = []
    monkeypatch.setattr(stack, "why_unusable", lambda *_, **__: None)
    monkeypatch.setattr(stack, "held_lease", lambda *_, **__: None)

    def no_stack(options: Any, **_: Any) -> None:
        seen.append(options)
        raise RuntimeError("not started in a unit test")

    monkeypatch.setattr(stack, "LocalStack", no_stack)
    CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(first.parent / "up")])
    assert [options.kubeconfig for options in seen] == [listed(first, second)]
    assert seen[0].context == "ctx-one", "the processes are pinned to the context chosen at start"


def test_stack_processes_use_the_pinned_context_and_never_an_inherited_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from kubechain.testing.stack import LocalStack, StackOptions

    monkeypatch.setenv("KUBECHAIN_KUBE_CONTEXT", "from-the-users-shell")
    pinned = LocalStack(StackOptions(workdir=tmp_path / "a", cluster="current", context="ctx-one"))
    pinned.redis = SimpleNamespace(url="redis://127.0.0.1:1/0")  # type: ignore[assignment]
    assert pinned.env()["KUBECHAIN_KUBE_CONTEXT"] == "ctx-one"
    local = LocalStack(StackOptions(workdir=tmp_path / "b", cluster="local"))
    local.redis = SimpleNamespace(url="redis://127.0.0.1:1/0")  # type: ignore[assignment]
    assert "KUBECHAIN_KUBE_CONTEXT" not in local.env(), "no context of the user's in the local kubeconfig"


@pytest.mark.slow
def test_up_on_the_current_cluster_makes_way_for_a_kubechain_deployed_there_meanwhile(
    two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusing at start is not enough: the release applied later leads under its own Lease, and both
    would act on every resource. The local processes stop, and `up` says why (exit 1)."""
    from click.testing import CliRunner

    import kubechain.cli.up as up_module
    import kubechain.testing.stack as stack
    from kubechain.cli import main

    first, _ = two_files
    monkeypatch.setenv("KUBECONFIG", str(first))
    checks: list[str | None] = []

    def deployed_watcher(*_: Any, **__: Any) -> str | None:
        # none at the first two checks (none at start either: held_lease), then one: KubeChain was
        # deployed meanwhile
        checks.append("kubechain-watcher-7d9f-abc" if len(checks) >= 2 else None)
        return checks[-1]

    events: list[str] = []

    class FakeStack:
        kubeconfig = str(first)
        llm_base_url = "http://127.0.0.1:1/v1"

        def __init__(self, options: Any, **_: Any) -> None:
            pass

        def start(self) -> None:
            events.append("start")

        def stop(self) -> None:
            events.append("stop")

    monkeypatch.setattr(stack, "why_unusable", lambda *_, **__: None)
    monkeypatch.setattr(stack, "held_lease", lambda *_, **__: None)
    monkeypatch.setattr(stack, "deployed_watcher", deployed_watcher)
    monkeypatch.setattr(stack, "LocalStack", FakeStack)
    monkeypatch.setattr(up_module, "DEPLOYED_CHECK_S", 0.0)
    monkeypatch.setattr(up_module.signal, "signal", lambda *_: None)  # leave pytest's handlers alone
    result = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(first.parent / "up")])
    assert events == ["start", "stop"]
    assert result.exit_code == 1
    assert "kubechain-watcher-7d9f-abc holds Lease kubechain-system/kubechain-watcher" in result.output


def test_a_kubeconfig_given_as_a_path_object_is_one_file(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    assert kc.kubeconfig_paths(one) == [str(one)]


def test_two_stacks_on_one_cluster_never_share_a_watcher_identity(tmp_path: Path) -> None:
    """The Lease tells its holder by identity: two `kubechain up --cluster current` must differ."""
    from kubechain.testing.stack import LocalStack, StackOptions

    first = LocalStack(StackOptions(workdir=tmp_path / "a", cluster="local"))
    second = LocalStack(StackOptions(workdir=tmp_path / "b", cluster="local"))
    assert first.identity("watcher-0") != second.identity("watcher-0")
    assert first.identity("watcher-0").startswith("watcher-0-")
    assert first.identity("worker-0") == "worker-0", "claims keep the worker's name"


def test_up_tells_another_terminal_where_kubectl_and_kubechain_are() -> None:
    from kubechain.cli.up import export_line

    line = export_line("/w/.kubechain/kubeconfig", "/usr/bin:/bin", "/w/.venv/bin/python")
    assert line == 'export KUBECONFIG=/w/.kubechain/kubeconfig PATH="/w/.venv/bin:$PATH"'
    on_path = export_line("/w/.kubechain/kubeconfig", "/w/.venv/bin:/usr/bin", "/w/.venv/bin/python")
    assert on_path == "export KUBECONFIG=/w/.kubechain/kubeconfig"
    spaced = export_line("/my work/.kubechain/kubeconfig", "/usr/bin", "/my work/.venv/bin/python")
    assert spaced == "export KUBECONFIG='/my work/.kubechain/kubeconfig' PATH='/my work/.venv/bin':\"$PATH\""
    import subprocess

    shell = subprocess.run(
        ["bash", "-c", f'{spaced}; printf "%s|%s" "$KUBECONFIG" "${{PATH%%:*}}"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == "/my work/.kubechain/kubeconfig|/my work/.venv/bin", "a shell reads it as meant"


def test_a_stack_started_inside_a_pod_keeps_its_lease_in_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.settings import Settings
    from kubechain.testing.stack import LocalStack, StackOptions

    monkeypatch.setenv("POD_NAMESPACE", "ci-runner")
    stack = LocalStack(StackOptions(workdir=tmp_path, cluster="local"))
    stack.redis = type("FakeRedis", (), {"url": "redis://127.0.0.1:1/0"})()  # type: ignore[assignment]
    env = stack.env()
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings().lease_namespace == "default"


class RecordingAPIServer:
    """Answers with the statuses queued (then 200 {}), recording each request's path and token."""

    def __init__(self) -> None:
        from tests.unit.http_stub import StubAnswer, StubHTTPServer, StubRequest

        self.statuses: list[int] = []
        self.seen: list[tuple[str, str]] = []

        def answer(request: StubRequest) -> StubAnswer:
            self.seen.append((request.path, request.headers.get("Authorization", "")))
            status = self.statuses.pop(0) if self.statuses else 200
            refused = b'{"kind":"Status","reason":"Unauthorized","message":"no"}'
            return StubAnswer(status, b"{}" if status == 200 else refused)

        self.stub = StubHTTPServer(answer)
        self.url = self.stub.url


@pytest.fixture
def apiserver() -> Any:
    server = RecordingAPIServer()
    with server.stub:
        yield server


class TokenConfiguration:
    """A kubernetes-client Configuration holding one token; its refresh hook keeps it (the library only
    refreshes once a token's expiry has passed, which a revoked or rotated token has not reached)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.refresh_api_key_hook = lambda _cfg: None
        self.username = self.password = None

    def get_api_key_with_prefix(self, name: str) -> str | None:
        return f"Bearer {self.token}" if name == "authorization" else None


def test_a_401_is_a_passing_outage_and_the_credentials_are_read_again(apiserver: RecordingAPIServer) -> None:
    """A 401 was taken as a 403: a token being refreshed failed runs and tool calls for good."""
    from kubechain.kube.client import KubeClient
    from kubechain.kube.errors import Forbidden, Unavailable

    loads = iter(["token-2", "token-3"])  # the file / exec plugin as loaded again after each 401
    connection = kc.ClusterConnection(
        apiserver.url,
        False,
        None,
        _configuration=TokenConfiguration("token-1"),
        _reload=lambda: TokenConfiguration(next(loads)),
    )
    kube = KubeClient(connection)
    kube.request("GET", "/version")
    apiserver.statuses = [401]
    with pytest.raises(Unavailable) as refused:
        kube.request("GET", "/version")
    assert not isinstance(refused.value, Forbidden)
    kube.request("GET", "/version")
    assert [token for _, token in apiserver.seen] == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]
    assert "token" not in repr(connection), "the connection's repr shows no credentials"


def test_threads_refused_together_build_one_pool_for_a_new_client_certificate(
    apiserver: RecordingAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exec plugin's new certificate needs new connections: threads that got the 401 at once build
    one new pool between them, and a reload that gives the same certificate keeps the pool."""
    import threading

    from kubechain.kube.client import KubeClient
    from kubechain.kube.errors import Unavailable

    renewed = TokenConfiguration("token-2")
    renewed.cert_file, renewed.key_file = "/run/new.crt", "/run/new.key"  # type: ignore[attr-defined]
    connection = kc.ClusterConnection(
        apiserver.url,
        False,
        ("/run/old.crt", "/run/old.key"),
        _configuration=TokenConfiguration("token-1"),
        _reload=lambda: renewed,
    )
    kube = KubeClient(connection)
    first_pool = kube._http
    import kubechain.kube.client as client_module

    built: list[object] = []
    build = client_module._connection_pool

    def counted_build(*args: Any) -> Any:
        built.append(build(*args))
        return built[-1]

    monkeypatch.setattr(client_module, "_connection_pool", counted_build)
    apiserver.statuses = [401] * 8
    start = threading.Barrier(8)

    def refused_request() -> None:
        start.wait()
        with pytest.raises(Unavailable):
            kube.request("GET", "/version")

    threads = [threading.Thread(target=refused_request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert connection.cert == ("/run/new.crt", "/run/new.key")
    new_pool = kube._http
    assert built == [new_pool] and new_pool is not first_pool
    assert kube.request("GET", "/version") == {}
    connection._reloaded_at = -10.0  # let the next 401 reload at once: the plugin gives the same certificate
    apiserver.statuses = [401]
    with pytest.raises(Unavailable):
        kube.request("GET", "/version")
    assert kube._http is new_pool
    kube.close()


def test_a_server_url_with_a_path_keeps_it_in_front_of_every_api_path(apiserver: RecordingAPIServer) -> None:
    from kubechain.kube.client import KubeClient

    kube = KubeClient(kc.ClusterConnection(f"{apiserver.url}/k8s/clusters/c-x/", False, None))
    kube.get_raw("taskruns", "default", "r")
    assert apiserver.seen[0][0] == (
        "/k8s/clusters/c-x/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/taskruns/r"
    )


def test_a_clusters_tls_server_name_is_the_name_its_certificate_is_checked_against(tmp_path: Path) -> None:
    """kubectl checks the server's certificate against tls-server-name when the URL names an IP or a tunnel."""
    from kubechain.kube.client import KubeClient

    path = kubeconfig(
        tmp_path / "config", {"c": "https://10.0.0.1:6443"}, {"u": "t"}, {"x": ("c", "u", None)}, "x"
    )
    config = yaml.safe_load(path.read_text())
    config["clusters"][0]["cluster"]["tls-server-name"] = "api.cluster.internal"
    config["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = False
    path.write_text(yaml.safe_dump(config))
    connection = kc.load_connection(str(path))
    assert connection.tls_server_name == "api.cluster.internal"
    pool = KubeClient(connection)._http
    assert pool.conn_kw["server_hostname"] == "api.cluster.internal"


EGRESS = {"HTTPS_PROXY": "http://egress:3128"}


@pytest.mark.parametrize(
    ("server", "proxy_url", "env", "expected"),
    [
        ("https://api.example.com:6443", None, EGRESS, "http://egress:3128"),
        ("https://api.example.com:6443", None, {"https_proxy": "egress:3128"}, "http://egress:3128"),
        (
            "http://api.example.com:8080",
            None,
            {"HTTP_PROXY": "http://plain:3128", **EGRESS},
            "http://plain:3128",
        ),
        ("https://api.example.com:6443", None, {**EGRESS, "NO_PROXY": ".example.com"}, None),
        ("https://10.0.0.1:6443", None, {**EGRESS, "no_proxy": "10.0.0.0/8"}, None),
        ("https://127.0.0.1:6443", None, EGRESS, None),  # loopback: never the environment's proxy
        ("https://localhost:6443", None, EGRESS, None),
        ("https://api.example.com:6443", None, {"ALL_PROXY": "socks5://127.0.0.1:1080"}, None),  # as Go
        # the cluster's proxy-url: always, whatever NO_PROXY says (client-go's http.ProxyURL)
        ("https://127.0.0.1:6443", "http://tunnel:8888", EGRESS, "http://tunnel:8888"),
        (
            "https://api.example.com:6443",
            "http://tunnel:8888",
            {**EGRESS, "NO_PROXY": "*"},
            "http://tunnel:8888",
        ),
    ],
)
def test_the_api_servers_proxy_is_chosen_as_kubectl_chooses_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    proxy_url: str | None,
    env: dict[str, str],
    expected: str | None,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = kubeconfig(tmp_path / "config", {"c": server}, {"u": "t"}, {"x": ("c", "u", None)}, "x")
    if proxy_url:
        config = yaml.safe_load(path.read_text())
        config["clusters"][0]["cluster"]["proxy-url"] = proxy_url
        path.write_text(yaml.safe_dump(config))
    assert kc.load_connection(str(path)).proxy_for_server() == expected


@pytest.mark.parametrize(
    "proxy", ["socks5://127.0.0.1:1080", "http://user:s3cret@proxy:99999"], ids=["socks", "bad-port"]
)
def test_a_proxy_kubechain_cannot_use_is_refused_with_what_to_do_and_no_password(proxy: str) -> None:
    from kubechain.kube.client import KubeClient

    with pytest.raises(ValueError, match="API server's proxy") as refused:
        KubeClient(kc.ClusterConnection("https://api.example.com", False, None, proxy=proxy))
    assert "s3cret" not in str(refused.value)
    # nor does a chained parse error (its message quotes the URL)
    assert refused.value.__context__ is None or refused.value.__suppress_context__


@pytest.mark.parametrize("key_in_ups_terminal", [None, "sk-real"])
def test_up_leaves_scripted_or_real_to_each_llms_key_not_to_its_own_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_in_ups_terminal: str | None
) -> None:
    from click.testing import CliRunner

    import kubechain.cli.up as up_module
    import kubechain.testing.stack as stack
    from kubechain.cli import main
    from kubechain.testing.stack import LocalStack, StackOptions

    if key_in_ups_terminal:
        monkeypatch.setenv("OPENAI_API_KEY", key_in_ups_terminal)
    else:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    chosen: list[str] = []

    class FakeStack:
        kubeconfig = str(tmp_path / "kubeconfig")
        llm_base_url = "http://127.0.0.1:1/v1"

        def __init__(self, options: StackOptions, **_: Any) -> None:
            chosen.append(options.llm)

        def start(self) -> None:
            raise KeyboardInterrupt  # Ctrl-C right after the start

        def stop(self) -> None:
            pass

    monkeypatch.setattr(stack, "LocalStack", FakeStack)
    monkeypatch.setattr(up_module.signal, "signal", lambda *_: None)
    CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "up")])
    assert chosen == ["by-key"]

    class Redis:
        url = "redis://127.0.0.1:1/0"

    by_key = LocalStack(StackOptions(workdir=tmp_path / "s", cluster="local", llm="by-key"))
    by_key.redis, by_key.llm_port = Redis(), 1  # type: ignore[assignment]
    env = by_key.env()
    assert env["KUBECHAIN_SCRIPTED_LLM_BASE_URL"] == "http://127.0.0.1:1/v1"
    assert "KUBECHAIN_OPENAI_BASE_URL" not in env or env["KUBECHAIN_OPENAI_BASE_URL"] == os.environ.get(
        "KUBECHAIN_OPENAI_BASE_URL"
    )


def test_a_stale_header_is_derived_once_however_many_threads_need_it() -> None:
    """Every worker thread ran the refresh at once (with an exec plugin: one process per thread)."""
    import threading
    import time
    from types import SimpleNamespace

    from kubechain.kube.connection import ClusterConnection

    refreshes: list[int] = []

    def refresh(cfg: object) -> None:
        refreshes.append(1)
        time.sleep(0.05)

    configuration = SimpleNamespace(
        refresh_api_key_hook=refresh,
        get_api_key_with_prefix=lambda name: "Bearer t" if name == "authorization" else None,
    )
    connection = ClusterConnection("https://k", True, None, _configuration=configuration)
    start = threading.Barrier(32)
    headers: list[dict[str, str]] = []

    def ask() -> None:
        start.wait()
        headers.append(connection.auth_headers())

    threads = [threading.Thread(target=ask) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(refreshes) == 1 and headers == [{"Authorization": "Bearer t"}] * 32


def test_stack_processes_find_the_commands_installed_beside_kubechain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`uvx` (how most stdio MCP servers start) is installed in the virtualenv: from a terminal whose PATH
    lacks the virtualenv's bin directory, the README's MCP example failed with "No such file: 'uvx'"."""
    import sys

    from kubechain.testing.stack import LocalStack, StackOptions

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    stack = LocalStack(StackOptions(workdir=tmp_path, cluster="local"))
    stack.redis = type("FakeRedis", (), {"url": "redis://127.0.0.1:1/0"})()  # type: ignore[assignment]
    bin_dir = os.path.dirname(sys.executable)
    assert stack.env()["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}{bin_dir}")
    assert stack.env()["PATH"] == f"/usr/bin{os.pathsep}{bin_dir}", "already there: left as it is"
