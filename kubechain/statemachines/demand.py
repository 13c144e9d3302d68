"""How much work each worker queue has, for an autoscaler (pure).

A queue's Redis list holds only the messages no worker has taken yet: with every thread of every worker
busy and nothing waiting, its length is 0, and an autoscaler reading it alone removes busy workers. The
work in hand shows in the resources instead: an LLM turn being made holds its run's claim
(SendContextWindowToLLM), a tool call being executed is Running.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubechain.models.taskrun import TaskRunPhase
from kubechain.models.toolcall import ToolCallPhase
from kubechain.queueing import QueueName

Cache = Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]]

# What a thread of each queue's workers is busy with while the step's resource is in that phase.
_IN_HAND: dict[str, tuple[str, str]] = {
    QueueName.LLM.value: ("TaskRun", TaskRunPhase.SEND_CONTEXT_WINDOW_TO_LLM.value),
    QueueName.TOOLS.value: ("TaskRunToolCall", ToolCallPhase.RUNNING.value),
}


def in_hand(cache: Cache) -> dict[str, int]:
    """Steps workers are executing now, by queue (the control and checks queues' tasks show nowhere: 0)."""
    counts = {queue.value: 0 for queue in QueueName}
    for queue, (kind, phase) in _IN_HAND.items():
        counts[queue] = sum(
            1 for obj in (cache.get(kind) or {}).values() if ((obj.get("status") or {}).get("phase")) == phase
        )
    return counts


def demand(backlog: Mapping[str, int], cache: Cache) -> dict[str, dict[str, int]]:
    """Per queue: messages waiting (``backlog``, the lists' lengths), steps in hand, and their sum, the
    number of worker threads the queue could keep busy now."""
    working = in_hand(cache)
    return {
        queue.value: {
            "backlog": int(backlog.get(queue.value, 0)),
            "inHand": working[queue.value],
            "demand": int(backlog.get(queue.value, 0)) + working[queue.value],
        }
        for queue in QueueName
    }
