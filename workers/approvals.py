"""Human approval of tool calls and humans as tools (HumanLayer and kubectl). Hook points for tool_call.

``gate`` runs before a tool call is claimed for execution: it returns True when the call may execute now,
False when it handled the call itself (requested approval, is waiting, or recorded a rejection).
``contact_human`` executes a ``<channel>__human_contact_<type>`` tool call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubechain.models import TaskRunToolCall

if TYPE_CHECKING:
    from workers.context import WorkerContext
    from workers.tool_call import Executor


def gate(ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor) -> bool:
    """Nothing needs approval until the approval flow is implemented."""
    return True


def contact_human(ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor) -> None:
    from workers.transitions import apply_transition
    from kubechain.statemachines.toolcall import plan_tool_failure

    apply_transition(ctx, toolcall, plan_tool_failure(toolcall, "human contact tools are not supported yet", ctx.clock()))
