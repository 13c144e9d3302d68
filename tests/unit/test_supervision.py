"""``kubechain up``'s child processes: restarted with an exponential back-off, and gone with the supervisor
even when it is killed by SIGKILL (PR_SET_PDEATHSIG, Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import kubechain.testing.stack as stack_module
from kubechain.testing.controlplane import ManagedProcess
from kubechain.testing.stack import LocalStack, StackOptions
from kubechain.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ back-off


def test_restart_delays_double_from_one_second_to_thirty() -> None:
    delays: list[float] = []
    previous = None
    for _ in range(8):  # a process that crashes at once, again and again
        previous = stack_module.restart_delay(previous, ran_for_s=0.2)
        delays.append(previous)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_restart_delay_starts_over_after_a_minute_of_running() -> None:
    assert stack_module.restart_delay(30, ran_for_s=60) == 1, (
        "it ran for a minute: a new crash, not the same loop"
    )
    assert stack_module.restart_delay(30, ran_for_s=3600) == 1
    assert stack_module.restart_delay(8, ran_for_s=59.9) == 16, (
        "less than a minute: still the same crash loop"
    )
    assert stack_module.restart_delay(None, ran_for_s=0) == 1, "the first restart"


def test_exits_are_described() -> None:
    assert stack_module.describe_exit(3) == "exit code 3"
    assert stack_module.describe_exit(0) == "exit code 0"
    assert stack_module.describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert stack_module.describe_exit(None) == "no exit code"


@pytest.mark.slow
def test_the_supervisor_backs_off_and_says_what_exited_and_when_it_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that exits at once is restarted after 1, 2, 4 ... (here scaled to 0.3, 0.6, 1.2 s)
    back-off units, never sooner, with one log line per restart."""
    monkeypatch.setattr(stack_module, "RESTART_BACKOFF_INITIAL_S", 0.3, raising=False)
    monkeypatch.setattr(stack_module, "RESTART_BACKOFF_MAX_S", 1.2, raising=False)
    messages: list[str] = []
    stack = LocalStack(StackOptions(workdir=tmp_path, supervise=True), progress=messages.append)
    started: list[float] = []

    def start_crashing_worker(name: str, queues: str | None = None) -> ManagedProcess:
        process = ManagedProcess(
            name, [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "logs" / f"{name}.log"
        )
        process.start()
        started.append(process.started_at)
        stack.workers[name] = process
        return process

    monkeypatch.setattr(stack, "start_worker", start_crashing_worker)
    start_crashing_worker("worker-0")
    supervisor = threading.Thread(target=stack._supervise, daemon=True)
    supervisor.start()
    try:
        wait_for(lambda: len(started) >= 5, 60, what="four restarts")
    finally:
        stack._stopping.set()
        supervisor.join(10)
        for process in stack.workers.values():
            process.stop()
    gaps = [later - earlier for earlier, later in zip(started, started[1:], strict=False)]
    for gap, delay in zip(gaps, [0.3, 0.6, 1.2, 1.2], strict=False):
        assert gap >= delay, (gaps, "a restart came before its back-off was over")
    exits = [m for m in messages if "exited" in m]
    assert len(exits) >= 4
    assert exits[0].startswith("worker-0 (pid ") and "exited with exit code 3 after" in exits[0]
    assert [m.split("restarting it in ")[1].split("s,")[0] for m in exits[:4]] == ["0.3", "0.6", "1.2", "1.2"]
    assert all(", at " in m for m in exits), "each line says when the process is restarted"
    assert stack.restarts["worker-0"] >= 4


# ------------------------------------------------------------------------------------------ PDEATHSIG

# The supervisor stand-in: starts a ManagedProcess (from the main thread, from a thread that keeps running
# like kubechain up's supervisor, or from a thread that ends at once), checks the child still answers after
# that, prints the child's pid and waits to be killed.
PARENT = r"""
import os, socket, sys, threading, time
from pathlib import Path
from kubechain.testing.controlplane import ManagedProcess

mode, workdir = sys.argv[1], Path(sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(60)
child_code = (
    "import socket, sys, time\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "s.sendall(s.recv(4)); s.close()\n"
    "time.sleep(600)\n"
)
child = ManagedProcess("child", [sys.executable, "-c", child_code, str(listener.getsockname()[1])],
                       workdir / "child.log")
if mode == "main-thread":
    child.start()
else:
    forever = threading.Event()
    def starter():
        child.start()
        if mode == "running-thread":
            forever.wait()
    thread = threading.Thread(target=starter, daemon=True)
    thread.start()
    if mode == "ended-thread":
        thread.join()
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/self/task/{thread.native_id}"):  # until the kernel is done with it
            assert time.monotonic() < deadline, "the thread did not end"
            time.sleep(0.01)
connection, _ = listener.accept()
connection.settimeout(60)
connection.sendall(b"ping")
assert connection.recv(4) == b"ping", "the child died with the thread that started it"
print(child.pid, flush=True)
sys.stdin.read()
"""


def gone(pid: int) -> bool:
    """No such process, or a zombie (re-parented to a PID 1 that may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("mode", ["main-thread", "running-thread", "ended-thread"])
def test_children_die_with_a_supervisor_killed_by_sigkill(tmp_path: Path, mode: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode, str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child_pid = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()  # the parent prints it once its child answered; EOF if it failed
        assert line.strip().isdigit(), f"the parent failed: {line!r} {parent.communicate(timeout=30)}"
        child_pid = int(line)
        assert not gone(child_pid)
        parent.kill()  # SIGKILL: no atexit hook, no cleanup of any kind
        parent.wait(30)
        wait_for(lambda: gone(child_pid), 30, what=f"the child {child_pid} to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        if child_pid and not gone(child_pid):
            os.killpg(child_pid, signal.SIGKILL)  # the failure case: do not leave it behind


def test_a_process_tail_is_its_own_run_only(tmp_path: Path) -> None:
    """Logs are appended to across runs: a failure quoted the previous run's last lines (an etcd that
    could not start showed the lines of the etcd that had stopped cleanly before)."""
    log = tmp_path / "etcd.log"
    log.write_text("an earlier run: all well\nan earlier run: stopped\n")
    process = ManagedProcess("etcd", [sys.executable, "-c", "print('now: the data is damaged')"], log)
    process.start()
    assert process.proc is not None
    process.proc.wait(timeout=30)
    assert process.tail() == "now: the data is damaged"
    process.start()  # a restart: its own output only, again
    assert process.proc is not None
    process.proc.wait(timeout=30)
    assert process.tail() == "now: the data is damaged"
    assert log.read_text().splitlines().count("now: the data is damaged") == 2, "the whole log is kept"


# ------------------------------------------------------------------------------------------- ready

# A watcher or worker as `up` sees it: it answers on /readyz (any path of its metrics port) once the marker file
# exists, as a worker does once its Celery consumer takes tasks (or exits at once with "exit").
FAKE_PROCESS = """
import http.server, pathlib, sys, time
port, marker = int(sys.argv[1]), pathlib.Path(sys.argv[2])
print("starting", flush=True)
if sys.argv[3] == "exit":
    raise SystemExit(3)
while not marker.exists():
    time.sleep(0.02)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def stack_of_fake_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[str], worker_does: str = "serve"
) -> tuple[LocalStack, Path]:
    """A stack on a "current" cluster (no control plane, no Redis, no scripted LLM, CRDs not installed)
    whose watcher and worker are :data:`FAKE_PROCESS`; the marker file lets them serve."""
    marker = tmp_path / "serve"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    options = StackOptions(workdir=tmp_path / "kc", cluster="current", kubeconfig=kubeconfig, llm="real")
    stack = LocalStack(options, progress=messages.append)
    monkeypatch.setattr(stack, "start_redis", lambda: None)
    monkeypatch.setattr(stack, "kube", lambda: type("Kube", (), {"close": lambda self: None})())
    monkeypatch.setattr(stack_module, "apply_crds", lambda *_: None)

    def start_fake(group: dict[str, ManagedProcess], does: str) -> Callable[..., ManagedProcess]:
        def start(name: str, queues: str | None = None) -> ManagedProcess:
            port = stack.metrics_ports.setdefault(name, stack_module.free_port())
            argv = [sys.executable, "-c", FAKE_PROCESS, str(port), str(marker), does]
            process = ManagedProcess(name, argv, tmp_path / "logs" / f"{name}.log")
            process.start()
            group[name] = process
            return process

        return start

    monkeypatch.setattr(stack, "start_watcher", start_fake(stack.watchers, "serve"))
    monkeypatch.setattr(stack, "start_worker", start_fake(stack.workers, worker_does))
    return stack, marker


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow  # two fake processes, each a fresh interpreter
def test_the_stack_is_up_only_once_its_watcher_and_workers_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up` said "KubeChain is up" as it spawned them: a worker then still took seconds (imports, Celery,
    Redis) before it took a task, and the README's first run sat with empty columns meanwhile."""
    messages: list[str] = []
    stack, marker = stack_of_fake_processes(tmp_path, monkeypatch, messages)
    serving_when_up: dict[str, bool] = {}

    def progress(message: str) -> None:
        messages.append(message)
        if message.startswith("KubeChain is up"):
            serving_when_up["allowed to serve"] = marker.exists()
            serving_when_up.update({name: answers(port) for name, port in stack.metrics_ports.items()})

    stack.progress = progress
    # they serve a while after they are spawned, as a worker does
    threading.Timer(1.0, marker.touch).start()
    try:
        stack.start()
    finally:
        stack.stop()
    assert serving_when_up == {"allowed to serve": True, "watcher-0": True, "worker-0": True}


@pytest.mark.slow
def test_a_worker_that_exits_before_it_is_ready_fails_the_start_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages: list[str] = []
    stack, marker = stack_of_fake_processes(tmp_path, monkeypatch, messages, worker_does="exit")
    marker.touch()
    try:
        with pytest.raises(stack_module.ProcessStartError) as failed:
            stack.start()
    finally:
        stack.stop()
    assert str(failed.value).startswith("worker-0 exited with exit code 3 before it was ready")
    assert "starting" in str(failed.value), "the last lines it wrote"
    assert not any(message.startswith("KubeChain is up") for message in messages)
