"""Which queue each message goes to, and that every way of running KubeChain keeps validations that call
out (checks) in processes apart from those that prepare runs (control). The hung-endpoint case itself, with
real processes: tests/e2e/test_hung_checks.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from kubechain.queueing import EXTERNAL_CHECK_KINDS, QueueName, ResourceMessage, TaskName, enqueue
from kubechain.testing.stack import LocalStack, StackOptions

REPO = Path(__file__).resolve().parents[2]


def queued_on(task: TaskName, kind: str) -> str:
    """The queue (Redis list) an enqueued message of ``task`` about a ``kind`` lands on."""
    app = Celery("t", broker="memory://")
    enqueue(app, task, ResourceMessage(kind=kind, namespace="default", name="x"))
    with app.connection_for_read() as connection:
        for queue in QueueName:
            simple = connection.SimpleQueue(queue.value)
            if simple.qsize():
                simple.get(timeout=1).ack()
                return queue.value
    raise AssertionError("nothing was enqueued")


@pytest.mark.parametrize("kind", ["LLM", "MCPServer", "ContactChannel"])
def test_validations_that_call_out_go_to_the_checks_queue(kind: str) -> None:
    assert queued_on(TaskName.VALIDATE, kind) == "checks"


@pytest.mark.parametrize("kind", ["Agent", "Task", "Tool"])
def test_validations_that_read_only_the_api_server_stay_with_prepare_on_control(kind: str) -> None:
    assert queued_on(TaskName.VALIDATE, kind) == "control"
    assert queued_on(TaskName.PREPARE, "TaskRun") == "control"


def test_the_checks_kinds_are_those_whose_validators_call_out() -> None:
    from workers.validators import VALIDATORS

    assert EXTERNAL_CHECK_KINDS <= set(VALIDATORS)
    assert set(VALIDATORS) - EXTERNAL_CHECK_KINDS == {"Agent", "Task", "Tool"}


def procfile_queues() -> dict[str, list[str]]:
    """Each Procfile worker's queues."""
    found = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.startswith("#") or " worker " not in line:
            continue
        name, command = line.split(":", 1)
        args = command.split()
        found[name] = args[args.index("--queues") + 1].split(",")
    return found


def test_the_procfile_runs_each_queue_in_one_process_and_checks_apart_from_control() -> None:
    queues = procfile_queues()
    consumed = [queue for each in queues.values() for queue in each]
    assert sorted(consumed) == sorted(queue.value for queue in QueueName)
    (checks,) = [each for each in queues.values() if "checks" in each]
    assert "control" not in checks


class StartedOnly:
    """A ManagedProcess that records its argv and starts nothing."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.pid = 1

    def start(self) -> None:
        pass


def test_a_stack_with_checks_workers_leaves_checks_to_them_and_restarts_each_on_its_own_queues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubechain.testing.stack as stack_module

    monkeypatch.setattr(stack_module, "ManagedProcess", StartedOnly)
    stack = LocalStack(StackOptions(workdir=tmp_path, checks_workers=1), progress=lambda _: None)
    monkeypatch.setattr(stack, "env", dict)

    def queues(name: str) -> str:
        argv = stack.workers[name].argv
        return argv[argv.index("--queues") + 1]

    stack.start_worker("worker-0", stack.queues_of_workers())
    stack.start_worker("checks-0", QueueName.CHECKS.value)
    assert queues("worker-0") == "control,llm,tools"
    assert queues("checks-0") == "checks"
    stack.start_worker("checks-0")  # as the supervisor restarts it: by name
    stack.start_worker("worker-0")
    assert queues("checks-0") == "checks" and queues("worker-0") == "control,llm,tools"

    alone = LocalStack(StackOptions(workdir=tmp_path / "alone"), progress=lambda _: None)
    assert alone.queues_of_workers() == "control,checks,llm,tools", "without checks workers: taken too"


def test_kubechain_up_runs_a_checks_worker_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack_module
    from kubechain.cli import main

    asked: list[StackOptions] = []

    class StopsAtStart:
        def __init__(self, options: StackOptions, **_: object) -> None:
            asked.append(options)

        def start(self) -> None:
            raise OSError("not starting anything here")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(stack_module, "LocalStack", StopsAtStart)
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path / "up")])
    assert "not starting anything here" in result.output, result.output
    (options,) = asked
    assert options.checks_workers == 1
    assert "checks" not in LocalStack(options).queues_of_workers().split(",")
