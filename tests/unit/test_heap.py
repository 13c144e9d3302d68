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


@pytest.mark.slow  # a fresh interpreter importing Celery, the SDKs and the task handlers: ~2 s
def test_a_worker_settles_its_heap_with_the_task_handlers_imported() -> None:
    """At worker_init, before a prefork pool forks: the handlers (and the SDKs they import) are loaded,
    so they are frozen too instead of being imported by the first task."""
    answer = run_python(
        """
        import gc, json, sys
        from celery.concurrency.thread import TaskPool
        from celery.signals import worker_init
        import workers.app
        loaded = "workers.llm_call" in sys.modules
        worker_init.send(sender=type("WorkController", (), {"pool_cls": TaskPool})())
        print(json.dumps({
            "loaded_before": loaded,
            "loaded_after": all(f"workers.{m}" in sys.modules
                                for m in ("llm_call", "prepare", "tool_call", "validators")),
            "frozen": gc.get_freeze_count(),
            "young": gc.get_threshold()[0],
        }))
        """
    )
    assert answer == {
        "loaded_before": False,
        "loaded_after": True,
        "frozen": answer["frozen"],
        "young": YOUNG_THRESHOLD,
    }
    assert isinstance(answer["frozen"], int) and answer["frozen"] > 10_000


@pytest.mark.slow  # a fresh interpreter importing Celery, the SDKs and the task handlers: ~5 s
def test_a_worker_imports_the_llm_sdks_before_its_first_task() -> None:
    """The OpenAI and Anthropic SDKs are imported by the worker context's LLM clients, which the first task
    builds: imported then, they held that task (the first run after `kubechain up`) for ~4.5 s on 2 cores,
    and were left out of the frozen start-up heap."""
    answer = run_python(
        """
        import json, sys
        from celery.concurrency.thread import TaskPool
        from celery.signals import worker_init
        import workers.app
        worker_init.send(sender=type("WorkController", (), {"pool_cls": TaskPool})())
        print(json.dumps({m: m in sys.modules for m in (
            "openai", "anthropic", "kubechain.llm.openai_provider", "kubechain.llm.anthropic_provider"
        )}))
        """
    )
    assert answer == {
        "openai": True,
        "anthropic": True,
        "kubechain.llm.openai_provider": True,
        "kubechain.llm.anthropic_provider": True,
    }
