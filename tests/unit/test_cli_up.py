"""``kubechain up``: what it refuses, what it says when it cannot start, and its private working folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def failing_stack(
    error: BaseException, *, before: Callable[[], None] | None = None, stopped: list[bool] | None = None
) -> type:
    """A LocalStack whose start raises ``error`` (after ``before``, if given); its stop is noted in
    ``stopped``."""

    class Failing:
        logs = Path("/nonexistent/logs")

        def __init__(self, *_: object, **__: object) -> None:
            pass

        def start(self) -> None:
            if before is not None:
                before()
            raise error

        def stop(self) -> None:
            if stopped is not None:
                stopped.append(True)

    return Failing


def test_up_refuses_a_cluster_where_kubechain_already_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.setattr(stack, "why_unusable", lambda *_, **__: None)
    monkeypatch.setattr(
        stack,
        "held_lease",
        lambda *_, lease=stack.DEPLOYED_LEASE, **__: stack.HeldLease(
            "kubechain-watcher-7d9f-abcde", lease, 15.0
        ),
    )
    monkeypatch.setattr(stack, "LocalStack", lambda *args, **kwargs: started.append(args) or 1 / 0)
    result = CliRunner().invoke(main, ["up", "--cluster", "current"])
    assert result.exit_code == 1 and not started
    assert "KubeChain already runs in the current cluster" in result.output
    assert "kubechain-system/kubechain-watcher" in result.output and "--cluster local" in result.output


def test_up_on_the_current_cluster_without_a_usable_kubeconfig_says_so_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setattr(stack, "LocalStack", lambda *args, **kwargs: started.append(args) or 1 / 0)
    result = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "up")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert f"cannot load the cluster connection from {tmp_path / 'missing-kubeconfig'}" in result.output
    assert not started, "nothing is started for a cluster that cannot be reached"


def test_a_second_up_on_the_same_folder_is_refused_at_once(tmp_path: Path) -> None:
    """It used to rewrite the first one's token and kubeconfig, then wait 90 s on etcd's locked data file
    and blame etcd."""
    from kubechain.cli.resources import CLIError
    from kubechain.cli.up import lock_workdir

    first = lock_workdir(tmp_path)
    with pytest.raises(CLIError, match=rf"another `kubechain up` \(pid {os.getpid()}\) is using"):
        lock_workdir(tmp_path)
    first.close()
    lock_workdir(tmp_path).close()  # free again once the first one is gone


def test_up_that_cannot_start_says_why_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main
    from kubechain.testing.binaries import BinaryError

    stopped: list[bool] = []

    no_go = BinaryError("no Go toolchain: install Go 1.24+ or set KUBEBUILDER_ASSETS")
    monkeypatch.setattr(stack, "LocalStack", failing_stack(no_go, stopped=stopped))
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), "a CLI error, not a crash"
    assert "could not start KubeChain: no Go toolchain: install Go 1.24+" in result.output
    assert stopped == [True], "what did start is stopped"


def test_the_local_stacks_folders_are_private(tmp_path: Path) -> None:
    """They hold the local cluster's admin token, kubeconfig and keys: made with the default mode (0755),
    every user of the machine could read each file in the moment between its write and its chmod."""
    import stat

    from kubechain.cli.up import lock_workdir
    from kubechain.testing.controlplane import _write_pki

    workdir = tmp_path / "kc"
    lock_workdir(workdir).close()
    _write_pki(workdir / "pki")
    for folder in (workdir, workdir / "pki"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--concurrency", "1000"], "'--concurrency': 1000 is not in the range 1<=x<="),
        (["--concurrency", "0"], "'--concurrency': 0 is not in the range 1<=x<="),
        (["--workers", "0"], "'--workers': 0 is not in the range x>=1"),
    ],
)
def test_up_refuses_worker_counts_its_workers_would_refuse_or_that_run_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], said: str
) -> None:
    """--concurrency 1000 started workers that `kubechain worker` refused (exit 2), restarted in a silent
    crash loop; --workers 0 ran no worker at all."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.setattr(stack, "LocalStack", lambda *args, **kwargs: started.append(args) or 1 / 0)
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "kc"), *args])
    assert result.exit_code == 2 and said in result.output, result.output
    assert not started


def test_up_never_changes_the_mode_of_a_folder_it_did_not_make(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`up --workdir shared` made a shared (1777) folder private to its user, even when the start then
    failed. What `up` makes itself (the folder when new, the kubeconfig, the control plane's keys) is
    private; a folder that was there keeps its mode."""
    import stat

    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main
    from kubechain.cli.up import lock_workdir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    lock_workdir(shared).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777

    monkeypatch.setattr(stack, "LocalStack", failing_stack(OSError("cannot start here")))
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(shared)])
    assert result.exit_code == 1 and "cannot start here" in result.output, result.output
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    new = tmp_path / "new"
    lock_workdir(new).close()
    assert stat.S_IMODE(new.stat().st_mode) == 0o700, "made by `up`: private"


def test_up_refuses_a_folder_of_other_things_as_its_workdir(tmp_path: Path) -> None:
    """`--workdir .` in a checkout, or `--workdir ~`, would fill it with a control plane, keys and logs
    (and the README's way to start from nothing is to delete the folder). An empty folder, or one an
    earlier `up` used, is taken."""
    from kubechain.cli.resources import CLIError
    from kubechain.cli.up import lock_workdir

    busy = tmp_path / "project"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    with pytest.raises(CLIError, match=r"is not empty and is not a KubeChain working folder") as refused:
        lock_workdir(busy)
    assert refused.value.exit_code == 2
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"], "nothing written there"
    earlier = tmp_path / "earlier"
    lock_workdir(earlier).close()
    (earlier / "logs").mkdir()
    lock_workdir(earlier).close()  # an earlier `up`'s folder: taken again
    empty = tmp_path / "empty"
    empty.mkdir()
    lock_workdir(empty).close()


@pytest.mark.parametrize("left", ["logs", "kubeconfig", "redis", "controlplane", ".lock"])
def test_up_takes_the_folder_an_earlier_up_left_whatever_it_left(tmp_path: Path, left: str) -> None:
    """An `up --cluster current` from before the .lock (only logs/ in it) was refused as "not a KubeChain
    working folder"."""
    from kubechain.cli.up import lock_workdir

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    if left in ("kubeconfig", ".lock"):
        (earlier / left).write_text("")
    else:
        (earlier / left).mkdir()
    lock_workdir(earlier).close()


def test_up_takes_a_folder_of_the_default_name_whatever_it_holds(tmp_path: Path) -> None:
    """.kubechain is `up`'s own name (its default --workdir): what is in it is an earlier up's."""
    from kubechain.cli.up import lock_workdir

    default = tmp_path / ".kubechain"
    default.mkdir()
    (default / "something-older.log").write_text("\n")
    lock_workdir(default).close()


def test_secrets_are_written_private_from_the_first_byte(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The kubeconfig `up` writes beside the user's files carries the admin token: it was written with the
    default mode, then chmodded."""
    import stat

    from kubechain.testing.controlplane import write_private

    path = tmp_path / "kubeconfig"
    path.write_text("old\n")
    path.chmod(0o644)
    seen: list[int] = []
    real_open = os.open

    def spying_open(file: str, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        seen.append(mode)
        return real_open(file, flags, mode)

    monkeypatch.setattr(os, "open", spying_open)
    write_private(path, "token: secret\n")
    monkeypatch.undo()
    assert seen == [0o600]
    assert path.read_text() == "token: secret\n" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_new_workdir_is_private_from_the_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import stat

    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    def fail(self: object) -> None:
        raise OSError("not starting anything here")

    monkeypatch.setattr(stack.LocalStack, "start", fail)
    new = tmp_path / "new" / ".kubechain"
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(new)])
    assert result.exit_code == 1 and "not starting anything here" in result.output, result.output
    assert stat.S_IMODE(new.stat().st_mode) == 0o700


def test_a_control_plane_that_cannot_start_on_its_old_data_names_its_logs_and_how_to_start_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A damaged etcd data file said "etcd exited with code 2" and "(logs: <workdir>/logs)", where the
    control plane's logs are not, and nothing of the README's way out (delete the folder)."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main
    from kubechain.testing.controlplane import ControlPlaneError

    etcd_exited = ControlPlaneError("etcd exited with code 2 while waiting for etcd")
    monkeypatch.setattr(stack, "LocalStack", failing_stack(etcd_exited))
    workdir = tmp_path / "kc"
    (workdir / "controlplane" / "etcd").mkdir(parents=True)  # an earlier run's data
    (workdir / "logs").mkdir()  # and its logs
    (workdir / "controlplane" / "logs").mkdir()
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(workdir)])
    assert result.exit_code == 1, result.output
    assert f"(logs: {workdir / 'logs'}, {workdir / 'controlplane' / 'logs'})" in result.output
    assert f"delete {workdir} to start from nothing" in result.output
    fresh = tmp_path / "fresh"
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(fresh)])
    assert result.exit_code == 1 and "etcd exited with code 2" in result.output
    assert "to start from nothing" not in result.output, "no earlier data: deleting it would change nothing"


@pytest.mark.parametrize("made", [[], ["logs"], ["logs", "controlplane/logs"]])
def test_a_start_that_fails_names_only_the_log_folders_it_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, made: list[str]
) -> None:
    """A REDIS_URL that does not answer stops the start before the control plane is made: the failure
    named <workdir>/controlplane/logs all the same, a folder that did not exist."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main
    from kubechain.testing.redis_server import RedisError

    workdir = tmp_path / "kc"

    def make_folders() -> None:
        for folder in made:
            (workdir / folder).mkdir(parents=True)

    no_answer = RedisError("REDIS_URL redis://127.0.0.1:1/0 does not answer: connection refused")
    monkeypatch.setattr(stack, "LocalStack", failing_stack(no_answer, before=make_folders))
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(workdir)])
    assert result.exit_code == 1, result.output
    assert "does not answer: connection refused" in result.output
    if made:
        assert f"(logs: {', '.join(str(workdir / folder) for folder in made)})" in result.output, (
            result.output
        )
    else:
        assert "logs" not in result.output, result.output


class StopsAtStart:
    """A stack that says it cannot start (nothing is started in a unit test)."""

    logs = Path("/nonexistent/logs")
    options: list[object] = []

    def __init__(self, options: object, **_: object) -> None:
        StopsAtStart.options.append(options)

    def start(self) -> None:
        raise OSError("not starting anything here")

    def stop(self) -> None:
        pass


GARBLED = "garbage: [\n"


def test_up_on_the_current_cluster_with_a_garbled_kubeconfig_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It printed a 60-line YAML parser traceback: the context was read before the guarded load."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(GARBLED)
    monkeypatch.setenv("KUBECONFIG", str(bad))
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    result = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "kc")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert f"cannot load the cluster connection from {bad}: " in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    ("kubeconfig", "said"),
    [
        (GARBLED, "not using the current kube context: cannot load the cluster connection from "),
        (
            "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
            "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
            "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n",
            "not using the current kube context: its API server at https://127.0.0.1:1 does not answer: ",
        ),
    ],
)
def test_up_auto_says_why_it_did_not_use_the_current_context(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kubeconfig: str, said: str
) -> None:
    """It said only "cluster: a local control plane", however the kubeconfig had failed."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(kubeconfig)
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    result = CliRunner().invoke(main, ["up", "--workdir", str(tmp_path / "kc")])
    assert said in result.output, result.output
    assert "cluster: a local control plane" in result.output


def test_up_sees_a_cluster_already_served_by_another_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the deployed watcher's Lease (kubechain-system/kubechain-watcher) was looked at, while the
    watcher of a local `up` (or of the Procfile) leads under default/kubechain-watcher: a second `up` on
    the cluster of the first (its KUBECONFIG exported, as `up` says to) started a second KubeChain there."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    asked: list[tuple[str, str]] = []

    def watcher_of(
        _kubeconfig: object, lease: tuple[str, str] = stack.DEPLOYED_LEASE, **__: object
    ) -> stack.HeldLease | None:
        asked.append(lease)
        return (
            stack.HeldLease("watcher-0-1a2b3c", lease, 15.0)
            if lease == ("default", "kubechain-watcher")
            else None
        )

    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBECHAIN_LEASE_NAMESPACE", raising=False)
    monkeypatch.delenv("KUBECHAIN_LEASE_NAME", raising=False)
    monkeypatch.setattr(stack, "why_unusable", lambda *_, **__: None)
    monkeypatch.setattr(stack, "held_lease", watcher_of)
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    refused = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "a")])
    assert refused.exit_code == 1, refused.output
    assert "its watcher watcher-0-1a2b3c holds Lease default/kubechain-watcher" in refused.output
    assert "another `kubechain up`" in refused.output and "--cluster local" in refused.output
    StopsAtStart.options.clear()
    auto = CliRunner().invoke(main, ["up", "--workdir", str(tmp_path / "b")])
    assert "watcher-0-1a2b3c holds Lease default/kubechain-watcher" in auto.output
    assert "cluster: a local control plane" in auto.output
    assert [getattr(options, "cluster", None) for options in StopsAtStart.options] == ["local"]


@pytest.fixture
def own_signal_handlers() -> object:
    """`up` installs its own SIGTERM, SIGINT and SIGHUP handlers: pytest's are put back after the test."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_while_starting_stops_the_start_and_what_it_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, own_signal_handlers: object
) -> None:
    """SIGTERM only set an event that was looked at once everything had started (a cold build of the
    control plane takes 6 minutes); Ctrl-C stopped the start at once. Both do now, and what started is
    stopped; `up` exits 143 (and 130 after Ctrl-C), not 0."""
    import signal
    import time

    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    events: list[str] = []

    class SlowStart:
        kubeconfig = str(tmp_path / "kubeconfig")
        llm_base_url = "http://127.0.0.1:1/v1"
        logs = tmp_path / "logs"

        def __init__(self, *_: object, **__: object) -> None:
            pass

        def start(self) -> None:
            events.append("start")
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # building kube-apiserver, say
                time.sleep(0.01)
            events.append("started")

        def stop(self) -> None:
            events.append("stop")

    monkeypatch.setattr(stack, "LocalStack", SlowStart)
    began = time.monotonic()
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "a")])
    assert events == ["start", "stop"], result.output
    assert time.monotonic() - began < 4
    assert result.exit_code == 143, result.output

    class CtrlC(SlowStart):
        def start(self) -> None:
            raise KeyboardInterrupt

    events.clear()
    monkeypatch.setattr(stack, "LocalStack", CtrlC)
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "b")])
    assert result.exit_code == 130 and events == ["stop"], result.output


@pytest.mark.parametrize(("signal_name", "exit_code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_once_running_stops_everything_and_exits_as_killed_by_it(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    own_signal_handlers: object,
    signal_name: str,
    exit_code: int,
) -> None:
    """SIGHUP (the terminal `up` ran in was closed) ended `up` at once, by the signal's default action,
    without its clean shutdown; it is a stop asked for, as SIGTERM is."""
    import signal
    import threading

    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    events: list[str] = []

    class Running:
        kubeconfig = str(tmp_path / "kubeconfig")
        llm_base_url = "http://127.0.0.1:1/v1"
        logs = tmp_path / "logs"

        def __init__(self, *_: object, **__: object) -> None:
            pass

        def start(self) -> None:
            events.append("start")
            threading.Timer(0.3, os.kill, (os.getpid(), getattr(signal, signal_name))).start()

        def stop(self) -> None:
            events.append("stop")

    monkeypatch.setattr(stack, "LocalStack", Running)
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "a")])
    assert events == ["start", "stop"], result.output
    assert result.exit_code == exit_code, result.output
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN, "Ctrl-C works again after `up` returns"


def test_sigint_stops_an_up_started_with_sigint_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, own_signal_handlers: object
) -> None:
    """A shell without job control starts a background job (`kubechain up &` in a script) with SIGINT
    ignored, and Python keeps it so: `kill -INT` (or Ctrl-C) did nothing, and `up` ran on."""
    import signal
    import threading

    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    events: list[str] = []
    # if SIGINT is still ignored, `up` would run for ever: SIGTERM ends it (143, not 130) instead
    fallback = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))

    class Running:
        kubeconfig = str(tmp_path / "kubeconfig")
        llm_base_url = "http://127.0.0.1:1/v1"
        logs = tmp_path / "logs"

        def __init__(self, *_: object, **__: object) -> None:
            pass

        def start(self) -> None:
            events.append("start")
            fallback.start()
            os.kill(os.getpid(), signal.SIGINT)

        def stop(self) -> None:
            fallback.cancel()
            events.append("stop")

    monkeypatch.setattr(stack, "LocalStack", Running)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as bash leaves it for a background job
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "a")])
    assert events == ["start", "stop"], result.output
    assert result.exit_code == 130, result.output
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "as it was before `up`"


def test_the_start_names_one_kubeconfig_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`up` printed the control plane's own kubeconfig (controlplane/kubeconfig.yaml) as it became ready,
    then the one to export (<workdir>/kubeconfig): two paths for one cluster."""
    from kubechain.testing.binaries import ControlPlaneBinaries
    from kubechain.testing.controlplane import LocalControlPlane

    said: list[str] = []
    plane = LocalControlPlane(
        workdir=tmp_path / "controlplane",
        binaries=ControlPlaneBinaries(Path("/bin/true"), Path("/bin/true"), None),
        progress=said.append,
        with_controller_manager=False,
    )
    monkeypatch.setattr(plane, "_start_etcd", lambda: None)
    monkeypatch.setattr(plane, "start_apiserver", lambda: setattr(plane, "_apiserver", object()))
    monkeypatch.setattr(plane, "stop", lambda: None)
    plane.start()
    assert any(line.startswith("control plane ready at https://127.0.0.1:") for line in said), said
    assert not any("kubeconfig" in line for line in said), said


def self_signed_ca() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pod-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def in_a_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """A pod's environment: its service account's token and CA, KUBERNETES_SERVICE_HOST, no kubeconfig. The
    API server's /version answers (the hosts it is asked of are listed)."""
    import kubernetes.config.incluster_config as incluster

    from kubechain.kube.client import KubeClient

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("tok")
    ca.write_bytes(self_signed_ca())
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    asked: list[str] = []

    def version(self: KubeClient) -> dict[str, str]:
        asked.append(self.connection.host)
        return {"gitVersion": "v1.31.0"}

    monkeypatch.setattr(KubeClient, "version", version)
    return asked


def test_up_on_the_current_cluster_in_a_pod_uses_its_in_cluster_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_a_pod: list[str]
) -> None:
    """It was refused ("cannot load the cluster connection from ~/.kube/config: no such file") while every
    process it starts loads the in-cluster configuration when there is no kubeconfig."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    monkeypatch.setattr(stack, "held_lease", lambda *_, **__: None)
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    StopsAtStart.options.clear()
    result = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "up")])
    assert "could not start KubeChain: not starting anything here" in result.output, result.output
    assert in_a_pod == ["https://10.0.0.1:443"], "its API server is asked, as a kubeconfig's is"
    assert [options.cluster for options in StopsAtStart.options] == ["current"]  # type: ignore[attr-defined]


def test_up_auto_in_a_pod_without_a_kubeconfig_starts_a_local_control_plane(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_a_pod: list[str]
) -> None:
    """As it did: a CI job in a Kubernetes runner gets a cluster of its own, not its runner's cluster, which
    its service account may reach (with --cluster current, it does)."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    StopsAtStart.options.clear()
    result = CliRunner().invoke(main, ["up", "--workdir", str(tmp_path / "up")])
    assert "cluster: a local control plane" in result.output, result.output
    assert "the in-cluster configuration is used with --cluster current only" in result.output, result.output
    assert not in_a_pod


def test_refusing_a_cluster_another_up_serves_says_when_its_lease_frees_by_the_leases_own_duration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It said "frees it within 15 s" whatever the Lease's leaseDurationSeconds (which lease_holder honours)."""
    from datetime import UTC, datetime

    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    class Kube:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        def get_lease(self, namespace: str, name: str) -> dict[str, object]:
            if (namespace, name) != ("default", "kubechain-watcher"):
                from kubechain.kube.errors import KubeAPIError

                raise KubeAPIError(404, "Not Found", "no such Lease")
            spec = {"holderIdentity": "watcher-0-1a2b3c", "renewTime": renewed, "leaseDurationSeconds": 40}
            return {"spec": spec}

        def close(self) -> None:
            pass

    monkeypatch.delenv("KUBECHAIN_LEASE_NAMESPACE", raising=False)
    monkeypatch.delenv("KUBECHAIN_LEASE_NAME", raising=False)
    monkeypatch.setattr(stack, "why_unusable", lambda *_, **__: None)
    monkeypatch.setattr(stack, "load_connection", lambda *_, **__: None)
    monkeypatch.setattr(stack, "KubeClient", Kube)
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    refused = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "a")])
    assert refused.exit_code == 1, refused.output
    assert "watcher-0-1a2b3c holds Lease default/kubechain-watcher" in refused.output, refused.output
    assert "frees it within 40 s" in refused.output and "15 s" not in refused.output, refused.output


def test_the_lease_a_local_watcher_takes_is_read_as_the_watcher_reads_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """local_lease read os.environ by exact name, while the watcher's settings take a variable's name in
    any case (kubechain_lease_name); the stack drops POD_NAMESPACE, so the Lease stays in "default"."""
    from kubechain.testing.stack import local_lease

    monkeypatch.delenv("KUBECHAIN_LEASE_NAME", raising=False)
    monkeypatch.delenv("KUBECHAIN_LEASE_NAMESPACE", raising=False)
    monkeypatch.setenv("kubechain_lease_name", "mine")
    monkeypatch.setenv("POD_NAMESPACE", "ci-runners")
    assert local_lease() == ("default", "mine")
    monkeypatch.setenv("Kubechain_Lease_Namespace", "team-a")
    assert local_lease() == ("team-a", "mine")


def test_up_on_the_current_cluster_with_settings_its_watcher_cannot_start_with_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Lease a local watcher takes is read from the settings: settings it could not start with are
    said in one line (exit 2), not as a traceback."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    monkeypatch.setenv("KUBECHAIN_LEASE_DURATION_S", "a while")
    monkeypatch.setattr(stack, "why_unusable", lambda *_, **__: None)
    monkeypatch.setattr(stack, "held_lease", lambda *_, **__: None)
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    result = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "a")])
    assert result.exit_code == 2, result.output
    assert "KUBECHAIN_LEASE_DURATION_S" in result.output and "Traceback" not in result.output, result.output


def test_a_workdir_that_cannot_be_made_is_said_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A --workdir under a file, or under a folder this user cannot write in, printed NotADirectoryError's
    or PermissionError's traceback."""
    from click.testing import CliRunner

    import kubechain.cli.up as up_module
    import kubechain.testing.stack as stack
    from kubechain.cli import main

    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    under_a_file = CliRunner().invoke(
        main, ["up", "--cluster", "local", "--workdir", str(a_file / "kc" / "up")]
    )
    assert under_a_file.exit_code == 2, under_a_file.output
    assert f"cannot make --workdir {a_file / 'kc' / 'up'}: {a_file} is not a folder" in under_a_file.output
    assert "Traceback" not in under_a_file.output and len(under_a_file.output.strip().splitlines()) == 1

    def refused(*_: object, **__: object) -> None:  # what a folder of another's says (root is never told)
        raise PermissionError(13, "Permission denied", str(tmp_path / "theirs"))

    monkeypatch.setattr(Path, "mkdir", refused)
    unwritable = CliRunner().invoke(
        main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "theirs" / "kc")]
    )
    assert unwritable.exit_code == 2, unwritable.output
    assert f"cannot make --workdir {tmp_path / 'theirs' / 'kc'}: Permission denied" in unwritable.output
    monkeypatch.undo()

    mine = tmp_path / "mine"
    mine.mkdir()

    def no_lock(path: object, *_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    monkeypatch.setattr(up_module, "open", no_lock, raising=False)
    read_only = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(mine)])
    assert read_only.exit_code == 2, read_only.output
    assert f"cannot write in --workdir {mine}: Permission denied" in read_only.output
    assert "Traceback" not in read_only.output


@pytest.mark.parametrize(("set_to", "given"), [(None, "INFO"), ("debug", "DEBUG"), (" WARNING ", "WARNING")])
def test_up_gives_its_processes_the_log_level_set_in_its_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, set_to: str | None, given: str
) -> None:
    """``KUBECHAIN_LOG_LEVEL=DEBUG kubechain up``, the setting the README documents for the watcher and
    workers, changed nothing: the stack set its processes' level to INFO over it."""
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    if set_to is None:
        monkeypatch.delenv("KUBECHAIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("KUBECHAIN_LOG_LEVEL", set_to)
    real_stack = stack.LocalStack
    StopsAtStart.options.clear()
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "up")])
    (options,) = StopsAtStart.options
    assert isinstance(options, stack.StackOptions)

    class Redis:
        url = "redis://127.0.0.1:1/0"

    started = real_stack(options, progress=lambda _: None)  # what the real stack gives its processes
    started.redis, started.llm_port = Redis(), 1  # type: ignore[assignment]
    assert started.env()["KUBECHAIN_LOG_LEVEL"] == given


def test_up_refuses_a_log_level_its_processes_would_refuse_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    monkeypatch.setenv("KUBECHAIN_LOG_LEVEL", "chatty")
    StopsAtStart.options.clear()
    monkeypatch.setattr(stack, "LocalStack", StopsAtStart)
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "up")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert "KUBECHAIN_LOG_LEVEL: 'chatty' is not a log level: one of DEBUG, INFO" in result.output
    assert not StopsAtStart.options, "nothing is started"
