"""The processes freeze their start-up heap and make young collections rarer (kubechain.heap).

Each check runs in a fresh interpreter: freezing is process-wide and must not touch the test process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubechain.heap import YOUNG_THRESHOLD

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_freezing_takes_the_start_up_heap_out_of_the_collectors_sight() -> None:
    answer = run_python(
        """
        import gc, json
        from kubechain.heap import freeze_startup_heap
        before = gc.get_freeze_count()
        freeze_startup_heap()
        print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
        """
    )
    assert answer["before"] == 0
    assert isinstance(answer["frozen"], int) and answer["frozen"] > 1_000
    assert answer["threshold"] == [YOUNG_THRESHOLD, 10, 10]


@pytest.mark.slow  # a fresh interpreter importing Celery, the SDK and the task handlers: ~5 s
def test_a_worker_imports_the_openai_sdk_before_its_first_task_and_anthropics_only_when_used() -> None:
    """The OpenAI SDK, imported by the first task's first OpenAI client, held that task (the first run after
    `kubechain up`) for ~4.5 s on 2 cores, and was left out of the frozen start-up heap: it is imported at
    worker_init. The Anthropic SDK (~40 MiB per worker) was imported with it by the worker context's client
    builders, whatever provider the LLMs named: it now waits for a worker's first Anthropic client."""
    answer = run_python(
        """
        import json, sys
        from celery.concurrency.thread import TaskPool
        from celery.signals import worker_init
        import workers.app
        from kubechain.llm.base import default_builders, parameter_notes
        from kubechain.models import LLM

        modules = ("openai", "anthropic", "kubechain.llm.openai_provider", "kubechain.llm.anthropic_provider")
        worker_init.send(sender=type("WorkController", (), {"pool_cls": TaskPool})())
        at_start = {m: m in sys.modules for m in modules}
        builders = default_builders()
        def llm(provider):
            return LLM.model_validate({"metadata": {"name": "l"}, "spec": {"provider": provider,
                "apiKeyFrom": {"secretKeyRef": {"name": "s", "key": "k"}}, "parameters": {"topK": 5}}})
        builders["openai"](llm("openai"), "sk-1", 5.0, None)
        parameter_notes(llm("openai"))
        with_openai = "anthropic" in sys.modules
        builders["anthropic"](llm("anthropic"), "sk-1", 5.0, None)
        parameter_notes(llm("anthropic"))
        print(json.dumps({"at_start": at_start, "anthropic_with_openai": with_openai,
                          "anthropic_when_used": "anthropic" in sys.modules}))
        """
    )
    assert answer == {
        "at_start": {
            "openai": True,
            "anthropic": False,
            "kubechain.llm.openai_provider": True,
            "kubechain.llm.anthropic_provider": False,
        },
        "anthropic_with_openai": False,
        "anthropic_when_used": True,
    }
